//! What to do with the bundles of one sender, given the ledger: apply in sequence
//! order, exactly once; skip duplicates; let the newest complete supersede what
//! came before it; hold partials behind a gap, a missing complete or a quarantined
//! bundle. Pure logic, no I/O.

use crate::inbox::Entry;
use ferry_common::manifest::Kind;

/// What the ledger says about one sender.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerState {
    /// The newest applied bundle.
    pub last_seq: Option<u64>,
    /// The newest applied complete (the base partials must build on).
    pub base_seq: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Apply(Entry),
    /// Already applied (a re-delivery); left for pruning.
    Duplicate(Entry),
    /// Older than a newer complete in the inbox; never applied, left for pruning.
    Superseded(Entry),
    /// Waits; the reason says for what.
    Hold(Entry, String),
}

/// Plans one sender's bundles (`entries` sorted by seq; `base_of` gives a
/// partial's `base_seq` from its manifest; `quarantined` are seqs in quarantine).
pub fn plan(
    ledger: &LedgerState,
    entries: &[Entry],
    base_of: impl Fn(&Entry) -> Option<u64>,
    quarantined: &[u64],
) -> Vec<Step> {
    let last = ledger.last_seq.unwrap_or(0);
    let mut steps = Vec::new();
    let (done, pending): (Vec<&Entry>, Vec<&Entry>) = entries.iter().partition(|e| e.seq <= last);
    steps.extend(done.into_iter().cloned().map(Step::Duplicate));
    // The newest complete supersedes everything pending before it.
    let start = pending
        .iter()
        .rposition(|e| e.kind == Kind::Complete)
        .unwrap_or(0);
    steps.extend(
        pending[..start]
            .iter()
            .map(|e| Step::Superseded((*e).clone())),
    );
    let mut expected = last + 1;
    let mut base = ledger.base_seq;
    let mut blocked: Option<String> = None;
    for e in &pending[start..] {
        if let Some(why) = &blocked {
            steps.push(Step::Hold((*e).clone(), why.clone()));
            continue;
        }
        if e.kind == Kind::Complete {
            steps.push(Step::Apply((*e).clone()));
            expected = e.seq + 1;
            base = Some(e.seq);
            continue;
        }
        let why = if base.is_none() {
            Some("waits for a complete bundle (none applied yet)".to_owned())
        } else if e.seq != expected {
            Some(if quarantined.contains(&expected) {
                format!("held behind quarantined bundle #{expected}: retry it or send a complete")
            } else {
                format!("waits for bundle #{expected}, which has not arrived (gap)")
            })
        } else if base_of(e) != base {
            Some(format!(
                "builds on complete #{}, but the last applied complete is #{}",
                base_of(e).map_or("?".into(), |b| b.to_string()),
                base.map_or("none".into(), |b| b.to_string())
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                steps.push(Step::Hold((*e).clone(), why.clone()));
                blocked = Some(why);
            }
            None => {
                steps.push(Step::Apply((*e).clone()));
                expected += 1;
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64, kind: Kind) -> Entry {
        crate::inbox::test_entry(seq, kind)
    }

    fn kinds(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Apply(e) => format!("apply {}", e.seq),
                Step::Duplicate(e) => format!("dup {}", e.seq),
                Step::Superseded(e) => format!("superseded {}", e.seq),
                Step::Hold(e, _) => format!("hold {}", e.seq),
            })
            .collect()
    }

    #[test]
    fn in_order_then_gap() {
        let l = LedgerState {
            last_seq: Some(2),
            base_seq: Some(1),
        };
        let es = [
            e(2, Kind::Partial),
            e(3, Kind::Partial),
            e(5, Kind::Partial),
        ];
        let s = plan(&l, &es, |_| Some(1), &[]);
        assert_eq!(kinds(&s), ["dup 2", "apply 3", "hold 5"]);
        assert!(matches!(&s[2], Step::Hold(_, w) if w.contains("#4")));
    }

    #[test]
    fn newest_complete_supersedes() {
        let es = [
            e(1, Kind::Complete),
            e(2, Kind::Partial),
            e(3, Kind::Complete),
            e(4, Kind::Partial),
        ];
        let s = plan(
            &LedgerState::default(),
            &es,
            |x| Some(if x.seq < 3 { 1 } else { 3 }),
            &[],
        );
        assert_eq!(
            kinds(&s),
            ["superseded 1", "superseded 2", "apply 3", "apply 4"]
        );
    }

    #[test]
    fn partials_wait_for_a_complete_and_behind_quarantine() {
        let s = plan(
            &LedgerState::default(),
            &[e(2, Kind::Partial)],
            |_| Some(1),
            &[],
        );
        assert_eq!(kinds(&s), ["hold 2"]);
        let l = LedgerState {
            last_seq: Some(3),
            base_seq: Some(1),
        };
        let s = plan(
            &l,
            &[e(5, Kind::Partial), e(6, Kind::Partial)],
            |_| Some(1),
            &[4],
        );
        assert_eq!(kinds(&s), ["hold 5", "hold 6"]);
        assert!(matches!(&s[0], Step::Hold(_, w) if w.contains("quarantined bundle #4")));
    }
}
