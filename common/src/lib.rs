//! ferry-common: what the sender and the receiver must agree on.
//!
//! - [`manifest`]: the bundle manifest (`manifest.json`) and bundle file names;
//! - [`bundle`]: writing a bundle as one zstd-compressed tar stream, manifest first;
//! - [`reader`]: reading a bundle back, verifying every member's checksum and path;
//! - [`checksum`]: member checksums (BLAKE3; SHA-256 in format 1);
//! - [`ident`]: table names, and quoting identifiers and literals for SQL;
//! - [`durable`]: write-to-temporary, fsync, rename;
//! - [`lock`]: one agent per state directory;
//! - [`service`]: logging, systemd notification, stop signals, progress bars;
//! - [`ack`]: what a receiver acknowledges to its senders through the inbox;
//! - [`health`]: the verdict `status` exits with, and each job's last outcome.

pub mod ack;
pub mod bucket;
pub mod bundle;
pub mod checksum;
pub mod cli_docs;
pub mod config;
pub mod db;
pub mod durable;
pub mod duration;
pub mod health;
pub mod http;
pub mod ident;
pub mod lock;
pub mod manifest;
pub mod metrics;
pub mod reader;
pub mod service;

pub use ident::TableName;
pub use manifest::{Kind, Manifest, Member, Seq};
