//! The whole pipeline with the real parts: a PostgreSQL (or SQLite) source →
//! `ferry-sender` → a real OpenSSH `sshd` with a chrooted, SFTP-only account →
//! the inbox → `ferry-receiver` → a PostgreSQL (or SQLite) target. Also: an
//! outage, a changed host key, a connection cut in the middle of an upload.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::pg::{PgServer, exec, free_port, table_rows};
use ferry_tests::sshd::SshServer;
use ferry_tests::{binary, outbox_files};
use sqlx::Connection;
use std::path::{Path, PathBuf};
use std::process::Output;

fn run(bin: &str, config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(binary(bin))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Final bundle names and leftover temporaries in the inbox (the receiver's
/// acknowledgement files are neither).
fn inbox(ssh: &SshServer, sub: &str) -> (Vec<String>, Vec<String>) {
    let all = outbox_files(&ssh.inbox().join(sub))
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    let temps = std::fs::read_dir(ssh.inbox().join(sub))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') && !n.starts_with(ferry_common::ack::ACK_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    (all, temps)
}

/// Every bundle in one file.
const SINGLE: &str = "[bundle]\nvolume_bytes = 0\n";
/// Completes in volumes of one member each (the smallest volume size).
const VOLUMES: &str = "[bundle]\nvolume_bytes = 1\n";

/// A PostgreSQL source and target, an sshd, and both agents' configurations.
struct Pg {
    pg: PgServer,
    ssh: SshServer,
    dir: tempfile::TempDir,
}

const APP: &str = "
CREATE TABLE phone (id int PRIMARY KEY, model text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE report (id serial PRIMARY KEY, phone_id int REFERENCES phone(id), msg text,
  payload jsonb, photo text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON phone (updated_at); CREATE INDEX ON report (updated_at);
INSERT INTO phone VALUES (1, 'a'), (2, 'b');
INSERT INTO report (phone_id, msg, payload, photo)
  SELECT 1 + g % 2, 'm' || g, jsonb_build_object('g', g), g || '.jpg' FROM generate_series(1, 2000) g;";

impl Pg {
    async fn new() -> Self {
        Self::with(SINGLE).await
    }

    /// `bundle`: the sender's `[bundle]` section.
    async fn with(bundle: &str) -> Self {
        let pg = PgServer::start();
        pg.create_db("app", APP).await;
        pg.create_db("viz", "").await;
        let ssh = SshServer::start();
        let p = Self {
            pg,
            ssh,
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(p.path("media-src/2026")).unwrap();
        p.write_sender("sender.toml", "sstate", p.ssh.port, bundle);
        p.write_receiver("5m");
        p
    }

    fn write_receiver(&self, volume_wait: &str) {
        std::fs::write(
            self.path("receiver.toml"),
            format!(
                "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n[media]\nimages = {:?}\n\
                 [limits]\nvolume_wait = {volume_wait:?}\n",
                self.path("rstate"),
                self.ssh.inbox(),
                self.pg.url("viz"),
                self.path("media-dst")
            ),
        )
        .unwrap();
    }

    fn write_sender(&self, file: &str, state: &str, port: u16, bundle: &str) {
        std::fs::write(
            self.path(file),
            format!(
                "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\n\
                 change_column = \"updated_at\"\noverlap = \"0s\"\n[[media]]\nname = \"images\"\npath = {:?}\n{}{bundle}",
                self.path(state),
                self.pg.url("app"),
                self.path("media-src"),
                self.ssh
                    .push_section("inbox", &self.ssh.client_key, port)
            ),
        )
        .unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A complete killed after its volumes were written: taken as complete
    /// #`seq` from a copy of the sender's state (`killed-state/`), so the real
    /// sender issues `seq` again. Returns the volumes' names in
    /// `killed-state/outbox`.
    fn killed_complete(&self, seq: u64) -> Vec<String> {
        let copy = std::process::Command::new("cp")
            .arg("-a")
            .arg(self.path("sstate"))
            .arg(self.path("killed-state"))
            .status()
            .unwrap();
        assert!(copy.success());
        self.write_sender("killed.toml", "killed-state", self.ssh.port, VOLUMES);
        ok(&run(
            "ferry-sender",
            &self.path("killed.toml"),
            &["complete", "--no-push"],
        ));
        let (volumes, _) = set_files(&self.path("killed-state/outbox"), seq);
        assert!(volumes.len() >= 2, "{volumes:?}");
        volumes
    }

    fn sender(&self, args: &[&str]) -> Output {
        run("ferry-sender", &self.path("sender.toml"), args)
    }

    fn receive(&self) {
        ok(&run(
            "ferry-receiver",
            &self.path("receiver.toml"),
            &["load"],
        ));
    }

    async fn assert_same(&self) {
        let mut a = self.pg.connect("app").await;
        let mut b = self.pg.connect("viz").await;
        for t in ["phone", "report"] {
            assert_eq!(
                table_rows(&mut a, t).await,
                table_rows(&mut b, t).await,
                "table {t} differs between source and receiver"
            );
        }
        for e in walkdir::WalkDir::new(self.path("media-src")) {
            let e = e.unwrap();
            if e.file_type().is_file() {
                let rel = e.path().strip_prefix(self.path("media-src")).unwrap();
                assert_eq!(
                    std::fs::read(e.path()).unwrap(),
                    std::fs::read(self.path("media-dst").join(rel)).unwrap_or_default(),
                    "media file {} differs",
                    rel.display()
                );
            }
        }
    }
}

#[tokio::test]
async fn postgres_to_postgres_over_sftp() {
    let p = Pg::new().await;
    let mut src = p.pg.connect("app").await;
    std::fs::write(p.path("media-src/2026/1.jpg"), vec![7u8; 50_000]).unwrap();
    let out = ok(&p.sender(&["complete"]));
    assert!(out.contains("push: 1 bundle(s)"), "{out}");
    assert!(
        outbox_files(&p.path("sstate/outbox")).is_empty(),
        "delivered bundles leave the outbox"
    );
    p.receive();
    p.assert_same().await;

    // Partials: inserts, updates, deletes and new media.
    for round in 0..2 {
        exec(
            &mut src,
            &format!(
                "INSERT INTO phone VALUES ({id}, 'new'); \
                 INSERT INTO report (phone_id, msg, payload) VALUES ({id}, 'fresh', '{{\"r\": {round}}}'); \
                 UPDATE report SET msg = 'edited {round}', updated_at = now() WHERE id = {upd}; \
                 DELETE FROM report WHERE id = {del};",
                id = 10 + round,
                upd = 5 + round,
                del = 100 + round
            ),
        )
        .await;
        std::fs::write(
            p.path(&format!("media-src/2026/p{round}.jpg")),
            format!("photo {round}"),
        )
        .unwrap();
        let out = ok(&p.sender(&["partial"]));
        assert!(out.contains("push: 1 bundle(s)"), "{out}");
        p.receive();
        p.assert_same().await;
    }
    let (finals, temps) = inbox(&p.ssh, "");
    assert_eq!(finals.len(), 3, "{finals:?}");
    assert!(temps.is_empty(), "no temporary left behind: {temps:?}");
    // Delivered bundles are kept in sent/ from the newest complete on.
    assert_eq!(outbox_files(&p.path("sstate/sent")), finals);
    let status = ok(&p.sender(&["status"]));
    assert!(
        status.contains("last success") && !status.contains("last push error"),
        "{status}"
    );
}

#[tokio::test]
async fn an_outage_queues_bundles_and_they_arrive_in_order() {
    let mut p = Pg::new().await;
    let mut src = p.pg.connect("app").await;
    ok(&p.sender(&["complete"]));
    p.ssh.stop();
    exec(&mut src, "INSERT INTO phone VALUES (20, 'during outage')").await;
    let out = p.sender(&["partial"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "a push that cannot connect is transient"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{}", p.ssh.port)) && err.contains("stay queued"),
        "{err}"
    );
    exec(
        &mut src,
        "UPDATE phone SET model = 'later', updated_at = now() WHERE id = 20",
    )
    .await;
    assert_eq!(p.sender(&["partial"]).status.code(), Some(75));
    assert_eq!(outbox_files(&p.path("sstate/outbox")).len(), 2);
    let status = p.sender(&["status"]);
    assert_eq!(status.status.code(), Some(1), "a failing push is a warning");
    let status = text(&status.stdout);
    assert!(status.contains("last push error"), "{status}");

    p.ssh.restart();
    let out = ok(&p.sender(&["push"]));
    assert!(out.contains("push: 2 bundle(s)"), "{out}");
    assert!(outbox_files(&p.path("sstate/outbox")).is_empty());
    let (finals, _) = inbox(&p.ssh, "");
    assert_eq!(finals.len(), 3);
    p.receive();
    p.assert_same().await;
    let mut viz = p.pg.connect("viz").await;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM ferry_receiver.applied ORDER BY applied_at, seq")
            .fetch_all(&mut viz)
            .await
            .unwrap();
    assert_eq!(applied, vec![1, 2, 3], "applied in order");
}

#[tokio::test]
async fn an_unknown_or_changed_host_key_is_refused_and_nothing_is_sent() {
    let mut p = Pg::new().await;
    let mut src = p.pg.connect("app").await;
    ok(&p.sender(&["complete"]));
    p.ssh.change_host_key();
    exec(&mut src, "INSERT INTO phone VALUES (30, 'x')").await;
    let out = p.sender(&["partial"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a changed host key needs an operator"
    );
    let err = text(&out.stderr);
    let new_key = std::fs::read_to_string(p.ssh.dir.join("host_key.pub")).unwrap();
    let key_b64 = new_key.split_whitespace().nth(1).unwrap();
    assert!(
        err.contains("HOST KEY CHANGED") && err.contains("SHA256:"),
        "{err}"
    );
    assert!(
        err.contains(&format!("[127.0.0.1]:{} ssh-ed25519 {key_b64}", p.ssh.port)),
        "the message shows the exact line: {err}"
    );
    assert_eq!(
        inbox(&p.ssh, "").0.len(),
        1,
        "nothing sent after the change"
    );
    assert_eq!(
        outbox_files(&p.path("sstate/outbox")).len(),
        1,
        "the partial stays queued"
    );

    // An empty known_hosts: unknown key, with the line to add.
    std::fs::write(&p.ssh.known_hosts, "").unwrap();
    let out = p.sender(&["push"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("not in") && err.contains(key_b64), "{err}");
    let check = p.sender(&["check"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(text(&check.stdout).contains("ERROR") && text(&check.stdout).contains(key_b64));

    // Trusting the new key (the operator's fix) delivers it.
    p.ssh.trust_current_host_key();
    ok(&p.sender(&["push"]));
    p.receive();
    p.assert_same().await;
}

/// Forwards one connection to `to`, and cuts both sides after `limit` bytes
/// from the client: a link that dies in the middle of an upload.
async fn cutting_proxy(listener: tokio::net::TcpListener, to: u16, limit: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, _) = listener.accept().await.unwrap();
    let server = tokio::net::TcpStream::connect(("127.0.0.1", to))
        .await
        .unwrap();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < limit {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    down.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_upload_leaves_no_final_file_and_the_next_push_succeeds() {
    let p = Pg::new().await;
    // 8 MB of incompressible media: the bundle is far bigger than the cut.
    let noise: Vec<u8> = (0..250_000u64)
        .flat_map(|i| {
            use sha2::Digest;
            sha2::Sha256::digest(i.to_le_bytes())
        })
        .collect();
    std::fs::write(p.path("media-src/2026/big.bin"), &noise).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    p.write_sender("sender.toml", "sstate", proxy_port, SINGLE);
    // known_hosts names the port: trust the server's key on the proxy's port too.
    let key = std::fs::read_to_string(p.ssh.dir.join("host_key.pub")).unwrap();
    std::fs::write(
        &p.ssh.known_hosts,
        format!(
            "[127.0.0.1]:{proxy_port} {}\n[127.0.0.1]:{} {}\n",
            key.trim(),
            p.ssh.port,
            key.trim()
        ),
    )
    .unwrap();
    let proxy = tokio::spawn(cutting_proxy(listener, p.ssh.port, 2_000_000));
    let out = tokio::process::Command::new(binary("ferry-sender"))
        .arg("--config")
        .arg(p.path("sender.toml"))
        .arg("complete")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    proxy.await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let (finals, temps) = inbox(&p.ssh, "");
    assert!(finals.is_empty(), "no file under a final name: {finals:?}");
    assert_eq!(temps.len(), 1, "the cut upload's temporary: {temps:?}");
    assert_eq!(outbox_files(&p.path("sstate/outbox")).len(), 1);

    p.write_sender("sender.toml", "sstate", p.ssh.port, SINGLE);
    ok(&p.sender(&["push"]));
    let (finals, temps) = inbox(&p.ssh, "");
    assert_eq!(finals.len(), 1);
    assert!(
        temps.is_empty(),
        "the retry wrote over its temporary: {temps:?}"
    );
    p.receive();
    p.assert_same().await;
}

async fn sqlite(path: &Path) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_to_sqlite_over_sftp_with_an_rsa_key_into_a_new_remote_dir() {
    let ssh = SshServer::start();
    let rsa = ssh.add_rsa_client_key();
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel);
    std::fs::create_dir_all(p("media-src")).unwrap();
    let mut app = sqlite(&p("app.sqlite3")).await;
    sqlx::raw_sql(
        "CREATE TABLE report (id INTEGER PRIMARY KEY, msg TEXT, photo BLOB, updated_at TEXT NOT NULL);
         CREATE INDEX report_at ON report (updated_at);
         INSERT INTO report VALUES (1, 'x', X'00FF', '2024-01-01 00:00:00'), (2, NULL, NULL, '2024-01-01 00:00:00');",
    )
    .execute(&mut app)
    .await
    .unwrap();
    std::fs::write(p("media-src/r1.jpg"), b"jpeg").unwrap();
    // A remote directory that does not exist yet: the sender creates it over
    // SFTP. The complete goes in volumes (verified and staged whole by the
    // SQLite receiver), the partial in one file.
    std::fs::write(
        p("sender.toml"),
        format!(
            "sender_id = \"lite\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}\"\n[partial]\n\
             change_column = \"updated_at\"\noverlap = \"0s\"\n[[media]]\nname = \"images\"\npath = {:?}\n{}{VOLUMES}",
            p("sstate"),
            p("app.sqlite3").display(),
            p("media-src"),
            ssh.push_section("inbox/lite", &rsa, ssh.port)
        ),
    )
    .unwrap();
    std::fs::write(
        p("receiver.toml"),
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = \"sqlite://{}\"\n[media]\nimages = {:?}\n",
            p("rstate"),
            ssh.inbox().join("lite"),
            p("viz.sqlite3").display(),
            p("media-dst")
        ),
    )
    .unwrap();
    let check = ok(&run("ferry-sender", &p("sender.toml"), &["check"]));
    assert!(
        check.contains("host key matches") && check.contains("is writable"),
        "{check}"
    );
    ok(&run("ferry-sender", &p("sender.toml"), &["complete"]));
    let volumes = outbox_files(&ssh.inbox().join("lite"))
        .into_iter()
        .filter(|n| n.contains("-complete.v0"))
        .count();
    assert!(volumes >= 2, "the complete went in volumes");
    ok(&run("ferry-receiver", &p("receiver.toml"), &["load"]));
    sqlx::raw_sql(
        "INSERT INTO report VALUES (3, 'new', X'CAFE', '2024-06-01 00:00:00');
         UPDATE report SET msg = 'edited', updated_at = '2024-06-01 00:00:01' WHERE id = 1;
         DELETE FROM report WHERE id = 2;",
    )
    .execute(&mut app)
    .await
    .unwrap();
    std::fs::write(p("media-src/r3.jpg"), b"jpeg3").unwrap();
    ok(&run("ferry-sender", &p("sender.toml"), &["partial"]));
    ok(&run("ferry-receiver", &p("receiver.toml"), &["load"]));
    let mut viz = sqlite(&p("viz.sqlite3")).await;
    assert_eq!(
        ferry_tests::loader::sqlite_rows(&mut app, "report").await,
        ferry_tests::loader::sqlite_rows(&mut viz, "report").await
    );
    for f in ["r1.jpg", "r3.jpg"] {
        assert_eq!(
            std::fs::read(p("media-src").join(f)).unwrap(),
            std::fs::read(p("media-dst").join(f)).unwrap()
        );
    }
}

#[tokio::test]
async fn a_down_server_and_an_unwritable_remote_dir_are_named() {
    let ssh = SshServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sender.toml");
    let write = |push: String| {
        std::fs::write(
            &config,
            format!(
                "sender_id = \"x\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}/app.sqlite3\"\n{push}",
                dir.path().join("s"),
                dir.path().display()
            ),
        )
        .unwrap();
    };
    // The chroot's root belongs to root: not writable by the SFTP account.
    write(ssh.push_section("/", &ssh.client_key, ssh.port));
    let out = run("ferry-sender", &config, &["check"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("host key matches"), "{stdout}");
    assert!(
        stdout.contains("ERROR") && stdout.contains("/.ferry-probe"),
        "{stdout}"
    );
    // Nothing listening.
    write(ssh.push_section("inbox", &ssh.client_key, free_port()));
    let out = run("ferry-sender", &config, &["push"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "nothing pending: nothing to connect for"
    );
    let out = run("ferry-sender", &config, &["check"]);
    assert!(
        text(&out.stdout).contains("could not reach the SFTP server"),
        "{}",
        text(&out.stdout)
    );
    // A locked account (what useradd leaves): sshd without PAM refuses every
    // key, and check names that cause among the others.
    write(ssh.push_section("inbox", &ssh.client_key, ssh.port));
    let locked = std::process::Command::new("usermod")
        .args(["-L", &ssh.user])
        .status()
        .unwrap();
    assert!(locked.success());
    let out = run("ferry-sender", &config, &["check"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("account is locked") && stdout.contains("usermod -p '*'"),
        "{stdout}"
    );
    let unlocked = std::process::Command::new("usermod")
        .args(["-p", "*", &ssh.user])
        .status()
        .unwrap();
    assert!(unlocked.success());

    // The host path of a chrooted inbox: the hint says paths are inside the chroot.
    write(ssh.push_section("/srv/ferry/inbox", &ssh.client_key, ssh.port));
    let stdout = text(&run("ferry-sender", &config, &["check"]).stdout);
    assert!(
        stdout.contains("/srv") && stdout.contains("inside the account's SFTP chroot"),
        "{stdout}"
    );

    // A key others can read is refused, as OpenSSH refuses it.
    let loose = dir.path().join("loose_key");
    std::fs::copy(&ssh.client_key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    write(ssh.push_section("inbox", &loose, ssh.port));
    let stdout = text(&run("ferry-sender", &config, &["check"]).stdout);
    assert!(
        stdout.contains("mode 0644") && stdout.contains("chmod 600"),
        "{stdout}"
    );

    // A full inbox file system: named, and no `.part` left taking the space.
    let mut app = sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}/app.sqlite3?mode=rwc",
        dir.path().display()
    ))
    .await
    .unwrap();
    sqlx::raw_sql("CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB); INSERT INTO blob VALUES (1, randomblob(3000000));")
        .execute(&mut app)
        .await
        .unwrap();
    let id = |flag: &str| {
        text(
            &std::process::Command::new("id")
                .args([flag, &ssh.user])
                .output()
                .unwrap()
                .stdout,
        )
        .trim()
        .to_owned()
    };
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o"])
        .arg(format!(
            "size=1m,mode=0755,uid={},gid={}",
            id("-u"),
            id("-g")
        ))
        .arg("ferry-test")
        .arg(ssh.inbox())
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (CI runs the tests as root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let guard = Unmount(ssh.inbox());
    write(ssh.push_section("inbox", &ssh.client_key, ssh.port));
    let out = run("ferry-sender", &config, &["complete"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("may be full or the SFTP account over its quota"),
        "{err}"
    );
    let left: Vec<String> = std::fs::read_dir(ssh.inbox())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| !n.ends_with(".part")), "{left:?}");
    drop(guard);
    let out = run("ferry-sender", &config, &["push"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(inbox(&ssh, "").0.len(), 1);
}

/// The name of the sender's bundle `seq` of `kind`, in the chain of the
/// bundles in its outbox and sent/.
fn bundle_name(p: &Pg, seq: u64, kind: &str) -> String {
    let mut chains = ferry_tests::chains_in(&p.path("sstate/sent"));
    chains.extend(ferry_tests::chains_in(&p.path("sstate/outbox")));
    chains.dedup();
    assert_eq!(chains.len(), 1, "{chains:?}");
    let kind = if kind == "complete" {
        ferry_common::manifest::Kind::Complete
    } else {
        ferry_common::manifest::Kind::Partial
    };
    ferry_common::manifest::bundle_file_name(
        "app",
        &chains[0],
        ferry_common::manifest::Seq(seq),
        kind,
    )
}

/// The files of complete #`seq` in `dir`: its volumes in order, then its final
/// file (if there).
fn set_files(dir: &Path, seq: u64) -> (Vec<String>, Option<String>) {
    let last = format!("-{seq:012}-complete.tar.zst");
    let stem = format!("-{seq:012}-complete.v");
    let all = outbox_files(dir);
    let volumes = all.iter().filter(|n| n.contains(&stem)).cloned().collect();
    (volumes, all.into_iter().find(|n| n.ends_with(&last)))
}

/// Copies a file into the inbox as an upload does: a temporary, then a rename.
fn deliver(from: &Path, inbox: &Path) {
    let name = from.file_name().unwrap().to_string_lossy().into_owned();
    let temp = inbox.join(format!(".{name}.part"));
    std::fs::copy(from, &temp).unwrap();
    std::fs::rename(&temp, inbox.join(&name)).unwrap();
}

fn applied_seqs(rstate_out: &Output) -> String {
    text(&rstate_out.stdout) + &text(&rstate_out.stderr)
}

#[tokio::test]
async fn a_complete_in_volumes_is_pushed_as_it_is_written_and_loads_whole() {
    let p = Pg::with(VOLUMES).await;
    let mut src = p.pg.connect("app").await;
    std::fs::write(p.path("media-src/2026/1.jpg"), vec![7u8; 50_000]).unwrap();
    let out = ok(&p.sender(&["complete"]));
    assert!(
        out.contains("push: 1 bundle(s)"),
        "only the final file is left for the push after the job: {out}"
    );
    let (volumes, last) = set_files(&p.ssh.inbox(), 1);
    assert!(volumes.len() >= 2, "{volumes:?}");
    assert!(last.is_some(), "the final file arrived too");
    assert!(outbox_files(&p.path("sstate/outbox")).is_empty());
    p.receive();
    p.assert_same().await;

    exec(
        &mut src,
        "INSERT INTO phone VALUES (30, 'after'); UPDATE report SET msg = 'v', updated_at = now() WHERE id = 7; \
         DELETE FROM report WHERE id = 8;",
    )
    .await;
    ok(&p.sender(&["partial"]));
    p.receive();
    p.assert_same().await;

    // A second complete in volumes replaces the copy; the first set is pruned
    // from sent/ whole.
    exec(&mut src, "DELETE FROM report WHERE id < 50").await;
    ok(&p.sender(&["complete"]));
    p.receive();
    p.assert_same().await;
    let (sent_volumes, sent_last) = set_files(&p.path("sstate/sent"), 3);
    assert_eq!(sent_volumes, set_files(&p.ssh.inbox(), 3).0);
    assert!(sent_last.is_some());
    assert_eq!(set_files(&p.path("sstate/sent"), 1), (vec![], None));
    let mut viz = p.pg.connect("viz").await;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM ferry_receiver.applied ORDER BY seq")
            .fetch_all(&mut viz)
            .await
            .unwrap();
    assert_eq!(applied, vec![1, 2, 3]);
}

#[tokio::test]
async fn the_receiver_loads_volumes_as_they_arrive_and_commits_after_the_final_file() {
    let p = Pg::with(VOLUMES).await;
    ok(&p.sender(&["complete", "--no-push"]));
    let outbox = p.path("sstate/outbox");
    let (volumes, last) = set_files(&outbox, 1);
    for v in &volumes {
        deliver(&outbox.join(v), &p.ssh.inbox());
    }
    let mut load = std::process::Command::new(binary("ferry-receiver"))
        .arg("--config")
        .arg(p.path("receiver.toml"))
        .arg("load")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        load.try_wait().unwrap().is_none(),
        "the load waits for the rest of the set"
    );
    let mut viz = p.pg.connect("viz").await;
    let visible: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'phone'",
    )
    .fetch_one(&mut viz)
    .await
    .unwrap();
    assert_eq!(
        visible, 0,
        "nothing is visible before the set verified whole"
    );
    deliver(&outbox.join(last.unwrap()), &p.ssh.inbox());
    let out = load.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", applied_seqs(&out));
    p.assert_same().await;
}

#[tokio::test]
async fn volumes_that_stop_coming_are_held_and_another_attempt_replaces_them() {
    let p = Pg::with(VOLUMES).await;
    p.write_receiver("1s");
    // Two attempts at complete #1 (two copies of one new state, one chain: as
    // if the first sender died mid-set and the next run took the same seq
    // again). A partial before any complete fails, leaving the state created.
    assert!(!p.sender(&["partial", "--no-push"]).status.success());
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(p.path("sstate"))
        .arg(p.path("a-state"))
        .status()
        .unwrap();
    assert!(copy.success());
    p.write_sender("a.toml", "a-state", p.ssh.port, VOLUMES);
    ok(&run(
        "ferry-sender",
        &p.path("a.toml"),
        &["complete", "--no-push"],
    ));
    ok(&p.sender(&["complete", "--no-push"]));
    let (a_volumes, _) = set_files(&p.path("a-state/outbox"), 1);
    let outbox = p.path("sstate/outbox");
    let (b_volumes, b_last) = set_files(&outbox, 1);
    assert!(a_volumes.len() >= 3);

    // Only attempt A's first volumes arrive: the receiver waits, then gives up
    // without quarantining or applying anything.
    for v in &a_volumes[..2] {
        deliver(&p.path("a-state/outbox").join(v), &p.ssh.inbox());
    }
    let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert_eq!(out.status.code(), Some(75), "{}", applied_seqs(&out));
    assert!(
        applied_seqs(&out).contains("volume 3 did not arrive within 1 s"),
        "{}",
        applied_seqs(&out)
    );
    assert!(outbox_files(&p.path("rstate/quarantine")).is_empty());
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert!(
        applied_seqs(&out).contains("its final file has not"),
        "a stalled set is held, not started: {}",
        applied_seqs(&out)
    );

    // Attempt B's volumes and final file, but its first volume has not replaced
    // A's yet: the sets do not mix.
    for v in &b_volumes[1..] {
        deliver(&outbox.join(v), &p.ssh.inbox());
    }
    deliver(&outbox.join(b_last.as_ref().unwrap()), &p.ssh.inbox());
    let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert_eq!(out.status.code(), Some(75), "{}", applied_seqs(&out));
    assert!(
        applied_seqs(&out).contains("another attempt"),
        "{}",
        applied_seqs(&out)
    );
    deliver(&outbox.join(&b_volumes[0]), &p.ssh.inbox());
    ok(&run("ferry-receiver", &p.path("receiver.toml"), &["load"]));
    p.assert_same().await;
}

#[tokio::test]
async fn a_corrupted_volume_quarantines_the_whole_set_and_retry_brings_it_back() {
    let p = Pg::with(VOLUMES).await;
    ok(&p.sender(&["complete", "--no-push"]));
    let outbox = p.path("sstate/outbox");
    let (volumes, last) = set_files(&outbox, 1);
    let last = last.unwrap();
    for f in volumes.iter().chain([&last]) {
        deliver(&outbox.join(f), &p.ssh.inbox());
    }
    // The biggest volume (a table's data) gets one byte flipped.
    let big = volumes
        .iter()
        .max_by_key(|v| std::fs::metadata(outbox.join(v)).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(p.ssh.inbox().join(big)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(p.ssh.inbox().join(big), &bytes).unwrap();

    let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert_eq!(out.status.code(), Some(1), "{}", applied_seqs(&out));
    assert!(
        applied_seqs(&out).contains(big.as_str()),
        "the error names the volume: {}",
        applied_seqs(&out)
    );
    let quarantine = p.path("rstate/quarantine");
    let (q_volumes, q_last) = set_files(&quarantine, 1);
    assert_eq!(
        q_volumes, volumes,
        "every volume is quarantined with the set"
    );
    assert_eq!(q_last.as_ref(), Some(&last));
    assert_eq!(set_files(&p.ssh.inbox(), 1), (vec![], None));
    let failures = ok(&run(
        "ferry-receiver",
        &p.path("receiver.toml"),
        &["failures"],
    ));
    assert!(failures.contains(&last), "{failures}");

    // Fixed (the good volume back) and retried: the whole set returns and loads.
    ok(&run(
        "ferry-receiver",
        &p.path("receiver.toml"),
        &["retry", &last],
    ));
    assert_eq!(
        set_files(&p.ssh.inbox(), 1),
        (volumes.clone(), Some(last.clone()))
    );
    deliver(&outbox.join(big), &p.ssh.inbox());
    ok(&run("ferry-receiver", &p.path("receiver.toml"), &["load"]));
    p.assert_same().await;
}

#[tokio::test]
async fn the_receiver_daemon_loads_a_complete_in_volumes_as_the_sender_pushes_it() {
    let p = Pg::with(VOLUMES).await;
    let mut cmd = std::process::Command::new(binary("ferry-receiver"));
    cmd.arg("--config")
        .arg(p.path("receiver.toml"))
        .arg("run")
        .env("RUST_LOG", "info");
    let mut d = ferry_tests::daemon::Daemon::spawn(cmd);
    d.wait_for("receiver running", std::time::Duration::from_secs(30));
    std::fs::write(p.path("media-src/2026/1.jpg"), vec![9u8; 20_000]).unwrap();
    ok(&p.sender(&["complete"]));
    d.wait_for("bundle loaded", std::time::Duration::from_secs(60));
    p.assert_same().await;
    let log = d.log();
    assert!(
        log.contains("-000000000001-complete.tar.zst"),
        "the set is applied under its final name: {log}"
    );
    assert!(!log.contains("load failed"), "{log}");
    d.signal("TERM");
    assert!(d.wait_exit(std::time::Duration::from_secs(10)).success());
}

/// Delivery is durable end to end: the receiver acknowledges what it holds in
/// `.ferry-ack-app.json` in its inbox, and the sender sends again from `sent/`
/// what the receiver lacks — a bundle lost from the inbox before a later one
/// arrived (a gap), the newest bundle lost with nothing after it, and a bundle
/// damaged in transit (quarantined, then replaced and applied, its quarantined
/// copy gone). No step by hand.
#[tokio::test]
async fn lost_and_damaged_deliveries_are_sent_again_from_the_acknowledgement() {
    let p = Pg::new().await;
    let mut src = p.pg.connect("app").await;
    ok(&p.sender(&["complete"]));
    p.receive();
    let ack = p.ssh.inbox().join(".ferry-ack-app.json");
    let read_ack = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&ack).expect("the receiver writes its ack")).unwrap()
    };
    assert_eq!(read_ack()["applied_seq"], 1);
    let change =
        |n: u32| format!("UPDATE phone SET model = 'm{n}', updated_at = now() WHERE id = 1");

    // A gap: #2 vanishes from the inbox (a power cut before the directory was
    // on disk), #3 arrives and is held; the ack asks for #2.
    exec(&mut src, &change(2)).await;
    ok(&p.sender(&["partial"]));
    std::fs::remove_file(p.ssh.inbox().join(bundle_name(&p, 2, "partial"))).unwrap();
    exec(&mut src, &change(3)).await;
    ok(&p.sender(&["partial"]));
    let held = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert!(
        text(&held.stdout).contains("waits for bundle #2"),
        "{}",
        text(&held.stdout)
    );
    assert_eq!(read_ack()["wants"], serde_json::json!([2]));
    let out = ok(&p.sender(&["push"]));
    assert!(out.contains("push: 1 bundle(s)"), "{out}");
    p.receive();
    assert_eq!(read_ack()["applied_seq"], 3);
    p.assert_same().await;

    // The newest bundle lost with nothing after it: the receiver scanned its
    // inbox after the delivery and never saw it.
    exec(&mut src, &change(4)).await;
    ok(&p.sender(&["partial"]));
    let four = &bundle_name(&p, 4, "partial");
    std::fs::remove_file(p.ssh.inbox().join(four)).unwrap();
    // As if the delivery was a minute before the receiver's next scan.
    let minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(p.path("sstate/sent").join(four))
        .unwrap()
        .set_modified(minute_ago)
        .unwrap();
    p.receive();
    assert_eq!(read_ack()["seen_seq"], 3);
    let out = ok(&p.sender(&["push"]));
    assert!(out.contains("push: 1 bundle(s)"), "{out}");
    p.receive();
    p.assert_same().await;

    // Damaged in transit: quarantined, asked for, sent again, applied.
    exec(&mut src, &change(5)).await;
    ok(&p.sender(&["partial"]));
    let five = p.ssh.inbox().join(bundle_name(&p, 5, "partial"));
    let mut bytes = std::fs::read(&five).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&five, bytes).unwrap();
    let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(read_ack()["wants"], serde_json::json!([5]));
    ok(&p.sender(&["push"]));
    p.receive();
    p.assert_same().await;
    let failures = text(&run("ferry-receiver", &p.path("receiver.toml"), &["failures"]).stdout);
    assert!(!failures.contains("000000000005"), "{failures}");
    // Nothing more to send: the ack is satisfied.
    let out = ok(&p.sender(&["push"]));
    assert!(
        !out.contains("bundle(s)") || out.contains("push: 0"),
        "{out}"
    );
}

/// A complete killed after its first volumes reached the receiver, its seq then
/// issued again as a partial: the receiver does not wait `volume_wait` (5 min
/// here) for volumes that can never complete. Volumes beside a partial of the
/// same seq, or overtaken by a newer bundle, are an abandoned attempt: `status`
/// says so, the next load removes them and applies the chain at once.
#[tokio::test]
async fn an_abandoned_volume_set_does_not_hold_the_partials_after_it() {
    let p = Pg::with(VOLUMES).await;
    let mut src = p.pg.connect("app").await;
    ok(&p.sender(&["complete"]));
    p.receive();
    // The killed attempt: complete #2, of which only the volumes reached the inbox.
    let volumes = p.killed_complete(2);
    for v in &volumes {
        deliver(&p.path("killed-state/outbox").join(v), &p.ssh.inbox());
    }
    // The real sender goes on: partial #2 (same seq), then partial #3.
    exec(
        &mut src,
        "UPDATE phone SET model = 'x', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&p.sender(&["partial"]));
    exec(
        &mut src,
        "UPDATE phone SET model = 'y', updated_at = now() WHERE id = 2",
    )
    .await;
    ok(&p.sender(&["partial"]));
    let started = std::time::Instant::now();
    p.receive();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "the load waited for the abandoned volumes"
    );
    p.assert_same().await;
    assert_eq!(set_files(&p.ssh.inbox(), 2).0, Vec::<String>::new());

    // Volumes of an abandoned seq overtaken by a newer bundle (the partial of
    // that seq already applied and pruned): status names them, load removes them.
    for v in &volumes {
        let name = v.replace("-000000000002-", "-000000000004-");
        std::fs::copy(
            p.path("killed-state/outbox").join(v),
            p.ssh.inbox().join(name),
        )
        .unwrap();
    }
    exec(
        &mut src,
        "UPDATE phone SET model = 'z', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&p.sender(&["partial", "--no-push"])); // #4, kept back
    exec(
        &mut src,
        "UPDATE phone SET model = 'w', updated_at = now() WHERE id = 2",
    )
    .await;
    ok(&p.sender(&["partial", "--no-push"])); // #5
    deliver(
        &p.path("sstate/outbox").join(bundle_name(&p, 5, "partial")),
        &p.ssh.inbox(),
    );
    let status = run("ferry-receiver", &p.path("receiver.toml"), &["status"]);
    let said = text(&status.stdout);
    assert!(said.contains("abandoned"), "{said}");
    let _ = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert_eq!(set_files(&p.ssh.inbox(), 4).0, Vec::<String>::new());
    ok(&p.sender(&["push"]));
    p.receive();
    p.assert_same().await;
}

/// The window between a job renaming its bundle into the outbox and recording
/// it in the state: a push then must not deliver it (were the sender to die,
/// its seq would be issued again with other rows), and a bundle that did reach
/// `sent/` unrecorded (as older senders could leave it) is adopted at the next
/// start, so its seq is never issued again.
#[tokio::test]
async fn only_recorded_bundles_are_pushed_and_sent_bundles_are_adopted() {
    use sqlx::Connection;
    let p = Pg::new().await;
    let mut src = p.pg.connect("app").await;
    ok(&p.sender(&["complete"]));
    exec(
        &mut src,
        "UPDATE phone SET model = 'x', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&p.sender(&["partial", "--no-push"]));
    let two = &bundle_name(&p, 2, "partial");
    // Undo the record of #2: as if the job were between rename and record.
    let state_url = format!("sqlite://{}", p.path("sstate/state.db").display());
    let forget = || async {
        let mut state = sqlx::SqliteConnection::connect(&state_url).await.unwrap();
        sqlx::query("DELETE FROM bundles WHERE seq = 2")
            .execute(&mut state)
            .await
            .unwrap();
    };
    forget().await;
    let out = ok(&p.sender(&["push"]));
    assert!(!out.contains("1 bundle(s)"), "{out}");
    assert!(
        !p.ssh.inbox().join(two).exists(),
        "an unrecorded bundle was pushed"
    );
    assert!(p.path("sstate/outbox").join(two).exists());

    // Delivered before it was recorded: the next job adopts it from sent/.
    std::fs::rename(
        p.path("sstate/outbox").join(two),
        p.path("sstate/sent").join(two),
    )
    .unwrap();
    exec(
        &mut src,
        "UPDATE phone SET model = 'y', updated_at = now() WHERE id = 2",
    )
    .await;
    ok(&p.sender(&["partial", "--no-push"]));
    assert!(
        p.path("sstate/outbox")
            .join(bundle_name(&p, 3, "partial"))
            .exists(),
        "seq 2 must not be issued again: {:?}",
        outbox_files(&p.path("sstate/outbox"))
    );
    // The receiver gets #2 (asked for by its acknowledgement) and #3.
    ok(&p.sender(&["push"]));
    let _ = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    ok(&p.sender(&["push"]));
    p.receive();
    p.assert_same().await;
}

/// A complete killed after some of its volumes were delivered leaves them in
/// `sent/`; they are not the newest complete: pruning removes them and keeps
/// the last real complete and everything after it.
#[tokio::test]
async fn orphan_volumes_in_sent_never_replace_the_last_complete() {
    let p = Pg::with(VOLUMES).await;
    let mut src = p.pg.connect("app").await;
    ok(&p.sender(&["complete"]));
    let volumes = p.killed_complete(2);
    for v in &volumes {
        std::fs::copy(
            p.path("killed-state/outbox").join(v),
            p.path("sstate/sent").join(v),
        )
        .unwrap();
    }
    exec(
        &mut src,
        "UPDATE phone SET model = 'x', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&p.sender(&["partial"]));
    let sent = outbox_files(&p.path("sstate/sent"));
    assert!(
        sent.iter().any(|f| f == &bundle_name(&p, 1, "complete")),
        "the last real complete is kept: {sent:?}"
    );
    assert!(sent.iter().any(|f| f == &bundle_name(&p, 2, "partial")));
    assert_eq!(
        set_files(&p.path("sstate/sent"), 2).0,
        Vec::<String>::new(),
        "{sent:?}"
    );
    p.receive();
    p.assert_same().await;
}

/// A sender whose state directory was removed starts a new chain at #1. Its
/// bundles never collide with the old chain's in the inbox, the receiver never
/// takes them for re-deliveries: a partial of the new chain is held with an
/// ERROR naming the cause and the fix, and the new chain's complete resyncs the
/// copy (a WARN), after which its partials apply. No manual step.
#[tokio::test]
async fn a_sender_that_lost_its_state_resyncs_the_copy() {
    let p = Pg::new().await;
    let mut src = p.pg.connect("app").await;
    ok(&p.sender(&["complete"]));
    for i in 0..2 {
        exec(
            &mut src,
            &format!("UPDATE phone SET model = 'old {i}', updated_at = now() WHERE id = 1"),
        )
        .await;
        ok(&p.sender(&["partial"]));
    }
    p.receive();
    p.assert_same().await;
    let old_chain = ferry_tests::chain_in(&p.path("sstate/sent"));

    std::fs::remove_dir_all(p.path("sstate")).unwrap();
    exec(
        &mut src,
        "DELETE FROM report WHERE id <= 10; UPDATE phone SET model = 'new', updated_at = now() WHERE id = 2",
    )
    .await;
    ok(&p.sender(&["complete", "--no-push"]));
    exec(
        &mut src,
        "UPDATE phone SET model = 'newer', updated_at = now() WHERE id = 2",
    )
    .await;
    ok(&p.sender(&["partial", "--no-push"]));
    let new_chain = ferry_tests::chain_in(&p.path("sstate/outbox"));
    assert!(new_chain > old_chain, "{new_chain} after {old_chain}");

    // Only the new chain's partial #2 arrives: held, with an ERROR and the fix.
    let two = bundle_name(&p, 2, "partial");
    std::fs::copy(p.path("sstate/outbox").join(&two), p.ssh.inbox().join(&two)).unwrap();
    let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("ERROR")
            && err.contains("the sender's state was replaced")
            && err.contains("ferry-sender complete"),
        "{err}"
    );
    let status = text(&run("ferry-receiver", &p.path("receiver.toml"), &["status"]).stdout);
    assert!(status.contains(&two), "{status}");
    // The old chain's #2 is still in the inbox, beside the new one.
    let (finals, _) = inbox(&p.ssh, "");
    assert!(
        finals
            .iter()
            .any(|f| f.contains(&old_chain) && f.contains("-000000000002-"))
            && finals.contains(&two),
        "{finals:?}"
    );

    // The new chain's complete arrives: a resync, then its partial.
    ok(&p.sender(&["push"]));
    let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the sender's state was replaced (a new chain"),
        "{}",
        text(&out.stderr)
    );
    p.assert_same().await;
    // And it goes on: the next partial applies.
    exec(
        &mut src,
        "UPDATE phone SET model = 'newest', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&p.sender(&["partial"]));
    p.receive();
    p.assert_same().await;
}

/// Whoever can write into the inbox must not be able to rewrite the copy: with
/// `[senders]` the receiver applies only the senders named there, and of a
/// sender with a `public_key` only bundles signed with its key (the sender
/// signs with its push key by default). A foreign sender, a forged bundle of
/// the real sender signed with another key, and an unsigned one are each
/// refused with the reason and quarantined; nothing of them is applied.
#[tokio::test]
async fn only_named_senders_and_their_signatures_are_applied() {
    let p = Pg::new().await;
    p.pg.create_db(
        "evil",
        &format!("{APP}\nUPDATE phone SET model = 'evil'; DELETE FROM report;"),
    )
    .await;
    let pubkey = std::fs::read_to_string(p.ssh.client_key.with_extension("pub")).unwrap();
    let receiver = std::fs::read_to_string(p.path("receiver.toml")).unwrap()
        + &format!("[senders.app]\npublic_key = {:?}\n", pubkey.trim());
    std::fs::write(p.path("receiver.toml"), receiver).unwrap();
    let check = text(&run("ferry-receiver", &p.path("receiver.toml"), &["check"]).stdout);
    assert!(
        check.contains("sender \"app\": only bundles signed with its key are applied"),
        "{check}"
    );
    let check = text(&p.sender(&["check"]).stdout);
    assert!(check.contains("bundles are signed with"), "{check}");
    ok(&p.sender(&["complete"]));
    p.receive();
    p.assert_same().await;

    // Bundles made from the "evil" database, each delivered into the inbox.
    let other_key = p.path("other_key");
    ferry_tests::sshd::keygen(&other_key, "ed25519");
    let forge = |name: &str, sender_id: &str, bundle: &str| -> String {
        let config = p.path(&format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "sender_id = {sender_id:?}\nstate_dir = {:?}\n[source]\nurl = {:?}\n\
                 [partial]\ndeletes = \"off\"\n[bundle]\n{bundle}",
                p.path(name),
                p.pg.url("evil"),
            ),
        )
        .unwrap();
        ok(&run("ferry-sender", &config, &["complete", "--no-push"]));
        let outbox = p.path(&format!("{name}/outbox"));
        let file = outbox_files(&outbox).pop().unwrap();
        std::fs::copy(outbox.join(&file), p.ssh.inbox().join(&file)).unwrap();
        file
    };
    let cases = [
        (
            ("intruder", "intruder", "sign = false\n".to_owned()),
            "sender \"intruder\" is not one this receiver accepts",
        ),
        (
            ("forged", "app", format!("signing_key = {other_key:?}\n")),
            "signature does not match `[senders.app] public_key`",
        ),
        (
            ("unsigned", "app", "sign = false\n".to_owned()),
            "the bundle is not signed",
        ),
    ];
    for ((name, sender_id, bundle), why) in &cases {
        let file = forge(name, sender_id, bundle);
        let out = run("ferry-receiver", &p.path("receiver.toml"), &["load"]);
        let err = text(&out.stderr) + &text(&out.stdout);
        assert!(err.contains(why), "{file}: {err}");
        assert!(
            p.path("rstate/quarantine").join(&file).exists(),
            "{file} not quarantined: {err}"
        );
        p.assert_same().await;
    }
    // The real sender goes on.
    let mut src = p.pg.connect("app").await;
    exec(
        &mut src,
        "UPDATE phone SET model = 'real', updated_at = now() WHERE id = 1",
    )
    .await;
    ok(&p.sender(&["partial"]));
    p.receive();
    p.assert_same().await;
}
