//! What both agents' configurations share: the database engine a URL names, and
//! the error type (file, key, fix) that every configuration problem becomes.

use std::path::PathBuf;

/// An error in a configuration file: always names the file, and the key where
/// one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config file {}: `{key}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The database engine a connection URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Sqlite,
}

impl Engine {
    /// `postgres://` or `postgresql://` → PostgreSQL; `sqlite:` → SQLite.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Engine::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Engine::Sqlite)
        } else {
            None
        }
    }
}

/// `[metrics]` (either agent): Prometheus metrics served by `run`, off by
/// default.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `"127.0.0.1:9477"` (sender) / `"127.0.0.1:9478"` (receiver): serves
    /// `GET /metrics` there. Keep it on loopback (or behind a firewall): the
    /// metrics name tables and hosts.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[control]` (either agent): the HTTP control endpoint, off without it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// `"127.0.0.1:9479"`. Plain HTTP: keep it on loopback and put TLS in a
    /// reverse proxy.
    pub listen: std::net::SocketAddr,
    /// A file holding the bearer token (16 characters or more).
    pub token_file: PathBuf,
}
