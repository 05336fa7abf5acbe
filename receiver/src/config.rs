//! The receiver's configuration: one TOML file, validated before any I/O; unknown
//! keys are errors that name the key.

pub use ferry_common::config::{ConfigError, ControlConfig, Engine, MetricsConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Lock, staging and quarantine live here.
    pub state_dir: PathBuf,
    /// Where bundles arrive. Names starting with `.` are ignored.
    pub inbox: PathBuf,
    pub target: TargetConfig,
    /// Media set name -> directory.
    #[serde(default)]
    pub media: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub hooks: Vec<Hook>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub daemon: Daemon,
    /// The embedded SFTP endpoint (`run` serves it), for hosts without OpenSSH.
    pub sftp_server: Option<crate::sftp_server::SftpServerConfig>,
    /// The senders whose bundles this receiver applies (`sender_id` ->
    /// settings). Empty: any sender (`check` warns). See [`crate::trust`].
    #[serde(default)]
    pub senders: BTreeMap<String, SenderTrust>,
    /// When `status` calls the receiver unhealthy.
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The read-only HTTP control endpoint; off without it.
    pub control: Option<ControlConfig>,
    /// Bundles fetched from an S3-compatible bucket into the inbox.
    pub bucket: Option<ferry_common::bucket::BucketConfig>,
    /// Parquet exports after loads (docs/analytics.md); off without it.
    pub export: Option<crate::export::ExportConfig>,
}

/// `status` limits (see [`crate::health`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// The age of the newest applied bundle. Default: from the sender's
    /// complete schedule (its period plus 2 h, and twice the period plus
    /// 2 h), or 26 h and 50 h when the sender does not say; an app that
    /// writes all day deserves tighter limits.
    #[serde(with = "ferry_common::duration::option")]
    pub lag_warning: Option<Duration>,
    #[serde(with = "ferry_common::duration::option")]
    pub lag_critical: Option<Duration>,
    /// A bundle held (waiting for one that is missing) is a warning, and
    /// critical once its file is older than this.
    #[serde(with = "ferry_common::duration")]
    pub held_critical: Duration,
    /// Failed load passes in a row before they are critical (a refused login
    /// is critical at once).
    pub failures_critical: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            lag_warning: None,
            lag_critical: None,
            held_critical: Duration::from_secs(900),
            failures_critical: 3,
        }
    }
}

/// One accepted sender.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderTrust {
    /// The sender's public key, an OpenSSH line (`ssh-ed25519 AAAA… comment`):
    /// its bundles must be signed with the matching private key.
    pub public_key: Option<String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `postgres://…` or `sqlite:///absolute/path` (created when missing).
    pub url: String,
    /// Connections that load a PostgreSQL complete's tables in parallel (into
    /// staging schemas, swapped in atomically); 1 loads in one transaction.
    #[serde(default = "default_jobs")]
    pub jobs: usize,
    /// PostgreSQL: let the application's triggers fire on the target. Off by
    /// default: a complete disables the user triggers it creates, as logical
    /// replication does, so that a `BEFORE UPDATE … updated_at := now()` or an
    /// audit trigger never makes the copy differ from the source.
    #[serde(default)]
    pub fire_triggers: bool,
    /// A table that left the sender's complete (dropped on the source, or no
    /// longer selected): `"drop"` (default) removes it from the copy with what
    /// depends on it; `"keep"` leaves it (and logs a warning once).
    #[serde(default)]
    pub departed_tables: Departed,
}

/// See [`TargetConfig::departed_tables`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Departed {
    #[default]
    Drop,
    Keep,
}

fn default_jobs() -> usize {
    2
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

/// Which applied bundles the inbox keeps as the version history (see
/// [`crate::prune`]): the newest `keep_completes` completes of each sender's
/// chain and everything after the oldest of them, and every point younger than
/// its kind's lifetime with what it builds on.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    #[serde(with = "ferry_common::duration")]
    pub complete: Duration,
    #[serde(with = "ferry_common::duration")]
    pub partial: Duration,
    /// At least 1: the complete the copy builds on always stays.
    pub keep_completes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            complete: Duration::from_secs(15 * 86400),
            partial: Duration::from_secs(2 * 86400),
            keep_completes: 2,
        }
    }
}

