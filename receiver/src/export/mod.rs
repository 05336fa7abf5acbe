//! `ferry-receiver export --format parquet`: the replicated tables as one
//! Parquet file per table, as of the newest applied bundle, read from the
//! target in one snapshot (a repeatable-read transaction on PostgreSQL, one
//! read transaction on SQLite), streamed in batches of rows so memory does
//! not grow with a table. Written under a temporary name and renamed (a
//! directory), or uploaded file by file with `_manifest.json` last (a
//! bucket). The type mapping is docs/analytics.md.

mod changes;
mod columns;

pub use changes::export as export_changes;

use crate::config::{Config, Engine};
use crate::restore::At;
use anyhow::{Context, anyhow, bail};
use arrow_array::RecordBatch;
use arrow_schema::Schema;
use columns::{Builder, Kind};
use futures_util::StreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::Serialize;
use sqlx::{Connection, Row, TypeInfo, ValueRef};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per Arrow batch (and the byte size that ends one early).
const BATCH_ROWS: usize = 8192;
const BATCH_BYTES: usize = 16 << 20;
/// A row group ends at this many rows, or when its encoded size passes
/// [`GROUP_BYTES`]: the writer holds one row group in memory.
const GROUP_ROWS: usize = 128 * 1024;
const GROUP_BYTES: usize = 48 << 20;

/// `[export]`: after a pass that applied a complete (or, with `after =
/// "every"`, any bundle), the tables go out as Parquet into
/// `<to>/<sender>-<seq>-<kind>/`, outside the load's transaction; a failure
/// is logged and recorded (`status`, metrics) and never holds the chain.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// A directory, or `s3://bucket/prefix`.
    pub to: String,
    #[serde(default)]
    pub after: After,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub as_text: Vec<String>,
    #[serde(default)]
    pub unknown_as_text: bool,
    /// Each applied partial's changes as Parquet too, into
    /// `<to>/<sender>-<seq>-changes/`, for a warehouse to merge.
    #[serde(default)]
    pub changes: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// After each applied complete.
    #[default]
    Complete,
    /// After each pass that applied anything.
    Every,
}

/// The job name of an automatic export in the health records.
pub const EXPORT: &str = "export";

/// Runs `[export]` after a pass, if the pass calls for one. Never fails the
/// caller: the outcome is logged, recorded and counted.
pub async fn after_pass(config: &Config, report: &crate::run::Report) {
    let Some(cfg) = &config.export else { return };
    let req = |to: String| Request {
        to,
        tables: cfg.tables.clone(),
        as_text: cfg.as_text.clone(),
        unknown_as_text: cfg.unknown_as_text,
        at: At::Latest,
        sender: None,
    };
    let dest = |a: &crate::run::AppliedBundle, what: &str| {
        let sender = ferry_common::manifest::parse_bundle_file_name(&a.file)
            .map_or_else(|| "ferry".to_owned(), |b| b.sender);
        format!(
            "{}/{sender}-{:012}-{what}",
            cfg.to.trim_end_matches('/'),
            a.seq
        )
    };
    if cfg.changes {
        for a in report.applied.iter().filter(|a| a.kind == "partial") {
            let to = dest(a, "changes");
            let started = std::time::Instant::now();
            let done = changes::export(config, &a.file, &req(to.clone())).await;
            let retry = format!(
                "make it by hand: ferry-receiver export --changes {} --to {to}",
                a.seq
            );
            outcome(config, &to, started, done, &retry);
        }
    }
    let wanted = match cfg.after {
        After::Complete => report.applied.iter().any(|a| a.kind == "complete"),
        After::Every => !report.applied.is_empty(),
    };
    let Some(newest) = report.applied.last().filter(|_| wanted) else {
        return;
    };
    let to = dest(newest, &newest.kind);
    let started = std::time::Instant::now();
    let done = export(config, &req(to.clone())).await;
    outcome(
        config,
        &to,
        started,
        done,
        "the next complete exports again",
    );
}

