//! Delivery of outbox bundles to the receiver's inbox over SFTP (russh +
//! russh-sftp), to a stock OpenSSH server with nothing but an SFTP account.
//!
//! - The server's host key must be in `push.known_hosts`; an unknown or changed
//!   key is refused with its fingerprint and the exact line to add.
//! - A bundle is written as `.<name>.part` (the receiver ignores leading dots),
//!   fsynced where the server offers `fsync@openssh.com`, renamed to its final
//!   name (`posix-rename@openssh.com`, atomic even over an existing file), and
//!   its size checked. Only then does it leave the outbox (for `sent/`).
//! - Bundles go in sequence order; the first failure stops the round, so the
//!   receiver never sees a later bundle before an earlier one from one push.
//! - Transient failures are retried with doubling, jittered, capped waits.
//!   Whatever is not delivered stays in the outbox for the next push.

use crate::config::{Config, PushConfig};
use crate::outbox::{self, OutboxError, Pending};
use crate::state::{State, StateError};
use ferry_common::ack::{Ack, ack_file_name};
use ferry_common::health::JobRecord;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey};
use russh_sftp::client::{RawSftpSession, SftpSession};
use russh_sftp::protocol::{Packet, StatusCode};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The size of one SFTP WRITE: OpenSSH's sftp-server takes up to 255 KiB of data.
const WRITE_BYTES: usize = 255 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(
        "could not reach the SFTP server {target}: {message}; check `push.host`/`push.port` and that sshd is running there"
    )]
    Connect { target: String, message: String },
    #[error(
        "the SFTP server {target} presented a host key that is not in {known_hosts}: {fingerprint}. \
         If that is the receiver's key (compare with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on it), add this line to {known_hosts}:\n{line}"
    )]
    UnknownHostKey {
        target: String,
        known_hosts: String,
        fingerprint: String,
        line: String,
    },
    #[error(
        "HOST KEY CHANGED: the SFTP server {target} presented {fingerprint}, which differs from line {at} of {known_hosts}. \
         Nothing was sent. This may be an attack; if the receiver's key was really replaced, replace line {at} with:\n{line}"
    )]
    ChangedHostKey {
        target: String,
        known_hosts: String,
        fingerprint: String,
        at: usize,
        line: String,
    },
    #[error(
        "could not read the known hosts file {known_hosts} ({message}); create it with the receiver's key, e.g.:\n{line}"
    )]
    KnownHosts {
        known_hosts: String,
        message: String,
        line: String,
    },
    #[error("the SSH key `push.key_file`: {message}")]
    Key { path: String, message: String },
    #[error(
        "the SFTP server {target} refused the key {key} for user {user:?} (Permission denied (publickey)). Causes: its public key ({key}.pub) is not in that account's authorized_keys; or the account is locked (`!` in /etc/shadow, what useradd leaves: sshd without PAM then refuses every key; run `usermod -p '*' {user}` on the receiver); or sshd's AllowUsers/Match rules exclude it (see the server's log)"
    )]
    AuthRejected {
        target: String,
        user: String,
        key: String,
    },
    #[error("SFTP {doing} on {target}: {message}")]
    Sftp {
        target: String,
        doing: String,
        message: String,
        transient: bool,
    },
    #[error("reading {}: {source}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("another push is running ({0}); this one is not needed")]
    Busy(ferry_common::lock::LockError),
    #[error(transparent)]
    Bucket(ferry_common::bucket::BucketError),
    #[error("{0}")]
    Config(String),
}

impl PushError {
    /// Whether trying again later can help without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            PushError::Connect { .. } | PushError::Busy(_) => true,
            PushError::Sftp { transient, .. } => *transient,
            PushError::Bucket(e) => e.transient,
            _ => false,
        }
    }
}

/// What one push delivered.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PushOutcome {
    pub delivered: Vec<String>,
    pub bytes: u64,
    pub duration_ms: u64,
}

/// What the host key check found, kept by the handler for the error message.
enum Verdict {
    Unknown(PublicKey),
    Changed(PublicKey, usize),
    Unreadable(PublicKey, String),
}

