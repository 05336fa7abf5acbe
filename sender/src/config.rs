//! The sender's configuration: one TOML file, validated right after loading and
//! before any I/O. Unknown keys are errors that name the key (serde's
//! `deny_unknown_fields`); every other error names the key and the fix.

pub use ferry_common::config::{ConfigError, ControlConfig, Engine, MetricsConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole sender configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this sender in bundle names and manifests: `[A-Za-z0-9_.]`, no `-`.
    pub sender_id: String,
    /// State (watermarks, history) and the outbox (`<state_dir>/outbox`).
    pub state_dir: PathBuf,
    pub source: SourceConfig,
    #[serde(default)]
    pub complete: CompleteConfig,
    #[serde(default)]
    pub partial: PartialConfig,
    #[serde(default)]
    pub bundle: BundleConfig,
    #[serde(default)]
    pub media: Vec<MediaSet>,
    /// Where bundles go over SFTP; without it bundles stay in the outbox.
    pub push: Option<PushConfig>,
    /// When `status` calls the sender unhealthy.
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The HTTP control endpoint (snapshots on demand); off without it.
    pub control: Option<ControlConfig>,
    /// Delivery into an S3-compatible bucket instead of `[push]` (SFTP).
    pub bucket: Option<ferry_common::bucket::BucketConfig>,
}

/// `status` limits. Each age limit left out is derived from the schedule; see
/// [`HealthConfig::limits`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Since the last partial run that succeeded (one that found no changes
    /// counts). Default: 3 and 10 partial intervals, at least 10 min and 1 h.
    #[serde(with = "ferry_common::duration::option")]
    pub partial_warning: Option<Duration>,
    #[serde(with = "ferry_common::duration::option")]
    pub partial_critical: Option<Duration>,
    /// Since the last complete. Default: the schedule's period plus 2 h, and
    /// twice the period plus 2 h.
    #[serde(with = "ferry_common::duration::option")]
    pub complete_warning: Option<Duration>,
    #[serde(with = "ferry_common::duration::option")]
    pub complete_critical: Option<Duration>,
    /// How long the oldest bundle may wait in the outbox. Default: as partials.
    #[serde(with = "ferry_common::duration::option")]
    pub push_warning: Option<Duration>,
    #[serde(with = "ferry_common::duration::option")]
    pub push_critical: Option<Duration>,
    /// Failed runs in a row of one job before they are critical (a failure
    /// that cannot fix itself, like a refused login, is critical at once).
    pub failures_critical: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            partial_warning: None,
            partial_critical: None,
            complete_warning: None,
            complete_critical: None,
            push_warning: None,
            push_critical: None,
            failures_critical: 3,
        }
    }
}

/// The age limits `status` applies, with the defaults filled in.
#[derive(Debug, Clone, Copy)]
pub struct HealthLimits {
    /// `None` when partials are off.
    pub partial: Option<Thresholds>,
    /// `None` when completes are off.
    pub complete: Option<Thresholds>,
    pub push: Option<Thresholds>,
}

use ferry_common::health::Thresholds;

fn pick(warning: Option<Duration>, critical: Option<Duration>, default: Thresholds) -> Thresholds {
    let warning = warning.unwrap_or(default.warning);
    Thresholds {
        warning,
        critical: critical.unwrap_or(default.critical).max(warning),
    }
}

impl Config {
    /// The health limits: what the operator set, the rest from the schedule.
    pub fn health_limits(&self) -> HealthLimits {
        let h = &self.health;
        let partial_default = self.partial.interval.map(|i| Thresholds {
            warning: (i * 3).max(Duration::from_secs(600)),
            critical: (i * 10).max(Duration::from_secs(3600)),
        });
        let partial = partial_default.map(|d| pick(h.partial_warning, h.partial_critical, d));
        let complete = self.complete.period().map(|p| {
            let slack = Duration::from_secs(2 * 3600);
            pick(
                h.complete_warning,
                h.complete_critical,
                Thresholds {
                    warning: p + slack,
                    critical: p * 2 + slack,
                },
            )
        });
        let push_default = partial_default.or(complete).unwrap_or(Thresholds {
            warning: Duration::from_secs(3600),
            critical: Duration::from_secs(6 * 3600),
        });
        let push = self
            .push
            .as_ref()
            .map(|_| pick(h.push_warning, h.push_critical, push_default));
        HealthLimits {
            partial,
            complete,
            push,
        }
    }
}

