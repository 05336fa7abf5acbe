//! Staging: members are written to files in the staging directory, hashed,
//! counted and compressed on the way (on the thread that produces them, so
//! tables compress side by side), and handed to the bundle writer when complete.
//! The writer needs each member's size before its bytes, so a member cannot be
//! streamed straight into the tar.

use super::ExtractError;
use ferry_common::bundle::{CompressedMember, Compression};
use ferry_common::checksum::Checksum;
use ferry_common::manifest::Member;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// A finished staged member, ready for the bundle writer.
#[derive(Debug)]
pub struct Staged {
    /// Path, role, table, rows and format; the bundle writer sets size and
    /// checksum from the fields below.
    pub member: Member,
    /// The member compressed (see [`CompressedMember`]).
    pub file: PathBuf,
    pub size: u64,
    pub checksum: Checksum,
}

/// A change line's fingerprint: SHA-256 of the table's name and the line.
pub type LineHash = [u8; 32];

/// The most change lines a bundle records for [`Dedup`]. A bundle with more
/// records none, so the next partial re-sends its overlap (harmless: upserts and
/// deletes are idempotent) and the sender's memory stays bounded whatever the
/// size of a partial.
pub const DEDUP_MAX_LINES: usize = 100_000;

/// Skips change lines identical to a line of the previous bundle *for the same
/// table*.
///
/// Why this is safe: the receiver applies bundles in order, so after the previous
/// bundle it holds exactly the row state that bundle's line described. A line that
/// is identical now, for the same table, describes the same state; the only bundle
/// between the two snapshots is the previous one itself, so the receiver cannot
/// have seen any other state of that row in between. Only the *immediately*
/// previous bundle counts, and the table is part of the fingerprint: the delete of
/// key `{"id":5}` in one table says nothing about key `{"id":5}` in another.
/// A partial carries an upsert or a delete of a key, never both (deletes are only
/// sent for keys absent from the snapshot), so skipping one never reorders the
/// other.
///
/// Without this, the overlap that keeps watermarks safe would re-send the newest
/// rows in every partial and an idle application would never have empty partials.
/// Memory: at most [`DEDUP_MAX_LINES`] fingerprints of each bundle.
#[derive(Default)]
pub struct Dedup {
    previous: std::collections::HashSet<LineHash>,
    sent: std::sync::Mutex<Vec<LineHash>>,
    /// Lines counted so far in this bundle; past the cap nothing is recorded.
    counted: AtomicU64,
}

impl Dedup {
    pub fn new(previous: std::collections::HashSet<LineHash>) -> Self {
        Self {
            previous,
            ..Default::default()
        }
    }

    /// The fingerprint of `line` (with or without its newline) of `table`.
    pub fn hash(table: &str, line: &[u8]) -> LineHash {
        use sha2::Digest;
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let mut h = sha2::Sha256::new();
        h.update(table.as_bytes());
        h.update([0u8]);
        h.update(line);
        h.finalize().into()
    }

    /// Whether the previous bundle carried this line of this table.
    pub fn seen(&self, hash: &LineHash) -> bool {
        self.previous.contains(hash)
    }

    /// Records a line of this bundle; `false` once the bundle passed the cap
    /// (the caller stops recording).
    fn record(&self, hashes: &mut Vec<LineHash>) -> bool {
        let n = hashes.len() as u64;
        let before = self.counted.fetch_add(n, Ordering::Relaxed);
        if before + n > DEDUP_MAX_LINES as u64 {
            hashes.clear();
            return false;
        }
        if let Ok(mut all) = self.sent.lock() {
            all.append(hashes);
        }
        true
    }

