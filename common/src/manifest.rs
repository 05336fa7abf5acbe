//! The bundle manifest: `manifest.json`, always the first member of a bundle.
//!
//! It says what the bundle is (kind, sequence, what it builds on), what the source
//! looked like (engine, version, tables and their columns, a schema fingerprint),
//! and lists every other member with its size and checksum, so that a receiver can
//! verify the whole bundle before it commits anything. See `docs/bundle-format.md`.

use crate::TableName;
use crate::checksum::Checksum;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The bundle format version this code writes: 2 gives members BLAKE3
/// checksums; 3 follows `manifest.json` with [`MANIFEST_SUM`], the BLAKE3 of
/// the manifest itself; 4 marks data members of partials that hold a whole
/// table (`Member::whole`). An older reader refuses a newer format with "upgrade
/// ferry".
pub const FORMAT: u32 = 4;

/// The format of a complete that carries tables from an earlier one
/// ([`Member::carried`]): written only then, so that a receiver that cannot
/// follow a reference refuses the bundle ("upgrade ferry") instead of missing a
/// table, and every other bundle stays readable by older receivers.
pub const CARRYING_FORMAT: u32 = 5;

/// The member right after `manifest.json` (format 3 on): the BLAKE3 of
/// `manifest.json`'s bytes, as hex and a newline, so that a damaged manifest
/// (which lists every other checksum) cannot pass.
pub const MANIFEST_SUM: &str = "manifest.json.blake3";

/// The oldest format this code still reads (1: SHA-256 member checksums).
pub const OLDEST_FORMAT: u32 = 1;

/// A bundle's sequence number: strictly increasing per sender, without gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every selected table whole, with schema: replaces the receiver's copy.
    Complete,
    /// The rows changed since the previous bundle, as upserts and deletes.
    Partial,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Complete => "complete",
            Kind::Partial => "partial",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sender's chain: the identity its state directory was created with, so
/// that a sender whose state was lost (and counts from #1 again) never makes
/// bundles a receiver mistakes for ones it already applied. 16 lowercase hex
/// digits: the creation time in microseconds since the epoch (13 digits) and 3
/// random ones, so chains sort by creation (a state made after another, even
/// within the same second, sorts after it). Bundles from states older than
/// chains have the empty chain, which sorts first.
pub fn chain_id(created: std::time::SystemTime, random: u16) -> String {
    let micros = created
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{:013x}{:03x}", micros & ((1 << 52) - 1), random & 0xfff)
}

/// Whether `s` is a chain id as [`chain_id`] makes them.
pub fn is_chain(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A final bundle file name's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleName {
    pub sender: String,
    /// Empty for bundles of a state older than chains.
    pub chain: String,
    pub seq: Seq,
    pub kind: Kind,
}

/// The final file name of a bundle:
/// `<sender>-<chain>-<seq, 12 digits>-<kind>.tar.zst` (`<sender>-<seq>-<kind>…`
/// for the empty chain). Names of one sender sort by chain, then seq.
pub fn bundle_file_name(sender_id: &str, chain: &str, seq: Seq, kind: Kind) -> String {
    if chain.is_empty() {
        format!("{sender_id}-{:012}-{kind}.tar.zst", seq.0)
    } else {
        format!("{sender_id}-{chain}-{:012}-{kind}.tar.zst", seq.0)
    }
}

/// Parses a final bundle file name; `None` for anything else (temporary
/// names, stray files).
pub fn parse_bundle_file_name(name: &str) -> Option<BundleName> {
    let stem = name.strip_suffix(".tar.zst")?;
    if stem.starts_with('.') {
        return None;
    }
    let (rest, kind) = stem.rsplit_once('-')?;
    let kind = match kind {
        "complete" => Kind::Complete,
        "partial" => Kind::Partial,
        _ => return None,
    };
    let (rest, seq) = rest.rsplit_once('-')?;
    if seq.len() != 12 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (sender, chain) = match rest.rsplit_once('-') {
        Some((sender, chain)) if is_chain(chain) => (sender, chain),
        _ => (rest, ""),
    };
    if sender.is_empty() {
        return None;
    }
    Some(BundleName {
        sender: sender.to_owned(),
        chain: chain.to_owned(),
        seq: Seq(seq.parse().ok()?),
        kind,
    })
}

