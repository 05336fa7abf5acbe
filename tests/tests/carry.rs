//! Completes that carry unchanged tables by reference (`[complete]
//! carry_unchanged`), with the real binaries and a real PostgreSQL server:
//! which tables a complete carries, that every way of changing a table makes
//! the next complete dump it (an update, a delete, a delete and an insert that
//! keep the count, a TRUNCATE and reload, writes with triggers off, a
//! transaction still open while the previous complete was taken, a column
//! dropped and added again, an enum label renamed), that the
//! receiver's copy and every restore equal the source after each complete,
//! and what happens when the carried-from file is missing or pruned.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_common::manifest::{Kind, Manifest};
use ferry_tests::fixtures::{ZOO, ZOO_ROWS};
use ferry_tests::pg::{PgServer, exec};
use ferry_tests::{binary, bundle_contents, name_in};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};

/// Ten equal tables of 2,000 rows, beside the type zoo.
fn tables_sql() -> String {
    let mut sql = String::new();
    for i in 0..10 {
        sql.push_str(&format!(
            "CREATE TABLE t{i} (id int PRIMARY KEY, v text NOT NULL,
               updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO t{i} (id, v) SELECT g, md5(g::text || '{i}') FROM generate_series(1, 2000) g;\n"
        ));
    }
    sql
}

type Content = BTreeMap<String, Vec<String>>;

