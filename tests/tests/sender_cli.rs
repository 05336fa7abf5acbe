//! The real `ferry-sender` binary: exit codes and messages for bad input, and
//! kill -9 in the middle of a complete.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_common::manifest::DataFormat;
use ferry_tests::pg::{PgServer, exec, free_port, table_rows};
use ferry_tests::{binary, bundle_contents, copy_first_column, outbox_files, write_config};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn sender(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(binary("ferry-sender"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ferry-sender")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_bad_config_key_is_named_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "sender_id = \"a\"\nstate_dir = \"/tmp/x\"\n[source]\nurl = \"sqlite:///x\"\n[partial]\nchange_colum = \"updated_at\"\n",
    );
    let out = sender(&cfg, &["complete"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("unknown field `change_colum`") && e.contains("change_column"),
        "{e}"
    );
    assert!(e.contains("sender.toml"), "the message names the file: {e}");

    let missing = sender(&dir.path().join("nope.toml"), &["check"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("nope.toml"));
    // `status` speaks the monitoring-plugin convention: unknown.
    let missing = sender(&dir.path().join("nope.toml"), &["status"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(stderr(&missing).contains("nope.toml"));
}

#[test]
fn the_example_config_parses_and_is_printed() {
    let out = Command::new(binary("ferry-sender"))
        .arg("example-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    ferry_sender::Config::parse(&text, std::path::Path::new("example")).expect("example parses");
}

#[test]
fn an_unreachable_database_is_a_clear_transient_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(
        dir.path(),
        &format!(
            "sender_id = \"a\"\nstate_dir = {:?}\n[source]\nurl = \"postgres://ferry:secret@127.0.0.1:{port}/app\"\n[partial]\nchange_column = \"updated_at\"\n",
            dir.path().join("state")
        ),
    );
    let out = sender(&cfg, &["complete"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("could not connect to the source database"),
        "{e}"
    );
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!e.contains("secret"), "the password leaked: {e}");
    let check = sender(&cfg, &["check"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains("ERROR could not connect"));
}

#[tokio::test]
async fn check_names_missing_change_columns_and_unindexed_ones() {
    let server = PgServer::start();
    server
        .create_db(
            "app",
            "CREATE TABLE a (id int PRIMARY KEY, updated_at timestamptz);
             CREATE TABLE b (id int PRIMARY KEY, modified timestamptz);",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "sender_id = \"a\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\nchange_column = \"updated_at\"\n\
             [partial.tables.\"public.b\"]\nchange_column = \"updated\"\n",
            dir.path().join("state"),
            server.url("app")
        ),
    );
    let out = sender(&cfg, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ERROR table public.b has no column \"updated\""),
        "{text}"
    );
    assert!(
        text.contains("modified"),
        "the message lists the columns: {text}"
    );
    // Starting a job fails the same way.
    let job = sender(&cfg, &["partial"]);
    assert_eq!(job.status.code(), Some(1));
    assert!(
        stderr(&job).contains("public.b has no column"),
        "{}",
        stderr(&job)
    );

    // Fixed: b uses its own column; a's column has no index, which is a warning.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "change_column = \"updated\"",
            "change_column = \"modified\"",
        ),
    )
    .unwrap();
    let out = sender(&cfg, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("warn  public.a: change column \"updated_at\" has no index"),
        "{text}"
    );
    assert!(
        text.contains("CREATE INDEX ON \"public\".\"a\" (\"updated_at\")"),
        "{text}"
    );
}

#[tokio::test]
async fn kill_9_during_a_complete_leaves_no_bundle_and_loses_nothing() {
    let server = PgServer::start();
    let mut src = server
        .create_db(
            "app",
            "CREATE TABLE big (id bigint PRIMARY KEY, payload text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO big (id, payload) SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 400000) g;
             CREATE TABLE small (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO small (id) VALUES (1);",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = write_config(
        dir.path(),
        &format!(
            "sender_id = \"app\"\nstate_dir = {state:?}\n[source]\nurl = {:?}\n[partial]\nchange_column = \"updated_at\"\n\
             [bundle]\nvolume_bytes = 1048576\n",
            server.url("app")
        ),
    );
    let mut child = Command::new(binary("ferry-sender"))
        .arg("--config")
        .arg(&cfg)
        .arg("complete")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    // Wait until the job has sealed its first volume, then kill it.
    let staging = state.join("staging");
    let outbox = state.join("outbox");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if outbox_files(&outbox)
            .iter()
            .any(|f| f.ends_with(".v0001.tar.zst"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the complete never started writing"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the complete finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let chain = ferry_tests::chain_in(&outbox);
    let last = format!("app-{chain}-000000000001-complete.tar.zst");
    let first_volume = format!("app-{chain}-000000000001-complete.v0001.tar.zst");
    let left = outbox_files(&outbox);
    assert!(
        !left.contains(&last),
        "a final bundle after kill -9: {left:?}"
    );
    let old_volume = std::fs::read(outbox.join(&first_volume)).unwrap();

    // The next run starts clean (the killed run's volumes removed), takes seq 1
    // again with a new set, and ships every row.
    let out = sender(&cfg, &["complete"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("removing a volume of a complete an interrupted run did not finish"),
        "{}",
        stderr(&out)
    );
    let files = outbox_files(&outbox);
    assert!(files.contains(&last), "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.starts_with(&format!("app-{chain}-000000000001-complete."))),
        "{files:?}"
    );
    assert_ne!(
        std::fs::read(outbox.join(&first_volume)).unwrap(),
        old_volume,
        "the first volume is the new run's"
    );
    assert!(
        std::fs::read_dir(&staging).unwrap().next().is_none(),
        "staging not cleaned"
    );
    let (m, members) = bundle_contents(&outbox.join(&last));
    // A large table is split into parts; together they hold every row once.
    let parts: Vec<_> = m
        .members
        .iter()
        .filter(|x| x.table.as_ref().is_some_and(|t| t.name == "big"))
        .collect();
    assert!(parts.len() > 1, "expected several parts: {parts:?}");
    assert_eq!(parts[0].path, "data/public.big.copy");
    assert_eq!(parts[1].path, "data/public.big.copy.000002");
    assert_eq!(parts.iter().map(|p| p.rows.unwrap()).sum::<u64>(), 400000);
    // Each part is a whole binary COPY stream (the default) of whole rows.
    let mut ids: Vec<i64> = Vec::new();
    for p in &parts {
        assert_eq!(p.format, Some(DataFormat::PgCopyBinary));
        let part = copy_first_column(p, &members[&p.path]);
        assert_eq!(part.len() as u64, p.rows.unwrap(), "{}: rows", p.path);
        ids.extend(part);
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 400000, "every row exactly once");

    // The same in text COPY, when configured.
    let toml = std::fs::read_to_string(&cfg).unwrap() + "[complete]\ncopy_format = \"text\"\n";
    std::fs::write(&cfg, toml).unwrap();
    let out = sender(&cfg, &["complete"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (m, members) =
        bundle_contents(&outbox.join(format!("app-{chain}-000000000002-complete.tar.zst")));
    let mut ids: Vec<i64> = Vec::new();
    let mut n = 0;
    for p in m
        .members
        .iter()
        .filter(|x| x.table.as_ref().is_some_and(|t| t.name == "big"))
    {
        assert_eq!(p.format, Some(DataFormat::PgCopyText));
        let part = copy_first_column(p, &members[&p.path]);
        assert_eq!(part.len() as u64, p.rows.unwrap(), "{}: rows", p.path);
        ids.extend(part);
        n += 1;
    }
    assert!(n > 1, "expected several text parts");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 400000, "every row exactly once, in text");
    assert_eq!(table_rows(&mut src, "small").await.len(), 1);
    exec(&mut src, "SELECT 1").await;
}

/// A key the sender's user cannot read is explained by owner and mode, never
/// with advice to regenerate it (which would break the receiver's authorized
/// key). Runs `check` as `nobody` against a root-owned 0600 key: root only.
#[test]
fn an_unreadable_key_names_its_owner_not_a_new_key() {
    if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
    {
        eprintln!("skipped: needs root to run the sender as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = dir.path().join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::write(dir.path().join("known_hosts"), "").unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "sender_id = \"x\"\nstate_dir = {state:?}\n[source]\nurl = \"sqlite:///nonexistent/app.sqlite3\"\n\
             [push]\nhost = \"127.0.0.1\"\nuser = \"ferry\"\nkey_file = {key:?}\nknown_hosts = {:?}\n",
            dir.path().join("known_hosts")
        ),
    );
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(binary("ferry-sender"))
        .arg("--config")
        .arg(&cfg)
        .arg("check")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("cannot be read by this user (nobody)")
            && said.contains("owned by root with mode 0600")
            && said.contains("chown nobody")
            && !said.contains("ssh-keygen"),
        "{said}{}",
        stderr(&out)
    );
}
