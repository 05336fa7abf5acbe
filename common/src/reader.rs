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
use crate::manifest::{FORMAT, Manifest, Member};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// Bounds applied while reading.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted total of member sizes (decompressed).
    pub max_bytes: u64,
    /// Largest accepted manifest.
    pub max_manifest_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 40,
            max_manifest_bytes: 64 << 20,
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
}

impl ReadError {
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
    if manifest.format != FORMAT {
        return Err(ReadError::malformed(
            bundle,
            format!(
                "format {} is not supported (this ferry reads format {FORMAT}); upgrade ferry",
                manifest.format
            ),
        ));
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

/// Reads and verifies a whole bundle, handing each member to `on_member` with a
/// reader over its content. Returns the manifest once everything checked out; any
/// error means the bundle must not be applied.
pub fn read_bundle(
    bundle: &Path,
    limits: &Limits,
    mut on_member: impl FnMut(&Member, &mut dyn Read) -> io::Result<()>,
) -> Result<Manifest, ReadError> {
    let io_err = |source| ReadError::Io {
        bundle: bundle.to_owned(),
        source,
    };
    let file = File::open(bundle).map_err(io_err)?;
    let dec = zstd::stream::read::Decoder::new(BufReader::with_capacity(256 * 1024, file))
        .map_err(io_err)?;
    let mut archive = tar::Archive::new(dec);
    let mut entries = archive.entries().map_err(io_err)?;
    let manifest = first_manifest(bundle, &mut entries, limits)?;
    let mut expected: HashMap<&str, &Member> = manifest
        .members
        .iter()
        .map(|m| (m.path.as_str(), m))
        .collect();
    if expected.len() != manifest.members.len() {
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
        let mut hashing = HashingReader::new(entry);
        on_member(member, &mut hashing)
            .map_err(|e| ReadError::malformed(bundle, format!("member {path} unreadable: {e}")))?;
        io::copy(&mut hashing, &mut io::sink())
            .map_err(|e| ReadError::malformed(bundle, format!("member {path} unreadable: {e}")))?;
        let actual = hashing.hex_digest();
        if actual != member.sha256 {
            return Err(ReadError::Checksum {
                bundle: bundle.to_owned(),
                path,
                expected: member.sha256.clone(),
                actual,
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
