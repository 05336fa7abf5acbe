//! `ferry-receiver restore`: the selected tables as they were at a point of the
//! history — the complete that point builds on plus every partial of its chain
//! up to it — rebuilt in another database. Bundles come from the receiver's
//! inbox (its history) or from any directory of bundles (`--from`), and go
//! through the same verification and the same loaders as the live chain; no
//! ledger is read or written.

use crate::inbox::{self, Entry};
use crate::load::LoadError;
use crate::verify::{self, Verified};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use ferry_common::TableName;
use ferry_common::manifest::{Kind, Manifest};
use ferry_common::reader::{Limits, ReadError, read_manifest};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Bad arguments: exit status 2.
    #[error("{0}")]
    Usage(String),
    /// The history cannot give that point, or the destination is refused.
    #[error("{0}")]
    Refused(String),
    #[error("{bundle} failed verification: {source}")]
    Verify {
        bundle: String,
        #[source]
        source: ReadError,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Media(#[from] crate::media::MediaError),
    #[error("{0}")]
    Io(String),
}

impl RestoreError {
    pub fn is_usage(&self) -> bool {
        matches!(self, RestoreError::Usage(_))
    }
}

/// The point to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// The newest restorable point.
    Latest,
    /// The bundle with this seq (in the newest chain that has it).
    Seq(u64),
    /// The newest point whose source time is at or before this.
    Time(DateTime<Utc>),
}

impl std::str::FromStr for At {
    type Err = RestoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "latest" {
            return Ok(At::Latest);
        }
        if let Ok(n) = s.trim_start_matches('#').parse::<u64>() {
            return Ok(At::Seq(n));
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(At::Time(t.with_timezone(&Utc)));
        }
        for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S"] {
            if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
                return Ok(At::Time(t.and_utc()));
            }
        }
        if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            // A day means its end: the state the day ended with.
            return Ok(At::Time(
                d.and_hms_opt(23, 59, 59).unwrap_or_default().and_utc(),
            ));
        }
        Err(RestoreError::Usage(format!(
            "--at {s:?}: give `latest`, a bundle's seq (e.g. 42), or a time \
             (2026-12-03T17:00:00Z, \"2026-12-03 17:00\" UTC, or a day 2026-12-03 for its end)"
        )))
    }
}

/// What a restore reads: one sender's chain from a complete up to the point.
#[derive(Debug)]
pub struct Plan {
    pub sender: String,
    pub chain: String,
    /// The complete first, then the partials, in order.
    pub bundles: Vec<Entry>,
    /// The point's manifest (its source time, tables).
    pub point: Manifest,
    /// The complete's manifest: the tables a restore can rebuild.
    pub base: Manifest,
    /// Files of earlier completes the complete carries unchanged tables from
    /// (read with it, from the same directory).
    pub carried: Vec<std::path::PathBuf>,
}

impl Plan {
    pub fn seq(&self) -> u64 {
        self.point.seq.0
    }

    /// Bytes of the bundles' files.
    pub fn bytes(&self) -> u64 {
        self.bundles
            .iter()
            .flat_map(|e| e.files())
            .chain(self.carried.iter())
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }
}

fn manifest_of(e: &Entry) -> Result<Manifest, RestoreError> {
    read_manifest(e.header_file(), &Limits::default()).map_err(|source| RestoreError::Verify {
        bundle: e.file.clone(),
        source,
    })
}

