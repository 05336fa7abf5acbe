//! What both agents' Prometheus metrics share: label sets, the duration
//! buckets, free space, and serving a registry over HTTP (`[metrics] listen`).
//! Gauges that describe the present (queue depths, free space, lag, the last
//! success) are set right before each scrape, from the same files `status`
//! reads, so they are right after a restart too.

use crate::http::{Handler, OPENMETRICS, Request, Response, Server};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// `{kind="complete"}`, `{job="push"}`…
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindResult {
    pub kind: String,
    pub result: String,
}

/// The bucket (`s3://bucket/prefix`) a metric is about.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BucketLabel {
    pub bucket: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabel {
    pub dir: String,
}

pub fn kind(k: &(impl ToString + ?Sized)) -> KindLabel {
    KindLabel {
        kind: k.to_string(),
    }
}

pub fn kind_result(k: &(impl ToString + ?Sized), result: &str) -> KindResult {
    KindResult {
        kind: k.to_string(),
        result: result.to_owned(),
    }
}

/// Durations from 10 ms to about 45 min, doubling.
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 19))
}

/// Bytes free to an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Seconds since the Unix epoch, for `*_timestamp_seconds` gauges.
pub fn epoch_seconds(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

/// Serves `GET /metrics` on `addr`: `refresh` runs before each encoding.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Mutex<Registry>>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let server = Server::bind(addr, "metrics.listen").await?;
    let at = server.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(listen = %at, "serving Prometheus metrics at /metrics");
    let handler: Handler = Arc::new(move |req: Request| {
        let registry = Arc::clone(&registry);
        let refresh = Arc::clone(&refresh);
        Box::pin(async move {
            if req.method != "GET" || req.path != "/metrics" {
                return Response::text(404, "ferry serves GET /metrics here\n");
            }
            let refreshed = tokio::task::spawn_blocking(move || {
                refresh();
                let mut out = String::new();
                let encoded = registry
                    .lock()
                    .map_err(|_| std::fmt::Error)
                    .and_then(|r| prometheus_client::encoding::text::encode(&mut out, &r));
                encoded.map(|()| out)
            })
            .await;
            match refreshed {
                Ok(Ok(body)) => Response {
                    status: 200,
                    content_type: OPENMETRICS,
                    body,
                },
                _ => Response::text(500, "could not encode the metrics\n"),
            }
        })
    });
    Ok(tokio::spawn(server.serve(handler)))
}
