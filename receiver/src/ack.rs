//! Acknowledgements to the senders (see [`ferry_common::ack`]): after each pass,
//! per sender, what is applied, what the receiver holds, and the seq a held chain
//! needs. Written durably into the inbox, only when the facts changed or the last
//! one is older than [`REFRESH`] (so a sender can tell "not seen since" from
//! "not looked yet").

use crate::config::Config;
use crate::inbox::{self, Entry};
use crate::load::{LoadError, Target};
use chrono::{DateTime, Utc};
use ferry_common::ack::{Ack, ack_file_name};
use ferry_common::manifest::Kind;
use std::collections::BTreeSet;
use std::time::Duration;

/// How old an unchanged acknowledgement may get before it is written again.
pub const REFRESH: Duration = Duration::from_secs(20);

/// What to acknowledge for `sender`, given the ledger and what lies in the inbox
/// and the quarantine now. Pure.
pub fn compute(
    sender: &str,
    chain: &str,
    applied_seq: u64,
    inbox: &[Entry],
    quarantined: &[Entry],
    scanned_at: DateTime<Utc>,
) -> Ack {
    let mine = |list: &[Entry]| -> Vec<Entry> {
        list.iter()
            .filter(|e| e.sender == sender && e.chain == chain)
            .cloned()
            .collect()
    };
    let (mine, failed) = (mine(inbox), mine(quarantined));
    let seen_seq = mine
        .iter()
        .chain(&failed)
        .map(|e| e.seq)
        .chain([applied_seq])
        .max()
        .unwrap_or(applied_seq);
    let next = applied_seq + 1;
    // A pending complete starts over: nothing before it is needed.
    let complete_pending = mine
        .iter()
        .any(|e| e.kind == Kind::Complete && e.seq > applied_seq);
    let next_here = mine.iter().any(|e| e.seq == next);
    let waiting = mine.iter().any(|e| e.seq > next) || failed.iter().any(|e| e.seq == next);
    let wants = if waiting && !next_here && !complete_pending {
        vec![next]
    } else {
        Vec::new()
    };
    Ack {
        sender_id: sender.to_owned(),
        chain: chain.to_owned(),
        applied_seq,
        seen_seq,
        wants,
        scanned_at,
    }
}

/// Writes every known sender's acknowledgement into the inbox. A failure to
/// write is logged, not fatal: the senders then keep what they delivered.
pub async fn write_all(
    config: &Config,
    target: &mut Target,
    scanned_at: DateTime<Utc>,
) -> Result<(), LoadError> {
    let entries = inbox::scan(&config.inbox).unwrap_or_default();
    let quarantined = inbox::scan(&config.quarantine_dir()).unwrap_or_default();
    let mut senders: BTreeSet<String> = entries
        .iter()
        .chain(&quarantined)
        .map(|e| e.sender.clone())
        .collect();
    senders.extend(target.history().await?.into_iter().map(|a| a.sender_id));
    for sender in senders {
        let ledger = target.ledger(&sender).await?;
        let applied = ledger.last_seq.unwrap_or(0);
        let ack = compute(
            &sender,
            &ledger.chain,
            applied,
            &entries,
            &quarantined,
            scanned_at,
        );
        let path = config.inbox.join(ack_file_name(&sender));
        let unchanged = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Ack>(&b).ok())
            .is_some_and(|old| {
                old.same_facts(&ack)
                    && (scanned_at - old.scanned_at)
                        .to_std()
                        .is_ok_and(|age| age < REFRESH)
            });
        if unchanged {
            continue;
        }
        let bytes = serde_json::to_vec_pretty(&ack).unwrap_or_default();
        let written =
            tokio::task::spawn_blocking(move || ferry_common::durable::write_atomic(&path, &bytes))
                .await;
        match written {
            Ok(Ok(())) => {
                if !ack.wants.is_empty() {
                    tracing::warn!(sender = %sender, applied_seq = applied, wants = ?ack.wants, "asked the sender to send a bundle again");
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(sender = %sender, %error, "could not write the acknowledgement into the inbox; the sender keeps what it delivered")
            }
            Err(error) => tracing::warn!(sender = %sender, %error, "acknowledgement writer failed"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64, kind: Kind) -> Entry {
        crate::inbox::test_entry(seq, kind)
    }

    #[test]
    fn a_gap_or_a_quarantined_next_is_wanted_a_pending_complete_is_not() {
        let now = Utc::now();
        let p = Kind::Partial;
        // Nothing pending: nothing wanted.
        let a = compute("s", "", 5, &[], &[], now);
        assert_eq!((a.applied_seq, a.seen_seq, a.wants), (5, 5, vec![]));
        // #7 waits for #6, which is not there.
        let a = compute("s", "", 5, &[e(7, p)], &[], now);
        assert_eq!((a.seen_seq, a.wants), (7, vec![6]));
        // #6 is there (maybe being applied): nothing wanted.
        assert!(
            compute("s", "", 5, &[e(6, p), e(7, p)], &[], now)
                .wants
                .is_empty()
        );
        // #6 was quarantined: wanted again, even with nothing behind it.
        let a = compute("s", "", 5, &[], &[e(6, p)], now);
        assert_eq!((a.seen_seq, a.wants), (6, vec![6]));
        // A newer complete is pending: it starts over.
        assert!(
            compute("s", "", 5, &[e(8, Kind::Complete), e(9, p)], &[], now)
                .wants
                .is_empty()
        );
        // Another sender's bundles say nothing about this one.
        let mut other = e(9, p);
        other.sender = "t".into();
        assert!(compute("s", "", 5, &[other], &[], now).wants.is_empty());
    }
}