/// Plans the restore of `at` from the bundles in `dir`.
pub fn plan(dir: &Path, at: &At, sender: Option<&str>) -> Result<Plan, RestoreError> {
    let entries = inbox::scan(dir)
        .map_err(|e| RestoreError::Io(format!("reading {}: {e}", dir.display())))?;
    let mut by_sender: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for e in entries.into_iter().filter(|e| e.arriving.is_none()) {
        by_sender.entry(e.sender.clone()).or_default().push(e);
    }
    let (sender, entries) = match sender {
        Some(s) => (
            s.to_owned(),
            by_sender.remove(s).ok_or_else(|| {
                RestoreError::Refused(format!(
                    "{} holds no bundles of sender {s:?}{}",
                    dir.display(),
                    senders_hint(&by_sender)
                ))
            })?,
        ),
        None if by_sender.len() == 1 => by_sender.into_iter().next().unwrap_or_default(),
        None if by_sender.is_empty() => {
            return Err(RestoreError::Refused(format!(
                "{} holds no bundles: give the receiver's inbox or a directory of delivered bundles with --from",
                dir.display()
            )));
        }
        None => {
            return Err(RestoreError::Usage(format!(
                "{} holds bundles of several senders; choose one with --sender{}",
                dir.display(),
                senders_hint(&by_sender)
            )));
        }
    };
    // Chains, newest first (a chain id starts with its creation time).
    let mut chains: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        chains.entry(e.chain.clone()).or_default().push(e);
    }
    let mut refusals = Vec::new();
    for (chain, list) in chains.iter().rev() {
        let point = match at {
            At::Latest => newest_reachable(list),
            At::Seq(n) => list.iter().position(|e| e.seq == *n),
            At::Time(t) => newest_before(list, t)?,
        };
        let Some(p) = point else { continue };
        match chain_to(list, p) {
            Ok(bundles) => {
                let point = manifest_of(&list[p])?;
                let base = manifest_of(&bundles[0])?;
                let carried = carried_files(&bundles[0], &base)?;
                return Ok(Plan {
                    sender,
                    chain: chain.clone(),
                    bundles,
                    point,
                    base,
                    carried,
                });
            }
            Err(why) => refusals.push(why),
        }
        if !matches!(at, At::Time(_)) {
            break;
        }
    }
    if let Some(why) = refusals.into_iter().next() {
        return Err(RestoreError::Refused(why));
    }
    Err(RestoreError::Refused(format!(
        "no bundle of sender {sender} in {} is at {}: `ferry-receiver versions` lists the restore points",
        dir.display(),
        match at {
            At::Latest => "any restorable point".to_owned(),
            At::Seq(n) => format!("seq {n}"),
            At::Time(t) => format!("or before {}", t.to_rfc3339()),
        }
    )))
}

/// The files of earlier completes that complete `e` carries tables from, each
/// there beside it, or a refusal naming the one missing.
fn carried_files(e: &Entry, m: &Manifest) -> Result<Vec<std::path::PathBuf>, RestoreError> {
    let mut files: Vec<(&str, u64)> = m
        .carried()
        .map(|(_, c)| (c.file.as_str(), c.seq.0))
        .collect();
    files.sort_unstable();
    files.dedup();
    let mut out = Vec::new();
    for (file, seq) in files {
        let path = e.path.with_file_name(file);
        if !path.is_file() {
            return Err(RestoreError::Refused(format!(
                "complete #{} carries tables unchanged from complete #{seq}, whose file {file} is \
                 not in {}: copy it there (from the sender's `sent` directory or another copy of \
                 the history) and restore again",
                e.seq,
                e.path
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )));
        }
        out.push(path);
    }
    Ok(out)
}

/// The newest bundle of a chain (sorted by seq) reachable from one of its
/// completes without a gap.
fn newest_reachable(list: &[Entry]) -> Option<usize> {
    let mut last: Option<usize> = None;
    for (i, e) in list.iter().enumerate() {
        if e.kind == Kind::Complete || last.is_some_and(|l| list[l].seq + 1 == e.seq) {
            last = Some(i);
        }
    }
    last
}

