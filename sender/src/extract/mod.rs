//! Extraction: reading the application's database into staged bundle members.
//!
//! One [`Source`] per engine (PostgreSQL, SQLite) behind a small enum; the rest
//! of the sender never branches on the engine. A source
//! - lists the selected tables with their columns, keys and change columns;
//! - takes a *complete*: one consistent snapshot of every selected table, plus
//!   schema DDL, and the starting watermarks for the partials that follow;
//! - takes a *partial*: in one snapshot, the rows whose change column is at or past
//!   each table's watermark, the rows they reference (transitively, through foreign
//!   keys), and the deletes the delete log recorded since the last watermark; plus
//!   new, *safe* watermarks (see `docs/change-capture.md`).
//!
//! Members are staged as files ([`stage`]) and handed to the bundle writer as they
//! finish; watermarks are returned, and only stored once the bundle is durable.

pub mod media;
pub mod postgres;
pub mod select;
pub mod sqlite;
pub mod stage;

use crate::config::{Config, Engine};
use ferry_common::manifest::{self, Source as SourceInfo};
use std::collections::BTreeMap;
use std::time::Duration;

pub use stage::{Staged, Stager};

/// The key under which the delete log's watermark is stored.
pub const DELETES_KEY: &str = "<deletes>";

/// Watermarks by table (`schema.table`) plus [`DELETES_KEY`]. `None`: no bound,
/// the next partial takes every row.
pub type Watermarks = BTreeMap<String, Option<String>>;

/// An error while reading the source database.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(
        "could not connect to the source database {url}: {}; check `source.url`, that the server is running and that the user may log in",
        ferry_common::db::describe(.source)
    )]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("source database error while {doing}: {}", ferry_common::db::describe(.source))]
    Db {
        doing: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("{0}")]
    Selection(String),
    #[error("pg_dump failed while dumping the schema ({what}): {message}")]
    PgDump { what: String, message: String },
    #[error("could not stage {what}: {source}{}", full_hint(source))]
    Stage {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the bundle writer stopped: {0}")]
    WriterGone(String),
}

/// What to do when staging found the disk full.
fn full_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            " (the disk holding state_dir/staging is full: free space there or move \
             state_dir; nothing was sent, and the next run starts this bundle over)"
        }
        _ => "",
    }
}

impl ExtractError {
    pub(crate) fn db(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let doing = doing.into();
        move |source| ExtractError::Db { doing, source }
    }

    /// Like [`db`](Self::db) for hot loops: nothing is allocated unless it fails.
    pub(crate) fn db_lazy(doing: &str) -> impl FnOnce(sqlx::Error) -> Self + '_ {
        move |source| ExtractError::Db {
            doing: doing.to_owned(),
            source,
        }
    }

    pub(crate) fn stage(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| ExtractError::Stage { what, source }
    }

    /// Whether trying again later can help (the database was down or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            ExtractError::Connect { source, .. } => !refused_for_good(source),
            ExtractError::Db { source, .. } => matches!(
                source,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_)
            ),
            _ => false,
        }
    }
}

/// How a change column is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A point in time (PostgreSQL date/timestamp/timestamptz; SQLite text datetimes).
    Timestamp,
    /// A number assigned in commit order (SQLite integer or real columns only).
    Number,
}

/// A selected table as the sender sees it.
#[derive(Debug, Clone)]
pub struct TableMeta {
    pub info: manifest::Table,
    /// The configured change column and how it compares; `None` when partials skip
    /// the table.
    pub change: Option<(String, ChangeKind)>,
    /// How partials carry the table (`Changes` exactly when `change` is set).
    pub carry: crate::config::Carry,
    /// The carry is decided by the table's size (`without_change_column =
    /// "auto"`); [`Source::tables`] settles it.
    pub auto: bool,
    /// Whether an index starts with the change column.
    pub change_indexed: bool,
    /// A size estimate used to start the largest tables first.
    pub size_hint: i64,
    /// Set for a PostgreSQL partitioned table, whose rows are its partitions'
    /// and are read through it (`COPY` refuses the table itself): its layout,
    /// each partition (at any depth) with its bounds and partition key, a
    /// line each. Part of the schema fingerprint: a partition added, detached
    /// or re-bounded makes the next partial a complete, so the receiver's copy
    /// never lacks the partition a row belongs in.
    pub partitions: Option<String>,
}

