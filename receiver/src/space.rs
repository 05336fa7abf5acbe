//! Free space before staging: a bundle is only staged (and its media
//! installed) when the file systems that receive it keep a margin free after
//! it. A bundle that declares more than that — a huge media member, say,
//! even with a correct checksum — waits with an error naming the file system
//! and the numbers, instead of filling the disk the receiver and its database
//! live on.

use crate::config::{Config, KeepFree};
use ferry_common::manifest::{DataFormat, Manifest, Role};
use std::path::{Path, PathBuf};

/// Not enough room for a bundle on a file system.
#[derive(Debug, thiserror::Error)]
#[error(
    "not enough free space for bundle {bundle} in {}: it needs {needed} bytes there and {free} are \
     free, of which {margin} ({rule}) must stay free; free space there (or move `state_dir` or \
     the media directories, or lower `[limits] keep_free`), then it is loaded — nothing of it was applied",
    dir.display()
)]
pub struct NoSpace {
    pub bundle: String,
    pub dir: PathBuf,
    pub needed: u64,
    pub free: u64,
    pub margin: u64,
    pub rule: KeepFree,
}

/// (file system id, free bytes for an unprivileged writer, total bytes) of the
/// file system holding `dir` (or its nearest existing ancestor).
fn space(dir: &Path) -> Option<(u64, u64, u64)> {
    let mut at = dir;
    loop {
        if let Ok(s) = rustix::fs::statvfs(at) {
            let unit = s.f_frsize;
            return Some((
                s.f_fsid,
                s.f_bavail.saturating_mul(unit),
                s.f_blocks.saturating_mul(unit),
            ));
        }
        at = at.parent()?;
    }
}

/// Checks that staging `m` (all members, or only those not streamed straight
/// into PostgreSQL when `streamed`) and installing its media leaves the margin
/// on every file system involved (staging and media on one file system count
/// together: a media file is staged, then copied).
pub fn check(config: &Config, bundle: &str, m: &Manifest, streamed: bool) -> Result<(), NoSpace> {
    let staged: u64 = m
        .members
        .iter()
        .filter(|x| {
            !(streamed
                && x.role == Role::Data
                && matches!(
                    x.format,
                    Some(DataFormat::PgCopyText | DataFormat::PgCopyBinary)
                ))
        })
        .map(|x| x.size)
        .sum();
    let mut wants: Vec<(PathBuf, u64)> = vec![(config.staging_dir(), staged)];
    for x in m.members.iter().filter(|x| x.role == Role::Media) {
        if let Some(dir) = x.media_set.as_ref().and_then(|s| config.media.get(s)) {
            wants.push((dir.clone(), x.size));
        }
    }
    // (fsid, a directory on it, bytes needed, free, total)
    let mut per_fs: Vec<(u64, PathBuf, u64, u64, u64)> = Vec::new();
    for (dir, n) in wants {
        let Some((fsid, free, total)) = space(&dir) else {
            continue;
        };
        match per_fs.iter_mut().find(|f| f.0 == fsid) {
            Some(f) => f.2 += n,
            None => per_fs.push((fsid, dir, n, free, total)),
        }
    }
    for (_, dir, needed, free, total) in per_fs {
        let margin = config.limits.keep_free.of(total);
        if needed.saturating_add(margin) > free {
            return Err(NoSpace {
                bundle: bundle.to_owned(),
                dir,
                needed,
                free,
                margin,
                rule: config.limits.keep_free,
            });
        }
    }
    Ok(())
}
