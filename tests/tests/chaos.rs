//! The fault suite: both daemons run against real parts (two PostgreSQL
//! servers, a private OpenSSH sshd with a chrooted SFTP account) while an
//! application writes, and the test breaks things at random moments: `kill -9`
//! of the sender (also in the middle of a complete sent in volumes) and of the
//! receiver, the SFTP server stopped and started, the target PostgreSQL crashed
//! and restarted, damaged copies of delivered bundles dropped into the inbox.
//! Then the writes stop, and the copy must converge to the source row for row
//! with no manual step and nothing quarantined.
//!
//! The test suite runs a short, seeded version; `tests/chaos/run` runs it long
//! with fresh seeds (`FERRY_CHAOS_ROUNDS`, `FERRY_CHAOS_SEED`).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::daemon::Daemon;
use ferry_tests::pg::PgServer;
use ferry_tests::sshd::SshServer;
use ferry_tests::{Rng, binary};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SCHEMA: &str = "
CREATE TABLE item (id int PRIMARY KEY, v text, n bigint,
                   updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE note (id int PRIMARY KEY, item_id int REFERENCES item (id) ON DELETE CASCADE,
                   body text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE tag (code text PRIMARY KEY, label text,
                  updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON item (updated_at); CREATE INDEX ON note (updated_at);
CREATE INDEX ON tag (updated_at);
INSERT INTO item SELECT i, md5(i::text), i FROM generate_series(1, 3000) i;
INSERT INTO note SELECT i, i, repeat('n', 200) FROM generate_series(1, 3000) i;
INSERT INTO tag SELECT 't' || i, 'l' FROM generate_series(1, 200) i;
";

const TABLES: [&str; 3] = ["item", "note", "tag"];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One application statement; keys from a small range, so rows are deleted
/// and come back, and equal keys meet across tables.
fn app_op(rng: &mut Rng) -> String {
    let id = rng.below(3500) + 1;
    match rng.below(9) {
        0 | 1 => format!(
            "INSERT INTO item VALUES ({id}, 'new', {id}) ON CONFLICT (id) DO UPDATE
             SET v = 'again', updated_at = now()"
        ),
        2 | 3 => format!("UPDATE item SET n = n + 1, updated_at = now() WHERE id = {id}"),
        4 => format!("DELETE FROM item WHERE id = {id}"),
        5 => format!(
            "INSERT INTO note SELECT {id}, i.id, 'b' FROM item i WHERE i.id = {}
             ON CONFLICT (id) DO UPDATE SET body = 'b2', updated_at = now()",
            rng.below(3500) + 1
        ),
        6 => format!("DELETE FROM note WHERE id = {id}"),
        7 => format!(
            "INSERT INTO tag VALUES ('t{}', 'x') ON CONFLICT (code) DO UPDATE
             SET label = 'y', updated_at = now()",
            rng.below(300)
        ),
        _ => format!("DELETE FROM tag WHERE code = 't{}'", rng.below(300)),
    }
}

/// The application: writes until told to stop, through crashes of its server.
fn spawn_app(url: String, seed: u64, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    tokio::spawn(async move {
        let mut rng = Rng(seed.rotate_left(17) | 1);
        let mut conn: Option<PgConnection> = None;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                conn = PgConnection::connect(&url).await.ok();
            }
            if let Some(c) = &mut conn {
                let mut batch = String::from("BEGIN;");
                for _ in 0..rng.below(4) + 1 {
                    batch.push_str(&app_op(&mut rng));
                    batch.push(';');
                }
                batch.push_str("COMMIT;");
                match sqlx::raw_sql(AssertSqlSafe(batch)).execute(&mut *c).await {
                    Ok(_) => {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => conn = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

struct Agents {
    dir: PathBuf,
    sender: Option<Daemon>,
    receiver: Option<Daemon>,
}

impl Agents {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn spawn(&self, bin: &str, config: &str, args: &[&str]) -> Daemon {
        let mut cmd = Command::new(binary(bin));
        cmd.arg("--config")
            .arg(self.path(config))
            .args(args)
            .env("RUST_LOG", "warn");
        Daemon::spawn(cmd)
    }

    fn start_sender(&mut self) {
        self.sender = Some(self.spawn("ferry-sender", "sender.toml", &["run"]));
    }

    fn start_receiver(&mut self) {
        self.receiver = Some(self.spawn("ferry-receiver", "receiver.toml", &["run"]));
    }

    /// `kill -9`, and the log of what was killed (for the failure report).
    fn kill(d: &mut Option<Daemon>) -> String {
        let mut d = d.take().expect("running");
        d.signal("KILL");
        d.wait_exit(Duration::from_secs(10));
        d.log()
    }
}

async fn rows(conn: &mut PgConnection, table: &str) -> Vec<String> {
    let sql = format!("SELECT r::text FROM {table} r ORDER BY 1");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(conn)
        .await
        .unwrap_or_default()
}

/// The quarantine's error reports, for a failure message.
fn quarantine_reports(dir: &Path) -> String {
    std::fs::read_dir(dir.join("rstate/quarantine"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".error.txt"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn quarantined(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("rstate/quarantine"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tar.zst"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_converges_after_kills_outages_and_crashes() {
    let seed = env_u64("FERRY_CHAOS_SEED", 0xc4a0_5eed);
    let rounds = env_u64("FERRY_CHAOS_ROUNDS", 10);
    let mut rng = Rng(seed | 1);
    let src = PgServer::start();
    let dst = PgServer::start();
    src.create_db("app", SCHEMA).await;
    dst.create_db("viz", "").await;
    let mut ssh = SshServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sender.toml"),
        format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n\
             [partial]\nchange_column = \"updated_at\"\noverlap = \"1s\"\ninterval = \"1s\"\n\
             [complete]\nschedule = \"off\"\n[bundle]\nvolume_bytes = 65536\n{}",
            dir.path().join("sstate"),
            src.url("app"),
            ssh.push_section("inbox", &ssh.client_key, ssh.port)
                .replace("attempts = 1", "attempts = 3"),
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("receiver.toml"),
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n[daemon]\nrescan_interval = \"1s\"\n",
            dir.path().join("rstate"),
            ssh.inbox(),
            dst.url("viz"),
        ),
    )
    .unwrap();
    let mut agents = Agents {
        dir: dir.path().to_owned(),
        sender: None,
        receiver: None,
    };
    // The first complete, by hand, as an operator starts a new replica.
    let first = agents
        .spawn("ferry-sender", "sender.toml", &["complete"])
        .wait_exit(Duration::from_secs(120));
    assert!(first.success(), "the first complete failed");
    agents.start_sender();
    agents.start_receiver();

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    spawn_app(src.url("app"), seed, stop.clone(), writes.clone());

    let mut counts = [0u32; 7];
    let mut damaged: Vec<String> = Vec::new();
    let started = Instant::now();
    for _ in 0..rounds {
        let delay = Duration::from_millis(rng.below(1500));
        let fault = rng.below(7);
        counts[fault as usize] += 1;
        match fault {
            0 => {
                tokio::time::sleep(delay).await;
                Agents::kill(&mut agents.sender);
                agents.start_sender();
            }
            1 => {
                tokio::time::sleep(delay).await;
                Agents::kill(&mut agents.receiver);
                agents.start_receiver();
            }
            2 => {
                // A complete (in volumes, pushed as written) killed at a
                // random moment, or left to finish; the daemon goes on after.
                Agents::kill(&mut agents.sender);
                let mut c = agents.spawn("ferry-sender", "sender.toml", &["complete"]);
                tokio::time::sleep(delay).await;
                c.signal("KILL");
                c.wait_exit(Duration::from_secs(30));
                agents.start_sender();
            }
            3 => {
                ssh.stop();
                tokio::time::sleep(delay + Duration::from_secs(1)).await;
                ssh.restart();
            }
            4 => {
                tokio::time::sleep(delay).await;
                dst.restart();
            }
            6 => {
                // Damaged in transit: a bundle in the inbox, not applied yet,
                // gets a flipped byte. The receiver quarantines it and asks
                // for it again; the sender sends it again from sent/.
                tokio::time::sleep(delay).await;
                let mut names: Vec<String> = std::fs::read_dir(ssh.inbox())
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n.ends_with("-partial.tar.zst"))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                if let Some(name) = names.pop() {
                    let path = ssh.inbox().join(&name);
                    if let Ok(mut bytes) = std::fs::read(&path) {
                        let mid = bytes.len() / 2;
                        bytes[mid] ^= 0x55;
                        let tmp = ssh.inbox().join(".damaged.part");
                        std::fs::write(&tmp, &bytes).unwrap();
                        // Only if it is still there (not applied and removed meanwhile).
                        if path.exists() {
                            std::fs::rename(&tmp, &path).unwrap();
                            damaged.push(name);
                        } else {
                            let _ = std::fs::remove_file(&tmp);
                        }
                    }
                }
            }
            _ => {
                // A damaged copy of a delivered bundle: a re-delivery that
                // must be skipped, not quarantined and not applied.
                let applied: i64 = match PgConnection::connect(&dst.url("viz")).await {
                    Ok(mut c) => sqlx::query_scalar(
                        "SELECT coalesce(max(seq), 0) FROM ferry_receiver.applied",
                    )
                    .fetch_one(&mut c)
                    .await
                    .unwrap_or(0),
                    Err(_) => 0,
                };
                let sent: Vec<PathBuf> = std::fs::read_dir(dir.path().join("sstate/sent"))
                    .map(|d| d.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default();
                if let Some(b) = sent.iter().find(|p| {
                    p.file_name()
                        .and_then(|n| {
                            ferry_common::manifest::parse_bundle_file_name(&n.to_string_lossy())
                        })
                        .is_some_and(|b| {
                            b.kind == ferry_common::manifest::Kind::Partial
                                && (b.seq.0 as i64) <= applied
                        })
                }) {
                    let bytes = std::fs::read(b).unwrap();
                    let name = b.file_name().unwrap();
                    let tmp = ssh.inbox().join(".planted.part");
                    std::fs::write(&tmp, &bytes[..bytes.len() / 2]).unwrap();
                    std::fs::rename(&tmp, ssh.inbox().join(name)).unwrap();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let workload = started.elapsed();

    // Converge: the next partials carry the last writes; no step by hand.
    let quiet = Instant::now();
    let mut a = src.connect("app").await;
    let compared = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut b = match PgConnection::connect(&dst.url("viz")).await {
            Ok(b) => b,
            Err(_) => continue,
        };
        let mut same = true;
        let mut compared = 0;
        for t in TABLES {
            let (x, y) = (rows(&mut a, t).await, rows(&mut b, t).await);
            compared += x.len();
            same &= x == y;
        }
        if same {
            break compared;
        }
        assert!(
            quiet.elapsed() < Duration::from_secs(90),
            "seed {seed}: the copy did not converge within 90 s after the writes stopped;\n\
             sender log:\n{}\nreceiver log:\n{}\nquarantine: {}",
            agents.sender.as_ref().map(Daemon::log).unwrap_or_default(),
            agents
                .receiver
                .as_ref()
                .map(Daemon::log)
                .unwrap_or_default(),
            quarantine_reports(dir.path()),
        );
    };
    let converged = quiet.elapsed();
    // Only what the test damaged may be in quarantine, and only when a
    // complete superseded it before it was sent again.
    let left: Vec<String> = quarantined(dir.path())
        .into_iter()
        .filter(|q| !damaged.contains(q))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "seed {seed}: nothing else may be quarantined:\n{}",
        quarantine_reports(dir.path())
    );
    let mut b = dst.connect("viz").await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM ferry_receiver.applied")
        .fetch_one(&mut b)
        .await
        .unwrap();
    eprintln!(
        "chaos seed {seed}: {rounds} faults over {:.1} s (kill -9 sender {}, receiver {}, \
         mid-complete {}; sshd outages {}; target crashes {}; damaged re-deliveries {}; \
         damaged in transit {}, {} still quarantined), \
         {} app transactions, {applied} bundles applied, {compared} rows compared equal, \
         converged {:.1} s after the writes stopped",
        workload.as_secs_f64(),
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        counts[5],
        counts[6],
        quarantined(dir.path()).len(),
        writes.load(Ordering::Relaxed),
        converged.as_secs_f64()
    );
}
