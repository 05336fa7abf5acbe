//! The version history: the bundles this receiver applied that are still in
//! its inbox are its restore points. A point is restorable when the complete it
//! builds on and every bundle of its chain from there up to it are all there.

use crate::config::Config;
use crate::inbox;
use crate::load::{LoadError, Target};
use ferry_common::reader::{Limits, read_manifest};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write;

/// One applied bundle of the history.
#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub sender_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub chain: String,
    pub seq: u64,
    pub kind: String,
    pub base_seq: u64,
    /// When the sender took the snapshot the bundle describes.
    pub source_time: String,
    pub applied_at: String,
    /// Rows the bundle changed (a complete: every row).
    pub rows: i64,
    /// Its files' bytes in the inbox (0 when no longer there).
    pub bytes: u64,
    pub tables: Vec<String>,
    pub file: String,
    /// Whether the bundle is still in the inbox.
    pub kept: bool,
    /// Whether the state after this bundle can be rebuilt from the history.
    pub restorable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    pub points: Vec<Version>,
    pub oldest_restorable: Option<Version>,
    pub newest_restorable: Option<Version>,
}

/// Every applied bundle, oldest first per sender and chain, with what the
/// history keeps of it.
pub async fn list(config: &Config, target: &mut Target) -> Result<Versions, LoadError> {
    let entries = inbox::scan(&config.inbox)?;
    let present: HashMap<(&str, &str, u64), &inbox::Entry> = entries
        .iter()
        .filter(|e| e.arriving.is_none())
        .map(|e| ((e.sender.as_str(), e.chain.as_str(), e.seq), e))
        .collect();
    let mut points: Vec<Version> = Vec::new();
    for mut a in target.applied_all().await? {
        let entry = present.get(&(a.sender_id.as_str(), a.chain.as_str(), a.seq as u64));
        let kept = entry.is_some();
        // A partial is restorable when it is kept and so is every bundle of
        // its chain back to its complete: the ledger lists a chain's bundles
        // together, in order, so that is the previous point's verdict.
        // A complete that carries tables needs the completes it carries them
        // from (the ledger says which; rows from before it, the manifest).
        let ok = if a.kind == "complete" {
            entry.is_some_and(|e| match &a.carried_from {
                Some(from) => from
                    .iter()
                    .all(|s| present.contains_key(&(a.sender_id.as_str(), a.chain.as_str(), *s))),
                None => read_manifest(e.header_file(), &Limits::default()).is_ok_and(|m| {
                    m.carried()
                        .all(|(_, c)| e.path.with_file_name(&c.file).is_file())
                }),
            })
        } else {
            kept && points
                .last()
                .is_some_and(|p| p.restorable && p.sender_id == a.sender_id && p.chain == a.chain)
        };
        let (bytes, tables) = match entry {
            Some(e) => (
                e.files()
                    .filter_map(|f| std::fs::metadata(f).ok())
                    .map(|m| m.len())
                    .sum(),
                // Ledger rows from before the history recorded tables: the
                // bundle's manifest says.
                a.tables.take().unwrap_or_else(|| {
                    read_manifest(e.header_file(), &Limits::default())
                        .map(|m| m.tables.iter().map(|t| t.name.to_string()).collect())
                        .unwrap_or_default()
                }),
            ),
            None => (0, Vec::new()),
        };
        points.push(Version {
            sender_id: a.sender_id,
            chain: a.chain,
            seq: a.seq as u64,
            kind: a.kind,
            base_seq: a.base_seq as u64,
            source_time: a.created_at,
            applied_at: a.applied_at,
            rows: a.rows,
            bytes,
            tables,
            file: a.file,
            kept,
            restorable: ok,
        });
    }
    let restorable = || points.iter().filter(|v| v.restorable);
    let oldest = restorable()
        .min_by(|a, b| a.source_time.cmp(&b.source_time))
        .cloned();
    let newest = restorable()
        .max_by(|a, b| a.source_time.cmp(&b.source_time))
        .cloned();
    Ok(Versions {
        oldest_restorable: oldest,
        newest_restorable: newest,
        points,
    })
}

/// The plain listing `versions` prints.
pub fn render(v: &Versions) -> String {
    let mut out =
        String::from("sender\tchain\tseq\tkind\tsource time\trows\tbytes\ttables\trestorable\n");
    for p in &v.points {
        let _ = writeln!(
            out,
            "{}\t{}\t#{}\t{}\t{}\t{}\t{}\t{}\t{}",
            p.sender_id,
            if p.chain.is_empty() { "-" } else { &p.chain },
            p.seq,
            p.kind,
            p.source_time,
            p.rows,
            p.bytes,
            if p.kept {
                p.tables.len().to_string()
            } else {
                "-".into()
            },
            if p.restorable {
                "yes"
            } else if p.kept {
                "no (an earlier bundle it needs is gone)"
            } else {
                "no (pruned)"
            }
        );
    }
    let point = |p: &Option<Version>| {
        p.as_ref().map_or("none".to_owned(), |p| {
            format!("{} #{} ({} {})", p.sender_id, p.seq, p.kind, p.source_time)
        })
    };
    out.push_str(&format!(
        "oldest restorable point: {}\nnewest restorable point: {}\n",
        point(&v.oldest_restorable),
        point(&v.newest_restorable)
    ));
    out
}
