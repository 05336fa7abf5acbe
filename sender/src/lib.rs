//! ferry-sender: takes consistent complete snapshots and partial diffs of an
//! application's database (PostgreSQL or SQLite) and its media files, and writes
//! each as one verified bundle into a durable local outbox, which it pushes to the
//! receiver over SFTP.
//!
//! A bundle's path through the sender, by module:
//! [`extract`] (source engines, staging, media) → [`bundle`] (the writer thread) →
//! [`outbox`] (durable names, crash recovery) → [`state`] (watermarks, history)
//! → [`push`] (SFTP to the receiver's inbox).
//! [`job`] runs one complete or partial (or a resync); [`daemon`] is `run`;
//! [`report`] answers `status` and `check`.

pub mod bucket_push;
pub mod bundle;
pub mod config;
pub mod control;
pub mod daemon;
pub mod extract;
pub mod job;
pub mod keys;
pub mod metrics;
pub mod outbox;
pub mod push;
pub mod report;
pub mod state;

pub use config::Config;
