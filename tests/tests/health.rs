//! Health as a monitoring system reads it, with the real binaries: `status`
//! exits 0 ok, 1 warning, 2 critical (3 unknown) on both agents; the
//! receiver's lag is a number; a held chain, quarantined bundles, a stale
//! copy, an unreachable target and a refused login each move the verdict; an
//! error that will not fix itself is logged at ERROR, not WARN.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::daemon::Daemon;
use ferry_tests::lite::{Lite, run, text};
use ferry_tests::pg::{PgServer, exec, free_port};
use ferry_tests::{binary, outbox_files};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn status(bin: &str, config: &Path) -> (i32, String) {
    let o = run(bin, config, &["status"]);
    (code(&o), format!("{}{}", text(&o.stdout), text(&o.stderr)))
}

/// Moves a file's modification time an hour back.
fn age_file(path: &Path) {
    let ok = Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A PostgreSQL app and a PostgreSQL copy on one throwaway server, with the
/// sender's outbox delivered to the inbox by hand.
struct Pair {
    dir: tempfile::TempDir,
    pg: PgServer,
}

impl Pair {
    async fn new() -> Self {
        let p = Self {
            dir: tempfile::tempdir().unwrap(),
            pg: PgServer::start(),
        };
        p.pg.create_db(
            "app",
            "CREATE TABLE report (id int PRIMARY KEY, msg text, updated_at timestamptz NOT NULL);
             CREATE INDEX ON report (updated_at);
             INSERT INTO report VALUES (1, 'a', '2024-01-01'), (2, 'b', '2024-01-01');",
        )
        .await;
        p.pg.create_db("viz", "").await;
        std::fs::create_dir_all(p.p("inbox")).unwrap();
        std::fs::write(
            p.p("sender.toml"),
            format!(
                "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\n\
                 change_column = \"updated_at\"\noverlap = \"0s\"\n",
                p.p("sstate"),
                p.pg.url("app"),
            ),
        )
        .unwrap();
        p.receiver(&p.pg.url("viz"), "");
        p
    }

    fn p(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    fn receiver(&self, url: &str, health: &str) {
        std::fs::write(
            self.p("receiver.toml"),
            format!(
                "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {url:?}\n[health]\n{health}\n",
                self.p("rstate"),
                self.p("inbox"),
            ),
        )
        .unwrap();
    }

    /// Changes a row on the source, takes a bundle, returns its file name.
    async fn change_and_send(&self, kind: &str, id: i64) -> String {
        let mut app = self.pg.connect("app").await;
        exec(
            &mut app,
            &format!("UPDATE report SET msg = msg || '+', updated_at = now() WHERE id = {id}"),
        )
        .await;
        let out = run("ferry-sender", &self.p("sender.toml"), &[kind]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        outbox_files(&self.p("sstate/outbox")).pop().unwrap()
    }

    fn deliver(&self, file: &str) {
        let tmp = self.p("inbox").join(format!(".{file}.part"));
        std::fs::copy(self.p("sstate/outbox").join(file), &tmp).unwrap();
        std::fs::rename(&tmp, self.p("inbox").join(file)).unwrap();
    }

    fn load(&self) -> Output {
        run("ferry-receiver", &self.p("receiver.toml"), &["load"])
    }
}

#[tokio::test]
async fn the_receivers_status_exits_with_its_health() {
    let l = Pair::new().await;
    let pg = &l.pg;
    let rx = l.p("receiver.toml");

    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 1, "nothing applied yet is a warning:\n{out}");
    assert!(
        out.contains("nothing applied yet") && out.contains("health: WARNING"),
        "{out}"
    );

    let complete = l.change_and_send("complete", 1).await;
    l.deliver(&complete);
    let load = l.load();
    assert!(load.status.success(), "{}", text(&load.stderr));
    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("lag: ") && out.contains("health: OK"), "{out}");
    let json = run("ferry-receiver", &rx, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(s["lag_seconds"].as_i64().is_some(), "lag is a number: {s}");
    assert_eq!(s["health"]["level"], "ok", "{s}");

    // A held chain: #3 arrives without #2. Young, a warning; old, critical.
    let two = l.change_and_send("partial", 1).await;
    let three = l.change_and_send("partial", 2).await;
    l.deliver(&three);
    assert_eq!(code(&l.load()), 1);
    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 1, "{out}");
    assert!(out.contains(&three) && out.contains("held for"), "{out}");
    age_file(&l.p("inbox").join(&three));
    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 2, "held for an hour is critical:\n{out}");
    assert!(
        out.contains("CRITICAL") && out.contains("health.held_critical"),
        "{out}"
    );
    l.deliver(&two);
    assert!(l.load().status.success());
    assert_eq!(status("ferry-receiver", &rx).0, 0);

    // A quarantined bundle is a warning until it is dealt with.
    let four = l.change_and_send("partial", 1).await;
    let bytes = std::fs::read(l.p("sstate/outbox").join(&four)).unwrap();
    std::fs::write(l.p("inbox").join(&four), &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(code(&l.load()), 1);
    let (c, out) = status("ferry-receiver", &rx);
    assert!(c >= 1 && out.contains("quarantined bundle"), "{out}");
    let _ = std::fs::remove_dir_all(l.p("rstate/quarantine"));
    l.deliver(&four);
    assert!(l.load().status.success());

    // A stale copy: the limits come from the config.
    l.receiver(
        &pg.url("viz"),
        "lag_warning = \"1s\"\nlag_critical = \"1h\"",
    );
    std::thread::sleep(Duration::from_millis(1100));
    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("health.lag_warning"), "{out}");
    l.receiver(&pg.url("viz"), "");

    // The target down: critical, and what the state directory knows.
    let five = l.change_and_send("partial", 2).await;
    l.deliver(&five);
    pg.stop();
    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 2, "{out}");
    assert!(
        out.contains("cannot be asked") && out.contains(&format!("#{}", 4)) && out.contains(&five),
        "the last applied bundle and the pending one, from the state directory:\n{out}"
    );

    // A refused login will not fix itself: ERROR in the daemon's log,
    // critical at once in `status`, exit 1 (not 75) from `load`.
    pg.restart();
    let refused = pg.url("viz").replace("postgres@", "nobody_here@");
    l.receiver(&refused, "");
    let load = l.load();
    assert_eq!(code(&load), 1, "{}", text(&load.stderr));
    let mut cmd = Command::new(binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(&rx)
        .arg("run")
        .env("RUST_LOG", "info");
    let mut d = Daemon::spawn(cmd);
    d.wait_for("target database unavailable", Duration::from_secs(20));
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("target database unavailable"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("ERROR") && line.contains("nobody_here"),
        "{line}"
    );
    d.signal("TERM");
    d.wait_exit(Duration::from_secs(10));
    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 2, "{out}");
    assert!(
        out.contains("last load error") && out.contains("nobody_here"),
        "{out}"
    );

    l.receiver(&pg.url("viz"), "");
    assert!(l.load().status.success());
    let (c, out) = status("ferry-receiver", &rx);
    assert_eq!(c, 0, "{out}");

    // An unreadable configuration: unknown.
    std::fs::write(&rx, "state_dir = 1\n").unwrap();
    assert_eq!(status("ferry-receiver", &rx).0, 3);
}