struct Client {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    verdict: Arc<Mutex<Option<Verdict>>>,
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Certificates are not advertised (the default): this is a plain key.
        let key = &key.public_key();
        let verdict = match russh::keys::check_known_hosts_path(
            &self.host,
            self.port,
            key,
            &self.known_hosts,
        ) {
            Ok(true) => return Ok(true),
            Ok(false) => Verdict::Unknown(key.clone()),
            Err(russh::keys::Error::KeyChanged { line }) => Verdict::Changed(key.clone(), line),
            Err(e) => Verdict::Unreadable(key.clone(), e.to_string()),
        };
        if let Ok(mut v) = self.verdict.lock() {
            *v = Some(verdict);
        }
        Ok(false)
    }
}

/// An open SFTP link: one session for file data, one raw session for the
/// requests russh-sftp has no wrapper for (`posix-rename@openssh.com`).
pub struct Link {
    handle: russh::client::Handle<Client>,
    sftp: SftpSession,
    raw: RawSftpSession,
    posix_rename: bool,
    target: String,
    dir: String,
}

/// `host` or `[host]:port`, as known_hosts writes it.
fn host_pattern(p: &PushConfig) -> String {
    if p.port == 22 {
        p.host.clone()
    } else {
        format!("[{}]:{}", p.host, p.port)
    }
}

fn known_hosts_line(p: &PushConfig, key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    let text = key
        .to_openssh()
        .unwrap_or_else(|_| "<unprintable key>".into());
    format!("{} {}", host_pattern(p), text.trim_end())
}

fn sftp_error(
    target: &str,
    doing: impl Into<String>,
) -> impl FnOnce(russh_sftp::client::error::Error) -> PushError + '_ {
    let doing = doing.into();
    move |e| {
        use russh_sftp::client::error::Error as E;
        let transient = match &e {
            E::Status(s) => !matches!(
                s.status_code,
                StatusCode::PermissionDenied | StatusCode::NoSuchFile | StatusCode::OpUnsupported
            ),
            _ => true,
        };
        PushError::Sftp {
            target: target.to_owned(),
            doing,
            message: e.to_string(),
            transient,
        }
    }
}

