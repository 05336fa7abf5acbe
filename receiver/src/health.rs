//! The receiver's health: what `status` exits with (0 ok, 1 warning,
//! 2 critical, 3 unknown) and what it can still say while the target database
//! is down. Each pass records its outcome in `<state_dir>/health/load.json`
//! and each applied bundle in `<state_dir>/health/applied.json`, so the state
//! directory alone knows the last success, the last error and the lag.

use crate::config::Config;
use crate::load::Applied;
use ferry_common::health::{self, Health, JobRecord, Level, Thresholds};
use ferry_common::manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The job name of a load pass in the health records.
pub const LOAD: &str = "load";

/// The newest applied bundle of one sender and kind, as the state directory
/// remembers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastApplied {
    pub sender_id: String,
    pub seq: u64,
    pub kind: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub applied_at: chrono::DateTime<chrono::Utc>,
    pub file: String,
    pub rows: u64,
    /// The sender's complete period, from the manifest.
    pub complete_every_s: Option<u64>,
}

fn applied_path(state_dir: &Path) -> PathBuf {
    state_dir.join("health").join("applied.json")
}

/// Records how a load pass (or the connection before it) ended, and returns
/// how many passes in a row have failed, for the log level: a failure that
/// will not fix itself, or one that keeps coming, is an ERROR.
pub fn record_pass(config: &Config, failure: Option<(&str, bool)>) -> tracing::Level {
    match failure {
        None => {
            JobRecord::record_ok(&config.state_dir, LOAD);
            tracing::Level::INFO
        }
        Some((error, transient)) => {
            JobRecord::record_failure(&config.state_dir, LOAD, error, !transient);
            let n = JobRecord::read(&config.state_dir, LOAD).failures_in_a_row;
            if transient && n < config.health.failures_critical {
                tracing::Level::WARN
            } else {
                tracing::Level::ERROR
            }
        }
    }
}

/// What the state directory remembers, keyed `sender/kind`.
pub fn last_applied(state_dir: &Path) -> BTreeMap<String, LastApplied> {
    std::fs::read(applied_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Remembers a bundle that committed (passes run one at a time under the state
/// lock, so read-modify-write is safe). Advice only: a failure is logged.
pub fn remember(state_dir: &Path, file: &str, m: &Manifest, rows: u64) {
    let mut all = last_applied(state_dir);
    all.insert(
        format!("{}/{}", m.sender_id, m.kind),
        LastApplied {
            sender_id: m.sender_id.clone(),
            seq: m.seq.0,
            kind: m.kind.to_string(),
            created_at: m.created_at,
            applied_at: chrono::Utc::now(),
            file: file.to_owned(),
            rows,
            complete_every_s: m.complete_every_s,
        },
    );
    let path = applied_path(state_dir);
    let written = std::fs::create_dir_all(path.parent().unwrap_or(state_dir)).and_then(|()| {
        ferry_common::durable::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&all).unwrap_or_default(),
        )
    });
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "could not record the applied bundle for `status`");
    }
}

impl From<&LastApplied> for Applied {
    fn from(a: &LastApplied) -> Self {
        Applied {
            sender_id: a.sender_id.clone(),
            seq: a.seq as i64,
            kind: a.kind.clone(),
            created_at: a.created_at.to_rfc3339(),
            applied_at: a.applied_at.to_rfc3339(),
            file: a.file.clone(),
            rows: a.rows as i64,
        }
    }
}

/// The lag limits: the operator's, else from the sender's complete period.
pub fn lag_limits(config: &Config) -> Thresholds {
    let period = last_applied(&config.state_dir)
        .values()
        .filter_map(|a| a.complete_every_s)
        .max()
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(86_400));
    let slack = Duration::from_secs(2 * 3600);
    let warning = config.health.lag_warning.unwrap_or(period + slack);
    Thresholds {
        warning,
        critical: config
            .health
            .lag_critical
            .unwrap_or(period * 2 + slack)
            .max(warning),
    }
}

/// Seconds since the newest applied bundle was created (`None` before any).
pub fn lag(applied: &[Applied]) -> Option<Duration> {
    applied
        .iter()
        .filter_map(|a| health::parse_time(&a.created_at))
        .max()
        .map(health::age)
}

/// The findings that do not need the target: the last passes, quarantined
/// bundles, held bundles and the lag.
pub fn judge(
    config: &Config,
    applied: &[Applied],
    held: &[(String, String)],
    failures: usize,
) -> Health {
    let mut h = Health::default();
    JobRecord::read(&config.state_dir, LOAD).judge(
        &mut h,
        "the load pass",
        config.health.failures_critical,
    );
    if failures > 0 {
        h.add(
            Level::Warning,
            format!(
                "{failures} quarantined bundle(s): see `ferry-receiver failures`, then `retry` one or send a complete"
            ),
        );
    }
    for (file, reason) in held {
        let age = std::fs::metadata(config.inbox.join(file))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let level = if age > config.health.held_critical {
            Level::Critical
        } else {
            Level::Warning
        };
        h.add(
            level,
            format!(
                "{file} held for {} ({reason}; `health.held_critical` is {})",
                health::human(age),
                health::human(config.health.held_critical)
            ),
        );
    }
    match lag(applied) {
        Some(lag) => h.age(
            "the newest applied bundle",
            lag,
            lag_limits(config),
            "health.lag_warning / lag_critical",
        ),
        None => h.add(Level::Warning, "nothing applied yet"),
    }
    h
}
