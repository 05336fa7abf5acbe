//! Health as a monitoring system reads it: each agent's `status` ends in one
//! level, and exits with it by the monitoring-plugin convention (0 ok,
//! 1 warning, 2 critical, 3 unknown). Both daemons record how each job ended
//! in `<state_dir>/health/<job>.json`, so `status` can report the last error,
//! and how long a job has failed, even while the database is unreachable.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A finding's weight; the worst one is the agent's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl Level {
    /// The exit status of `status` (the monitoring-plugin convention).
    pub fn exit_code(self) -> u8 {
        match self {
            Level::Ok => 0,
            Level::Warning => 1,
            Level::Critical => 2,
            Level::Unknown => 3,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub what: String,
}

/// Everything `status` found that is not plainly ok, and the verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Health {
    pub level: Option<Level>,
    pub findings: Vec<Finding>,
}

impl Health {
    pub fn add(&mut self, level: Level, what: impl Into<String>) {
        self.findings.push(Finding {
            level,
            what: what.into(),
        });
    }

    /// The worst finding (ok without any).
    pub fn level(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }

    /// Fixes the verdict for serialization (`level` in `status --json`).
    pub fn settle(mut self) -> Self {
        self.level = Some(self.level());
        self
    }

    /// An age against a warning and a critical threshold: `what` is the thing
    /// that is old ("the newest applied bundle"), `setting` the config key that
    /// moves the thresholds.
    pub fn age(&mut self, what: &str, age: Duration, limits: Thresholds, setting: &str) {
        let level = if age > limits.critical {
            Level::Critical
        } else if age > limits.warning {
            Level::Warning
        } else {
            return;
        };
        let limit = if level == Level::Critical {
            limits.critical
        } else {
            limits.warning
        };
        self.add(
            level,
            format!(
                "{what} is {} old (over {}; `{setting}` sets the limit)",
                human(age),
                human(limit)
            ),
        );
    }

    /// One line per finding, then the verdict, for a terminal or a check plugin.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!("{:<8} {}\n", f.level.label(), f.what));
        }
        out.push_str(&format!("health: {}\n", self.level().label()));
        out
    }
}

/// When an age becomes a warning and when critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub warning: Duration,
    pub critical: Duration,
}

/// A duration rounded to what an operator reads (`3h 12m`, `45s`).
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let rounded = if s >= 86_400 {
        s - s % 3600
    } else if s >= 3600 {
        s - s % 60
    } else {
        s
    };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

/// How the latest runs of one job went.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobRecord {
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_ok_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Runs that failed since the last one that succeeded.
    pub failures_in_a_row: u32,
    /// Whether the latest failure will not fix itself.
    #[serde(default)]
    pub last_error_permanent: bool,
}

impl JobRecord {
    /// The record of job `job` under `state_dir`; empty when none was written
    /// (or it cannot be read: health is advice, never a reason to stop).
    pub fn read(state_dir: &Path, job: &str) -> Self {
        std::fs::read(path(state_dir, job))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records a run of `job` that succeeded.
    pub fn record_ok(state_dir: &Path, job: &str) {
        Self::record(state_dir, job, None);
    }

    /// Records a run of `job` that failed; `permanent` when trying again
    /// cannot help (a refused login, a missing database).
    pub fn record_failure(state_dir: &Path, job: &str, error: &str, permanent: bool) {
        Self::record(state_dir, job, Some((error, permanent)));
    }

    /// A record that cannot be written is logged, never fatal.
    fn record(state_dir: &Path, job: &str, error: Option<(&str, bool)>) {
        let mut r = Self::read(state_dir, job);
        let now = Utc::now();
        r.last_attempt_at = Some(now);
        match error {
            None => {
                r.last_ok_at = Some(now);
                r.failures_in_a_row = 0;
                r.last_error_permanent = false;
            }
            Some((e, permanent)) => {
                r.last_error = Some(e.to_owned());
                r.last_error_at = Some(now);
                r.last_error_permanent = permanent;
                r.failures_in_a_row = r.failures_in_a_row.saturating_add(1);
            }
        }
        let file = path(state_dir, job);
        let written = std::fs::create_dir_all(file.parent().unwrap_or(state_dir)).and_then(|()| {
            crate::durable::write_atomic(&file, &serde_json::to_vec_pretty(&r).unwrap_or_default())
        });
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), error = %e, "could not record the job's health");
        }
    }

    /// Whether the latest run failed.
    pub fn failing(&self) -> bool {
        self.failures_in_a_row > 0
    }

    /// Adds what this record says to `health`: a job failing for
    /// `critical_after` runs in a row, or whose error will not fix itself, is
    /// critical; fewer runs a warning.
    pub fn judge(&self, health: &mut Health, job: &str, critical_after: u32) {
        if !self.failing() {
            return;
        }
        let level = if self.last_error_permanent || self.failures_in_a_row >= critical_after {
            Level::Critical
        } else {
            Level::Warning
        };
        let since = match self.last_ok_at {
            Some(t) => format!("last success {}", t.format("%Y-%m-%d %H:%M:%S UTC")),
            None => "never succeeded".to_owned(),
        };
        health.add(
            level,
            format!(
                "{job} failed {} time(s) in a row ({since}): {}",
                self.failures_in_a_row,
                self.last_error.as_deref().unwrap_or("?")
            ),
        );
    }
}

