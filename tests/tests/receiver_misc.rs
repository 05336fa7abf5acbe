//! ferry-receiver on the embedded default (SQLite): a SQLite source end to end
//! through both binaries, hand-made malicious bundles (escaping paths, links)
//! refused with nothing applied, and the daemon (picks bundles up from file
//! events, refuses a second instance, stops cleanly on SIGTERM).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::daemon::Daemon;
use ferry_tests::lite::{Lite, run, sqlite, text};
use ferry_tests::{binary, outbox_files};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test]
async fn sqlite_to_sqlite_end_to_end() {
    let l = Lite::new("").await;
    std::fs::write(l.p("media-src/r1.jpg"), b"jpeg").unwrap();
    l.deliver(&l.send("complete"));
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    l.assert_same().await;
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql(
        "INSERT INTO report VALUES (3, 2, 'new', X'CAFE', 2.5, '2024-06-01 00:00:00');
         UPDATE report SET msg = 'edited', updated_at = '2024-06-01 00:00:01' WHERE id = 1;
         DELETE FROM report WHERE id = 2;",
    )
    .execute(&mut app)
    .await
    .unwrap();
    std::fs::write(l.p("media-src/r3.jpg"), b"jpeg3").unwrap();
    l.deliver(&l.send("partial"));
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    l.assert_same().await;
    assert_eq!(std::fs::read(l.p("media-dst/r3.jpg")).unwrap(), b"jpeg3");
}

/// (what, members the manifest lists, raw tar entries: name, type, data)
type Case<'a> = (
    &'a str,
    Vec<(&'a str, &'a [u8])>,
    Vec<(&'a [u8], tar::EntryType, &'a [u8])>,
);

/// Writes a bundle by hand: a manifest listing `listed`, then raw tar entries.
fn evil_bundle(
    inbox: &Path,
    listed: &[(&str, &[u8])],
    entries: &[(&[u8], tar::EntryType, &[u8])],
) -> PathBuf {
    use sha2::Digest;
    let members: Vec<serde_json::Value> = listed
        .iter()
        .map(|(p, d)| {
            serde_json::json!({"path": p, "role": "media", "size": d.len(),
                "sha256": hex::encode(sha2::Sha256::digest(d)), "media_set": "images", "mtime_ns": 0})
        })
        .collect();
    bundle_from(inbox, &manifest_json(1, &members), entries)
}

/// The manifest of complete #1 of sender `app` (SQLite, no tables) in `format`.
fn manifest_json(format: u32, members: &[serde_json::Value]) -> serde_json::Value {
    serde_json::json!({
        "format": format, "sender_id": "app", "kind": "complete", "seq": 1, "base_seq": 1,
        "prev_seq": null, "created_at": "2026-01-01T00:00:00Z",
        "source": {"engine": "sqlite", "version": "3"}, "schema_fingerprint": "",
        "tables": [], "watermarks": {}, "members": members,
    })
}

/// Writes `manifest` and the raw tar `entries` as complete #1 of sender `app`.
fn bundle_from(
    inbox: &Path,
    manifest: &serde_json::Value,
    entries: &[(&[u8], tar::EntryType, &[u8])],
) -> PathBuf {
    let mut tar = tar::Builder::new(Vec::new());
    let json = serde_json::to_vec(manifest).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("manifest.json").unwrap();
    h.set_size(json.len() as u64);
    h.set_cksum();
    tar.append(&h, &json[..]).unwrap();
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        if *kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_cksum();
        tar.append(&h, *data).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let path = inbox.join("app-000000000001-complete.tar.zst");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&zstd::encode_all(&raw[..], 1).unwrap())
        .unwrap();
    path
}

