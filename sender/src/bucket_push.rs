//! Delivery into an S3-compatible bucket (`[bucket]`), instead of SFTP: the
//! same outbox, the same order and the same bookkeeping (a bundle moves to
//! `sent/` once its object is complete), retried with backoff; an outage
//! leaves the bundles queued. The receivers read the bucket on their own
//! schedule; nothing here waits for them.

use crate::config::Config;
use crate::push::{PushError, PushOutcome};
use crate::state::State;
use ferry_common::bucket::{Bucket, BucketConfig};
use std::time::{Duration, Instant};

/// Attempts per push before it gives up (the bundles stay queued).
const ATTEMPTS: u32 = 3;

pub async fn push(config: &Config, cfg: &BucketConfig) -> Result<PushOutcome, PushError> {
    let started = Instant::now();
    let _push = ferry_common::lock::StateLock::acquire_named(&config.state_dir, "push.lock")
        .map_err(PushError::Busy)?;
    let bucket = Bucket::open(cfg).map_err(PushError::Config)?;
    let mut state = State::open(&config.state_dir).await?;
    let mut outcome = PushOutcome::default();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        match round(config, &bucket, &mut state, &mut outcome).await {
            Ok(()) => break Ok(()),
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                let wait = Duration::from_millis(500 << attempt.min(6));
                tracing::warn!(attempt, error = %e, wait_ms = wait.as_millis() as u64, "upload to the bucket failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => break Err(e),
        }
    };
    outcome.duration_ms = started.elapsed().as_millis() as u64;
    crate::push::record(config, &mut state, &result, &outcome).await?;
    // `sent/` keeps what the SFTP path would (from the newest complete on):
    // the bucket is the history, the copies here are for `resend`.
    let recorded = state.last(None).await?.map_or(0, |b| b.seq);
    crate::push::prune_sent(config, recorded)?;
    result.map(|()| outcome)
}

/// Uploads what is recorded and pending, in order, moving each to `sent/`.
async fn round(
    config: &Config,
    bucket: &Bucket,
    state: &mut State,
    outcome: &mut PushOutcome,
) -> Result<(), PushError> {
    let pending = crate::push::deliverable(config, state).await?;
    if pending.is_empty() {
        return Ok(());
    }
    bucket.probe().await.map_err(PushError::Bucket)?;
    for b in pending {
        let local = config.outbox().join(&b.file);
        let bytes = bucket
            .upload(&local, &b.file)
            .await
            .map_err(PushError::Bucket)?;
        tracing::info!(bundle = %b.file, bytes, bucket = %bucket.url, "bundle delivered");
        crate::push::move_to_sent(config, &b.file)?;
        outcome.delivered.push(b.file);
        outcome.bytes += bytes;
    }
    Ok(())
}

/// What `prune-bucket` removed (or, dry, would remove).
#[derive(Debug, Default, serde::Serialize)]
pub struct Pruned {
    pub removed: Vec<String>,
    pub kept: usize,
}

/// Sender-side retention of the bucket, chain-aware: in this sender's newest
/// chain, the newest `keep_completes` completes and everything after the
/// oldest of them stay (every point from there is restorable), with the
/// completes they carry tables from; older objects
/// go once they are older than `keep_for`. Other (earlier) chains' objects go
/// once older than `keep_for`, when the newest chain has those completes.
pub async fn prune(
    config: &Config,
    cfg: &BucketConfig,
    dry_run: bool,
) -> Result<Pruned, PushError> {
    use ferry_common::manifest::{Kind, parse_bundle_file_name, parse_volume_file_name};
    let Some(keep) = cfg.keep_completes.filter(|k| *k > 0) else {
        return Err(PushError::Config(
            "`[bucket] keep_completes` is not set: the sender does not delete from the bucket \
             (set it, e.g. 2, or use the bucket's lifecycle rules)"
                .into(),
        ));
    };
    let bucket = Bucket::open(cfg).map_err(PushError::Config)?;
    let listed = bucket.list_dated(None).await.map_err(PushError::Bucket)?;
    // (chain, seq, kind, name, created)
    let mine: Vec<_> = listed
        .into_iter()
        .filter_map(|(name, _, at)| {
            let b = parse_bundle_file_name(&name)
                .or_else(|| parse_volume_file_name(&name).map(|(b, _)| b))?;
            (b.sender == config.sender_id).then_some((b.chain, b.seq.0, b.kind, name, at))
        })
        .collect();
    let Some(newest_chain) = mine.iter().map(|m| m.0.clone()).max() else {
        return Ok(Pruned::default());
    };
    let mut completes: Vec<u64> = mine
        .iter()
        .filter(|m| m.0 == newest_chain && m.2 == Kind::Complete)
        .map(|m| m.1)
        .collect();
    completes.sort_unstable();
    completes.dedup();
    let out_of_keep = completes.len() >= keep;
    let protected_from = completes.iter().rev().nth(keep - 1).copied();
    // The completes a kept one carries tables from stay with it.
    let kept_completes: Vec<u64> = completes
        .iter()
        .copied()
        .filter(|s| protected_from.is_none_or(|p| *s >= p))
        .collect();
    let carried_from = crate::state::State::open(&config.state_dir)
        .await?
        .carried_from(&kept_completes)
        .await?;
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(cfg.keep_for).unwrap_or(chrono::Duration::days(2));
    let mut out = Pruned::default();
    for (chain, seq, kind, name, at) in mine {
        let old_enough = at < cutoff;
        let needed = if chain == newest_chain {
            protected_from.is_none_or(|p| seq >= p)
                || (kind == Kind::Complete && carried_from.contains(&seq))
        } else {
            !out_of_keep
        };
        if needed || !old_enough {
            out.kept += 1;
            continue;
        }
        if !dry_run {
            bucket.delete(&name).await.map_err(PushError::Bucket)?;
            tracing::info!(object = %name, "removed from the bucket (retention)");
        }
        out.removed.push(name);
    }
    Ok(out)
}
