//! Writing a bundle: one tar stream compressed with zstd, `manifest.json` first.
//!
//! The manifest must come first but lists every member's checksum, which is known
//! only after the member is written. So members are streamed into a *body* (tar
//! entries compressed as one zstd frame) in a staging file, and [`BundleWriter::finish`]
//! writes the final file as a second zstd frame holding the manifest entry followed
//! by the body's compressed bytes. Concatenated zstd frames decompress as one stream,
//! so `tar --zstd -xf` sees `manifest.json` first, then the members, then the end
//! marker. Memory stays bounded: nothing is buffered whole but the manifest.
//!
//! The final file is written under a temporary name (leading `.`), fsynced and
//! renamed; a crash leaves no partial file under a final name.

use crate::durable;
use crate::manifest::{Manifest, Member};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Compression settings.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    /// zstd level (1..=19).
    pub level: i32,
    /// zstd worker threads (0 = compress on the calling thread).
    pub workers: u32,
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            level: 1,
            workers: 0,
        }
    }
}

/// An error while writing a bundle: the member or file it concerns, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("could not write bundle member {member}: {source}")]
    Member {
        member: String,
        #[source]
        source: io::Error,
    },
    #[error("could not write bundle file {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{member} changed while it was being read ({expected} bytes expected, {actual} read)")]
    Changed {
        member: String,
        expected: u64,
        actual: u64,
    },
}

impl WriteError {
    /// Whether the same write can succeed later without anyone changing anything
    /// (a file that changed while read can; a full disk or bad path usually cannot).
    pub fn is_transient(&self) -> bool {
        matches!(self, WriteError::Changed { .. })
    }
}

type Body = tar::Builder<zstd::stream::write::Encoder<'static, BufWriter<File>>>;

/// Streams members into a bundle. Blocking: run it on a blocking thread.
pub struct BundleWriter {
    body: Option<Body>,
    body_path: PathBuf,
    compression: Compression,
    members: Vec<Member>,
}

impl BundleWriter {
    /// Starts a bundle whose body is staged at `body_path` (a temporary file that
    /// [`finish`](Self::finish) removes, and that is removed on drop otherwise).
    pub fn create(body_path: &Path, compression: Compression) -> Result<Self, WriteError> {
        let file_err = |source| WriteError::File {
            path: body_path.to_owned(),
            source,
        };
        let file = File::create(body_path).map_err(file_err)?;
        let mut enc = zstd::stream::write::Encoder::new(
            BufWriter::with_capacity(256 * 1024, file),
            compression.level,
        )
        .map_err(file_err)?;
        enc.include_checksum(true).map_err(file_err)?;
        if compression.workers > 0 {
            enc.multithread(compression.workers).map_err(file_err)?;
        }
        let mut body = tar::Builder::new(enc);
        body.mode(tar::HeaderMode::Deterministic);
        Ok(Self {
            body: Some(body),
            body_path: body_path.to_owned(),
            compression,
            members: Vec::new(),
        })
    }

    /// Appends a member whose checksum is already known (a file staged by a
    /// writer that hashed it on the way in). `template` supplies role, table,
    /// rows and format; path, size and sha256 are set here.
    pub fn append_staged(
        &mut self,
        template: Member,
        file: &Path,
        sha256: String,
    ) -> Result<&Member, WriteError> {
        let member_err = |source| WriteError::Member {
            member: template.path.clone(),
            source,
        };
        let f = File::open(file).map_err(member_err)?;
        let size = f.metadata().map_err(member_err)?.len();
        let reader = BufReader::with_capacity(256 * 1024, f);
        self.append_entry(&template.path, size, reader)
            .map_err(member_err)?;
        self.members.push(Member {
            size,
            sha256,
            ..template
        });
        Ok(self.members.last().expect("just pushed"))
    }