impl Link {
    /// Connects, verifies the host key, authenticates and opens SFTP.
    pub async fn open(p: &PushConfig) -> Result<Self, PushError> {
        let target = format!("{}:{}", p.host, p.port);
        let key = crate::keys::load(&p.key_file).map_err(|message| PushError::Key {
            path: p.key_file.display().to_string(),
            message,
        })?;
        let mut preferred = russh::Preferred::default();
        // aes256-gcm measured faster than the default chacha20 on AES-NI machines.
        let mut ciphers = vec![russh::cipher::AES_256_GCM];
        ciphers.extend(
            preferred
                .cipher
                .iter()
                .filter(|c| **c != russh::cipher::AES_256_GCM),
        );
        preferred.cipher = ciphers.into();
        let config = Arc::new(russh::client::Config {
            preferred,
            inactivity_timeout: Some(p.request_timeout.max(p.keepalive * 4)),
            keepalive_interval: Some(p.keepalive),
            keepalive_max: 3,
            nodelay: true,
            window_size: 16 << 20,
            ..Default::default()
        });
        let verdict = Arc::new(Mutex::new(None));
        let client = Client {
            host: p.host.clone(),
            port: p.port,
            known_hosts: p.known_hosts.clone(),
            verdict: verdict.clone(),
        };
        let connect_err = |message: String| PushError::Connect {
            target: target.clone(),
            message,
        };
        let connected = tokio::time::timeout(
            p.connect_timeout,
            russh::client::connect(config, (p.host.as_str(), p.port), client),
        )
        .await;
        let mut handle = match connected {
            Err(_) => {
                return Err(connect_err(format!(
                    "no answer within {}",
                    humantime::format_duration(p.connect_timeout)
                )));
            }
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let known_hosts = p.known_hosts.display().to_string();
                let found = verdict.lock().ok().and_then(|mut v| v.take());
                return Err(match found {
                    Some(Verdict::Unknown(k)) => PushError::UnknownHostKey {
                        target,
                        known_hosts,
                        fingerprint: k.fingerprint(HashAlg::Sha256).to_string(),
                        line: known_hosts_line(p, &k),
                    },
                    Some(Verdict::Changed(k, at)) => PushError::ChangedHostKey {
                        target,
                        known_hosts,
                        fingerprint: k.fingerprint(HashAlg::Sha256).to_string(),
                        at,
                        line: known_hosts_line(p, &k),
                    },
                    Some(Verdict::Unreadable(k, message)) => PushError::KnownHosts {
                        known_hosts,
                        message,
                        line: known_hosts_line(p, &k),
                    },
                    None => connect_err(e.to_string()),
                });
            }
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .flatten();
        let auth = tokio::time::timeout(
            p.connect_timeout,
            handle.authenticate_publickey(&p.user, PrivateKeyWithHashAlg::new(Arc::new(key), hash)),
        )
        .await
        .map_err(|_| connect_err("authentication timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
        if !auth.success() {
            return Err(PushError::AuthRejected {
                target,
                user: p.user.clone(),
                key: p.key_file.display().to_string(),
            });
        }
        let sftp_cfg = || russh_sftp::client::Config {
            max_write_packet_len: 256 * 1024,
            request_timeout_secs: p.request_timeout.as_secs().max(1),
            ..Default::default()
        };
        let mut channels = Vec::new();
        for _ in 0..2 {
            let channel = handle
                .channel_open_session()
                .await
                .map_err(|e| connect_err(format!("opening a session channel: {e}")))?;
            channel
                .request_subsystem(true, "sftp")
                .await
                .map_err(|e| connect_err(format!("starting the sftp subsystem: {e}")))?;
            channels.push(channel);
        }
        let (c2, c1) = (
            channels.pop().expect("two channels"),
            channels.pop().expect("two channels"),
        );
        let sftp = SftpSession::new_with_config(c1.into_stream(), sftp_cfg())
            .await
            .map_err(sftp_error(&target, "starting the session"))?;
        let raw = RawSftpSession::new_with_config(c2.into_stream(), sftp_cfg());
        let version = raw
            .init()
            .await
            .map_err(sftp_error(&target, "starting the session"))?;
        let posix_rename = version
            .extensions
            .get("posix-rename@openssh.com")
            .is_some_and(|v| v == "1");
        let link = Self {
            handle,
            sftp,
            raw,
            posix_rename,
            target,
            dir: p.remote_dir.trim_end_matches('/').to_owned(),
        };
        link.ensure_dir().await?;
        Ok(link)
    }

    /// Creates the remote directory (and its parents) when missing.
    async fn ensure_dir(&self) -> Result<(), PushError> {
        if self.sftp.metadata(&self.dir).await.is_ok() {
            return Ok(());
        }
        let mut path = String::new();
        if self.dir.starts_with('/') {
            path.push('/');
        }
        for part in self.dir.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if !path.is_empty() && !path.ends_with('/') {
                path.push('/');
            }
            path.push_str(part);
            if self.sftp.metadata(&path).await.is_err() {
                self.sftp.create_dir(&path).await.map_err(|e| PushError::Sftp {
                    target: self.target.clone(),
                    doing: format!("creating the remote directory {path:?}"),
                    message: format!(
                        "{e}; create `push.remote_dir` on the receiver, writable by the SFTP user{}",
                        if self.dir.starts_with('/') {
                            ". Paths are inside the account's SFTP chroot: for an inbox at \
                             /srv/ferry/inbox on the host with ChrootDirectory /srv/ferry, write \
                             `remote_dir = \"inbox\"`, not the host path"
                        } else {
                            ""
                        }
                    ),
                    transient: false,
                })?;
                tracing::info!(dir = %path, "created the remote directory");
            }
        }
        Ok(())
    }

    /// Writes and removes a probe file: the remote directory is writable.
    pub async fn probe(&self) -> Result<(), PushError> {
        let probe = format!("{}/.ferry-probe-{}", self.dir, std::process::id());
        let mut f = self
            .sftp
            .create(&probe)
            .await
            .map_err(sftp_error(&self.target, format!("writing {probe}")))?;
        f.write_all(b"ferry")
            .await
            .and(f.shutdown().await)
            .map_err(|e| PushError::Sftp {
                target: self.target.clone(),
                doing: format!("writing {probe}"),
                message: e.to_string(),
                transient: true,
            })?;
        self.sftp
            .remove_file(&probe)
            .await
            .map_err(sftp_error(&self.target, format!("removing {probe}")))
    }

    /// Uploads one bundle: temporary name, fsync, atomic rename, size check.
    /// Returns its size and the server's modification time of it (the
    /// receiver's clock, as [`Ack::scanned_at`] is), for [`mark_delivered`].
    pub async fn upload(
        &self,
        local: &Path,
        name: &str,
    ) -> Result<(u64, Option<std::time::SystemTime>), PushError> {
        let size = std::fs::metadata(local)
            .map_err(|source| PushError::Local {
                path: local.to_owned(),
                source,
            })?
            .len();
        let fin = format!("{}/{name}", self.dir);
        let tmp = format!("{}/.{name}.part", self.dir);
        let started = Instant::now();
        let mut src = tokio::fs::File::open(local)
            .await
            .map_err(|source| PushError::Local {
                path: local.to_owned(),
                source,
            })?;
        let dst = self
            .sftp
            .create(&tmp)
            .await
            .map_err(sftp_error(&self.target, format!("creating {tmp}")))?;
        match self
            .write_part(&mut src, dst, local, name, &tmp, size)
            .await
        {
            Ok(timings) => {
                self.finish_upload(name, &tmp, &fin, size, started, timings)
                    .await
            }
            Err(e) => {
                // Free what the failed write took (a full disk most of all);
                // the next attempt writes the same name from the start anyway.
                let removed =
                    tokio::time::timeout(Duration::from_secs(5), self.sftp.remove_file(&tmp)).await;
                if !matches!(removed, Ok(Ok(()))) {
                    tracing::debug!(file = %tmp, "could not remove the partial upload; the next attempt overwrites it");
                }
                Err(e)
            }
        }
    }

    /// Writes the bundle into the open temporary file, syncs and closes it;
    /// returns when writing and syncing ended.
    async fn write_part(
        &self,
        src: &mut tokio::fs::File,
        mut dst: russh_sftp::client::fs::File,
        local: &Path,
        name: &str,
        tmp: &str,
        size: u64,
    ) -> Result<(Instant, Instant), PushError> {
        let io_err = |doing: &str, e: std::io::Error| {
            let mut message = e.to_string();
            // OpenSSH answers ENOSPC and EDQUOT with a bare SSH_FX_FAILURE.
            if message.contains("Failure") {
                message.push_str(
                    "; the receiver's file system may be full or the SFTP account over its \
                     quota: free space in the inbox (the partial upload was removed)",
                );
            }
            PushError::Sftp {
                target: self.target.clone(),
                doing: format!("{doing} {tmp}"),
                message,
                transient: true,
            }
        };
        let bar = ferry_common::service::progress_bar(
            size,
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        );
        bar.set_message(name.to_owned());
        let mut buf = vec![0u8; WRITE_BYTES];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = src
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|source| PushError::Local {
                        path: local.to_owned(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            dst.write_all(&buf[..filled])
                .await
                .map_err(|e| io_err("writing", e))?;
            bar.inc(filled as u64);
        }
        bar.finish_and_clear();
        let written = Instant::now();
        // flush: every write acknowledged, then fsync@openssh.com where offered.
        dst.flush().await.map_err(|e| io_err("syncing", e))?;
        let synced = Instant::now();
        dst.shutdown().await.map_err(|e| io_err("closing", e))?;
        Ok((written, synced))
    }

    /// Renames the synced temporary file to the bundle's name and checks its
    /// size on the server.
    async fn finish_upload(
        &self,
        name: &str,
        tmp: &str,
        fin: &str,
        size: u64,
        started: Instant,
        (written, synced): (Instant, Instant),
    ) -> Result<(u64, Option<std::time::SystemTime>), PushError> {
        let (written, synced) = (written - started, synced - started);
        self.rename(tmp, fin).await?;
        let meta = self
            .sftp
            .metadata(fin)
            .await
            .map_err(sftp_error(&self.target, format!("checking {fin}")))?;
        let got = meta.size;
        if got != Some(size) {
            return Err(PushError::Sftp {
                target: self.target.clone(),
                doing: format!("checking {fin}"),
                message: format!("the server has {got:?} bytes, the bundle has {size}"),
                transient: true,
            });
        }
        tracing::info!(
            bundle = name,
            bytes = size,
            ms = started.elapsed().as_millis() as u64,
            write_ms = written.as_millis() as u64,
            sync_ms = (synced - written).as_millis() as u64,
            "bundle delivered"
        );
        let remote_mtime = meta
            .mtime
            .map(|secs| std::time::UNIX_EPOCH + Duration::from_secs(secs.into()));
        Ok((size, remote_mtime))
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), PushError> {
        let doing = format!("renaming {from} to {to}");
        if self.posix_rename {
            let mut data = Vec::with_capacity(8 + from.len() + to.len());
            for s in [from, to] {
                data.extend_from_slice(&(s.len() as u32).to_be_bytes());
                data.extend_from_slice(s.as_bytes());
            }
            return match self
                .raw
                .extended("posix-rename@openssh.com", data)
                .await
                .map_err(sftp_error(&self.target, doing.clone()))?
            {
                Packet::Status(s) if s.status_code == StatusCode::Ok => Ok(()),
                Packet::Status(s) => Err(sftp_error(&self.target, doing)(s.into())),
                _ => Err(PushError::Sftp {
                    target: self.target.clone(),
                    doing,
                    message: "unexpected reply".into(),
                    transient: true,
                }),
            };
        }
        // Plain SFTP rename refuses an existing target: a re-delivery replaces it.
        if self.sftp.metadata(to).await.is_ok() {
            let _ = self.sftp.remove_file(to).await;
        }
        self.sftp
            .rename(from, to)
            .await
            .map_err(sftp_error(&self.target, doing))
    }

    /// The receiver's acknowledgement to `sender` (see [`ferry_common::ack`]);
    /// `None` when there is none (a receiver that writes none, or none yet) or
    /// it cannot be read, which only means nothing is sent again.
    pub async fn read_ack(&self, sender: &str) -> Option<Ack> {
        let path = format!("{}/{}", self.dir, ack_file_name(sender));
        let bytes = match self.sftp.read(&path).await {
            Ok(b) => b,
            Err(russh_sftp::client::error::Error::Status(s))
                if s.status_code == StatusCode::NoSuchFile =>
            {
                return None;
            }
            Err(error) => {
                tracing::warn!(file = %path, %error, "could not read the receiver's acknowledgement");
                return None;
            }
        };
        match serde_json::from_slice::<Ack>(&bytes) {
            Ok(ack) if ack.sender_id == sender => Some(ack),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(file = %path, %error, "the receiver's acknowledgement is not valid JSON");
                None
            }
        }
    }

    pub async fn close(self) {
        let _ = self.sftp.close().await;
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "done", "en")
            .await;
    }
}