/// A post-processing hook: a command after the commit, or SQL inside the load
/// transaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// Bundle kinds the hook runs for: `"complete"`, `"partial"`.
    #[serde(default = "both_kinds")]
    pub on: Vec<String>,
    /// argv; no shell unless the operator writes one (`["/bin/sh", "-c", "…"]`).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// SQL run inside the load transaction (e.g. `REFRESH MATERIALIZED VIEW v`).
    #[serde(default)]
    pub sql: Option<String>,
    #[serde(default = "default_timeout", with = "ferry_common::duration")]
    pub timeout: Duration,
}

fn both_kinds() -> Vec<String> {
    vec!["complete".into(), "partial".into()]
}

fn default_timeout() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted bundle, decompressed (a volume set counts as one).
    pub max_bundle_bytes: u64,
    /// How long a complete sent in volumes, once started, waits for its next
    /// volume before the load is abandoned (nothing commits; it starts over when
    /// more arrives). A set whose newest volume is older than this is not started.
    #[serde(with = "ferry_common::duration")]
    pub volume_wait: Duration,
    /// What each file system a bundle is staged or installed on must keep free
    /// after it (see [`crate::space`]).
    pub keep_free: KeepFree,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bundle_bytes: 256 << 30,
            volume_wait: Duration::from_secs(300),
            keep_free: KeepFree::default(),
        }
    }
}

/// `[limits] keep_free`: a byte count (`2147483648`) or a share of the file
/// system (`"10%"`). Unset: 5 % of the file system, at most 4 GiB — a large
/// disk need not keep hundreds of gigabytes idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepFree {
    #[default]
    Default,
    Bytes(u64),
    Percent(u64),
}

impl KeepFree {
    /// The bytes to keep free on a file system of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        match self {
            KeepFree::Default => (total / 100 * 5).min(4 << 30),
            KeepFree::Bytes(n) => n,
            KeepFree::Percent(p) => total / 100 * p,
        }
    }
}

impl std::fmt::Display for KeepFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepFree::Default => f.write_str("5% of the file system, at most 4 GiB"),
            KeepFree::Bytes(n) => write!(f, "`keep_free = {n}`"),
            KeepFree::Percent(p) => write!(f, "`keep_free = \"{p}%\"` of the file system"),
        }
    }
}

impl<'de> Deserialize<'de> for KeepFree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        let bad = || {
            serde::de::Error::custom(
                "keep_free is a byte count (e.g. 2147483648) or a percentage from 0 to 99 (e.g. \"10%\")",
            )
        };
        match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::Bytes(n) => Ok(KeepFree::Bytes(n)),
            Raw::Text(t) => match t.trim().strip_suffix('%').map(|p| p.trim().parse::<u64>()) {
                Some(Ok(p)) if p < 100 => Ok(KeepFree::Percent(p)),
                _ => Err(bad()),
            },
        }
    }
}

/// `ferry-receiver run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Daemon {
    /// Full inbox scan even without file events.
    #[serde(with = "ferry_common::duration")]
    pub rescan_interval: Duration,
    #[serde(with = "ferry_common::duration")]
    pub prune_interval: Duration,
}

impl Default for Daemon {
    fn default() -> Self {
        Self {
            rescan_interval: Duration::from_secs(30),
            prune_interval: Duration::from_secs(3600),
        }
    }
}

pub use ferry_common::ident::redact_url;

