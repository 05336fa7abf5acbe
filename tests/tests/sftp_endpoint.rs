//! The receiver's embedded SFTP endpoint, with the stock OpenSSH `sftp` client
//! and with ferry-sender: uploads under a temporary name then rename arrive and
//! load; escapes (`..`, absolute paths, links), reads, listings, direct writes to
//! final names, removals of bundles and unknown keys are all refused, with
//! nothing written outside the inbox.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::daemon::Daemon;
use ferry_tests::lite::{Lite, run, text};
use ferry_tests::pg::free_port;
use ferry_tests::sshd::keygen;
use ferry_tests::{binary, outbox_files};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Endpoint {
    lite: Lite,
    port: u16,
    daemon: Daemon,
}

impl Endpoint {
    async fn start(sender_push: bool) -> Self {
        let keys = tempfile::tempdir().unwrap().keep();
        let host = keys.join("host_key");
        let client = keys.join("client_key");
        keygen(&host, "ed25519");
        keygen(&client, "ed25519");
        std::fs::copy(client.with_extension("pub"), keys.join("authorized_keys")).unwrap();
        let port = free_port();
        std::fs::write(
            keys.join("known_hosts"),
            format!(
                "[127.0.0.1]:{port} {}",
                std::fs::read_to_string(host.with_extension("pub")).unwrap()
            ),
        )
        .unwrap();
        let receiver = format!(
            "[daemon]\nrescan_interval = \"1h\"\n[sftp_server]\nlisten = \"127.0.0.1:{port}\"\n\
             host_key = {host:?}\nauthorized_keys = {:?}\n",
            keys.join("authorized_keys")
        );
        let sender = if sender_push {
            format!(
                "[push]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"ferry\"\nkey_file = {client:?}\n\
                 known_hosts = {:?}\nremote_dir = \"/\"\nattempts = 1\n",
                keys.join("known_hosts")
            )
        } else {
            String::new()
        };
        let lite = Lite::with(&receiver, &sender).await;
        std::fs::rename(&keys, lite.p("keys")).unwrap();
        // The key paths moved with the directory: rewrite both configurations.
        for f in ["receiver.toml", "sender.toml"] {
            let t = std::fs::read_to_string(lite.p(f)).unwrap();
            std::fs::write(
                lite.p(f),
                t.replace(keys.to_str().unwrap(), lite.p("keys").to_str().unwrap()),
            )
            .unwrap();
        }
        let mut cmd = Command::new(binary("ferry-receiver"));
        cmd.arg("--config")
            .arg(lite.p("receiver.toml"))
            .arg("run")
            .env("RUST_LOG", "info");
        let mut daemon = Daemon::spawn(cmd);
        daemon.wait_for("SFTP endpoint listening", Duration::from_secs(20));
        Self { lite, port, daemon }
    }

    fn key(&self, name: &str) -> PathBuf {
        self.lite.p("keys").join(name)
    }

    /// Runs `sftp -b` with one batch; returns its output.
    fn sftp(&self, batch: &str, key: &str) -> Output {
        std::fs::write(self.lite.p("batch"), batch).unwrap();
        Command::new("sftp")
            .arg("-b")
            .arg(self.lite.p("batch"))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.key("known_hosts").display()
            ))
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
            .arg(self.key(key))
            .args(["-P", &self.port.to_string(), "ferry@127.0.0.1"])
            .current_dir(self.lite.p(""))
            .output()
            .unwrap()
    }

    async fn wait_applied(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.lite.p("viz.sqlite3").exists() {
                let mut viz = ferry_tests::lite::sqlite(&self.lite.p("viz.sqlite3")).await;
                let got: i64 = sqlx::query_scalar("SELECT count(*) FROM ferry_applied")
                    .fetch_one(&mut viz)
                    .await
                    .unwrap_or(0);
                if got >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{n} bundles not applied:\n{}",
                self.daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn the_stock_sftp_client_delivers_and_every_escape_is_refused() {
    let e = Endpoint::start(false).await;
    let l = &e.lite;
    let bundle = l.send("complete");
    std::fs::copy(l.p("sstate/outbox").join(&bundle), l.p("b")).unwrap();
    let out = e.sftp(
        &format!("put b .{bundle}.part\nrename .{bundle}.part {bundle}\n"),
        "client_key",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    e.wait_applied(1).await;
    l.assert_same().await;

    let outside = l.p("outside.txt");
    std::fs::write(&outside, "untouched").unwrap();
    std::os::unix::fs::symlink(&outside, l.p("inbox/.link.part")).unwrap();
    let refused = [
        "put b ../escape".to_owned(),
        "put b /../escape".to_owned(),
        format!("put b {}", l.p("escape").display()),
        "put b sub/.x.part".to_owned(),
        // A final name is never open for writing: only temporary names are.
        "put b direct.tar.zst".to_owned(),
        // A temporary name that is a link to a file outside: not followed.
        "put b .link.part".to_owned(),
        format!("get {bundle} got"),
        "ls".to_owned(),
        "mkdir sub".to_owned(),
        format!("rm {bundle}"),
        format!("rename {bundle} other"),
        "symlink /etc/passwd .pw".to_owned(),
    ];
    for cmd in &refused {
        let out = e.sftp(&format!("{cmd}\n"), "client_key");
        // `ls` reports its failure without failing the batch.
        let err = text(&out.stderr);
        assert!(
            !out.status.success() || err.contains("Permission denied"),
            "{cmd:?} was allowed: {err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "untouched");
    assert!(!l.p("escape").exists() && !l.p("got").exists());
    assert!(!l.p("inbox/direct.tar.zst").exists());
    assert!(l.p("inbox").join(&bundle).exists(), "rm must not remove it");

    // A key that is not in authorized_keys cannot log in.
    keygen(&e.key("stranger"), "ed25519");
    let out = e.sftp(&format!("put b .{bundle}.part\n"), "stranger");
    assert!(!out.status.success());
    assert!(
        e.daemon
            .log()
            .contains("key not in sftp_server.authorized_keys"),
        "{}",
        e.daemon.log()
    );
}

#[tokio::test]
async fn ferry_sender_pushes_to_the_embedded_endpoint() {
    let e = Endpoint::start(true).await;
    let l = &e.lite;
    std::fs::write(l.p("media-src/r1.jpg"), b"jpeg").unwrap();
    let out = run("ferry-sender", &l.p("sender.toml"), &["complete"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run("ferry-sender", &l.p("sender.toml"), &["check"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut app = ferry_tests::lite::sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql(
        "INSERT INTO report VALUES (3, 2, 'new', X'CAFE', 2.5, '2024-06-01 00:00:00');
         UPDATE report SET msg = 'edited', updated_at = '2024-06-01 00:00:01' WHERE id = 1;
         DELETE FROM report WHERE id = 2;",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let out = run("ferry-sender", &l.p("sender.toml"), &["partial"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(outbox_files(&l.p("sstate/outbox")).is_empty());
    e.wait_applied(2).await;
    l.assert_same().await;
    assert_eq!(
        std::fs::read(l.p("media-dst/r1.jpg")).unwrap(),
        b"jpeg".to_vec()
    );
    let temps: Vec<_> = std::fs::read_dir(l.p("inbox"))
        .unwrap()
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with('.'))
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    // No upload left a temporary; the one dot file is the receiver's
    // acknowledgement, which the sender read over this endpoint.
    assert_eq!(temps, vec![".ferry-ack-app.json".to_owned()]);
}
