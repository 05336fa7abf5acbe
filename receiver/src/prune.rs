//! Pruning: applied bundles leave the inbox once older than their lifetime (by
//! kind); the newest applied complete always stays; nothing unapplied (beyond the
//! ledger) or quarantined (another directory) is ever removed.

use crate::config::Retention;
use crate::inbox::Entry;
use crate::plan::LedgerState;
use ferry_common::manifest::Kind;
use std::time::SystemTime;

/// Which inbox entries may go: `ledger` per sender; age from the file's mtime.
pub fn select<'a>(
    entries: &'a [Entry],
    ledger_of: impl Fn(&str) -> LedgerState,
    retention: &Retention,
    now: SystemTime,
) -> Vec<&'a Entry> {
    entries
        .iter()
        .filter(|e| {
            let l = ledger_of(&e.sender);
            let applied = l.behind(&e.chain, e.seq);
            let newest_complete = l.is_base(&e.chain, e.seq);
            let lifetime = match e.kind {
                Kind::Complete => retention.complete,
                Kind::Partial => retention.partial,
            };
            // A volume set: its newest file.
            let age = e
                .files()
                .iter()
                .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
                .max()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            applied && !newest_complete && age >= lifetime
        })
        .collect()
}