impl TableMeta {
    pub fn key(&self) -> String {
        self.info.name.to_string()
    }

    /// How PostgreSQL queries name the table's rows: `ONLY table`, so a
    /// table others inherit from (`INHERITS`) gives its own rows only, as its
    /// complete's `COPY` does; a partitioned table by its bare name (its rows
    /// are its partitions'; `ONLY` would give none).
    pub fn pg_rows(&self) -> String {
        match self.partitions {
            Some(_) => self.info.name.quoted(),
            None => format!("ONLY {}", self.info.name.quoted()),
        }
    }

    /// A table with a change column sent whole on request (`ferry-sender
    /// complete --table`): every row goes, even when the previous bundle sent
    /// the same set, and no delete lines (the set replaces the copy's rows).
    pub fn forced_whole(&self) -> bool {
        self.carry == crate::config::Carry::Whole && self.change.is_some()
    }

    /// The staging sink's fingerprint memory for this whole table: none when
    /// forced, so the set is always sent.
    pub fn whole_dedup(&self, stager: &Stager) -> Option<std::sync::Arc<stage::Dedup>> {
        if self.forced_whole() {
            None
        } else {
            stager.dedup()
        }
    }
}

/// Settings the extraction needs from the configuration.
#[derive(Debug, Clone)]
pub struct ExtractSettings {
    pub overlap: Duration,
    pub capture_deletes: bool,
    pub delete_log_retention: Duration,
    pub jobs: usize,
    /// PostgreSQL completes: binary COPY (else text).
    pub binary_copy: bool,
    /// PostgreSQL completes: the tables that may be carried from an earlier
    /// complete if proved unchanged since (by `schema.table`), with the
    /// members to carry (see `state::Home`). Empty: every table is dumped.
    pub carry: std::sync::Arc<std::collections::HashMap<String, Vec<manifest::Member>>>,
    /// Each table's catalog print at the previous complete: a table is
    /// carried only if its print is the same now.
    pub catalog_prints: std::sync::Arc<std::collections::HashMap<String, String>>,
}

impl ExtractSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            overlap: config.partial.overlap,
            capture_deletes: config.partial.deletes == crate::config::DeleteCapture::Trigger,
            delete_log_retention: config.partial.delete_log_retention,
            jobs: config.source.jobs,
            binary_copy: config.complete.copy_format == crate::config::CopyFormat::Binary,
            carry: Default::default(),
            catalog_prints: Default::default(),
        }
    }
}

/// What a complete or a partial produced besides its staged members.
#[derive(Debug, Default)]
pub struct Extracted {
    pub watermarks: Watermarks,
    /// A PostgreSQL complete: its snapshot's horizon (see
    /// `manifest::Manifest::snapshot_xmin`).
    pub snapshot_xmin: Option<u64>,
    /// A complete: the members it carries from earlier completes.
    pub carried: Vec<manifest::Member>,
    /// A PostgreSQL complete: each table's catalog print (see
    /// `ExtractSettings::catalog_prints`).
    pub catalog_prints: std::collections::HashMap<String, String>,
}

/// The source database.
pub enum Source {
    Postgres(Box<postgres::PgSource>),
    Sqlite(sqlite::SqliteSource),
}

impl Source {
    /// Connects to the configured source.
    pub async fn connect(config: &Config) -> Result<Self, ExtractError> {
        match config.source.engine() {
            Some(Engine::Postgres) => Ok(Source::Postgres(Box::new(
                postgres::PgSource::connect(&config.source).await?,
            ))),
            Some(Engine::Sqlite) => Ok(Source::Sqlite(
                sqlite::SqliteSource::connect(&config.source.url).await?,
            )),
            None => Err(ExtractError::Selection(
                "source.url names no supported engine".into(),
            )),
        }
    }

    pub fn info(&self) -> SourceInfo {
        match self {
            Source::Postgres(s) => s.info(),
            Source::Sqlite(s) => s.info(),
        }
    }

