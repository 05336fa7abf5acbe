//! Reading the sender's private key (SFTP login and bundle signing) as OpenSSH
//! does: a key that others can read is refused, and a key the sender cannot
//! read is explained by owner and mode, never by advice to regenerate it
//! (which would invalidate the key the receiver authorized).

use russh::keys::PrivateKey;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Loads `path`; the error names the file, what is wrong and the fix.
pub fn load(path: &Path) -> Result<PrivateKey, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{shown} does not exist; create it (ssh-keygen -t ed25519 -N '' -f {shown}) or point the setting at the key"
        ),
        _ => format!("cannot stat {shown}: {e}"),
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown} is readable by others than its owner (mode {mode:04o}); OpenSSH refuses \
             such a key and so does ferry: `chmod 600 {shown}`"
        ));
    }
    if let Err(e) = std::fs::File::open(path)
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        return Err(format!(
            "{shown} cannot be read by this user ({}): it is owned by {} with mode {mode:04o}; \
             give it to the user the sender runs as (`chown {} {shown}`, keeping mode 0600); \
             do not regenerate it, or the receiver's authorized key no longer matches",
            user_name(current_uid()),
            user_name(Some(meta.uid())),
            user_name(current_uid()),
        ));
    }
    russh::keys::load_secret_key(path, None).map_err(|e| {
        format!(
            "{shown} is not an OpenSSH private key without a passphrase ({e}); \
             make one with ssh-keygen -t ed25519 -N '' -f {shown}"
        )
    })
}

/// The effective uid, from `/proc/self/status` (no `unsafe` for `geteuid`).
fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `name (uid N)` from `/etc/passwd`, or `uid N`.
fn user_name(uid: Option<u32>) -> String {
    let Some(uid) = uid else {
        return "the current user".to_owned();
    };
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)? == uid.to_string()).then(|| name.to_owned())
        })
    });
    match name {
        Some(n) => n,
        None => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let key = dir.path().join("id");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap_or_else(|e| panic!("ssh-keygen: {e}"));
        assert!(made.success());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640))
            .unwrap_or_else(|e| panic!("{e}"));
        let e = load(&key).err().unwrap_or_default();
        assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(load(&key).is_ok());
        std::fs::write(&key, b"not a key").unwrap_or_else(|e| panic!("{e}"));
        let e = load(&key).err().unwrap_or_default();
        assert!(e.contains("ssh-keygen"), "{e}");
    }
}
