//! ferry-sender → outbox → inbox → ferry-receiver → PostgreSQL, with the real
//! binaries and a real PostgreSQL server: every table identical row for row (the
//! type zoo included), media byte for byte, duplicates and gaps, corrupted and
//! escaping bundles refused with nothing applied, hooks, kill -9 during a load,
//! pruning.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::fixtures::{ZOO, ZOO_ROWS};
use ferry_tests::pg::{PgServer, exec, table_rows};
use ferry_tests::{binary, outbox_files};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Pipe {
    server: PgServer,
    dir: tempfile::TempDir,
}

impl Pipe {
    async fn new(schema: &str, receiver_extra: &str) -> Self {
        let server = PgServer::start();
        server.create_db("app", schema).await;
        server.create_db("viz", "").await;
        let p = Self {
            server,
            dir: tempfile::tempdir().unwrap(),
        };
        for d in ["media-src", "inbox"] {
            std::fs::create_dir_all(p.path(d)).unwrap();
        }
        std::fs::write(
            p.path("sender.toml"),
            format!(
                "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\n\
                 change_column = \"updated_at\"\noverlap = \"0s\"\n[[media]]\nname = \"images\"\npath = {:?}\n",
                p.path("sstate"),
                p.server.url("app"),
                p.path("media-src")
            ),
        )
        .unwrap();
        std::fs::write(
            p.path("receiver.toml"),
            format!(
                "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n[media]\nimages = {:?}\n{receiver_extra}",
                p.path("rstate"),
                p.path("inbox"),
                p.server.url("viz"),
                p.path("media-dst")
            ),
        )
        .unwrap();
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs the sender; returns the bundle it wrote.
    fn send(&self, kind: &str) -> String {
        let out = run(&binary("ferry-sender"), &self.path("sender.toml"), &[kind]);
        assert!(out.status.success(), "sender {kind}: {}", text(&out.stderr));
        outbox_files(&self.path("sstate/outbox"))
            .into_iter()
            .rfind(|n| ferry_common::manifest::parse_bundle_file_name(n).is_some())
            .unwrap()
    }

    /// Delivers a bundle as an upload would: temporary name, then rename; a
    /// complete sent in volumes, its volumes first.
    fn deliver(&self, file: &str) {
        let stem = format!("{}.v", file.trim_end_matches(".tar.zst"));
        let volumes = outbox_files(&self.path("sstate/outbox"))
            .into_iter()
            .filter(|n| n.starts_with(&stem));
        for f in volumes.chain([file.to_owned()]) {
            let tmp = self.path("inbox").join(format!(".{f}.part"));
            std::fs::copy(self.path("sstate/outbox").join(&f), &tmp).unwrap();
            std::fs::rename(&tmp, self.path("inbox").join(&f)).unwrap();
        }
    }

    /// Sets `target.jobs` (connections loading a complete in parallel).
    fn jobs(&self, n: usize) {
        let path = self.path("receiver.toml");
        let toml = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            toml.replace("[target]\n", &format!("[target]\njobs = {n}\n")),
        )
        .unwrap();
    }

    /// Loads and asserts success; returns stderr (the warnings).
    fn load_ok(&self) -> String {
        let out = self.receive(&["load"]);
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stderr)
    }

    fn receive(&self, args: &[&str]) -> Output {
        run(&binary("ferry-receiver"), &self.path("receiver.toml"), args)
    }

    /// Runs the receiver with `RUST_LOG=filter`.
    fn receive_logged(&self, args: &[&str], filter: &str) -> Output {
        run_logged(
            &binary("ferry-receiver"),
            &self.path("receiver.toml"),
            args,
            filter,
        )
    }

    async fn assert_same(&self, tables: &[&str]) {
        let mut a = self.server.connect("app").await;
        let mut b = self.server.connect("viz").await;
        for t in tables {
            assert_eq!(
                table_rows(&mut a, t).await,
                table_rows(&mut b, t).await,
                "table {t} differs between source and receiver"
            );
        }
    }
}

fn run(bin: &Path, config: &Path, args: &[&str]) -> Output {
    run_logged(bin, config, args, "warn")
}

fn run_logged(bin: &Path, config: &Path, args: &[&str], filter: &str) -> Output {
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", filter)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The receiver's warning when a complete could not be loaded in parallel.
const FELL_BACK: &str = "loading in one transaction instead";
const NOT_MOVED_ASIDE: &str = "the previous copy could not be moved aside";
const DROPPED_AFTER: &str = "previous copy dropped";

/// Waits until no other session uses `viz` (the server noticed a dead or
/// terminated client and rolled its transaction back).
async fn wait_until_sessions_end(viz: &mut sqlx::PgConnection) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'viz' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut *viz)
        .await
        .unwrap();
        if busy == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "a session on viz lingers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Staging schemas, and previous copies moved aside, left in the target (there
/// must be none after a load).
async fn staging_schemas(p: &Pipe) -> Vec<String> {
    let mut viz = p.server.connect("viz").await;
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace
         WHERE nspname LIKE 'ferry%stage%' OR nspname LIKE 'ferry%aside%' OR nspname LIKE 'ferry%old%'",
    )
        .fetch_all(&mut viz)
        .await
        .unwrap()
}

const ZOO_TABLES: [&str; 3] = ["zoo", "\"TextKey\"", "composite"];

