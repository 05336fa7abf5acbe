//! The agents as daemons and the manual resync, with the real binaries on the
//! embedded default (SQLite): `ferry-sender run` takes partials on an interval,
//! refuses a second instance, skips ticks while a job is busy and abandons a hung
//! job cleanly on SIGTERM; `ferry-sender resync` re-bases the chain and the
//! receiver drops the held partials it supersedes.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::daemon::Daemon;
use ferry_tests::lite::{Lite, run, sqlite, text};
use ferry_tests::{binary, outbox_files};
use std::process::Command;
use std::time::{Duration, Instant};

fn sender_daemon(l: &Lite) -> Daemon {
    let mut cmd = Command::new(binary("ferry-sender"));
    cmd.arg("--config")
        .arg(l.p("sender.toml"))
        .arg("run")
        .env("RUST_LOG", "info");
    Daemon::spawn(cmd)
}

/// Waits until the outbox holds a finished bundle whose name contains `what`
/// (not a temporary `.`-name still being written: it is renamed away).
fn wait_outbox(l: &Lite, what: &str, daemon: &Daemon) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(f) = outbox_files(&l.p("sstate/outbox"))
            .into_iter()
            .find(|f| f.contains(what) && !f.starts_with('.'))
        {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} bundle appeared; the daemon logged:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn the_sender_daemon_takes_partials_on_its_interval_and_stops_on_sigterm() {
    let l = Lite::with("", "interval = \"1s\"\n[complete]\nschedule = \"off\"\n").await;
    let mut d = sender_daemon(&l);
    d.wait_for("sender running", Duration::from_secs(20));
    // No complete yet: the daemon takes one at once.
    let complete = wait_outbox(&l, "complete", &d);

    let second = run("ferry-sender", &l.p("sender.toml"), &["run"]);
    assert_eq!(second.status.code(), Some(75), "{}", text(&second.stderr));
    assert!(
        text(&second.stderr).contains("another ferry process"),
        "{}",
        text(&second.stderr)
    );

    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql(
        "INSERT INTO report VALUES (3, 2, 'new', NULL, 2.5, '2024-06-01 00:00:00');
         DELETE FROM report WHERE id = 2;",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let partial = wait_outbox(&l, "partial", &d);

    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}:\n{}", d.log());
    assert!(d.log().contains("sender stopped"), "{}", d.log());

    l.deliver(&complete);
    l.deliver(&partial);
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    l.assert_same().await;
}

