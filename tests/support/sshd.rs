//! A private OpenSSH `sshd` for tests: its own config, host key and
//! authorized_keys, on a free loopback port, with a chrooted, SFTP-only account
//! (`ChrootDirectory` + `ForceCommand internal-sftp`), as a receiver host would
//! have. sshd needs root for that, so these tests run as root (CI does).
//!
//! Layout: `/run/ferry-tests/<id>/` (root-owned, 0755 all the way up, as
//! sshd's chroot rule demands) holds the keys and config; `root/` is the chroot
//! and `root/inbox` belongs to the SFTP user.
//!
//! Each server has an account of its own (`ferry-t<pid>-<n>`), created with a
//! usable password field (`useradd` leaves it locked, `!`, and OpenSSH with
//! `UsePAM no` then refuses even key logins) and removed when the server is
//! dropped, so no run depends on what an earlier one left behind.
//! `tests/clean-machine` removes the accounts of a run that was killed.

use crate::pg::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The prefix of the SFTP-only accounts the tests create (one per server).
pub const SFTP_USER_PREFIX: &str = "ferry-t";

pub struct SshServer {
    pub dir: PathBuf,
    /// The SFTP-only account the sender logs in as.
    pub user: String,
    pub port: u16,
    child: Option<Child>,
    pub client_key: PathBuf,
    pub known_hosts: PathBuf,
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").arg(flag).arg(user).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Creates the SFTP account `user` (a system account without a home or a
/// shell, its password field `*`: no password works, keys do); returns its uid
/// and gid.
fn create_sftp_user(user: &str) -> (u32, u32) {
    if user_ids(user).is_some() {
        remove_user(user); // a leftover of a killed run with the same pid
    }
    run(Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg(user));
    run(Command::new("usermod").args(["-p", "*"]).arg(user));
    user_ids(user).unwrap_or_else(|| panic!("could not create the user {user}"))
}

fn remove_user(user: &str) {
    let _ = Command::new("userdel").arg(user).output();
    let _ = Command::new("groupdel").arg(user).output();
}

/// Every process below `pid` (from /proc).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|v| v.parse().ok())
        {
            parents.push((p, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

pub fn keygen(path: &Path, kind: &str) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", "", "-f"])
        .arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
}

impl SshServer {
    pub fn start() -> Self {
        let uid = run(Command::new("id").arg("-u"));
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "the SFTP tests start a private sshd with a chrooted account, which needs root: run them as root (CI does)"
        );
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "/usr/sbin/sshd is missing: apt-get install -y openssh-server (tests/run does)"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let user = format!("{SFTP_USER_PREFIX}{}-{n}", std::process::id());
        let (uid, gid) = create_sftp_user(&user);
        let dir = PathBuf::from(format!("/run/ferry-tests/{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/inbox")).expect("sshd test dir");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        use std::os::unix::fs::PermissionsExt;
        for d in [
            "/run/ferry-tests",
            dir.to_str().expect("utf-8"),
            dir.join("root").to_str().expect("utf-8"),
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::os::unix::fs::chown(dir.join("root/inbox"), Some(uid), Some(gid))
            .expect("chown inbox");
        keygen(&dir.join("host_key"), "ed25519");
        let client_key = dir.join("client_key");
        keygen(&client_key, "ed25519");
        let pubkey = std::fs::read_to_string(client_key.with_extension("pub")).expect("pub key");
        std::fs::write(dir.join("authorized_keys"), pubkey).expect("authorized_keys");
        let mut s = Self {
            known_hosts: dir.join("known_hosts"),
            dir,
            user,
            port: free_port(),
            child: None,
            client_key,
        };
        s.trust_current_host_key();
        s.launch();
        s
    }

    /// Writes known_hosts with the server's current host key.
    pub fn trust_current_host_key(&self) {
        let key = std::fs::read_to_string(self.dir.join("host_key.pub")).expect("host key");
        std::fs::write(
            &self.known_hosts,
            format!("[127.0.0.1]:{} {}\n", self.port, key.trim()),
        )
        .expect("known_hosts");
    }

    /// Adds an RSA client key to authorized_keys; returns its path.
    pub fn add_rsa_client_key(&self) -> PathBuf {
        let key = self.dir.join("client_rsa");
        keygen(&key, "rsa");
        let mut keys = std::fs::read_to_string(self.dir.join("authorized_keys")).expect("keys");
        keys.push_str(&std::fs::read_to_string(key.with_extension("pub")).expect("pub"));
        std::fs::write(self.dir.join("authorized_keys"), keys).expect("authorized_keys");
        key
    }

    /// The inbox as the receiver sees it (the chroot's `inbox`).
    pub fn inbox(&self) -> PathBuf {
        self.dir.join("root/inbox")
    }

    fn launch(&mut self) {
        let d = self.dir.display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile none\n\
             AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nStrictModes no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             Subsystem sftp internal-sftp\nAllowUsers {user}\n\
             Match User {user}\n  ChrootDirectory {d}/root\n  ForceCommand internal-sftp\n\
             \x20 AllowTcpForwarding no\n  X11Forwarding no\n",
            port = self.port,
            user = self.user
        );
        std::fs::write(self.dir.join("sshd_config"), config).expect("sshd_config");
        let log = std::fs::File::create(self.dir.join("sshd.log")).expect("sshd log");
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("sshd exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// Stops the listener and every session it started (kill -9: a crash or a
    /// cut link, from the client's side).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Sessions are processes of their own that outlive the listener.
            for pid in descendants(c.id()) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Replaces the host key (as a reinstalled or impostor server would) and restarts.
    pub fn change_host_key(&mut self) {
        keygen(&self.dir.join("host_key"), "ed25519");
        self.restart();
    }

    /// The sender's `[push]` section for this server.
    pub fn push_section(&self, remote_dir: &str, key: &Path, port: u16) -> String {
        format!(
            "[push]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{}\"\nkey_file = {:?}\n\
             known_hosts = {:?}\nremote_dir = {remote_dir:?}\nattempts = 1\nconnect_timeout = \"10s\"\n",
            self.user, key, self.known_hosts
        )
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_user(&self.user);
    }
}