#[tokio::test]
async fn the_type_zoo_and_media_arrive_identical() {
    let p = Pipe::new(ZOO, "").await;
    let mut src = p.server.connect("app").await;
    exec(&mut src, ZOO_ROWS).await;
    std::fs::create_dir_all(p.path("media-src/2026/11")).unwrap();
    std::fs::write(p.path("media-src/2026/11/a.jpg"), vec![0xffu8; 100_000]).unwrap();
    p.deliver(&p.send("complete"));
    let warnings = p.load_ok();
    // The enum, the domain, serial and identity sequences all staged and moved.
    assert!(!warnings.contains(FELL_BACK), "{warnings}");
    assert!(staging_schemas(&p).await.is_empty());
    p.assert_same(&ZOO_TABLES).await;
    assert_eq!(
        std::fs::read(p.path("media-dst/2026/11/a.jpg")).unwrap(),
        vec![0xffu8; 100_000]
    );

    exec(
        &mut src,
        r#"UPDATE zoo SET t = E'changed\t\\', d = '-0', updated_at = now() WHERE id IN (1, 3);
           INSERT INTO zoo ("camelCase", j, b) VALUES ('new', '{"x":
             1}', '\xdeadbeef');
           DELETE FROM zoo WHERE id = 2;
           DELETE FROM "TextKey" WHERE code = '';
           UPDATE composite SET v = 'changed', updated_at = now() WHERE a = 2;"#,
    )
    .await;
    std::fs::write(p.path("media-src/b.png"), b"png").unwrap();
    p.deliver(&p.send("partial"));
    let out = p.receive(&["load"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    p.assert_same(&ZOO_TABLES).await;
    assert_eq!(std::fs::read(p.path("media-dst/b.png")).unwrap(), b"png");

    // A second complete replaces the copy atomically, sequences included. The
    // old tables use the enum the new DDL replaces, so they cannot be moved
    // aside: they are dropped in the swap instead.
    exec(&mut src, "INSERT INTO zoo (\"camelCase\") VALUES ('after')").await;
    p.deliver(&p.send("complete"));
    let out = p.receive_logged(&["load"], "warn,ferry_receiver::load=debug");
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains(FELL_BACK), "{log}");
    assert!(log.contains(NOT_MOVED_ASIDE), "{log}");
    assert!(staging_schemas(&p).await.is_empty());
    p.assert_same(&ZOO_TABLES).await;
    // The new copy's sequences are the source's: the next id follows on.
    let mut viz = p.server.connect("viz").await;
    let next: i32 = sqlx::query_scalar("INSERT INTO zoo (\"camelCase\") VALUES ('x') RETURNING id")
        .fetch_one(&mut viz)
        .await
        .unwrap();
    let max: i32 = sqlx::query_scalar("SELECT max(id) FROM zoo")
        .fetch_one(&mut src)
        .await
        .unwrap();
    assert_eq!(next, max + 1);
    exec(&mut viz, "DELETE FROM zoo WHERE \"camelCase\" = 'x'").await;
    let status = p.receive(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["pending"].as_array().unwrap().len(), 0);
    assert!(
        s["applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["seq"] == 3 && a["kind"] == "complete")
    );
}

/// Text COPY (`[complete] copy_format = "text"`) loads the type zoo identically,
/// staged in parallel and in one transaction, and the bundle says so.
#[tokio::test]
async fn the_type_zoo_arrives_identical_in_text_copy_too() {
    let p = Pipe::new(ZOO, "").await;
    let mut src = p.server.connect("app").await;
    exec(&mut src, ZOO_ROWS).await;
    let cfg = p.path("sender.toml");
    let toml = std::fs::read_to_string(&cfg).unwrap() + "[complete]\ncopy_format = \"text\"\n";
    std::fs::write(&cfg, toml).unwrap();
    let file = p.send("complete");
    let (m, _) = ferry_tests::bundle_contents(&p.path("sstate/outbox").join(&file));
    let data: Vec<_> = m
        .members
        .iter()
        .filter(|x| x.role == ferry_common::manifest::Role::Data)
        .collect();
    assert!(!data.is_empty());
    assert!(
        data.iter()
            .all(|x| x.format == Some(ferry_common::manifest::DataFormat::PgCopyText))
    );
    p.deliver(&file);
    let warnings = p.load_ok();
    assert!(!warnings.contains(FELL_BACK), "{warnings}");
    p.assert_same(&ZOO_TABLES).await;

    exec(&mut src, "INSERT INTO zoo (\"camelCase\") VALUES ('after')").await;
    p.jobs(1);
    p.deliver(&p.send("complete"));
    p.load_ok();
    p.assert_same(&ZOO_TABLES).await;
}

const SMALL: &str = "CREATE TABLE parent (id int PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent(id) ON DELETE CASCADE, v text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON parent (updated_at); CREATE INDEX ON child (updated_at);
INSERT INTO parent (id, name) VALUES (1, 'p1'), (2, 'p2');
INSERT INTO child (id, parent_id, v) VALUES (10, 1, 'a'), (20, 2, 'b');";

#[tokio::test]
async fn order_gaps_and_duplicates() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    let c1 = p.send("complete");
    exec(&mut src, "INSERT INTO parent (id, name) VALUES (3, 'p3'); INSERT INTO child (id, parent_id, v) VALUES (30, 3, 'c')").await;
    let p2 = p.send("partial");
    exec(&mut src, "DELETE FROM parent WHERE id = 1; UPDATE child SET v = 'bb', updated_at = now() WHERE id = 20").await;
    let p3 = p.send("partial");

    // #3 arrives before #2: #1 applies, #3 waits for the gap.
    p.deliver(&c1);
    p.deliver(&p3);
    let out = p.receive(&["load"]);
    assert_eq!(out.status.code(), Some(1), "a held bundle is not success");
    assert!(
        text(&out.stdout).contains("waits for bundle #2"),
        "{}",
        text(&out.stdout)
    );
    let mut viz = p.server.connect("viz").await;
    assert_eq!(table_rows(&mut viz, "parent").await.len(), 2);

    p.deliver(&p2);
    let out = p.receive(&["load"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    p.assert_same(&["parent", "child"]).await;

    // A re-delivered bundle is skipped: exactly once.
    p.deliver(&p2);
    let out = p.receive(&["load"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("nothing pending"),
        "{}",
        text(&out.stdout)
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ferry_receiver.applied")
        .fetch_one(&mut viz)
        .await
        .unwrap();
    assert_eq!(n, 3);
    p.assert_same(&["parent", "child"]).await;
}

/// Flips one byte in the middle of a file.
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_corrupted_bundle_is_quarantined_and_later_ones_wait() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    assert!(p.receive(&["load"]).status.success());
    exec(
        &mut src,
        "INSERT INTO parent (id, name) SELECT g, md5(g::text) FROM generate_series(100, 2000) g",
    )
    .await;
    let p2 = p.send("partial");
    exec(
        &mut src,
        "UPDATE parent SET name = 'x', updated_at = now() WHERE id = 2",
    )
    .await;
    let p3 = p.send("partial");
    p.deliver(&p2);
    corrupt(&p.path("inbox").join(&p2));
    p.deliver(&p3);
    let out = p.receive(&["load"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("FAILED  {p2}")), "{stdout}");
    assert!(
        stdout.contains("held behind quarantined bundle #2"),
        "{stdout}"
    );
    // Nothing of it was applied.
    let mut viz = p.server.connect("viz").await;
    assert_eq!(table_rows(&mut viz, "parent").await.len(), 2);
    let failures = text(&p.receive(&["failures"]).stdout);
    assert!(
        failures.contains(&p2) && failures.contains("Nothing of this bundle was applied"),
        "{failures}"
    );
    assert!(!p.path("inbox").join(&p2).exists());

    // The operator fixes it (a good copy) and retries: everything applies in order.
    std::fs::copy(
        p.path("sstate/outbox").join(&p2),
        p.path("rstate/quarantine").join(&p2),
    )
    .unwrap();
    assert!(p.receive(&["retry", &p2]).status.success());
    let out = p.receive(&["load"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    p.assert_same(&["parent", "child"]).await;
    assert!(text(&p.receive(&["failures"]).stdout).contains("no failed bundles"));
}

/// Replaces a member's bytes and rewrites the manifest to match (size, BLAKE3):
/// a bundle that verifies but carries data of the wrong shape.
fn replace_member(bundle: &Path, member: &str, data: &[u8]) {
    use ferry_common::checksum::{Algorithm, of};
    let mut entries = bundle_entries(bundle);
    let mut manifest: serde_json::Value = serde_json::from_slice(&entries[0].1).unwrap();
    let m = manifest["members"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["path"] == member)
        .unwrap();
    m["size"] = data.len().into();
    m["blake3"] = of(Algorithm::Blake3, data).hex().into();
    entries[0].1 = serde_json::to_vec(&manifest).unwrap();
    // The manifest's own checksum (format 3), as a sender would write it.
    let sum = format!("{}\n", of(Algorithm::Blake3, &entries[0].1).hex());
    entries
        .iter_mut()
        .find(|(p, _)| p == ferry_common::manifest::MANIFEST_SUM)
        .unwrap()
        .1 = sum.into_bytes();
    entries.iter_mut().find(|(p, _)| p == member).unwrap().1 = data.to_vec();
    write_bundle(bundle, &entries);
}

/// Binary COPY data of the wrong shape (a tuple with 2 fields for a 3-column
/// table) in a bundle whose checksums match: the load fails naming the table,
/// nothing is applied, the bundle is quarantined and staging is cleaned up.
#[tokio::test]
async fn binary_data_of_the_wrong_shape_is_refused_and_nothing_applies() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    p.load_ok();
    exec(&mut src, "INSERT INTO parent (id, name) VALUES (3, 'p3')").await;
    let c2 = p.send("complete");
    let mut bad = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
    bad.extend_from_slice(&2i16.to_be_bytes());
    bad.extend_from_slice(&4i32.to_be_bytes());
    bad.extend_from_slice(&7i32.to_be_bytes());
    bad.extend_from_slice(&1i32.to_be_bytes());
    bad.push(b'x');
    bad.extend_from_slice(&(-1i16).to_be_bytes());
    replace_member(
        &p.path("sstate/outbox").join(&c2),
        "data/public.parent.copy",
        &bad,
    );
    p.deliver(&c2);
    let out = p.receive(&["load"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains(&format!("FAILED  {c2}")));
    let failures = text(&p.receive(&["failures"]).stdout);
    assert!(
        failures.contains("public.parent") && failures.contains("field count"),
        "{failures}"
    );
    let mut viz = p.server.connect("viz").await;
    assert_eq!(table_rows(&mut viz, "parent").await.len(), 2);
    assert!(staging_schemas(&p).await.is_empty());
}

#[tokio::test]
async fn a_complete_supersedes_a_quarantined_chain() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    assert!(p.receive(&["load"]).status.success());
    exec(&mut src, "INSERT INTO parent (id, name) VALUES (5, 'p5')").await;
    let p2 = p.send("partial");
    p.deliver(&p2);
    corrupt(&p.path("inbox").join(&p2));
    assert_eq!(p.receive(&["load"]).status.code(), Some(1));
    p.deliver(&p.send("complete"));
    let out = p.receive(&["load"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    p.assert_same(&["parent", "child"]).await;
}

#[tokio::test]
async fn hooks_get_the_facts_and_failures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env.txt");
    let extra = format!(
        "[[hooks]]\ncommand = [\"/bin/sh\", \"-c\", \"env | grep ^FERRY_ | sort > {}\"]\n\
         [[hooks]]\non = [\"partial\"]\ncommand = [\"/bin/sh\", \"-c\", \"echo boom >&2; exit 3\"]\n\
         [[hooks]]\non = [\"complete\"]\nsql = \"CREATE TABLE IF NOT EXISTS hook_ran (at timestamptz DEFAULT now()); INSERT INTO hook_ran DEFAULT VALUES\"\n",
        env_file.display()
    );
    let p = Pipe::new(SMALL, &extra).await;
    let c1 = p.send("complete");
    p.deliver(&c1);
    let out = p.receive(&["load"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains(&format!("FERRY_BUNDLE={c1}")), "{env}");
    assert!(
        env.contains("FERRY_KIND=complete") && env.contains("FERRY_SEQ=1"),
        "{env}"
    );
    assert!(
        env.contains("FERRY_TABLES=public.child,public.parent")
            || env.contains("FERRY_TABLES=public.parent,public.child"),
        "{env}"
    );
    let mut viz = p.server.connect("viz").await;
    assert_eq!(
        table_rows(&mut viz, "hook_ran").await.len(),
        1,
        "the SQL hook ran in the load"
    );

    // A failing command hook: the data is committed, the failure is reported.
    let mut src = p.server.connect("app").await;
    exec(&mut src, "INSERT INTO parent (id, name) VALUES (9, 'p9')").await;
    p.deliver(&p.send("partial"));
    let out = p.receive(&["load"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed hook makes load exit non-zero"
    );
    assert!(
        text(&out.stdout).contains("hook failed after"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("exited with exit status: 3"),
        "{}",
        text(&out.stdout)
    );
    p.assert_same(&["parent", "child"]).await;
}

#[tokio::test]
async fn a_failing_sql_hook_fails_the_load_and_applies_nothing() {
    let p = Pipe::new(SMALL, "[[hooks]]\nsql = \"SELECT 1/0\"\n").await;
    p.deliver(&p.send("complete"));
    let out = p.receive(&["load"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("division by zero"),
        "{}",
        text(&out.stdout)
    );
    let mut viz = p.server.connect("viz").await;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.parent') IS NOT NULL")
        .fetch_one(&mut viz)
        .await
        .unwrap();
    assert!(!exists, "the failed load left a table behind");
}

#[tokio::test]
async fn kill_9_during_a_load_keeps_the_previous_copy_and_the_next_run_applies_it() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    assert!(p.receive(&["load"]).status.success());
    exec(&mut src, "INSERT INTO child (id, parent_id, v) SELECT g, 1, repeat(md5(g::text), 8) FROM generate_series(1000, 600000) g").await;
    p.deliver(&p.send("complete"));
    let mut child = Command::new(binary("ferry-receiver"))
        .arg("--config")
        .arg(p.path("receiver.toml"))
        .arg("load")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    // Wait until the COPY into the target is running, then kill -9.
    let mut viz = p.server.connect("viz").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copying: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'viz' AND query LIKE 'COPY%FROM STDIN%'",
        )
        .fetch_one(&mut viz)
        .await
        .unwrap();
        if copying > 0 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the load finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "the load never started copying");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The server notices the dead client and rolls back; the old copy is intact.
    wait_until_sessions_end(&mut viz).await;
    assert_eq!(
        table_rows(&mut viz, "child").await.len(),
        2,
        "the old copy must be intact"
    );
    p.load_ok();
    p.assert_same(&["parent", "child"]).await;
    assert!(
        staging_schemas(&p).await.is_empty(),
        "the next load removes what the killed one staged"
    );
    let left: Vec<_> = std::fs::read_dir(p.path("rstate/staging"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging files left behind: {left:?}");
}

/// A second complete moves the previous copy's tables aside in the swap and
/// drops them after the commit, so readers do not wait while the file system
/// frees them; nothing of the old copy stays behind.
#[tokio::test]
async fn a_replaced_copy_is_dropped_after_the_commit() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    p.load_ok();
    exec(
        &mut src,
        "INSERT INTO child (id, parent_id, v) SELECT g, 1, 'x' FROM generate_series(1000, 5000) g",
    )
    .await;
    p.deliver(&p.send("complete"));
    let out = p.receive_logged(&["load"], "warn,ferry_receiver::load=debug");
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(DROPPED_AFTER), "{log}");
    assert!(!log.contains(NOT_MOVED_ASIDE), "{log}");
    assert!(!log.contains(FELL_BACK), "{log}");
    assert!(staging_schemas(&p).await.is_empty());
    p.assert_same(&["parent", "child"]).await;
}

#[tokio::test]
async fn pruning_keeps_the_newest_complete_and_anything_unapplied() {
    // Retention by count: one complete and what follows it; no age.
    let p = Pipe::new(
        SMALL,
        "[retention]\ncomplete = \"0s\"\npartial = \"0s\"\nkeep_completes = 1\n",
    )
    .await;
    let mut src = p.server.connect("app").await;
    let c1 = p.send("complete");
    // Both tables change, so the next complete dumps both and needs nothing
    // of c1 (a complete that carries tables keeps their complete: carry.rs).
    exec(
        &mut src,
        "INSERT INTO parent (id) VALUES (7); INSERT INTO child (id, parent_id) VALUES (70, 7)",
    )
    .await;
    let p2 = p.send("partial");
    for f in [&c1, &p2] {
        p.deliver(f);
    }
    assert!(p.receive(&["load"]).status.success());
    let c3 = p.send("complete");
    exec(&mut src, "INSERT INTO parent (id) VALUES (8)").await;
    let p4 = p.send("partial");
    exec(&mut src, "INSERT INTO parent (id) VALUES (99)").await;
    let p5 = p.send("partial");
    for f in [&c3, &p4] {
        p.deliver(f);
    }
    assert!(p.receive(&["load"]).status.success());
    p.deliver(&p5); // not applied yet
    let out = p.receive(&["prune"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("pruned {c1}: older than every kept restore point")),
        "{said}"
    );
    let left = outbox_files(&p.path("inbox"));
    assert_eq!(
        left,
        vec![c3.clone(), p4.clone(), p5],
        "kept: the newest complete, the point after it, and the unapplied one"
    );
    // Every kept point is restorable.
    let v = text(&p.receive(&["versions"]).stdout);
    assert!(
        v.contains("oldest restorable point: app #3 (complete"),
        "{v}"
    );
    assert!(
        v.contains("newest restorable point: app #4 (partial"),
        "{v}"
    );
}

/// Retention by age: every point younger than its lifetime stays restorable,
/// so the complete it builds on stays even when newer completes exist.
#[tokio::test]
async fn pruning_keeps_what_points_inside_the_lifetime_build_on() {
    let p = Pipe::new(
        SMALL,
        "[retention]\ncomplete = \"0s\"\npartial = \"1d\"\nkeep_completes = 1\n",
    )
    .await;
    let mut src = p.server.connect("app").await;
    let c1 = p.send("complete");
    // Both tables change, so the next complete dumps both and needs nothing
    // of c1 (a complete that carries tables keeps their complete: carry.rs).
    exec(
        &mut src,
        "INSERT INTO parent (id) VALUES (7); INSERT INTO child (id, parent_id) VALUES (70, 7)",
    )
    .await;
    let p2 = p.send("partial");
    for f in [&c1, &p2] {
        p.deliver(f);
    }
    assert!(p.receive(&["load"]).status.success());
    let c3 = p.send("complete");
    p.deliver(&c3);
    assert!(p.receive(&["load"]).status.success());
    let out = p.receive(&["prune"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        outbox_files(&p.path("inbox")),
        vec![c1, p2, c3],
        "#2 is a day young: it and its complete #1 stay"
    );
}

#[tokio::test]
async fn a_complete_corrupted_late_rolls_back_to_the_previous_copy() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    assert!(p.receive(&["load"]).status.success());
    // Big enough that its data streams into COPY before the damage is reached.
    exec(&mut src, "INSERT INTO child (id, parent_id, v) SELECT g, 2, md5(g::text) FROM generate_series(1000, 300000) g").await;
    let c2 = p.send("complete");
    p.deliver(&c2);
    let path = p.path("inbox").join(&c2);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() * 9 / 10;
    bytes[at] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let out = p.receive(&["load"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains(&format!("FAILED  {c2}")),
        "{}",
        text(&out.stdout)
    );
    let mut viz = p.server.connect("viz").await;
    assert_eq!(
        table_rows(&mut viz, "child").await.len(),
        2,
        "the previous copy must be intact"
    );
    assert!(
        staging_schemas(&p).await.is_empty(),
        "the staged copy was removed"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ferry_receiver.applied")
        .fetch_one(&mut viz)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn one_transaction_loads_when_asked_and_when_staging_is_impossible() {
    // jobs = 1: everything in the load transaction.
    let p = Pipe::new(SMALL, "").await;
    p.jobs(1);
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    p.load_ok();
    exec(&mut src, "INSERT INTO child (id, parent_id, v) VALUES (30, 2, 'c'); UPDATE parent SET name = 'x', updated_at = now() WHERE id = 1").await;
    p.deliver(&p.send("partial"));
    p.load_ok();
    p.assert_same(&["parent", "child"]).await;

    // A column typed by an extension that lives in `public` cannot be staged
    // (staging renames `public` aside): the load falls back, with a warning.
    let ext = "CREATE EXTENSION citext;
               CREATE TABLE person (id int PRIMARY KEY, email citext, updated_at timestamptz NOT NULL DEFAULT now());
               CREATE INDEX ON person (updated_at);
               INSERT INTO person (id, email) VALUES (1, 'A@x.org'), (2, 'b@X.org');";
    let p = Pipe::new(ext, "").await;
    exec(
        &mut p.server.connect("viz").await,
        "CREATE EXTENSION citext",
    )
    .await;
    p.deliver(&p.send("complete"));
    let warnings = p.load_ok();
    assert!(warnings.contains(FELL_BACK), "{warnings}");
    assert!(
        warnings.contains("citext"),
        "the warning names the cause: {warnings}"
    );
    p.assert_same(&["person"]).await;
    assert!(staging_schemas(&p).await.is_empty());
}

#[tokio::test]
async fn sigterm_during_a_load_abandons_it_cleanly_and_the_next_start_applies_it() {
    // A SQL hook that sleeps keeps the load transaction open.
    let p = Pipe::new(
        SMALL,
        "[daemon]\nrescan_interval = \"1h\"\n[[hooks]]\non = [\"complete\"]\nsql = \"SELECT pg_sleep(60)\"\n",
    )
    .await;
    p.deliver(&p.send("complete"));
    let mut cmd = Command::new(binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(p.path("receiver.toml"))
        .arg("run")
        .env("RUST_LOG", "info");
    let mut d = ferry_tests::daemon::Daemon::spawn(cmd);
    let mut viz = p.server.connect("viz").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sleeping: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'viz' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut viz)
        .await
        .unwrap();
        if sleeping > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the load never reached its hook:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}:\n{}", d.log());
    assert!(stopped.elapsed() < Duration::from_secs(15));
    assert!(
        d.log().contains("abandoned the load in flight"),
        "{}",
        d.log()
    );
    // Nothing committed; the bundle waits in the inbox.
    wait_until_sessions_end(&mut viz).await;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.parent') IS NOT NULL")
        .fetch_one(&mut viz)
        .await
        .unwrap();
    assert!(!exists, "the abandoned load committed something");
    // Without the sleeping hook, the next start applies it.
    let conf = std::fs::read_to_string(p.path("receiver.toml")).unwrap();
    std::fs::write(
        p.path("receiver.toml"),
        conf.replace("sql = \"SELECT pg_sleep(60)\"", "sql = \"SELECT 1\""),
    )
    .unwrap();
    p.load_ok();
    p.assert_same(&["parent", "child"]).await;
    assert!(staging_schemas(&p).await.is_empty());
}

/// Indexes and constraints of every kind a staged complete must reproduce: the
/// ones built on the copy connections (keys, unique, partial, a quoted table, a
/// second schema, an exclusion constraint) and the ones left for the swap (an
/// index on an app function, foreign keys, an app trigger).
const INDEXED: &str = r#"CREATE SCHEMA reporting;
CREATE FUNCTION norm(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower(t) $$;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.updated_at = now(); RETURN NEW; END $$;
CREATE TABLE parent (id int PRIMARY KEY, name text UNIQUE, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE "Child Table" (id int PRIMARY KEY, parent_id int REFERENCES parent(id), v text,
  during tsrange, updated_at timestamptz NOT NULL DEFAULT now(),
  EXCLUDE USING gist (during WITH &&));
CREATE INDEX ON parent (updated_at);
CREATE INDEX "Child v" ON "Child Table" (v) WHERE v <> 'skip';
CREATE INDEX ON "Child Table" (norm(v));
CREATE INDEX ON "Child Table" (updated_at);
CREATE TRIGGER touch BEFORE UPDATE ON parent FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TABLE reporting.daily (day date PRIMARY KEY, total bigint, updated_at timestamptz NOT NULL DEFAULT now());
CREATE UNIQUE INDEX daily_total ON reporting.daily (total);
INSERT INTO parent (id, name) SELECT g, 'p' || g FROM generate_series(1, 1000) g;
INSERT INTO "Child Table" (id, parent_id, v, during)
  SELECT g, 1 + g % 1000, 'v' || g, tsrange('2026-01-01'::timestamp + g * interval '1 hour', '2026-01-01'::timestamp + (g + 1) * interval '1 hour')
  FROM generate_series(1, 5000) g;
INSERT INTO reporting.daily (day, total) SELECT '2026-01-01'::date + g, g FROM generate_series(1, 300) g;"#;

/// Every index and constraint definition (and trigger) of the app's schemas.
async fn definitions(conn: &mut sqlx::PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT d FROM (
           SELECT 'index ' || pg_get_indexdef(i.indexrelid) AS d
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname IN ('public', 'reporting')
           UNION ALL
           SELECT format('constraint %s on %s: %s%s', conname, conrelid::regclass,
                         pg_get_constraintdef(oid), CASE WHEN convalidated THEN '' ELSE ' NOT VALID' END)
           FROM pg_constraint WHERE connamespace::regnamespace::text IN ('public', 'reporting')
           UNION ALL
           SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
         ) x ORDER BY d",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_staged_complete_keeps_every_index_and_constraint() {
    let p = Pipe::new(INDEXED, "").await;
    let mut src = p.server.connect("app").await;
    let want = definitions(&mut src).await;
    assert!(want.len() >= 12, "{want:#?}");
    for round in 0..3 {
        let bundle = p.send("complete");
        if round == 2 {
            // As an older ferry-sender wrote it: the post-data after the data.
            move_member_last(
                &p.path("sstate/outbox").join(&bundle),
                "schema/post-data.sql",
            );
        }
        p.deliver(&bundle);
        let out = Command::new(binary("ferry-receiver"))
            .arg("--config")
            .arg(p.path("receiver.toml"))
            .arg("load")
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        let log = text(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(!log.contains(FELL_BACK), "{log}");
        // parent, "Child Table" and reporting.daily built theirs in staging.
        assert!(log.contains("built=3"), "round {round}: {log}");
        assert!(staging_schemas(&p).await.is_empty());
        let mut viz = p.server.connect("viz").await;
        assert_eq!(definitions(&mut viz).await, want, "round {round}");
        p.assert_same(&["parent", "\"Child Table\"", "reporting.daily"])
            .await;
        // The constraints hold on the copy.
        let dup = sqlx::query("INSERT INTO parent (id, name) VALUES (5000, 'p2')")
            .execute(&mut viz)
            .await;
        assert!(
            dup.is_err(),
            "round {round}: the unique constraint on parent.name holds"
        );
        let orphan =
            sqlx::query("INSERT INTO \"Child Table\" (id, parent_id) VALUES (99999, 424242)")
                .execute(&mut viz)
                .await;
        assert!(orphan.is_err(), "the foreign key holds");
        exec(
            &mut src,
            "UPDATE parent SET name = name || 'x' WHERE id = 1",
        )
        .await;
    }
}

/// Rewrites a bundle with one member moved to the end of the tar.
fn move_member_last(bundle: &Path, member: &str) {
    let mut entries = bundle_entries(bundle);
    let at = entries.iter().position(|(p, _)| p == member).unwrap();
    let moved = entries.remove(at);
    entries.push(moved);
    write_bundle(bundle, &entries);
}

/// A bundle's members in order (manifest first): path and bytes, unverified.
fn bundle_entries(bundle: &Path) -> Vec<(String, Vec<u8>)> {
    let raw = zstd::decode_all(std::fs::File::open(bundle).unwrap()).unwrap();
    let mut entries = Vec::new();
    for e in tar::Archive::new(&raw[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        entries.push((e.path().unwrap().display().to_string(), bytes));
    }
    entries
}

/// Writes `entries` as a bundle (one zstd frame, regular files).
fn write_bundle(bundle: &Path, entries: &[(String, Vec<u8>)]) {
    let mut out = tar::Builder::new(Vec::new());
    for (path, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        out.append_data(&mut h, path, &bytes[..]).unwrap();
    }
    let tar = out.into_inner().unwrap();
    std::fs::write(bundle, zstd::encode_all(&tar[..], 1).unwrap()).unwrap();
}

/// Two receivers on one inbox and target (a mistake, but a likely one): the
/// one that loses the race for a bundle finds it applied when it gets the
/// ledger's lock, and skips it as a re-delivery — no ERROR, nothing moved to
/// its quarantine. (A slow SQL hook keeps the first load's transaction open.)
#[tokio::test]
async fn a_second_receiver_that_loses_the_race_skips_the_bundle_quietly() {
    let p = Pipe::new(SMALL, "[[hooks]]\nsql = \"SELECT pg_sleep(2)\"\n").await;
    let mut src = p.server.connect("app").await;
    p.deliver(&p.send("complete"));
    p.load_ok();
    exec(&mut src, "INSERT INTO parent (id, name) VALUES (7, 'p7')").await;
    p.deliver(&p.send("partial"));
    let second = p.path("receiver2.toml");
    std::fs::write(
        &second,
        std::fs::read_to_string(p.path("receiver.toml"))
            .unwrap()
            .replace("rstate", "rstate2"),
    )
    .unwrap();
    let other = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        Command::new(binary("ferry-receiver"))
            .arg("--config")
            .arg(&second)
            .arg("load")
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    });
    // The first load starts now; the other one plans while the first's
    // transaction (held open by the hook) has not committed.
    let first = Command::new(binary("ferry-receiver"))
        .arg("--config")
        .arg(p.path("receiver.toml"))
        .arg("load")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let out = other.join().unwrap();
    assert!(first.status.success(), "{}", text(&first.stderr));
    let log = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    assert!(
        outbox_files(&p.path("rstate2/quarantine")).is_empty(),
        "{log}"
    );
    p.assert_same(&["parent", "child"]).await;
}

/// A Django-shaped database with `include = ["public.AndroidRequests_*"]`: the
/// complete carries exactly the sequences its selected tables own or use as a
/// default (not `auth_permission_id_seq` and the other Django ones, which the
/// receiver does not have), and the very first complete loads.
#[tokio::test]
async fn a_complete_carries_only_the_sequences_of_its_tables() {
    let p = Pipe::new(
        r#"CREATE TABLE auth_permission (id serial PRIMARY KEY, name text);
           CREATE TABLE django_migrations (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, app text);
           CREATE SEQUENCE report_number;
           CREATE TABLE "AndroidRequests_phone" (id serial PRIMARY KEY, model text,
             updated_at timestamptz NOT NULL DEFAULT now());
           CREATE TABLE "AndroidRequests_report" (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             number int NOT NULL DEFAULT nextval('report_number'), updated_at timestamptz NOT NULL DEFAULT now());
           INSERT INTO auth_permission (name) SELECT 'p' || g FROM generate_series(1, 40) g;
           INSERT INTO django_migrations (app) VALUES ('x'), ('y');
           INSERT INTO "AndroidRequests_phone" (model) VALUES ('a'), ('b'), ('c');
           INSERT INTO "AndroidRequests_report" DEFAULT VALUES;"#,
        "",
    )
    .await;
    let toml = std::fs::read_to_string(p.path("sender.toml")).unwrap();
    std::fs::write(
        p.path("sender.toml"),
        toml.replace(
            "[source]\n",
            "[source]\ninclude = [\"public.AndroidRequests_*\"]\n",
        ),
    )
    .unwrap();
    let c1 = p.send("complete");
    let (_, members) = ferry_tests::bundle_contents(&p.path("sstate/outbox").join(&c1));
    let seqs = String::from_utf8_lossy(&members["schema/sequences.sql"]).into_owned();
    assert!(seqs.contains("\"AndroidRequests_phone_id_seq\""), "{seqs}");
    assert!(seqs.contains("\"AndroidRequests_report_id_seq\""), "{seqs}");
    assert!(seqs.contains("report_number"), "{seqs}");
    assert!(
        !seqs.contains("auth_permission") && !seqs.contains("django"),
        "{seqs}"
    );
    p.deliver(&c1);
    p.load_ok();
    p.assert_same(&["\"AndroidRequests_phone\"", "\"AndroidRequests_report\""])
        .await;
    // The copy's sequences continue where the source's are.
    let mut viz = p.server.connect("viz").await;
    let next: i32 = sqlx::query_scalar("SELECT nextval('\"AndroidRequests_phone_id_seq\"')::int")
        .fetch_one(&mut viz)
        .await
        .unwrap();
    assert_eq!(next, 4);
}

/// The application's triggers come with the complete's DDL but must not fire on
/// the copy: a `BEFORE` trigger that stamps a column and an audit trigger that
/// writes rows would otherwise make the target differ from the source on every
/// applied row. With `[target] fire_triggers = true` they fire (opt-in).
#[tokio::test]
async fn the_applications_triggers_do_not_fire_on_the_copy() {
    const TRIGGERS: &str = r#"
        CREATE TABLE item (id int PRIMARY KEY, v text, touched text,
                           updated_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE audit (id serial PRIMARY KEY, item_id int,
                            updated_at timestamptz NOT NULL DEFAULT now());
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN NEW.touched := 'stamped ' || clock_timestamp(); RETURN NEW; END$$;
        CREATE FUNCTION audit_item() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO audit (item_id) VALUES (NEW.id); RETURN NEW; END$$;
        CREATE TRIGGER item_touch BEFORE INSERT OR UPDATE ON item
          FOR EACH ROW EXECUTE FUNCTION touch();
        CREATE TRIGGER item_audit AFTER INSERT OR UPDATE ON item
          FOR EACH ROW EXECUTE FUNCTION audit_item();
        INSERT INTO item (id, v) SELECT g, 'v' || g FROM generate_series(1, 20) g;"#;
    for fire in [false, true] {
        let p = Pipe::new(TRIGGERS, "").await;
        if fire {
            let toml = std::fs::read_to_string(p.path("receiver.toml")).unwrap();
            std::fs::write(
                p.path("receiver.toml"),
                toml.replace("[target]\n", "[target]\nfire_triggers = true\n"),
            )
            .unwrap();
        }
        let mut src = p.server.connect("app").await;
        if fire {
            // An audit trigger on both sides would collide on audit's keys.
            exec(&mut src, "DROP TRIGGER item_audit ON item").await;
        }
        p.deliver(&p.send("complete"));
        p.load_ok();
        exec(
            &mut src,
            "UPDATE item SET v = 'changed', updated_at = now() WHERE id <= 5;
             INSERT INTO item (id, v) VALUES (21, 'new')",
        )
        .await;
        p.deliver(&p.send("partial"));
        p.load_ok();
        if fire {
            // Opted in: the copy's trigger stamped the applied rows again.
            let mut viz = p.server.connect("viz").await;
            assert_ne!(
                table_rows(&mut viz, "item").await,
                table_rows(&mut src, "item").await
            );
        } else {
            p.assert_same(&["item", "audit"]).await;
        }
    }
}

/// A table that leaves the source (here dropped, with a trigger function it
/// shares with another table) must not stop replication: the next complete
/// drops it from the copy, whose DDL then applies, in both load paths
/// (parallel staging and one transaction).
#[tokio::test]
async fn a_table_dropped_on_the_source_leaves_the_copy() {
    const SHARED: &str = r#"
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN NEW.updated_at := now(); RETURN NEW; END$$;
        CREATE TABLE keep (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE gone (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
        CREATE TRIGGER keep_touch BEFORE UPDATE ON keep FOR EACH ROW EXECUTE FUNCTION touch();
        CREATE TRIGGER gone_touch BEFORE UPDATE ON gone FOR EACH ROW EXECUTE FUNCTION touch();
        INSERT INTO keep SELECT g, 'k' FROM generate_series(1, 10) g;
        INSERT INTO gone SELECT g, 'g' FROM generate_series(1, 10) g;"#;
    for jobs in [2, 1] {
        let p = Pipe::new(SHARED, "").await;
        p.jobs(jobs);
        let mut src = p.server.connect("app").await;
        p.deliver(&p.send("complete"));
        p.load_ok();
        exec(
            &mut src,
            "DROP TABLE gone; UPDATE keep SET v = 'x' WHERE id = 1",
        )
        .await;
        p.deliver(&p.send("complete"));
        p.load_ok();
        p.assert_same(&["keep"]).await;
        let mut viz = p.server.connect("viz").await;
        let left: bool = sqlx::query_scalar("SELECT to_regclass('public.gone') IS NOT NULL")
            .fetch_one(&mut viz)
            .await
            .unwrap();
        assert!(
            !left,
            "jobs = {jobs}: the dropped table is still on the copy"
        );
    }
}

/// Whoever can write into the inbox runs a complete's DDL on the target: `check`
/// warns (exit 0) when the receiver connects as a superuser, and not when it
/// connects as a role that owns only the target database.
#[tokio::test]
async fn check_warns_when_the_receiver_connects_as_a_superuser() {
    let p = Pipe::new(SMALL, "").await;
    let out = p.receive(&["check"]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("WARN") && said.contains("superuser"),
        "{said}"
    );
    let mut admin = p.server.connect("postgres").await;
    exec(&mut admin, "CREATE ROLE viz_owner LOGIN").await;
    exec(&mut admin, "CREATE DATABASE viz2 OWNER viz_owner").await;
    let mut viz2 = p.server.connect("viz2").await;
    exec(&mut viz2, "ALTER SCHEMA public OWNER TO viz_owner").await;
    let toml = std::fs::read_to_string(p.path("receiver.toml")).unwrap();
    let url = p.server.url("viz");
    std::fs::write(
        p.path("receiver.toml"),
        toml.replace(
            &url,
            &p.server
                .url("viz2")
                .replace("postgres://postgres@", "postgres://viz_owner@"),
        ),
    )
    .unwrap();
    let out = p.receive(&["check"]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("superuser"), "{said}");
}

/// A PostgreSQL copy whose ledger predates chains (key `(sender_id, seq)`) is
/// migrated in place on connect: the chain joins the key, the rows stay.
#[tokio::test]
async fn a_postgres_ledger_from_before_chains_is_migrated_in_place() {
    let p = Pipe::new(SMALL, "").await;
    let mut viz = p.server.connect("viz").await;
    exec(
        &mut viz,
        "CREATE SCHEMA ferry_receiver;
         CREATE TABLE ferry_receiver.applied (sender_id text NOT NULL, seq bigint NOT NULL,
           kind text NOT NULL, base_seq bigint NOT NULL, created_at timestamptz NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now(), file text NOT NULL,
           rows bigint NOT NULL, schema_fingerprint text NOT NULL,
           PRIMARY KEY (sender_id, seq));
         INSERT INTO ferry_receiver.applied (sender_id, seq, kind, base_seq, created_at, file,
           rows, schema_fingerprint)
         VALUES ('old', 7, 'complete', 7, now(), 'old-000000000007-complete.tar.zst', 3, 'x');",
    )
    .await;
    let out = p.receive(&["versions"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("old\t-\t#7\tcomplete"),
        "{}",
        text(&out.stdout)
    );
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = 'ferry_receiver.applied'::regclass AND i.indisprimary
         ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .fetch_all(&mut viz)
    .await
    .unwrap();
    assert_eq!(key, ["sender_id", "chain", "seq"]);
    let c = p.send("complete");
    p.deliver(&c);
    assert!(p.receive(&["load"]).status.success());
}

/// `ferry-sender complete --table`: a broken table on the copy is replaced by
/// itself, without resending the rest; the other tables keep what they have
/// (plus the changes the bundle carries anyway), and the chain goes on.
#[tokio::test]
async fn a_complete_of_one_table_replaces_exactly_that_table() {
    let p = Pipe::new(SMALL, "").await;
    let mut src = p.server.connect("app").await;
    let mut viz = p.server.connect("viz").await;
    exec(&mut src, "INSERT INTO parent (id, name) VALUES (5, 'p5')").await;
    p.deliver(&p.send("complete"));
    p.load_ok();
    // The copy's child table breaks. Parent 5, which no child references,
    // is edited on the copy: the table complete must not touch it (parents
    // 1 and 2 travel with the children that reference them).
    exec(
        &mut viz,
        "DELETE FROM child WHERE id = 10; UPDATE child SET v = 'corrupt' WHERE id = 20;
         INSERT INTO child (id, parent_id, v) VALUES (99, 1, 'stray');
         UPDATE parent SET name = 'local edit' WHERE id = 5",
    )
    .await;
    exec(
        &mut src,
        "UPDATE parent SET name = 'p2b', updated_at = now() WHERE id = 2",
    )
    .await;

    let bad = run(
        &binary("ferry-sender"),
        &p.path("sender.toml"),
        &["complete", "--table", "public.nope"],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("\"public.nope\" matches no selected table"),
        "{}",
        text(&bad.stderr)
    );

    let out = run(
        &binary("ferry-sender"),
        &p.path("sender.toml"),
        &["complete", "--table", "public.child"],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        said.contains("a complete of public.child") && said.contains("partial #2"),
        "{said}"
    );
    let bundle = outbox_files(&p.path("sstate/outbox")).pop().unwrap();
    assert!(bundle.contains("-000000000002-partial"), "{bundle}");
    p.deliver(&bundle);
    p.load_ok();
    p.assert_same(&["child"]).await;
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM parent ORDER BY id")
        .fetch_all(&mut viz)
        .await
        .unwrap();
    assert_eq!(
        names,
        ["p1", "p2b", "local edit"],
        "parent: only the changed and referenced rows applied"
    );

    // The chain goes on.
    exec(
        &mut src,
        "INSERT INTO child (id, parent_id, v) VALUES (40, 2, 'd')",
    )
    .await;
    p.deliver(&p.send("partial"));
    p.load_ok();
    p.assert_same(&["child"]).await;

    // An emptied table is replaced by nothing.
    exec(&mut src, "DELETE FROM child").await;
    exec(
        &mut viz,
        "INSERT INTO child (id, parent_id, v) VALUES (98, 1, 'stray')",
    )
    .await;
    let out = run(
        &binary("ferry-sender"),
        &p.path("sender.toml"),
        &["complete", "--table", "public.ch*"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    p.deliver(&outbox_files(&p.path("sstate/outbox")).pop().unwrap());
    p.load_ok();
    p.assert_same(&["child"]).await;
}
