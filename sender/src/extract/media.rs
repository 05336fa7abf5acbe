//! Media: the files of each configured media set, shipped as
//! `media/<set>/<relative path>`. A complete takes every file; a partial the files
//! whose size or modification time differ from what the media index recorded.
//!
//! Each file is copied to a staged file first (hashing on the way) so that a file
//! that changes while being read cannot corrupt the bundle: the copy is what is
//! sent, and the modification time recorded is the one seen *before* the copy, so
//! a file modified during the copy is sent again by the next partial. Deleted
//! media files are not propagated (see docs/change-capture.md).

use super::ExtractError;
use super::stage::{Stager, member};
use crate::config::MediaSet;
use crate::state::State;
use ferry_common::manifest::Role;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

/// A media file found by a scan.
#[derive(Debug)]
pub struct MediaFile {
    pub set: String,
    pub rel: String,
    pub abs: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
}

/// Lists the regular files of a media set (symlinks are not followed, so a set
/// cannot leak files from outside its directory). Blocking.
pub fn scan(set: &MediaSet) -> Result<Vec<MediaFile>, ExtractError> {
    let mut out = Vec::new();
    if !set.path.is_dir() {
        return Err(ExtractError::Selection(format!(
            "media set {:?}: {} is not a directory; fix `[[media]] path`",
            set.name,
            set.path.display()
        )));
    }
    for entry in walkdir::WalkDir::new(&set.path)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            ExtractError::stage(format!("media set {}", set.name))(std::io::Error::other(e))
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(&set.path) else {
            continue;
        };
        let Some(rel) = rel.to_str().map(str::to_owned) else {
            tracing::warn!(file = %entry.path().display(), "skipping a media file whose name is not UTF-8");
            continue;
        };
        let meta = entry
            .metadata()
            .map_err(|e| ExtractError::stage(rel.clone())(std::io::Error::other(e)))?;
        out.push(MediaFile {
            set: set.name.clone(),
            rel,
            abs: entry.path().to_owned(),
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
        });
    }
    Ok(out)
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Stages the media of every set: all files, or (`state` given) only new and
/// changed ones. Returns the number of files staged.
pub async fn stage_media(
    sets: &[MediaSet],
    mut state: Option<&mut State>,
    stager: &Stager,
) -> Result<u64, ExtractError> {
    let mut count = 0;
    for set in sets {
        let set_owned = set.clone();
        let files = tokio::task::spawn_blocking(move || scan(&set_owned))
            .await
            .map_err(|e| ExtractError::WriterGone(format!("media scan panicked: {e}")))??;
        for f in files {
            if let Some(state) = state.as_deref_mut() {
                let seen = state
                    .media_entry(&f.set, &f.rel)
                    .await
                    .map_err(|e| ExtractError::Selection(e.to_string()))?;
                if seen == Some((f.size, f.mtime_ns)) {
                    continue;
                }
            }
            let stager2 = stager.clone();
            let staged = tokio::task::spawn_blocking(move || copy_to_stage(&f, &stager2))
                .await
                .map_err(|e| ExtractError::WriterGone(format!("media copy panicked: {e}")))??;
            if let Some(staged) = staged {
                stager.send(staged).await?;
                count += 1;
            }
        }
    }
    Ok(count)
}

fn copy_to_stage(f: &MediaFile, stager: &Stager) -> Result<Option<super::Staged>, ExtractError> {
    let mut src = match std::fs::File::open(&f.abs) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(file = %f.abs.display(), "media file vanished before it was read");
            return Ok(None);
        }
        Err(e) => return Err(ExtractError::stage(f.abs.display().to_string())(e)),
    };
    let mut m = member(format!("media/{}/{}", f.set, f.rel), Role::Media);
    m.media_set = Some(f.set.clone());
    m.mtime_ns = Some(f.mtime_ns);
    let mut w = stager.create(m)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = std::io::Read::read(&mut src, &mut buf)
            .map_err(ExtractError::stage(f.abs.display().to_string()))?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n])?;
    }
    w.finish(false).map(Some)
}
