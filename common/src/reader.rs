//! Reading a bundle back and verifying it: the manifest comes first, every other
//! member is a regular file at a safe relative path, listed in the manifest exactly
//! once, of the announced size and checksum, and nothing listed is missing. The
//! decompressed size is bounded by the manifest's total, itself bounded by
//! [`Limits::max_bytes`], so a decompression bomb stops early.
//!
//! Members are handed to a callback as they stream past; a caller that must not
//! act on unverified data (a loader) stages them and commits only when
//! [`read_bundle`] returns `Ok`.

use crate::bundle::HashingReader;
use crate::checksum::Algorithm;
use crate::manifest::{CARRYING_FORMAT, Kind, MANIFEST_SUM, Manifest, Member, OLDEST_FORMAT, Role};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// Decides whether a manifest's sender (and signature) is trusted: `Err`
/// says why not. Checked on every manifest read, volumes included, before
/// anything the manifest lists is used.
pub type Trust = dyn Fn(&Manifest) -> Result<(), String> + Send + Sync;

/// Bounds applied while reading.
#[derive(Clone)]
pub struct Limits {
    /// Largest accepted total of member sizes (decompressed).
    pub max_bytes: u64,
    /// Largest accepted manifest.
    pub max_manifest_bytes: u64,
    /// Who may have made the bundle (`None`: anyone).
    pub trust: Option<std::sync::Arc<Trust>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_bytes", &self.max_bytes)
            .field("max_manifest_bytes", &self.max_manifest_bytes)
            .field("trust", &self.trust.is_some())
            .finish()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 40,
            max_manifest_bytes: 64 << 20,
            trust: None,
        }
    }
}

/// Why a bundle was refused. Every variant names the bundle and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("could not read bundle {}: {source}", bundle.display())]
    Io {
        bundle: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid ferry bundle: {reason}", bundle.display())]
    Malformed { bundle: PathBuf, reason: String },
    /// The receiver does not accept its sender, or its signature.
    #[error("{} is refused: {reason}", bundle.display())]
    Untrusted { bundle: PathBuf, reason: String },
    #[error("{} has an unsafe member path {path:?} (absolute, `..`, or empty); refusing the bundle", bundle.display())]
    UnsafePath { bundle: PathBuf, path: String },
    #[error("{} has member {path:?} of type {kind}; only regular files are allowed", bundle.display())]
    SpecialMember {
        bundle: PathBuf,
        path: String,
        kind: String,
    },
    #[error("{}: checksum mismatch in {path} (manifest {expected}, content {actual}); the bundle is corrupted", bundle.display())]
    Checksum {
        bundle: PathBuf,
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{}: declares {declared} bytes, more than the limit of {limit}", bundle.display())]
    TooLarge {
        bundle: PathBuf,
        declared: u64,
        limit: u64,
    },
    /// The consumer of the members (a loader) stopped taking them: its own
    /// error explains why; nothing is wrong with the bundle as far as it was read.
    #[error("{}: the loader stopped taking members", bundle.display())]
    Stopped { bundle: PathBuf },
    /// A volume set that has not (yet) arrived whole and consistent: nothing is
    /// wrong with what is there, so it is not quarantined.
    #[error("{}: {reason}; nothing of it was applied, and it is tried again when more of it arrives", bundle.display())]
    Incomplete { bundle: PathBuf, reason: String },
    /// A complete carries tables from an earlier complete whose file is not
    /// beside it: nothing is wrong with either, the history lacks a file.
    #[error(
        "{} carries {tables} unchanged from complete #{seq}, whose file {file} is not beside it; \
         copy that file into {} (from the sender's `sent` directory or a copy of the history), \
         or have the sender take a full complete (`ferry-sender resync`)",
        bundle.display(),
        bundle.parent().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    CarriedMissing {
        bundle: PathBuf,
        file: String,
        seq: u64,
        tables: String,
    },
}

/// The error a member consumer returns (inside an `io::Error`) when it stopped
/// taking members; the reader reports it as [`ReadError::Stopped`].
#[derive(Debug, thiserror::Error)]
#[error("the loader stopped")]
pub struct ConsumerStopped;

impl ConsumerStopped {
    /// `ConsumerStopped` as the `io::Error` a consumer returns.
    pub fn io() -> io::Error {
        io::Error::other(ConsumerStopped)
    }

    fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|i| i.is::<ConsumerStopped>())
    }
}