/// The file name of volume `index` (from 1) of a volume set: the bundle's
/// name with `.v<index, 4 digits>` before `.tar.zst`. Volumes sort among
/// themselves by name; the set's final file keeps the name [`bundle_file_name`]
/// gives, and goes after them (by seq and index, not by name).
pub fn volume_file_name(sender_id: &str, chain: &str, seq: Seq, kind: Kind, index: u32) -> String {
    let name = bundle_file_name(sender_id, chain, seq, kind);
    let stem = name.strip_suffix(".tar.zst").unwrap_or(&name);
    format!("{stem}.v{index:04}.tar.zst")
}

/// Parses a volume file name back into the bundle's name and the index.
pub fn parse_volume_file_name(name: &str) -> Option<(BundleName, u32)> {
    let stem = name.strip_suffix(".tar.zst")?;
    let (base, index) = stem.rsplit_once(".v")?;
    if index.len() != 4 || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bundle = parse_bundle_file_name(&format!("{base}.tar.zst"))?;
    let index: u32 = index.parse().ok()?;
    (index > 0).then_some((bundle, index))
}

/// The source database engine and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `postgresql` or `sqlite`.
    pub engine: String,
    pub version: String,
}

/// A column of a selected table, as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The source's type name (`format_type` on PostgreSQL, the declared type on SQLite).
    #[serde(rename = "type")]
    pub sql_type: String,
    pub not_null: bool,
    /// A generated (computed) column: present in rows, never written by a loader.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generated: bool,
    /// PostgreSQL identity columns: `"always"` or `"by default"`. A loader inserts
    /// them with `OVERRIDING SYSTEM VALUE` and never updates an `always` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// A foreign key between two selected tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignKey {
    pub columns: Vec<String>,
    pub references: TableName,
    pub referenced_columns: Vec<String>,
}

/// A selected table: what a receiver needs to check and load its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub name: TableName,
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_keys: Vec<ForeignKey>,
    /// The change column partials select by; absent when the table is complete-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_column: Option<String>,
}

/// What a member holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// DDL that creates types and tables (complete only).
    PreData,
    /// DDL that adds indexes, constraints, foreign keys (complete only).
    PostData,
    /// `setval` calls for the tables' sequences (complete only).
    Sequences,
    /// One table's rows.
    Data,
    /// A media file.
    Media,
}

/// How a data member is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// PostgreSQL `COPY ... TO STDOUT` text format (tab-separated, `\N` for NULL).
    PgCopyText,
    /// PostgreSQL `COPY ... TO STDOUT (FORMAT binary)`: each member a whole binary
    /// COPY stream (signature, header, tuples, trailer), loaded with
    /// `COPY ... FROM STDIN (FORMAT binary)`.
    PgCopyBinary,
    /// JSON lines: `{"op":"upsert","row":{...}}` or `{"op":"delete","key":{...}}`.
    JsonLines,
}

/// One member of the bundle besides the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub path: String,
    pub role: Role,
    pub size: u64,
    /// `"blake3": "<hex>"` (format 2) or `"sha256": "<hex>"` (format 1):
    /// exactly one of the two.
    #[serde(flatten, with = "crate::checksum::keys")]
    pub checksum: Checksum,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<TableName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// For media: the set name and the modification time (ns since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i128>,
    /// In the final file of a volume set: the volume that holds this member
    /// (`None`: the final file itself). See [`Volume`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<u32>,
    /// In a partial (format 4): this data member holds every row of its table,
    /// and the receiver deletes the rows it lacks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole: bool,
    /// In a complete (format 5): this data member is not in this bundle but in
    /// an earlier complete of the same chain, whose data of the table the
    /// sender proved unchanged (see [`Carried`]). Path, size, checksum, rows
    /// and format are the earlier member's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<Carried>,
}

