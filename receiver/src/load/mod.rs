//! Loading a verified bundle into the target database, in one transaction with its
//! ledger row (the record of applied bundles lives in the target itself, so data
//! and ledger commit or roll back together: exactly once, even across kill -9).
//!
//! - complete: the selected tables are dropped and re-created from the bundle's
//!   DDL, loaded, indexed, and the ledger row written, all in one transaction:
//!   readers see the old copy until the commit and the new one after it (on
//!   PostgreSQL they wait on the table lock meanwhile, they never see a mix or an
//!   empty table). Objects that depend on the tables (views) are dropped with them;
//!   re-create them in a hook.
//! - partial: upserts parents first, then deletes children first, with deferrable
//!   constraints deferred.

pub mod bundle;
mod post_data;
pub mod postgres;
pub mod restore;
pub mod sqlite;
mod sqlite_dev;
pub mod staged;

use crate::config::{Config, Engine};
use crate::plan::LedgerState;
use crate::verify::Verified;
use ferry_common::manifest::{Manifest, Table};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "could not connect to the target database {url}: {}; check `target.url` and that the server is running",
        ferry_common::db::describe(.source)
    )]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("target database error while {doing}: {}", ferry_common::db::describe(.source))]
    Db {
        doing: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("{0}")]
    Refused(String),
    /// The ledger already holds this bundle: another load (a second receiver on
    /// the same inbox and target) applied it after this one planned it.
    #[error("bundle #{seq} of {sender} is already applied (the ledger is at #{last})")]
    AlreadyApplied { sender: String, seq: u64, last: u64 },
    #[error("could not read a staged member: {0}")]
    Io(#[from] std::io::Error),
}

impl LoadError {
    pub(crate) fn db(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let doing = doing.into();
        move |source| LoadError::Db { doing, source }
    }

    /// Like [`db`](Self::db) for per-row paths: nothing is allocated unless it fails.
    pub(crate) fn db_lazy(doing: &str) -> impl FnOnce(sqlx::Error) -> Self + '_ {
        move |source| LoadError::Db {
            doing: doing.to_owned(),
            source,
        }
    }

    /// Whether trying again later can help (the database was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            LoadError::Connect { source, .. } => !refused_for_good(source),
            LoadError::Db { source, .. } => {
                matches!(source, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
            }
            _ => false,
        }
    }
}

/// One applied bundle, as the ledger records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub sender_id: String,
    pub seq: i64,
    pub kind: String,
    pub created_at: String,
    pub applied_at: String,
    pub file: String,
    pub rows: i64,
}

/// One row of the ledger, whole (for the version history).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LedgerRow {
    pub sender_id: String,
    pub chain: String,
    pub seq: i64,
    pub kind: String,
    pub base_seq: i64,
    pub created_at: String,
    pub applied_at: String,
    pub file: String,
    pub rows: i64,
    /// The bundle's tables (recorded since the version history; `None` in
    /// rows written before).
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    /// The completes this one carries tables from (recorded since carried
    /// tables; `None` in rows written before: the manifest says).
    #[serde(default)]
    pub carried_from: Option<Vec<u64>>,
}

impl LedgerRow {
    /// From a PostgreSQL row with the ledger's columns (`created_at` as `c`,
    /// `applied_at` as `a`, both text). SQLite's ledger arrives as one JSON
    /// document instead (see `SqliteTarget::applied_all`).
    pub(crate) fn from_row(r: &sqlx::postgres::PgRow) -> Result<Self, LoadError> {
        let tables: Option<String> = col(r, "tables")?;
        Ok(Self {
            sender_id: col(r, "sender_id")?,
            chain: col(r, "chain")?,
            seq: col(r, "seq")?,
            kind: col(r, "kind")?,
            base_seq: col(r, "base_seq")?,
            created_at: col(r, "c")?,
            applied_at: col(r, "a")?,
            file: col(r, "file")?,
            rows: col(r, "rows")?,
            tables: tables.and_then(|t| serde_json::from_str(&t).ok()),
            carried_from: col::<Option<String>, _>(r, "carried_from")?
                .and_then(|t| serde_json::from_str(&t).ok()),
        })
    }
}

/// The completes a bundle carries tables from, as the ledger records them (a
/// JSON array of seqs).
pub(crate) fn ledger_carried(m: &Manifest) -> String {
    let mut seqs: Vec<u64> = m.carried().map(|(_, c)| c.seq.0).collect();
    seqs.sort_unstable();
    seqs.dedup();
    serde_json::to_string(&seqs).unwrap_or_default()
}

/// A bundle's tables as the ledger records them (a JSON array of names).
pub(crate) fn ledger_tables(m: &Manifest) -> String {
    let names: Vec<String> = m.tables.iter().map(|t| t.name.to_string()).collect();
    serde_json::to_string(&names).unwrap_or_default()
}

pub enum Target {
    Postgres(Box<postgres::PgTarget>),
    Sqlite(sqlite::SqliteTarget),
}

impl Target {
    /// The PostgreSQL session (url, backend pid), to end it if a load is abandoned.
    pub fn pg_session(&self) -> Option<(String, i32)> {
        match self {
            Target::Postgres(pg) => Some(pg.session()),
            Target::Sqlite(_) => None,
        }
    }

    pub async fn connect(config: &Config) -> Result<Self, LoadError> {
        match config.target.engine() {
            Some(Engine::Postgres) => Ok(Target::Postgres(Box::new(
                postgres::PgTarget::connect(&config.target).await?,
            ))),
            _ => Ok(Target::Sqlite(
                sqlite::SqliteTarget::connect(&config.target).await?,
            )),
        }
    }

    pub async fn ledger(&mut self, sender: &str) -> Result<LedgerState, LoadError> {
        match self {
            Target::Postgres(t) => t.ledger(sender).await,
            Target::Sqlite(t) => t.ledger(sender).await,
        }
    }