/// Delivers the outbox to wherever the configuration says: `[push]` (SFTP) or
/// `[bucket]` (object storage); `None` without either.
pub async fn deliver_pending(config: &Config) -> Option<Result<PushOutcome, PushError>> {
    match (&config.push, &config.bucket) {
        (Some(p), _) => Some(push_pending(config, p).await),
        (None, Some(b)) => Some(crate::bucket_push::push(config, b).await),
        (None, None) => None,
    }
}

/// Delivers every pending bundle in sequence order, retrying transient failures
/// up to `push.attempts` times. Records the outcome for `status`.
pub async fn push_pending(config: &Config, p: &PushConfig) -> Result<PushOutcome, PushError> {
    let started = Instant::now();
    // Two pushes at once would upload the same bundle twice and race to move it.
    let _push = ferry_common::lock::StateLock::acquire_named(&config.state_dir, "push.lock")
        .map_err(PushError::Busy)?;
    let mut state = State::open(&config.state_dir).await?;
    let mut outcome = PushOutcome::default();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        match push_round(config, p, &mut state, &mut outcome).await {
            Ok(()) => break Ok(()),
            Err(e) if e.is_transient() && attempt < p.attempts => {
                let wait = backoff(attempt, p.backoff_max);
                tracing::warn!(attempt, error = %e, wait_ms = wait.as_millis() as u64, "push failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => break Err(e),
        }
    };
    outcome.duration_ms = started.elapsed().as_millis() as u64;
    record(config, &mut state, &result, &outcome).await?;
    let recorded = state.last(None).await?.map_or(0, |b| b.seq);
    prune_sent(config, recorded)?;
    result.map(|()| outcome)
}

/// Records how a push (over SFTP or into a bucket) ended: for `status` (the
/// state's last push, the health record) and for the metrics.
pub(crate) async fn record(
    config: &Config,
    state: &mut State,
    result: &Result<(), PushError>,
    outcome: &PushOutcome,
) -> Result<(), PushError> {
    state
        .record_push(result.as_ref().err().map(|e| e.to_string()))
        .await?;
    crate::metrics::get().push(
        result.is_ok(),
        outcome.delivered.len(),
        outcome.bytes,
        outcome.duration_ms as f64 / 1000.0,
    );
    match result {
        Ok(()) => JobRecord::record_ok(&config.state_dir, "push"),
        Err(e) => {
            JobRecord::record_failure(&config.state_dir, "push", &e.to_string(), !e.is_transient())
        }
    }
    Ok(())
}

/// One connection: delivers pending bundles in order until done or an error.
async fn push_round(
    config: &Config,
    p: &PushConfig,
    state: &mut State,
    outcome: &mut PushOutcome,
) -> Result<(), PushError> {
    let pending = deliverable(config, state).await?;
    let chain = state.chain().await?;
    // Delivered bundles the receiver may need again (see `resend`).
    let delivered = !outbox::list(&config.sent_dir(), &config.sender_id)?.is_empty();
    if pending.is_empty() && !delivered {
        return Ok(());
    }
    let link = Link::open(p).await?;
    let result = async {
        match link.read_ack(&config.sender_id).await {
            Some(ack) if ack.chain == chain => resend(config, &link, &ack, state, outcome).await?,
            // The copy follows another chain (this state replaced an earlier
            // one): its numbers say nothing about this chain's bundles.
            Some(ack) => {
                tracing::info!(receiver_chain = %ack.chain, chain = %chain, "the receiver follows another chain of this sender; it resyncs with this chain's next complete")
            }
            None => {}
        }
        deliver(config, &link, pending, outcome).await
    }
    .await;
    link.close().await;
    result
}

/// The outbox's bundles a push may deliver, in order: only what the state has
/// recorded (a job renames a bundle into the outbox a moment before it
/// records it, and a bundle delivered but never recorded could have its seq
/// issued again with other rows), and only this state's chain (files another
/// state left are never sent). Volumes of a complete still being written go
/// out: the receiver commits nothing before the set's final file, which is
/// only pushed once recorded.
pub(crate) async fn deliverable(
    config: &Config,
    state: &mut State,
) -> Result<Vec<Pending>, PushError> {
    let mut pending = outbox::list(&config.outbox(), &config.sender_id)?;
    let recorded = state.last(None).await?.map_or(0, |b| b.seq);
    let chain = state.chain().await?;
    pending.retain(|b| b.chain == chain && (b.volume.is_some() || b.seq <= recorded));
    Ok(pending)
}

/// Moves a delivered bundle from the outbox into `sent/`; returns its new path.
pub(crate) fn move_to_sent(config: &Config, file: &str) -> Result<std::path::PathBuf, PushError> {
    let sent = config.sent_dir();
    std::fs::create_dir_all(&sent).map_err(|source| PushError::Local {
        path: sent.clone(),
        source,
    })?;
    let local = config.outbox().join(file);
    let kept = sent.join(file);
    ferry_common::durable::commit_rename(&local, &kept).map_err(|source| PushError::Local {
        path: local,
        source,
    })?;
    Ok(kept)
}

/// Uploads `pending` in order over `link`, moving each to `sent/` once delivered.
async fn deliver(
    config: &Config,
    link: &Link,
    pending: Vec<Pending>,
    outcome: &mut PushOutcome,
) -> Result<(), PushError> {
    for b in pending {
        let local = config.outbox().join(&b.file);
        let (bytes, remote_mtime) = link.upload(&local, &b.file).await?;
        let kept = move_to_sent(config, &b.file)?;
        mark_delivered(&kept, remote_mtime);
        outcome.delivered.push(b.file);
        outcome.bytes += bytes;
    }
    Ok(())
}

/// How often one bundle is sent again for a receiver that keeps asking: a
/// bundle that fails there for reasons of its own must not travel forever.
const MAX_RESENDS: u32 = 3;

/// Gives a file in `sent/` the server's time of its delivery (the receiver's
/// clock), which [`resend`] compares with the acknowledgement's scan time.
fn mark_delivered(kept: &Path, remote: Option<std::time::SystemTime>) {
    let when = remote.unwrap_or_else(std::time::SystemTime::now);
    if let Err(error) = std::fs::File::options()
        .write(true)
        .open(kept)
        .and_then(|f| f.set_modified(when))
    {
        tracing::debug!(file = %kept.display(), %error, "could not record the delivery time");
    }
}

/// Sends again, from `sent/`, what the receiver's acknowledgement says it
/// needs: the seq a held chain waits for (a gap, a bundle it found damaged),
/// and bundles delivered before its last inbox scan that it never saw (lost on
/// a power cut before the inbox directory reached its disk). Each seq at most
/// [`MAX_RESENDS`] times.
async fn resend(
    config: &Config,
    link: &Link,
    ack: &Ack,
    state: &mut State,
    outcome: &mut PushOutcome,
) -> Result<(), PushError> {
    let sent_dir = config.sent_dir();
    let sent: Vec<Pending> = outbox::list(&sent_dir, &config.sender_id)?
        .into_iter()
        .filter(|b| b.chain == ack.chain)
        .collect();
    let margin = Duration::from_secs(5);
    let scanned: std::time::SystemTime = ack.scanned_at.into();
    let mut seqs: Vec<u64> = sent
        .iter()
        .filter(|b| b.volume.is_none())
        .filter(|b| {
            ack.wants.contains(&b.seq)
                || (b.seq > ack.seen_seq
                    && std::fs::metadata(sent_dir.join(&b.file))
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t + margin < scanned))
        })
        .map(|b| b.seq)
        .collect();
    seqs.dedup();
    if seqs.is_empty() {
        return Ok(());
    }
    for seq in seqs {
        let times = state.resent(seq).await?;
        if times >= MAX_RESENDS {
            if times == MAX_RESENDS {
                tracing::error!(
                    seq,
                    times,
                    "the receiver still needs this bundle after it was sent again; check its quarantine (ferry-receiver failures) or take a complete"
                );
                state.count_resend(seq).await?;
            }
            continue;
        }
        state.count_resend(seq).await?;
        for b in sent.iter().filter(|b| b.seq == seq) {
            let local = sent_dir.join(&b.file);
            tracing::warn!(bundle = %b.file, seq, applied_seq = ack.applied_seq, seen_seq = ack.seen_seq, "sending a delivered bundle again: the receiver does not have it");
            let (bytes, remote_mtime) = link.upload(&local, &b.file).await?;
            mark_delivered(&local, remote_mtime);
            outcome.delivered.push(b.file.clone());
            outcome.bytes += bytes;
        }
    }
    Ok(())
}