    /// Appends a member read from `reader`, which must yield exactly `size`
    /// bytes (fewer or more means the source changed while read). The checksum is
    /// computed on the way through.
    pub fn append_reader(
        &mut self,
        template: Member,
        size: u64,
        reader: impl Read,
    ) -> Result<&Member, WriteError> {
        let mut hashing = HashingReader::new(reader.take(size + 1));
        let member_err = |source| WriteError::Member {
            member: template.path.clone(),
            source,
        };
        let mut limited = (&mut hashing).take(size);
        let result = self.append_entry(&template.path, size, &mut limited);
        let read = hashing.bytes;
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(WriteError::Changed {
                    member: template.path,
                    expected: size,
                    actual: read,
                });
            }
            Err(e) => return Err(member_err(e)),
        }
        // One byte more than announced: the file grew while it was read.
        let mut probe = [0u8; 1];
        if hashing.inner.read(&mut probe).map_err(member_err)? > 0 {
            return Err(WriteError::Changed {
                member: template.path,
                expected: size,
                actual: size + 1,
            });
        }
        self.members.push(Member {
            size,
            sha256: hashing.hex_digest(),
            ..template
        });
        Ok(self.members.last().expect("just pushed"))
    }

    fn append_entry(&mut self, path: &str, size: u64, mut data: impl Read) -> io::Result<()> {
        let body = self.body.as_mut().expect("body present until finish");
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        // tar pads short readers with nothing: detect them ourselves.
        let mut counted = CountingReader {
            inner: &mut data,
            count: 0,
        };
        body.append_data(&mut header, path, &mut counted)?;
        if counted.count != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: {} of {size} bytes", counted.count),
            ));
        }
        Ok(())
    }

    /// The members appended so far.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Finishes the bundle and moves it durably to `final_path`: the manifest frame,
    /// then the body, written under a temporary name, fsynced and renamed. The
    /// caller fills `manifest` with [`members`](Self::members). Returns the file size.
    pub fn finish(mut self, manifest: &Manifest, final_path: &Path) -> Result<u64, WriteError> {
        let body_err = |source| WriteError::File {
            path: self.body_path.clone(),
            source,
        };
        let body = self.body.take().expect("body present until finish");
        let enc = body.into_inner().map_err(body_err)?;
        let mut buffered = enc.finish().map_err(body_err)?;
        buffered.flush().map_err(body_err)?;
        drop(buffered);

        let temp = durable::temp_name(final_path);
        let file_err = |source| WriteError::File {
            path: temp.clone(),
            source,
        };
        let result = (|| -> Result<u64, WriteError> {
            let mut out = File::create(&temp).map_err(file_err)?;
            let entry = manifest_entry(manifest).map_err(file_err)?;
            let mut frame = zstd::stream::write::Encoder::new(&mut out, self.compression.level)
                .map_err(file_err)?;
            frame.include_checksum(true).map_err(file_err)?;
            frame.write_all(&entry).map_err(file_err)?;
            frame.finish().map_err(file_err)?;
            let mut body = File::open(&self.body_path).map_err(body_err)?;
            io::copy(&mut body, &mut out).map_err(file_err)?;
            out.sync_all().map_err(file_err)?;
            let size = out.metadata().map_err(file_err)?.len();
            durable::commit_rename(&temp, final_path).map_err(|source| WriteError::File {
                path: final_path.to_owned(),
                source,
            })?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        let _ = std::fs::remove_file(&self.body_path);
        result
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if self.body.is_some() {
            let _ = std::fs::remove_file(&self.body_path);
        }
    }
}

/// The tar entry (header, JSON, padding) for the manifest, without an end marker.
fn manifest_entry(manifest: &Manifest) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(manifest)?;
    let mut header = tar::Header::new_gnu();
    header.set_path("manifest.json")?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(manifest.created_at.timestamp().max(0) as u64);
    header.set_cksum();
    let mut entry = Vec::with_capacity(512 + json.len() + 512);
    entry.extend_from_slice(header.as_bytes());
    entry.extend_from_slice(&json);
    let pad = (512 - json.len() % 512) % 512;
    entry.resize(entry.len() + pad, 0);
    Ok(entry)
}

/// A reader that hashes (SHA-256) and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn hex_digest(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A writer that hashes (SHA-256) and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes and returns the inner writer with the hex digest.
    pub fn finish(mut self) -> io::Result<(W, String)> {
        self.inner.flush()?;
        Ok((self.inner, hex::encode(self.hasher.finalize())))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Kind, Role, Seq, Source};
    use crate::reader::{Limits, ReadError, read_bundle, read_manifest};

    fn member(path: &str) -> Member {
        Member {
            path: path.to_owned(),
            role: Role::Media,
            size: 0,
            sha256: String::new(),
            table: None,
            rows: None,
            format: None,
            media_set: None,
            mtime_ns: None,
        }
    }

    fn manifest(members: Vec<Member>) -> Manifest {
        Manifest {
            format: crate::manifest::FORMAT,
            sender_id: "t".into(),
            kind: Kind::Complete,
            seq: Seq(1),
            base_seq: Seq(1),
            prev_seq: None,
            created_at: chrono::Utc::now(),
            source: Source {
                engine: "sqlite".into(),
                version: "3".into(),
            },
            schema_fingerprint: String::new(),
            tables: vec![],
            watermarks: Default::default(),
            members,
        }
    }

    #[test]
    fn round_trip_with_manifest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        let big = vec![7u8; 3 << 20];
        w.append_reader(member("media/a/big.bin"), big.len() as u64, &big[..])
            .unwrap();
        w.append_reader(member("media/a/empty"), 0, &b""[..])
            .unwrap();
        let m = manifest(w.members().to_vec());
        let out = dir.path().join("t-000000000001-complete.tar.zst");
        w.finish(&m, &out).unwrap();
        assert!(!dir.path().join(".body").exists());

        assert_eq!(read_manifest(&out, &Limits::default()).unwrap(), m);
        let mut seen = Vec::new();
        read_bundle(&out, &Limits::default(), |m, r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            seen.push((m.path.clone(), v.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                ("media/a/big.bin".into(), 3 << 20),
                ("media/a/empty".into(), 0)
            ]
        );
    }

    #[test]
    fn short_or_long_reader_is_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        let e = w
            .append_reader(member("m/x"), 10, &b"12345"[..])
            .unwrap_err();
        assert!(matches!(e, WriteError::Changed { actual: 5, .. }), "{e}");
        let e = w
            .append_reader(member("m/y"), 2, &b"12345"[..])
            .unwrap_err();
        assert!(matches!(e, WriteError::Changed { .. }), "{e}");
    }

    #[test]
    fn corruption_and_truncation_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        w.append_reader(member("m/data"), data.len() as u64, &data[..])
            .unwrap();
        let mut m = manifest(w.members().to_vec());
        let out = dir.path().join("b.tar.zst");
        m.members[0].sha256 = "00".repeat(32);
        w.finish(&m, &out).unwrap();
        let e = read_bundle(&out, &Limits::default(), |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, ReadError::Checksum { .. }), "{e}");

        let bytes = std::fs::read(&out).unwrap();
        let cut = dir.path().join("cut.tar.zst");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = read_bundle(&cut, &Limits::default(), |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("cut.tar.zst"), "{e}");
    }
}
