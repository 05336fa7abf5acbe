//! The inbox: final bundle names only (`<sender>-<seq>-<kind>.tar.zst`) and the
//! volumes of a complete sent in volumes (`<…>-complete.v0001.tar.zst`, …); names
//! starting with `.` are uploads in progress and are never touched.

use ferry_common::durable::is_temp_name;
use ferry_common::manifest::{BundleName, Kind, parse_bundle_file_name, parse_volume_file_name};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A bundle in the inbox (or the quarantine): one file, or a volume set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The bundle's file (for a volume set, its final file, which may not have
    /// arrived yet: see `arriving`).
    pub path: PathBuf,
    pub file: String,
    pub sender: String,
    /// The sender state's chain (empty: a state older than chains). Bundles of
    /// one sender sort by chain, then seq.
    pub chain: String,
    pub seq: u64,
    pub kind: Kind,
    /// The volume files of this seq present, in order (empty for a bundle sent
    /// as one file).
    pub volumes: Vec<PathBuf>,
    /// A volume set whose final file has not arrived: the newest volume's
    /// modification time.
    pub arriving: Option<SystemTime>,
    /// Volumes of an abandoned attempt at this seq (a complete killed after its
    /// first volumes, the seq then issued again as a partial): never part of
    /// this bundle, removed by the next pass.
    pub stale: Vec<PathBuf>,
}

impl Entry {
    /// Every file of the bundle that is present: volumes first, then the final file.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.volumes
            .iter()
            .chain(Some(&self.path).filter(|_| self.arriving.is_none()))
    }

    /// The file whose manifest carries the bundle's header: the first volume of
    /// a set still arriving, else the final file.
    pub fn header_file(&self) -> &Path {
        match (&self.arriving, self.volumes.first()) {
            (Some(_), Some(v)) => v,
            _ => &self.path,
        }
    }

    /// Removes every file of the bundle; the first error is returned, after
    /// trying the rest.
    pub fn remove(&self) -> std::io::Result<()> {
        let mut first = Ok(());
        for f in self.files() {
            // Already gone (another pass, or a second receiver, removed it): done.
            if let Err(e) = std::fs::remove_file(f)
                && e.kind() != std::io::ErrorKind::NotFound
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

/// A file that is not a bundle by its name (`backup.tar.gz`, an uppercase
/// name, a seq of 11 digits) is never loaded: a warning, once per file and
/// process, says so.
fn warn_once(file: &str) {
    static WARNED: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let first = WARNED
        .lock()
        .map(|mut w| w.insert(file.to_owned()))
        .unwrap_or(true);
    if first {
        tracing::warn!(
            file,
            "not a bundle name (<sender>-<chain>-<12-digit seq>-<complete|partial>.tar.zst): ignored; \
             move it out of the inbox, or deliver bundles under the names the sender gave them"
        );
    }
}

/// Lists the bundles in a directory, sorted by sender and sequence.
pub fn scan(dir: &Path) -> std::io::Result<Vec<Entry>> {
    scan_with(dir, false)
}

/// [`scan`] for a load pass: files that are not bundles by name are named in
/// the log (once per file and process).
pub fn scan_inbox(dir: &Path) -> std::io::Result<Vec<Entry>> {
    scan_with(dir, true)
}

fn scan_with(dir: &Path, warn_strangers: bool) -> std::io::Result<Vec<Entry>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found: BTreeMap<(String, String, u64), Entry> = BTreeMap::new();
    for e in entries {
        let e = e?;
        let file = e.file_name().to_string_lossy().into_owned();
        if is_temp_name(&file) || !e.file_type()?.is_file() {
            continue;
        }
        if let Some(b) = parse_bundle_file_name(&file) {
            let path = e.path();
            match found.entry((b.sender.clone(), b.chain.clone(), b.seq.0)) {
                // Most entries: the name parsed is all there is to know.
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Entry {
                        path,
                        file,
                        sender: b.sender,
                        chain: b.chain,
                        seq: b.seq.0,
                        kind: b.kind,
                        volumes: Vec::new(),
                        arriving: None,
                        stale: Vec::new(),
                    });
                }
                // Its volumes came first.
                std::collections::btree_map::Entry::Occupied(o) => {
                    let entry = o.into_mut();
                    entry.arriving = None;
                    entry.kind = b.kind;
                    entry.path = path;
                    entry.file = file;
                }
            }
        } else if let Some((b, _)) = parse_volume_file_name(&file)
            && b.kind == Kind::Complete
        {
            let modified = e.metadata()?.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let entry = found
                .entry((b.sender.clone(), b.chain.clone(), b.seq.0))
                .or_insert_with(|| Entry {
                    arriving: Some(modified),
                    ..empty(dir, &b)
                });
            if let Some(newest) = entry.arriving.as_mut() {
                *newest = (*newest).max(modified);
            }
            entry.volumes.push(e.path());
        } else if warn_strangers {
            warn_once(&file);
        }
    }
    let mut out: Vec<Entry> = found.into_values().collect();
    for e in &mut out {
        e.volumes.sort();
        // Only a complete is sent in volumes: beside a partial they are another
        // attempt's.
        if e.kind == Kind::Partial {
            e.stale = std::mem::take(&mut e.volumes);
        }
    }
    Ok(out)
}

/// A bundle `s-<seq>` of sender `s` for unit tests of what plans by entries.
#[cfg(test)]
pub(crate) fn test_entry(seq: u64, kind: Kind) -> Entry {
    let b = BundleName {
        sender: "s".into(),
        chain: String::new(),
        seq: ferry_common::manifest::Seq(seq),
        kind,
    };
    Entry {
        file: format!("s-{seq}"),
        path: PathBuf::new(),
        ..empty(Path::new(""), &b)
    }
}

fn empty(dir: &Path, b: &BundleName) -> Entry {
    let file = ferry_common::manifest::bundle_file_name(&b.sender, &b.chain, b.seq, b.kind);
    Entry {
        path: dir.join(&file),
        file,
        sender: b.sender.clone(),
        chain: b.chain.clone(),
        seq: b.seq.0,
        kind: b.kind,
        volumes: Vec::new(),
        arriving: None,
        stale: Vec::new(),
    }
}
