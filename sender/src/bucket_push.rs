//! Delivery into an S3-compatible bucket (`[bucket]`), instead of SFTP: the
//! same outbox, the same order and the same bookkeeping (a bundle moves to
//! `sent/` once its object is complete), retried with backoff; an outage
//! leaves the bundles queued. The receivers read the bucket on their own
//! schedule; nothing here waits for them.

use crate::config::Config;
use crate::outbox::{self, Pending};
use crate::push::{PushError, PushOutcome};
use crate::state::State;
use ferry_common::bucket::{Bucket, BucketConfig};
use ferry_common::health::JobRecord;
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
    state
        .record_push(result.as_ref().err().map(|e| e.to_string()))
        .await?;
    crate::metrics::get().push(
        result.is_ok(),
        outcome.delivered.len(),
        outcome.bytes,
        outcome.duration_ms as f64 / 1000.0,
    );
    match &result {
        Ok(()) => JobRecord::record_ok(&config.state_dir, "push"),
        Err(e) => {
            JobRecord::record_failure(&config.state_dir, "push", &e.to_string(), !e.is_transient())
        }
    }
    result.map(|()| outcome)
}

/// Uploads what is recorded and pending, in order, moving each to `sent/`.
async fn round(
    config: &Config,
    bucket: &Bucket,
    state: &mut State,
    outcome: &mut PushOutcome,
) -> Result<(), PushError> {
    let mut pending: Vec<Pending> = outbox::list(&config.outbox(), &config.sender_id)?;
    let recorded = state.last(None).await?.map_or(0, |b| b.seq);
    let chain = state.chain().await?;
    pending.retain(|b| b.chain == chain && (b.volume.is_some() || b.seq <= recorded));
    if pending.is_empty() {
        return Ok(());
    }
    bucket.probe().await.map_err(PushError::Bucket)?;
    let sent = config.sent_dir();
    std::fs::create_dir_all(&sent).map_err(|source| PushError::Local {
        path: sent.clone(),
        source,
    })?;
    for b in pending {
        let local = config.outbox().join(&b.file);
        let bytes = bucket
            .upload(&local, &b.file)
            .await
            .map_err(PushError::Bucket)?;
        tracing::info!(bundle = %b.file, bytes, bucket = %bucket.url, "bundle delivered");
        ferry_common::durable::commit_rename(&local, &sent.join(&b.file)).map_err(|source| {
            PushError::Local {
                path: local.clone(),
                source,
            }
        })?;
        outcome.delivered.push(b.file);
        outcome.bytes += bytes;
    }
    Ok(())
}