struct Site {
    server: PgServer,
    dir: tempfile::TempDir,
    /// The last sender job's log.
    log: std::sync::Mutex<String>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Site {
    async fn new() -> Self {
        let server = PgServer::start();
        server
            .create_db("app", &format!("{ZOO}{ZOO_ROWS}{}", tables_sql()))
            .await;
        server.create_db("viz", "").await;
        let s = Self {
            server,
            dir: tempfile::tempdir().unwrap(),
            log: Default::default(),
        };
        std::fs::create_dir_all(s.path("inbox")).unwrap();
        // Far more than this test's completes (the limit is tested at the end).
        s.sender_config("carry_unchanged = 100");
        std::fs::write(
            s.path("receiver.toml"),
            format!(
                "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n[retention]\n\
                 keep_completes = 1\ncomplete = \"0s\"\npartial = \"0s\"\n",
                s.path("rstate"),
                s.path("inbox"),
                s.server.url("viz"),
            ),
        )
        .unwrap();
        s
    }

    fn sender_config(&self, complete: &str) {
        std::fs::write(
            self.path("sender.toml"),
            format!(
                "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\n\
                 change_column = \"updated_at\"\n[complete]\n{complete}\n",
                self.path("sstate"),
                self.server.url("app"),
            ),
        )
        .unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn outbox(&self) -> PathBuf {
        self.path("sstate/outbox")
    }

    fn run(&self, bin: &str, config: &str, args: &[&str]) -> Output {
        Command::new(binary(bin))
            .arg("--config")
            .arg(self.path(config))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// A sender job (`complete` or `resync`): the complete's seq, manifest
    /// and file size. The statistics are reset first, so that their change
    /// counters (a hint that dumps a table without testing it) say nothing
    /// and every carry is decided by the test itself.
    async fn complete(&self, command: &str) -> (u64, Manifest, u64) {
        // A backend that just ended flushes its counters after its client
        // left: reset until nothing more arrives.
        let mut conn = self.server.connect("app").await;
        for _ in 0..100 {
            exec(&mut conn, "SELECT pg_stat_reset()").await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let moved: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint
                 FROM pg_stat_user_tables",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap();
            if moved == 0 {
                break;
            }
        }
        drop(conn);
        let out = Command::new(binary("ferry-sender"))
            .arg("--config")
            .arg(self.path("sender.toml"))
            .args([command, "--no-push"])
            .env("RUST_LOG", "warn,ferry_sender::extract=info")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sender {command}: {}",
            text(&out.stderr)
        );
        *self.log.lock().unwrap() = text(&out.stderr);
        let seq = ferry_tests::outbox_files(&self.outbox())
            .into_iter()
            .filter_map(|n| ferry_common::manifest::parse_bundle_file_name(&n))
            .map(|b| b.seq.0)
            .max()
            .unwrap();
        let path = self
            .outbox()
            .join(name_in(&self.outbox(), "app", seq, Kind::Complete));
        let m = bundle_contents(&path).0;
        (seq, m, std::fs::metadata(&path).unwrap().len())
    }

    /// Delivers the outbox to the inbox and loads it.
    fn deliver_and_load(&self) {
        for f in ferry_tests::outbox_files(&self.outbox()) {
            let to = self.path("inbox").join(&f);
            if !to.exists() {
                std::fs::copy(self.outbox().join(&f), to).unwrap();
            }
        }
        let out = self.run("ferry-receiver", "receiver.toml", &["load"]);
        assert!(
            out.status.success(),
            "load: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    async fn content(&self, db: &str) -> Content {
        ferry_tests::pg::public_content(&mut self.server.connect(db).await).await
    }

    /// `ferry-receiver restore --into INTO --from FROM [--at SEQ]`.
    fn restore(&self, into: &str, from: &std::path::Path, at: Option<u64>) -> Output {
        let at = at.map(|s| s.to_string());
        let mut args = vec!["restore", "--into", into, "--from", from.to_str().unwrap()];
        if let Some(at) = &at {
            args.extend(["--at", at.as_str()]);
        }
        self.run("ferry-receiver", "receiver.toml", &args)
    }

    async fn app(&self, sql: &str) {
        exec(&mut self.server.connect("app").await, sql).await;
    }
}

/// The tables a complete carries, and from which seqs.
fn carried(m: &Manifest) -> BTreeMap<String, u64> {
    m.carried()
        .filter_map(|(x, c)| x.table.as_ref().map(|t| (t.name.clone(), c.seq.0)))
        .collect()
}

fn all_tables(m: &Manifest) -> BTreeSet<String> {
    m.tables.iter().map(|t| t.name.name.clone()).collect()
}

#[tokio::test]
async fn unchanged_tables_are_carried_and_every_change_is_dumped() {
    let site = Site::new().await;
    let (first, m1, full_bytes) = site.complete("complete").await;
    assert!(
        carried(&m1).is_empty(),
        "the first complete dumps everything"
    );
    assert_eq!(m1.format, ferry_common::manifest::FORMAT);
    site.deliver_and_load();
    let mut recorded = vec![(first, site.content("app").await)];

    // One table of eleven changes: the rest are carried from #first, and the
    // complete is a fraction of the full one.
    site.app("UPDATE t3 SET v = 'changed', updated_at = now() WHERE id = 7;")
        .await;
    let (second, m2, bytes) = site.complete("complete").await;
    let c = carried(&m2);
    let expect: BTreeSet<String> = all_tables(&m2).into_iter().filter(|t| t != "t3").collect();
    assert_eq!(c.keys().cloned().collect::<BTreeSet<_>>(), expect);
    assert!(c.values().all(|s| *s == first), "{c:?}");
    assert_eq!(m2.format, ferry_common::manifest::CARRYING_FORMAT);
    assert!(
        bytes * 5 <= full_bytes,
        "a complete of 1 changed table in 11 is {bytes} bytes, the full one {full_bytes}"
    );
    site.deliver_and_load();
    recorded.push((second, site.content("app").await));
    assert_eq!(site.content("viz").await, recorded.last().unwrap().1);

    // Every kind of change is caught; each step changes one table, so the
    // next complete dumps that one (and t3 again only if it changed).
    let steps: &[(&str, &str)] = &[
        ("t5", "DELETE FROM t5 WHERE id = 11;"),
        (
            "t6",
            "SET session_replication_role = replica;
             UPDATE t6 SET v = 'no triggers' WHERE id = 1;
             RESET session_replication_role;",
        ),
        (
            "t8",
            "DELETE FROM t8 WHERE id = 5; INSERT INTO t8 (id, v) VALUES (5000, 'same count');",
        ),
        (
            "t9",
            "CREATE TABLE keep AS SELECT * FROM t9; TRUNCATE t9;
             INSERT INTO t9 SELECT * FROM keep; DROP TABLE keep;",
        ),
        ("zoo", "UPDATE zoo SET t = 'zoo changed' WHERE id = 1;"),
        // Data that changes without a row written: a last column dropped and
        // added again the same, and an enum label renamed.
        (
            "t2",
            "ALTER TABLE t2 DROP COLUMN updated_at;
             ALTER TABLE t2 ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();",
        ),
        ("zoo", "ALTER TYPE mood RENAME VALUE 'sad' TO 'blue';"),
    ];
    for (table, sql) in steps {
        site.app(sql).await;
        let (seq, m, _) = site.complete("complete").await;
        let c = carried(&m);
        assert!(
            !c.contains_key(*table),
            "#{seq} carried {table} after `{sql}`"
        );
        // The test itself found the change (the statistics were reset).
        let log = site.log.lock().unwrap().clone();
        assert!(
            log.contains(&format!(
                "table changed since that complete: dumped table=public.{table} "
            )),
            "{log}"
        );
        assert!(
            c.contains_key("t0"),
            "#{seq} dumped the unchanged t0: {c:?}"
        );
        site.deliver_and_load();
        recorded.push((seq, site.content("app").await));
        assert_eq!(
            site.content("viz").await,
            recorded.last().unwrap().1,
            "after #{seq}"
        );
    }

    // A transaction still open while a complete is taken: its rows are not
    // in that complete, and the next one must not carry the table.
    let mut open = site.server.connect("app").await;
    exec(
        &mut open,
        "BEGIN; INSERT INTO t7 (id, v) VALUES (9001, 'late');",
    )
    .await;
    let (during, m, _) = site.complete("complete").await;
    assert!(
        carried(&m).contains_key("t7"),
        "t7 had not changed as #{during} saw it"
    );
    site.deliver_and_load();
    recorded.push((during, site.content("app").await));
    exec(&mut open, "COMMIT;").await;
    drop(open);
    let (after, m, _) = site.complete("complete").await;
    assert!(
        !carried(&m).contains_key("t7"),
        "#{after} carried t7 past a late commit"
    );
    assert!(
        site.log
            .lock()
            .unwrap()
            .contains("table changed since that complete: dumped table=public.t7 "),
        "the late commit was found by the test itself"
    );
    site.deliver_and_load();
    recorded.push((after, site.content("app").await));
    assert_eq!(site.content("viz").await, recorded.last().unwrap().1);
    assert!(
        site.content("viz").await["t7"]
            .iter()
            .any(|r| r.contains("late")),
        "the late row reached the copy"
    );

    // Every complete restores exactly, following its references, from the
    // sender's directory and from the receiver's history.
    let from = site.outbox();
    for (seq, want) in &recorded {
        let db = format!("r{seq}");
        site.server.create_db(&db, "").await;
        let out = site.restore(&site.server.url(&db), &from, Some(*seq));
        assert!(
            out.status.success(),
            "restore #{seq}: {}",
            text(&out.stderr)
        );
        assert_eq!(&site.content(&db).await, want, "restore at #{seq}");
    }

    // The newest, carrying, complete as a SQLite development database: the
    // staged loader gets the carried tables too (every table, every row).
    let dev = site.path("dev.sqlite3");
    let (last, want) = recorded.last().unwrap();
    let out = site.restore(&format!("sqlite://{}", dev.display()), &from, Some(*last));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lite = ferry_tests::lite::sqlite(&dev).await;
    for (table, rows) in want {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\"",
            table.trim_matches('"')
        )))
        .fetch_one(&mut lite)
        .await
        .unwrap_or_else(|e| panic!("{table} in the SQLite file: {e}"));
        assert_eq!(n as usize, rows.len(), "{table} in the SQLite file");
    }
    let v: String = sqlx::query_scalar("SELECT v FROM t3 WHERE id = 7")
        .fetch_one(&mut lite)
        .await
        .unwrap();
    assert_eq!(v, "changed");

