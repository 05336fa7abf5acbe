//! Snapshots on demand over real HTTP: the sender daemon's control endpoint
//! queues a complete (of chosen tables) behind the running job, refuses a
//! second while one is queued (409) and any request without the token (401,
//! nothing triggered), reports each snapshot's status as it moves, and the
//! receiver's endpoint says the bundle was applied.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::daemon::Daemon;
use ferry_tests::lite::{Lite, sqlite};
use ferry_tests::pg::free_port;
use ferry_tests::sshd::keygen;
use ferry_tests::{binary, outbox_files};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// One HTTP/1.0 request; (status, body as JSON or null).
fn http(port: u16, method: &str, path: &str, token: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn sender(l: &Lite) -> Daemon {
    let mut cmd = Command::new(binary("ferry-sender"));
    cmd.arg("--config")
        .arg(l.p("sender.toml"))
        .arg("run")
        .env("RUST_LOG", "info");
    let mut d = Daemon::spawn(cmd);
    d.wait_for("control endpoint listening", Duration::from_secs(20));
    d
}

fn wait_status(port: u16, id: &str, want: &str, d: &Daemon) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, s) = http(port, "GET", &format!("/v1/snapshots/{id}"), TOKEN, "");
        assert_eq!(code, 200, "{s}");
        if s["status"] == want {
            return s;
        }
        assert!(
            s["status"] != "failed" || want == "failed",
            "snapshot failed: {s}\n{}",
            d.log()
        );
        assert!(Instant::now() < deadline, "never {want}: {s}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn snapshots_on_demand_over_http() {
    let keys = tempfile::tempdir().unwrap();
    let k = |n: &str| keys.path().join(n);
    keygen(&k("host_key"), "ed25519");
    keygen(&k("client_key"), "ed25519");
    std::fs::copy(k("client_key.pub"), k("authorized_keys")).unwrap();
    std::fs::write(k("token"), TOKEN).unwrap();
    std::fs::set_permissions(k("token"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let (sftp, tx_ctl, rx_ctl) = (free_port(), free_port(), free_port());
    std::fs::write(
        k("known_hosts"),
        format!(
            "[127.0.0.1]:{sftp} {}",
            std::fs::read_to_string(k("host_key.pub")).unwrap()
        ),
    )
    .unwrap();
    // A server that accepts and never speaks: the first push hangs, so the
    // daemon stays busy while the requests below arrive.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    let push = |port: u16, timeout: &str| {
        format!(
            "[push]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"ferry\"\nkey_file = {:?}\n\
             known_hosts = {:?}\nremote_dir = \"/\"\nattempts = 1\nconnect_timeout = \"{timeout}\"\n",
            k("client_key"),
            k("known_hosts")
        )
    };
    let control = format!(
        "[control]\nlisten = \"127.0.0.1:{tx_ctl}\"\ntoken_file = {:?}\n",
        k("token")
    );
    let l = Lite::with(
        &format!(
            "[daemon]\nrescan_interval = \"1s\"\n[control]\nlisten = \"127.0.0.1:{rx_ctl}\"\ntoken_file = {:?}\n\
             [sftp_server]\nlisten = \"127.0.0.1:{sftp}\"\nhost_key = {:?}\nauthorized_keys = {:?}\n",
            k("token"),
            k("host_key"),
            k("authorized_keys")
        ),
        &format!("interval = \"off\"\n[complete]\nschedule = \"off\"\n{control}{}", push(silent_port, "15s")),
    )
    .await;
    let base = std::fs::read_to_string(l.p("sender.toml")).unwrap();

    // 1. Busy with the first complete's (hanging) push.
    let mut d = sender(&l);
    d.wait_for("no complete bundle yet", Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while outbox_files(&l.p("sstate/outbox")).is_empty() {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // A wrong or missing token: 401, nothing triggered.
    for token in ["wrong-token-wrong-token", ""] {
        let (code, body) = http(tx_ctl, "POST", "/v1/snapshots", token, "");
        assert_eq!(code, 401, "{body}");
        assert_eq!(http(tx_ctl, "GET", "/v1/status", token, "").0, 401);
    }
    let (code, body) = http(tx_ctl, "POST", "/v1/snapshots", TOKEN, "{\"tables\": 5}");
    assert_eq!(code, 400, "{body}");
    let (code, first) = http(
        tx_ctl,
        "POST",
        "/v1/snapshots",
        TOKEN,
        "{\"tables\": [\"report\"]}",
    );
    assert_eq!(code, 202, "{first}");
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(first["status"], "queued");
    // A second while the first is queued: refused, naming the first.
    let (code, second) = http(tx_ctl, "POST", "/v1/snapshots", TOKEN, "");
    assert_eq!(code, 409, "{second}");
    assert_eq!(second["id"], id.as_str());
    let (code, got) = http(tx_ctl, "GET", &format!("/v1/snapshots/{id}"), TOKEN, "");
    assert_eq!(
        (code, got["status"].as_str()),
        (200, Some("queued")),
        "{got}"
    );
    assert_eq!(http(tx_ctl, "GET", "/v1/snapshots/nope", TOKEN, "").0, 404);
    let (code, status) = http(tx_ctl, "GET", "/v1/status", TOKEN, "");
    assert_eq!(code, 200);
    assert_eq!(status["sender_id"], "app", "{status}");
    // Only the first complete was written while the token was wrong.
    assert_eq!(outbox_files(&l.p("sstate/outbox")).len(), 1);
    d.signal("TERM");
    d.wait_exit(Duration::from_secs(20));

    // 2. Delivery through the receiver's embedded endpoint.
    std::fs::write(
        l.p("sender.toml"),
        base.replace(&push(silent_port, "15s"), &push(sftp, "10s")),
    )
    .unwrap();
    let mut rcmd = Command::new(binary("ferry-receiver"));
    rcmd.arg("--config")
        .arg(l.p("receiver.toml"))
        .arg("run")
        .env("RUST_LOG", "info");
    let mut receiver = Daemon::spawn(rcmd);
    receiver.wait_for("control endpoint listening", Duration::from_secs(20));
    let d = sender(&l);
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("UPDATE report SET msg = 'asked for' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    // The daemon may still be pushing the first complete: retry a 409.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (code, s) = http(
            tx_ctl,
            "POST",
            "/v1/snapshots",
            TOKEN,
            "{\"tables\": [\"report\"]}",
        );
        if code == 202 {
            break s["id"].as_str().unwrap().to_owned();
        }
        assert!(
            code == 409 && Instant::now() < deadline,
            "{code} {s}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let done = wait_status(tx_ctl, &id, "delivered", &d);
    let file = done["file"].as_str().unwrap().to_owned();
    assert!(
        file.contains("-partial."),
        "a complete of one table is a partial: {done}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, b) = http(rx_ctl, "GET", &format!("/v1/bundles/{file}"), TOKEN, "");
        if code == 200 && b["state"] == "applied" {
            break;
        }
        assert!(Instant::now() < deadline, "{code} {b}\n{}", receiver.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        http(rx_ctl, "GET", "/v1/bundles/x.tar.zst", TOKEN, "").0,
        404
    );
    assert_eq!(
        http(rx_ctl, "GET", "/v1/status", "nope-nope-nope-nope", "").0,
        401
    );
    let (code, s) = http(rx_ctl, "GET", "/v1/status", TOKEN, "");
    assert_eq!(code, 200);
    assert!(s["health"]["level"].is_string(), "{s}");
    l.assert_same().await;
}
