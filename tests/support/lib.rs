//! Test support for ferry's end-to-end tests: a throwaway PostgreSQL cluster per
//! test (initdb + pg_ctl on a free loopback port, run as the unprivileged
//! `postgres` user when the tests run as root), helpers to read bundles, and a
//! small reference loader that applies bundles to a PostgreSQL or SQLite database
//! so that tests can compare tables row for row.

pub mod daemon;
pub mod fixtures;
pub mod lite;
pub mod loader;
pub mod pg;
pub mod sshd;

use ferry_common::manifest::Manifest;
use ferry_common::reader::{Limits, read_bundle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads and verifies a bundle, returning its manifest and every member's bytes.
pub fn bundle_contents(path: &Path) -> (Manifest, BTreeMap<String, Vec<u8>>) {
    let mut members = BTreeMap::new();
    let manifest = read_bundle(path, &Limits::default(), |m, r| {
        let mut v = Vec::new();
        r.read_to_end(&mut v)?;
        members.insert(m.path.clone(), v);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("bundle {} does not verify: {e}", path.display()));
    (manifest, members)
}

/// The path of a workspace binary, built by `cargo build --bins` (the test
/// command does that first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` before the tests (tests/run does)",
        path.display()
    );
    path
}

/// Writes a sender configuration into `dir` and returns its path.
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("sender.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// Final bundle names in an outbox, sorted.
pub fn outbox_files(outbox: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(outbox)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