fn senders_hint(by_sender: &BTreeMap<String, Vec<Entry>>) -> String {
    if by_sender.is_empty() {
        return String::new();
    }
    format!(
        " (senders there: {})",
        by_sender.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

/// The index of the newest bundle of a chain (sorted by seq) whose source time
/// is at or before `t`; source times grow with seq, so a binary search reads
/// few manifests.
fn newest_before(list: &[Entry], t: &DateTime<Utc>) -> Result<Option<usize>, RestoreError> {
    let (mut lo, mut hi) = (0, list.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if manifest_of(&list[mid])?.created_at <= *t {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo.checked_sub(1))
}

/// The complete that bundle `p` of a chain builds on and every bundle from it
/// up to `p`, or why the history cannot give them.
fn chain_to(list: &[Entry], p: usize) -> Result<Vec<Entry>, String> {
    let Some(c) = list[..=p].iter().rposition(|e| e.kind == Kind::Complete) else {
        return Err(format!(
            "bundle #{} cannot be restored: the complete it builds on is no longer in the history \
             (pruned); `ferry-receiver versions` lists the restore points",
            list[p].seq
        ));
    };
    let mut out = vec![list[c].clone()];
    for (expected, e) in (list[c].seq + 1..).zip(&list[c + 1..=p]) {
        if e.seq != expected {
            return Err(format!(
                "bundle #{} cannot be restored: bundle #{expected} between it and the complete \
                 #{} it builds on is missing from the history",
                list[p].seq, list[c].seq
            ));
        }
        out.push(e.clone());
    }
    Ok(out)
}

/// The tables of the complete that the patterns select (all when none is given),
/// or an error naming a pattern that selects nothing.
pub fn select_tables(base: &Manifest, patterns: &[String]) -> Result<Vec<TableName>, RestoreError> {
    let names: Vec<&TableName> = base.tables.iter().map(|t| &t.name).collect();
    if patterns.is_empty() {
        return Ok(names.into_iter().cloned().collect());
    }
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: false,
        require_literal_leading_dot: false,
    };
    let mut chosen = Vec::new();
    for p in patterns {
        let pattern = glob::Pattern::new(p).map_err(|e| {
            RestoreError::Usage(format!("--table {p:?} is not a valid pattern: {e}"))
        })?;
        let matched: Vec<&&TableName> = names
            .iter()
            .filter(|n| {
                pattern.matches_with(&n.to_string(), options)
                    || (n.schema.as_deref().is_none_or(|s| s == "public")
                        && pattern.matches_with(&n.name, options))
            })
            .collect();
        if matched.is_empty() {
            return Err(RestoreError::Usage(format!(
                "--table {p:?} matches no table of the complete #{} ({}): its tables are {}",
                base.seq,
                base.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
                names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for n in matched {
            if !chosen.contains(*n) {
                chosen.push((*n).clone());
            }
        }
    }
    Ok(chosen)
}

/// Where the restored tables go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Postgres(String),
    /// A new SQLite file.
    Sqlite(PathBuf),
}

impl Destination {
    pub fn parse(url: &str) -> Result<Self, RestoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Destination::Postgres(url.to_owned()));
        }
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(RestoreError::Usage(
                    "--into sqlite:// needs a file path, e.g. sqlite:///home/dev/app.db".into(),
                ));
            }
            return Ok(Destination::Sqlite(PathBuf::from(path)));
        }
        Err(RestoreError::Usage(format!(
            "--into {:?}: give a PostgreSQL URL (postgres://user@host/db) or a new SQLite file (sqlite:///path/app.db)",
            crate::config::redact_url(url)
        )))
    }
}

/// What `restore` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: At,
    pub into: String,
    pub tables: Vec<String>,
    pub media_into: Option<PathBuf>,
    pub replace: bool,
    pub dry_run: bool,
    pub from: PathBuf,
    pub sender: Option<String>,
    /// The receiver's own target, refused as a destination.
    pub live_target: Option<String>,
    /// `--via`: the PostgreSQL server a PostgreSQL history is rebuilt on
    /// before it becomes a SQLite file.
    pub via: Option<String>,
    /// Where bundles are staged while verified (one at a time).
    pub staging: PathBuf,
    pub limits: Limits,
    /// Connections loading the complete's tables side by side (`[target] jobs`).
    pub jobs: usize,
}

/// What a restore did (or, with `--dry-run`, would do).
#[derive(Debug, serde::Serialize)]
pub struct Outcome {
    pub sender: String,
    pub chain: String,
    pub seq: u64,
    pub kind: String,
    pub source_time: String,
    pub bundles: Vec<String>,
    pub tables: Vec<String>,
    /// Rows the bundles carry for the selected tables (a complete's rows plus
    /// each partial's changes).
    pub rows: u64,
    pub bytes: u64,
    pub media_files: u64,
    pub dry_run: bool,
    pub into: String,
    /// Foreign keys to tables left out of the restore, not restored.
    pub dropped_foreign_keys: Vec<String>,
}

impl Outcome {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} {} table(s) of sender {} as of #{} ({}, source time {}) into {}\n",
            if self.dry_run {
                "would restore"
            } else {
                "restored"
            },
            self.tables.len(),
            self.sender,
            self.seq,
            self.kind,
            self.source_time,
            self.into
        );
        out.push_str(&format!("  tables: {}\n", self.tables.join(", ")));
        out.push_str(&format!(
            "  from {} bundle(s), {} bytes, {} rows: {}\n",
            self.bundles.len(),
            self.bytes,
            self.rows,
            self.bundles.join(", ")
        ));
        if self.media_files > 0 {
            out.push_str(&format!("  media files: {}\n", self.media_files));
        }
        for fk in &self.dropped_foreign_keys {
            out.push_str(&format!("  not restored: {fk}\n"));
        }
        out
    }
}