/// Where a carried member's bytes are: the bundle file (in the same directory
/// as the carrying bundle: the receiver's inbox, or a `--from` directory) that
/// holds the member under the same path with the same checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    /// The complete that dumped the table.
    pub seq: Seq,
    /// The file that holds the member: the complete's file, or the volume of
    /// its set that holds it.
    pub file: String,
    /// The oldest transaction that complete's snapshot did not see
    /// (PostgreSQL's `txid_snapshot_xmin`): a row version from it or any later
    /// one means the table changed since. The sender's test; informational
    /// for receivers.
    pub xmin: u64,
}

/// A complete large enough to be sent in volumes (so that the receiver can load
/// while the sender is still dumping) is a *set* of bundle files: volumes
/// `<name>.v0001.tar.zst`, `.v0002` … each a bundle of its own (manifest first,
/// its own members and checksums), then the final file under the ordinary name,
/// whose manifest lists every member of the set and every earlier volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// A random id of the attempt that wrote the set: a receiver never mixes the
    /// volumes of two attempts at the same seq.
    pub set: String,
    /// This file's place in the set, from 1; the final file's is the highest.
    pub index: u32,
    /// In the final file only: the earlier volumes, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<VolumeFile>,
}

/// An earlier volume as the final file of its set lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeFile {
    pub file: String,
    /// The whole file's size and SHA-256.
    pub size: u64,
    pub sha256: String,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub sender_id: String,
    /// The sender's chain ([`chain_id`]; format 4). Empty: a sender state
    /// older than chains.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain: String,
    pub kind: Kind,
    pub seq: Seq,
    /// The complete this bundle builds on (its own seq for a complete).
    pub base_seq: Seq,
    /// The bundle right before this one, if any: a receiver holds on a gap.
    pub prev_seq: Option<Seq>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The longest gap between two completes on the sender's schedule, in
    /// seconds: receivers derive how late a complete may be from it. Absent
    /// when completes are off (or from older senders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_every_s: Option<u64>,
    pub source: Source,
    /// SHA-256 over the selected tables' names, columns, types and keys.
    pub schema_fingerprint: String,
    pub tables: Vec<Table>,
    /// The sender's change-capture watermarks after this bundle (per table, and
    /// `"<deletes>"` for the delete log). Informational for receivers; the sender
    /// uses them to recover its state after a crash.
    #[serde(default)]
    pub watermarks: BTreeMap<String, Option<String>>,
    /// A PostgreSQL complete: the oldest transaction its snapshot did not see
    /// (see [`Carried::xmin`]), so that a later complete can tell which tables
    /// certainly did not change since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_xmin: Option<u64>,
    /// Set in every file of a volume set (see [`Volume`]); absent in a bundle
    /// that is one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<Volume>,
    pub members: Vec<Member>,
    /// Not part of `manifest.json`: what the reader found in
    /// `manifest.json.blake3` — the digest, and the sender's signature over it
    /// if the bundle is signed.
    #[serde(skip)]
    pub seal: Option<Seal>,
}

/// A manifest's digest as its bundle states it, and the signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seal {
    /// The BLAKE3 hex of `manifest.json` (checked by the reader).
    pub digest: String,
    /// An armored SSH signature over `digest`, if the bundle is signed.
    pub signature: Option<String>,
}

impl Manifest {
    /// What identifies this bundle beyond its seq: the BLAKE3 of the manifest
    /// as serialized here (it lists every member's checksum, so two bundles with
    /// the same seq and other rows differ). The receiver's ledger records it and
    /// refuses a same-seq bundle with another identity instead of skipping it.
    pub fn identity(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex().to_string()
    }