/// The inbox file of the partial with this seq (of `sender`, or of the only
/// sender the inbox holds; the newest chain that has it).
pub fn partial_file(config: &Config, seq: u64, sender: Option<&str>) -> anyhow::Result<String> {
    let entries = crate::inbox::scan(&config.inbox)
        .with_context(|| format!("reading {}", config.inbox.display()))?;
    let mut senders: Vec<&str> = entries.iter().map(|e| e.sender.as_str()).collect();
    senders.sort_unstable();
    senders.dedup();
    let sender = match (sender, senders.as_slice()) {
        (Some(s), _) => s,
        (None, [one]) => one,
        (None, []) => bail!("{} holds no bundles", config.inbox.display()),
        (None, many) => bail!(
            "{} holds the bundles of several senders ({}); name one with --sender",
            config.inbox.display(),
            many.join(", ")
        ),
    };
    entries
        .iter()
        .rev()
        .find(|e| e.sender == sender && e.seq == seq)
        .map(|e| e.file.clone())
        .ok_or_else(|| {
            anyhow!(
                "no bundle #{seq} of {sender} in {} (`ferry-receiver versions` lists them)",
                config.inbox.display()
            )
        })
}

/// Logs, records and counts an automatic export's outcome.
fn outcome(
    config: &Config,
    to: &str,
    started: std::time::Instant,
    done: anyhow::Result<Manifest>,
    retry: &str,
) {
    match done {
        Ok(m) => {
            ferry_common::health::JobRecord::record_ok(&config.state_dir, EXPORT);
            crate::metrics::get().exported(true);
            tracing::info!(
                to = %to,
                contents = m.contents,
                tables = m.tables.len(),
                rows = m.tables.iter().map(|t| t.rows).sum::<u64>(),
                ms = started.elapsed().as_millis() as u64,
                "exported as Parquet"
            );
        }
        Err(e) => {
            ferry_common::health::JobRecord::record_failure(
                &config.state_dir,
                EXPORT,
                &format!("{e:#}"),
                false,
            );
            crate::metrics::get().exported(false);
            tracing::error!(to = %to, error = %format!("{e:#}"), "export failed; the chain goes on; {retry}");
        }
    }
}

/// What to export, and where.
#[derive(Debug, Clone)]
pub struct Request {
    /// A directory that does not exist yet (or is empty), or `s3://bucket/prefix`.
    pub to: String,
    /// Glob patterns of tables (`schema.name`, or `name` in `public`).
    pub tables: Vec<String>,
    /// `table.column`: these columns go out as their text form.
    pub as_text: Vec<String>,
    /// Every column without a mapping goes out as its text form.
    pub unknown_as_text: bool,
    /// `Latest`: the target as it is. A past point is rebuilt from the
    /// receiver's history (its inbox) in a scratch database first.
    pub at: At,
    /// The sender whose history a past point comes from, when the inbox holds
    /// several.
    pub sender: Option<String>,
}

/// `_manifest.json`.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub format: &'static str,
    /// `tables`: each table whole as of `source`; `changes`: one partial's
    /// changes (see [`changes`]).
    pub contents: &'static str,
    pub created_at: String,
    /// The newest applied bundle: the point the tables describe.
    pub source: Option<Point>,
    pub tables: Vec<TableOut>,
    /// Change files only: tables the partial sent whole; a table's rows that
    /// its file lacks were deleted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub whole_tables: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Point {
    pub sender_id: String,
    pub seq: i64,
    pub kind: String,
    pub created_at: String,
}

#[derive(Debug, Serialize)]
pub struct TableOut {
    pub table: String,
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub columns: Vec<ColumnOut>,
}

#[derive(Debug, Serialize)]
pub struct ColumnOut {
    pub name: String,
    pub source_type: String,
    pub parquet_type: String,
}

/// A column as pg_attribute describes it: name, declared type, base type's
/// name and `typtype`, type modifier, array element's name and `typtype`.
type PgColumn = (
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
);

