//! Object storage with a real S3 server (s3s-fs, SigV4, on loopback; the test
//! command installs it): one sender delivers into a bucket, three receivers
//! replicate from it independently (one started late catches up); the server
//! down during a push spools and keeps the order; wrong credentials and a
//! missing bucket are named with the fix; a corrupted object is quarantined
//! with nothing applied.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::daemon::Daemon;
use ferry_tests::lite::{Lite, run, sqlite, text};
use ferry_tests::loader::sqlite_rows;
use ferry_tests::outbox_files;
use ferry_tests::pg::free_port;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const KEY: &str = "ferrytestaccess";
const SECRET: &str = "ferrytestsecret0123456789";

/// s3s-fs serving `root` (buckets are its directories) on a loopback port.
struct S3 {
    root: tempfile::TempDir,
    port: u16,
    daemon: Option<Daemon>,
}

fn s3s_fs() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".cargo/bin/s3s-fs");
    assert!(
        p.exists(),
        "s3s-fs is missing: tests/needs.sh installs it (cargo install s3s-fs@0.14.1 --features binary --locked)"
    );
    p
}

impl S3 {
    fn start() -> Self {
        let mut s = Self {
            root: tempfile::tempdir().unwrap(),
            port: free_port(),
            daemon: None,
        };
        std::fs::create_dir(s.root.path().join("ferry")).unwrap();
        s.up();
        s
    }

    fn up(&mut self) {
        let mut cmd = Command::new(s3s_fs());
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(self.root.path());
        self.daemon = Some(Daemon::spawn(cmd));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&mut self) {
        self.daemon = None; // killed on drop
    }

    /// The `[bucket]` section for `url`, with credentials from a file.
    fn section(&self, dir: &Path, url: &str, secret: &str) -> String {
        let creds = dir.join(format!("credentials-{}", secret.len()));
        std::fs::write(
            &creds,
            format!("[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {secret}\n"),
        )
        .unwrap();
        format!(
            "[bucket]\nurl = {url:?}\nendpoint = \"http://127.0.0.1:{}\"\ncredentials_file = {creds:?}\npoll_interval = \"1s\"\n",
            self.port
        )
    }
}

/// Adds `text` at the end of the configuration file `path`.
fn append(path: &Path, text: &str) {
    let base = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, format!("{base}{text}")).unwrap();
}

/// A receiver of its own (state, inbox, SQLite copy) reading the bucket.
fn receiver(l: &Lite, s3: &S3, n: u32) -> PathBuf {
    let dir = l.p(&format!("rx{n}"));
    std::fs::create_dir_all(dir.join("inbox")).unwrap();
    let cfg = dir.join("receiver.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = \"sqlite://{}/copy.sqlite3\"\n[media]\nimages = {:?}\n{}",
            dir.join("state"),
            dir.join("inbox"),
            dir.display(),
            dir.join("media"),
            s3.section(&dir, "s3://ferry/app", SECRET)
        ),
    )
    .unwrap();
    cfg
}

