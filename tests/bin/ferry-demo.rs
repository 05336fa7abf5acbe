//! `ferry-demo`: the main job on the embedded default, on this machine, with
//! nothing but the two agents: a sample app database in SQLite with media files;
//! a receiver (SQLite copy) serving its embedded SFTP endpoint on loopback; the
//! sender pushing a complete and partials with inserts, updates and deletes over
//! SFTP; then a report of what arrived and whether both sides match.
//! Exit status 0 when they match. `--keep` leaves the work directory.

#![allow(clippy::unwrap_used)] // a demo: a panic names what broke

use ferry_tests::loader::sqlite_rows;
use russh::keys::ssh_key::{Algorithm, LineEnding};
use sqlx::{Connection, SqliteConnection};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --bins`",
        path.display()
    );
    path
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn agent(name: &str, config: &Path, args: &[&str]) {
    println!("$ {name} {}", args.join(" "));
    let out = Command::new(bin(name))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        panic!("{name} {} failed ({})", args.join(" "), out.status);
    }
}

async fn open(db: &Path) -> SqliteConnection {
    SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap()
}

async fn sql(db: &Path, script: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(script.to_owned()))
        .execute(&mut open(db).await)
        .await
        .unwrap();
}

fn keypair(path: &Path) -> String {
    let key =
        russh::keys::PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519)
            .unwrap();
    key.write_openssh_file(path, LineEnding::LF).unwrap();
    key.public_key().to_openssh().unwrap()
}

/// The receiver daemon, stopped with SIGTERM when dropped.
struct Receiver(Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let work = tempfile::Builder::new()
        .prefix("ferry-demo.")
        .tempdir()
        .unwrap();
    let w = work.path().to_owned();
    let ok = demo(&|rel: &str| w.join(rel)).await;
    if keep {
        println!("\nwork directory kept: {}", work.keep().display());
    }
    std::process::exit(if ok { 0 } else { 1 });
}

const NOW: &str = "strftime('%Y-%m-%d %H:%M:%f','now')";

async fn demo(p: &dyn Fn(&str) -> PathBuf) -> bool {
    step("a sample app: a SQLite database with media files");
    for d in ["media/reported_images", "inbox", "keys"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    sql(
        &p("app.sqlite3"),
        &format!(
            "CREATE TABLE phone (id INTEGER PRIMARY KEY, model TEXT NOT NULL, updated_at TEXT NOT NULL);
             CREATE TABLE report (id INTEGER PRIMARY KEY, phone_id INTEGER REFERENCES phone(id),
                                  message TEXT, image TEXT, \"timeStamp\" TEXT NOT NULL);
             CREATE INDEX report_ts ON report (\"timeStamp\");
             CREATE INDEX phone_updated ON phone (updated_at);
             INSERT INTO phone VALUES (1, 'Pixel', {NOW}), (2, 'Fairphone', {NOW});
             INSERT INTO report VALUES (1, 1, 'bus 210 is late', 'r1.jpg', {NOW}),
                                       (2, 2, 'crowded', NULL, {NOW});"
        ),
    )
    .await;
    std::fs::write(p("media/reported_images/r1.jpg"), b"JPEG-1").unwrap();
    println!(
        "  {}: 2 phones, 2 reports, 1 image",
        p("app.sqlite3").display()
    );

    step("keys: the receiver's SFTP host key, the sender's client key");
    let host_pub = keypair(&p("keys/sftp_host_ed25519_key"));
    let client_pub = keypair(&p("keys/id_ed25519"));
    std::fs::write(p("keys/authorized_keys"), format!("{client_pub}\n")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    std::fs::write(
        p("keys/known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}\n"),
    )
    .unwrap();
    println!("  endpoint 127.0.0.1:{port}; the sender's key is in its authorized_keys");

    let sender = p("sender.toml");
    std::fs::write(
        &sender,
        format!(
            "sender_id = \"demo\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}\"\n\
             [complete]\nschedule = \"off\"\n[partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\n\
             [partial.tables.\"report\"]\nchange_column = \"timeStamp\"\n\
             [[media]]\nname = \"images\"\npath = {:?}\n\
             [push]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"ferry\"\nkey_file = {:?}\n\
             known_hosts = {:?}\nremote_dir = \"/\"\n",
            p("sender-state"),
            p("app.sqlite3").display(),
            p("media/reported_images"),
            p("keys/id_ed25519"),
            p("keys/known_hosts"),
        ),
    )
    .unwrap();
    let receiver = p("receiver.toml");
    std::fs::write(
        &receiver,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = \"sqlite://{}\"\n[media]\nimages = {:?}\n\
             [sftp_server]\nlisten = \"127.0.0.1:{port}\"\nhost_key = {:?}\nauthorized_keys = {:?}\nuser = \"ferry\"\n",
            p("receiver-state"),
            p("inbox"),
            p("viz.sqlite3").display(),
            p("viz-media"),
            p("keys/sftp_host_ed25519_key"),
            p("keys/authorized_keys"),
        ),
    )
    .unwrap();

    step("the receiver: ferry-receiver run (a SQLite copy, the embedded SFTP endpoint)");
    let log = std::fs::File::create(p("receiver.log")).unwrap();
    let _receiver = Receiver(
        Command::new(bin("ferry-receiver"))
            .arg("--config")
            .arg(&receiver)
            .arg("run")
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(p("receiver.log"))
        .unwrap_or_default()
        .contains("SFTP endpoint listening")
    {
        assert!(
            Instant::now() < deadline,
            "the receiver did not start:\n{}",
            std::fs::read_to_string(p("receiver.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  listening; its log: {}", p("receiver.log").display());

    step("the sender: check, a complete, then partials (each pushed over SFTP)");
    agent("ferry-sender", &sender, &["check"]);
    agent("ferry-sender", &sender, &["complete"]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    sql(
        &p("app.sqlite3"),
        &format!(
            "INSERT INTO report VALUES (3, 2, 'new report', 'r3.jpg', {NOW});
             UPDATE report SET message = 'bus 210 is very late', \"timeStamp\" = {NOW} WHERE id = 1;"
        ),
    )
    .await;
    std::fs::write(p("media/reported_images/r3.jpg"), b"JPEG-3").unwrap();
    println!("  (app: report 3 inserted with image r3.jpg; report 1 updated)");
    agent("ferry-sender", &sender, &["partial"]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    sql(&p("app.sqlite3"), "DELETE FROM report WHERE id = 2;").await;
    println!("  (app: report 2 deleted)");
    agent("ferry-sender", &sender, &["partial"]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    sql(
        &p("app.sqlite3"),
        &format!(
            "INSERT INTO phone VALUES (3, 'Nokia', {NOW});
             UPDATE phone SET model = 'Pixel 9', updated_at = {NOW} WHERE id = 1;
             INSERT INTO report VALUES (4, 3, 'stop moved', NULL, {NOW});"
        ),
    )
    .await;
    println!("  (app: phone 3 and report 4 inserted; phone 1 updated)");
    agent("ferry-sender", &sender, &["partial"]);

    step("what arrived");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut n = 0i64;
        if p("viz.sqlite3").exists() {
            n = sqlx::query_scalar("SELECT count(*) FROM ferry_applied")
                .fetch_one(&mut open(&p("viz.sqlite3")).await)
                .await
                .unwrap_or(0);
        }
        if n >= 4 {
            break;
        }
        if Instant::now() > deadline {
            println!(
                "  only {n} of 4 bundles were applied; see {}",
                p("receiver.log").display()
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent("ferry-receiver", &receiver, &["status"]);

    step("both sides");
    let mut app = open(&p("app.sqlite3")).await;
    let mut viz = open(&p("viz.sqlite3")).await;
    let mut same = true;
    for t in ["phone", "report"] {
        let (a, b) = (
            sqlite_rows(&mut app, t).await,
            sqlite_rows(&mut viz, t).await,
        );
        let verdict = if a == b { "identical" } else { "DIFFERENT" };
        println!(
            "  table {t}: {} rows in the app, {} in the copy: {verdict}",
            a.len(),
            b.len()
        );
        same &= a == b;
    }
    for f in ["r1.jpg", "r3.jpg"] {
        let a = std::fs::read(p("media/reported_images").join(f)).ok();
        let b = std::fs::read(p("viz-media").join(f)).ok();
        let equal = a.is_some() && a == b;
        println!(
            "  media {f}: {}",
            if equal { "identical" } else { "DIFFERENT" }
        );
        same &= equal;
    }
    println!(
        "\n{}",
        if same {
            "ferry demo: OK, the copy matches the app"
        } else {
            "ferry demo: FAILED, the copy differs"
        }
    );
    same
}
