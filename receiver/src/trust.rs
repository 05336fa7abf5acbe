//! Which bundles the receiver trusts. Whoever can write into the inbox can hand
//! the receiver rows to load and, in a complete, DDL to run: with `[senders]`
//! configured the receiver applies only bundles of the senders listed there,
//! and of a sender with a `public_key` only bundles whose manifest is signed
//! by the matching private key (an SSH signature over the manifest's BLAKE3,
//! which covers every member through the manifest's checksums). Anything else
//! is refused before any of it is used, and quarantined with the reason.

use crate::config::Config;
use ferry_common::bundle::SIGNATURE_NAMESPACE;
use ferry_common::manifest::Manifest;
use ferry_common::reader::Trust;
use russh::keys::ssh_key::{PublicKey, SshSig};
use std::collections::BTreeMap;

/// Parses an OpenSSH public key line.
pub fn parse_key(line: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(line.trim()).map_err(|e| e.to_string())
}

/// The check every manifest read for loading goes through; `None` when the
/// configuration accepts any sender.
pub fn from_config(config: &Config) -> Option<std::sync::Arc<Trust>> {
    if config.senders.is_empty() {
        return None;
    }
    let keys: BTreeMap<String, Option<PublicKey>> = config
        .senders
        .iter()
        .map(|(id, s)| {
            (
                id.clone(),
                s.public_key.as_deref().and_then(|k| parse_key(k).ok()),
            )
        })
        .collect();
    Some(std::sync::Arc::new(move |m: &Manifest| check(&keys, m)))
}

fn check(keys: &BTreeMap<String, Option<PublicKey>>, m: &Manifest) -> Result<(), String> {
    let id = &m.sender_id;
    let Some(key) = keys.get(id) else {
        return Err(format!(
            "sender {id:?} is not one this receiver accepts (`[senders]` lists {}); nothing of \
             it is applied. If {id:?} is yours, add `[senders.{id}]` to the receiver's \
             configuration",
            keys.keys()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let Some(key) = key else { return Ok(()) };
    let seal = m.seal.as_ref();
    let Some(signature) = seal.and_then(|s| s.signature.as_deref()) else {
        return Err(format!(
            "the bundle is not signed, and `[senders.{id}] public_key` requires a signature: \
             the sender signs with `[bundle] signing_key` (or its `[push] key_file`); a \
             bundle from a sender older than signatures must be taken again after upgrading it"
        ));
    };
    let digest = seal.map_or("", |s| s.digest.as_str());
    let sig = SshSig::from_pem(signature.trim())
        .map_err(|e| format!("the bundle's signature is unreadable ({e})"))?;
    key.verify(SIGNATURE_NAMESPACE, digest.as_bytes(), &sig)
        .map_err(|_| {
            format!(
                "the bundle's signature does not match `[senders.{id}] public_key` ({}): it was \
                 made with another key, or the bundle was altered; nothing of it is applied",
                key.fingerprint(Default::default())
            )
        })
}