#[tokio::test]
async fn the_senders_status_exits_with_its_health() {
    let l = Lite::new("").await;
    let tx = l.p("sender.toml");
    let base = std::fs::read_to_string(&tx).unwrap();
    let (c, out) = status("ferry-sender", &tx);
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("no complete yet"), "{out}");
    l.send("complete");
    let (c, out) = status("ferry-sender", &tx);
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("health: OK"), "{out}");

    // A push that fails (nothing listens): a warning, critical once the
    // oldest queued bundle is older than the limit.
    let key = l.p("id_ed25519");
    ferry_tests::sshd::keygen(&key, "ed25519");
    std::fs::write(l.p("known_hosts"), "").unwrap();
    let push = format!(
        "[push]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"nobody\"\nkey_file = {:?}\nknown_hosts = {:?}\nattempts = 1\n",
        free_port(),
        key,
        l.p("known_hosts")
    );
    std::fs::write(&tx, format!("{base}{push}")).unwrap();
    assert_eq!(code(&run("ferry-sender", &tx, &["push"])), 75);
    let (c, out) = status("ferry-sender", &tx);
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("push failed 1 time(s) in a row"), "{out}");
    for f in outbox_files(&l.p("sstate/outbox")) {
        age_file(&l.p("sstate/outbox").join(f));
    }
    std::fs::write(
        &tx,
        format!("{base}[health]\npush_critical = \"30m\"\n{push}"),
    )
    .unwrap();
    let (c, out) = status("ferry-sender", &tx);
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("oldest bundle waiting to be pushed"), "{out}");

    // A source that refuses the login: exit 1 (not 75), critical at once.
    let pg = PgServer::start();
    let refused = format!("{}/app", pg.url("app").rsplit_once('/').unwrap().0)
        .replace("postgres@", "nobody_here@");
    let pg_base = base.replace(
        &format!("url = \"sqlite://{}\"", l.p("app.sqlite3").display()),
        &format!("url = {refused:?}"),
    );
    assert_ne!(pg_base, base);
    std::fs::write(&tx, &pg_base).unwrap();
    let out = run("ferry-sender", &tx, &["partial"]);
    assert_eq!(code(&out), 1, "{}", text(&out.stderr));
    let (c, out) = status("ferry-sender", &tx);
    assert_eq!(c, 2, "{out}");
    assert!(
        out.contains("last partial error") && out.contains("nobody_here"),
        "{out}"
    );

    // Back to the working source: the partial succeeds and health is ok again.
    std::fs::write(&tx, &base).unwrap();
    l.send("partial");
    let (c, out) = status("ferry-sender", &tx);
    assert_eq!(c, 0, "{out}");
    std::fs::write(&tx, "sender_id = 1\n").unwrap();
    assert_eq!(status("ferry-sender", &tx).0, 3);
}

