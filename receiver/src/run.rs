//! One pass over the inbox: plan each sender's bundles against the ledger, then
//! verify → media → load (with the ledger row and SQL hooks, in one transaction) →
//! command hooks, bundle by bundle in order. A bundle that fails for good moves to
//! quarantine and the sender's later partials are held behind it; a transient
//! failure (database down) stops the pass and leaves everything in place.

use crate::config::Config;
use crate::hooks::{self, HookFailure};
use crate::inbox::{self, Entry};
use crate::load::{LoadError, Target};
use crate::plan::{self, Step};
use crate::quarantine;
use ferry_common::manifest::Manifest;
use ferry_common::reader::{Limits, read_manifest};
use std::collections::BTreeMap;
use std::time::Instant;

pub use crate::load::bundle::ApplyError;

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("reading the inbox {path}: {source}")]
    Inbox {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{bundle} was not applied and stays in the inbox: {source}")]
    Transient {
        bundle: String,
        #[source]
        source: ApplyError,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// What a pass did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub applied: Vec<AppliedBundle>,
    pub held: Vec<Held>,
    pub failed: Vec<Held>,
    pub hook_failures: Vec<(String, HookFailure)>,
    /// Pending bundles an applied newer complete superseded, removed from the inbox.
    pub dropped: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct AppliedBundle {
    pub file: String,
    pub seq: u64,
    pub kind: String,
    pub rows: u64,
    pub media_files: u64,
    pub duration_ms: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct Held {
    pub file: String,
    pub reason: String,
}

/// Plans every sender's bundles (shared by `load` and `status`). With `tidy`
/// (a pass, not `status`), the volumes of abandoned completes are removed;
/// without, they are reported as held.
pub async fn plan_all(
    config: &Config,
    target: &mut Target,
    tidy: bool,
) -> Result<Vec<Step>, PassError> {
    let inbox_err = |source| PassError::Inbox {
        path: config.inbox.display().to_string(),
        source,
    };
    let entries = if tidy {
        inbox::scan_inbox(&config.inbox)
    } else {
        inbox::scan(&config.inbox)
    }
    .map_err(inbox_err)?;
    let quarantined = inbox::scan(&config.quarantine_dir()).unwrap_or_default();
    let mut by_sender: BTreeMap<&str, Vec<Entry>> = BTreeMap::new();
    for e in &entries {
        by_sender.entry(&e.sender).or_default().push(e.clone());
    }
    let mut steps = Vec::new();
    let now = std::time::SystemTime::now();
    for (sender, mut list) in by_sender {
        // A volume set that a newer bundle of its sender overtook was
        // abandoned (the sender pushes a set's final file before anything
        // newer, and was killed before it): its volumes can never complete,
        // and waiting for them would hold the chain for `volume_wait`. If the
        // set was really lost in transit, the acknowledgement asks for it again.
        let newest = list
            .iter()
            .map(|e| (e.chain.clone(), e.seq))
            .max()
            .unwrap_or_default();
        list.retain(|e| {
            if e.arriving.is_none() || (e.chain.clone(), e.seq) >= newest {
                return true;
            }
            if !tidy {
                steps.push(Step::Hold(
                    e.clone(),
                    format!(
                        "{} volumes of a complete the sender abandoned (bundle #{newest} arrived \
                         after them): the next load removes them",
                        e.volumes.len(),
                        newest = newest.1
                    ),
                ));
                return false;
            }
            tracing::warn!(bundle = %e.file, seq = e.seq, volumes = e.volumes.len(), newer_seq = newest.1, "removing the volumes of a complete the sender abandoned (a newer bundle arrived, its final file never will)");
            for f in &e.volumes {
                let _ = std::fs::remove_file(f);
            }
            false
        });
        for e in list.iter().filter(|e| tidy && !e.stale.is_empty()) {
            tracing::warn!(bundle = %e.file, seq = e.seq, volumes = e.stale.len(), "removing the volumes of an abandoned complete whose seq the sender issued again");
            for f in &e.stale {
                let _ = std::fs::remove_file(f);
            }
        }
        // A volume set whose volumes stopped coming is not started (it would
        // only wait for them again); it starts over when more arrives.
        list.retain(|e| match e.arriving {
            Some(newest)
                if now.duration_since(newest).unwrap_or_default() >= config.limits.volume_wait =>
            {
                steps.push(Step::Hold(
                    e.clone(),
                    format!(
                        "{} of its volumes arrived, the last over {} s ago, and its final file has not;                          it starts when more arrives (the sender may have stopped mid-complete: check it)",
                        e.volumes.len(),
                        config.limits.volume_wait.as_secs()
                    ),
                ));
                false
            }
            _ => true,
        });
        let ledger = target.ledger(sender).await?;
        let q: Vec<u64> = quarantined
            .iter()
            .filter(|e| e.sender == sender)
            .map(|e| e.seq)
            .collect();
        let base_of = |e: &Entry| match read_manifest(&e.path, &Limits::default()) {
            Ok(m) => Some(m.base_seq.0),
            // Unreadable: let verification fail it and quarantine it.
            Err(_) => ledger.base_seq,
        };
        steps.extend(plan::plan(&ledger, &list, base_of, &q));
    }
    Ok(steps)
}

/// Applies every pending bundle that can be applied.
pub async fn pass(config: &Config, target: &mut Target) -> Result<Report, PassError> {
    clear_staging(config).await;
    let scanned_at = chrono::Utc::now();
    let steps = plan_all(config, target, true).await?;
    let mut report = Report::default();
    let mut stopped: BTreeMap<String, String> = BTreeMap::new();
    let mut superseded = Vec::new();
    let applying = steps.iter().filter(|s| matches!(s, Step::Apply(_))).count();
    let bar = ferry_common::service::progress_bar(
        applying as u64,
        "{msg} [{bar:30}] {pos}/{len} bundles {elapsed}",
    );
    for step in steps {
        match step {
            Step::Duplicate(e) => match reused_seq(target, &e).await? {
                None => tracing::debug!(bundle = %e.file, "already applied; left for pruning"),
                // Never skipped: its rows were never applied.
                Some(reason) => fail(config, e, reason, &mut report),
            },
            Step::Superseded(e) => superseded.push(e),
            Step::Hold(e, reason) => {
                tracing::warn!(bundle = %e.file, seq = e.seq, %reason, "bundle held");
                report.held.push(Held {
                    file: e.file,
                    reason,
                });
            }
            // Will not fix itself unless a complete comes: an ERROR.
            Step::OtherChain(e, reason) => {
                tracing::error!(bundle = %e.file, seq = e.seq, chain = %e.chain, %reason, "bundle held");
                report.held.push(Held {
                    file: e.file,
                    reason,
                });
            }
            Step::Apply(e) => {
                if let Some(reason) = stopped.get(&e.sender) {
                    report.held.push(Held {
                        file: e.file,
                        reason: reason.clone(),
                    });
                    continue;
                }
                bar.set_message(e.file.clone());
                let result = apply_one(config, target, &e).await;
                bar.inc(1);
                match result {
                    Ok((applied, hook_failures)) => {
                        quarantine::forget(&config.quarantine_dir(), &e.sender, e.seq);
                        report
                            .hook_failures
                            .extend(hook_failures.into_iter().map(|h| (e.file.clone(), h)));
                        report.applied.push(applied);
                    }
                    Err(ApplyError::Load(LoadError::AlreadyApplied { .. })) => {
                        // Another receiver on this inbox won the race: a
                        // re-delivery, left for pruning like any other.
                        tracing::info!(bundle = %e.file, seq = e.seq, "applied meanwhile by another load; skipped");
                    }
                    Err(err) if err.is_transient() => {
                        return Err(PassError::Transient {
                            bundle: e.file,
                            source: err,
                        });
                    }
                    Err(err) => {
                        stopped.insert(
                            e.sender.clone(),
                            format!(
                                "held behind quarantined bundle #{}: retry it or send a complete",
                                e.seq
                            ),
                        );
                        fail(config, e, err.to_string(), &mut report);
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    crate::metrics::get().held(report.held.len());
    drop_superseded(target, superseded, &mut report).await?;
    crate::ack::write_all(config, target, scanned_at).await?;
    Ok(report)
}

/// A bundle that failed (or was refused): one error event, the bundle moved
/// to quarantine with its reason, and a line in the report.
fn fail(config: &Config, e: Entry, reason: String, report: &mut Report) {
    crate::metrics::get().failed(&e.kind.to_string());
    tracing::error!(bundle = %e.file, seq = e.seq, kind = %e.kind, error = %reason, "load failed; bundle quarantined");
    if let Err(io) = quarantine::quarantine(&config.quarantine_dir(), &e, &reason) {
        tracing::error!(bundle = %e.file, error = %io, "could not move the bundle to quarantine; it stays in the inbox");
    }
    report.failed.push(Held {
        file: e.file,
        reason,
    });
}

/// Removes what a load killed mid-way (kill -9, power loss) left in the staging
/// directory: passes run one at a time under the state lock, so nothing there
/// belongs to a load still running.
async fn clear_staging(config: &Config) {
    let dir = config.staging_dir();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let removed = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => tracing::info!(path = %path.display(), "removed the staging files of an interrupted load"),
                Err(error) => tracing::warn!(path = %path.display(), %error, "could not remove leftover staging files"),
            }
        }
    })
    .await;
}

/// A bundle at or below the ledger is a re-delivery only if it is the bundle
/// that was applied: one with the same seq and another identity (a sender that
/// issued the seq again with other rows) is refused with the reason, never
/// skipped. Unreadable manifests and ledger rows from before identities were
/// recorded count as re-deliveries.
async fn reused_seq(target: &mut Target, e: &Entry) -> Result<Option<String>, PassError> {
    if e.arriving.is_some() {
        return Ok(None);
    }
    let Ok(m) = read_manifest(&e.path, &Limits::default()) else {
        return Ok(None);
    };
    let Some(applied) = target.applied_identity(&e.sender, &e.chain, e.seq).await? else {
        return Ok(None);
    };
    let this = m.identity();
    if applied == this {
        return Ok(None);
    }
    Ok(Some(format!(
        "bundle #{seq} of sender {} was already applied with other content (manifest {applied:.16}…, \
         this one {this:.16}…): the sender issued seq {seq} twice, so the rows of this one were never \
         applied. Run `ferry-sender resync` on the sender to re-base the copy with a complete",
        e.sender,
        seq = e.seq,
    )))
}

/// Removes pending bundles that a newer complete, now applied, superseded: they
/// can never apply (held partials of the old chain, say). While that complete
/// is not applied yet (held, failed) they stay.
async fn drop_superseded(
    target: &mut Target,
    superseded: Vec<Entry>,
    report: &mut Report,
) -> Result<(), PassError> {
    for e in superseded {
        let ledger = target.ledger(&e.sender).await?;
        let Some(base) = ledger
            .base_seq
            .filter(|_| ledger.base_after(&e.chain, e.seq))
        else {
            tracing::info!(bundle = %e.file, seq = e.seq, "superseded by a newer complete that is not applied yet");
            continue;
        };
        match e.remove() {
            Ok(()) => {
                tracing::info!(bundle = %e.file, seq = e.seq, complete_seq = base, "dropped: superseded by the applied complete");
                report.dropped.push(e.file);
            }
            Err(error) => {
                tracing::warn!(bundle = %e.file, %error, "could not drop a superseded bundle; pruning removes it later")
            }
        }
    }
    Ok(())
}

/// One event per table, then one for the bundle.
fn log_loaded(e: &Entry, m: &Manifest, rows: u64, media_files: u64, duration_ms: u64) {
    for (table, rows, bytes) in m.table_totals() {
        tracing::info!(bundle = %e.file, seq = e.seq, %table, rows, bytes, "table loaded");
    }
    tracing::info!(bundle = %e.file, seq = e.seq, kind = %e.kind, rows, media_files, duration_ms, "bundle loaded");
}

#[tracing::instrument(skip_all, fields(bundle = %e.file, seq = e.seq, kind = %e.kind))]
async fn apply_one(
    config: &Config,
    target: &mut Target,
    e: &Entry,
) -> Result<(AppliedBundle, Vec<HookFailure>), ApplyError> {
    let started = Instant::now();
    let (rows, media_files, m) = load_bundle(config, target, e, started).await?;
    crate::health::remember(&config.state_dir, &e.file, &m, rows);
    let duration_ms = started.elapsed().as_millis() as u64;
    let bytes = e
        .files()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    crate::metrics::get().applied(
        &e.kind.to_string(),
        rows,
        bytes,
        started.elapsed().as_secs_f64(),
    );
    log_loaded(e, &m, rows, media_files, duration_ms);
    let hook_failures = hooks::run_commands(&config.hooks, &m, &e.file).await;
    Ok((
        AppliedBundle {
            file: e.file.clone(),
            seq: e.seq,
            kind: e.kind.to_string(),
            rows,
            media_files,
            duration_ms,
        },
        hook_failures,
    ))
}

/// Verifies and commits one bundle; returns its rows, media files and manifest.
async fn load_bundle(
    config: &Config,
    target: &mut Target,
    e: &Entry,
    started: Instant,
) -> Result<(u64, u64, Manifest), ApplyError> {
    let streamed = target.streams(e.kind);
    // What it declares must fit before anything is staged (an unreadable
    // manifest is left to verification, which names the damage).
    if let Ok(m) = read_manifest(e.header_file(), &Limits::default()) {
        crate::space::check(config, &e.file, &m, streamed)?;
    }
    let expect = |m: &Manifest| check_name(e, m);
    let job = crate::load::bundle::LoadJob {
        path: e.path.clone(),
        header: e.header_file().to_owned(),
        staging: config.staging_dir().join(&e.file),
        limits: load_limits(config),
        wait: config.limits.volume_wait,
        kind: e.kind,
        file: &e.file,
        sql_hooks: sql_hooks(config, e),
        media: &config.media,
        jobs: config.target.jobs,
        expect: &expect,
        started,
    };
    target.load(&job).await
}

/// What every bundle read for loading is held to: its size, and the senders
/// (and keys) the configuration accepts.
fn load_limits(config: &Config) -> Limits {
    Limits {
        max_bytes: config.limits.max_bundle_bytes,
        trust: crate::trust::from_config(config),
        ..Limits::default()
    }
}

fn check_name(e: &Entry, m: &Manifest) -> Result<(), ApplyError> {
    if m.sender_id != e.sender || m.seq.0 != e.seq || m.kind != e.kind || m.chain != e.chain {
        let chain = |c: &str| {
            if c.is_empty() {
                String::new()
            } else {
                format!(" (chain {c})")
            }
        };
        return Err(ApplyError::Mismatch(format!(
            "the file name says {} #{} {}{}, the manifest says {} #{} {}{}; refusing a renamed bundle",
            e.sender,
            e.seq,
            e.kind,
            chain(&e.chain),
            m.sender_id,
            m.seq,
            m.kind,
            chain(&m.chain)
        )));
    }
    Ok(())
}

fn sql_hooks(config: &Config, e: &Entry) -> Vec<String> {
    config
        .hooks
        .iter()
        .filter(|h| h.on.iter().any(|k| k == e.kind.as_str()))
        .filter_map(|h| h.sql.clone())
        .collect()
}

/// Removes applied bundles past their lifetime; returns the files removed.
/// Removes what `[retention]` no longer keeps (see [`crate::prune`]); each
/// removed file with the reason.
pub async fn prune(
    config: &Config,
    target: &mut Target,
) -> Result<Vec<(String, String)>, PassError> {
    let entries = inbox::scan(&config.inbox).map_err(|source| PassError::Inbox {
        path: config.inbox.display().to_string(),
        source,
    })?;
    let mut ledgers = BTreeMap::new();
    for e in &entries {
        if !ledgers.contains_key(&e.sender) {
            ledgers.insert(e.sender.clone(), target.ledger(&e.sender).await?);
        }
    }
    // What each bundle builds on: the ledger knows it for every applied one;
    // only the others' manifests are read.
    let ledger_rows = target.applied_all().await?;
    let applied: std::collections::HashMap<(&str, &str, u64), u64> = ledger_rows
        .iter()
        .map(|a| {
            (
                (a.sender_id.as_str(), a.chain.as_str(), a.seq as u64),
                a.base_seq as u64,
            )
        })
        .collect();
    let base_of = |e: &Entry| {
        applied
            .get(&(e.sender.as_str(), e.chain.as_str(), e.seq))
            .copied()
            .or_else(|| {
                read_manifest(e.header_file(), &Limits::default())
                    .ok()
                    .map(|m| m.base_seq.0)
            })
    };
    // What a complete carries tables from: the ledger says (rows from before
    // it, and bundles not applied, their manifest).
    let carried: std::collections::HashMap<(&str, &str, u64), &Vec<u64>> = ledger_rows
        .iter()
        .filter_map(|a| {
            let from = a.carried_from.as_ref()?;
            Some(((a.sender_id.as_str(), a.chain.as_str(), a.seq as u64), from))
        })
        .collect();
    let carried_of = |e: &Entry| -> Vec<u64> {
        match carried.get(&(e.sender.as_str(), e.chain.as_str(), e.seq)) {
            Some(from) => from.to_vec(),
            None => read_manifest(e.header_file(), &Limits::default())
                .map(|m| m.carried().map(|(_, c)| c.seq.0).collect())
                .unwrap_or_default(),
        }
    };
    let chosen = crate::prune::select(
        &entries,
        |s| ledgers.get(s).cloned().unwrap_or_default(),
        base_of,
        carried_of,
        &config.retention,
        std::time::SystemTime::now(),
    );
    let mut removed = Vec::new();
    for (e, why) in chosen {
        match e.remove() {
            Ok(()) => {
                tracing::info!(bundle = %e.file, reason = %why, "pruned");
                removed.push((e.file.clone(), why));
            }
            Err(error) => tracing::warn!(bundle = %e.file, %error, "could not prune"),
        }
    }
    Ok(removed)
}
