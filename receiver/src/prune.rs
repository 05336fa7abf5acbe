//! Pruning the version history. The applied bundles in the inbox are the
//! restore points (`versions`); per sender, in the chain the copy follows:
//! - the newest `keep_completes` applied completes stay, and every bundle after
//!   the oldest of them (so each point since then stays restorable);
//! - every bundle younger than its kind's lifetime stays, with the complete it
//!   builds on and everything between (so a point inside the lifetime stays
//!   restorable too);
//! - what is older than all of that goes.
//!
//! Bundles of a chain the copy no longer follows (a replaced sender state) go
//! once older than their lifetime. Nothing unapplied (beyond the ledger) or
//! quarantined (another directory) is ever removed.

use crate::config::Retention;
use crate::inbox::Entry;
use crate::plan::LedgerState;
use ferry_common::manifest::Kind;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// Which inbox entries may go, each with the reason: `ledger_of` per sender,
/// `base_of` a partial's complete (from its manifest), `carried_of` the
/// earlier completes a complete carries tables from (they stay as long as it
/// does); ages from the files' modification times.
pub fn select<'a>(
    entries: &'a [Entry],
    ledger_of: impl Fn(&str) -> LedgerState,
    base_of: impl Fn(&Entry) -> Option<u64>,
    carried_of: impl Fn(&Entry) -> Vec<u64>,
    retention: &Retention,
    now: SystemTime,
) -> Vec<(&'a Entry, String)> {
    let lifetime = |e: &Entry| match e.kind {
        Kind::Complete => retention.complete,
        Kind::Partial => retention.partial,
    };
    let age = |e: &Entry| -> Duration {
        // A volume set: its newest file.
        e.files()
            .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .max()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default()
    };
    let mut by_sender: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        by_sender.entry(e.sender.as_str()).or_default().push(e);
    }
    let mut out = Vec::new();
    for (sender, list) in by_sender {
        let l = ledger_of(sender);
        let applied: Vec<&Entry> = list
            .into_iter()
            .filter(|e| l.behind(&e.chain, e.seq))
            .collect();
        // The copy's chain: the oldest seq any kept point needs.
        let mut completes: Vec<u64> = applied
            .iter()
            .filter(|e| e.chain == l.chain && e.kind == Kind::Complete)
            .map(|e| e.seq)
            .collect();
        completes.sort_unstable_by(|a, b| b.cmp(a));
        let kept_completes = retention.keep_completes.max(1);
        let mut floor = completes
            .get(kept_completes.min(completes.len()).saturating_sub(1))
            .copied()
            .or(l.base_seq)
            .unwrap_or(0);
        for e in applied.iter().filter(|e| e.chain == l.chain) {
            if age(e) < lifetime(e) {
                let base = match e.kind {
                    Kind::Complete => Some(e.seq),
                    Kind::Partial => base_of(e),
                };
                floor = floor.min(base.unwrap_or(e.seq));
            }
        }
        // A kept complete keeps the completes it carries tables from (they
        // hold data, never references: one pass finds them all).
        let needed: std::collections::HashSet<u64> = applied
            .iter()
            .filter(|e| e.chain == l.chain && e.kind == Kind::Complete && e.seq >= floor)
            .flat_map(|e| carried_of(e))
            .collect();
        for e in applied {
            if e.chain == l.chain {
                if e.seq < floor && !needed.contains(&e.seq) {
                    out.push((
                        e,
                        format!(
                            "older than every kept restore point (the newest {kept_completes} \
                             complete(s) and the points younger than their lifetime build on #{floor})"
                        ),
                    ));
                }
            } else if age(e) >= lifetime(e) {
                out.push((
                    e,
                    format!(
                        "of sender chain {} the copy no longer follows, older than its lifetime",
                        if e.chain.is_empty() {
                            "(none)"
                        } else {
                            &e.chain
                        }
                    ),
                ));
            }
        }
    }
    out
}