/// The receiver's SFTP account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    pub host: String,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    pub user: String,
    /// An OpenSSH private key without a passphrase (ed25519 or RSA).
    pub key_file: PathBuf,
    /// The receiver host's key, as OpenSSH `known_hosts` lines.
    pub known_hosts: PathBuf,
    /// Relative to the account's login (or chroot) directory, or absolute.
    #[serde(default = "default_remote_dir")]
    pub remote_dir: String,
    /// TCP connect, key exchange and authentication together.
    #[serde(default = "default_connect_timeout", with = "ferry_common::duration")]
    pub connect_timeout: Duration,
    /// One SFTP request (a write, an fsync, a rename).
    #[serde(default = "default_request_timeout", with = "ferry_common::duration")]
    pub request_timeout: Duration,
    /// A keepalive is sent after this much silence; three unanswered end the link.
    #[serde(default = "default_keepalive", with = "ferry_common::duration")]
    pub keepalive: Duration,
    /// Attempts per push before a command gives up (the bundles stay queued).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// The longest wait between attempts (waits double from 1 s, with jitter).
    #[serde(default = "default_backoff_max", with = "ferry_common::duration")]
    pub backoff_max: Duration,
    /// `run`: how often bundles still queued after a failed push are retried.
    #[serde(default = "default_retry_interval", with = "ferry_common::duration")]
    pub retry_interval: Duration,
}

fn default_retry_interval() -> Duration {
    Duration::from_secs(60)
}

/// When `run` takes completes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompleteConfig {
    /// A 5-field cron expression in local time (`"30 3 * * *"`: 03:30 daily),
    /// or `"off"`.
    pub schedule: String,
    /// How a PostgreSQL complete encodes table data.
    pub copy_format: CopyFormat,
    /// PostgreSQL: a table proved unchanged since the complete that last
    /// dumped it is carried by reference to that complete's data instead of
    /// being dumped again, for at most this many completes in a row (then it
    /// is dumped whole, so a reference never reaches far back). 0 dumps every
    /// table every time.
    pub carry_unchanged: u32,
}

impl Default for CompleteConfig {
    fn default() -> Self {
        Self {
            schedule: "30 3 * * *".to_owned(),
            copy_format: CopyFormat::Binary,
            carry_unchanged: 6,
        }
    }
}

/// The COPY format of a PostgreSQL complete's data members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyFormat {
    /// Binary COPY: measured ~25% less CPU to load on the receiver (no text
    /// parsing of timestamps, numbers and escapes). The default.
    Binary,
    /// Text COPY: readable with a pager after `tar --zstd -x`, and loadable by
    /// any PostgreSQL version or tool that reads COPY text.
    Text,
}

impl CompleteConfig {
    /// The longest gap between two runs of the schedule over the next 8 days
    /// (a weekday-only schedule has a weekend gap); `None` when `"off"`.
    pub fn period(&self) -> Option<Duration> {
        let cron = self.cron().ok()??;
        let mut at = chrono::Local::now();
        let mut longest = Duration::ZERO;
        let end = at + chrono::Duration::days(8);
        let mut prev: Option<chrono::DateTime<chrono::Local>> = None;
        for _ in 0..10_000 {
            let next = cron.find_next_occurrence(&at, false).ok()?;
            if let Some(p) = prev {
                longest = longest.max((next - p).to_std().unwrap_or_default());
            }
            if next > end {
                break;
            }
            prev = Some(next);
            at = next;
        }
        (longest > Duration::ZERO).then_some(longest)
    }

    /// The parsed schedule; `None` when `"off"`.
    pub fn cron(&self) -> Result<Option<croner::Cron>, String> {
        let s = self.schedule.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        if s.split_whitespace().count() != 5 {
            return Err(format!(
                "{s:?} is not a 5-field cron expression (minute hour day-of-month month \
                 day-of-week); write e.g. \"30 3 * * *\" for 03:30 every day, or \"off\""
            ));
        }
        s.parse::<croner::Cron>().map(Some).map_err(|e| {
            format!("{s:?} is not a valid cron expression ({e}); write e.g. \"30 3 * * *\"")
        })
    }
}

