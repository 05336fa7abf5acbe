//! One job: a complete or a partial, from the lock to the committed state.
//!
//! extract → stage → bundle → outbox → state. The watermarks move only after the
//! bundle is durable in the outbox; an interrupted job leaves temporaries that the
//! next start removes, and the same rows are taken again.

use crate::bundle::{Assembly, VolumePlan};
use crate::config::Config;
use crate::extract::stage::Dedup;
use crate::extract::{
    DELETES_KEY, ExtractError, ExtractSettings, Source, Stager, TableMeta, media,
};
use crate::outbox::{self, OutboxError};
use crate::state::{State, StateError};
use ferry_common::bundle::Compression;
use ferry_common::health::JobRecord;
use ferry_common::lock::{LockError, StateLock};
use ferry_common::manifest::{self, FORMAT, Kind, Manifest, Seq};
use std::path::PathBuf;
use std::time::Instant;

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error("could not write the bundle: {0}")]
    Write(#[from] ferry_common::bundle::WriteError),
    #[error(
        "no complete bundle yet, so a partial has nothing to build on: run `ferry-sender complete` first"
    )]
    NoComplete,
    #[error("{0}")]
    SigningKey(String),
    #[error("{0}")]
    Tables(String),
}

impl JobError {
    /// Whether the same job can succeed later without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            JobError::Lock(LockError::Busy { .. }) => true,
            JobError::Extract(e) => e.is_transient(),
            JobError::Write(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Records how a job ended for `status` (`<state_dir>/health/<kind>.json`). A
/// job that did not start because another one holds the lock is no failure.
pub fn record(config: &Config, kind: Kind, outcome: &Result<JobOutcome, JobError>) {
    // What the job became: a complete of chosen tables is a partial.
    let kind = outcome.as_ref().map_or(kind, |o| o.kind);
    crate::metrics::get().job(kind, outcome);
    let job = kind.to_string();
    match outcome {
        Ok(_) => JobRecord::record_ok(&config.state_dir, &job),
        Err(JobError::Lock(LockError::Busy { .. })) => {}
        Err(e) => {
            JobRecord::record_failure(&config.state_dir, &job, &e.to_string(), !e.is_transient())
        }
    }
}

/// What a job produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobOutcome {
    pub kind: Kind,
    /// `None` when a partial found nothing to send (no bundle written).
    pub seq: Option<u64>,
    pub file: Option<PathBuf>,
    pub rows: u64,
    pub bytes: u64,
    pub tables: usize,
    pub media_files: u64,
    pub duration_ms: u64,
    /// Set when a partial was asked for but the schema changed since the complete.
    pub note: Option<String>,
}

/// Takes a complete or a partial. Holds the state lock for its duration.
pub async fn run(config: &Config, requested: Kind) -> Result<JobOutcome, JobError> {
    run_sealing(config, requested, &[], None).await
}

/// [`run`], telling `sealed` each time a volume of a complete is in the outbox
/// (for a push beside the job; see `crate::bundle`). `tables` (patterns)
/// makes a complete of just those tables: see [`force_whole`].
pub async fn run_sealing(
    config: &Config,
    requested: Kind,
    tables: &[String],
    sealed: Option<tokio::sync::watch::Sender<u32>>,
) -> Result<JobOutcome, JobError> {
    let lock = StateLock::acquire(&config.state_dir)?;
    run_locked(config, requested, tables, &lock, sealed, false).await
}

/// The selected tables' schema fingerprint: columns, types and keys, and for
/// partitioned tables their partitions (a database without any fingerprints
/// as before partitions counted, so no complete is forced by an upgrade).
fn schema_fingerprint(tables: &[TableMeta]) -> String {
    use sha2::{Digest, Sha256};
    let infos: Vec<_> = tables.iter().map(|t| t.info.clone()).collect();
    let base = manifest::schema_fingerprint(&infos);
    let mut layouts: Vec<(String, &str)> = tables
        .iter()
        .filter_map(|t| t.partitions.as_deref().map(|p| (t.key(), p)))
        .collect();
    if layouts.is_empty() {
        return base;
    }
    layouts.sort();
    let mut h = Sha256::new();
    h.update(base.as_bytes());
    for (table, layout) in layouts {
        h.update(format!("\npartitions of {table}\n{layout}").as_bytes());
    }
    hex::encode(h.finalize())
}

/// A complete of chosen tables (`ferry-sender complete --table`): it travels
/// as the chain's next partial, carrying those tables whole, so the receiver
/// replaces exactly their rows (an upsert of the set and a delete of every row
/// it lacks, in the bundle's one transaction) and the chain goes on. Every
/// pattern must name a selected table with a primary key. Returns the tables'
/// names.
fn force_whole(tables: &mut [TableMeta], patterns: &[String]) -> Result<Vec<String>, JobError> {
    let mut chosen = Vec::new();
    for p in patterns {
        let pattern = glob::Pattern::new(p)
            .map_err(|e| JobError::Tables(format!("--table {p:?} is not a pattern ({e})")))?;
        let mut matched = false;
        for t in tables.iter_mut() {
            if !pattern.matches_with(&t.key(), crate::config::GLOB_OPTIONS) {
                continue;
            }
            matched = true;
            if t.info.primary_key.is_empty() {
                return Err(JobError::Tables(format!(
                    "{} has no primary key, so it cannot be replaced by itself; take a full \
                     complete (`ferry-sender complete` without --table)",
                    t.key()
                )));
            }
            t.carry = crate::config::Carry::Whole;
            if !chosen.contains(&t.key()) {
                chosen.push(t.key());
            }
        }
        if !matched {
            return Err(JobError::Tables(format!(
                "--table {p:?} matches no selected table (names are `schema.table`; \
                 `ferry-sender check` lists the selected ones)"
            )));
        }
    }
    Ok(chosen)
}

/// The tables a complete may carry from the complete that last dumped them
/// (if the extraction proves them unchanged): described the same, in the
/// configured COPY format, dumped fewer than `[complete] carry_unchanged`
/// completes ago.
async fn carry_candidates(
    config: &Config,
    state: &mut State,
    tables: &[TableMeta],
) -> Result<std::collections::HashMap<String, Vec<manifest::Member>>, JobError> {
    let mut out = std::collections::HashMap::new();
    if config.complete.carry_unchanged == 0 {
        return Ok(out);
    }
    let format = match config.complete.copy_format {
        crate::config::CopyFormat::Binary => manifest::DataFormat::PgCopyBinary,
        crate::config::CopyFormat::Text => manifest::DataFormat::PgCopyText,
    };
    let homes = state.homes().await?;
    for t in tables {
        let Some(home) = homes.get(&t.key()) else {
            continue;
        };
        let Some(seq) = home
            .members
            .first()
            .and_then(|m| m.carried.as_ref())
            .map(|c| c.seq.0)
        else {
            continue;
        };
        if home.table == t.info
            && home
                .members
                .iter()
                .all(|m| m.format == Some(format) && m.carried.is_some())
            && state.completes_since(seq).await? < u64::from(config.complete.carry_unchanged)
        {
            out.insert(t.key(), home.members.clone());
        }
    }
    Ok(out)
}

/// Whether a complete was ever taken (partials need one to build on).
pub async fn has_complete(config: &Config) -> Result<bool, JobError> {
    let mut state = State::open(&config.state_dir).await?;
    Ok(state.last(Some(Kind::Complete)).await?.is_some())
}

/// What a resync did beyond its complete.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResyncOutcome {
    pub complete: JobOutcome,
    /// Queued, undelivered bundles the new complete supersedes, removed.
    pub dropped: Vec<String>,
}