fn path(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("health").join(format!("{job}.json"))
}

/// Whether a PostgreSQL error code means that trying again cannot help until
/// someone changes something: a refused login (class 28: wrong password, no
/// `pg_hba.conf` entry, unknown role), a database that does not exist
/// (3D000), a missing privilege (42501).
pub fn sqlstate_is_permanent(code: &str) -> bool {
    code.starts_with("28") || code == "3D000" || code == "42501"
}

/// Parses a time as ferry and its databases write it: RFC 3339, or
/// PostgreSQL's `timestamptz::text` (`2026-12-04 11:00:00.123+00`).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"]
        .iter()
        .find_map(|f| DateTime::parse_from_str(s, f).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// How long ago `t` was (zero for a time in the future).
pub fn age(t: DateTime<Utc>) -> Duration {
    (Utc::now() - t).to_std().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_and_rfc3339_times_parse() {
        for s in [
            "2026-12-04 11:00:00.123456+00",
            "2026-12-04 12:00:00+01",
            "2026-12-04T11:00:00Z",
            "2026-12-04T11:00:00.5+00:00",
        ] {
            let t = parse_time(s).unwrap_or_else(|| panic!("{s} did not parse"));
            assert_eq!(t.format("%Y-%m-%d %H").to_string(), "2026-12-04 11", "{s}");
        }
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn the_worst_finding_is_the_verdict() {
        let mut h = Health::default();
        assert_eq!(h.level().exit_code(), 0);
        let t = Thresholds {
            warning: Duration::from_secs(60),
            critical: Duration::from_secs(600),
        };
        h.age("x", Duration::from_secs(30), t, "k");
        assert_eq!(h.level(), Level::Ok);
        h.age("x", Duration::from_secs(61), t, "k");
        assert_eq!(h.level(), Level::Warning);
        h.age("x", Duration::from_secs(601), t, "k");
        assert_eq!(h.level().exit_code(), 2);
        assert!(
            h.render().contains("CRITICAL x is 10m 1s old"),
            "{}",
            h.render()
        );
    }

    #[test]
    fn job_records_count_failures_in_a_row() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        JobRecord::record_failure(dir.path(), "load", "server down", false);
        JobRecord::record_failure(dir.path(), "load", "server down", false);
        let r = JobRecord::read(dir.path(), "load");
        assert_eq!(r.failures_in_a_row, 2);
        let mut h = Health::default();
        r.judge(&mut h, "load", 3);
        assert_eq!(h.level(), Level::Warning);
        r.judge(&mut h, "load", 2);
        assert_eq!(h.level(), Level::Critical);
        JobRecord::record_ok(dir.path(), "load");
        let r = JobRecord::read(dir.path(), "load");
        assert!(!r.failing());
        assert_eq!(r.last_error.as_deref(), Some("server down"));
        JobRecord::record_failure(dir.path(), "load", "password authentication failed", true);
        let mut h = Health::default();
        JobRecord::read(dir.path(), "load").judge(&mut h, "load", 3);
        assert_eq!(h.level(), Level::Critical);
    }
}