/// Plans, checks and (unless a dry run) performs a restore.
pub async fn restore(req: &Request) -> Result<Outcome, RestoreError> {
    let into = Destination::parse(&req.into)?;
    if let (Destination::Postgres(url), Some(live)) = (&into, &req.live_target)
        && same_database(url, live)
    {
        return Err(RestoreError::Refused(live_target_message(url)));
    }
    let plan = plan(&req.from, &req.at, req.sender.as_deref())?;
    let tables = select_tables(&plan.base, &req.tables)?;
    let rows = rows_of(&plan, &tables)?;
    let mut outcome = Outcome {
        sender: plan.sender.clone(),
        chain: plan.chain.clone(),
        seq: plan.seq(),
        kind: plan.point.kind.to_string(),
        source_time: plan.point.created_at.to_rfc3339(),
        bundles: plan
            .carried
            .iter()
            .map(|f| {
                format!(
                    "{} (carried tables)",
                    f.file_name().unwrap_or_default().to_string_lossy()
                )
            })
            .chain(plan.bundles.iter().map(|e| e.file.clone()))
            .collect(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        rows,
        bytes: plan.bytes(),
        media_files: 0,
        dry_run: req.dry_run,
        into: match &into {
            Destination::Postgres(u) => crate::config::redact_url(u),
            Destination::Sqlite(p) => format!("sqlite://{}", p.display()),
        },
        dropped_foreign_keys: Vec::new(),
    };
    let mut bundles = Bundles {
        plan: &plan,
        next: 0,
        staging: req.staging.clone(),
        limits: req.limits.clone(),
        media_into: req.media_into.clone(),
        media_files: 0,
    };
    match into {
        Destination::Postgres(url) => {
            let dropped = crate::load::restore::postgres(
                &url,
                &plan.base,
                &tables,
                req.replace,
                req.dry_run,
                req.jobs,
                &mut bundles,
            )
            .await?;
            outcome.dropped_foreign_keys = dropped;
        }
        Destination::Sqlite(path) => {
            // A PostgreSQL history is rebuilt on --via's server, else on the
            // receiver's own target server.
            let scratch = req
                .via
                .as_deref()
                .or(req
                    .live_target
                    .as_deref()
                    .filter(|u| u.starts_with("postgres")))
                .map(|url| crate::load::restore::Scratch {
                    url,
                    jobs: req.jobs,
                });
            crate::load::restore::sqlite(
                &path,
                &plan.base,
                &tables,
                req.dry_run,
                scratch,
                &mut bundles,
            )
            .await?;
        }
    }
    outcome.media_files = bundles.media_files;
    Ok(outcome)
}

/// Why the receiver's live target is no restore destination.
pub(crate) fn live_target_message(url: &str) -> String {
    format!(
        "{} is a ferry-receiver's live target (it holds the ledger ferry_receiver.applied): its \
         chain owns those tables, and the next bundle would apply on top of the restored rows. \
         Restore into another database (createdb, then --into that URL) and copy the rows you \
         need from there",
        crate::config::redact_url(url)
    )
}

/// Whether two PostgreSQL URLs name the same database (host, port, database).
fn same_database(a: &str, b: &str) -> bool {
    fn key(u: &str) -> Option<(String, u16, String)> {
        let o: sqlx::postgres::PgConnectOptions = u.parse().ok()?;
        Some((
            o.get_host().to_owned(),
            o.get_port(),
            o.get_database().unwrap_or_default().to_owned(),
        ))
    }
    key(a).is_some_and(|k| Some(k) == key(b))
}

/// The rows the bundles carry for the selected tables.
fn rows_of(plan: &Plan, tables: &[TableName]) -> Result<u64, RestoreError> {
    let mut rows = 0;
    for (i, e) in plan.bundles.iter().enumerate() {
        let m = if i == 0 {
            plan.base.clone()
        } else {
            manifest_of(e)?
        };
        rows += m
            .members
            .iter()
            .filter(|x| x.table.as_ref().is_some_and(|t| tables.contains(t)))
            .filter_map(|x| x.rows)
            .sum::<u64>();
    }
    Ok(rows)
}

async fn stage(e: &Entry, staging: &Path, limits: &Limits) -> Result<Verified, RestoreError> {
    let (path, dir, limits) = (e.path.clone(), staging.join(&e.file), limits.clone());
    let file = e.file.clone();
    tokio::task::spawn_blocking(move || {
        verify::stage(&path, &dir, &limits, std::time::Duration::ZERO)
    })
    .await
    .map_err(|j| RestoreError::Io(format!("verification panicked: {j}")))?
    .map_err(|source| RestoreError::Verify {
        bundle: file,
        source,
    })
}

/// The plan's bundles, verified and staged one at a time, for a loader.
pub struct Bundles<'p> {
    plan: &'p Plan,
    next: usize,
    staging: PathBuf,
    limits: Limits,
    /// `--media-into`: each bundle's media files go there as it is read, so
    /// every file ends at its version as of the point.
    media_into: Option<PathBuf>,
    media_files: u64,
}