    /// Per table (in manifest order): rows and compressed-before bytes of its
    /// data members, for one log event per table.
    pub fn table_totals(&self) -> Vec<(String, u64, u64)> {
        let mut out: Vec<(String, u64, u64)> = Vec::new();
        for m in &self.members {
            let Some(t) = &m.table else { continue };
            let key = t.to_string();
            match out.iter_mut().find(|(k, _, _)| *k == key) {
                Some(e) => {
                    e.1 += m.rows.unwrap_or(0);
                    e.2 += m.size;
                }
                None => out.push((key, m.rows.unwrap_or(0), m.size)),
            }
        }
        out
    }

    /// The members this bundle carries from earlier completes.
    pub fn carried(&self) -> impl Iterator<Item = (&Member, &Carried)> {
        self.members
            .iter()
            .filter_map(|m| m.carried.as_ref().map(|c| (m, c)))
    }

    /// Total rows over all data members.
    pub fn rows(&self) -> u64 {
        self.members.iter().filter_map(|m| m.rows).sum()
    }
}

/// The fingerprint of a set of tables: stable under reordering of the tables.
pub fn schema_fingerprint(tables: &[Table]) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<&Table> = tables.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for t in sorted {
        h.update(format!("table {}\n", t.name.quoted()));
        for c in &t.columns {
            h.update(format!(
                "  {} {} {}\n",
                crate::ident::quote_ident(&c.name),
                c.sql_type,
                c.not_null
            ));
        }
        h.update(format!("  pk {:?}\n", t.primary_key));
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort() {
        let a = bundle_file_name("app-1", "", Seq(9), Kind::Partial);
        let b = bundle_file_name("app-1", "", Seq(10), Kind::Complete);
        assert!(a < b);
        let name = |sender: &str, chain: &str, seq, kind| BundleName {
            sender: sender.into(),
            chain: chain.into(),
            seq: Seq(seq),
            kind,
        };
        assert_eq!(
            parse_bundle_file_name(&b),
            Some(name("app-1", "", 10, Kind::Complete))
        );
        // A chain sorts by creation, and its names after the empty chain's.
        let c1 = chain_id(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            7,
        );
        let c2 = chain_id(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            1,
        );
        assert!(is_chain(&c1) && c1 < c2, "{c1} {c2}");
        let x = bundle_file_name("app.1", &c1, Seq(1), Kind::Complete);
        assert_eq!(x, format!("app.1-{c1}-000000000001-complete.tar.zst"));
        assert_eq!(
            parse_bundle_file_name(&x),
            Some(name("app.1", &c1, 1, Kind::Complete))
        );
        assert!(bundle_file_name("app.1", "", Seq(99), Kind::Partial) < x);
        assert!(x < bundle_file_name("app.1", &c2, Seq(1), Kind::Complete));
        assert_eq!(parse_bundle_file_name(&format!(".{a}.tmp")), None);
        assert_eq!(parse_bundle_file_name("x.tar.zst"), None);
    }

    #[test]
    fn volume_names_round_trip_and_are_not_bundle_names() {
        let v1 = volume_file_name("app-1", "", Seq(10), Kind::Complete, 1);
        let v12 = volume_file_name("app-1", "", Seq(10), Kind::Complete, 12);
        let last = bundle_file_name("app-1", "", Seq(10), Kind::Complete);
        assert_eq!(v1, "app-1-000000000010-complete.v0001.tar.zst");
        assert!(v1 < v12, "volumes sort in order");
        assert_ne!(v12, last);
        let (b, index) = parse_volume_file_name(&v12).unwrap();
        assert_eq!(
            (b.sender.as_str(), b.seq, b.kind, index),
            ("app-1", Seq(10), Kind::Complete, 12)
        );
        // A volume is not a bundle by itself, and a bundle is not a volume.
        assert_eq!(parse_bundle_file_name(&v1), None);
        assert_eq!(parse_volume_file_name(&last), None);
        assert_eq!(
            parse_volume_file_name("app-1-000000000010-complete.v0000.tar.zst"),
            None
        );
        assert_eq!(
            parse_volume_file_name("app-1-000000000010-complete.vx001.tar.zst"),
            None
        );
    }
}