    /// The fingerprints of every line sent by this bundle; empty when it carried
    /// more than [`DEDUP_MAX_LINES`].
    pub fn take_sent(&self) -> Vec<LineHash> {
        if self.counted.load(Ordering::Relaxed) > DEDUP_MAX_LINES as u64 {
            return Vec::new();
        }
        self.sent
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// Creates staged files and forwards finished ones to the bundle writer.
#[derive(Clone)]
pub struct Stager {
    dir: PathBuf,
    counter: std::sync::Arc<AtomicU64>,
    tx: mpsc::Sender<Staged>,
    dedup: Option<std::sync::Arc<Dedup>>,
    compression: Compression,
}

impl Stager {
    pub fn new(
        dir: &Path,
        tx: mpsc::Sender<Staged>,
        dedup: Option<std::sync::Arc<Dedup>>,
        compression: Compression,
    ) -> Self {
        Self {
            dir: dir.to_owned(),
            counter: Default::default(),
            tx,
            dedup,
            compression,
        }
    }

    pub fn dedup(&self) -> Option<std::sync::Arc<Dedup>> {
        self.dedup.clone()
    }

    /// A fresh file name in the staging directory.
    pub fn new_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(".stage-{n}"))
    }

    /// Opens a staged file for a member.
    pub fn create(&self, member: Member) -> Result<StageWriter, ExtractError> {
        let path = self.new_path();
        let writer = CompressedMember::create(&path, self.compression)
            .map_err(ExtractError::stage(member.path.clone()))?;
        Ok(StageWriter {
            writer,
            path,
            member,
            rows: 0,
        })
    }

    /// Hands a finished member to the bundle writer.
    pub async fn send(&self, staged: Staged) -> Result<(), ExtractError> {
        self.tx
            .send(staged)
            .await
            .map_err(|_| ExtractError::WriterGone("bundle writer closed its queue".into()))
    }
}

/// A member being staged. Blocking I/O: use it on a blocking thread, or for
/// small members.
pub struct StageWriter {
    writer: CompressedMember,
    path: PathBuf,
    member: Member,
    rows: u64,
}

impl StageWriter {
    /// The member's table as the [`Dedup`] fingerprints name it (empty for a
    /// member of no table).
    fn table_key(&self) -> String {
        self.member
            .table
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_default()
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ExtractError> {
        self.writer
            .write_all(bytes)
            .map_err(ExtractError::stage(self.member.path.clone()))
    }

    /// Writes one line (a JSON change) and counts it as a row.
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), ExtractError> {
        self.write(line)?;
        self.write(b"\n")?;
        self.rows += 1;
        Ok(())
    }

