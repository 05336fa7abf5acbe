//! ferry-receiver: verifies the bundles in its inbox and loads them into its own
//! database in order and exactly once, with media, hooks, quarantine and pruning.
//!
//! A bundle's path through the receiver, by module: [`inbox`] → [`plan`] (order,
//! exactly once) → [`verify`] → [`media`] → [`load`] (with the ledger, in one
//! transaction) → [`hooks`] → [`prune`]; failures go to [`quarantine`]. [`run`]
//! does one pass and [`ack`] tells the senders what it holds; [`daemon`] watches;
//! [`report`] answers status, check, failures; [`versions`] lists the history and
//! [`restore`] rebuilds any point of it elsewhere.

pub mod ack;
pub mod bucket_pull;
pub mod config;
pub mod control;
pub mod daemon;
pub mod export;
pub mod health;
pub mod hooks;
pub mod inbox;
pub mod load;
pub mod media;
pub mod metrics;
pub mod plan;
pub mod prune;
pub mod quarantine;
pub mod report;
pub mod restore;
pub mod run;
pub mod sftp_server;
pub mod space;
pub mod trust;
pub mod verify;
pub mod versions;

pub use config::Config;
