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
