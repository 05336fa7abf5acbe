//! Writing a bundle: one tar stream compressed with zstd, `manifest.json` first.
//!
//! The manifest must come first but lists every member's checksum, which is known
//! only after the member is written. So members are streamed into a *body* (tar
//! entries, compressed) in a staging file, and [`BundleWriter::finish`] writes the
//! final file as a zstd frame holding the manifest entry followed by the body's
//! compressed bytes. Concatenated zstd frames decompress as one stream, so
//! `tar --zstd -xf` sees `manifest.json` first, then the members, then the end
//! marker. Memory stays bounded: nothing is buffered whole but the manifest.
//!
//! A member can be compressed ahead, on the thread that produces it
//! ([`CompressedMember`]): its frame already ends with the member's tar padding,
//! so the body takes it as it is, after a small frame holding its tar header.
//! Producers then compress side by side, and nothing uncompressed touches the disk.
//!
//! The final file is written under a temporary name (leading `.`), fsynced and
//! renamed; a crash leaves no partial file under a final name.

use crate::checksum::{self, Algorithm, Checksum, Hasher};
use crate::durable;
use crate::manifest::{Manifest, Member};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
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

type Frame = zstd::stream::write::Encoder<'static, BufWriter<File>>;

/// A zstd frame writing into `out`, with a checksum of its own.
fn frame(out: BufWriter<File>, c: Compression) -> io::Result<Frame> {
    let mut enc = zstd::stream::write::Encoder::new(out, c.level)?;
    enc.include_checksum(true)?;
    if c.workers > 0 {
        enc.multithread(c.workers)?;
    }
    Ok(enc)
}

/// The body file, between frames or inside one.
enum Body {
    Raw(BufWriter<File>),
    Frame(Frame),
}

/// Zero bytes for tar padding and the end marker.
const ZEROS: [u8; 1024] = [0; 1024];

/// A body left empty by a failed step (its writer was consumed by the error).
fn failed_earlier() -> io::Error {
    io::Error::other("the bundle body failed earlier")
}