/// A complete streaming to a loader while it is verified (see
/// [`verify::stream`]): the loader reads `rx`, then awaits `verified`, which
/// must be `Ok` before anything commits.
pub struct Streaming {
    pub manifest: Manifest,
    pub rx: tokio::sync::mpsc::Receiver<verify::Piece>,
    pub verified: tokio::task::JoinHandle<Result<Manifest, ReadError>>,
    pub file: String,
}

impl Streaming {
    /// Waits for the end of verification.
    pub async fn verified(self) -> Result<Manifest, RestoreError> {
        let file = self.file;
        drop(self.rx);
        self.verified
            .await
            .map_err(|j| RestoreError::Io(format!("verification panicked: {j}")))?
            .map_err(|source| RestoreError::Verify {
                bundle: file,
                source,
            })
    }
}

impl Bundles<'_> {
    /// The first bundle (the complete), streamed rather than staged whole.
    pub fn stream_complete(&mut self) -> Result<Streaming, RestoreError> {
        let e = self
            .plan
            .bundles
            .first()
            .ok_or_else(|| RestoreError::Refused("a restore starts from a complete".into()))?;
        self.next = 1;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (path, dir, limits) = (
            e.path.clone(),
            self.staging.join(&e.file),
            self.limits.clone(),
        );
        let verified = tokio::task::spawn_blocking(move || {
            verify::stream(&path, &dir, &limits, std::time::Duration::ZERO, &tx)
        });
        Ok(Streaming {
            manifest: self.plan.base.clone(),
            rx,
            verified,
            file: e.file.clone(),
        })
    }

    /// Writes media files of a verified bundle under `--media-into DIR/<set>/`
    /// (nothing without the option).
    pub async fn install_media(
        &mut self,
        items: Vec<(ferry_common::manifest::Member, PathBuf)>,
    ) -> Result<(), RestoreError> {
        let Some(dir) = &self.media_into else {
            return Ok(());
        };
        let sets: BTreeMap<String, PathBuf> = items
            .iter()
            .filter_map(|(m, _)| m.media_set.clone())
            .map(|s| (s.clone(), dir.join(&s)))
            .collect();
        self.media_files += crate::media::install_owned(items, sets).await?;
        Ok(())
    }

    /// The next bundle, verified (the previous one's staged files are gone
    /// once it is dropped).
    pub async fn next(&mut self) -> Result<Option<Verified>, RestoreError> {
        let Some(e) = self.plan.bundles.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        let v = stage(e, &self.staging, &self.limits).await?;
        let m = &v.manifest;
        if m.sender_id != e.sender || m.seq.0 != e.seq || m.chain != e.chain || m.kind != e.kind {
            return Err(RestoreError::Refused(format!(
                "{}: the file name and the manifest disagree (manifest: {} #{} {}); refusing a renamed bundle",
                e.file, m.sender_id, m.seq, m.kind
            )));
        }
        if m.kind == Kind::Partial && m.base_seq != self.plan.base.seq {
            return Err(RestoreError::Refused(format!(
                "{}: partial #{} builds on complete #{}, not on #{} the restore starts from",
                e.file, m.seq, m.base_seq, self.plan.base.seq
            )));
        }
        let media = m
            .members
            .iter()
            .filter(|x| x.role == ferry_common::manifest::Role::Media)
            .map(|x| (x.clone(), v.file(x).to_owned()))
            .collect();
        self.install_media(media).await?;
        Ok(Some(v))
    }
}
