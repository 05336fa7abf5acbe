//! Quarantine: a bundle that failed moves to `<state_dir>/quarantine/` with a
//! readable report beside it (`<bundle>.error.txt`). Nothing is deleted; `retry`
//! moves it back to the inbox.

use crate::inbox::{self, Entry};
use std::path::{Path, PathBuf};

/// A quarantined bundle and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub file: String,
    pub sender: String,
    pub seq: u64,
    pub kind: String,
    pub report: String,
}

pub fn report_path(bundle: &Path) -> PathBuf {
    let mut name = bundle.file_name().unwrap_or_default().to_os_string();
    name.push(".error.txt");
    bundle.with_file_name(name)
}

/// Moves a bundle to quarantine with its error report.
pub fn quarantine(dir: &Path, entry: &Entry, error: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dest = dir.join(&entry.file);
    let report = format!(
        "bundle:  {}\nsender:  {}\nseq:     {}\nkind:    {}\nfailed:  {}\n\nerror:\n{error}\n\n\
         Nothing of this bundle was applied. Later partials of this sender are held behind it.\n\
         Fix the cause, then: ferry-receiver retry {}\n(or send a complete: ferry-sender complete)\n",
        entry.file,
        entry.sender,
        entry.seq,
        entry.kind,
        chrono::Utc::now().to_rfc3339(),
        entry.file
    );
    ferry_common::durable::write_atomic(&report_path(&dest), report.as_bytes())?;
    // A volume set moves whole: its volumes, then its final file if it came.
    for f in entry.files() {
        std::fs::rename(f, dir.join(f.file_name().unwrap_or_default()))?;
    }
    ferry_common::durable::sync_dir(dir)?;
    Ok(dest)
}

/// The quarantined bundles, oldest sequence first.
pub fn list(dir: &Path) -> std::io::Result<Vec<Failure>> {
    Ok(inbox::scan(dir)?
        .into_iter()
        .map(|e| Failure {
            report: std::fs::read_to_string(report_path(&e.path)).unwrap_or_default(),
            file: e.file,
            sender: e.sender,
            seq: e.seq,
            kind: e.kind.to_string(),
        })
        .collect())
}

/// Removes quarantined copies of bundle `seq` of `sender` once another copy
/// of it (sent again after it was found damaged) is applied: the failure is
/// resolved and must not stay in `failures` and `status`.
pub fn forget(dir: &Path, sender: &str, seq: u64) {
    let Ok(entries) = inbox::scan(dir) else {
        return;
    };
    for e in entries
        .iter()
        .filter(|e| e.sender == sender && e.seq == seq)
    {
        for f in e.files() {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_file(report_path(&e.path));
        tracing::info!(bundle = %e.file, seq, "a copy sent again was applied; the quarantined copy is removed");
    }
}

/// Moves a quarantined bundle back to the inbox.
pub fn retry(dir: &Path, inbox: &Path, file: &str) -> Result<PathBuf, String> {
    let name = Path::new(file)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let src = dir.join(&name);
    let entry = inbox::scan(dir)
        .map_err(|e| format!("reading the quarantine {}: {e}", dir.display()))?
        .into_iter()
        .find(|e| e.file == name);
    let Some(entry) = entry else {
        return Err(format!(
            "{name} is not in quarantine ({}); `ferry-receiver failures` lists what is",
            dir.display()
        ));
    };
    // A volume set moves back whole, its final file last (the receiver starts
    // a set from its volumes).
    for f in entry.files() {
        let file = f.file_name().unwrap_or_default();
        std::fs::rename(f, inbox.join(file))
            .map_err(|e| format!("moving {} back to the inbox: {e}", file.to_string_lossy()))?;
    }
    let _ = std::fs::remove_file(report_path(&src));
    Ok(inbox.join(&name))
}
