//! Verification before anything commits: the whole bundle is read once, every
//! member checked (manifest first, safe relative paths, regular files only, listed
//! once, exact size and SHA-256, decompressed total bounded) and staged as a file.
//! Loading reads only these staged, verified files.

use ferry_common::manifest::{Manifest, Member};
use ferry_common::reader::{Arrival, Limits, ReadError, read_set};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

/// A verified bundle: its manifest and every member as a staged file.
pub struct Verified {
    pub manifest: Manifest,
    files: HashMap<String, PathBuf>,
    dir: PathBuf,
}

impl Verified {
    /// The staged file of a member.
    pub fn file(&self, member: &Member) -> &Path {
        &self.files[&member.path]
    }

    pub fn text(&self, path: &str) -> io::Result<String> {
        match self.files.get(path) {
            Some(f) => std::fs::read_to_string(f),
            None => Ok(String::new()),
        }
    }
}

impl Drop for Verified {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads, verifies and stages a bundle (or volume set, waiting up to `wait` for
/// each volume) into `dir` (emptied first). Blocking.
pub fn stage(
    bundle: &Path,
    dir: &Path,
    limits: &Limits,
    wait: std::time::Duration,
) -> Result<Verified, ReadError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|source| ReadError::Io {
        bundle: bundle.to_owned(),
        source,
    })?;
    let mut files = HashMap::new();
    let mut n = 0u64;
    let arrival = Arrival {
        wait,
        cancelled: &|| false,
    };
    let mut on_member = |m: &Member, r: &mut dyn io::Read| {
        n += 1;
        let path = dir.join(format!("m{n}"));
        let mut out = BufWriter::with_capacity(256 * 1024, File::create(&path)?);
        io::copy(r, &mut out)?;
        io::Write::flush(&mut out)?;
        files.insert(m.path.clone(), path);
        Ok(())
    };
    let result = read_set(bundle, limits, &arrival, &mut on_member, &mut |_| Ok(()));
    match result {
        Ok(manifest) => Ok(Verified {
            manifest,
            files,
            dir: dir.to_owned(),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

/// A piece of a bundle streamed to a loader while it is being verified.
pub enum Piece {
    /// A data member starts: COPY it.
    Start(Member),
    Chunk(Vec<u8>),
    End,
    /// A member staged as a file (DDL, media, data that came before the DDL).
    Staged(Member, PathBuf),
    /// A volume set's final manifest, which lists every member of the set: sent
    /// when the final file starts (a bundle in one file sends none).
    Final(Box<Manifest>),
}

/// Reads and verifies a bundle like [`stage`], but hands PostgreSQL COPY data to
/// `tx` as it streams past (1 MiB chunks) instead of writing it to disk; the rest
/// is staged in `dir`. The caller must not commit unless this returns `Ok`: a
/// checksum is only known at the end of its member. Blocking.
pub fn stream(
    bundle: &Path,
    dir: &Path,
    limits: &Limits,
    wait: std::time::Duration,
    tx: &tokio::sync::mpsc::Sender<Piece>,
) -> Result<Manifest, ReadError> {
    use ferry_common::manifest::{DataFormat, Role};
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|source| ReadError::Io {
        bundle: bundle.to_owned(),
        source,
    })?;
    let gone = ferry_common::reader::ConsumerStopped::io;
    let mut pre_seen = false;
    let mut n = 0u64;
    let arrival = Arrival {
        wait,
        cancelled: &|| tx.is_closed(),
    };
    let mut on_final = |m: &Manifest| {
        tx.blocking_send(Piece::Final(Box::new(m.clone())))
            .map_err(|_| gone())
    };
    // Once the loader stopped, the member being read is still read to its end,
    // so that its checksum is checked: corrupted data is reported as such, not
    // as whatever the database made of it.
    let mut stopped = false;
    let mut on_member = |m: &Member, r: &mut dyn io::Read| {
        if stopped {
            return Err(gone());
        }
        let streamable = pre_seen
            && m.role == Role::Data
            && matches!(
                m.format,
                Some(DataFormat::PgCopyText | DataFormat::PgCopyBinary)
            );
        if streamable {
            if tx.blocking_send(Piece::Start(m.clone())).is_err() {
                stopped = true;
                io::copy(r, &mut io::sink())?;
                return Ok(());
            }
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let mut filled = 0;
                while filled < buf.len() {
                    let k = r.read(&mut buf[filled..])?;
                    if k == 0 {
                        break;
                    }
                    filled += k;
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                if tx.blocking_send(Piece::Chunk(buf)).is_err() {
                    stopped = true;
                    io::copy(r, &mut io::sink())?;
                    return Ok(());
                }
            }
            stopped |= tx.blocking_send(Piece::End).is_err();
        } else {
            n += 1;
            let path = dir.join(format!("m{n}"));
            let mut out = BufWriter::with_capacity(256 * 1024, File::create(&path)?);
            io::copy(r, &mut out)?;
            io::Write::flush(&mut out)?;
            pre_seen |= m.role == Role::PreData;
            stopped |= tx.blocking_send(Piece::Staged(m.clone(), path)).is_err();
        }
        Ok(())
    };
    read_set(bundle, limits, &arrival, &mut on_member, &mut on_final)
}