/// The tar padding after `size` bytes of member data.
fn padding(size: u64) -> &'static [u8] {
    &ZEROS[..((512 - size % 512) % 512) as usize]
}

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
        Ok(Self {
            body: Some(Body::Raw(BufWriter::with_capacity(256 * 1024, file))),
            body_path: body_path.to_owned(),
            compression,
            members: Vec::new(),
        })
    }

    /// Appends a member compressed ahead by a [`CompressedMember`] into `file`,
    /// with the `size` and `checksum` its `finish` returned. `template` supplies
    /// path, role, table, rows and format.
    pub fn append_compressed(
        &mut self,
        template: Member,
        size: u64,
        checksum: Checksum,
        file: &Path,
    ) -> Result<&Member, WriteError> {
        let member_err = |source| WriteError::Member {
            member: template.path.clone(),
            source,
        };
        let mut f = File::open(file).map_err(member_err)?;
        let header = tar_header(&template.path, size, 0).map_err(member_err)?;
        self.frame()
            .and_then(|enc| enc.write_all(&header))
            .map_err(member_err)?;
        self.raw()
            .and_then(|out| io::copy(&mut f, out))
            .map_err(member_err)?;
        self.members.push(Member {
            size,
            checksum,
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
        let mut hashing = HashingReader::new(reader.take(size + 1), checksum::MEMBER);
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
            checksum: hashing.checksum(),
            ..template
        });
        Ok(self.members.last().expect("just pushed"))
    }

    fn append_entry(&mut self, path: &str, size: u64, data: impl Read) -> io::Result<()> {
        let header = tar_header(path, size, 0)?;
        let enc = self.frame()?;
        enc.write_all(&header)?;
        // tar pads short readers with nothing: detect them ourselves.
        let mut counted = CountingReader {
            inner: data,
            count: 0,
        };
        io::copy(&mut counted, enc)?;
        if counted.count != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: {} of {size} bytes", counted.count),
            ));
        }
        enc.write_all(padding(size))
    }

    /// The body inside a frame (one is started when needed).
    fn frame(&mut self) -> io::Result<&mut Frame> {
        if let Some(Body::Raw(out)) = self.body.take_if(|b| matches!(b, Body::Raw(_))) {
            self.body = Some(Body::Frame(frame(out, self.compression)?));
        }
        match &mut self.body {
            Some(Body::Frame(enc)) => Ok(enc),
            _ => Err(failed_earlier()),
        }
    }

    /// The body between frames (the open one is ended).
    fn raw(&mut self) -> io::Result<&mut BufWriter<File>> {
        if let Some(Body::Frame(enc)) = self.body.take_if(|b| matches!(b, Body::Frame(_))) {
            self.body = Some(Body::Raw(enc.finish()?));
        }
        match &mut self.body {
            Some(Body::Raw(out)) => Ok(out),
            _ => Err(failed_earlier()),
        }
    }

    /// The members appended so far.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Finishes the bundle and moves it durably to `final_path`: the manifest frame,
    /// then the body, written under a temporary name, fsynced and renamed. The
    /// caller fills `manifest` with [`members`](Self::members). Returns the file's
    /// size and SHA-256 (hex).
    pub fn finish(
        self,
        manifest: &Manifest,
        final_path: &Path,
    ) -> Result<(u64, String), WriteError> {
        self.finish_signed(manifest, final_path, None)
    }

    /// Like [`finish`](Self::finish), with the manifest signed by `signer`
    /// (see [`Signer`]).
    pub fn finish_signed(
        mut self,
        manifest: &Manifest,
        final_path: &Path,
        signer: Option<&Signer>,
    ) -> Result<(u64, String), WriteError> {
        let body_path = self.body_path.clone();
        let body_err = |source| WriteError::File {
            path: body_path.clone(),
            source,
        };
        // The end-of-archive marker: two zero blocks.
        self.frame()
            .and_then(|enc| enc.write_all(&ZEROS))
            .and_then(|_| self.raw()?.flush())
            .map_err(body_err)?;
        self.body = None;

        let temp = durable::temp_name(final_path);
        let file_err = |source| WriteError::File {
            path: temp.clone(),
            source,
        };
        let result = (|| -> Result<(u64, String), WriteError> {
            let mut out =
                HashingWriter::new(File::create(&temp).map_err(file_err)?, Algorithm::Sha256);
            let entry = manifest_entry(manifest, signer).map_err(file_err)?;
            let mut frame = zstd::stream::write::Encoder::new(&mut out, self.compression.level)
                .map_err(file_err)?;
            frame.include_checksum(true).map_err(file_err)?;
            frame.write_all(&entry).map_err(file_err)?;
            frame.finish().map_err(file_err)?;
            let mut body = File::open(&self.body_path).map_err(body_err)?;
            io::copy(&mut body, &mut out).map_err(file_err)?;
            let size = out.bytes();
            let (out, sum) = out.finish().map_err(file_err)?;
            out.sync_all().map_err(file_err)?;
            durable::commit_rename(&temp, final_path).map_err(|source| WriteError::File {
                path: final_path.to_owned(),
                source,
            })?;
            Ok((size, sum.hex().to_owned()))
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
        // After `finish` it is gone already; after a failure it is useless.
        let _ = std::fs::remove_file(&self.body_path);
    }
}

/// Signs a manifest: given the BLAKE3 hex of `manifest.json` (what
/// `manifest.json.blake3` holds), returns an armored signature over those
/// bytes (an SSH signature, `-----BEGIN SSH SIGNATURE-----`), which the writer
/// appends to `manifest.json.blake3`. Signing the digest signs the manifest,
/// which lists every other member's checksum: the whole bundle.
pub type Signer = std::sync::Arc<dyn Fn(&str) -> io::Result<String> + Send + Sync>;

/// The SSH signature namespace of bundle signatures.
pub const SIGNATURE_NAMESPACE: &str = "ferry-bundle";

/// The tar entry (header, JSON, padding) for the manifest, and from format 3
/// on its digest (and signature), without an end marker.
fn manifest_entry(manifest: &Manifest, signer: Option<&Signer>) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(manifest)?;
    let size = json.len() as u64;
    let mtime = manifest.created_at.timestamp().max(0) as u64;
    let mut entry = tar_header("manifest.json", size, mtime)?;
    entry.extend_from_slice(&json);
    entry.extend_from_slice(padding(size));
    if manifest.format >= 3 {
        let digest = blake3::hash(&json).to_hex();
        let mut sum = format!("{digest}\n");
        if let Some(sign) = signer {
            sum.push_str(&sign(digest.as_str())?);
        }
        let size = sum.len() as u64;
        entry.extend_from_slice(&tar_header(crate::manifest::MANIFEST_SUM, size, mtime)?);
        entry.extend_from_slice(sum.as_bytes());
        entry.extend_from_slice(padding(size));
    }
    Ok(entry)
}

/// A tar header (with GNU long-name entries for a long path) for a regular file
/// of `size` bytes, mode 0644.
fn tar_header(path: &str, size: u64, mtime: u64) -> io::Result<Vec<u8>> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    // The builder writes the header (and long-name entries) and, the data being
    // empty, nothing else; its end marker goes to the Vec left behind on drop.
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut header, path, io::empty())?;
    Ok(std::mem::take(b.get_mut()))
}