    // Retention keeps the newest complete only, and the completes it carries
    // from: pruning removes the rest, never those.
    let newest = site.complete("complete").await;
    let carried_from: BTreeSet<u64> = carried(&newest.1).values().copied().collect();
    assert!(carried_from.contains(&first), "{carried_from:?}");
    site.deliver_and_load();
    let out = site.run("ferry-receiver", "receiver.toml", &["prune"]);
    assert!(out.status.success(), "prune: {}", text(&out.stderr));
    let kept: BTreeSet<u64> = std::fs::read_dir(site.path("inbox"))
        .unwrap()
        .filter_map(|e| {
            ferry_common::manifest::parse_bundle_file_name(
                &e.unwrap().file_name().to_string_lossy(),
            )
        })
        .map(|b| b.seq.0)
        .collect();
    let mut want = carried_from.clone();
    want.insert(newest.0);
    assert_eq!(
        kept, want,
        "kept: the newest complete and those it carries from"
    );
    assert!(want.len() < newest.0 as usize, "nothing to prune: {want:?}");
    // `versions` (from the ledger) calls the newest complete restorable while
    // the completes it carries from are there, and not once one is gone.
    let restorable = |seq: u64| -> bool {
        let out = site.run("ferry-receiver", "receiver.toml", &["versions", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["seq"] == seq)
            .map(|p| p["restorable"] == true)
            .unwrap()
    };
    assert!(restorable(newest.0));
    let gone = name_in(&site.path("inbox"), "app", first, Kind::Complete);
    std::fs::rename(site.path("inbox").join(&gone), site.path(&gone)).unwrap();
    assert!(!restorable(newest.0), "#{} without #{first}", newest.0);
    std::fs::rename(site.path(&gone), site.path("inbox").join(&gone)).unwrap();
    let db = "rnewest";
    site.server.create_db(db, "").await;
    let out = site.run(
        "ferry-receiver",
        "receiver.toml",
        &["restore", "--into", &site.server.url(db)],
    );
    assert!(
        out.status.success(),
        "restore after prune: {}",
        text(&out.stderr)
    );
    assert_eq!(site.content(db).await, site.content("app").await);

    // The carried-from file missing: a restore from a directory without it
    // refuses, naming it, and writes nothing; a receiver given the carrying
    // complete alone applies nothing and says what to copy.
    let lone = site.path("lone");
    std::fs::create_dir_all(&lone).unwrap();
    let newest_name = name_in(&site.outbox(), "app", newest.0, Kind::Complete);
    std::fs::copy(site.outbox().join(&newest_name), lone.join(&newest_name)).unwrap();
    let first_name = name_in(&site.outbox(), "app", first, Kind::Complete);
    site.server.create_db("rlone", "").await;
    let out = site.restore(&site.server.url("rlone"), &lone, None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&first_name),
        "{}",
        text(&out.stderr)
    );
    assert!(
        site.content("rlone").await.is_empty(),
        "a refused restore wrote tables"
    );
    site.server.create_db("fresh", "").await;
    std::fs::write(
        site.path("fresh.toml"),
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n",
            site.path("fstate"),
            lone,
            site.server.url("fresh")
        ),
    )
    .unwrap();
    let out = site.run("ferry-receiver", "fresh.toml", &["load"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&first_name) && said.contains("resync"),
        "{said}"
    );
    assert!(site.content("fresh").await.is_empty(), "{said}");
    assert!(
        lone.join(&newest_name).exists(),
        "the complete was quarantined: {said}"
    );
    // Copying the files in is the fix.
    for seq in &carried_from {
        let name = name_in(&site.outbox(), "app", *seq, Kind::Complete);
        std::fs::copy(site.outbox().join(&name), lone.join(&name)).unwrap();
    }
    let out = site.run("ferry-receiver", "fresh.toml", &["load"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(site.content("fresh").await, site.content("app").await);

    // A resync is always full; so is every complete with carrying off, and a
    // table is dumped again after `carry_unchanged` completes.
    let (_, m, _) = site.complete("resync").await;
    assert!(carried(&m).is_empty(), "a resync carried {:?}", carried(&m));
    site.sender_config("carry_unchanged = 2");
    let (a, m, _) = site.complete("complete").await;
    assert!(carried(&m).contains_key("t0"));
    let (_, m, _) = site.complete("complete").await;
    assert!(carried(&m).contains_key("t0"));
    let (_, m, _) = site.complete("complete").await;
    assert!(
        carried(&m).is_empty(),
        "carried past 2 completes after #{}: {:?}",
        a - 1,
        carried(&m)
    );
    site.sender_config("carry_unchanged = 0");
    let (_, m, _) = site.complete("complete").await;
    assert!(carried(&m).is_empty());
    assert_eq!(m.format, ferry_common::manifest::FORMAT);
}

/// A complete in volumes: each carried member points at the volume that
/// holds it, and the receiver and a restore read it from there.
#[tokio::test]
async fn members_carried_from_volumes() {
    let site = Site::new().await;
    site.sender_config("carry_unchanged = 100\n[bundle]\nvolume_bytes = 1");
    let (first, m1, _) = site.complete("complete").await;
    assert!(m1.volume.is_some(), "the first complete is not in volumes");
    site.deliver_and_load();
    site.app("UPDATE t3 SET v = 'changed', updated_at = now() WHERE id = 7;")
        .await;
    let (second, m2, _) = site.complete("complete").await;
    let files: BTreeSet<String> = m2.carried().map(|(_, c)| c.file.clone()).collect();
    assert!(
        !files.is_empty() && !carried(&m2).contains_key("t3"),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .all(|f| f.contains(&format!("{first:012}-complete.")))
            && files.iter().any(|f| f.contains(".v0")),
        "carried from the volumes (and the final file) of #{first}: {files:?}"
    );
    site.deliver_and_load();
    let want = site.content("app").await;
    assert_eq!(site.content("viz").await, want);
    site.server.create_db("r", "").await;
    let out = site.restore(&site.server.url("r"), &site.outbox(), Some(second));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(site.content("r").await, want);
}

/// The sender's `sent/` directory, pushed over SFTP to the receiver's
/// embedded endpoint: it keeps the newest complete and the completes it
/// carries from (a restore from `sent/` alone works), and drops them once a
/// full complete needs none.
#[tokio::test]
async fn sent_keeps_the_completes_the_newest_carries_from() {
    use ferry_tests::daemon::Daemon;
    use ferry_tests::sshd::keygen;
    let site = Site::new().await;
    let keys = site.path("keys");
    std::fs::create_dir_all(&keys).unwrap();
    keygen(&keys.join("host_key"), "ed25519");
    keygen(&keys.join("client_key"), "ed25519");
    std::fs::copy(keys.join("client_key.pub"), keys.join("authorized_keys")).unwrap();
    let port = ferry_tests::pg::free_port();
    std::fs::write(
        keys.join("known_hosts"),
        format!(
            "[127.0.0.1]:{port} {}",
            std::fs::read_to_string(keys.join("host_key.pub")).unwrap()
        ),
    )
    .unwrap();
    let mut receiver = std::fs::read_to_string(site.path("receiver.toml")).unwrap();
    receiver.push_str(&format!(
        "[daemon]\nrescan_interval = \"1h\"\n[sftp_server]\nlisten = \"127.0.0.1:{port}\"\n\
         host_key = {:?}\nauthorized_keys = {:?}\n",
        keys.join("host_key"),
        keys.join("authorized_keys")
    ));
    std::fs::write(site.path("receiver.toml"), receiver).unwrap();
    site.sender_config(&format!(
        "carry_unchanged = 100\n[push]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"ferry\"\n\
         key_file = {:?}\nknown_hosts = {:?}\nremote_dir = \"/\"\nattempts = 1\n",
        keys.join("client_key"),
        keys.join("known_hosts")
    ));
    let mut cmd = Command::new(binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(site.path("receiver.toml"))
        .arg("run")
        .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn(cmd);
    daemon.wait_for(
        "SFTP endpoint listening",
        std::time::Duration::from_secs(20),
    );
    let sent = site.path("sstate/sent");
    let seqs_in = |dir: &std::path::Path| -> BTreeSet<u64> {
        ferry_tests::outbox_files(dir)
            .iter()
            .filter_map(|n| ferry_common::manifest::parse_bundle_file_name(n))
            .map(|b| b.seq.0)
            .collect()
    };
    let push = |args: &[&str]| {
        let out = site.run("ferry-sender", "sender.toml", args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    };
    push(&["complete"]);
    site.app("UPDATE t3 SET v = 'changed', updated_at = now() WHERE id = 7;")
        .await;
    push(&["complete"]);
    site.app("UPDATE t4 SET v = 'changed', updated_at = now() WHERE id = 7;")
        .await;
    push(&["complete"]);
    // #3 carries t3 from #2 and the rest from #1: all three stay.
    assert_eq!(seqs_in(&sent), BTreeSet::from([1, 2, 3]));
    let want = site.content("app").await;
    site.server.create_db("from_sent", "").await;
    let out = site.restore(&site.server.url("from_sent"), &sent, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(site.content("from_sent").await, want);
    // A resync needs nothing earlier: the rest goes.
    push(&["resync"]);
    assert_eq!(seqs_in(&sent), BTreeSet::from([4]));
}