    /// The selected tables, with their change columns resolved and checked.
    /// `for_partial` makes missing change columns and primary keys errors.
    pub async fn tables(&mut self, config: &Config) -> Result<Vec<TableMeta>, ExtractError> {
        let all = match self {
            Source::Postgres(s) => s.catalog().await?,
            Source::Sqlite(s) => s.catalog().await?,
        };
        let mut tables = select::resolve(config, all, matches!(self, Source::Postgres(_)))?;
        // Tables without a change column: whole when small. Counted up to the
        // limit only, so a big table costs no more than a small one.
        let limit = config.partial.whole_max_rows;
        for t in tables.iter_mut().filter(|t| t.auto) {
            let sql = format!(
                "SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {}) s",
                t.info.name.quoted(),
                limit.saturating_add(1).min(i64::MAX as u64)
            );
            let n: i64 = match self {
                Source::Postgres(s) => {
                    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .fetch_one(&mut s.conn)
                        .await
                }
                Source::Sqlite(s) => {
                    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .fetch_one(&mut s.conn)
                        .await
                }
            }
            .map_err(ExtractError::db(format!(
                "counting the rows of {}",
                t.key()
            )))?;
            if n.max(0) as u64 <= limit {
                t.carry = crate::config::Carry::Whole;
            }
        }
        Ok(tables)
    }