/// Runs a job with [`follow`] beside it when `push` is given (one task: cancelling
/// it cancels both).
pub async fn job_following(
    config: &Config,
    kind: ferry_common::manifest::Kind,
    tables: &[String],
    push: Option<&PushConfig>,
) -> Result<crate::job::JobOutcome, crate::job::JobError> {
    let outcome = match push {
        None => crate::job::run_sealing(config, kind, tables, None).await,
        Some(p) => {
            let (tx, rx) = watch::channel(0);
            let (outcome, ()) = tokio::join!(
                crate::job::run_sealing(config, kind, tables, Some(tx)),
                follow(config.clone(), p.clone(), rx)
            );
            outcome
        }
    };
    crate::job::record(config, kind, &outcome);
    outcome
}

/// Pushes beside a job that writes a complete in volumes: each time `sealed`
/// changes, what is pending goes out over one connection kept open, so the
/// receiver can start loading while the sender still dumps. Ends when the job
/// drops `sealed`. A failure is logged and ends the following: the push after
/// the job retries everything still queued.
pub async fn follow(config: Config, p: PushConfig, mut sealed: watch::Receiver<u32>) {
    let Ok(_push) = ferry_common::lock::StateLock::acquire_named(&config.state_dir, "push.lock")
    else {
        return; // another push is running; it or the one after the job delivers
    };
    let mut link: Option<Link> = None;
    let mut outcome = PushOutcome::default();
    while sealed.changed().await.is_ok() {
        let result = async {
            // Up to the newest volume only: a set's final file goes out after
            // the job recorded it (pushed before, a crash in between would
            // leave the receiver a bundle the sender's state does not know).
            let mut pending: Vec<Pending> = outbox::list(&config.outbox(), &config.sender_id)?;
            let upto = pending.iter().rposition(|b| b.volume.is_some());
            pending.truncate(upto.map_or(0, |i| i + 1));
            if pending.is_empty() {
                return Ok(());
            }
            if link.is_none() {
                link = Some(Link::open(&p).await?);
            }
            deliver(
                &config,
                link.as_ref().expect("just opened"),
                pending,
                &mut outcome,
            )
            .await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not push a volume while the complete is written; the push after it retries");
            break;
        }
    }
    if !outcome.delivered.is_empty() {
        tracing::debug!(
            volumes = outcome.delivered.len(),
            bytes = outcome.bytes,
            "delivered while the complete was written"
        );
    }
    if let Some(link) = link {
        link.close().await;
    }
}

