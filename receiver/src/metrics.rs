//! The receiver's Prometheus metrics (`[metrics] listen`): what its passes
//! applied and refused since start, and, set at each scrape from the state
//! directory and the inbox, the last success, the lag, the queue depths and
//! the free space of the inbox and the state directory.

use crate::config::Config;
use crate::health;
use ferry_common::health::JobRecord;
use ferry_common::metrics::{
    BucketLabel, DirLabel, KindLabel, KindResult, duration_histogram, epoch_seconds, free_bytes,
    kind, kind_result,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

type Hist = Family<KindLabel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    bundles: Family<KindResult, Counter>,
    rows: Family<KindLabel, Counter>,
    bytes: Family<KindLabel, Counter>,
    duration: Hist,
    last_success: Family<KindLabel, Gauge<f64, AtomicU64>>,
    lag: Gauge<f64, AtomicU64>,
    failures_in_a_row: Gauge,
    inbox_bundles: Gauge,
    held: Gauge,
    quarantined: Gauge,
    free: Family<DirLabel, Gauge>,
    exports: Family<ResultLabel, Counter>,
    fetched: Family<BucketLabel, Counter>,
    fetched_bytes: Family<BucketLabel, Counter>,
    fetch_errors: Family<BucketLabel, Counter>,
    fetch_failures_in_a_row: Family<BucketLabel, Gauge>,
    fetch_last_success: Family<BucketLabel, Gauge<f64, AtomicU64>>,
}

