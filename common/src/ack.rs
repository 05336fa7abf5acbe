//! Acknowledgements: what a receiver tells its senders through the inbox.
//!
//! After each pass the receiver writes `.ferry-ack-<sender>.json` into its inbox
//! (a dot name, so no scan takes it for a bundle), durably. A sender reads it over
//! SFTP before each push and learns
//! - `applied_seq`: what is applied (logged with every bundle sent again);
//! - `wants`: the seq a held chain waits for (a gap, or a bundle quarantined as
//!   damaged), which the sender sends again from `sent/`;
//! - `seen_seq` and `scanned_at`: the newest seq the receiver had anywhere when
//!   it scanned its inbox, so a bundle delivered before that scan and not seen
//!   (lost on a power cut before the directory reached the disk) is sent again.
//!
//! `scanned_at` is the receiver's clock, compared only with the remote time of
//! the delivery (the receiver's clock too), never with the sender's.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The acknowledgement file's name prefix; `ack_file_name` adds the sender.
pub const ACK_PREFIX: &str = ".ferry-ack-";

/// The name of `sender`'s acknowledgement file in the inbox.
pub fn ack_file_name(sender: &str) -> String {
    format!("{ACK_PREFIX}{sender}.json")
}

/// One sender's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub sender_id: String,
    /// The sender chain the copy follows; the numbers below are of that chain.
    /// A sender of another chain (a replaced state) ignores the rest.
    #[serde(default)]
    pub chain: String,
    /// The newest applied bundle (0: none).
    pub applied_seq: u64,
    /// The newest seq the receiver held anywhere (applied, inbox, quarantine)
    /// when it scanned its inbox.
    pub seen_seq: u64,
    /// Seqs the receiver needs (again) to go on.
    #[serde(default)]
    pub wants: Vec<u64>,
    /// When the receiver scanned its inbox for this acknowledgement.
    pub scanned_at: DateTime<Utc>,
}

impl Ack {
    /// Whether this acknowledgement says the same as `other` apart from the time.
    pub fn same_facts(&self, other: &Ack) -> bool {
        (
            &self.sender_id,
            &self.chain,
            self.applied_seq,
            self.seen_seq,
            &self.wants,
        ) == (
            &other.sender_id,
            &other.chain,
            other.applied_seq,
            other.seen_seq,
            &other.wants,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_are_temporary() {
        let a = Ack {
            chain: String::new(),
            sender_id: "app".into(),
            applied_seq: 7,
            seen_seq: 9,
            wants: vec![8],
            scanned_at: Utc::now(),
        };
        let back: Ack = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(a, back);
        assert!(crate::durable::is_temp_name(&ack_file_name("app")));
    }
}