impl ReadError {
    /// Whether the same files may verify later (a volume set still arriving).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ReadError::Incomplete { .. }
                | ReadError::Stopped { .. }
                | ReadError::CarriedMissing { .. }
        )
    }

    fn incomplete(bundle: &Path, reason: impl Into<String>) -> Self {
        ReadError::Incomplete {
            bundle: bundle.to_owned(),
            reason: reason.into(),
        }
    }

    fn malformed(bundle: &Path, reason: impl Into<String>) -> Self {
        ReadError::Malformed {
            bundle: bundle.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Whether a member path is a plain relative path with no `..`, root or prefix.
pub fn is_safe_member_path(path: &str) -> bool {
    if path.is_empty() || path.contains('\0') || path.contains('\\') {
        return false;
    }
    let p = Path::new(path);
    !p.is_absolute() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Reads only the manifest (the first member) of a bundle.
pub fn read_manifest(bundle: &Path, limits: &Limits) -> Result<Manifest, ReadError> {
    let io_err = |source| ReadError::Io {
        bundle: bundle.to_owned(),
        source,
    };
    let file = File::open(bundle).map_err(io_err)?;
    let dec = zstd::stream::read::Decoder::new(file).map_err(io_err)?;
    let mut archive = tar::Archive::new(dec);
    let mut entries = archive.entries().map_err(io_err)?;
    first_manifest(bundle, &mut entries, limits)
}

fn first_manifest<R: Read>(
    bundle: &Path,
    entries: &mut tar::Entries<'_, R>,
    limits: &Limits,
) -> Result<Manifest, ReadError> {
    let entry = match entries.next() {
        Some(Ok(e)) => e,
        Some(Err(e)) => return Err(ReadError::malformed(bundle, format!("unreadable: {e}"))),
        None => return Err(ReadError::malformed(bundle, "empty archive")),
    };
    let path = entry.path_bytes().into_owned();
    if path != b"manifest.json" {
        return Err(ReadError::malformed(
            bundle,
            format!(
                "first member is {:?}, not manifest.json",
                String::from_utf8_lossy(&path)
            ),
        ));
    }
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(ReadError::malformed(
            bundle,
            "manifest.json is not a regular file",
        ));
    }
    if entry.size() > limits.max_manifest_bytes {
        return Err(ReadError::TooLarge {
            bundle: bundle.to_owned(),
            declared: entry.size(),
            limit: limits.max_manifest_bytes,
        });
    }
    let mut json = Vec::new();
    entry
        .take(limits.max_manifest_bytes)
        .read_to_end(&mut json)
        .map_err(|e| ReadError::malformed(bundle, format!("manifest unreadable: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&json)
        .map_err(|e| ReadError::malformed(bundle, format!("manifest.json: {e}")))?;
    if !(OLDEST_FORMAT..=CARRYING_FORMAT).contains(&manifest.format) {
        return Err(ReadError::malformed(
            bundle,
            format!(
                "format {} is not supported (this ferry reads formats {OLDEST_FORMAT} to {CARRYING_FORMAT}); upgrade ferry",
                manifest.format
            ),
        ));
    }
    let mut manifest = manifest;
    if manifest.format >= 3 {
        manifest.seal = Some(check_manifest_sum(bundle, entries, &json)?);
    }
    check_members_consistent(bundle, &manifest)?;
    if let Some(trust) = &limits.trust {
        trust(&manifest).map_err(|reason| ReadError::Untrusted {
            bundle: bundle.to_owned(),
            reason,
        })?;
    }
    let total: u64 = manifest.members.iter().map(|m| m.size).sum();
    if total > limits.max_bytes {
        return Err(ReadError::TooLarge {
            bundle: bundle.to_owned(),
            declared: total,
            limit: limits.max_bytes,
        });
    }
    for m in &manifest.members {
        if !is_safe_member_path(&m.path) || m.path == "manifest.json" {
            return Err(ReadError::UnsafePath {
                bundle: bundle.to_owned(),
                path: m.path.clone(),
            });
        }
    }
    Ok(manifest)
}

/// Format 3 on: the member after `manifest.json` holds its BLAKE3 (and, if
/// the bundle is signed, the signature after it).
fn check_manifest_sum<R: Read>(
    bundle: &Path,
    entries: &mut tar::Entries<'_, R>,
    json: &[u8],
) -> Result<crate::manifest::Seal, ReadError> {
    let damaged = |why: String| {
        ReadError::malformed(
            bundle,
            format!(
                "{why}: the manifest cannot be trusted; the sender must send this bundle again"
            ),
        )
    };
    let mut entry = match entries.next() {
        Some(Ok(e)) => e,
        Some(Err(e)) => return Err(damaged(format!("{MANIFEST_SUM} unreadable ({e})"))),
        None => return Err(damaged(format!("{MANIFEST_SUM} is missing"))),
    };
    if entry.path_bytes().as_ref() != MANIFEST_SUM.as_bytes()
        || entry.header().entry_type() != tar::EntryType::Regular
        || entry.size() > 16 << 10
    {
        return Err(damaged(format!(
            "the second member is {:?}, not the regular file {MANIFEST_SUM}",
            String::from_utf8_lossy(&entry.path_bytes())
        )));
    }
    let mut text = String::new();
    entry
        .read_to_string(&mut text)
        .map_err(|e| damaged(format!("{MANIFEST_SUM} unreadable ({e})")))?;
    let actual = blake3::hash(json).to_hex();
    let (stated, signature) = text.split_once('\n').unwrap_or((&text, ""));
    if stated.trim() != actual.as_str() {
        return Err(damaged(format!(
            "manifest.json has BLAKE3 {actual}, {MANIFEST_SUM} says {:.64}",
            stated.trim()
        )));
    }
    Ok(crate::manifest::Seal {
        digest: actual.to_string(),
        signature: (!signature.trim().is_empty()).then(|| signature.to_owned()),
    })
}

/// What the manifest says must hang together before anything is read by it:
/// every data member names a table the manifest lists (a loader that looked
/// members up by table would otherwise skip the rest and record the bundle as
/// applied), and every listed table appears once.
fn check_members_consistent(bundle: &Path, manifest: &Manifest) -> Result<(), ReadError> {
    let mut tables = std::collections::HashSet::new();
    for t in &manifest.tables {
        if !tables.insert(&t.name) {
            return Err(ReadError::malformed(
                bundle,
                format!("the manifest lists table {} twice", t.name),
            ));
        }
    }
    for m in &manifest.members {
        if let Some(c) = &m.carried {
            check_carried(bundle, manifest, m, c)?;
        }
        if m.role != Role::Data {
            continue;
        }
        match &m.table {
            Some(t) if tables.contains(t) => {}
            Some(t) => {
                return Err(ReadError::malformed(
                    bundle,
                    format!(
                        "data member {} is of table {t}, which the manifest's table list does not name; \
                         nothing of this bundle can be applied",
                        m.path
                    ),
                ));
            }
            None => {
                return Err(ReadError::malformed(
                    bundle,
                    format!("data member {} names no table", m.path),
                ));
            }
        }
    }
    Ok(())
}

/// A carried member must point at an earlier complete of the same sender and
/// chain, by a plain file name, from a complete of the carrying format.
fn check_carried(
    bundle: &Path,
    manifest: &Manifest,
    m: &Member,
    c: &crate::manifest::Carried,
) -> Result<(), ReadError> {
    let named = crate::manifest::parse_bundle_file_name(&c.file)
        .or_else(|| crate::manifest::parse_volume_file_name(&c.file).map(|(b, _)| b));
    let fits = manifest.kind == Kind::Complete
        && manifest.format >= CARRYING_FORMAT
        && m.role == Role::Data
        && m.volume.is_none()
        && c.seq < manifest.seq
        && named.is_some_and(|n| {
            n.sender == manifest.sender_id
                && n.chain == manifest.chain
                && n.seq == c.seq
                && n.kind == Kind::Complete
        });
    if fits {
        Ok(())
    } else {
        Err(ReadError::malformed(
            bundle,
            format!(
                "member {} is carried from {:?} (#{}), which is not an earlier complete of this \
                 sender and chain",
                m.path, c.file, c.seq
            ),
        ))
    }
}

/// Hands the members a complete carries from earlier completes to `on_member`,
/// each verified in its own file: that file's manifest (sum, trust) must be of
/// the complete named, list the member with the same size and checksum, and
/// its content must match. Every file is read whole, so it is verified whole.
fn read_carried(
    last: &Path,
    limits: &Limits,
    manifest: &Manifest,
    on_member: &mut dyn FnMut(&Member, &mut dyn Read) -> io::Result<()>,
) -> Result<(), ReadError> {
    let mut by_file: std::collections::BTreeMap<&str, Vec<&Member>> = Default::default();
    for (m, c) in manifest.carried() {
        by_file.entry(c.file.as_str()).or_default().push(m);
    }
    for (file, wanted) in by_file {
        let seq = wanted[0].carried.as_ref().map_or(0, |c| c.seq.0);
        let path = last.with_file_name(file);
        if !path.is_file() {
            let mut tables: Vec<String> = wanted
                .iter()
                .filter_map(|m| m.table.as_ref().map(|t| t.to_string()))
                .collect();
            tables.dedup();
            return Err(ReadError::CarriedMissing {
                bundle: last.to_owned(),
                file: file.to_owned(),
                seq,
                tables: tables.join(", "),
            });
        }
        let held = read_manifest(&path, limits)?;
        if held.sender_id != manifest.sender_id
            || held.chain != manifest.chain
            || held.seq.0 != seq
            || held.kind != Kind::Complete
        {
            return Err(ReadError::malformed(
                &path,
                format!(
                    "{} carries members from it as complete #{seq} of sender {}, but it is {} #{} of {}",
                    last.display(),
                    manifest.sender_id,
                    held.kind,
                    held.seq,
                    held.sender_id
                ),
            ));
        }
        let mut want: HashMap<&str, &Member> = HashMap::new();
        for m in wanted {
            let same = held.members.iter().any(|h| {
                h.path == m.path
                    && h.volume.is_none()
                    && h.carried.is_none()
                    && h.size == m.size
                    && h.checksum == m.checksum
                    && h.table == m.table
                    && h.format == m.format
            });
            if !same {
                return Err(ReadError::malformed(
                    last,
                    format!(
                        "it carries member {} from {file}, which does not hold it with that size \
                         and checksum",
                        m.path
                    ),
                ));
            }
            want.insert(m.path.as_str(), m);
        }
        let mut f = |x: &Member, r: &mut dyn Read| match want.remove(x.path.as_str()) {
            Some(w) => on_member(w, r),
            None => Ok(()),
        };
        read_bundle_file(&path, limits, &mut f)?;
    }
    Ok(())
}

/// Reads and verifies a whole bundle, handing each member to `on_member` with a
/// reader over its content. Returns the manifest once everything checked out; any
/// error means the bundle must not be applied.
pub fn read_bundle(
    bundle: &Path,
    limits: &Limits,
    on_member: impl FnMut(&Member, &mut dyn Read) -> io::Result<()>,
) -> Result<Manifest, ReadError> {
    read_bundle_file(bundle, limits, on_member).map(|(m, _)| m)
}

/// The size and SHA-256 of a whole bundle file, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSum {
    pub size: u64,
    pub sha256: String,
}

/// [`read_bundle`], also returning the whole file's size and SHA-256 (what the
/// final file of a volume set lists for each earlier volume). In a set's final
/// file, members held by earlier volumes (`volume` set) are not expected here.
pub fn read_bundle_file(
    bundle: &Path,
    limits: &Limits,
    mut on_member: impl FnMut(&Member, &mut dyn Read) -> io::Result<()>,
) -> Result<(Manifest, FileSum), ReadError> {
    let io_err = |source| ReadError::Io {
        bundle: bundle.to_owned(),
        source,
    };
    let file = HashingReader::new(File::open(bundle).map_err(io_err)?, Algorithm::Sha256);
    let dec = zstd::stream::read::Decoder::new(BufReader::with_capacity(256 * 1024, file))
        .map_err(io_err)?;
    let mut archive = tar::Archive::new(dec);
    let manifest = read_members(bundle, &mut archive, limits, &mut on_member)?;
    // What follows the end-of-archive marker counts too (and must be nothing but
    // the rest of the last frame).
    let mut file = archive.into_inner().finish().into_inner().into_inner();
    io::copy(&mut file, &mut io::sink()).map_err(io_err)?;
    let sum = FileSum {
        size: HashingReader::bytes(&file),
        sha256: file.checksum().hex().to_owned(),
    };
    Ok((manifest, sum))
}

fn read_members<R: Read>(
    bundle: &Path,
    archive: &mut tar::Archive<R>,
    limits: &Limits,
    on_member: &mut impl FnMut(&Member, &mut dyn Read) -> io::Result<()>,
) -> Result<Manifest, ReadError> {
    let io_err = |source| ReadError::Io {
        bundle: bundle.to_owned(),
        source,
    };
    let mut entries = archive.entries().map_err(io_err)?;
    let manifest = first_manifest(bundle, &mut entries, limits)?;
    let here: Vec<&Member> = manifest
        .members
        .iter()
        .filter(|m| m.volume.is_none() && m.carried.is_none())
        .collect();
    let mut expected: HashMap<&str, &Member> = here.iter().map(|m| (m.path.as_str(), *m)).collect();
    let listed: std::collections::HashSet<&str> =
        manifest.members.iter().map(|m| m.path.as_str()).collect();
    if expected.len() != here.len() || listed.len() != manifest.members.len() {
        return Err(ReadError::malformed(
            bundle,
            "manifest lists a member twice",
        ));
    }
    for entry in entries {
        let entry = entry
            .map_err(|e| ReadError::malformed(bundle, format!("truncated or corrupt: {e}")))?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            return Err(ReadError::SpecialMember {
                bundle: bundle.to_owned(),
                path,
                kind: format!("{kind:?}"),
            });
        }
        if !is_safe_member_path(&path) {
            return Err(ReadError::UnsafePath {
                bundle: bundle.to_owned(),
                path,
            });
        }
        let Some(member) = expected.remove(path.as_str()) else {
            return Err(ReadError::malformed(
                bundle,
                format!("member {path:?} is not listed in the manifest (or appears twice)"),
            ));
        };
        if entry.size() != member.size {
            return Err(ReadError::malformed(
                bundle,
                format!(
                    "member {path} has {} bytes, the manifest says {}",
                    entry.size(),
                    member.size
                ),
            ));
        }
        let mut hashing = HashingReader::new(entry, member.checksum.algorithm());
        on_member(member, &mut hashing).map_err(|e| {
            if ConsumerStopped::is(&e) {
                ReadError::Stopped {
                    bundle: bundle.to_owned(),
                }
            } else {
                ReadError::malformed(bundle, format!("member {path} unreadable: {e}"))
            }
        })?;
        io::copy(&mut hashing, &mut io::sink())
            .map_err(|e| ReadError::malformed(bundle, format!("member {path} unreadable: {e}")))?;
        let actual = hashing.checksum();
        if actual != member.checksum {
            return Err(ReadError::Checksum {
                bundle: bundle.to_owned(),
                path,
                expected: member.checksum.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    if let Some(missing) = expected.keys().next() {
        return Err(ReadError::malformed(
            bundle,
            format!("member {missing} is listed in the manifest but missing (truncated bundle?)"),
        ));
    }
    Ok(manifest)
}

/// The path of volume `index` of the set whose final file is `last`.
pub fn volume_path(last: &Path, index: u32) -> PathBuf {
    let name = last.file_name().unwrap_or_default().to_string_lossy();
    let stem = name.strip_suffix(".tar.zst").unwrap_or(&name);
    last.with_file_name(format!("{stem}.v{index:04}.tar.zst"))
}

/// How [`read_set`] waits for the volumes of a set still arriving.
pub struct Arrival<'a> {
    /// How long to wait for the next file of a set.
    pub wait: std::time::Duration,
    /// Stops waiting (the caller gave up).
    pub cancelled: &'a dyn Fn() -> bool,
}

/// Reads and verifies a bundle that may be a volume set (see
/// [`Volume`](crate::manifest::Volume)), handing every member of every file to
/// `on_member` in order, like [`read_bundle`]. `last` is the bundle's ordinary
/// name: a bundle in one file is read as such. Otherwise the volumes
/// `last.v0001…` are read in turn, waiting for each (up to `arrival.wait`), and
/// then the final file, whose manifest goes to `on_final` before its members
/// (it lists every member of the set). The whole set is checked: one attempt's
/// volumes only (set id), in order, with the same header, each whole file's
/// size and SHA-256 as the final file lists it, each member where the final
/// file says, and the decompressed total within `limits`. Returns the final
/// file's manifest. Blocking.
pub fn read_set(
    last: &Path,
    limits: &Limits,
    arrival: &Arrival<'_>,
    on_member: &mut dyn FnMut(&Member, &mut dyn Read) -> io::Result<()>,
    on_final: &mut dyn FnMut(&Manifest) -> io::Result<()>,
) -> Result<Manifest, ReadError> {
    let mut read: Vec<(crate::manifest::VolumeFile, Manifest)> = Vec::new();
    let mut used = 0u64;
    loop {
        let index = read.len() as u32 + 1;
        let last_manifest = match last.try_exists() {
            Ok(true) => Some(read_manifest(last, limits)?),
            _ => None,
        };
        let volumes_in_final = last_manifest
            .as_ref()
            .map(|m| m.volume.as_ref().map_or(0, |v| v.earlier.len()));
        match (last_manifest, volumes_in_final) {
            (Some(_), Some(0)) if read.is_empty() => {
                let mut f = |m: &Member, r: &mut dyn Read| on_member(m, r);
                let m = read_bundle(last, limits, &mut f)?;
                read_carried(last, limits, &m, on_member)?;
                return Ok(m);
            }
            (Some(m), Some(n)) if n < index as usize => {
                let m = read_final(last, limits, m, &read, on_member, on_final)?;
                read_carried(last, limits, &m, on_member)?;
                return Ok(m);
            }
            _ => {}
        }
        let path = volume_path(last, index);
        if volumes_in_final.is_some() && !path.exists() {
            return Err(ReadError::malformed(
                last,
                format!("volume {index} of the set is missing"),
            ));
        }
        let started = std::time::Instant::now();
        while !path.exists() {
            if last.exists() {
                break; // decide again with the final file's list
            }
            if (arrival.cancelled)() {
                return Err(ReadError::Stopped {
                    bundle: last.to_owned(),
                });
            }
            if started.elapsed() >= arrival.wait {
                return Err(ReadError::incomplete(
                    last,
                    format!(
                        "volume {index} did not arrive within {} s of the previous one (`[limits] volume_wait`)",
                        arrival.wait.as_secs()
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !path.exists() {
            continue;
        }
        let budget = Limits {
            max_bytes: limits.max_bytes.saturating_sub(used),
            ..limits.clone()
        };
        let mut f = |m: &Member, r: &mut dyn Read| on_member(m, r);
        let (m, sum) = read_bundle_file(&path, &budget, &mut f)?;
        let Some(v) = &m.volume else {
            return Err(ReadError::malformed(
                &path,
                "a volume without a volume header",
            ));
        };
        if let Some((_, first)) = read.first() {
            let set = &first.volume.as_ref().expect("checked when read").set;
            if v.set != *set {
                return Err(ReadError::incomplete(
                    last,
                    format!(
                        "volume {index} belongs to another attempt at this bundle (set {}, not {set})",
                        v.set
                    ),
                ));
            }
            same_header(&path, first, &m)?;
        }
        if v.index != index || !v.earlier.is_empty() {
            return Err(ReadError::malformed(
                &path,
                format!(
                    "says it is volume {} of its set, its name says {index}",
                    v.index
                ),
            ));
        }
        used += m.members.iter().map(|x| x.size).sum::<u64>();
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        read.push((
            crate::manifest::VolumeFile {
                file,
                size: sum.size,
                sha256: sum.sha256,
            },
            m,
        ));
    }
}

/// The final file of a volume set, checked against the volumes read.
fn read_final(
    last: &Path,
    limits: &Limits,
    m: Manifest,
    read: &[(crate::manifest::VolumeFile, Manifest)],
    on_member: &mut dyn FnMut(&Member, &mut dyn Read) -> io::Result<()>,
    on_final: &mut dyn FnMut(&Manifest) -> io::Result<()>,
) -> Result<Manifest, ReadError> {
    let (Some(v), Some((_, first))) = (&m.volume, read.first()) else {
        return Err(ReadError::incomplete(
            last,
            "the volumes read belong to another attempt at this bundle",
        ));
    };
    let set = &first.volume.as_ref().expect("checked when read").set;
    if v.set != *set {
        return Err(ReadError::incomplete(
            last,
            format!(
                "its volumes belong to another attempt (set {set}, not {})",
                v.set
            ),
        ));
    }
    same_header(last, first, &m)?;
    let files: Vec<&crate::manifest::VolumeFile> = read.iter().map(|(f, _)| f).collect();
    if v.index as usize != read.len() + 1 || v.earlier.iter().collect::<Vec<_>>() != files {
        return Err(ReadError::malformed(
            last,
            "its list of volumes (names, sizes, SHA-256) does not match the volumes read;              a volume is damaged or missing",
        ));
    }
    let mut held = 0;
    for member in &m.members {
        let Some(k) = member.volume else { continue };
        held += 1;
        let found = read
            .get((k as usize).wrapping_sub(1))
            .and_then(|(_, vm)| vm.members.iter().find(|x| x.path == member.path));
        if found.is_none_or(|x| {
            Member {
                volume: Some(k),
                ..x.clone()
            } != *member
        }) {
            return Err(ReadError::malformed(
                last,
                format!("member {} is not in volume {k} as listed", member.path),
            ));
        }
    }
    if held != read.iter().map(|(_, vm)| vm.members.len()).sum::<usize>() {
        return Err(ReadError::malformed(
            last,
            "a volume holds a member the final file does not list",
        ));
    }
    on_final(&m).map_err(|e| {
        if ConsumerStopped::is(&e) {
            ReadError::Stopped {
                bundle: last.to_owned(),
            }
        } else {
            ReadError::Io {
                bundle: last.to_owned(),
                source: e,
            }
        }
    })?;
    let mut f = |x: &Member, r: &mut dyn Read| on_member(x, r);
    let (again, _) = read_bundle_file(last, limits, &mut f)?;
    if again != m {
        return Err(ReadError::incomplete(
            last,
            "the final file changed while it was read",
        ));
    }
    Ok(m)
}

/// Every file of a set describes the same complete.
fn same_header(path: &Path, a: &Manifest, b: &Manifest) -> Result<(), ReadError> {
    let same = a.sender_id == b.sender_id
        && a.kind == b.kind
        && a.seq == b.seq
        && a.base_seq == b.base_seq
        && a.prev_seq == b.prev_seq
        && a.schema_fingerprint == b.schema_fingerprint
        && a.tables == b.tables;
    if same {
        Ok(())
    } else {
        Err(ReadError::malformed(
            path,
            "its header (sender, seq, tables) differs from the first volume's",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        for p in ["/etc/passwd", "../x", "a/../../x", "", "a\\..\\b", "./a"] {
            assert!(!is_safe_member_path(p), "{p}");
        }
        for p in ["data/public.t.jsonl", "media/images/a b/c.jpg"] {
            assert!(is_safe_member_path(p), "{p}");
        }
    }
}
