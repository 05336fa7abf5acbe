//! What to do with the bundles of one sender, given the ledger: apply in sequence
//! order, exactly once; skip duplicates; let the newest complete supersede what
//! came before it; hold partials behind a gap, a missing complete or a quarantined
//! bundle. Pure logic, no I/O.

use crate::inbox::Entry;
use ferry_common::manifest::Kind;

/// What the ledger says about one sender: the chain the copy follows (the
/// newest chain with an applied bundle) and its position in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerState {
    /// Empty: none applied yet, or a sender state older than chains.
    pub chain: String,
    /// The newest applied bundle of `chain`.
    pub last_seq: Option<u64>,
    /// The newest applied complete of `chain` (the base partials must build on).
    pub base_seq: Option<u64>,
}

impl LedgerState {
    /// Whether bundle `seq` of `chain` is behind the copy: applied, or of a
    /// chain older than the one the copy follows (a replaced sender state).
    pub fn behind(&self, chain: &str, seq: u64) -> bool {
        chain < self.chain.as_str()
            || (chain == self.chain && self.last_seq.is_some_and(|l| seq <= l))
    }

    /// Whether bundle `seq` of `chain` is the complete the copy builds on.
    pub fn is_base(&self, chain: &str, seq: u64) -> bool {
        chain == self.chain && self.base_seq == Some(seq)
    }

    /// Whether the applied complete is newer than bundle `seq` of `chain`.
    pub fn base_after(&self, chain: &str, seq: u64) -> bool {
        chain < self.chain.as_str()
            || (chain == self.chain && self.base_seq.is_some_and(|b| b > seq))
    }

    /// The order rule, in one place (the planner asks it of the ledger as it
    /// would be after the bundles planned before; a load asks it of the ledger
    /// inside its transaction, so two racing loads never apply a bundle
    /// twice): whether bundle `seq` of `chain`, of `kind`, built on complete
    /// `base`, applies next. A complete applies unless behind (of a newer
    /// chain it resyncs the copy); a partial must be the next of the copy's
    /// chain and build on its applied complete.
    pub fn admits(
        &self,
        chain: &str,
        seq: u64,
        kind: Kind,
        base: Option<u64>,
    ) -> Result<(), NotNext> {
        if self.behind(chain, seq) {
            return Err(NotNext::Behind {
                last: self.last_seq.unwrap_or(0),
            });
        }
        if kind == Kind::Complete {
            return Ok(());
        }
        if self.base_seq.is_none() {
            return Err(NotNext::NoComplete);
        }
        if chain != self.chain {
            return Err(NotNext::OtherChain(other_chain(chain, seq, &self.chain)));
        }
        let expected = self.last_seq.unwrap_or(0) + 1;
        if seq != expected {
            return Err(NotNext::Gap { expected });
        }
        if base != self.base_seq {
            return Err(NotNext::Base {
                builds_on: base,
                applied: self.base_seq,
            });
        }
        Ok(())
    }
}

/// Why a bundle does not apply next (see [`LedgerState::admits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotNext {
    /// Applied already, or of a chain older than the copy's.
    Behind { last: u64 },
    /// A partial, and no complete is applied.
    NoComplete,
    /// A partial of another chain than the copy's (the message says why and the fix).
    OtherChain(String),
    /// A partial after a gap: `expected` is the next one.
    Gap { expected: u64 },
    /// A partial built on another complete than the applied one.
    Base {
        builds_on: Option<u64>,
        applied: Option<u64>,
    },
}

impl std::fmt::Display for NotNext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seq = |s: &Option<u64>| s.map_or("none".to_owned(), |b| format!("#{b}"));
        match self {
            NotNext::Behind { last } => write!(f, "already applied (the copy is at #{last})"),
            NotNext::NoComplete => f.write_str("waits for a complete bundle (none applied yet)"),
            NotNext::OtherChain(why) => f.write_str(why),
            NotNext::Gap { expected } => write!(
                f,
                "waits for bundle #{expected}, which has not arrived (gap)"
            ),
            NotNext::Base { builds_on, applied } => write!(
                f,
                "builds on complete {}, but the last applied complete is {}",
                seq(builds_on),
                seq(applied)
            ),
        }
    }
}