#[tokio::test]
async fn a_busy_job_skips_ticks_and_sigterm_abandons_it_without_losing_the_bundle() {
    // An "SFTP server" that accepts connections and never answers: the push hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    ferry_tests::sshd::keygen(&key, "ed25519");
    std::fs::write(dir.path().join("known_hosts"), "").unwrap();
    let push = format!(
        "interval = \"1s\"\n[complete]\nschedule = \"off\"\n[push]\nhost = \"127.0.0.1\"\nport = {port}\n\
         user = \"ferry\"\nkey_file = {key:?}\nknown_hosts = {:?}\nconnect_timeout = \"5m\"\nattempts = 1\n",
        dir.path().join("known_hosts")
    );
    let l = Lite::with("", &push).await;
    let mut d = sender_daemon(&l);
    d.wait_for("sender running", Duration::from_secs(20));
    let complete = wait_outbox(&l, "complete", &d);
    // The complete's push hangs; the partial ticks find the job busy.
    d.wait_for(
        "partial tick skipped: the previous job is still running",
        Duration::from_secs(20),
    );

    let stopped = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}:\n{}", d.log());
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "took {:?}",
        stopped.elapsed()
    );
    assert!(
        d.log().contains("abandoned the job in flight"),
        "{}",
        d.log()
    );
    // Nothing lost, nothing half-done: the bundle is still queued, no temporaries.
    assert_eq!(outbox_files(&l.p("sstate/outbox")), vec![complete]);
    let temps: Vec<_> = std::fs::read_dir(l.p("sstate/outbox"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    let status = run("ferry-sender", &l.p("sender.toml"), &["status"]);
    assert!(
        status.status.code().is_some_and(|c| c <= 1),
        "{}",
        text(&status.stderr)
    );
}

#[tokio::test]
async fn resync_rebases_the_chain_and_the_receiver_drops_what_it_supersedes() {
    let l = Lite::new("").await;
    let c1 = l.send("complete");
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("UPDATE report SET msg = 'one', updated_at = '2024-06-01 00:00:01' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    let p2 = l.send("partial");
    sqlx::raw_sql("UPDATE report SET msg = 'two', updated_at = '2024-06-01 00:00:02' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    let p3 = l.send("partial");
    // #2 is lost on the way: #3 is held behind the gap.
    l.deliver(&c1);
    l.deliver(&p3);
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("held"), "{}", text(&out.stdout));

    // The operator resyncs: a complete now; the queued bundles it supersedes go.
    let out = run("ferry-sender", &l.p("sender.toml"), &["resync"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for f in [&c1, &p2, &p3] {
        assert!(
            stdout.contains(&format!("dropped {f}")),
            "{f} not dropped:\n{stdout}"
        );
    }
    let left = outbox_files(&l.p("sstate/outbox"));
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("000000000004-complete"), "{left:?}");

    l.deliver(&left[0]);
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(&format!("dropped {p3}")),
        "{}",
        text(&out.stdout)
    );
    assert!(
        !l.p("inbox").join(&p3).exists(),
        "the held partial is dropped"
    );
    l.assert_same().await;
    // The chain goes on from the resync.
    sqlx::raw_sql(
        "UPDATE report SET msg = 'three', updated_at = '2024-06-01 00:00:03' WHERE id = 1",
    )
    .execute(&mut app)
    .await
    .unwrap();
    l.deliver(&l.send("partial"));
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    l.assert_same().await;
}

/// Runs an agent's command with `--log-format json` at level info.
fn json_run(bin: &str, l: &Lite, config: &str, command: &str) -> std::process::Output {
    Command::new(binary(bin))
        .arg("--config")
        .arg(l.p(config))
        .args(["--log-format", "json", command])
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

/// Parses every stderr line as one JSON object (panics on a line that is not).
fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    text(stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn json_logs_parse_with_fields_and_a_failed_load_is_one_error_event() {
    let l = Lite::new("").await;
    let c = l.send("complete");
    l.deliver(&c);
    let out = json_run("ferry-receiver", &l, "receiver.toml", "load");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events = json_lines(&out.stderr);
    let table = events
        .iter()
        .find(|e| e["message"] == "table loaded" && e["table"] == "report")
        .unwrap_or_else(|| panic!("no table event: {events:?}"));
    assert_eq!(table["bundle"], c.as_str());
    assert_eq!(table["rows"], 2);
    assert!(table["bytes"].as_u64().unwrap() > 0);
    let bundle = events
        .iter()
        .find(|e| e["message"] == "bundle loaded")
        .unwrap();
    assert_eq!(bundle["seq"], 1);
    assert!(bundle["duration_ms"].is_u64());

    // A corrupted partial: exactly one error event, naming the bundle and the cause.
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("UPDATE report SET msg = 'x', updated_at = '2024-06-01 00:00:01' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    let p = l.send("partial");
    let path = l.p("sstate/outbox").join(&p);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();
    l.deliver(&p);
    let out = json_run("ferry-receiver", &l, "receiver.toml", "load");
    assert_eq!(out.status.code(), Some(1));
    let errors: Vec<_> = json_lines(&out.stderr)
        .into_iter()
        .filter(|e| e["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["bundle"], p.as_str());
    assert!(
        errors[0]["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{errors:?}"
    );
    // The sender logs JSON too.
    let out = json_run("ferry-sender", &l, "sender.toml", "complete");
    assert!(out.status.success());
    let events = json_lines(&out.stderr);
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "table written" && e["table"] == "phone" && e["rows"] == 2),
        "{events:?}"
    );
}

/// Runs a command under a pseudo-terminal (util-linux `script`); returns what
/// the terminal showed.
fn on_a_tty(cmd: &str) -> String {
    let out = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("script (util-linux)");
    assert!(out.status.success(), "{cmd}: {}", text(&out.stdout));
    text(&out.stdout)
}

#[tokio::test]
async fn progress_bars_show_on_a_terminal_only() {
    let l = Lite::new("").await;
    std::fs::write(l.p("media-src/big.bin"), vec![7u8; 4 << 20]).unwrap();
    let sender = format!(
        "{} --config {}",
        binary("ferry-sender").display(),
        l.p("sender.toml").display()
    );
    let shown = on_a_tty(&format!("{sender} complete"));
    assert!(shown.contains("taking a complete"), "{shown}");
    let c = outbox_files(&l.p("sstate/outbox")).pop().unwrap();
    l.deliver(&c);
    let receiver = format!(
        "{} --config {}",
        binary("ferry-receiver").display(),
        l.p("receiver.toml").display()
    );
    let shown = on_a_tty(&format!("{receiver} load"));
    assert!(shown.contains("bundles"), "{shown}");
    assert!(shown.contains(&c), "{shown}");
    // Not on a terminal: no bar, no control sequences.
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(out.status.success());
    for stream in [&out.stdout, &out.stderr] {
        let s = text(stream);
        assert!(!s.contains("bundles ") && !s.contains('\u{1b}'), "{s}");
    }
}

#[tokio::test]
async fn under_systemd_the_receiver_notifies_ready_watchdog_and_stopping() {
    let l = Lite::new("").await;
    let sock_path = l.p("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = Command::new(binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(l.p("receiver.toml"))
        .arg("run")
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000");
    let mut d = ferry_tests::daemon::Daemon::spawn(cmd);
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{e}; got {seen:?}\n{}", d.log()));
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    d.signal("TERM");
    while !seen.contains("STOPPING=1") {
        let n = sock.recv(&mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(d.wait_exit(Duration::from_secs(10)).success());
}