fn run_info(bin: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(binary(bin))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

/// The operator's log and `check`: an include that selects nothing is named;
/// no PostgreSQL notices, source positions or statement dumps; a push that
/// finds another one running is no error; a file in the inbox that is not a
/// bundle is named.
#[tokio::test]
async fn messages_an_operator_can_act_on() {
    let l = Pair::new().await;
    let tx = l.p("sender.toml");
    let base = std::fs::read_to_string(&tx).unwrap();
    let with_include = base.replace(
        "[partial]",
        "include = [\"public.report\", \"public.invoices\"]\n[partial]",
    );
    std::fs::write(&tx, &with_include).unwrap();
    let check = run("ferry-sender", &tx, &["check"]);
    let said = text(&check.stdout);
    assert!(check.status.success(), "a warning only:\n{said}");
    assert!(
        said.lines().any(|l| l.starts_with("warn")
            && l.contains("\"public.invoices\"")
            && l.contains("selects no table")),
        "{said}"
    );
    let complete = run_info("ferry-sender", &tx, &["complete"]);
    let log = text(&complete.stderr);
    assert!(complete.status.success(), "{log}");
    assert_eq!(
        log.matches("\"public.invoices\", which selects no table")
            .count(),
        1,
        "{log}"
    );
    let partial = run_info("ferry-sender", &tx, &["partial"]);
    let log = format!("{log}{}", text(&partial.stderr));
    for noise in [
        "already exists, skipping",
        "slow statement",
        "sqlx::postgres::notice",
    ] {
        assert!(!log.contains(noise), "{noise:?} in the log:\n{log}");
    }

    // A source position is PostgreSQL's business, not the operator's.
    let refused = with_include.replace("postgres@", "nobody_here@");
    std::fs::write(&tx, &refused).unwrap();
    let out = run("ferry-sender", &tx, &["partial"]);
    let err = text(&out.stderr);
    assert!(err.contains("role \"nobody_here\" does not exist"), "{err}");
    assert!(!err.contains(" at line "), "{err}");
    std::fs::write(&tx, &with_include).unwrap();

    // A manual push beside one that runs (the daemon's): no error.
    let key = l.p("id_ed25519");
    ferry_tests::sshd::keygen(&key, "ed25519");
    std::fs::write(l.p("known_hosts"), "").unwrap();
    std::fs::write(
        &tx,
        format!(
            "{with_include}[push]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"nobody\"\nkey_file = {:?}\nknown_hosts = {:?}\n",
            free_port(),
            key,
            l.p("known_hosts")
        ),
    )
    .unwrap();
    let mut holder = Command::new("flock")
        .arg(l.p("sstate/push.lock"))
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::process::Command::new("flock")
        .args(["-n"])
        .arg(l.p("sstate/push.lock"))
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "flock never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let push = run_info("ferry-sender", &tx, &["push"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code(&push), 0, "{}", text(&push.stderr));
    assert!(text(&push.stdout).contains("another push is running"));
    assert!(
        !text(&push.stderr).contains("ERROR"),
        "{}",
        text(&push.stderr)
    );

    // Files that are not bundles by name are named, once per pass.
    for f in ["backup.tar.gz", "app-00000000001-complete.tar.zst"] {
        std::fs::write(l.p("inbox").join(f), b"x").unwrap();
    }
    let load = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    let log = text(&load.stderr);
    for f in ["backup.tar.gz", "app-00000000001-complete.tar.zst"] {
        assert_eq!(log.matches(f).count(), 1, "{log}");
    }
    assert!(log.contains("not a bundle name"), "{log}");
}
