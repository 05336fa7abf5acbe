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
use ferry_common::reader::{Arrival, Limits, read_set};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A small, seedable generator (xorshift64*) for the randomized tests: a run
/// replays from its seed.
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }

    /// `n` bytes that do not compress.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.below(256) as u8).collect()
    }
}

/// Reads and verifies a bundle (a volume set whole, when `path` is the final
/// file of one), returning its manifest and every member's bytes.
pub fn bundle_contents(path: &Path) -> (Manifest, BTreeMap<String, Vec<u8>>) {
    let mut members = BTreeMap::new();
    let arrival = Arrival {
        wait: std::time::Duration::ZERO,
        cancelled: &|| false,
    };
    let manifest = read_set(
        path,
        &Limits::default(),
        &arrival,
        &mut |m, r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            members.insert(m.path.clone(), v);
            Ok(())
        },
        &mut |_| Ok(()),
    )
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

/// Bundle names in an outbox or inbox, sorted (with any temporaries, but not a
/// receiver's acknowledgement files).
pub fn outbox_files(outbox: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(outbox)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with(ferry_common::ack::ACK_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The first column of every row in a complete's data member, as an integer,
/// whichever COPY format the member is in (text: up to the first tab; binary: a
/// whole stream of its own whose first field is an int4 or int8).
pub fn copy_first_column(member: &ferry_common::manifest::Member, bytes: &[u8]) -> Vec<i64> {
    use ferry_common::manifest::DataFormat;
    match member.format {
        Some(DataFormat::PgCopyText) => String::from_utf8(bytes.to_vec())
            .expect("COPY text is UTF-8")
            .lines()
            .map(|l| {
                l.split('\t')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("an integer")
            })
            .collect(),
        Some(DataFormat::PgCopyBinary) => {
            const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
            assert!(
                bytes.starts_with(HEADER),
                "{}: no binary COPY header",
                member.path
            );
            assert!(
                bytes.ends_with(&[0xff, 0xff]),
                "{}: no trailer",
                member.path
            );
            let mut at = HEADER.len();
            let take = |at: &mut usize, n: usize| {
                let s = &bytes[*at..*at + n];
                *at += n;
                s
            };
            let mut out = Vec::new();
            loop {
                let fields = i16::from_be_bytes(take(&mut at, 2).try_into().expect("2 bytes"));
                if fields == -1 {
                    assert_eq!(at, bytes.len(), "{}: bytes after the trailer", member.path);
                    return out;
                }
                for f in 0..fields {
                    let len = i32::from_be_bytes(take(&mut at, 4).try_into().expect("4 bytes"));
                    let v = if len > 0 {
                        take(&mut at, len as usize)
                    } else {
                        &[]
                    };
                    if f == 0 {
                        out.push(match v.len() {
                            4 => i32::from_be_bytes(v.try_into().expect("4")) as i64,
                            8 => i64::from_be_bytes(v.try_into().expect("8")),
                            n => panic!("{}: a first field of {n} bytes", member.path),
                        });
                    }
                }
            }
        }
        other => panic!("{}: not COPY data ({other:?})", member.path),
    }
}

/// The sender chain of the bundles (or volumes) in `dir`, as their names say;
/// panics if `dir` holds none, or several chains.
pub fn chain_in(dir: &Path) -> String {
    let mut chains = chains_in(dir);
    assert_eq!(chains.len(), 1, "chains in {}: {chains:?}", dir.display());
    chains.remove(0)
}

/// The sender chains of the bundles (or volumes) in `dir` (none if `dir` is
/// missing), sorted.
pub fn chains_in(dir: &Path) -> Vec<String> {
    use ferry_common::manifest::{parse_bundle_file_name, parse_volume_file_name};
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut chains: Vec<String> = entries
        .flatten()
        .filter_map(|f| {
            let n = f.file_name().to_string_lossy().into_owned();
            parse_bundle_file_name(&n)
                .or_else(|| parse_volume_file_name(&n).map(|(b, _)| b))
                .map(|b| b.chain)
        })
        .collect();
    chains.sort();
    chains.dedup();
    chains
}

/// The file name of bundle `seq` of `kind` from sender `sender`, in the chain
/// of the bundles in `dir` (see [`chain_in`]).
pub fn name_in(dir: &Path, sender: &str, seq: u64, kind: ferry_common::manifest::Kind) -> String {
    let chain = chain_in(dir);
    ferry_common::manifest::bundle_file_name(sender, &chain, ferry_common::manifest::Seq(seq), kind)
}
