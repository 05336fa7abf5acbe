//! The embedded SFTP endpoint (`[sftp_server]`), for receiver hosts without
//! OpenSSH: an SSH server (russh) whose only service is SFTP (russh-sftp),
//! confined to the inbox, which it presents as `/`.
//!
//! The contract is the one the receiver relies on, enforced rather than hoped for:
//! - names are single components directly in the inbox: `..`, sub-directories and
//!   absolute paths elsewhere are refused, and nothing follows a link (files are
//!   opened with `O_NOFOLLOW`, metadata is `lstat`);
//! - uploads only: files open for writing under a temporary name (leading `.`),
//!   which `rename` (or `posix-rename@openssh.com`) turns into a final name; a
//!   final name is never open for writing, so the receiver never sees a partial
//!   bundle; nothing can be read, listed, or removed except temporaries;
//! - public-key authentication against an `authorized_keys` file, re-read at
//!   every login.

use russh::keys::ssh_key::{self, HashAlg};
use russh::server::{Auth, Msg, Server as _, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[sftp_server]` in the receiver's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpServerConfig {
    /// Address and port to listen on, e.g. `"0.0.0.0:2222"`.
    pub listen: SocketAddr,
    /// The server's private host key (OpenSSH format), e.g. made with
    /// `ssh-keygen -t ed25519 -N '' -f /etc/ferry/sftp_host_ed25519_key`.
    pub host_key: PathBuf,
    /// The senders' public keys, one per line, as in OpenSSH.
    pub authorized_keys: PathBuf,
    /// The only user name accepted (any, when unset).
    pub user: Option<String>,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "could not load the SFTP host key {}: {message}; make one with `ssh-keygen -t ed25519 -N '' -f {}` (sftp_server.host_key)",
        path.display(), path.display()
    )]
    HostKey { path: PathBuf, message: String },
    #[error(
        "could not read sftp_server.authorized_keys {}: {message}; put the senders' public keys there, one per line",
        path.display()
    )]
    AuthorizedKeys { path: PathBuf, message: String },
    #[error(
        "could not listen on {addr} (sftp_server.listen): {source}; pick a free port, or stop what holds it"
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound endpoint; [`Endpoint::serve`] runs it until the task is dropped.
pub struct Endpoint {
    listener: tokio::net::TcpListener,
    config: Arc<russh::server::Config>,
    shared: Arc<Shared>,
}

struct Shared {
    inbox: PathBuf,
    authorized_keys: PathBuf,
    user: Option<String>,
}

impl Endpoint {
    /// Loads the keys and binds the port (errors name the key to fix).
    pub async fn bind(cfg: &SftpServerConfig, inbox: &Path) -> Result<Self, StartError> {
        let host_key =
            russh::keys::load_secret_key(&cfg.host_key, None).map_err(|e| StartError::HostKey {
                path: cfg.host_key.clone(),
                message: e.to_string(),
            })?;
        // Fail at start, not at the first login, on an unreadable file.
        read_authorized(&cfg.authorized_keys)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let mut methods = MethodSet::empty();
        methods.push(MethodKind::PublicKey);
        let config = russh::server::Config {
            methods,
            keys: vec![host_key],
            inactivity_timeout: Some(std::time::Duration::from_secs(600)),
            keepalive_interval: Some(std::time::Duration::from_secs(15)),
            auth_rejection_time: std::time::Duration::from_millis(300),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            nodelay: true,
            ..Default::default()
        };
        Ok(Self {
            listener,
            config: Arc::new(config),
            shared: Arc::new(Shared {
                inbox: inbox.to_owned(),
                authorized_keys: cfg.authorized_keys.clone(),
                user: cfg.user.clone(),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until dropped.
    pub async fn serve(self) -> std::io::Result<()> {
        let mut server = Server {
            shared: self.shared,
        };
        server.run_on_socket(self.config, &self.listener).await
    }
}

fn read_authorized(path: &Path) -> Result<Vec<ssh_key::PublicKey>, StartError> {
    let text = std::fs::read_to_string(path).map_err(|e| StartError::AuthorizedKeys {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut keys = Vec::new();
    for entry in ssh_key::AuthorizedKeys::new(&text) {
        match entry {
            Ok(e) => keys.push(e.public_key().clone()),
            Err(e) => {
                return Err(StartError::AuthorizedKeys {
                    path: path.to_owned(),
                    message: format!("a line does not parse: {e}"),
                });
            }
        }
    }
    Ok(keys)
}

struct Server {
    shared: Arc<Shared>,
}

impl russh::server::Server for Server {
    type Handler = Connection;

    fn new_client(&mut self, peer: Option<SocketAddr>) -> Connection {
        Connection {
            shared: Arc::clone(&self.shared),
            peer,
            user: String::new(),
            channels: HashMap::new(),
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    user: String,
    channels: HashMap<ChannelId, Channel<Msg>>,
}

impl Connection {
    fn peer(&self) -> String {
        self.peer.map_or("?".to_owned(), |p| p.to_string())
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fingerprint = key.public_key.fingerprint(HashAlg::Sha256);
        if self.shared.user.as_deref().is_some_and(|u| u != user) {
            tracing::warn!(peer = %self.peer(), user, "SFTP login refused: not the configured sftp_server.user");
            return Ok(Auth::reject());
        }
        let known = match read_authorized(&self.shared.authorized_keys) {
            Ok(keys) => keys
                .iter()
                .any(|k| k.key_data() == key.public_key.key_data()),
            Err(error) => {
                tracing::error!(%error, "SFTP login refused");
                false
            }
        };
        if known {
            tracing::info!(peer = %self.peer(), user, %fingerprint, "SFTP login");
            self.user = user.to_owned();
            Ok(Auth::Accept)
        } else {
            tracing::warn!(peer = %self.peer(), user, %fingerprint, "SFTP login refused: key not in sftp_server.authorized_keys");
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.close(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.channels.remove(&channel_id)) {
            ("sftp", Some(channel)) => {
                session.channel_success(channel_id)?;
                let fs = Inbox {
                    root: self.shared.inbox.clone(),
                    handles: HashMap::new(),
                    next: 0,
                    peer: self.peer(),
                };
                russh_sftp::server::run(channel.into_stream(), fs).await;
            }
            _ => {
                tracing::warn!(peer = %self.peer(), subsystem = name, "refused: only the sftp subsystem is served");
                session.channel_failure(channel_id)?;
            }
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(peer = %self.peer(), "refused a command: this endpoint serves SFTP only");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }
}

/// One SFTP session's view of the inbox.
struct Inbox {
    root: PathBuf,
    handles: HashMap<String, Open>,
    next: u64,
    peer: String,
}

struct Open {
    /// Shared with the blocking threads that write and fsync it.
    file: Arc<std::fs::File>,
    name: String,
}

/// A path inside the endpoint: the inbox itself, or one entry directly in it.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Root,
    Entry(String),
}

/// Resolves a client path lexically: `/`, `.`, `` are the inbox; `x`, `/x`,
/// `./x` are entry `x`. Anything with `..` or more than one component is refused.
fn resolve(path: &str) -> Result<Target, StatusReply> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(StatusCode::PermissionDenied.with_message(format!(
            "{path:?}: `..` is not allowed; this endpoint is the inbox only"
        )));
    }
    match parts.as_slice() {
        [] => Ok(Target::Root),
        [name] if !name.contains('\0') => Ok(Target::Entry((*name).to_owned())),
        _ => Err(StatusCode::PermissionDenied.with_message(format!(
            "{path:?}: no sub-directories; this endpoint is the inbox itself (set push.remote_dir = \"/\")"
        ))),
    }
}

fn entry(path: &str) -> Result<String, StatusReply> {
    match resolve(path)? {
        Target::Entry(name) => Ok(name),
        Target::Root => {
            Err(StatusCode::Failure.with_message(format!("{path:?} is the inbox itself")))
        }
    }
}

fn temporary(name: &str, path: &str, what: &str) -> Result<(), StatusReply> {
    if name.starts_with('.') {
        Ok(())
    } else {
        Err(StatusCode::PermissionDenied.with_message(format!(
            "{path:?}: {what} only under a temporary name (leading `.`), then rename it to its final name"
        )))
    }
}

fn io_reply(e: &std::io::Error, path: &str) -> StatusReply {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    code.with_message(format!("{path}: {e}"))
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".to_owned(),
        language_tag: "en-US".to_owned(),
    }
}

/// Reads one SSH string (u32 length, bytes) from `data` at `*at`.
fn ssh_string(data: &[u8], at: &mut usize) -> Option<String> {
    let len = u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?) as usize;
    let s = data.get(*at + 4..*at + 4 + len)?;
    *at += 4 + len;
    String::from_utf8(s.to_vec()).ok()
}

/// Runs file I/O of a request on a blocking thread: a write or an fsync on a
/// slow disk must not stall the runtime that serves every session.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StatusReply> + Send + 'static,
) -> Result<T, StatusReply> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StatusCode::Failure.with_message(format!("the file writer failed: {e}")))?
}

impl Inbox {
    /// Registers an open file under a new handle.
    fn open_handle(&mut self, id: u32, file: std::fs::File, name: String) -> Handle {
        self.next += 1;
        let handle = format!("h{}", self.next);
        self.handles.insert(
            handle.clone(),
            Open {
                file: Arc::new(file),
                name,
            },
        );
        Handle { id, handle }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn attrs(&self, target: &Target, path: &str) -> Result<FileAttributes, StatusReply> {
        let p = match target {
            Target::Root => self.root.clone(),
            Target::Entry(name) => self.path(name),
        };
        std::fs::symlink_metadata(&p)
            .map(|m| FileAttributes::from(&m))
            .map_err(|e| io_reply(&e, path))
    }

    /// [`rename`](Self::rename) on a blocking thread (it renames and fsyncs).
    async fn rename_blocking(
        &self,
        from: String,
        to: String,
        overwrite: bool,
    ) -> Result<(), StatusReply> {
        let this = Inbox {
            root: self.root.clone(),
            handles: HashMap::new(),
            next: 0,
            peer: self.peer.clone(),
        };
        blocking(move || this.rename(&from, &to, overwrite)).await
    }

    fn rename(&self, from: &str, to: &str, overwrite: bool) -> Result<(), StatusReply> {
        let (a, b) = (entry(from)?, entry(to)?);
        temporary(&a, from, "renaming is allowed")?;
        if b.starts_with('.') {
            return Err(StatusCode::PermissionDenied
                .with_message(format!("{to:?}: the final name must not start with `.`")));
        }
        let (pa, pb) = (self.path(&a), self.path(&b));
        let meta = std::fs::symlink_metadata(&pa).map_err(|e| io_reply(&e, from))?;
        if !meta.file_type().is_file() {
            return Err(StatusCode::PermissionDenied
                .with_message(format!("{from:?} is not a regular file")));
        }
        if overwrite {
            std::fs::rename(&pa, &pb).map_err(|e| io_reply(&e, to))?;
        } else {
            // SSH_FXP_RENAME does not replace an existing file (as OpenSSH).
            std::fs::hard_link(&pa, &pb).map_err(|e| io_reply(&e, to))?;
            std::fs::remove_file(&pa).map_err(|e| io_reply(&e, from))?;
        }
        // The rename must survive a power cut before the sender is told it
        // succeeded: the sender stops re-sending what it delivered.
        if let Some(dir) = pb.parent() {
            ferry_common::durable::sync_dir(dir).map_err(|e| io_reply(&e, to))?;
        }
        tracing::info!(peer = %self.peer, file = %b, bytes = meta.len(), "received over SFTP");
        Ok(())
    }
}

impl russh_sftp::server::Handler for Inbox {
    type Error = StatusReply;

    fn unimplemented(&self) -> StatusReply {
        StatusCode::OpUnsupported.with_message("not offered: this endpoint accepts uploads only")
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, StatusReply> {
        let mut v = Version::new();
        v.extensions
            .insert("posix-rename@openssh.com".to_owned(), "1".to_owned());
        v.extensions
            .insert("fsync@openssh.com".to_owned(), "1".to_owned());
        Ok(v)
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let filename = match resolve(&path)? {
            Target::Root => "/".to_owned(),
            Target::Entry(name) => format!("/{name}"),
        };
        Ok(Name {
            id,
            files: vec![File::dummy(filename)],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let target = resolve(&path)?;
        Ok(Attrs {
            id,
            attrs: self.attrs(&target, &path)?,
        })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        self.stat(id, path).await
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, StatusReply> {
        let name = entry(&filename)?;
        // The one thing a sender may read: the receiver's acknowledgement to it.
        if name.starts_with(ferry_common::ack::ACK_PREFIX)
            && pflags.contains(OpenFlags::READ)
            && !pflags.contains(OpenFlags::WRITE)
        {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(self.path(&name))
                .map_err(|e| io_reply(&e, &filename))?;
            return Ok(self.open_handle(id, file, name));
        }
        if pflags.contains(OpenFlags::READ) || !pflags.contains(OpenFlags::WRITE) {
            return Err(StatusCode::PermissionDenied.with_message(format!(
                "{filename:?}: nothing can be read here; this endpoint accepts uploads only"
            )));
        }
        temporary(&name, &filename, "writing is allowed")?;
        let mut options = std::fs::OpenOptions::new();
        options
            .write(true)
            .create(pflags.contains(OpenFlags::CREATE))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW);
        if pflags.contains(OpenFlags::EXCLUDE) {
            options.create_new(true);
        }
        let file = options
            .open(self.path(&name))
            .map_err(|e| io_reply(&e, &filename))?;
        if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Err(StatusCode::PermissionDenied
                .with_message(format!("{filename:?} is not a regular file")));
        }
        Ok(self.open_handle(id, file, name))
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, StatusReply> {
        let open = self
            .handles
            .get(&handle)
            .ok_or_else(|| StatusCode::Failure.with_message("unknown handle"))?;
        let (file, name) = (Arc::clone(&open.file), open.name.clone());
        blocking(move || {
            file.write_all_at(&data, offset)
                .map_err(|e| io_reply(&e, &name))
        })
        .await?;
        Ok(ok(id))
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, StatusReply> {
        let open = self
            .handles
            .get(&handle)
            .ok_or_else(|| StatusCode::Failure.with_message("unknown handle"))?;
        let mut data = vec![0u8; len.min(256 * 1024) as usize];
        let n = open
            .file
            .read_at(&mut data, offset)
            .map_err(|e| io_reply(&e, &open.name))?;
        if n == 0 && len > 0 {
            return Err(StatusCode::Eof.with_message("end of file"));
        }
        data.truncate(n);
        Ok(Data { id, data })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, StatusReply> {
        let open = self
            .handles
            .get(&handle)
            .ok_or_else(|| StatusCode::Failure.with_message("unknown handle"))?;
        let m = open.file.metadata().map_err(|e| io_reply(&e, &open.name))?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&m),
        })
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        _handle: String,
        _attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        // Permissions and times are the receiver's business: accepted, ignored.
        Ok(ok(id))
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        resolve(&path)?;
        Ok(ok(id))
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, StatusReply> {
        self.handles.remove(&handle);
        Ok(ok(id))
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, StatusReply> {
        let name = entry(&filename)?;
        temporary(&name, &filename, "removing is allowed")?;
        std::fs::remove_file(self.path(&name)).map_err(|e| io_reply(&e, &filename))?;
        Ok(ok(id))
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, StatusReply> {
        self.rename_blocking(oldpath, newpath, false).await?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        _id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        Err(StatusCode::PermissionDenied.with_message(format!(
            "{path:?}: no directories here; this endpoint is the inbox itself (set push.remote_dir = \"/\")"
        )))
    }

    async fn opendir(&mut self, _id: u32, path: String) -> Result<Handle, StatusReply> {
        Err(StatusCode::PermissionDenied.with_message(format!(
            "{path:?}: listing is not offered; this endpoint accepts uploads only"
        )))
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, StatusReply> {
        let mut at = 0;
        match request.as_str() {
            "posix-rename@openssh.com" => {
                let (Some(from), Some(to)) =
                    (ssh_string(&data, &mut at), ssh_string(&data, &mut at))
                else {
                    return Err(StatusCode::BadMessage.with_message("malformed posix-rename"));
                };
                self.rename_blocking(from, to, true).await?;
                Ok(Packet::Status(ok(id)))
            }
            "fsync@openssh.com" => {
                let handle = ssh_string(&data, &mut at)
                    .ok_or_else(|| StatusCode::BadMessage.with_message("malformed fsync"))?;
                let open = self
                    .handles
                    .get(&handle)
                    .ok_or_else(|| StatusCode::Failure.with_message("unknown handle"))?;
                let (file, name) = (Arc::clone(&open.file), open.name.clone());
                blocking(move || file.sync_all().map_err(|e| io_reply(&e, &name))).await?;
                Ok(Packet::Status(ok(id)))
            }
            _ => Err(self.unimplemented()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_inbox_only() {
        for root in ["/", ".", "", "./", "//"] {
            assert_eq!(resolve(root), Ok(Target::Root), "{root:?}");
        }
        for p in ["b.tar.zst", "/b.tar.zst", "./b.tar.zst", "//./b.tar.zst"] {
            assert_eq!(resolve(p), Ok(Target::Entry("b.tar.zst".into())), "{p:?}");
        }
        for bad in [
            "..",
            "/..",
            "../x",
            "/a/../../x",
            "a/b",
            "/etc/passwd",
            "x/..",
        ] {
            assert!(resolve(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn ssh_strings_parse_and_reject_truncation() {
        let mut data = Vec::new();
        for s in ["a", "bcd"] {
            data.extend_from_slice(&(s.len() as u32).to_be_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        let mut at = 0;
        assert_eq!(ssh_string(&data, &mut at).as_deref(), Some("a"));
        assert_eq!(ssh_string(&data, &mut at).as_deref(), Some("bcd"));
        assert_eq!(ssh_string(&data, &mut at), None);
        let mut at = 0;
        assert_eq!(ssh_string(&data[..6], &mut at), Some("a".into()));
        assert_eq!(ssh_string(&data[..6], &mut at), None);
    }
}