async fn same(l: &Lite, rx: &Path) {
    let mut a = sqlite(&l.p("app.sqlite3")).await;
    let mut b = sqlite(&rx.parent().unwrap().join("copy.sqlite3")).await;
    for t in ["phone", "report"] {
        assert_eq!(
            sqlite_rows(&mut a, t).await,
            sqlite_rows(&mut b, t).await,
            "{t} differs"
        );
    }
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[tokio::test]
async fn one_sender_three_receivers_through_a_bucket() {
    let mut s3 = S3::start();
    let l = Lite::new("").await;
    let tx = l.p("sender.toml");
    let base = std::fs::read_to_string(&tx).unwrap();
    append(&tx, &s3.section(l.dir.path(), "s3://ferry/app", SECRET));
    let (r1, r2, r3) = (
        receiver(&l, &s3, 1),
        receiver(&l, &s3, 2),
        receiver(&l, &s3, 3),
    );

    let out = ok(&run("ferry-sender", &tx, &["complete"]));
    assert!(out.contains("delivered to s3://ferry/app"), "{out}");
    assert!(outbox_files(&l.p("sstate/outbox")).is_empty());
    for r in [&r1, &r2] {
        ok(&run("ferry-receiver", r, &["load"]));
        same(&l, r).await;
    }

    // A change: partial #2; the first two receivers follow.
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("INSERT INTO report VALUES (3, 1, 'via s3', NULL, 1.0, '2024-06-01 00:00:00'); DELETE FROM report WHERE id = 2;")
        .execute(&mut app)
        .await
        .unwrap();
    ok(&run("ferry-sender", &tx, &["partial"]));
    for r in [&r1, &r2] {
        ok(&run("ferry-receiver", r, &["load"]));
        same(&l, r).await;
    }

    // The server down during a push: spooled, then delivered in order.
    s3.down();
    sqlx::raw_sql(
        "UPDATE report SET msg = 'during outage', updated_at = '2024-06-02 00:00:00' WHERE id = 3",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let out = run("ferry-sender", &tx, &["partial"]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unreachable"),
        "{}",
        text(&out.stderr)
    );
    sqlx::raw_sql(
        "UPDATE report SET msg = 'after outage', updated_at = '2024-06-03 00:00:00' WHERE id = 1",
    )
    .execute(&mut app)
    .await
    .unwrap();
    assert_eq!(
        run("ferry-sender", &tx, &["partial", "--no-push"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(outbox_files(&l.p("sstate/outbox")).len(), 2);
    s3.up();
    let out = ok(&run("ferry-sender", &tx, &["push"]));
    assert!(out.contains("push: 2 bundle(s)"), "{out}");
    // The third receiver starts late and catches up from the complete.
    for r in [&r1, &r2, &r3] {
        ok(&run("ferry-receiver", r, &["load"]));
        same(&l, r).await;
    }

    // A corrupted object: quarantined, nothing applied.
    sqlx::raw_sql(
        "UPDATE report SET msg = 'never seen', updated_at = '2024-06-04 00:00:00' WHERE id = 1",
    )
    .execute(&mut app)
    .await
    .unwrap();
    ok(&run("ferry-sender", &tx, &["partial"]));
    let newest = std::fs::read_dir(s3.root.path().join("ferry/app"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("-partial.tar.zst"))
        .max()
        .unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let out = run("ferry-receiver", &r1, &["load"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("FAILED"),
        "{}",
        text(&out.stdout)
    );
    let mut copy = sqlite(&r1.parent().unwrap().join("copy.sqlite3")).await;
    let msg: String = sqlx::query_scalar("SELECT msg FROM report WHERE id = 1")
        .fetch_one(&mut copy)
        .await
        .unwrap();
    assert_eq!(msg, "after outage", "nothing of the damaged bundle applied");

    // Wrong credentials and a missing bucket: named, with the fix.
    std::fs::write(
        &tx,
        format!(
            "{base}{}",
            s3.section(l.dir.path(), "s3://ferry/app", "wrong-secret-0")
        ),
    )
    .unwrap();
    sqlx::raw_sql("UPDATE report SET msg = 'x', updated_at = '2024-06-05 00:00:00' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    let out = run("ferry-sender", &tx, &["partial"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("refused the credentials"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(
        &tx,
        format!(
            "{base}{}",
            s3.section(l.dir.path(), "s3://nope/app", SECRET)
        ),
    )
    .unwrap();
    let out = run("ferry-sender", &tx, &["push"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("bucket does not exist"),
        "{}",
        text(&out.stderr)
    );
    // Nothing was lost: back on the right bucket, the queue goes out.
    std::fs::write(
        &tx,
        format!(
            "{base}{}",
            s3.section(l.dir.path(), "s3://ferry/app", SECRET)
        ),
    )
    .unwrap();
    ok(&run("ferry-sender", &tx, &["push"]));

    // The bucket as the history: point #4 restored into a new SQLite file
    // (only the bundles it needs downloaded) equals the late receiver's copy,
    // which stopped there.
    let restored = l.p("restored.sqlite3");
    let out = run(
        "ferry-receiver",
        &r3,
        &[
            "restore",
            "--from",
            "s3://ferry/app",
            "--at",
            "4",
            "--into",
            &format!("sqlite://{}", restored.display()),
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut a = sqlite(&restored).await;
    let mut b = sqlite(&r3.parent().unwrap().join("copy.sqlite3")).await;
    for t in ["phone", "report"] {
        assert_eq!(
            sqlite_rows(&mut a, t).await,
            sqlite_rows(&mut b, t).await,
            "restored {t}"
        );
    }

    // Sender-side retention: keep the newest complete and what follows it.
    let keep = |extra: &str| {
        std::fs::write(
            &tx,
            format!(
                "{base}{}{extra}",
                s3.section(l.dir.path(), "s3://ferry/app", SECRET)
            ),
        )
        .unwrap();
    };
    keep("");
    let out = run("ferry-sender", &tx, &["prune-bucket"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("keep_completes"),
        "{}",
        text(&out.stderr)
    );
    keep("keep_completes = 1\n");
    let out = ok(&run("ferry-sender", &tx, &["prune-bucket", "--dry-run"]));
    assert!(
        out.contains("0 object(s) would remove"),
        "younger than keep_for: {out}"
    );
    ok(&run("ferry-sender", &tx, &["complete"]));
    keep("keep_completes = 1\nkeep_for = \"0s\"\n");
    let out = ok(&run("ferry-sender", &tx, &["prune-bucket"]));
    assert!(out.contains("6 object(s) removed"), "{out}");
    let left: Vec<String> = std::fs::read_dir(s3.root.path().join("ferry/app"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("-000000000007-complete"), "{left:?}");

    // The daemon polls the bucket.
    let mut cmd = Command::new(ferry_tests::binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(&r2)
        .arg("run")
        .env("RUST_LOG", "info");
    let mut d = Daemon::spawn(cmd);
    d.wait_for("fetched from the bucket", Duration::from_secs(30));
}

/// Peak RSS in KiB of a finished command run under GNU time (`-f %M`).
fn peak_kib(stderr: &str) -> u64 {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("maxrss_kib="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// A complete of about 320 MiB (incompressible) as one object: a multipart
/// upload in 16 MiB parts, downloaded and applied by a receiver; both agents'
/// peak RSS stays within 64 MiB.
#[tokio::test]
async fn a_large_complete_goes_up_in_parts() {
    let s3 = S3::start();
    let l = Lite::new("").await;
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql(
        "CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB, updated_at TEXT NOT NULL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 320)
         INSERT INTO blob SELECT i, randomblob(1048576), '2024-01-01 00:00:00' FROM n;",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let tx = l.p("sender.toml");
    append(
        &tx,
        &format!(
            "[bundle]\nvolume_bytes = 0\n{}",
            s3.section(l.dir.path(), "s3://ferry/big", SECRET)
        ),
    );
    let timed = |bin: &str, cfg: &Path, args: &[&str]| {
        Command::new("/usr/bin/time")
            .args(["-f", "maxrss_kib=%M"])
            .arg(ferry_tests::binary(bin))
            .arg("--config")
            .arg(cfg)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = timed("ferry-sender", &tx, &["complete", "--no-push"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let extract_kib = peak_kib(&text(&out.stderr));
    let out = timed("ferry-sender", &tx, &["push"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sender_kib = peak_kib(&text(&out.stderr));
    let objects: Vec<(String, u64)> = std::fs::read_dir(s3.root.path().join("ferry/big"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert!(objects[0].1 > 300 << 20, "{objects:?}");

    let rx = l.p("rxbig");
    std::fs::create_dir_all(rx.join("inbox")).unwrap();
    let cfg = rx.join("receiver.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = \"sqlite://{}/copy.sqlite3\"\n[media]\nimages = {:?}\n{}",
            rx.join("state"),
            rx.join("inbox"),
            rx.display(),
            rx.join("media"),
            s3.section(&rx, "s3://ferry/big", SECRET)
        ),
    )
    .unwrap();
    let out = timed("ferry-receiver", &cfg, &["load"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let receiver_kib = peak_kib(&text(&out.stderr));
    let mut copy = sqlite(&rx.join("copy.sqlite3")).await;
    let (n, bytes): (i64, i64) = sqlx::query_as("SELECT count(*), sum(length(data)) FROM blob")
        .fetch_one(&mut copy)
        .await
        .unwrap();
    assert_eq!((n, bytes), (320, 320 << 20));
    // The same bundle from a local inbox: what the load itself costs.
    let local = l.p("rxlocal");
    std::fs::create_dir_all(local.join("inbox")).unwrap();
    std::fs::copy(
        s3.root.path().join("ferry/big").join(&objects[0].0),
        local.join("inbox").join(&objects[0].0),
    )
    .unwrap();
    let lcfg = local.join("receiver.toml");
    std::fs::write(
        &lcfg,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = \"sqlite://{}/copy.sqlite3\"\n[media]\nimages = {:?}\n",
            local.join("state"),
            local.join("inbox"),
            local.display(),
            local.join("media"),
        ),
    )
    .unwrap();
    let out = timed("ferry-receiver", &lcfg, &["load"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let local_kib = peak_kib(&text(&out.stderr));
    eprintln!(
        "peak RSS: sender extract {} MiB, push {} MiB; receiver load from the bucket {} MiB, from a local inbox {} MiB",
        extract_kib / 1024,
        sender_kib / 1024,
        receiver_kib / 1024,
        local_kib / 1024
    );
    assert!(
        sender_kib < 64 * 1024,
        "the push's peak RSS {sender_kib} KiB"
    );
    // Fetching adds little to what the load costs by itself.
    assert!(
        receiver_kib < local_kib + 64 * 1024,
        "fetching from the bucket: {receiver_kib} KiB against {local_kib} KiB from a local inbox"
    );
    // Every row's head and length as on the source (the bundle's checksums
    // covered every byte on the way).
    let sample =
        "SELECT id || ':' || length(data) || ':' || hex(substr(data, 1, 32)) FROM blob ORDER BY id";
    let a: Vec<String> = sqlx::query_scalar(sample)
        .fetch_all(&mut app)
        .await
        .unwrap();
    let b: Vec<String> = sqlx::query_scalar(sample)
        .fetch_all(&mut copy)
        .await
        .unwrap();
    assert_eq!(a, b);
}

/// A loopback TCP relay in front of the S3 server that can cut its replies
/// after a budget of bytes: the server itself is real, the network fails.
struct Relay {
    port: u16,
    budget: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Relay {
    fn start(upstream: u16) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicI64, Ordering};
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let budget = Arc::new(AtomicI64::new(i64::MAX));
        let b = Arc::clone(&budget);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    let (c_in, s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    // Both directions spend the one budget; once it is
                    // spent, the connection drops.
                    fn pipe(
                        mut from: std::net::TcpStream,
                        mut to: std::net::TcpStream,
                        b: &AtomicI64,
                    ) {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 << 10];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if b.fetch_sub(n as i64, Ordering::SeqCst) <= n as i64
                                || to.write_all(&buf[..n]).is_err()
                            {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    }
                    let b2 = Arc::clone(&b);
                    std::thread::spawn(move || pipe(c_in, s_out, &b2));
                    pipe(server, client, &b);
                });
            }
        });
        Self { port, budget }
    }

    fn allow(&self, bytes: i64) {
        self.budget
            .store(bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test]
async fn a_download_cut_off_loses_nothing_and_status_check_metrics_cover_the_bucket() {
    let s3 = S3::start();
    let relay = Relay::start(s3.port);
    let l = Lite::new("").await;
    let tx = l.p("sender.toml");
    append(&tx, &s3.section(l.dir.path(), "s3://ferry/app", SECRET));
    // The receiver reaches the server through the relay.
    let rx = receiver(&l, &s3, 1);
    let cfg = std::fs::read_to_string(&rx)
        .unwrap()
        .replace(&format!(":{}\"", s3.port), &format!(":{}\"", relay.port));
    std::fs::write(&rx, &cfg).unwrap();

    // check, on both sides, asks the bucket.
    let out = ok(&run("ferry-sender", &tx, &["check"]));
    assert!(
        out.contains("bucket s3://ferry/app: listing and writing allowed"),
        "{out}"
    );
    let out = ok(&run("ferry-receiver", &rx, &["check"]));
    assert!(out.contains("bucket s3://ferry/app reachable"), "{out}");

    ok(&run("ferry-sender", &tx, &["complete"]));
    let out = ok(&run("ferry-receiver", &rx, &["fetch"]));
    assert!(out.contains("fetched 1 file(s)"), "{out}");
    ok(&run("ferry-receiver", &rx, &["load"]));
    same(&l, &rx).await;
    let out = ok(&run("ferry-receiver", &rx, &["status"]));
    assert!(
        out.contains("bucket: s3://ferry/app, position app-"),
        "{out}"
    );

    // A partial of ~2 MB of incompressible bytes; the download is cut after
    // 256 KiB (every retry too).
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("UPDATE report SET photo = randomblob(2000000), updated_at = '2024-06-01 00:00:00' WHERE id = 2")
        .execute(&mut app)
        .await
        .unwrap();
    ok(&run("ferry-sender", &tx, &["partial"]));
    relay.allow(256 << 10);
    let out = run("ferry-receiver", &rx, &["load"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("downloading s3://ferry/app/app-"),
        "the download itself was cut: {}",
        text(&out.stderr)
    );
    let inbox: Vec<String> = std::fs::read_dir(rx.parent().unwrap().join("inbox"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !inbox.iter().any(|n| n.contains("-000000000002-")),
        "nothing of the cut download stays in the inbox: {inbox:?}"
    );
    let mut copy = sqlite(&rx.parent().unwrap().join("copy.sqlite3")).await;
    let n: i64 = sqlx::query_scalar("SELECT length(photo) FROM report WHERE id = 2")
        .fetch_one(&mut copy)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing of the partial applied");
    let out = run("ferry-receiver", &rx, &["status"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failing fetch warns: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("last fetch error"),
        "{}",
        text(&out.stdout)
    );

    // The network back: the next load fetches and applies it; status is ok.
    relay.allow(i64::MAX);
    ok(&run("ferry-receiver", &rx, &["load"]));
    same(&l, &rx).await;
    let out = ok(&run("ferry-receiver", &rx, &["status"]));
    assert!(!out.contains("last fetch error"), "{out}");

    // An upload cut in its second part (a ~24 MB complete, 16 MiB parts):
    // the bundle stays queued, and goes up whole once the network is back.
    let via_relay = std::fs::read_to_string(&tx)
        .unwrap()
        .replace(&format!(":{}\"", s3.port), &format!(":{}\"", relay.port));
    std::fs::write(&tx, via_relay).unwrap();
    sqlx::raw_sql(
        "WITH RECURSIVE n(i) AS (SELECT 10 UNION ALL SELECT i + 1 FROM n WHERE i < 33)
         INSERT INTO report SELECT i, 1, 'big', randomblob(1000000), 0.5, '2024-06-01 12:00:00' FROM n",
    )
    .execute(&mut app)
    .await
    .unwrap();
    relay.allow(20 << 20);
    let out = run("ferry-sender", &tx, &["complete"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let queued = outbox_files(&l.p("sstate/outbox"));
    assert!(
        queued.iter().any(|f| f.contains("-complete")),
        "the complete stays queued: {queued:?}"
    );
    relay.allow(i64::MAX);
    ok(&run("ferry-sender", &tx, &["push"]));
    assert!(outbox_files(&l.p("sstate/outbox")).is_empty());
    ok(&run("ferry-receiver", &rx, &["load"]));
    same(&l, &rx).await;

    // The daemon's metrics count what it fetched.
    let mport = free_port();
    std::fs::write(
        &rx,
        format!("{cfg}[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"),
    )
    .unwrap();
    sqlx::raw_sql(
        "UPDATE report SET msg = 'metrics', updated_at = '2024-06-02 00:00:00' WHERE id = 1",
    )
    .execute(&mut app)
    .await
    .unwrap();
    ok(&run("ferry-sender", &tx, &["partial"]));
    let mut cmd = Command::new(ferry_tests::binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(&rx)
        .arg("run")
        .env("RUST_LOG", "info");
    let mut d = Daemon::spawn(cmd);
    d.wait_for("fetched from the bucket", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(mport);
        if m.contains("ferry_receiver_bucket_fetched_bundles_total{bucket=\"s3://ferry/app\"} 1")
            && m.contains(
                "ferry_receiver_bucket_fetch_failures_in_a_row{bucket=\"s3://ferry/app\"} 0",
            )
            && m.contains("ferry_receiver_bucket_last_success_timestamp_seconds")
        {
            break;
        }
        assert!(Instant::now() < deadline, "metrics: {m}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Exports into a bucket: `[export]` after a complete and a partial's change
/// set, and one by hand; each table's file whole, `_manifest.json` naming
/// every file with its size; wrong credentials refused with nothing written.
#[tokio::test]
async fn exports_go_into_a_bucket() {
    let s3 = S3::start();
    let l = Lite::new("").await;
    let tx = l.p("sender.toml");
    append(&tx, &s3.section(l.dir.path(), "s3://ferry/app", SECRET));
    let rx = receiver(&l, &s3, 1);
    append(
        &rx,
        "[export]\nto = \"s3://ferry/exports\"\nchanges = true\n",
    );
    ok(&run("ferry-sender", &tx, &["complete"]));
    ok(&run("ferry-receiver", &rx, &["load"]));
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql(
        "UPDATE report SET msg = 'changed', updated_at = '2024-06-01 00:00:00' WHERE id = 1",
    )
    .execute(&mut app)
    .await
    .unwrap();
    ok(&run("ferry-sender", &tx, &["partial"]));
    ok(&run("ferry-receiver", &rx, &["load"]));
    ok(&run(
        "ferry-receiver",
        &rx,
        &["export", "--to", "s3://ferry/hand/latest"],
    ));

    // s3s-fs keeps each object as a file under <root>/<bucket>/<key>.
    let objects = s3.root.path().join("ferry");
    let mut sets: Vec<PathBuf> = std::fs::read_dir(objects.join("exports"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    sets.sort();
    sets.push(objects.join("hand/latest"));
    let names: Vec<String> = sets
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[0].ends_with("-000000000001-complete"), "{names:?}");
    assert!(names[1].ends_with("-000000000002-changes"), "{names:?}");
    for set in &sets {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(set.join("_manifest.json")).unwrap()).unwrap();
        let tables = m["tables"].as_array().unwrap();
        assert!(!tables.is_empty(), "{m}");
        for t in tables {
            let file = std::fs::read(set.join(t["file"].as_str().unwrap())).unwrap();
            assert_eq!(file.len() as u64, t["bytes"].as_u64().unwrap(), "{t}");
            assert!(file.starts_with(b"PAR1") && file.ends_with(b"PAR1"), "{t}");
        }
    }
    let changes: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sets[1].join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(changes["contents"], "changes");
    let report = changes["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "report")
        .unwrap();
    assert_eq!(report["rows"], 1, "{changes}");

    // Wrong credentials: refused, nothing written, the state directory clean.
    let bad = std::fs::read_to_string(&rx)
        .unwrap()
        .replace("credentials-25", "credentials-5");
    let _ = s3.section(rx.parent().unwrap(), "s3://ferry/app", "wrong");
    std::fs::write(&rx, bad).unwrap();
    let out = run(
        "ferry-receiver",
        &rx,
        &["export", "--to", "s3://ferry/hand/refused"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!objects.join("hand/refused").exists());
    let state = rx.parent().unwrap().join("state");
    assert!(
        std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("export")),
        "the stage is removed"
    );
    eprintln!("{}", text(&out.stderr));
}

/// A PostgreSQL sender whose completes carry unchanged tables: sender-side
/// retention keeps the completes a kept complete carries from, and a receiver
/// replicating from the bucket alone rebuilds an equal copy.
#[tokio::test]
async fn retention_keeps_what_a_kept_complete_carries_from() {
    use ferry_tests::pg::{PgServer, exec, public_content};
    let pg = PgServer::start();
    let mut tables = String::new();
    for t in ["a", "b", "c"] {
        tables.push_str(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO {t} (id, v) SELECT g, md5(g::text) FROM generate_series(1, 500) g;\n"
        ));
    }
    pg.create_db("app", &tables).await;
    pg.create_db("viz", "").await;
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let tx = dir.path().join("sender.toml");
    std::fs::write(
        &tx,
        format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\n\
             change_column = \"updated_at\"\n{}keep_completes = 1\nkeep_for = \"0s\"\n",
            dir.path().join("sstate"),
            pg.url("app"),
            s3.section(dir.path(), "s3://ferry/app", SECRET)
        ),
    )
    .unwrap();
    let mut src = pg.connect("app").await;
    ok(&run("ferry-sender", &tx, &["complete"]));
    exec(
        &mut src,
        "UPDATE b SET v = 'x', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&run("ferry-sender", &tx, &["complete"]));
    exec(
        &mut src,
        "UPDATE c SET v = 'x', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&run("ferry-sender", &tx, &["complete"]));
    let out = ok(&run("ferry-sender", &tx, &["prune-bucket"]));
    let left: std::collections::BTreeSet<u64> = std::fs::read_dir(s3.root.path().join("ferry/app"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            ferry_common::manifest::parse_bundle_file_name(&e.file_name().to_string_lossy())
        })
        .map(|b| b.seq.0)
        .collect();
    // #3 carries a from #1 and b from #2.
    assert_eq!(left, [1, 2, 3].into(), "{out}");
    let rx = dir.path().join("receiver.toml");
    std::fs::create_dir_all(dir.path().join("inbox")).unwrap();
    std::fs::write(
        &rx,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n{}",
            dir.path().join("rstate"),
            dir.path().join("inbox"),
            pg.url("viz"),
            s3.section(dir.path(), "s3://ferry/app", SECRET)
        ),
    )
    .unwrap();
    ok(&run("ferry-receiver", &rx, &["load"]));
    assert_eq!(
        public_content(&mut pg.connect("viz").await).await,
        public_content(&mut src).await
    );
}
