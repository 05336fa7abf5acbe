//! Prometheus metrics with a real Prometheus (Debian's package, started here
//! on loopback): both daemons serve `[metrics] listen`, Prometheus scrapes
//! them every second, and the values move as bundles flow from a SQLite app
//! through the receiver's embedded SFTP endpoint into its SQLite copy. The
//! exposition passes `promtool check metrics`; the shipped alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), and
//! Prometheus loads them.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::binary;
use ferry_tests::daemon::Daemon;
use ferry_tests::lite::{Lite, sqlite};
use ferry_tests::pg::free_port;
use ferry_tests::sshd::keygen;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn alerts_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/alerts")
}

/// `GET path` over HTTP/1.0; the body (empty while nothing listens).
fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query (summed), if Prometheus has one.
fn query(prom: u16, q: &str) -> Option<f64> {
    let body = http_get(
        prom,
        &format!("/api/v1/query?query={}", encode(&format!("sum({q})"))),
    );
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn wait_query(prom: u16, q: &str, at_least: f64, logs: &dyn Fn() -> String) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = query(prom, q)
            && v >= at_least
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw {q} >= {at_least} (last {:?}):\n{}",
            query(prom, q),
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(alerts_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; tests/needs.sh installs it)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "ferry.rules.yml"], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "ferry.rules.test.yml"], None);
    assert!(ok, "{out}");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(alerts_dir().join("ferry.grafana.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 6);
}

#[tokio::test]
async fn prometheus_scrapes_both_agents_and_the_values_move() {
    let keys = tempfile::tempdir().unwrap();
    let k = |n: &str| keys.path().join(n);
    keygen(&k("host_key"), "ed25519");
    keygen(&k("client_key"), "ed25519");
    std::fs::copy(k("client_key.pub"), k("authorized_keys")).unwrap();
    let (sftp, rx_metrics, tx_metrics, prom) = (free_port(), free_port(), free_port(), free_port());
    std::fs::write(
        k("known_hosts"),
        format!(
            "[127.0.0.1]:{sftp} {}",
            std::fs::read_to_string(k("host_key.pub")).unwrap()
        ),
    )
    .unwrap();
    let l = Lite::with(
        &format!(
            "[daemon]\nrescan_interval = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:{rx_metrics}\"\n\
             [sftp_server]\nlisten = \"127.0.0.1:{sftp}\"\nhost_key = {:?}\nauthorized_keys = {:?}\n",
            k("host_key"),
            k("authorized_keys")
        ),
        &format!(
            "interval = \"1s\"\n[complete]\nschedule = \"off\"\n[metrics]\nlisten = \"127.0.0.1:{tx_metrics}\"\n\
             [push]\nhost = \"127.0.0.1\"\nport = {sftp}\nuser = \"ferry\"\nkey_file = {:?}\n\
             known_hosts = {:?}\nremote_dir = \"/\"\nattempts = 1\n",
            k("client_key"),
            k("known_hosts")
        ),
    )
    .await;
    let daemon = |bin: &str, config: &str, ready: &str| {
        let mut cmd = Command::new(binary(bin));
        cmd.arg("--config")
            .arg(l.p(config))
            .arg("run")
            .env("RUST_LOG", "info");
        let mut d = Daemon::spawn(cmd);
        d.wait_for(ready, Duration::from_secs(20));
        d.wait_for("serving Prometheus metrics", Duration::from_secs(20));
        d
    };
    let mut receiver = daemon("ferry-receiver", "receiver.toml", "SFTP endpoint listening");
    let mut sender = daemon("ferry-sender", "sender.toml", "sender running");

    // The exposition itself passes promtool's checks.
    for port in [tx_metrics, rx_metrics] {
        let text = http_get(port, "/metrics");
        assert!(text.contains("# EOF"), "{text}");
        let (ok, out) = promtool(&["check", "metrics"], Some(&text));
        assert!(ok, "promtool check metrics:\n{out}\n{text}");
    }
    assert!(http_get(tx_metrics, "/other").contains("GET /metrics"));

    let data = l.p("prometheus");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\n\
             scrape_configs:\n  - job_name: ferry-sender\n    static_configs:\n      - targets: ['127.0.0.1:{tx_metrics}']\n\
             \x20 - job_name: ferry-receiver\n    static_configs:\n      - targets: ['127.0.0.1:{rx_metrics}']\n",
            alerts_dir().join("ferry.rules.yml")
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        data.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        data.join("tsdb").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
    .arg("--log.level=warn");
    let prometheus = Daemon::spawn(cmd);
    let logs = || format!("{}\n{}\n{}", prometheus.log(), sender.log(), receiver.log());

    // The first complete flows: counted on both sides.
    assert_eq!(wait_query(prom, "up{job=~\"ferry.*\"}", 2.0, &logs), 2.0);
    wait_query(
        prom,
        "ferry_sender_bundles_total{kind=\"complete\",result=\"written\"}",
        1.0,
        &logs,
    );
    wait_query(
        prom,
        "ferry_sender_bundles_total{kind=\"push\",result=\"delivered\"}",
        1.0,
        &logs,
    );
    wait_query(
        prom,
        "ferry_receiver_bundles_total{kind=\"complete\",result=\"applied\"}",
        1.0,
        &logs,
    );
    let rows = wait_query(prom, "ferry_receiver_rows_total", 4.0, &logs);
    wait_query(
        prom,
        "ferry_receiver_last_success_timestamp_seconds",
        1.0e9,
        &logs,
    );
    wait_query(
        prom,
        "ferry_sender_job_duration_seconds_count{kind=\"complete\"}",
        1.0,
        &logs,
    );
    wait_query(prom, "ferry_receiver_free_bytes", 1.0, &logs);

    // A change on the source: the partial moves the counters on.
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("INSERT INTO report VALUES (3, 1, 'new', NULL, 0.5, '2024-06-01 00:00:00')")
        .execute(&mut app)
        .await
        .unwrap();
    wait_query(
        prom,
        "ferry_receiver_bundles_total{kind=\"partial\",result=\"applied\"}",
        1.0,
        &logs,
    );
    wait_query(prom, "ferry_receiver_rows_total", rows + 1.0, &logs);
    let lag = query(prom, "ferry_receiver_lag_seconds").unwrap();
    assert!((0.0..120.0).contains(&lag), "lag {lag}");
    assert_eq!(query(prom, "ferry_receiver_quarantined_bundles"), Some(0.0));
    assert_eq!(query(prom, "ferry_sender_outbox_bundles"), Some(0.0));

    // A damaged bundle in the inbox: quarantined, counted and gauged.
    let damaged = ferry_tests::name_in(
        &l.p("sstate/sent"),
        "app",
        3,
        ferry_common::manifest::Kind::Partial,
    );
    std::fs::write(l.p("inbox").join(damaged), b"not zstd").unwrap();
    wait_query(
        prom,
        "ferry_receiver_bundles_total{result=\"failed\"}",
        1.0,
        &logs,
    );
    wait_query(prom, "ferry_receiver_quarantined_bundles", 1.0, &logs);

    // Prometheus loaded the shipped rules.
    let rules = http_get(prom, "/api/v1/rules");
    assert!(
        rules.contains("FerryReplicaStale") && rules.contains("FerryPushFailing"),
        "{rules}"
    );

    sender.signal("TERM");
    receiver.signal("TERM");
    sender.wait_exit(Duration::from_secs(10));
    receiver.wait_exit(Duration::from_secs(10));
    drop(prometheus);
    l.assert_same().await;
}
