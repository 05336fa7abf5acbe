//! The outbox: `<state_dir>/outbox`, where finished bundles wait to be pushed.
//!
//! Only final names (`<sender>-<seq>-<kind>.tar.zst`) are bundles; names starting
//! with `.` are temporaries that a crash may leave behind and that are removed at
//! start. Staged members live in `<state_dir>/staging`, emptied at start too.

use crate::state::{State, StateError};
use ferry_common::durable::is_temp_name;
use ferry_common::manifest::{Seq, parse_bundle_file_name, parse_volume_file_name};
use ferry_common::reader::{Limits, read_manifest};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("bundle {} in the outbox could not be read back ({source}); move it aside and run again", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: ferry_common::reader::ReadError,
    },
}

/// A bundle waiting in the outbox.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pending {
    /// The sender state's chain the bundle belongs to (empty: older than chains).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub chain: String,
    pub seq: u64,
    pub kind: String,
    pub file: String,
    pub bytes: u64,
    /// A volume of a complete sent in volumes (see `crate::bundle`): its place
    /// in the set. Volumes go before their set's final file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<u32>,
}

pub fn staging_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("staging")
}

/// Creates the outbox and staging directories and removes temporaries left by a
/// crash. Call with the state lock held.
pub fn prepare(state_dir: &Path) -> Result<(), OutboxError> {
    let outbox = state_dir.join("outbox");
    let staging = staging_dir(state_dir);
    for dir in [&outbox, &staging] {
        std::fs::create_dir_all(dir).map_err(|source| OutboxError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    for dir in [&outbox, &staging] {
        let entries = std::fs::read_dir(dir).map_err(|source| OutboxError::Io {
            path: dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_temp_name(&name) {
                tracing::warn!(file = %e.path().display(), "removing a temporary file left by an interrupted run");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// The finished bundles of `sender_id` in the outbox, in sequence order.
pub fn list(outbox: &Path, sender_id: &str) -> Result<Vec<Pending>, OutboxError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(outbox) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(OutboxError::Io {
                path: outbox.to_owned(),
                source,
            });
        }
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let parsed = parse_bundle_file_name(&name)
            .map(|b| (b, None))
            .or_else(|| parse_volume_file_name(&name).map(|(b, i)| (b, Some(i))));
        if let Some((b, volume)) = parsed
            && b.sender == sender_id
        {
            out.push(Pending {
                chain: b.chain,
                seq: b.seq.0,
                kind: b.kind.to_string(),
                file: name,
                bytes: e.metadata().map(|m| m.len()).unwrap_or(0),
                volume,
            });
        }
    }
    out.sort_by_key(|p| (p.seq, p.volume.unwrap_or(u32::MAX)));
    Ok(out)
}

/// Adopts bundles that reached the outbox but not the state (a crash between the
/// rename and the state commit): their manifests carry the watermarks. `sent/`
/// is read too: a bundle delivered before it was recorded (possible before pushes
/// waited for the state) must not have its seq issued again with other rows.
/// Then removes the volumes of an attempt that never finished (see `crate::bundle`):
/// its seq is taken again, by a new set.
pub async fn recover(
    state: &mut State,
    outbox: &Path,
    sent: &Path,
    sender_id: &str,
) -> Result<(), OutboxError> {
    let mut found: Vec<(PathBuf, Pending)> = Vec::new();
    let chain = state.chain().await?;
    for dir in [outbox, sent] {
        for p in list(dir, sender_id)? {
            if p.chain != chain {
                // Left by a state this one replaced (state.db was removed): its
                // seqs are not this chain's, so it is never adopted or sent.
                if dir == outbox {
                    tracing::warn!(file = %p.file, dir = %dir.display(), chain = %chain, "a bundle of another chain (an earlier sender state) is in the outbox; it is not sent: remove it");
                }
                continue;
            }
            if p.volume.is_none() {
                found.push((dir.join(&p.file), p));
            }
        }
    }
    found.sort_by_key(|(_, p)| p.seq);
    for (path, p) in found {
        let last = state.last(None).await?.map_or(0, |b| b.seq);
        if p.seq <= last {
            continue;
        }
        let manifest =
            read_manifest(&path, &Limits::default()).map_err(|source| OutboxError::Unreadable {
                path: path.clone(),
                source,
            })?;
        if manifest.seq != Seq(p.seq) {
            continue;
        }
        tracing::warn!(bundle = %p.file, seq = p.seq, "adopting a bundle the previous run wrote but did not record");
        // The line fingerprints are not in the manifest: the next partial may re-send
        // a few overlap rows, which is harmless.
        state
            .commit_bundle(&manifest, &p.file, p.bytes, 0, &[], &Default::default())
            .await?;
    }
    let last = state.last(None).await?.map_or(0, |b| b.seq);
    for p in list(outbox, sender_id)? {
        if p.volume.is_some() && p.seq > last {
            tracing::warn!(volume = %p.file, "removing a volume of a complete an interrupted run did not finish");
            let path = outbox.join(&p.file);
            std::fs::remove_file(&path).map_err(|source| OutboxError::Io { path, source })?;
        }
    }
    Ok(())
}