    /// Applies a verified bundle with its ledger row and SQL hooks, atomically.
    /// Returns the rows (changes) applied.
    pub async fn apply(
        &mut self,
        v: &Verified,
        file: &str,
        sql_hooks: &[String],
    ) -> Result<u64, LoadError> {
        match self {
            Target::Postgres(t) => t.apply(v, file, sql_hooks).await,
            Target::Sqlite(t) => t.apply(v, file, sql_hooks).await,
        }
    }

    /// The identity ([`ferry_common::Manifest::identity`]) recorded with bundle
    /// `seq` of `sender`; `None` when not applied or recorded before identities.
    pub async fn applied_identity(
        &mut self,
        sender: &str,
        chain: &str,
        seq: u64,
    ) -> Result<Option<String>, LoadError> {
        match self {
            Target::Postgres(t) => t.applied_identity(sender, chain, seq).await,
            Target::Sqlite(t) => t.applied_identity(sender, chain, seq).await,
        }
    }

    /// Every applied bundle, by sender, chain and seq.
    pub async fn applied_all(&mut self) -> Result<Vec<LedgerRow>, LoadError> {
        match self {
            Target::Postgres(t) => t.applied_all().await,
            Target::Sqlite(t) => t.applied_all().await,
        }
    }

    /// The newest applied bundles of every sender (for status).
    pub async fn history(&mut self) -> Result<Vec<Applied>, LoadError> {
        match self {
            Target::Postgres(t) => t.history().await,
            Target::Sqlite(t) => t.history().await,
        }
    }
}

/// A column of a row the receiver read (its ledger, the catalog), or an error
/// naming it: a NULL or an unexpected type never panics the agent.
pub(crate) fn col<'r, T, R>(row: &'r R, name: &'r str) -> Result<T, LoadError>
where
    R: sqlx::Row,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'r str: sqlx::ColumnIndex<R>,
{
    row.try_get(name).map_err(|source| LoadError::Db {
        doing: format!("reading column {name}"),
        source,
    })
}

/// Checks a bundle against the ledger inside the load transaction: the guard that
/// makes a bundle apply exactly once even if two loads raced.
pub(crate) fn check_order(m: &Manifest, ledger: &LedgerState) -> Result<(), LoadError> {
    use crate::plan::NotNext;
    match ledger.admits(&m.chain, m.seq.0, m.kind, Some(m.base_seq.0)) {
        Ok(()) => {}
        Err(NotNext::Behind { last }) => {
            return Err(LoadError::AlreadyApplied {
                sender: m.sender_id.clone(),
                seq: m.seq.0,
                last,
            });
        }
        Err(why) => {
            return Err(LoadError::Refused(format!("{} #{} {why}", m.kind, m.seq)));
        }
    }
    if m.kind == ferry_common::manifest::Kind::Complete
        && m.chain != ledger.chain
        && ledger.last_seq.is_some()
    {
        tracing::warn!(
            sender = %m.sender_id,
            seq = m.seq.0,
            chain = %m.chain,
            previous_chain = %ledger.chain,
            previous_seq = ledger.last_seq.unwrap_or(0),
            "the sender's state was replaced (a new chain, numbered from the start): \
             loading its complete as a resync; the previous chain's bundles are never applied"
        );
    }
    Ok(())
}

/// The warning for a table the sender's complete no longer carries: `dropped`
/// from the copy, or kept (`[target] departed_tables = "keep"`).
pub(crate) fn departed(table: &str, m: &Manifest, dropped: bool) {
    if dropped {
        tracing::warn!(%table, sender = %m.sender_id, seq = m.seq.0, "table no longer in the source's complete: dropped from the copy");
    } else {
        tracing::warn!(%table, sender = %m.sender_id, seq = m.seq.0, "table no longer in the source's complete: kept on the copy (`[target] departed_tables = \"keep\"`); drop it by hand when done with it");
    }
}

/// Table indexes in load order: parents before children (foreign keys between the
/// bundle's tables; cycles are broken in manifest order).
pub(crate) fn parents_first(tables: &[Table]) -> Vec<usize> {
    let mut order = Vec::new();
    let mut state = vec![0u8; tables.len()]; // 0 new, 1 visiting, 2 done
    fn visit(i: usize, tables: &[Table], state: &mut [u8], order: &mut Vec<usize>) {
        if state[i] != 0 {
            return;
        }
        state[i] = 1;
        for fk in &tables[i].foreign_keys {
            if let Some(p) = tables.iter().position(|t| t.name == fk.references)
                && p != i
            {
                visit(p, tables, state, order);
            }
        }
        state[i] = 2;
        order.push(i);
    }
    for i in 0..tables.len() {
        visit(i, tables, &mut state, &mut order);
    }
    order
}

/// Splits a change line into (`"upsert"` | `"delete"`, JSON payload).
pub(crate) fn split_change(line: &str) -> Result<(&'static str, &str), LoadError> {
    let bad = || LoadError::Refused(format!("not a change line: {:.200}", line));
    if let Some(rest) = line.strip_prefix("{\"op\":\"upsert\",\"row\":") {
        Ok(("upsert", rest.strip_suffix('}').ok_or_else(bad)?))
    } else if let Some(rest) = line.strip_prefix("{\"op\":\"delete\",\"key\":") {
        Ok(("delete", rest.strip_suffix('}').ok_or_else(bad)?))
    } else {
        Err(bad())
    }
}

/// A login the server refused, a database that is not there, a missing
/// privilege: an operator must act, so it is logged at ERROR and `status` is
/// critical at once.
fn refused_for_good(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.code().is_some_and(|c| ferry_common::health::sqlstate_is_permanent(&c)))
}
