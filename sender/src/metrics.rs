//! The sender's Prometheus metrics (`[metrics] listen`): what its jobs and
//! pushes did since start, and, set at each scrape, the last success of each
//! job, the outbox's depth and the free space of the state directory.

use crate::config::Config;
use crate::job::{JobError, JobOutcome};
use ferry_common::health::JobRecord;
use ferry_common::manifest::Kind;
use ferry_common::metrics::{
    DirLabel, KindLabel, KindResult, duration_histogram, epoch_seconds, free_bytes, kind,
    kind_result,
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
    failures_in_a_row: Family<KindLabel, Gauge>,
    outbox_bundles: Gauge,
    outbox_bytes: Gauge,
    free: Family<DirLabel, Gauge>,
}

/// The process's metrics (recorded whether or not they are served).
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("ferry_sender");
        let m = Self {
            registry: Arc::new(Mutex::new(Registry::default())),
            bundles: Family::default(),
            rows: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            last_success: Family::default(),
            failures_in_a_row: Family::default(),
            outbox_bundles: Gauge::default(),
            outbox_bytes: Gauge::default(),
            free: Family::default(),
        };
        r.register(
            "bundles",
            "Jobs by kind (complete, partial, push) and result (written, empty: a partial that found no change, delivered, error)",
            m.bundles.clone(),
        );
        r.register("rows", "Rows written into bundles, by kind", m.rows.clone());
        r.register_with_unit(
            "written",
            "Bytes written into bundles (kind complete, partial) or delivered (kind push)",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register_with_unit(
            "job_duration",
            "How long a job took: extract and bundle (complete, partial), or delivery (push)",
            Unit::Seconds,
            m.duration.clone(),
        );
        r.register(
            "last_success_timestamp_seconds",
            "When each job last succeeded (a partial that found no change succeeded)",
            m.last_success.clone(),
        );
        r.register(
            "job_failures_in_a_row",
            "Runs of each job that failed since its last success",
            m.failures_in_a_row.clone(),
        );
        r.register(
            "outbox_bundles",
            "Bundles waiting in the outbox to be pushed",
            m.outbox_bundles.clone(),
        );
        r.register_with_unit(
            "outbox",
            "Bytes waiting in the outbox to be pushed",
            Unit::Bytes,
            m.outbox_bytes.clone(),
        );
        r.register_with_unit(
            "free",
            "Free space of the file system holding the state directory",
            Unit::Bytes,
            m.free.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// A complete or partial job ended.
    pub fn job(&self, k: Kind, outcome: &Result<JobOutcome, JobError>) {
        match outcome {
            Ok(o) => {
                let result = if o.seq.is_some() { "written" } else { "empty" };
                self.bundles.get_or_create(&kind_result(&k, result)).inc();
                self.rows.get_or_create(&kind(&k)).inc_by(o.rows);
                self.bytes.get_or_create(&kind(&k)).inc_by(o.bytes);
                self.duration
                    .get_or_create(&kind(&k))
                    .observe(o.duration_ms as f64 / 1000.0);
            }
            Err(JobError::Lock(_)) => {}
            Err(_) => {
                self.bundles.get_or_create(&kind_result(&k, "error")).inc();
            }
        }
    }

    /// A push ended: `delivered` bundles of `bytes` in `seconds`, or failed.
    pub fn push(&self, ok: bool, delivered: usize, bytes: u64, seconds: f64) {
        if ok {
            self.bundles
                .get_or_create(&kind_result("push", "delivered"))
                .inc_by(delivered as u64);
            self.bytes.get_or_create(&kind("push")).inc_by(bytes);
            self.duration.get_or_create(&kind("push")).observe(seconds);
        } else {
            self.bundles
                .get_or_create(&kind_result("push", "error"))
                .inc();
        }
    }

    /// The gauges of the present, from the state directory.
    fn refresh(&self, config: &Config) {
        for job in ["complete", "partial", "push"] {
            let r = JobRecord::read(&config.state_dir, job);
            if let Some(t) = r.last_ok_at {
                self.last_success
                    .get_or_create(&kind(job))
                    .set(epoch_seconds(t));
            }
            self.failures_in_a_row
                .get_or_create(&kind(job))
                .set(i64::from(r.failures_in_a_row));
        }
        let pending = crate::outbox::list(&config.outbox(), &config.sender_id).unwrap_or_default();
        self.outbox_bundles.set(pending.len() as i64);
        self.outbox_bytes
            .set(pending.iter().map(|p| p.bytes).sum::<u64>() as i64);
        if let Some(free) = free_bytes(&config.state_dir) {
            self.free
                .get_or_create(&DirLabel {
                    dir: config.state_dir.display().to_string(),
                })
                .set(free as i64);
        }
    }
}

/// Serves the metrics when `[metrics] listen` is set; the task ends with the
/// returned handle.
pub async fn serve(config: &Arc<Config>) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listen) = config.metrics.listen else {
        return Ok(None);
    };
    let m = get();
    let c = Arc::clone(config);
    let handle = ferry_common::metrics::serve(
        listen,
        Arc::clone(&m.registry),
        Arc::new(move || get().refresh(&c)),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    Ok(Some(handle))
}