/// A member compressed ahead of the bundle (see the module docs): hashes and
/// counts its bytes and writes them to `path` as one zstd frame ending with the
/// member's tar padding. Blocking.
pub struct CompressedMember {
    inner: HashingWriter<Frame>,
}

impl CompressedMember {
    pub fn create(path: &Path, compression: Compression) -> io::Result<Self> {
        let file = File::create(path)?;
        let out = BufWriter::with_capacity(256 * 1024, file);
        Ok(Self {
            inner: HashingWriter::new(frame(out, compression)?, checksum::MEMBER),
        })
    }

    /// Pads, ends the frame and closes the file; returns the member's size and
    /// checksum (of the member's bytes, not the padding).
    pub fn finish(self) -> io::Result<(u64, Checksum)> {
        let size = self.inner.bytes();
        let (mut enc, sum) = self.inner.finish()?;
        enc.write_all(padding(size))?;
        enc.finish()?.flush()?;
        Ok((size, sum))
    }
}

impl Write for CompressedMember {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    bytes: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R, algorithm: Algorithm) -> Self {
        Self {
            inner,
            hasher: Hasher::new(algorithm),
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn checksum(self) -> Checksum {
        self.hasher.finish()
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

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W, algorithm: Algorithm) -> Self {
        Self {
            inner,
            hasher: Hasher::new(algorithm),
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes and returns the inner writer with the checksum.
    pub fn finish(mut self) -> io::Result<(W, Checksum)> {
        self.inner.flush()?;
        Ok((self.inner, self.hasher.finish()))
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

    fn manifest(members: Vec<Member>) -> Manifest {
        Manifest {
            format: crate::manifest::FORMAT,
            sender_id: "t".into(),
            chain: String::new(),
            kind: Kind::Complete,
            seq: Seq(1),
            base_seq: Seq(1),
            prev_seq: None,
            created_at: chrono::Utc::now(),
            complete_every_s: None,
            source: Source {
                engine: "sqlite".into(),
                version: "3".into(),
            },
            schema_fingerprint: String::new(),
            tables: vec![],
            watermarks: Default::default(),
            snapshot_xmin: None,
            volume: None,
            members,
            seal: None,
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

        let read = read_manifest(&out, &Limits::default()).unwrap();
        assert_eq!(
            read.seal.as_ref().map(|s| s.signature.is_none()),
            Some(true)
        );
        assert_eq!(Manifest { seal: None, ..read }, m);
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
    fn members_compressed_ahead_mix_with_the_others_and_tar_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        let long = format!("data/{}.copy.000002", "t".repeat(120));
        let sizes = [0usize, 1, 511, 512, 513, 3 << 20];
        let mut expected = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
            let path = match i {
                2 => long.clone(),
                _ => format!("data/m{i}"),
            };
            if i % 2 == 0 {
                let file = dir.path().join(format!(".stage-{i}"));
                let mut c = CompressedMember::create(&file, Compression::default()).unwrap();
                c.write_all(&data).unwrap();
                let (size, sum) = c.finish().unwrap();
                assert_eq!(size, n as u64);
                assert_eq!(sum, checksum::of(checksum::MEMBER, &data));
                w.append_compressed(member(&path), size, sum, &file)
                    .unwrap();
            } else {
                w.append_reader(member(&path), n as u64, &data[..]).unwrap();
            }
            expected.push((path, data));
        }
        let m = manifest(w.members().to_vec());
        let out = dir.path().join("t-000000000001-complete.tar.zst");
        w.finish(&m, &out).unwrap();

        let mut seen = Vec::new();
        read_bundle(&out, &Limits::default(), |m, r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            seen.push((m.path.clone(), v));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, expected);
        // And a stock tar agrees, end marker included.
        let listed = std::process::Command::new("tar")
            .args(["--zstd", "-tf"])
            .arg(&out)
            .output();
        if let Ok(o) = listed
            && o.status.success()
        {
            let names: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            let mut want = vec![
                "manifest.json".to_owned(),
                crate::manifest::MANIFEST_SUM.to_owned(),
            ];
            want.extend(expected.iter().map(|(p, _)| p.clone()));
            assert_eq!(names, want);
        }
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
        m.members[0].checksum = Checksum::Blake3("00".repeat(32));
        w.finish(&m, &out).unwrap();
        let e = read_bundle(&out, &Limits::default(), |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, ReadError::Checksum { .. }), "{e}");

        let bytes = std::fs::read(&out).unwrap();
        let cut = dir.path().join("cut.tar.zst");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = read_bundle(&cut, &Limits::default(), |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("cut.tar.zst"), "{e}");
    }

    /// A format-1 bundle (SHA-256 member checksums, as ferry wrote before
    /// BLAKE3) still verifies, and a wrong SHA-256 is still refused; a format
    /// newer than this code is refused with "upgrade ferry".
    #[test]
    fn format_1_sha256_members_still_verify() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let write = |name: &str, format: u32, sum: Checksum| {
            let mut w =
                BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
            w.append_reader(member("m/data"), data.len() as u64, &data[..])
                .unwrap();
            let mut m = manifest(w.members().to_vec());
            assert!(matches!(m.members[0].checksum, Checksum::Blake3(_)));
            m.format = format;
            m.members[0].checksum = sum;
            let out = dir.path().join(name);
            w.finish(&m, &out).unwrap();
            out
        };
        let good = write("old.tar.zst", 1, checksum::of(Algorithm::Sha256, &data));
        let mut seen = Vec::new();
        read_bundle(&good, &Limits::default(), |_, r| {
            r.read_to_end(&mut seen).map(|_| ())
        })
        .unwrap();
        assert_eq!(seen, data);

        let bad = write("bad.tar.zst", 1, Checksum::Sha256("00".repeat(32)));
        let e = read_bundle(&bad, &Limits::default(), |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("sha256:00"), "{e}");

        let newer = write("new.tar.zst", 99, checksum::of(Algorithm::Blake3, &data));
        let e = read_bundle(&newer, &Limits::default(), |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("upgrade ferry"), "{e}");
    }

    /// Format 3: a manifest changed after it was written (its checksum member
    /// no longer matches) is refused, and so is a data member of a table the
    /// manifest does not list (a loader would skip it and record the bundle).
    #[test]
    fn a_damaged_or_inconsistent_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let w = BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        let m = manifest(w.members().to_vec());
        let out = dir.path().join("b.tar.zst");
        w.finish(&m, &out).unwrap();
        read_manifest(&out, &Limits::default()).unwrap();
        // Flip a byte inside manifest.json (same length, so the tar stays valid).
        let raw = zstd::decode_all(std::fs::File::open(&out).unwrap()).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.contains("\"sender_id\": \"t\""), "{text}");
        let damaged = text.replacen("\"sender_id\": \"t\"", "\"sender_id\": \"u\"", 1);
        std::fs::write(&out, zstd::encode_all(damaged.as_bytes(), 3).unwrap()).unwrap();
        let e = read_manifest(&out, &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("cannot be trusted"), "{e}");

        let w = BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        let mut m = manifest(w.members().to_vec());
        let mut data = member("data/public.t.jsonl");
        data.role = Role::Data;
        data.table = Some(crate::TableName::new(Some("p}blic"), "t"));
        m.members.push(data);
        let out = dir.path().join("c.tar.zst");
        w.finish(&m, &out).unwrap();
        let e = read_manifest(&out, &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("does not name"), "{e}");
    }