#[tokio::test]
async fn escaping_paths_and_links_are_refused_with_nothing_applied() {
    let cases: [Case; 4] = [
        (
            "listed ..",
            vec![("../escape", b"x")],
            vec![(b"../escape", tar::EntryType::Regular, b"x")],
        ),
        (
            "entry ..",
            vec![("media/images/a", b"x")],
            vec![(
                b"media/images/../../../escape",
                tar::EntryType::Regular,
                b"x",
            )],
        ),
        (
            "absolute",
            vec![("media/images/a", b"x")],
            vec![(b"/tmp/ferry-escape", tar::EntryType::Regular, b"x")],
        ),
        (
            "symlink",
            vec![("media/images/a", b"")],
            vec![(b"media/images/a", tar::EntryType::Symlink, b"")],
        ),
    ];
    for (what, listed, entries) in cases {
        let l = Lite::new("").await;
        let bundle = evil_bundle(&l.p("inbox"), &listed, &entries);
        let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("unsafe member path") || stdout.contains("only regular files"),
            "{what}: {stdout}"
        );
        assert!(!bundle.exists(), "{what}: the bundle must leave the inbox");
        assert!(
            l.p("rstate/quarantine/app-000000000001-complete.tar.zst")
                .exists(),
            "{what}"
        );
        assert!(!l.p("escape").exists() && !l.dir.path().parent().unwrap().join("escape").exists());
        assert!(!Path::new("/tmp/ferry-escape").exists(), "{what}");
        assert!(!l.p("media-dst").exists(), "{what}: nothing may be written");
    }
}

/// A bundle of a newer format than this receiver, whose member carries no
/// checksum, whose manifest lacks its own checksum (format 3), or whose data
/// member names a table the manifest does not list (a bit flip turned
/// `"public"` into `"p}blic"`): refused with a message that names the fix,
/// quarantined, nothing applied. The format-1 bundles above (SHA-256 members)
/// are read as before.
#[tokio::test]
async fn newer_formats_damaged_manifests_and_unlisted_tables_are_refused() {
    use ferry_common::checksum::{Algorithm, of};
    let data: &[u8] =
        b"{\"op\":\"upsert\",\"row\":{\"id\":9,\"model\":\"x\",\"updated_at\":\"t\"}}\n";
    let sum = of(Algorithm::Blake3, data).hex().to_owned();
    let member = serde_json::json!({"path": "media/images/a", "role": "media", "size": data.len(),
        "blake3": sum, "media_set": "images", "mtime_ns": 0});
    let mut bare = member.clone();
    bare.as_object_mut().unwrap().remove("blake3");
    let flipped = serde_json::json!({"path": "data/phone.jsonl", "role": "data",
        "size": data.len(), "blake3": sum, "table": {"schema": "p}blic", "name": "phone"},
        "rows": 1, "format": "json-lines"});
    let mut partial = manifest_json(2, &[flipped]);
    partial["tables"] = serde_json::json!([{"name": {"schema": "public", "name": "phone"},
        "columns": [], "primary_key": ["id"], "foreign_keys": []}]);
    let cases = [
        (
            "format 6",
            manifest_json(6, std::slice::from_ref(&member)),
            "media/images/a",
            "upgrade ferry",
        ),
        (
            "no checksum",
            manifest_json(2, &[bare]),
            "media/images/a",
            "no checksum",
        ),
        (
            "format 3 without manifest.json.blake3",
            manifest_json(3, &[member]),
            "media/images/a",
            "cannot be trusted",
        ),
        (
            "unlisted table",
            partial,
            "data/phone.jsonl",
            "does not name",
        ),
    ];
    for (what, m, entry, says) in cases {
        let l = Lite::new("").await;
        let entries: [(&[u8], tar::EntryType, &[u8]); 1] =
            [(entry.as_bytes(), tar::EntryType::Regular, data)];
        let bundle = bundle_from(&l.p("inbox"), &m, &entries);
        let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains(says), "{what}: {stdout}");
        assert!(!bundle.exists(), "{what}: the bundle must leave the inbox");
        assert!(
            l.p("rstate/quarantine/app-000000000001-complete.tar.zst")
                .exists(),
            "{what}"
        );
        assert!(!l.p("media-dst").exists(), "{what}: nothing may be written");
    }
}

