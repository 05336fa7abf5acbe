//! Durable file replacement: write under a temporary name that starts with `.`,
//! fsync the file, rename it to its final name, fsync the directory. A crash at any
//! point leaves either no file or the whole file under the final name.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// The temporary name used for `final_path` while it is being written: the same
/// directory, a leading `.` (receivers and listings skip those), and `.tmp`.
pub fn temp_name(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(format!(".{name}.tmp"))
}

/// Whether a file name is a temporary one (never a finished bundle).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
}

/// fsyncs a directory so that a rename inside it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Renames a finished, fsynced temporary file to its final name and makes the
/// rename durable.
pub fn commit_rename(temp: &Path, final_path: &Path) -> io::Result<()> {
    fs::rename(temp, final_path)?;
    if let Some(dir) = final_path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` durably (temporary name, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = temp_name(path);
    let result = (|| {
        let mut f = File::create(&temp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        commit_rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_start_with_a_dot() {
        let t = temp_name(Path::new("/x/outbox/a-000001-complete.tar.zst"));
        assert_eq!(t, Path::new("/x/outbox/.a-000001-complete.tar.zst.tmp"));
        assert!(is_temp_name(&t.file_name().unwrap().to_string_lossy()));
    }

    #[test]
    fn write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
