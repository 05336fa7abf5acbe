//! The state-directory lock: one agent at a time per `state_dir` (two senders never
//! allocate the same sequence number; two receivers never share an inbox). The OS
//! releases the lock when the process dies, even on `kill -9`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another ferry process is working in {} (its lock {} is held); wait for it to finish or stop it", dir.display(), lock.display())]
    Busy { dir: PathBuf, lock: PathBuf },
    #[error("could not create or lock {}: {source}; check that the state directory exists and is writable by this user", lock.display())]
    Io {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct StateLock {
    file: File,
}

// Release explicitly: the lock belongs to the open file description, and a child
// forked by this process (a hook, pg_dump) shares it until its exec closes the
// close-on-exec copy; merely closing our descriptor in that window would leave
// the lock held and the next job would find it busy.
impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl StateLock {
    /// The lock for jobs that change the state directory.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        Self::acquire_named(state_dir, "lock")
    }

    /// A lock file of its own in the state directory (`daemon.lock`, `push.lock`).
    pub fn acquire_named(state_dir: &Path, name: &str) -> Result<Self, LockError> {
        let lock = state_dir.join(name);
        let io = |source| LockError::Io {
            lock: lock.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Busy {
                dir: state_dir.to_owned(),
                lock,
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// Waits up to `wait` for the lock (polling), for manual commands that
    /// should queue behind a running job rather than fail.
    pub async fn acquire_waiting(
        state_dir: &Path,
        wait: std::time::Duration,
    ) -> Result<Self, LockError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Self::acquire(state_dir) {
                Err(LockError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let e = StateLock::acquire(dir.path()).unwrap_err();
        assert!(e.to_string().contains("another ferry process"), "{e}");
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }
}
