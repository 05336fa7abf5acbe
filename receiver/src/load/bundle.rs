//! One way in for the live chain: a bundle file and a target. [`Target::load`]
//! verifies the bundle (streaming a PostgreSQL complete into the database
//! while it is verified, staging everything else first), installs its media,
//! and commits its data with the ledger row and SQL hooks in one transaction.
//! It knows nothing of inboxes: the caller says where the bundle is, what it
//! must be ([`LoadJob::expect`], checked on the verified manifest before
//! anything commits) and where media go.

use super::{LoadError, Target};
use crate::media::{self, MediaError};
use crate::verify;
use ferry_common::manifest::{Kind, Manifest};
use ferry_common::reader::{Limits, ReadError, read_manifest};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("verification failed: {0}")]
    Verify(#[from] ReadError),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    NoSpace(#[from] crate::space::NoSpace),
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Load(e) => e.is_transient(),
            ApplyError::Verify(e) => e.is_transient(),
            // The operator frees space; the bundle is not at fault.
            ApplyError::NoSpace(_) => true,
            _ => false,
        }
    }
}

/// What [`Target::load`] loads and records.
pub struct LoadJob<'a> {
    /// The bundle (a volume set's final file).
    pub path: PathBuf,
    /// The file whose manifest describes the bundle before it is read (the
    /// first volume of a set still arriving).
    pub header: PathBuf,
    /// A directory of its own for staged members (emptied, then removed).
    pub staging: PathBuf,
    pub limits: Limits,
    /// How long a volume set waits for each next volume.
    pub wait: Duration,
    /// The kind the bundle must be (a complete may stream).
    pub kind: Kind,
    /// The file name the ledger records.
    pub file: &'a str,
    /// SQL run in the load's transaction.
    pub sql_hooks: Vec<String>,
    /// Where each media set's files go.
    pub media: &'a BTreeMap<String, PathBuf>,
    /// Connections a PostgreSQL complete loads on.
    pub jobs: usize,
    /// What the verified manifest must be (the caller's name check).
    pub expect: &'a (dyn Fn(&Manifest) -> Result<(), ApplyError> + Send + Sync),
    pub started: Instant,
}

impl Target {
    /// Whether a bundle of `kind` streams into this target while it is
    /// verified (so its table data needs no staging space).
    pub fn streams(&self, kind: Kind) -> bool {
        kind == Kind::Complete && matches!(self, Target::Postgres(_))
    }

    /// Verifies and commits one bundle; returns its rows, media files and
    /// manifest.
    pub async fn load(&mut self, job: &LoadJob<'_>) -> Result<(u64, u64, Manifest), ApplyError> {
        if job.kind == Kind::Complete
            && let Target::Postgres(pg) = self
        {
            let mut loaded = streamed_complete(pg, job, job.jobs).await;
            if job.jobs > 1 && loaded.is_err() {
                super::staged::abandon(pg).await;
                if let Err(ApplyError::Load(err)) = &loaded
                    && !err.is_transient()
                {
                    tracing::warn!(error = %err, "the parallel load could not be staged; loading in one transaction instead");
                    loaded = streamed_complete(pg, job, 1).await;
                }
            }
            let staging = job.staging.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&staging)).await;
            return loaded;
        }
        let (path, staging) = (job.path.clone(), job.staging.clone());
        let (limits, wait) = (job.limits.clone(), job.wait);
        let v = tokio::task::spawn_blocking(move || verify::stage(&path, &staging, &limits, wait))
            .await
            .map_err(|j| ApplyError::Mismatch(format!("verification panicked: {j}")))??;
        tracing::info!(
            ms = job.started.elapsed().as_millis() as u64,
            "bundle verified and staged"
        );
        (job.expect)(&v.manifest)?;
        let media_files = media::install(&v, job.media).await?;
        let rows = self.apply(&v, job.file, &job.sql_hooks).await?;
        Ok((rows, media_files, v.manifest.clone()))
    }
}

/// A PostgreSQL complete, verified while it loads: COPY data streams from the
/// bundle into the database, and the load transaction commits only after every
/// checksum matched (no staging copy of the data, and reading overlaps loading).
/// With `jobs` > 1 tables load in parallel into staging schemas and are swapped
/// in (`load::staged`); with 1, everything happens in the load transaction.
async fn streamed_complete(
    pg: &mut super::postgres::PgTarget,
    job: &LoadJob<'_>,
    jobs: usize,
) -> Result<(u64, u64, Manifest), ApplyError> {
    let fire = pg.fire_triggers;
    let manifest = read_manifest(&job.header, &job.limits)?;
    (job.expect)(&manifest)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (path, dir) = (job.path.clone(), job.staging.clone());
    let (limits, wait) = (job.limits.clone(), job.wait);
    let reader =
        tokio::task::spawn_blocking(move || verify::stream(&path, &dir, &limits, wait, &tx));
    let begun = if jobs > 1 {
        super::staged::begin(pg, &manifest, &mut rx, jobs).await
    } else {
        pg.begin_streamed_complete(&manifest, &mut rx).await
    };
    drop(rx); // unblocks the reader if loading stopped early
    let verified = reader
        .await
        .map_err(|j| ApplyError::Mismatch(format!("verification panicked: {j}")))?;
    // A bundle that failed verification for its own reasons (corrupted,
    // truncated) is reported as such, whatever the database made of the data
    // that streamed before the failure showed.
    let read_failed_alone = matches!(&verified, Err(e) if !matches!(e, ReadError::Stopped { .. }));
    let loaded: Result<(u64, u64, Manifest), ApplyError> = match (begun, verified) {
        (_, Err(read)) if read_failed_alone => Err(read.into()),
        // The loader's own failure explains more than "the loader stopped".
        (Err(err), _) => Err(err.into()),
        (Ok(_), Err(read)) => Err(read.into()),
        (Ok((tx, rows, media)), Ok(all)) => {
            (job.expect)(&all)?;
            let media_files = media::install_owned(media, job.media.clone()).await?;
            super::postgres::finish(tx, &all, job.file, rows, &job.sql_hooks, fire).await?;
            Ok((rows, media_files, all))
        }
    };
    let (rows, media_files, all) = loaded?;
    if jobs > 1 {
        super::staged::after_commit(pg).await;
    }
    Ok((rows, media_files, all))
}