    /// Takes a complete snapshot of `tables` into `stager`.
    pub async fn complete(
        &mut self,
        tables: &[TableMeta],
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<Extracted, ExtractError> {
        match self {
            Source::Postgres(s) => s.complete(tables, settings, stager).await,
            Source::Sqlite(s) => s.complete(tables, settings, stager).await,
        }
    }

    /// Takes a partial: changes since `watermarks`.
    pub async fn partial(
        &mut self,
        tables: &[TableMeta],
        watermarks: &Watermarks,
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<Extracted, ExtractError> {
        match self {
            Source::Postgres(s) => s.partial(tables, watermarks, settings, stager).await,
            Source::Sqlite(s) => s.partial(tables, watermarks, settings, stager).await,
        }
    }

    /// PostgreSQL: per table (`schema.table`), the statistics system's count
    /// of rows inserted, updated and deleted. Not transactional and reset by a
    /// crash or `pg_stat_reset`: only a hint that a table changed (a complete
    /// dumps such a table without testing it; see `state::Home`). Empty for
    /// SQLite.
    pub async fn change_counters(
        &mut self,
        tables: &[TableMeta],
    ) -> Result<std::collections::HashMap<String, i64>, ExtractError> {
        match self {
            Source::Postgres(s) => s.change_counters(tables).await,
            Source::Sqlite(_) => Ok(Default::default()),
        }
    }

    /// Installs (or, when `enabled` is false, removes) the delete-capture triggers.
    pub async fn set_delete_capture(
        &mut self,
        tables: &[TableMeta],
        enabled: bool,
    ) -> Result<(), ExtractError> {
        match self {
            Source::Postgres(s) => s.set_delete_capture(tables, enabled).await,
            Source::Sqlite(s) => s.set_delete_capture(tables, enabled).await,
        }
    }

    /// Removes delete-log entries older than `before_watermark` minus `retention`.
    pub async fn prune_delete_log(
        &mut self,
        watermark: Option<&str>,
        retention: Duration,
    ) -> Result<u64, ExtractError> {
        match self {
            Source::Postgres(s) => s.prune_delete_log(watermark, retention).await,
            Source::Sqlite(s) => s.prune_delete_log(watermark, retention).await,
        }
    }
}

/// A column of a row the sender read (catalog, schema), or an error naming it:
/// a NULL or an unexpected type never panics the agent.
pub(crate) fn col<'r, T, R>(row: &'r R, name: &'r str) -> Result<T, ExtractError>
where
    R: sqlx::Row,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'r str: sqlx::ColumnIndex<R>,
{
    row.try_get(name).map_err(|source| ExtractError::Db {
        doing: format!("reading column {name} of a catalog row"),
        source,
    })
}

/// Ends a snapshot transaction with ROLLBACK. The connection is used again
/// afterwards (delete-log pruning, the next step of the job), so a failed
/// ROLLBACK is an error: what follows must not run inside the old snapshot.
pub(crate) async fn end_snapshot<'c, E, DB>(conn: E) -> Result<(), ExtractError>
where
    DB: sqlx::Database,
    E: sqlx::Executor<'c, Database = DB>,
{
    sqlx::raw_sql("ROLLBACK")
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(ExtractError::db("ending the snapshot (ROLLBACK)"))
}

/// Whether a partial keeps a set of keys for the table: rows that changed
/// (`Changes`), or rows changed rows reference (`Complete` tables with a key).
/// `Whole` tables are sent entire.
pub(crate) fn keyed(t: &TableMeta) -> bool {
    t.carry != crate::config::Carry::Whole && !t.info.primary_key.is_empty()
}

/// The foreign keys from keyed or whole tables to keyed tables (child index,
/// parent index, fk): a partial also carries the rows that the rows it sends
/// reference, so that the receiver never holds a row whose parent it lacks.
pub(crate) fn partial_graph(tables: &[TableMeta]) -> Vec<(usize, usize, &manifest::ForeignKey)> {
    let mut edges = Vec::new();
    for (ci, child) in tables.iter().enumerate() {
        if !keyed(child) && child.carry != crate::config::Carry::Whole {
            continue;
        }
        for fk in &child.info.foreign_keys {
            if let Some(pi) = tables
                .iter()
                .position(|t| t.info.name == fk.references && keyed(t))
            {
                edges.push((ci, pi, fk));
            }
        }
    }
    edges
}

/// The statements that add to each keyed table's key set (`keys(i)`) the rows
/// that the sent rows of its children reference, with what each does: run
/// them all until none adds a row. `insert` opens each statement (`INSERT
/// INTO`, `INSERT OR IGNORE INTO`) and `tail` ends it (`ON CONFLICT DO
/// NOTHING`, or nothing), the engines' two ways of skipping keys already there.
/// `rows` names a table's rows in a query ([`TableMeta::pg_rows`] on
/// PostgreSQL). Each statement comes with the index of the table whose key
/// set it adds to.
pub(crate) fn closure_statements(
    tables: &[TableMeta],
    keys: impl Fn(usize) -> String,
    rows: impl Fn(&TableMeta) -> String,
    insert: &str,
    tail: &str,
) -> Vec<(String, String, usize)> {
    partial_graph(tables)
        .into_iter()
        .map(|(ci, pi, fk)| {
            let (c, p) = (&tables[ci], &tables[pi]);
            // A whole table's rows all travel, so all their parents do.
            let from_child = if keyed(c) {
                format!(
                    "{kc} kc JOIN {cname} c ON {ckey}",
                    kc = keys(ci),
                    cname = rows(c),
                    ckey = join_on("c", &c.info.primary_key, "kc", &c.info.primary_key),
                )
            } else {
                format!("{} c", rows(c))
            };
            let sql = format!(
                "{insert} {kp} SELECT DISTINCT {ppk} FROM {from_child}
                 JOIN {pname} p ON {fkjoin} {tail}",
                kp = keys(pi),
                ppk = column_list(Some("p"), &p.info.primary_key),
                pname = rows(p),
                fkjoin = join_on("p", &fk.referenced_columns, "c", &fk.columns),
            );
            let doing = format!("following foreign keys from {} to {}", c.key(), p.key());
            (sql, doing, pi)
        })
        .collect()
}

/// `a.x = b.y AND …` over pairs of columns.
pub(crate) fn join_on(a: &str, a_cols: &[String], b: &str, b_cols: &[String]) -> String {
    use ferry_common::ident::quote_ident;
    a_cols
        .iter()
        .zip(b_cols)
        .map(|(x, y)| format!("{a}.{} = {b}.{}", quote_ident(x), quote_ident(y)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// A comma-separated list of quoted columns, each prefixed with `prefix.` if given.
pub(crate) fn column_list(prefix: Option<&str>, cols: &[String]) -> String {
    use ferry_common::ident::quote_ident;
    cols.iter()
        .map(|c| match prefix {
            Some(p) => format!("{p}.{}", quote_ident(c)),
            None => quote_ident(c),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A login the server refused, a database that is not there, a missing
/// privilege: an operator must act, so it is logged at ERROR and `status` is
/// critical at once.
fn refused_for_good(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.code().is_some_and(|c| ferry_common::health::sqlstate_is_permanent(&c)))
}
