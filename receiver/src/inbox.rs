//! The inbox: final bundle names only (`<sender>-<seq>-<kind>.tar.zst`); names
//! starting with `.` are uploads in progress and are never touched.

use ferry_common::durable::is_temp_name;
use ferry_common::manifest::{Kind, parse_bundle_file_name};
use std::path::{Path, PathBuf};

/// A finished bundle in the inbox (or the quarantine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub file: String,
    pub sender: String,
    pub seq: u64,
    pub kind: Kind,
}

/// Lists the bundles in a directory, sorted by sender and sequence.
pub fn scan(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let file = e.file_name().to_string_lossy().into_owned();
        if is_temp_name(&file) || !e.file_type()?.is_file() {
            continue;
        }
        if let Some((sender, seq, kind)) = parse_bundle_file_name(&file) {
            out.push(Entry {
                path: e.path(),
                file,
                sender,
                seq: seq.0,
                kind,
            });
        }
    }
    out.sort_by(|a, b| (&a.sender, a.seq).cmp(&(&b.sender, b.seq)));
    Ok(out)
}
