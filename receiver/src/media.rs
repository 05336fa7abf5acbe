//! Media: each `media/<set>/<path>` member is written into the directory the
//! configuration maps `<set>` to, before the rows that reference it commit. Paths
//! were checked by verification (relative, no `..`); files are written under a
//! temporary name and renamed, so a re-delivered file does no harm and a reader
//! never sees half a file. Symlinks already inside the media directory are not
//! followed for the final component (rename replaces the link itself).

use crate::verify::Verified;
use ferry_common::manifest::{Member, Role};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error(
        "media set {set:?} is not configured on this receiver: add `{set} = \"/path\"` under [media]"
    )]
    UnknownSet { set: String },
    #[error("unsafe media path {0:?}")]
    Unsafe(String),
    #[error("could not write media file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Installs every media member of a staged bundle; returns the number of files.
/// The writes and fsyncs run on a blocking thread, off the runtime.
pub async fn install(v: &Verified, sets: &BTreeMap<String, PathBuf>) -> Result<u64, MediaError> {
    let items = v
        .manifest
        .members
        .iter()
        .filter(|m| m.role == Role::Media)
        .map(|m| (m.clone(), v.file(m).to_owned()))
        .collect();
    install_owned(items, sets.clone()).await
}

/// [`install_files`] for owned members, on a blocking thread.
pub async fn install_owned(
    items: Vec<(Member, PathBuf)>,
    sets: BTreeMap<String, PathBuf>,
) -> Result<u64, MediaError> {
    tokio::task::spawn_blocking(move || {
        install_files(items.iter().map(|(m, p)| (m, p.as_path())), &sets)
    })
    .await
    .map_err(|e| MediaError::Io {
        path: PathBuf::new(),
        source: std::io::Error::other(format!("the media writer failed: {e}")),
    })?
}

/// Installs media members from their verified staged files.
pub fn install_files<'a>(
    items: impl Iterator<Item = (&'a Member, &'a Path)>,
    sets: &BTreeMap<String, PathBuf>,
) -> Result<u64, MediaError> {
    let mut n = 0;
    for (m, staged) in items {
        let set = m.media_set.clone().unwrap_or_default();
        let Some(root) = sets.get(&set) else {
            return Err(MediaError::UnknownSet { set });
        };
        let rel = m
            .path
            .strip_prefix(&format!("media/{set}/"))
            .ok_or_else(|| MediaError::Unsafe(m.path.clone()))?;
        let rel = Path::new(rel);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(MediaError::Unsafe(m.path.clone()));
        }
        let dest = root.join(rel);
        let io = |source| MediaError::Io {
            path: dest.clone(),
            source,
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let temp = ferry_common::durable::temp_name(&dest);
        std::fs::copy(staged, &temp).map_err(io)?;
        std::fs::File::open(&temp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&temp, &dest).map_err(io)?;
        n += 1;
    }
    Ok(n)
}