/// The process's metrics (recorded whether or not they are served).
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("ferry_receiver");
        let m = Self {
            registry: Arc::new(Mutex::new(Registry::default())),
            bundles: Family::default(),
            rows: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            last_success: Family::default(),
            lag: Gauge::default(),
            failures_in_a_row: Gauge::default(),
            inbox_bundles: Gauge::default(),
            held: Gauge::default(),
            quarantined: Gauge::default(),
            free: Family::default(),
            exports: Family::default(),
            fetched: Family::default(),
            fetched_bytes: Family::default(),
            fetch_errors: Family::default(),
            fetch_failures_in_a_row: Family::default(),
            fetch_last_success: Family::default(),
        };
        r.register(
            "bundles",
            "Bundles by kind and result (applied, failed: quarantined)",
            m.bundles.clone(),
        );
        r.register("rows", "Rows applied, by kind", m.rows.clone());
        r.register_with_unit(
            "loaded",
            "Bytes of the bundle files applied, by kind",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register_with_unit(
            "load_duration",
            "How long verifying and applying a bundle took, by kind",
            Unit::Seconds,
            m.duration.clone(),
        );
        r.register(
            "last_success_timestamp_seconds",
            "When the newest bundle of each kind was applied",
            m.last_success.clone(),
        );
        r.register_with_unit(
            "lag",
            "Since the newest applied bundle was created on the sender",
            Unit::Seconds,
            m.lag.clone(),
        );
        r.register(
            "pass_failures_in_a_row",
            "Load passes that failed (or could not reach the target) since the last that succeeded",
            m.failures_in_a_row.clone(),
        );
        r.register(
            "inbox_bundles",
            "Bundles in the inbox newer than the last applied (waiting to be applied)",
            m.inbox_bundles.clone(),
        );
        r.register(
            "held_bundles",
            "Bundles held at the last pass (waiting for a missing one)",
            m.held.clone(),
        );
        r.register(
            "quarantined_bundles",
            "Bundles in quarantine",
            m.quarantined.clone(),
        );
        r.register_with_unit(
            "free",
            "Free space of the file systems holding the inbox and the state directory",
            Unit::Bytes,
            m.free.clone(),
        );
        r.register(
            "exports",
            "Automatic Parquet exports (`[export]`), by result (ok, failed)",
            m.exports.clone(),
        );
        r.register(
            "bucket_fetched_bundles",
            "Bundle files downloaded from the bucket (`[bucket]`)",
            m.fetched.clone(),
        );
        r.register_with_unit(
            "bucket_fetched",
            "Bytes downloaded from the bucket",
            Unit::Bytes,
            m.fetched_bytes.clone(),
        );
        r.register(
            "bucket_fetch_errors",
            "Polls of the bucket that failed",
            m.fetch_errors.clone(),
        );
        r.register(
            "bucket_fetch_failures_in_a_row",
            "Polls of the bucket that failed since the last that succeeded",
            m.fetch_failures_in_a_row.clone(),
        );
        r.register(
            "bucket_last_success_timestamp_seconds",
            "When a poll of the bucket last succeeded",
            m.fetch_last_success.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// A bundle was applied.
    pub fn applied(&self, k: &str, rows: u64, bytes: u64, seconds: f64) {
        self.bundles.get_or_create(&kind_result(k, "applied")).inc();
        self.rows.get_or_create(&kind(k)).inc_by(rows);
        self.bytes.get_or_create(&kind(k)).inc_by(bytes);
        self.duration.get_or_create(&kind(k)).observe(seconds);
    }

    /// A bundle was quarantined.
    pub fn failed(&self, k: &str) {
        self.bundles.get_or_create(&kind_result(k, "failed")).inc();
    }

    /// An automatic export ended.
    pub fn exported(&self, ok: bool) {
        self.exports
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
    }

    /// A poll of `bucket` succeeded, downloading `files` of `bytes`.
    pub fn fetched(&self, bucket: &str, files: usize, bytes: u64) {
        let l = bucket_label(bucket);
        self.fetched.get_or_create(&l).inc_by(files as u64);
        self.fetched_bytes.get_or_create(&l).inc_by(bytes);
    }

    /// A poll of `bucket` failed.
    pub fn fetch_failed(&self, bucket: &str) {
        self.fetch_errors.get_or_create(&bucket_label(bucket)).inc();
    }

    /// The bundles a pass held.
    pub fn held(&self, n: usize) {
        self.held.set(n as i64);
    }

    fn refresh(&self, config: &Config) {
        let applied = health::last_applied(&config.state_dir);
        for a in applied.values() {
            let g = self.last_success.get_or_create(&kind(&a.kind));
            g.set(g.get().max(epoch_seconds(a.applied_at)));
        }
        if let Some(newest) = applied.values().map(|a| a.created_at).max() {
            self.lag
                .set(ferry_common::health::age(newest).as_secs_f64());
        }
        self.failures_in_a_row.set(i64::from(
            JobRecord::read(&config.state_dir, health::LOAD).failures_in_a_row,
        ));
        let newest = |sender: &str| {
            applied
                .values()
                .filter(|a| a.sender_id == sender)
                .map(|a| a.seq)
                .max()
        };
        let waiting = crate::inbox::scan(&config.inbox)
            .map(|v| {
                v.iter()
                    .filter(|e| newest(&e.sender).is_none_or(|n| e.seq > n))
                    .count()
            })
            .unwrap_or(0);
        self.inbox_bundles.set(waiting as i64);
        self.quarantined.set(
            crate::quarantine::list(&config.quarantine_dir())
                .map(|v| v.len())
                .unwrap_or(0) as i64,
        );
        if let Some(b) = &config.bucket {
            let l = bucket_label(&b.url);
            let fetch = JobRecord::read(&config.state_dir, crate::bucket_pull::FETCH);
            self.fetch_failures_in_a_row
                .get_or_create(&l)
                .set(i64::from(fetch.failures_in_a_row));
            if let Some(t) = fetch.last_ok_at {
                self.fetch_last_success
                    .get_or_create(&l)
                    .set(epoch_seconds(t));
            }
        }
        for dir in [&config.inbox, &config.state_dir] {
            if let Some(free) = free_bytes(dir) {
                self.free
                    .get_or_create(&DirLabel {
                        dir: dir.display().to_string(),
                    })
                    .set(free as i64);
            }
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

fn bucket_label(url: &str) -> BucketLabel {
    BucketLabel {
        bucket: url.to_owned(),
    }
}

/// Serves the metrics when `[metrics] listen` is set.
pub async fn serve(config: &Config) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listen) = config.metrics.listen else {
        return Ok(None);
    };
    let c = Arc::new(config.clone());
    let handle = ferry_common::metrics::serve(
        listen,
        Arc::clone(&get().registry),
        Arc::new(move || get().refresh(&c)),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    Ok(Some(handle))
}
