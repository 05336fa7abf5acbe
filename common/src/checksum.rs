//! Member checksums: BLAKE3, which ferry writes, or SHA-256, which bundles of
//! format 1 carry and which a reader still verifies.
//!
//! Every member's bytes are hashed twice per sync (by the sender as it writes
//! them, by the receiver as it verifies them), so the hash is on the hot path of
//! a complete: on the 2-core machine of docs/benchmarks.md, SHA-256 (with the
//! CPU's SHA extensions) took 0.48 s per 810 MB and BLAKE3 0.14 s.
//!
//! Whole bundle files (what the final file of a volume set lists for each
//! earlier volume) keep SHA-256: they are compressed and small.

use sha2::Digest;
use std::fmt;

/// A checksum algorithm of the bundle format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Blake3,
}

/// What ferry writes for every member.
pub const MEMBER: Algorithm = Algorithm::Blake3;

/// A member's checksum: the algorithm and the lowercase hex digest. In a
/// manifest, one key `"blake3"` or `"sha256"` of the member (see [`keys`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Sha256(String),
    Blake3(String),
}

impl Checksum {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Checksum::Sha256(_) => Algorithm::Sha256,
            Checksum::Blake3(_) => Algorithm::Blake3,
        }
    }

    /// The hex digest.
    pub fn hex(&self) -> &str {
        match self {
            Checksum::Sha256(h) | Checksum::Blake3(h) => h,
        }
    }
}

impl fmt::Display for Checksum {
    /// `blake3:<hex>` or `sha256:<hex>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Checksum::Sha256(_) => "sha256",
            Checksum::Blake3(_) => "blake3",
        };
        write!(f, "{name}:{}", self.hex())
    }
}

/// A member's checksum as manifest keys: `"blake3"` or `"sha256"`, exactly one
/// (a manifest with neither or both is refused, naming the keys).
pub(crate) mod keys {
    use super::Checksum;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Keys {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blake3: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    }

    pub fn serialize<S: Serializer>(c: &Checksum, s: S) -> Result<S::Ok, S::Error> {
        let (blake3, sha256) = match c {
            Checksum::Blake3(h) => (Some(h.clone()), None),
            Checksum::Sha256(h) => (None, Some(h.clone())),
        };
        Keys { blake3, sha256 }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Checksum, D::Error> {
        match Keys::deserialize(d)? {
            Keys {
                blake3: Some(h),
                sha256: None,
            } => Ok(Checksum::Blake3(h)),
            Keys {
                blake3: None,
                sha256: Some(h),
            } => Ok(Checksum::Sha256(h)),
            Keys { blake3: None, .. } => Err(serde::de::Error::custom(
                "a member has no checksum: it needs \"blake3\" (or \"sha256\")",
            )),
            _ => Err(serde::de::Error::custom(
                "a member has both \"blake3\" and \"sha256\": it needs exactly one",
            )),
        }
    }
}

/// An incremental hasher of either algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    // Boxed: BLAKE3's state is ~2 KB, and hashers are moved around in readers.
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Blake3 => Hasher::Blake3(Box::default()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finish(self) -> Checksum {
        match self {
            Hasher::Sha256(h) => Checksum::Sha256(hex::encode(h.finalize())),
            Hasher::Blake3(h) => Checksum::Blake3(h.finalize().to_hex().to_string()),
        }
    }
}

/// The checksum of `data` with `algorithm`.
pub fn of(algorithm: Algorithm, data: &[u8]) -> Checksum {
    let mut h = Hasher::new(algorithm);
    h.update(data);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[test]
    fn known_digests() {
        assert_eq!(
            of(Algorithm::Sha256, b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            of(Algorithm::Blake3, b"abc").to_string(),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for a in [Algorithm::Sha256, Algorithm::Blake3] {
            let mut h = Hasher::new(a);
            for part in data.chunks(777) {
                h.update(part);
            }
            assert_eq!(h.finish(), of(a, &data));
        }
    }

    #[test]
    fn serialized_as_one_key() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct M {
            path: String,
            #[serde(flatten, with = "keys")]
            checksum: Checksum,
        }
        let m = M {
            path: "p".into(),
            checksum: Checksum::Blake3("00".into()),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"path":"p","blake3":"00"}"#);
        assert_eq!(serde_json::from_str::<M>(&json).unwrap(), m);
        let old: M = serde_json::from_str(r#"{"path":"p","sha256":"ab"}"#).unwrap();
        assert_eq!(old.checksum, Checksum::Sha256("ab".into()));
        let none = serde_json::from_str::<M>(r#"{"path":"p"}"#).unwrap_err();
        assert!(none.to_string().contains("no checksum"), "{none}");
        let both =
            serde_json::from_str::<M>(r#"{"path":"p","sha256":"ab","blake3":"cd"}"#).unwrap_err();
        assert!(both.to_string().contains("exactly one"), "{both}");
    }
}