fn default_ssh_port() -> u16 {
    22
}
fn default_remote_dir() -> String {
    "inbox".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(15)
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}

/// Where the application's database is and which tables to take.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `postgres://user[:password]@host[:port]/db` or `sqlite:///path/to/db.sqlite3`.
    pub url: String,
    /// Table patterns (`schema.table`, `*` and `?` wildcards); default: every table.
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Parallel readers for a complete (PostgreSQL): connections sharing one snapshot.
    #[serde(default = "default_jobs")]
    pub jobs: usize,
    /// The `pg_dump` used for schema DDL (PostgreSQL); must be at least the server's version.
    #[serde(default = "default_pg_dump")]
    pub pg_dump: PathBuf,
    /// PostgreSQL: the time zone the application writes `timestamp without time
    /// zone` change columns in (Django with `USE_TZ = False`: its `TIME_ZONE`).
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

// The URL may hold a password: never print it.
impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &redact_url(&self.url))
            .field("include", &self.include)
            .field("exclude", &self.exclude)
            .field("jobs", &self.jobs)
            .finish()
    }
}

fn default_jobs() -> usize {
    2
}

fn default_timezone() -> String {
    "UTC".to_owned()
}

fn default_pg_dump() -> PathBuf {
    PathBuf::from("pg_dump")
}

/// How partials select changed rows and capture deletes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartialConfig {
    /// The change column of every table unless overridden.
    pub change_column: Option<String>,
    /// How far behind the safe horizon the next partial starts again: covers
    /// application clocks that stamp rows slightly before their transaction
    /// starts. Re-sent rows are harmless upserts.
    #[serde(with = "ferry_common::duration")]
    pub overlap: Duration,
    /// `"trigger"`: the sender installs delete-capture triggers and a log table;
    /// `"off"`: deletes are not captured (and the sender removes its triggers).
    pub deletes: DeleteCapture,
    /// How long delete-log entries are kept after the watermark passed them.
    #[serde(with = "ferry_common::duration")]
    pub delete_log_retention: Duration,
    /// Per-table settings; keys are `schema.table` (case-sensitive) or glob
    /// patterns over those names (`"public.auth_*"`). An exact name wins over
    /// patterns, and of several patterns the most specific (most characters
    /// other than wildcards) wins.
    pub tables: BTreeMap<String, TableOverride>,
    /// How partials carry a table that lacks the change column (and has no
    /// stanza of its own): see [`WithoutChangeColumn`].
    pub without_change_column: WithoutChangeColumn,
    /// `without_change_column = "auto"`: tables of at most this many rows are
    /// sent whole in every partial (when they changed), bigger ones in
    /// completes only.
    pub whole_max_rows: u64,
    /// `run`: how often to take a partial (`"5m"`, `"2s"`), or `"off"`.
    #[serde(deserialize_with = "interval")]
    pub interval: Option<Duration>,
}

fn interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(serde::de::Error::custom(
            "an interval of zero; write e.g. \"5m\" or \"off\"",
        )),
        Err(e) => Err(serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"5m\", \"30s\" or \"off\""
        ))),
    }
}

