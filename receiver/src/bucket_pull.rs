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
use ferry_common::health::JobRecord;
use ferry_common::manifest::{parse_bundle_file_name, parse_volume_file_name};
use std::sync::atomic::{AtomicU64, Ordering};

/// What one pull did.
#[derive(Debug, Default)]
pub struct Pulled {
    pub files: usize,
    pub bytes: u64,
}

static POLLS: AtomicU64 = AtomicU64::new(0);

/// The job name of a fetch from the bucket in the health records.
pub const FETCH: &str = "fetch";

/// The position: the newest object name this receiver took.
pub fn cursor(config: &Config) -> Option<String> {
    std::fs::read_to_string(config.state_dir.join("bucket.cursor"))
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
}

/// Fetches what the bucket holds beyond this receiver's position into the
/// inbox, and records how it went (for `status`, the health verdict and the
/// metrics).
pub async fn pull(config: &Config, target: &mut Target) -> Result<Pulled, BucketError> {
    let Some(cfg) = &config.bucket else {
        return Ok(Pulled::default());
    };
    let result = fetch_new(config, cfg, target).await;
    let m = crate::metrics::get();
    match &result {
        Ok(p) => {
            JobRecord::record_ok(&config.state_dir, FETCH);
            m.fetched(&cfg.url, p.files, p.bytes);
        }
        Err(e) => {
            JobRecord::record_failure(&config.state_dir, FETCH, &e.to_string(), !e.transient);
            m.fetch_failed(&cfg.url);
        }
    }
    result
}

async fn fetch_new(
    config: &Config,
    cfg: &ferry_common::bucket::BucketConfig,
    target: &mut Target,
) -> Result<Pulled, BucketError> {
    let bucket = Bucket::open(cfg).map_err(|message| BucketError {
        doing: "opening".into(),
        target: cfg.url.clone(),
        message,
        transient: false,
    })?;
    let cursor_file = config.state_dir.join("bucket.cursor");
    let cursor = cursor(config);
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
        // A quarantined bundle is not fetched again: `retry` or a newer
        // object decides.
        let quarantined = config.quarantine_dir().join(&name).exists();
        if !local.exists() && !applied && !quarantined {
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

/// The bucket at `url`, with the endpoint and credentials of `base` (the
/// receiver's `[bucket]`), else of the AWS environment (`AWS_ENDPOINT`,
/// `AWS_REGION`, the keys).
pub fn bucket_for(
    url: &str,
    base: Option<&ferry_common::bucket::BucketConfig>,
) -> Result<Bucket, String> {
    let cfg = ferry_common::bucket::BucketConfig {
        url: url.to_owned(),
        ..base.cloned().unwrap_or(ferry_common::bucket::BucketConfig {
            url: String::new(),
            endpoint: std::env::var("AWS_ENDPOINT").ok(),
            region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
            credentials_file: None,
            profile: "default".into(),
            poll_interval: std::time::Duration::from_secs(30),
            keep_completes: None,
            keep_for: std::time::Duration::from_secs(2 * 86_400),
        })
    };
    Bucket::open(&cfg)
}

/// `restore --from s3://bucket/prefix`: downloads into `dir` the bundles the
/// point needs, chosen by name — for a seq or `latest`, the newest chain
/// holding it, its complete at or before the point, and everything between;
/// for a time, every bundle of the sender (the times are inside the
/// manifests) — then the usual restore plans from `dir`. `base` gives the
/// endpoint and credentials (the receiver's `[bucket]`, else the AWS
/// environment). Returns the number of files fetched.
pub async fn fetch_for_restore(
    url: &str,
    base: Option<&ferry_common::bucket::BucketConfig>,
    dir: &std::path::Path,
    at: &crate::restore::At,
    sender: Option<&str>,
) -> Result<usize, String> {
    use crate::restore::At;
    use ferry_common::manifest::Kind;
    let bucket = bucket_for(url, base)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // (sender, chain, seq, kind, object name)
    let mut all = Vec::new();
    for (name, _) in bucket.list_after(None).await.map_err(|e| e.to_string())? {
        let parsed =
            parse_bundle_file_name(&name).or_else(|| parse_volume_file_name(&name).map(|(b, _)| b));
        if let Some(b) = parsed
            && sender.is_none_or(|s| s == b.sender)
        {
            all.push((b.sender, b.chain, b.seq.0, b.kind, name));
        }
    }
    let senders: std::collections::BTreeSet<&String> = all.iter().map(|a| &a.0).collect();
    if senders.len() > 1 {
        return Err(format!(
            "{url} holds bundles of several senders ({}); choose one with --sender",
            senders.into_iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let chosen: Vec<&String> = match at {
        At::Time(_) => all.iter().map(|a| &a.4).collect(),
        At::Latest | At::Seq(_) => {
            let chain = all
                .iter()
                .filter(|a| match at {
                    At::Seq(n) => a.2 == *n,
                    _ => true,
                })
                .map(|a| a.1.clone())
                .max()
                .ok_or_else(|| format!("{url} holds no such bundle"))?;
            let target = match at {
                At::Seq(n) => *n,
                _ => all
                    .iter()
                    .filter(|a| a.1 == chain)
                    .map(|a| a.2)
                    .max()
                    .unwrap_or(0),
            };
            let complete = all
                .iter()
                .filter(|a| a.1 == chain && a.3 == Kind::Complete && a.2 <= target)
                .map(|a| a.2)
                .max()
                .ok_or_else(|| {
                    format!("{url} holds no complete at or before #{target} to build on (pruned?)")
                })?;
            all.iter()
                .filter(|a| a.1 == chain && (complete..=target).contains(&a.2))
                .map(|a| &a.4)
                .collect()
        }
    };
    for name in &chosen {
        bucket
            .download(name, &dir.join(name.as_str()))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(chosen.len())
}