    /// Writes a volume set of complete #1 in `dir`: `volumes` volumes of one
    /// member each, then the final file with one more. Returns the final path.
    fn write_set(dir: &Path, volumes: u32, set: &str) -> PathBuf {
        use crate::manifest::{Volume, VolumeFile, bundle_file_name, volume_file_name};
        let mut earlier = Vec::new();
        let mut all = Vec::new();
        for k in 1..=volumes {
            let mut w = BundleWriter::create(&dir.join(".body"), Compression::default()).unwrap();
            let data = format!("volume {k} of {set}").into_bytes();
            w.append_reader(member(&format!("data/v{k}")), data.len() as u64, &data[..])
                .unwrap();
            let m = Manifest {
                volume: Some(Volume {
                    set: set.into(),
                    index: k,
                    earlier: vec![],
                }),
                ..manifest(w.members().to_vec())
            };
            all.extend(m.members.iter().map(|x| Member {
                volume: Some(k),
                ..x.clone()
            }));
            let file = volume_file_name("t", "", Seq(1), Kind::Complete, k);
            let (size, sha256) = w.finish(&m, &dir.join(&file)).unwrap();
            earlier.push(VolumeFile { file, size, sha256 });
        }
        let mut w = BundleWriter::create(&dir.join(".body"), Compression::default()).unwrap();
        w.append_reader(member("data/last"), 4, &b"last"[..])
            .unwrap();
        all.extend_from_slice(w.members());
        let m = Manifest {
            volume: Some(Volume {
                set: set.into(),
                index: volumes + 1,
                earlier,
            }),
            ..manifest(all)
        };
        let last = dir.join(bundle_file_name("t", "", Seq(1), Kind::Complete));
        w.finish(&m, &last).unwrap();
        last
    }