impl Default for PartialConfig {
    fn default() -> Self {
        Self {
            change_column: None,
            overlap: Duration::from_secs(60),
            deletes: DeleteCapture::Trigger,
            delete_log_retention: Duration::from_secs(7 * 86400),
            tables: BTreeMap::new(),
            without_change_column: WithoutChangeColumn::Auto,
            whole_max_rows: 10_000,
            interval: Some(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeleteCapture {
    Trigger,
    Off,
}

/// What partials do with a table that lacks the change column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WithoutChangeColumn {
    /// Whole when it has at most `whole_max_rows` rows, else completes only.
    Auto,
    /// Always whole (when it changed).
    Whole,
    /// Completes only.
    Complete,
    /// Refuse to start until the table has a stanza of its own.
    Error,
}

/// How partials carry a table (`[partial.tables."…"] partial`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Rows whose change column moved, and captured deletes.
    Changes,
    /// Every row, whenever the table changed; the receiver deletes the rows the
    /// set lacks.
    Whole,
    /// Completes only (partials still carry the rows that changed rows of other
    /// tables reference).
    Complete,
}

impl Carry {
    pub fn as_str(self) -> &'static str {
        match self {
            Carry::Changes => "changes",
            Carry::Whole => "whole",
            Carry::Complete => "complete",
        }
    }
}

impl<'de> Deserialize<'de> for Carry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Carry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"changes\", \"whole\", \"complete\", true or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Carry, E> {
                Ok(if v { Carry::Changes } else { Carry::Complete })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Carry, E> {
                match v {
                    "changes" => Ok(Carry::Changes),
                    "whole" => Ok(Carry::Whole),
                    "complete" => Ok(Carry::Complete),
                    _ => Err(E::custom(format!(
                        "{v:?} is not a table policy; write \"changes\", \"whole\" or \"complete\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Per-table partial settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TableOverride {
    pub change_column: Option<String>,
    /// `"changes"` (or `true`), `"whole"`, or `"complete"` (or `false`: the
    /// table travels in completes only, e.g. it has no primary key).
    pub partial: Option<Carry>,
}

/// Bundle compression.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BundleConfig {
    pub zstd_level: i32,
    pub zstd_workers: u32,
    /// A complete is sent in volumes of about this many (compressed) bytes,
    /// growing with the bundle, each pushed as soon as it is written, so that
    /// the receiver loads while the sender dumps; 0 sends every bundle as one
    /// file. Partials are always one file.
    pub volume_bytes: u64,
    /// The OpenSSH private key (no passphrase) that signs every bundle's
    /// manifest; unset: `[push] key_file`, if any. A receiver with the public
    /// key in `[senders.<id>] public_key` applies only bundles it signed.
    pub signing_key: Option<PathBuf>,
    /// `false`: never sign (bundles for receivers that do not check).
    pub sign: bool,
}

// Measured on 2 cores (docs/benchmarks.md): level 1 without zstd workers was faster
// than level 3 with them, made smaller bundles of SQL data, and kept the sender
// near 17 MiB instead of 64 MiB; the table readers (each compressing its own
// parts) already use the cores.
impl Default for BundleConfig {
    fn default() -> Self {
        Self {
            zstd_level: 1,
            zstd_workers: 0,
            volume_bytes: 8 << 20,
            signing_key: None,
            sign: true,
        }
    }
}

/// A directory of media files shipped with the rows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaSet {
    /// The set's name: bundle paths are `media/<name>/<relative path>`.
    pub name: String,
    pub path: PathBuf,
}

impl SourceConfig {
    pub fn engine(&self) -> Option<Engine> {
        Engine::of_url(&self.url)
    }
}

pub use ferry_common::ident::redact_url;

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.sender_id.is_empty()
            || !self
                .sender_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            || self.sender_id.starts_with('.')
        {
            return Err(invalid(
                "sender_id",
                format!(
                    "{:?} must be non-empty and use only letters, digits, `_` and `.` \
                     (not starting with `.`), e.g. \"transapp\"",
                    self.sender_id
                ),
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!(
                    "{} must be an absolute path, e.g. \"/var/lib/ferry-sender\"",
                    self.state_dir.display()
                ),
            ));
        }
        if let Err(message) = self.complete.cron() {
            return Err(invalid("complete.schedule", message));
        }
        if self.push.is_some() && self.bucket.is_some() {
            return Err(invalid(
                "bucket",
                "bundles go to one place: `[push]` (SFTP) or `[bucket]` (object storage); \
                 remove one (receivers can read the bucket, or be fed over SFTP)"
                    .into(),
            ));
        }
        if let Some(b) = &self.bucket
            && let Err(message) = ferry_common::bucket::Bucket::open(b)
        {
            return Err(invalid("bucket.url", message));
        }
        if self.source.engine().is_none() {
            return Err(invalid(
                "source.url",
                format!(
                    "{} is neither postgres://… nor sqlite://…; write e.g. \
                     \"postgres://ferry@127.0.0.1/app\" or \"sqlite:///srv/app/db.sqlite3\"",
                    redact_url(&self.source.url)
                ),
            ));
        }
        for (key, patterns) in [
            ("source.include", &self.source.include),
            ("source.exclude", &self.source.exclude),
        ] {
            for p in patterns {
                if let Err(e) = glob::Pattern::new(p) {
                    return Err(invalid(key, format!("pattern {p:?} is invalid: {e}")));
                }
            }
        }
        if self.source.timezone.is_empty()
            || !self
                .source
                .timezone
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_+-:".contains(c))
        {
            return Err(invalid(
                "source.timezone",
                format!(
                    "{:?} is not a time zone name, e.g. \"Europe/Berlin\"",
                    self.source.timezone
                ),
            ));
        }
        if self.source.jobs == 0 || self.source.jobs > 64 {
            return Err(invalid("source.jobs", "must be between 1 and 64".into()));
        }
        if !(1..=19).contains(&self.bundle.zstd_level) {
            return Err(invalid(
                "bundle.zstd_level",
                "must be between 1 and 19".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.media.iter().enumerate() {
            let ok = !m.name.is_empty()
                && m.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
                && !m.name.starts_with('.');
            if !ok {
                return Err(invalid(
                    &format!("media[{i}].name"),
                    format!("{:?} must use only letters, digits, `_`, `-`, `.`", m.name),
                ));
            }
            if !names.insert(&m.name) {
                return Err(invalid(
                    &format!("media[{i}].name"),
                    format!(
                        "{:?} is used twice; every media set needs its own name",
                        m.name
                    ),
                ));
            }
            if !m.path.is_absolute() {
                return Err(invalid(
                    &format!("media[{i}].path"),
                    format!("{} must be an absolute path", m.path.display()),
                ));
            }
        }
        if let Some(p) = &self.push {
            if p.host.is_empty() {
                return Err(invalid("push.host", "must name the receiver host".into()));
            }
            if p.user.is_empty() {
                return Err(invalid("push.user", "must name the SFTP account".into()));
            }
            for (key, path) in [
                ("push.key_file", &p.key_file),
                ("push.known_hosts", &p.known_hosts),
            ] {
                if !path.is_absolute() {
                    return Err(invalid(
                        key,
                        format!("{} must be an absolute path", path.display()),
                    ));
                }
            }
            if p.remote_dir.is_empty() || p.remote_dir.split('/').any(|c| c == "..") {
                return Err(invalid(
                    "push.remote_dir",
                    format!("{:?} must be a directory path without `..`", p.remote_dir),
                ));
            }
            if p.attempts == 0 {
                return Err(invalid("push.attempts", "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// The key that signs bundles (see [`BundleConfig::signing_key`]).
    pub fn signing_key(&self) -> Option<&Path> {
        if !self.bundle.sign {
            return None;
        }
        self.bundle
            .signing_key
            .as_deref()
            .or(self.push.as_ref().map(|p| p.key_file.as_path()))
    }

    /// Delivered bundles: the newest complete and what followed it are kept here.
    pub fn sent_dir(&self) -> PathBuf {
        self.state_dir.join("sent")
    }

    pub fn outbox(&self) -> PathBuf {
        self.state_dir.join("outbox")
    }

    /// The `[partial.tables."…"]` stanza that applies to `table`
    /// (`schema.table`) and its key: the exact name, else the most specific
    /// matching pattern (most characters other than wildcards; ties: the first
    /// in key order).
    pub fn table_rule(&self, table: &str) -> Option<(&str, &TableOverride)> {
        if let Some((k, r)) = self.partial.tables.get_key_value(table) {
            return Some((k.as_str(), r));
        }
        let literal = |p: &str| p.chars().filter(|c| !"*?[]".contains(*c)).count();
        self.partial
            .tables
            .iter()
            .filter(|(k, _)| {
                glob::Pattern::new(k).is_ok_and(|p| p.matches_with(table, GLOB_OPTIONS))
            })
            .max_by(|a, b| literal(a.0).cmp(&literal(b.0)).then(b.0.cmp(a.0)))
            .map(|(k, r)| (k.as_str(), r))
    }
}

/// How table patterns match `schema.table` names: case-sensitive, and `*`
/// crosses the dot.
pub const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

/// The commented example configuration (also `ferry-sender example-config`).
pub const EXAMPLE: &str = include_str!("../../docs/sender.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.sender_id, "transapp");
        let column = |t: &str| {
            c.table_rule(t)
                .and_then(|(_, r)| r.change_column.as_deref())
                .or(c.partial.change_column.as_deref())
        };
        assert_eq!(column("public.AndroidRequests_report"), Some("timeStamp"));
        assert_eq!(column("public.other"), Some("updated_at"));
    }

    #[test]
    fn table_stanzas_match_by_name_then_by_the_most_specific_pattern() {
        let c = parse(
            "sender_id='a'\nstate_dir='/x'\n[source]\nurl='sqlite:///x'\n\
             [partial.tables.\"public.*\"]\npartial = \"complete\"\n\
             [partial.tables.\"public.auth_*\"]\npartial = \"whole\"\n\
             [partial.tables.\"public.auth_user\"]\npartial = true\nchange_column = \"t\"\n\
             [partial.tables.\"public.django_session\"]\npartial = false\n",
        )
        .unwrap();
        let carry = |t: &str| c.table_rule(t).and_then(|(_, r)| r.partial);
        assert_eq!(carry("public.auth_user"), Some(Carry::Changes));
        assert_eq!(carry("public.auth_group"), Some(Carry::Whole));
        assert_eq!(carry("public.django_session"), Some(Carry::Complete));
        assert_eq!(carry("public.x"), Some(Carry::Complete));
        assert_eq!(carry("other.x"), None);
        let e = parse(
            "sender_id='a'\nstate_dir='/x'\n[source]\nurl='sqlite:///x'\n\
             [partial.tables.\"t\"]\npartial = \"sometimes\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("write \"changes\", \"whole\" or \"complete\""),
            "{e}"
        );
    }

    #[test]
    fn schedules_and_intervals() {
        let base = "sender_id='a'\nstate_dir='/x'\n[source]\nurl='sqlite:///x'\n";
        let c = parse(base).unwrap();
        assert_eq!(c.complete.schedule, "30 3 * * *");
        assert_eq!(c.partial.interval, Some(Duration::from_secs(300)));
        let c = parse(&format!(
            "{base}[complete]\nschedule='off'\n[partial]\ninterval='2s'\n"
        ))
        .unwrap();
        assert!(c.complete.cron().unwrap().is_none());
        assert_eq!(c.partial.interval, Some(Duration::from_secs(2)));
        let c = parse(&format!("{base}[partial]\ninterval='off'\n")).unwrap();
        assert_eq!(c.partial.interval, None);
        for bad in ["'30 3 * *'", "'61 3 * * *'", "'daily'"] {
            let e = parse(&format!("{base}[complete]\nschedule={bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("`complete.schedule`"), "{e}");
            assert!(e.contains("30 3 * * *"), "{e}");
        }
        for bad in ["'0s'", "'soon'"] {
            let e = parse(&format!("{base}[partial]\ninterval={bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("interval"), "{e}");
            assert!(e.contains("5m"), "{e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e =
            parse("sender_id='a'\nstate_dir='/x'\n[source]\nurl='sqlite:///x'\nincludes=['a']\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("unknown field `includes`"), "{e}");
        assert!(e.contains("include"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_fix() {
        let e = parse("sender_id='a-b'\nstate_dir='/x'\n[source]\nurl='sqlite:///x'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sender_id`"), "{e}");
        let e = parse("sender_id='a'\nstate_dir='/x'\n[source]\nurl='mysql://x'\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`source.url`") && e.contains("postgres://"),
            "{e}"
        );
        let e = parse(
            "sender_id='a'\nstate_dir='/x'\n[source]\nurl='sqlite:///x'\n[partial]\noverlap='soon'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("overlap") && e.contains("\"5m\""), "{e}");
        let base = "sender_id='a'\nstate_dir='/x'\n[source]\nurl='sqlite:///x'\n[complete]\n";
        let e = parse(&format!("{base}copy_format='csv'\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("copy_format") && e.contains("`binary`") && e.contains("`text`"),
            "{e}"
        );
        let c = parse(&format!("{base}copy_format='text'\n")).unwrap();
        assert_eq!(c.complete.copy_format, CopyFormat::Text);
        assert_eq!(
            parse(base).unwrap().complete.copy_format,
            CopyFormat::Binary
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        let c =
            parse("sender_id='a'\nstate_dir='/x'\n[source]\nurl='postgres://u:pw@h/db'\n").unwrap();
        assert!(!format!("{c:?}").contains("pw"));
    }
}