struct Col {
    name: String,
    declared: String,
    kind: Kind,
}

pub async fn export(config: &Config, req: &Request) -> anyhow::Result<Manifest> {
    let stage = stage_for(config, &req.to)?;
    let result = match req.at {
        At::Latest => write_all(&config.target.url, req, &stage).await,
        _ => past(config, req, &stage).await,
    };
    deliver(config, &req.to, &stage, result).await
}

/// Where an export is written before it is delivered: beside a directory
/// destination (`.name.part-PID`, renamed at the end), or in the state
/// directory for a bucket. A directory that holds anything is refused.
fn stage_for(config: &Config, to: &str) -> anyhow::Result<PathBuf> {
    let stage = if to.starts_with("s3://") {
        config
            .state_dir
            .join(format!("export-{}", std::process::id()))
    } else {
        let dest = Path::new(to);
        if std::fs::read_dir(dest).is_ok_and(|mut d| d.next().is_some()) {
            bail!(
                "{} exists and is not empty; export into a new directory (exports are never merged into an old one)",
                dest.display()
            );
        }
        let name = dest
            .file_name()
            .ok_or_else(|| anyhow!("--to {to:?} names no directory"))?
            .to_string_lossy();
        dest.with_file_name(format!(".{name}.part-{}", std::process::id()))
    };
    std::fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    Ok(stage)
}

/// Delivers a written stage: renamed into place, or uploaded with
/// `_manifest.json` last; on failure (or a failed write) the stage goes.
async fn deliver(
    config: &Config,
    to: &str,
    stage: &Path,
    written: anyhow::Result<Manifest>,
) -> anyhow::Result<Manifest> {
    let manifest = match written {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(stage);
            return Err(e);
        }
    };
    if to.starts_with("s3://") {
        let uploaded = upload(config, to, stage, &manifest).await;
        let _ = std::fs::remove_dir_all(stage);
        uploaded?;
    } else {
        let dest = Path::new(to);
        let _ = std::fs::remove_dir(dest); // empty, if it exists
        std::fs::rename(stage, dest)
            .with_context(|| format!("renaming {} to {}", stage.display(), dest.display()))?;
        if let Some(parent) = dest.parent() {
            let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
        }
    }
    Ok(manifest)
}

/// A past point: the history restored into a scratch database (a database on
/// the target's PostgreSQL server, dropped afterwards; a SQLite file in the
/// state directory, removed afterwards) and exported from there.
async fn past(config: &Config, req: &Request, stage: &Path) -> anyhow::Result<Manifest> {
    let pid = std::process::id();
    let staging = config.state_dir.join(format!("export-restore-{pid}"));
    let mut restore = crate::restore::Request {
        at: req.at.clone(),
        into: String::new(),
        tables: req.tables.clone(),
        media_into: None,
        replace: false,
        dry_run: false,
        from: config.inbox.clone(),
        sender: req.sender.clone(),
        live_target: Some(config.target.url.clone()),
        via: None,
        staging: staging.clone(),
        jobs: config.target.jobs,
        limits: ferry_common::reader::Limits {
            trust: crate::trust::from_config(config),
            ..Default::default()
        },
    };
    // The scratch database holds exactly the chosen tables.
    let every = Request {
        tables: Vec::new(),
        ..req.clone()
    };
    let rebuilt = |o: crate::restore::Outcome| Point {
        sender_id: o.sender,
        seq: o.seq as i64,
        kind: o.kind,
        created_at: o.source_time,
    };
    let result = match config.target.engine() {
        Some(Engine::Postgres) => {
            let scratch =
                crate::load::restore::ScratchDb::create(&config.target.url, "ferry_export").await?;
            restore.into = scratch.url.clone();
            let result = async {
                let outcome = crate::restore::restore(&restore).await?;
                let mut m = write_all(&scratch.url, &every, stage).await?;
                m.source = Some(rebuilt(outcome));
                Ok(m)
            }
            .await;
            scratch.drop().await;
            result
        }
        _ => {
            let file = config.state_dir.join(format!("export-{pid}.sqlite"));
            restore.into = format!("sqlite://{}", file.display());
            let result = async {
                let outcome = crate::restore::restore(&restore).await?;
                let mut m = write_all(&restore.into, &every, stage).await?;
                m.source = Some(rebuilt(outcome));
                Ok(m)
            }
            .await;
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
            result
        }
    };
    let _ = std::fs::remove_dir_all(&staging);
    result
}