    pub fn add_rows(&mut self, rows: u64) {
        self.rows += rows;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Ends the compressed frame and closes the file (fsync happens on the whole
    /// bundle, not here).
    pub fn finish(self, count_rows: bool) -> Result<Staged, ExtractError> {
        let (size, checksum) = self
            .writer
            .finish()
            .map_err(ExtractError::stage(self.member.path.clone()))?;
        let mut member = self.member;
        if count_rows {
            member.rows = Some(self.rows);
        }
        Ok(Staged {
            member,
            file: self.path,
            size,
            checksum,
        })
    }
}

/// A member template: everything but size and checksum.
pub fn member(path: String, role: ferry_common::manifest::Role) -> Member {
    Member {
        path,
        role,
        size: 0,
        checksum: Checksum::Blake3(String::new()),
        table: None,
        rows: None,
        format: None,
        media_set: None,
        mtime_ns: None,
        volume: None,
        whole: false,
        carried: None,
    }
}

/// Feeds a [`StageWriter`] on a blocking thread from async code, in batches.
pub struct BlockingSink {
    tx: mpsc::Sender<Vec<u8>>,
    handle: tokio::task::JoinHandle<Result<Staged, ExtractError>>,
}

impl BlockingSink {
    /// Writes the batches as they come; the caller counts the rows.
    pub fn spawn(mut writer: StageWriter) -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        let handle = tokio::task::spawn_blocking(move || {
            while let Some(buf) = rx.blocking_recv() {
                writer.write(&buf)?;
            }
            writer.finish(false)
        });
        Self { tx, handle }
    }

    /// Like [`spawn`](Self::spawn) for JSON change lines (batches of whole lines),
    /// skipping lines the [`Dedup`] says the previous bundle already carried.
    pub fn spawn_changes(mut writer: StageWriter, dedup: Option<std::sync::Arc<Dedup>>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        let table = writer.table_key();
        let handle = tokio::task::spawn_blocking(move || {
            let mut recording = true;
            let mut batch = Vec::new();
            while let Some(buf) = rx.blocking_recv() {
                for line in buf.split_inclusive(|&b| b == b'\n') {
                    if let Some(d) = &dedup {
                        let h = Dedup::hash(&table, line);
                        let seen = d.seen(&h);
                        if recording {
                            batch.push(h);
                        }
                        if seen {
                            continue;
                        }
                    }
                    writer.write(line)?;
                    writer.add_rows(1);
                }
                if let Some(d) = &dedup
                    && recording
                {
                    recording = d.record(&mut batch);
                }
            }
            writer.finish(true)
        });
        Self { tx, handle }
    }

    /// For a table sent whole (`Carry::Whole`): writes every line (no line is
    /// skipped: the receiver deletes the rows the set lacks) and fingerprints
    /// the whole member. [`finish_whole`](Self::finish_whole) drops it when the
    /// previous bundle carried exactly the same set.
    pub fn spawn_whole(mut writer: StageWriter, dedup: Option<std::sync::Arc<Dedup>>) -> Self {
        use sha2::Digest;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        writer.member.whole = true;
        let table = writer.table_key();
        let handle = tokio::task::spawn_blocking(move || {
            let mut digest = sha2::Sha256::new();
            while let Some(buf) = rx.blocking_recv() {
                digest.update(&buf);
                writer.add_rows(buf.iter().filter(|&&b| b == b'\n').count() as u64);
                writer.write(&buf)?;
            }
            let mut staged = writer.finish(true)?;
            if let Some(d) = &dedup {
                let line = format!("whole {}", hex::encode(digest.finalize()));
                let h = Dedup::hash(&table, line.as_bytes());
                if d.seen(&h) {
                    staged.member.rows = None;
                }
                d.record(&mut vec![h]);
            }
            Ok(staged)
        });
        Self { tx, handle }
    }

    /// Finishes a [`spawn_whole`](Self::spawn_whole) member: `None` (and the
    /// staged file removed) when the table is exactly as the previous bundle
    /// sent it.
    pub async fn finish_whole(self) -> Result<Option<Staged>, ExtractError> {
        let staged = self.finish().await?;
        if staged.member.rows.is_none() {
            let _ = std::fs::remove_file(&staged.file);
            return Ok(None);
        }
        Ok(Some(staged))
    }

    pub async fn send(&self, buf: Vec<u8>) -> Result<(), ExtractError> {
        if self.tx.send(buf).await.is_err() {
            return Err(ExtractError::WriterGone("staging thread stopped".into()));
        }
        Ok(())
    }

    /// Waits for the staged file; returns the writer's error if it failed.
    pub async fn finish(self) -> Result<Staged, ExtractError> {
        drop(self.tx);
        self.handle
            .await
            .map_err(|e| ExtractError::WriterGone(format!("staging thread panicked: {e}")))?
    }
}

/// Collects small chunks into batches of about `BATCH` bytes.
pub const BATCH: usize = 256 * 1024;

/// Stages a small text member (schema DDL).
pub async fn stage_text(
    stager: &Stager,
    path: &str,
    role: ferry_common::manifest::Role,
    text: String,
) -> Result<(), ExtractError> {
    let mut w = stager.create(member(path.into(), role))?;
    w.write(text.as_bytes())?;
    stager.send(w.finish(false)?).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::manifest::Role;

    #[test]
    fn a_full_disk_while_staging_is_an_error_naming_the_member_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        // The stager's first file is `.stage-0`; /dev/full refuses every write.
        std::os::unix::fs::symlink("/dev/full", dir.path().join(".stage-0")).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let stager = Stager::new(dir.path(), tx, None, Compression::default());
        let mut w = stager
            .create(member("data/public.t.copy".into(), Role::Data))
            .unwrap();
        // Incompressible bytes, more than every buffer on the way holds.
        let mut x = 0x9e37_79b9_u32;
        let data: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let e = w
            .write(&data)
            .and_then(|_| w.finish(false).map(|_| ()))
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("data/public.t.copy"), "{text}");
        assert!(text.contains("No space left on device"), "{text}");
        assert!(text.contains("free space there"), "{text}");
    }
}