/// Why a partial of another chain than the copy's cannot apply, and the fix.
pub fn other_chain(e_chain: &str, seq: u64, ledger_chain: &str) -> String {
    format!(
        "partial #{seq} belongs to sender chain {} but the copy follows chain {}: the \
         sender's state was replaced (state directory removed or restored elsewhere), so its \
         numbering started over; the new chain's first complete resyncs the copy — run \
         `ferry-sender complete` on the sender if none is on its way",
        if e_chain.is_empty() {
            "(none)"
        } else {
            e_chain
        },
        if ledger_chain.is_empty() {
            "(none)"
        } else {
            ledger_chain
        },
    )
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
    /// A partial of another chain than the copy's: waits for that chain's
    /// complete; needs the operator's attention if none comes.
    OtherChain(Entry, String),
}

/// Plans one sender's bundles (`entries` sorted by seq; `base_of` gives a
/// partial's `base_seq` from its manifest; `quarantined` are seqs in quarantine).
pub fn plan(
    ledger: &LedgerState,
    entries: &[Entry],
    base_of: impl Fn(&Entry) -> Option<u64>,
    quarantined: &[u64],
) -> Vec<Step> {
    let mut steps = Vec::new();
    let (done, pending): (Vec<&Entry>, Vec<&Entry>) =
        entries.iter().partition(|e| ledger.behind(&e.chain, e.seq));
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
    // The ledger as it will be after the bundles planned so far.
    let mut after = ledger.clone();
    let mut blocked: Option<String> = None;
    for e in &pending[start..] {
        if let Some(why) = &blocked {
            steps.push(Step::Hold((*e).clone(), why.clone()));
            continue;
        }
        let base = match e.kind {
            Kind::Complete => Some(e.seq),
            Kind::Partial => base_of(e),
        };
        match after.admits(&e.chain, e.seq, e.kind, base) {
            Ok(()) => {
                steps.push(Step::Apply((*e).clone()));
                after.last_seq = Some(e.seq);
                if e.kind == Kind::Complete {
                    after.chain = e.chain.clone();
                    after.base_seq = Some(e.seq);
                }
            }
            Err(NotNext::OtherChain(why)) => {
                steps.push(Step::OtherChain((*e).clone(), why.clone()));
                blocked = Some(why);
            }
            Err(not_next) => {
                let why = match not_next {
                    NotNext::Gap { expected } if quarantined.contains(&expected) => format!(
                        "held behind quarantined bundle #{expected}: retry it or send a complete"
                    ),
                    other => other.to_string(),
                };
                steps.push(Step::Hold((*e).clone(), why.clone()));
                blocked = Some(why);
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
                Step::OtherChain(e, _) => format!("other chain {}", e.seq),
            })
            .collect()
    }

    #[test]
    fn in_order_then_gap() {
        let l = LedgerState {
            last_seq: Some(2),
            base_seq: Some(1),
            ..Default::default()
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
            ..Default::default()
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

    fn of(chain: &str, seq: u64, kind: Kind) -> Entry {
        Entry {
            chain: chain.into(),
            ..e(seq, kind)
        }
    }

    #[test]
    fn a_new_chain_resyncs_with_its_complete_and_its_partials_wait_for_it() {
        // The copy follows chain "a" up to #37; the sender's state was replaced.
        let l = LedgerState {
            chain: "a".into(),
            last_seq: Some(37),
            base_seq: Some(30),
        };
        // Only partials of the new chain: held with the cause, never skipped.
        let s = plan(
            &l,
            &[of("b", 2, Kind::Partial), of("b", 3, Kind::Partial)],
            |_| Some(1),
            &[],
        );
        assert_eq!(kinds(&s), ["other chain 2", "hold 3"]);
        assert!(matches!(&s[0], Step::OtherChain(_, w) if w.contains("ferry-sender complete")));
        // Its complete #1 applies although #1 <= #37, then its partials; the
        // old chain's leftovers are behind the copy.
        let es = [
            of("a", 37, Kind::Partial),
            of("a", 38, Kind::Partial),
            of("b", 1, Kind::Complete),
            of("b", 2, Kind::Partial),
        ];
        let s = plan(&l, &es, |_| Some(1), &[]);
        assert_eq!(kinds(&s), ["dup 37", "superseded 38", "apply 1", "apply 2"]);
        // Once the copy follows "b", bundles of "a" never apply again.
        let l = LedgerState {
            chain: "b".into(),
            last_seq: Some(2),
            base_seq: Some(1),
        };
        let s = plan(
            &l,
            &[of("a", 40, Kind::Complete), of("b", 3, Kind::Partial)],
            |_| Some(1),
            &[],
        );
        assert_eq!(kinds(&s), ["dup 40", "apply 3"]);
    }
}