/// 1 s, 2 s, 4 s … capped, times a random factor in [0.5, 1.5).
fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(1u64 << (attempt - 1).min(16)).min(max);
    base.mul_f64(0.5 + rand::random::<f64>())
}

/// Keeps in `sent/` the newest complete, the completes it carries tables
/// from, and everything after it (enough to rebuild a receiver by hand);
/// older delivered bundles are removed. Only a
/// complete's final file counts as a complete: the volumes of an attempt that
/// was killed (no final file anywhere, their seq recorded as something else or
/// not at all) are orphans and removed, never mistaken for the newest complete.
pub(crate) fn prune_sent(config: &Config, recorded: u64) -> Result<(), PushError> {
    let sent = outbox::list(&config.sent_dir(), &config.sender_id)?;
    let queued = outbox::list(&config.outbox(), &config.sender_id)?;
    let finals: std::collections::HashSet<(u64, &str)> = sent
        .iter()
        .chain(&queued)
        .filter(|b| b.volume.is_none())
        .map(|b| (b.seq, b.kind.as_str()))
        .collect();
    let orphan = |b: &Pending| {
        b.volume.is_some() && b.seq <= recorded && !finals.contains(&(b.seq, b.kind.as_str()))
    };
    let newest = sent
        .iter()
        .rev()
        .find(|b| b.kind == "complete" && b.volume.is_none());
    // The completes the newest one carries tables from stay with it (a
    // receiver rebuilt from sent/ needs them); an unreadable manifest keeps
    // everything.
    let needed: Option<std::collections::HashSet<u64>> = match newest {
        Some(n) => ferry_common::reader::read_manifest(
            &config.sent_dir().join(&n.file),
            &ferry_common::reader::Limits::default(),
        )
        .ok()
        .map(|m| m.carried().map(|(_, c)| c.seq.0).collect()),
        None => Some(Default::default()),
    };
    let newest = newest.map(|b| b.seq);
    let drop = |b: &Pending| {
        newest.is_some_and(|n| b.seq < n)
            && needed
                .as_ref()
                .is_some_and(|k| !(b.kind == "complete" && k.contains(&b.seq)))
    };
    for b in sent.iter().filter(|b| orphan(b) || drop(b)) {
        let path = config.sent_dir().join(&b.file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "could not remove a delivered bundle")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(10);
        for attempt in 1..20 {
            let w = backoff(attempt, max);
            let base = Duration::from_secs(1u64 << (attempt - 1).min(16)).min(max);
            assert!(
                w >= base.mul_f64(0.5) && w < base.mul_f64(1.5),
                "{attempt}: {w:?}"
            );
        }
    }
}