/// A complete now that re-bases the chain: waits up to `wait` for a running job
/// (the daemon's, say) to finish, takes the complete, and drops the queued
/// bundles it supersedes (the receiver would skip them anyway).
pub async fn resync(config: &Config, wait: std::time::Duration) -> Result<ResyncOutcome, JobError> {
    let lock = StateLock::acquire_waiting(&config.state_dir, wait).await?;
    // Full: a receiver that needs a resync may lack what a reference points at.
    let complete = run_locked(config, Kind::Complete, &[], &lock, None, true).await;
    record(config, Kind::Complete, &complete);
    let complete = complete?;
    let seq = complete.seq.unwrap_or(0);
    let mut dropped = Vec::new();
    for b in outbox::list(&config.outbox(), &config.sender_id)? {
        if b.seq < seq {
            let path = config.outbox().join(&b.file);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(bundle = %b.file, seq = b.seq, resync_seq = seq, "dropped a queued bundle the resync supersedes");
                    dropped.push(b.file);
                }
                // A push moved it to sent/ meanwhile: nothing to drop.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(bundle = %b.file, error = %e, "could not drop a superseded bundle; the receiver will skip it")
                }
            }
        }
    }
    Ok(ResyncOutcome { complete, dropped })
}

#[tracing::instrument(skip_all, fields(sender = %config.sender_id, kind = %requested))]
async fn run_locked(
    config: &Config,
    requested: Kind,
    only: &[String],
    _lock: &StateLock,
    sealed: Option<tokio::sync::watch::Sender<u32>>,
    full: bool,
) -> Result<JobOutcome, JobError> {
    let started = Instant::now();
    let spinner = ferry_common::service::progress_spinner(format!("taking a {requested}"));
    outbox::prepare(&config.state_dir)?;
    let mut state = State::open(&config.state_dir).await?;
    let outbox_dir = config.outbox();
    outbox::recover(
        &mut state,
        &outbox_dir,
        &config.sent_dir(),
        &config.sender_id,
    )
    .await?;

    let mut source = Source::connect(config).await?;
    let mut tables = source.tables(config).await?;
    let mut settings = ExtractSettings::from_config(config);
    let fingerprint = schema_fingerprint(&tables);

    let mut kind = requested;
    let mut note = None;
    let last_complete = state.last(Some(Kind::Complete)).await?;
    let mut forced = Vec::new();
    if !only.is_empty() && requested == Kind::Complete {
        forced = force_whole(&mut tables, only)?;
        match &last_complete {
            None => return Err(JobError::NoComplete),
            Some(c) if c.schema_fingerprint != fingerprint => {
                note = Some(format!(
                    "the selected tables' schema changed since complete #{}: taking a full \
                     complete instead of one of {}",
                    c.seq,
                    forced.join(", ")
                ));
            }
            Some(_) => {
                kind = Kind::Partial;
                note = Some(format!(
                    "a complete of {}: sent whole in this partial, so the receiver replaces \
                     exactly their rows and the chain goes on",
                    forced.join(", ")
                ));
            }
        }
    }
    if kind == Kind::Partial {
        match &last_complete {
            None => return Err(JobError::NoComplete),
            Some(c) if c.schema_fingerprint != fingerprint => {
                forced.clear();
                let msg = format!(
                    "the selected tables' schema changed since complete #{} (columns, types, \
                     keys or partitions): taking a complete instead of a partial",
                    c.seq
                );
                tracing::warn!(base_seq = c.seq, "{msg}");
                note = Some(msg);
                kind = Kind::Complete;
            }
            Some(_) => {}
        }
    }
    if !settings.capture_deletes {
        source.set_delete_capture(&tables, false).await?;
    }

    // The statistics' change counters: a table whose counter moved since the
    // previous complete is dumped without a test (a hint, never a proof).
    let counters = match kind {
        Kind::Complete => source.change_counters(&tables).await?,
        Kind::Partial => Default::default(),
    };
    if kind == Kind::Complete && !full {
        let prints = state.catalog_prints().await?;
        let mut carry = carry_candidates(config, &mut state, &tables).await?;
        // No print from the previous complete, no carrying.
        carry.retain(|t, _| prints.contains_key(t));
        settings.catalog_prints = std::sync::Arc::new(prints);
        let before = state.change_counters().await?;
        carry.retain(|t, _| match (before.get(t), counters.get(t)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        });
        settings.carry = std::sync::Arc::new(carry);
    }
    let seq = state.next_seq().await?;
    let prev_seq = state.last(None).await?.map(|b| Seq(b.seq));
    let base_seq = match kind {
        Kind::Complete => seq,
        Kind::Partial => Seq(last_complete.as_ref().map_or(seq.0, |c| c.seq)),
    };
    let watermarks_before = state.watermarks().await?;

    let staging = outbox::staging_dir(&config.state_dir);
    let compression = Compression {
        level: config.bundle.zstd_level,
        workers: config.bundle.zstd_workers,
    };
    let header = Manifest {
        format: FORMAT,
        sender_id: config.sender_id.clone(),
        chain: state.chain().await?,
        kind,
        seq,
        base_seq,
        prev_seq,
        created_at: chrono::Utc::now(),
        complete_every_s: config.complete.period().map(|d| d.as_secs()),
        source: source.info(),
        schema_fingerprint: fingerprint,
        tables: tables.iter().map(|t: &TableMeta| t.info.clone()).collect(),
        watermarks: Default::default(),
        snapshot_xmin: None,
        volume: None,
        members: Vec::new(),
        seal: None,
    };
    let signer = crate::bundle::signer(config)?;
    let plan = (kind == Kind::Complete && config.bundle.volume_bytes > 0).then(|| VolumePlan {
        bytes: config.bundle.volume_bytes,
        header: header.clone(),
        outbox: outbox_dir.clone(),
        sealed,
        signer: signer.clone(),
    });
    let assembly = Assembly::start(&staging.join(".body"), compression, plan)?;
    let dedup = match kind {
        Kind::Partial => Some(std::sync::Arc::new(Dedup::new(state.sent_lines().await?))),
        Kind::Complete => None,
    };
    let stager = Stager::new(&staging, assembly.tx.clone(), dedup.clone(), compression);
    let extracted = match kind {
        Kind::Complete => source.complete(&tables, &settings, &stager).await,
        Kind::Partial => {
            source
                .partial(&tables, &watermarks_before, &settings, &stager)
                .await
        }
    };
    let media_files = match extracted {
        Ok(_) => {
            let index = (kind == Kind::Partial).then_some(&mut state);
            media::stage_media(&config.media, index, &stager).await
        }
        Err(_) => Ok(0),
    };
    drop(stager);
    let assembled = assembly.finish().await;
    let extracted = extracted?;
    let media_files = media_files?;
    let mut assembled = assembled?;
    let members = assembled.members();

    let rows = crate::bundle::data_rows(&members);
    if kind == Kind::Partial && rows == 0 && media_files == 0 && forced.is_empty() {
        // Nothing changed: no bundle, and the watermarks stay where they are
        // (always safe; the next partial looks again from the same point).
        tracing::info!(tables = tables.len(), "no changes since the last bundle");
        return Ok(JobOutcome {
            kind,
            seq: None,
            file: None,
            rows: 0,
            bytes: 0,
            tables: tables.len(),
            media_files: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            note,
        });
    }

    let mut members = members;
    let carried_tables = extracted
        .carried
        .iter()
        .filter_map(|m| m.table.clone())
        .collect::<std::collections::BTreeSet<_>>();
    members.extend(extracted.carried.iter().cloned());
    if !carried_tables.is_empty() {
        note = Some(format!(
            "{} of {} tables unchanged since the complete that dumped them: carried by reference",
            carried_tables.len(),
            tables.len()
        ));
    }
    let manifest = Manifest {
        format: if carried_tables.is_empty() {
            FORMAT
        } else {
            manifest::CARRYING_FORMAT
        },
        created_at: chrono::Utc::now(),
        watermarks: extracted.watermarks.clone(),
        snapshot_xmin: extracted.snapshot_xmin,
        volume: assembled.volume(),
        members,
        ..header
    };
    let file_name = manifest::bundle_file_name(&config.sender_id, &manifest.chain, seq, kind);
    let final_path = outbox_dir.join(&file_name);
    let writer = assembled
        .take_writer()
        .ok_or_else(|| ExtractError::WriterGone("the bundle writer is gone".into()))?;
    let (last_bytes, _) = tokio::task::spawn_blocking({
        let manifest = manifest.clone();
        let final_path = final_path.clone();
        move || writer.finish_signed(&manifest, &final_path, signer.as_ref())
    })
    .await
    .map_err(|e| ExtractError::WriterGone(format!("bundle writer panicked: {e}")))??;
    let bytes = last_bytes + assembled.volume_bytes();
    // The final file is in the outbox: a crash from here on adopts the bundle
    // at the next start (`outbox::recover`), so its volumes must stay.
    assembled.keep();
    let duration_ms = started.elapsed().as_millis() as u64;
    let sent = dedup.map(|d| d.take_sent()).unwrap_or_default();
    state
        .commit_bundle(
            &manifest,
            &file_name,
            bytes,
            duration_ms,
            &sent,
            &extracted.catalog_prints,
        )
        .await?;
    if kind == Kind::Complete {
        state.set_change_counters(&counters).await?;
    }
    spinner.finish_and_clear();
    for (table, rows, bytes) in manifest.table_totals() {
        tracing::info!(bundle = %file_name, seq = seq.0, %table, rows, bytes, "table written");
    }
    tracing::info!(
        bundle = %file_name,
        seq = seq.0,
        kind = %kind,
        rows,
        bytes,
        media_files,
        duration_ms,
        "bundle written"
    );

    if settings.capture_deletes {
        let wm = extracted.watermarks.get(DELETES_KEY).cloned().flatten();
        match source
            .prune_delete_log(wm.as_deref(), settings.delete_log_retention)
            .await
        {
            Ok(n) if n > 0 => tracing::info!(entries = n, "delete log pruned"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not prune the delete log"),
        }
    }
    Ok(JobOutcome {
        kind,
        seq: Some(seq.0),
        file: Some(final_path),
        rows,
        bytes,
        tables: tables.len(),
        media_files,
        duration_ms,
        note,
    })
}