/// A sender whose state was restored from a backup issues seq 2 again with
/// other rows (same chain): the
/// receiver, whose ledger holds the first #2, refuses the second one (and
/// quarantines it with the reason) instead of skipping it as a re-delivery.
#[tokio::test]
async fn a_reused_seq_with_other_content_is_refused_not_skipped() {
    let l = Lite::new("").await;
    let load = || run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    l.deliver(&l.send("complete"));
    let backup = std::process::Command::new("cp")
        .arg("-a")
        .arg(l.p("sstate"))
        .arg(l.p("sstate-backup"))
        .status()
        .unwrap();
    assert!(backup.success());
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql(
        "UPDATE phone SET model = 'first', updated_at = '2024-06-01 00:00:00' WHERE id = 1",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let first = l.send("partial");
    l.deliver(&first);
    assert!(load().status.success());
    // Re-delivering the same #2 is quiet.
    l.deliver(&first);
    let out = load();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The sender's state is restored from a backup taken before #2 (same
    // chain): a #2 with other rows.
    std::fs::rename(l.p("sstate"), l.p("sstate-lost")).unwrap();
    std::fs::rename(l.p("sstate-backup"), l.p("sstate")).unwrap();
    sqlx::raw_sql(
        "UPDATE phone SET model = 'second', updated_at = '2024-06-02 00:00:00' WHERE id = 2",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let second = l.send("partial");
    assert_eq!(first, second, "the same name, other content");
    l.deliver(&second);
    let out = load();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("issued seq 2 twice"), "{stdout}");
    assert!(l.p("rstate/quarantine").join(&second).exists());
    assert!(!l.p("inbox").join(&second).exists());
}

#[tokio::test]
async fn the_daemon_loads_on_file_events_and_stops_on_sigterm() {
    // A rescan interval of an hour: only the file event can trigger the load.
    let l = Lite::new("[daemon]\nrescan_interval = \"1h\"\n").await;
    let mut cmd = Command::new(binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(l.p("receiver.toml"))
        .arg("run")
        .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn(cmd);
    // It logs this once it holds the lock and watches the inbox.
    daemon.wait_for("receiver running", Duration::from_secs(20));
    let second = run("ferry-receiver", &l.p("receiver.toml"), &["run"]);
    assert_eq!(
        second.status.code(),
        Some(75),
        "a second daemon must be refused"
    );
    assert!(text(&second.stderr).contains("another ferry process"));
    // Day-2 commands run between the daemon's passes.
    for cmd in ["load", "prune"] {
        let out = run("ferry-receiver", &l.p("receiver.toml"), &[cmd]);
        assert!(
            out.status.success(),
            "{cmd} beside the daemon: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).contains("between its passes"));
    }
    // The first pass ran at start (interval ticks immediately); now deliver.
    std::thread::sleep(Duration::from_millis(200));
    l.deliver(&l.send("complete"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if l.p("viz.sqlite3").exists() {
            let mut viz = sqlite(&l.p("viz.sqlite3")).await;
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ferry_applied")
                .fetch_one(&mut viz)
                .await
                .unwrap_or(0);
            if n == 1 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not load the delivered bundle"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    l.assert_same().await;
    // A quarantined bundle put back with `retry` is applied by the daemon.
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql(
        "UPDATE phone SET model = 'retried', updated_at = '2024-06-02 00:00:00' WHERE id = 1",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let partial = l.send("partial");
    std::fs::create_dir_all(l.p("rstate/quarantine")).unwrap();
    std::fs::copy(
        l.p("sstate/outbox").join(&partial),
        l.p("rstate/quarantine").join(&partial),
    )
    .unwrap();
    std::fs::write(
        l.p("rstate/quarantine")
            .join(format!("{partial}.error.txt")),
        "test",
    )
    .unwrap();
    let out = run(
        "ferry-receiver",
        &l.p("receiver.toml"),
        &["retry", &partial],
    );
    assert!(
        text(&out.stdout).contains("the running daemon applies it now"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while sqlx::query_scalar::<_, String>("SELECT model FROM phone WHERE id = 1")
        .fetch_one(&mut sqlite(&l.p("viz.sqlite3")).await)
        .await
        .unwrap()
        != "retried"
    {
        assert!(
            Instant::now() < deadline,
            "the daemon did not apply the retried bundle:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// Unmounts a test file system when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A bundle that would leave its file system with less than the margin is not
/// staged: the load waits (exit 75) with an error naming the directory and the
/// numbers, nothing is applied or quarantined, and it loads once there is room.
/// (A 16 MiB tmpfs as the receiver's state directory, a 20 MiB media file.)
#[tokio::test]
async fn a_bundle_that_does_not_fit_waits_for_free_space() {
    let l = Lite::with("", "[bundle]\nvolume_bytes = 0\n").await;
    let rstate = l.p("rstate");
    std::fs::create_dir_all(&rstate).unwrap();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "ferry-test"])
        .arg(&rstate)
        .status()
        .unwrap();
    assert!(
        mount.success(),
        "mounting a tmpfs needs root (CI runs the tests as root)"
    );
    let _mounted = Mounted(rstate.clone());
    let noise = ferry_tests::Rng(0x9e37_79b9).bytes(20 << 20);
    std::fs::write(l.p("media-src/big.bin"), &noise).unwrap();
    l.deliver(&l.send("complete"));
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    let said = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{said}");
    assert!(said.contains("not enough free space"), "{said}");
    assert!(said.contains(&rstate.display().to_string()), "{said}");
    assert!(!l.p("media-dst/big.bin").exists());
    assert!(
        !rstate.join("quarantine").exists()
            || std::fs::read_dir(rstate.join("quarantine"))
                .unwrap()
                .next()
                .is_none()
    );
    // Room made: it loads.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=200m"])
        .arg(&rstate)
        .status()
        .unwrap();
    assert!(grown.success());
    // The operator's own margin counts instead of the default: 95% of 200 MB
    // leaves no room for the 20 MB bundle; a byte count that fits lets it in.
    let config = std::fs::read_to_string(l.p("receiver.toml")).unwrap();
    std::fs::write(
        l.p("receiver.toml"),
        format!("{config}[limits]\nkeep_free = \"95%\"\n"),
    )
    .unwrap();
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    let said = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{said}");
    assert!(said.contains("keep_free = \"95%\""), "{said}");
    assert!(!l.p("media-dst/big.bin").exists());
    std::fs::write(
        l.p("receiver.toml"),
        format!("{config}[limits]\nkeep_free = {}\n", 100 << 20),
    )
    .unwrap();
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    l.assert_same().await;
    assert_eq!(std::fs::read(l.p("media-dst/big.bin")).unwrap(), noise);
}

/// `versions` lists every applied bundle as a restore point, says which are
/// restorable from what the inbox keeps, and names the oldest and newest; a
/// point whose complete is gone is no longer restorable.
#[tokio::test]
async fn versions_lists_the_restore_points_the_history_keeps() {
    let l = Lite::new("").await;
    l.deliver(&l.send("complete"));
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    for (i, t) in ["2024-06-01 00:00:00", "2024-06-02 00:00:00"]
        .iter()
        .enumerate()
    {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "UPDATE phone SET model = 'v{i}', updated_at = '{t}' WHERE id = 1"
        )))
        .execute(&mut app)
        .await
        .unwrap();
        l.deliver(&l.send("partial"));
    }
    assert!(
        run("ferry-receiver", &l.p("receiver.toml"), &["load"])
            .status
            .success()
    );
    let out = run(
        "ferry-receiver",
        &l.p("receiver.toml"),
        &["versions", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "{v}");
    assert!(points.iter().all(|p| p["restorable"] == true), "{v}");
    assert_eq!(points[0]["kind"], "complete");
    assert!(
        points[0]["tables"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert!(points[0]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["oldest_restorable"]["seq"], 1);
    assert_eq!(v["newest_restorable"]["seq"], 3);
    let plain = text(&run("ferry-receiver", &l.p("receiver.toml"), &["versions"]).stdout);
    assert!(
        plain.contains("newest restorable point: app #3 (partial"),
        "{plain}"
    );
    // The ledger records each bundle's tables; a row from before it did has
    // them read from the bundle.
    let mut viz = sqlite(&l.p("viz.sqlite3")).await;
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT tables FROM ferry_applied WHERE seq = 1")
            .fetch_one(&mut viz)
            .await
            .unwrap();
    assert_eq!(
        recorded.map(|t| serde_json::from_str::<serde_json::Value>(&t).unwrap()),
        Some(points[0]["tables"].clone())
    );
    sqlx::raw_sql("UPDATE ferry_applied SET tables = NULL")
        .execute(&mut viz)
        .await
        .unwrap();
    drop(viz);
    let out = run(
        "ferry-receiver",
        &l.p("receiver.toml"),
        &["versions", "--json"],
    );
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["points"][0]["tables"], points[0]["tables"], "{again}");

    // The complete leaves the inbox: nothing built on it can be rebuilt.
    let complete = points[0]["file"].as_str().unwrap();
    std::fs::remove_file(l.p("inbox").join(complete)).unwrap();
    let out = run(
        "ferry-receiver",
        &l.p("receiver.toml"),
        &["versions", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["restorable"] == false),
        "{v}"
    );
    assert!(v["newest_restorable"].is_null(), "{v}");
}

/// A SQLite copy whose ledger predates chains (key `(sender_id, seq)`, no
/// `chain` column) is migrated in place when the receiver connects: its rows
/// keep their place (the empty chain) and the copy goes on from them.
#[tokio::test]
async fn a_ledger_from_before_chains_is_migrated_in_place() {
    let l = Lite::new("").await;
    let mut viz = sqlite(&l.p("viz.sqlite3")).await;
    sqlx::raw_sql(
        "CREATE TABLE ferry_applied (sender_id TEXT NOT NULL, seq INTEGER NOT NULL,
           kind TEXT NOT NULL, base_seq INTEGER NOT NULL, created_at TEXT NOT NULL,
           applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
           file TEXT NOT NULL, rows INTEGER NOT NULL, schema_fingerprint TEXT NOT NULL,
           PRIMARY KEY (sender_id, seq));
         INSERT INTO ferry_applied (sender_id, seq, kind, base_seq, created_at, file, rows,
           schema_fingerprint) VALUES ('old', 7, 'complete', 7, '2026-01-01T00:00:00Z',
           'old-000000000007-complete.tar.zst', 3, 'x');",
    )
    .execute(&mut viz)
    .await
    .unwrap();
    drop(viz);
    let out = run(
        "ferry-receiver",
        &l.p("receiver.toml"),
        &["versions", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["points"][0]["seq"], 7, "{v}");
    let mut viz = sqlite(&l.p("viz.sqlite3")).await;
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_table_info('ferry_applied') WHERE pk > 0 ORDER BY pk",
    )
    .fetch_all(&mut viz)
    .await
    .unwrap();
    assert_eq!(key, ["sender_id", "chain", "seq"]);
    // And the copy goes on.
    l.deliver(&l.send("complete"));
    assert!(
        run("ferry-receiver", &l.p("receiver.toml"), &["load"])
            .status
            .success()
    );
}

/// `ferry-sender complete --table` on the embedded default: the broken table
/// is replaced by itself (a row deleted on the source meanwhile included).
#[tokio::test]
async fn a_sqlite_complete_of_one_table_replaces_it() {
    let l = Lite::new("").await;
    l.deliver(&l.send("complete"));
    assert!(
        run("ferry-receiver", &l.p("receiver.toml"), &["load"])
            .status
            .success()
    );
    let mut viz = sqlite(&l.p("viz.sqlite3")).await;
    sqlx::raw_sql(
        "DELETE FROM report WHERE id = 1;
         INSERT INTO report VALUES (9, 1, 'stray', NULL, 0, '2024-01-01 00:00:00');",
    )
    .execute(&mut viz)
    .await
    .unwrap();
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("DELETE FROM report WHERE id = 2")
        .execute(&mut app)
        .await
        .unwrap();
    let out = run(
        "ferry-sender",
        &l.p("sender.toml"),
        &["complete", "--table", "report"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("a complete of report"),
        "{}",
        text(&out.stdout)
    );
    l.deliver(&outbox_files(&l.p("sstate/outbox")).pop().unwrap());
    let load = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(load.status.success(), "{}", text(&load.stderr));
    l.assert_same().await;
}
