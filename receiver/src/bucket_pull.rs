//! A receiver fed from an S3-compatible bucket (`[bucket]`): before each
//! pass, what the bucket holds beyond this receiver's position is downloaded
//! into the local inbox (whole, under a temporary name, then renamed), and
//! the usual pass verifies and applies it exactly once. The position is the
//! newest object name taken (`<state_dir>/bucket.cursor`), so a poll lists
//! only what is newer; every tenth poll lists the whole prefix, for senders
//! whose names sort before it. Bundles the ledger already holds are not
//! fetched again, and nothing is ever deleted from the bucket: any number of
//! receivers read it independently.

use crate::config::Config;
use crate::load::Target;
use ferry_common::bucket::{Bucket, BucketError};
use ferry_common::manifest::{parse_bundle_file_name, parse_volume_file_name};
use std::sync::atomic::{AtomicU64, Ordering};

/// What one pull did.
#[derive(Debug, Default)]
pub struct Pulled {
    pub files: usize,
    pub bytes: u64,
}

static POLLS: AtomicU64 = AtomicU64::new(0);

pub async fn pull(config: &Config, target: &mut Target) -> Result<Pulled, BucketError> {
    let Some(cfg) = &config.bucket else {
        return Ok(Pulled::default());
    };
    let bucket = Bucket::open(cfg).map_err(|message| BucketError {
        doing: "opening".into(),
        target: cfg.url.clone(),
        message,
        transient: false,
    })?;
    let cursor_file = config.state_dir.join("bucket.cursor");
    let cursor = std::fs::read_to_string(&cursor_file)
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let full = POLLS.fetch_add(1, Ordering::Relaxed).is_multiple_of(10);
    let listed = bucket
        .list_after(if full { None } else { cursor.as_deref() })
        .await?;
    let mut out = Pulled::default();
    let mut newest = cursor.clone();
    for (name, _) in listed {
        let Some((sender, chain, seq)) = parse_bundle_file_name(&name)
            .map(|b| (b.sender, b.chain, b.seq.0))
            .or_else(|| parse_volume_file_name(&name).map(|(b, _)| (b.sender, b.chain, b.seq.0)))
        else {
            continue;
        };
        let local = config.inbox.join(&name);
        let applied = match target.ledger(&sender).await {
            Ok(l) => l.behind(&chain, seq),
            Err(_) => false,
        };
        if !local.exists() && !applied {
            let bytes = bucket.download(&name, &local).await?;
            tracing::info!(object = %name, bytes, bucket = %bucket.url, "fetched from the bucket");
            out.files += 1;
            out.bytes += bytes;
        }
        if newest.as_deref().is_none_or(|n| name.as_str() > n) {
            newest = Some(name);
        }
    }
    if newest != cursor
        && let Some(n) = &newest
    {
        let _ = ferry_common::durable::write_atomic(&cursor_file, n.as_bytes());
    }
    Ok(out)
}