async fn write_all(url: &str, req: &Request, stage: &Path) -> anyhow::Result<Manifest> {
    let mut manifest = Manifest {
        format: "parquet",
        contents: "tables",
        created_at: chrono::Utc::now().to_rfc3339(),
        source: None,
        tables: Vec::new(),
        whole_tables: Vec::new(),
    };
    match Engine::of_url(url) {
        Some(Engine::Postgres) => postgres(url, req, stage, &mut manifest).await?,
        Some(Engine::Sqlite) => sqlite(url, req, stage, &mut manifest).await?,
        None => bail!(
            "target.url {:?}: not a postgres:// or sqlite:// URL",
            crate::config::redact_url(url)
        ),
    }
    write_manifest(stage, &manifest)?;
    Ok(manifest)
}

fn write_manifest(stage: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    let path = stage.join("_manifest.json");
    ferry_common::durable::write_atomic(&path, &serde_json::to_vec_pretty(manifest)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The tables the patterns select (all without), or an error naming the
/// pattern that selects nothing.
fn select(all: Vec<String>, patterns: &[String]) -> anyhow::Result<Vec<String>> {
    if patterns.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for p in patterns {
        let pattern = glob::Pattern::new(p).map_err(|e| anyhow!("--table {p:?}: {e}"))?;
        let hits: Vec<&String> = all
            .iter()
            .filter(|t| {
                pattern.matches(t)
                    || t.strip_prefix("public.")
                        .is_some_and(|n| pattern.matches(n))
            })
            .collect();
        if hits.is_empty() {
            bail!(
                "--table {p:?} matches no table of the target; its tables are {}",
                all.join(", ")
            );
        }
        for h in hits {
            if !chosen.contains(h) {
                chosen.push(h.clone());
            }
        }
    }
    Ok(chosen)
}

/// The kind of each column: its mapping, text where asked, else an error
/// naming the column and the way out.
fn decide(
    table: &str,
    cols: Vec<(String, String, Option<Kind>)>,
    req: &Request,
) -> anyhow::Result<Vec<Col>> {
    let short = table.strip_prefix("public.").unwrap_or(table);
    cols.into_iter()
        .map(|(name, declared, kind)| {
            let asked = req
                .as_text
                .iter()
                .any(|a| *a == format!("{table}.{name}") || *a == format!("{short}.{name}"));
            let kind = match kind {
                _ if asked => Kind::Text,
                Some(k) => k,
                None if req.unknown_as_text => Kind::Text,
                None => bail!(
                    "column {short}.{name} has type {declared}, which has no Parquet mapping \
                     (docs/analytics.md); export it as its text form with `--as-text {short}.{name}`, \
                     or every such column with `--unknown-as-text`"
                ),
            };
            Ok(Col {
                name,
                declared,
                kind,
            })
        })
        .collect()
}

/// One table's Parquet file, fed batch by batch.
struct Out {
    cols: Vec<Col>,
    builders: Vec<Builder>,
    schema: Arc<Schema>,
    writer: ArrowWriter<std::fs::File>,
    path: PathBuf,
    in_batch: usize,
    batch_bytes: usize,
    rows: u64,
    table: String,
}

impl Out {
    fn create(stage: &Path, table: &str, cols: Vec<Col>) -> anyhow::Result<Self> {
        let schema = Arc::new(Schema::new(
            cols.iter()
                .map(|c| c.kind.field(&c.name))
                .collect::<Vec<_>>(),
        ));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(GROUP_ROWS))
            .set_max_row_group_bytes(Some(GROUP_BYTES))
            .build();
        let path = stage.join(format!("{table}.parquet"));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(props))?;
        Ok(Self {
            builders: cols.iter().map(|c| Builder::new(&c.kind)).collect(),
            cols,
            schema,
            writer,
            path,
            in_batch: 0,
            batch_bytes: 0,
            rows: 0,
            table: table.to_owned(),
        })
    }

    fn bad(&self, i: usize, e: &columns::BadValue) -> anyhow::Error {
        let c = &self.cols[i];
        anyhow!(
            "{}.{} (type {}), row {}: {}; export the column as text with `--as-text {}.{}`",
            self.table,
            c.name,
            c.declared,
            self.rows + 1,
            e.0,
            self.table,
            c.name
        )
    }

    /// A row is complete.
    fn row_done(&mut self, bytes: usize) -> anyhow::Result<()> {
        self.rows += 1;
        self.in_batch += 1;
        self.batch_bytes += bytes;
        if self.in_batch >= BATCH_ROWS || self.batch_bytes >= BATCH_BYTES {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> anyhow::Result<()> {
        if self.in_batch == 0 {
            return Ok(());
        }
        let arrays = self.builders.iter_mut().map(Builder::finish).collect();
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), arrays)?;
        self.writer.write(&batch)?;
        self.in_batch = 0;
        self.batch_bytes = 0;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<TableOut> {
        self.flush_batch()?;
        let file = self.writer.into_inner()?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        Ok(TableOut {
            file: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            table: self.table,
            rows: self.rows,
            bytes,
            columns: self
                .cols
                .iter()
                .map(|c| ColumnOut {
                    name: c.name.clone(),
                    source_type: c.declared.clone(),
                    parquet_type: c.kind.describe(),
                })
                .collect(),
        })
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A session whose output COPY's text parser reads: ISO dates, ISO 8601
/// intervals, UTC, round-tripping floats, hex bytea.
async fn pg_session(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| anyhow!("target database: {}", ferry_common::db::describe(&e)))?;
    sqlx::raw_sql(
        "SET DateStyle = ISO, YMD; SET IntervalStyle = iso_8601; SET TimeZone = 'UTC';
         SET extra_float_digits = 3; SET bytea_output = hex",
    )
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

/// A PostgreSQL table's columns (`schema.name` quoted) with their kinds.
async fn pg_columns(
    conn: &mut sqlx::PgConnection,
    qualified: &str,
) -> anyhow::Result<Vec<(String, String, Option<Kind>)>> {
    let raw: Vec<PgColumn> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                b.typname::text, b.typtype::text,
                CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
                e.typname::text, e.typtype::text
         FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
         JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
         LEFT JOIN pg_type e ON e.oid = b.typelem AND b.typcategory = 'A'
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(qualified)
    .fetch_all(&mut *conn)
    .await?;
    Ok(raw
        .into_iter()
        .map(|(n, declared, base, btype, typmod, elem, etype)| {
            let kind = match (elem, etype) {
                (Some(e), Some(et)) => Kind::of_postgres(&e, &et, typmod)
                    .filter(|k| !matches!(k, Kind::List(_)))
                    .map(|k| Kind::List(Box::new(k))),
                _ => Kind::of_postgres(&base, &btype, typmod),
            };
            (n, declared, kind)
        })
        .collect())
}

/// Streams a `COPY (…) TO STDOUT` in text form into `out`.
async fn copy_into(conn: &mut sqlx::PgConnection, sql: &str, out: &mut Out) -> anyhow::Result<()> {
    let mut stream = conn.copy_out_raw(sql).await?;
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|b| *b == b'\n') {
            copy_line(out, &pending[start..start + nl])?;
            start += nl + 1;
        }
        pending.drain(..start);
    }
    Ok(())
}

async fn postgres(
    url: &str,
    req: &Request,
    stage: &Path,
    manifest: &mut Manifest,
) -> anyhow::Result<()> {
    let mut conn = pg_session(url).await?;
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut conn)
        .await?;
    let has_ledger: bool =
        sqlx::query_scalar("SELECT to_regclass('ferry_receiver.applied') IS NOT NULL")
            .fetch_one(&mut conn)
            .await?;
    if has_ledger {
        manifest.source = sqlx::query(
            "SELECT sender_id, seq, kind, created_at::text FROM ferry_receiver.applied
             ORDER BY created_at DESC, seq DESC LIMIT 1",
        )
        .fetch_optional(&mut conn)
        .await?
        .map(|r| Point {
            sender_id: r.get(0),
            seq: r.get(1),
            kind: r.get(2),
            created_at: r.get(3),
        });
    }
    let all: Vec<String> = sqlx::query_scalar(
        "SELECT CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || c.relname
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname NOT LIKE 'ferry\\_%'
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await?;
    for table in select(all, &req.tables)? {
        let (schema, name) = table.split_once('.').unwrap_or(("public", &table));
        let qualified = format!("{}.{}", quote(schema), quote(name));
        let cols = pg_columns(&mut conn, &qualified).await?;
        let cols = decide(&table, cols, req)?;
        let select = cols
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        // A table's own rows (not those of tables inheriting from it).
        let rows = crate::load::postgres::rows_of(&mut conn, &qualified).await?;
        let mut out = Out::create(stage, &table, cols)?;
        copy_into(
            &mut conn,
            &format!("COPY (SELECT {select} FROM {rows}) TO STDOUT"),
            &mut out,
        )
        .await?;
        manifest.tables.push(out.finish()?);
    }
    sqlx::raw_sql("COMMIT").execute(&mut conn).await?;
    Ok(())
}

/// One line of COPY's text format into the builders.
fn copy_line(out: &mut Out, line: &[u8]) -> anyhow::Result<()> {
    let mut field = String::new();
    let mut fields = line.split(|b| *b == b'\t');
    for i in 0..out.builders.len() {
        let raw = fields
            .next()
            .ok_or_else(|| anyhow!("{}: a COPY line with too few fields", out.table))?;
        if raw == b"\\N" {
            out.builders[i].push_null();
            continue;
        }
        field.clear();
        unescape(raw, &mut field)
            .map_err(|()| anyhow!("{}: COPY sent a field that is not UTF-8", out.table))?;
        if let Err(e) = out.builders[i].push_text(Some(&field)) {
            return Err(out.bad(i, &e));
        }
    }
    out.row_done(line.len())
}

/// COPY text escapes: `\t`, `\n`, `\\`, `\r`, `\b`, `\f`, `\v`, octal.
fn unescape(raw: &[u8], out: &mut String) -> Result<(), ()> {
    if !raw.contains(&b'\\') {
        out.push_str(std::str::from_utf8(raw).map_err(|_| ())?);
        return Ok(());
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            i += 1;
            let b = match raw[i] {
                b't' => b'\t',
                b'n' => b'\n',
                b'r' => b'\r',
                b'b' => 8,
                b'f' => 12,
                b'v' => 11,
                d @ b'0'..=b'7' => {
                    let mut v = u32::from(d - b'0');
                    for _ in 0..2 {
                        if i + 1 < raw.len() && (b'0'..=b'7').contains(&raw[i + 1]) {
                            i += 1;
                            v = v * 8 + u32::from(raw[i] - b'0');
                        }
                    }
                    v as u8
                }
                other => other,
            };
            bytes.push(b);
        } else {
            bytes.push(raw[i]);
        }
        i += 1;
    }
    out.push_str(std::str::from_utf8(&bytes).map_err(|_| ())?);
    Ok(())
}