impl TargetConfig {
    pub fn engine(&self) -> Option<Engine> {
        Engine::of_url(&self.url)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        for (key, p) in [("state_dir", &c.state_dir), ("inbox", &c.inbox)] {
            if !p.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} must be an absolute path", p.display()),
                ));
            }
        }
        if c.target.engine().is_none() {
            return Err(invalid(
                "target.url",
                format!(
                    "{} is neither postgres://… nor sqlite://…",
                    redact_url(&c.target.url)
                ),
            ));
        }
        if let Some(b) = &c.bucket
            && let Err(message) = ferry_common::bucket::Bucket::open(b)
        {
            return Err(invalid("bucket.url", message));
        }
        for (name, dir) in &c.media {
            if !dir.is_absolute() {
                return Err(invalid(
                    &format!("media.{name}"),
                    format!("{} must be an absolute path", dir.display()),
                ));
            }
        }
        for (id, s) in &c.senders {
            if let Some(key) = &s.public_key
                && let Err(e) = crate::trust::parse_key(key)
            {
                return Err(invalid(
                    &format!("senders.{id}.public_key"),
                    format!(
                        "not an OpenSSH public key ({e}); paste the sender's `<key>.pub` line, \
                         e.g. \"ssh-ed25519 AAAA… ferry@app\""
                    ),
                ));
            }
        }
        for (i, h) in c.hooks.iter().enumerate() {
            let key = format!("hooks[{i}]");
            match (&h.command, &h.sql) {
                (Some(cmd), None) if !cmd.is_empty() => {}
                (None, Some(sql)) if !sql.trim().is_empty() => {}
                _ => {
                    return Err(invalid(
                        &key,
                        "needs exactly one of `command = [\"/path/prog\", \"arg\"]` or `sql = \"…\"`"
                            .into(),
                    ));
                }
            }
            for on in &h.on {
                if on != "complete" && on != "partial" {
                    return Err(invalid(
                        &format!("{key}.on"),
                        format!("{on:?} is not a bundle kind; use \"complete\" and/or \"partial\""),
                    ));
                }
            }
        }
        Ok(c)
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.state_dir.join("quarantine")
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.state_dir.join("staging")
    }
}

/// The commented example configuration (`ferry-receiver example-config`).
pub const EXAMPLE: &str = include_str!("../../docs/receiver.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_unknown_keys_are_named() {
        let c = Config::parse(EXAMPLE, Path::new("x")).unwrap();
        assert_eq!(c.retention.partial, Duration::from_secs(2 * 86400));
        let e = Config::parse(
            "state_dir='/s'\ninbox='/i'\n[target]\nurl='sqlite:///x'\n[retention]\ncompletes='1d'\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown field `completes`") && e.contains("r.toml"),
            "{e}"
        );
        let e = Config::parse(
            "state_dir='/s'\ninbox='/i'\n[target]\nurl='sqlite:///x'\n[[hooks]]\ntimeout='1m'\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hooks[0]") && e.contains("command"), "{e}");
    }

    #[test]
    fn keep_free_is_bytes_or_a_share_and_the_default_is_capped() {
        let with = |v: &str| {
            Config::parse(
                &format!(
                    "state_dir='/s'\ninbox='/i'\n[target]\nurl='sqlite:///x'\n[limits]\n{v}\n"
                ),
                Path::new("r.toml"),
            )
            .map(|c| c.limits.keep_free)
            .map_err(|e| e.to_string())
        };
        assert_eq!(with("").unwrap(), KeepFree::Default);
        assert_eq!(
            with("keep_free = 1048576").unwrap(),
            KeepFree::Bytes(1 << 20)
        );
        assert_eq!(with("keep_free = \"10%\"").unwrap(), KeepFree::Percent(10));
        for bad in [
            "keep_free = \"100%\"",
            "keep_free = \"lots\"",
            "keep_free = -1",
        ] {
            let e = with(bad).unwrap_err();
            assert!(
                e.contains("keep_free") && e.contains("percentage"),
                "{bad}: {e}"
            );
        }
        assert_eq!(KeepFree::Default.of(16 << 20), (16 << 20) / 100 * 5);
        assert_eq!(KeepFree::Default.of(10 << 40), 4 << 30);
        assert_eq!(KeepFree::Percent(10).of(1000), 100);
        assert_eq!(KeepFree::Bytes(7).of(1000), 7);
    }
}