    fn read_whole_set(last: &Path) -> Result<(Manifest, Vec<String>), ReadError> {
        use crate::reader::{Arrival, read_set};
        let arrival = Arrival {
            wait: std::time::Duration::from_millis(200),
            cancelled: &|| false,
        };
        let mut seen = Vec::new();
        let mut finals = 0;
        let m = read_set(
            last,
            &Limits::default(),
            &arrival,
            &mut |m, r| {
                let mut v = String::new();
                r.read_to_string(&mut v)?;
                seen.push(format!("{}={v}", m.path));
                Ok(())
            },
            &mut |_| {
                finals += 1;
                Ok(())
            },
        )?;
        assert_eq!(finals, 1, "the final manifest is handed over once");
        Ok((m, seen))
    }

    #[test]
    fn a_volume_set_reads_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let last = write_set(dir.path(), 3, "a");
        let (m, seen) = read_whole_set(&last).unwrap();
        assert_eq!(
            seen,
            [
                "data/v1=volume 1 of a",
                "data/v2=volume 2 of a",
                "data/v3=volume 3 of a",
                "data/last=last"
            ]
        );
        assert_eq!(m.members.len(), 4, "the final manifest lists the whole set");
        // `read_bundle` checks one file: the final file's own members only (the
        // rest of the set is `read_set`'s to check).
        let own = read_bundle(&last, &Limits::default(), |_, _| Ok(())).unwrap();
        assert_eq!(own, m);
    }

    #[test]
    fn a_damaged_missing_or_foreign_volume_is_refused() {
        use crate::manifest::volume_file_name;
        let dir = tempfile::tempdir().unwrap();
        let last = write_set(dir.path(), 3, "a");
        let v2 = dir
            .path()
            .join(volume_file_name("t", "", Seq(1), Kind::Complete, 2));

        // Another attempt's volume 2 (same names, another set id).
        let other = tempfile::tempdir().unwrap();
        write_set(other.path(), 3, "b");
        let good = std::fs::read(&v2).unwrap();
        std::fs::copy(other.path().join(v2.file_name().unwrap()), &v2).unwrap();
        let e = read_whole_set(&last).unwrap_err();
        assert!(
            e.is_transient() && e.to_string().contains("another attempt"),
            "{e}"
        );

        // A volume that verifies by itself but is not the one the final file lists.
        let mut m = read_manifest(&v2, &Limits::default()).unwrap();
        m.volume.as_mut().unwrap().set = "a".into();
        let mut w =
            BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        w.append_reader(member("data/v2"), 3, &b"odd"[..]).unwrap();
        m.members = w.members().to_vec();
        w.finish(&m, &v2).unwrap();
        let e = read_whole_set(&last).unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("does not match the volumes read"),
            "{e}"
        );

        // Missing: the final file says there are three.
        std::fs::remove_file(&v2).unwrap();
        let e = read_whole_set(&last).unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("volume 2 of the set is missing"),
            "{e}"
        );

        // Not there yet, and no final file: wait, then give up (transient).
        std::fs::write(&v2, &good).unwrap();
        std::fs::remove_file(&last).unwrap();
        let e = read_whole_set(&last).unwrap_err();
        assert!(
            e.is_transient() && e.to_string().contains("volume 4 did not arrive"),
            "{e}"
        );
    }

    #[test]
    fn a_one_file_bundle_beside_stale_volumes_is_read_alone() {
        let dir = tempfile::tempdir().unwrap();
        let last = write_set(dir.path(), 2, "a");
        // The next attempt wrote the complete as one file.
        let mut w =
            BundleWriter::create(&dir.path().join(".body"), Compression::default()).unwrap();
        w.append_reader(member("data/only"), 4, &b"only"[..])
            .unwrap();
        let m = manifest(w.members().to_vec());
        w.finish(&m, &last).unwrap();
        let arrival = crate::reader::Arrival {
            wait: std::time::Duration::ZERO,
            cancelled: &|| false,
        };
        let mut seen = Vec::new();
        let got = crate::reader::read_set(
            &last,
            &Limits::default(),
            &arrival,
            &mut |m, _| {
                seen.push(m.path.clone());
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
        assert_eq!(Manifest { seal: None, ..got }, m);
        assert_eq!(seen, ["data/only"]);
    }
}