async fn sqlite(
    url: &str,
    req: &Request,
    stage: &Path,
    manifest: &mut Manifest,
) -> anyhow::Result<()> {
    let mut conn = sqlx::SqliteConnection::connect(url)
        .await
        .map_err(|e| anyhow!("target database: {}", ferry_common::db::describe(&e)))?;
    sqlx::raw_sql("BEGIN").execute(&mut conn).await?;
    let has_ledger: bool = sqlx::query_scalar(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'ferry_applied'",
    )
    .fetch_one(&mut conn)
    .await?;
    if has_ledger {
        manifest.source = sqlx::query(
            "SELECT sender_id, seq, kind, created_at FROM ferry_applied
             ORDER BY created_at DESC, seq DESC LIMIT 1",
        )
        .fetch_optional(&mut conn)
        .await?
        .map(|r| Point {
            sender_id: r.get(0),
            seq: r.get(1),
            kind: r.get(2),
            created_at: r.get(3),
        });
    }
    let all: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table'
           AND name NOT LIKE 'ferry\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
         ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await?;
    for table in select(all, &req.tables)? {
        let info: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT name, type FROM pragma_table_info({})",
            sql_string(&table)
        )))
        .fetch_all(&mut conn)
        .await?;
        let cols = info
            .into_iter()
            .map(|(n, declared)| {
                let kind = sqlite_kind(&declared);
                (n, declared, Some(kind))
            })
            .collect();
        let cols = decide(&table, cols, req)?;
        let select = cols
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut out = Out::create(stage, &table, cols)?;
        let query = format!("SELECT {select} FROM {}", quote(&table));
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(query)).fetch(&mut conn);
        while let Some(row) = rows.next().await {
            let row = row?;
            let mut bytes = 0;
            for i in 0..out.builders.len() {
                let raw = row.try_get_raw(i)?;
                let pushed = if raw.is_null() {
                    out.builders[i].push_null();
                    Ok(())
                } else {
                    match raw.type_info().name() {
                        "INTEGER" => out.builders[i].push_i64(row.try_get_unchecked(i)?),
                        "REAL" => out.builders[i].push_f64(row.try_get_unchecked(i)?),
                        "BLOB" => {
                            let v: Vec<u8> = row.try_get_unchecked(i)?;
                            bytes += v.len();
                            out.builders[i].push_bytes(&v)
                        }
                        _ => {
                            let v: String = row.try_get_unchecked(i)?;
                            bytes += v.len();
                            match &mut out.builders[i] {
                                Builder::Binary(b) => {
                                    b.append_value(v.as_bytes());
                                    Ok(())
                                }
                                b => b.push_text(Some(&v)),
                            }
                        }
                    }
                };
                if let Err(e) = pushed {
                    return Err(out.bad(i, &e));
                }
            }
            out.row_done(bytes)?;
        }
        drop(rows);
        manifest.tables.push(out.finish()?);
    }
    sqlx::raw_sql("COMMIT").execute(&mut conn).await?;
    Ok(())
}

/// A SQLite column's kind, by SQLite's affinity rules
/// (https://sqlite.org/datatype3.html §3.1).
fn sqlite_kind(declared: &str) -> Kind {
    let t = declared.to_uppercase();
    if t.contains("INT") {
        Kind::Int64
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        Kind::Text
    } else if t.contains("BLOB") || t.is_empty() {
        Kind::Binary
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        Kind::Float64
    } else {
        Kind::Text
    }
}

fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Every table's file, then `_manifest.json`: a reader that finds the
/// manifest finds every file it names.
async fn upload(
    config: &Config,
    url: &str,
    stage: &Path,
    manifest: &Manifest,
) -> anyhow::Result<()> {
    let bucket =
        crate::bucket_pull::bucket_for(url, config.bucket.as_ref()).map_err(|e| anyhow!(e))?;
    for t in &manifest.tables {
        bucket.upload(&stage.join(&t.file), &t.file).await?;
    }
    bucket
        .upload(&stage.join("_manifest.json"), "_manifest.json")
        .await?;
    Ok(())
}
