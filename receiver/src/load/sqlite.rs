//! The SQLite target (the embedded default). Loads bundles from SQLite sources:
//! JSON-lines rows for completes and partials, the source's `CREATE TABLE` and
//! `CREATE INDEX` statements as DDL. Foreign keys are not enforced during a load
//! (the source was consistent at its snapshot).

use super::{Applied, LoadError, check_order, col, parents_first, split_change};
use crate::plan::LedgerState;
use crate::verify::Verified;
use ferry_common::ident::quote_ident;
use ferry_common::manifest::{Kind, Role, Table};
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode};
use sqlx::{AssertSqlSafe, Connection, Sqlite};
use std::str::FromStr;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

pub struct SqliteTarget {
    conn: SqliteConnection,
    /// `[target] departed_tables`.
    departed: crate::config::Departed,
}

fn q(sql: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(sql)
}

/// The ledger's columns and key.
const APPLIED_COLUMNS: &str = "(
  sender_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  kind TEXT NOT NULL,
  base_seq INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  file TEXT NOT NULL,
  rows INTEGER NOT NULL,
  schema_fingerprint TEXT NOT NULL,
  manifest_id TEXT,
  chain TEXT NOT NULL DEFAULT '',
  tables TEXT,
  carried_from TEXT,
  PRIMARY KEY (sender_id, chain, seq))";

fn ledger_ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS ferry_applied {APPLIED_COLUMNS};
-- The tables each sender's newest applied complete holds: a table that leaves
-- the source (or its selection) is dropped from the copy by the next complete.
CREATE TABLE IF NOT EXISTS ferry_complete_tables (
  sender_id TEXT NOT NULL,
  table_name TEXT NOT NULL,
  PRIMARY KEY (sender_id, table_name));"
    )
}

/// Ledgers from before chains: the chain joins the key, so the table is
/// rebuilt (SQLite cannot change a primary key in place), in one transaction.
fn ledger_add_chain_ddl() -> String {
    format!(
        "BEGIN IMMEDIATE;
ALTER TABLE ferry_applied RENAME TO ferry_applied_before_chains;
CREATE TABLE ferry_applied {APPLIED_COLUMNS};
INSERT INTO ferry_applied (sender_id, seq, kind, base_seq, created_at, applied_at, file, rows,
                           schema_fingerprint, manifest_id)
  SELECT sender_id, seq, kind, base_seq, created_at, applied_at, file, rows,
         schema_fingerprint, manifest_id FROM ferry_applied_before_chains;
DROP TABLE ferry_applied_before_chains;
COMMIT;"
    )
}

impl SqliteTarget {
    pub async fn connect(target: &crate::config::TargetConfig) -> Result<Self, LoadError> {
        let url = target.url.as_str();
        let err = |source| LoadError::Connect {
            url: url.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(false)
            .busy_timeout(Duration::from_secs(30));
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(err)?;
        sqlx::raw_sql(q(ledger_ddl()))
            .execute(&mut conn)
            .await
            .map_err(LoadError::db("creating the ledger"))?;
        // Added later, in this order: what identifies each applied bundle
        // beyond its seq; the chain, part of the key (a rebuild); the tables;
        // the completes a complete carries tables from.
        let added = [
            (
                "manifest_id",
                "ALTER TABLE ferry_applied ADD COLUMN manifest_id TEXT".to_owned(),
            ),
            ("chain", ledger_add_chain_ddl()),
            (
                "tables",
                "ALTER TABLE ferry_applied ADD COLUMN tables TEXT".to_owned(),
            ),
            (
                "carried_from",
                "ALTER TABLE ferry_applied ADD COLUMN carried_from TEXT".to_owned(),
            ),
        ];
        for (column, ddl) in added {
            let has: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pragma_table_info('ferry_applied') WHERE name = ?",
            )
            .bind(column)
            .fetch_one(&mut conn)
            .await
            .map_err(LoadError::db("reading the ledger's columns"))?;
            if has == 0 {
                sqlx::raw_sql(q(ddl))
                    .execute(&mut conn)
                    .await
                    .map_err(LoadError::db(format!("adding {column} to the ledger")))?;
            }
        }
        Ok(Self {
            conn,
            departed: target.departed_tables,
        })
    }

    pub async fn ledger(&mut self, sender: &str) -> Result<LedgerState, LoadError> {
        ledger(&mut self.conn, sender).await
    }

    /// See [`crate::load::Target::applied_identity`].
    pub async fn applied_identity(
        &mut self,
        sender: &str,
        chain: &str,
        seq: u64,
    ) -> Result<Option<String>, LoadError> {
        let id: Option<Option<String>> = sqlx::query_scalar(
            "SELECT manifest_id FROM ferry_applied WHERE sender_id = ? AND chain = ? AND seq = ?",
        )
        .bind(sender)
        .bind(chain)
        .bind(seq as i64)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(LoadError::db("reading the ledger"))?;
        Ok(id.flatten())
    }

    /// Every applied bundle, by sender, chain and seq.
    ///
    /// As one JSON document: sqlx hands each SQLite row over from its worker
    /// thread one at a time, which made 100,000 rows take a second; one
    /// aggregated value crosses once.
    pub async fn applied_all(&mut self) -> Result<Vec<super::LedgerRow>, LoadError> {
        let doc: Option<String> = sqlx::query_scalar(
            "SELECT json_group_array(json_object(
               'sender_id', sender_id, 'chain', chain, 'seq', seq, 'kind', kind,
               'base_seq', base_seq, 'created_at', created_at, 'applied_at', applied_at,
               'file', file, 'rows', rows, 'tables', json(tables),
               'carried_from', json(carried_from)))
             FROM ferry_applied",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(LoadError::db("reading the ledger"))?;
        let mut rows: Vec<super::LedgerRow> = serde_json::from_str(doc.as_deref().unwrap_or("[]"))
            .map_err(|e| LoadError::Refused(format!("reading the ledger: {e}")))?;
        rows.sort_by(|a, b| (&a.sender_id, &a.chain, a.seq).cmp(&(&b.sender_id, &b.chain, b.seq)));
        Ok(rows)
    }

    pub async fn history(&mut self) -> Result<Vec<Applied>, LoadError> {
        let rows = sqlx::query(
            "SELECT a.sender_id, a.seq, a.kind, a.created_at, a.applied_at, a.file, a.rows
             FROM ferry_applied a
             WHERE a.chain = (SELECT max(chain) FROM ferry_applied c
                              WHERE c.sender_id = a.sender_id)
               AND a.seq = (SELECT max(seq) FROM ferry_applied b
                            WHERE b.sender_id = a.sender_id AND b.kind = a.kind
                              AND b.chain = a.chain)
             ORDER BY a.sender_id, a.kind",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(LoadError::db("reading the ledger"))?;
        rows.iter()
            .map(|r| {
                Ok(Applied {
                    sender_id: col(r, "sender_id")?,
                    seq: col(r, "seq")?,
                    kind: col(r, "kind")?,
                    created_at: col(r, "created_at")?,
                    applied_at: col(r, "applied_at")?,
                    file: col(r, "file")?,
                    rows: col(r, "rows")?,
                })
            })
            .collect()
    }

    pub async fn apply(
        &mut self,
        v: &Verified,
        file: &str,
        sql_hooks: &[String],
    ) -> Result<u64, LoadError> {
        let m = &v.manifest;
        if m.source.engine != "sqlite" {
            return Err(LoadError::Refused(format!(
                "bundle {file} comes from a {} source; a SQLite target loads bundles from SQLite \
                 (use a PostgreSQL target for PostgreSQL sources)",
                m.source.engine
            )));
        }
        let mut tx = self
            .conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(LoadError::db("beginning"))?;
        let state = ledger(&mut tx, &m.sender_id).await?;
        check_order(m, &state)?;
        let rows = match m.kind {
            Kind::Complete => {
                departed_tables(&mut tx, m, self.departed).await?;
                load_complete(&mut tx, v).await?
            }
            Kind::Partial => load_partial(&mut tx, v).await?,
        };
        sqlx::query(
            "INSERT INTO ferry_applied
               (sender_id, seq, kind, base_seq, created_at, file, rows, schema_fingerprint,
                manifest_id, chain, tables, carried_from)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&m.sender_id)
        .bind(m.seq.0 as i64)
        .bind(m.kind.as_str())
        .bind(m.base_seq.0 as i64)
        .bind(m.created_at.to_rfc3339())
        .bind(file)
        .bind(rows as i64)
        .bind(&m.schema_fingerprint)
        .bind(m.identity())
        .bind(&m.chain)
        .bind(super::ledger_tables(m))
        .bind(super::ledger_carried(m))
        .execute(&mut *tx)
        .await
        .map_err(LoadError::db("recording the bundle in the ledger"))?;
        for sql in sql_hooks {
            sqlx::raw_sql(q(sql.clone()))
                .execute(&mut *tx)
                .await
                .map_err(LoadError::db(format!("running the SQL hook {sql:?}")))?;
        }
        tx.commit().await.map_err(LoadError::db("committing"))?;
        Ok(rows)
    }
}

/// Drops (or, with `departed_tables = "keep"`, reports) the tables the
/// sender's previous complete brought that this one does not, and records this
/// complete's tables; in the load transaction.
async fn departed_tables(
    conn: &mut SqliteConnection,
    m: &ferry_common::Manifest,
    departed: crate::config::Departed,
) -> Result<(), LoadError> {
    let keep: Vec<String> = m.tables.iter().map(|t| t.name.quoted()).collect();
    let before: Vec<String> =
        sqlx::query_scalar("SELECT table_name FROM ferry_complete_tables WHERE sender_id = ?")
            .bind(&m.sender_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(LoadError::db("reading the tables of the previous complete"))?;
    for t in before.iter().filter(|t| !keep.contains(t)) {
        if departed == crate::config::Departed::Keep {
            super::departed(t, m, false);
            continue;
        }
        // The names were quoted by this receiver when it recorded them.
        sqlx::raw_sql(q(format!("DROP TABLE IF EXISTS {t}")))
            .execute(&mut *conn)
            .await
            .map_err(LoadError::db(format!(
                "dropping {t}, which left the source"
            )))?;
        super::departed(t, m, true);
    }
    sqlx::query("DELETE FROM ferry_complete_tables WHERE sender_id = ?")
        .bind(&m.sender_id)
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("recording the complete's tables"))?;
    for t in &keep {
        sqlx::query("INSERT OR IGNORE INTO ferry_complete_tables VALUES (?, ?)")
            .bind(&m.sender_id)
            .bind(t)
            .execute(&mut *conn)
            .await
            .map_err(LoadError::db("recording the complete's tables"))?;
    }
    Ok(())
}

async fn ledger(conn: &mut SqliteConnection, sender: &str) -> Result<LedgerState, LoadError> {
    // The copy follows the newest chain it applied a bundle of.
    let row = sqlx::query(
        "WITH c AS (SELECT coalesce(max(chain), '') AS chain FROM ferry_applied
                   WHERE sender_id = ?1)
         SELECT c.chain,
                (SELECT max(seq) FROM ferry_applied b
                 WHERE b.sender_id = ?1 AND b.chain = c.chain) AS last,
                (SELECT max(seq) FROM ferry_applied b
                 WHERE b.sender_id = ?1 AND b.chain = c.chain AND b.kind = 'complete') AS base
         FROM c",
    )
    .bind(sender)
    .fetch_one(conn)
    .await
    .map_err(LoadError::db("reading the ledger"))?;
    Ok(LedgerState {
        chain: col(&row, "chain")?,
        last_seq: col::<Option<i64>, _>(&row, "last")?.map(|v| v as u64),
        base_seq: col::<Option<i64>, _>(&row, "base")?.map(|v| v as u64),
    })
}

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments>;

/// Binds one value of a SQLite bundle's JSON.
fn bind_json<'q>(q: Query<'q>, v: &serde_json::Value) -> Result<Query<'q>, LoadError> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => q.bind(None::<String>),
        Value::Bool(b) => q.bind(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => q.bind(i),
            None => q.bind(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => q.bind(s.clone()),
        Value::Object(o) => match (o.get("$hex"), o.get("$float")) {
            (Some(Value::String(h)), _) => q.bind(
                hex::decode(h).map_err(|e| LoadError::Refused(format!("bad $hex value: {e}")))?,
            ),
            // What JSON numbers cannot hold (a restore's ±Infinity).
            (_, Some(Value::String(f))) => q.bind(
                f.parse::<f64>()
                    .map_err(|e| LoadError::Refused(format!("bad $float value: {e}")))?,
            ),
            _ => return Err(LoadError::Refused(format!("unexpected JSON object {v}"))),
        },
        Value::Array(_) => return Err(LoadError::Refused(format!("unexpected JSON array {v}"))),
    })
}

fn parse_object(
    text: &str,
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, LoadError> {
    serde_json::from_str(text)
        .map_err(|e| LoadError::Refused(format!("{what} is not a JSON object ({e}): {text:.200}")))
}

/// Rows of one kind bound into multi-row statements: `head`, then `(?, …)`
/// per row, then `tail`, up to `max_rows` rows a statement. One statement per
/// row measured 7.8× slower than sqlite3 applying the same lines as a set: the
/// cost was the round trip per statement, not SQLite's work.
pub(super) struct Batch {
    head: String,
    tail: String,
    width: usize,
    max_rows: usize,
    rows: Vec<Vec<serde_json::Value>>,
    /// About how many bytes `rows` hold: a batch is flushed at
    /// [`BATCH_BYTES`] too, so rows of large blobs never pile up 500 deep.
    bytes: usize,
    doing: String,
}

/// The most a batch of rows holds before it is written (besides its row
/// limit): 500 rows of 1 MiB blobs took 1.3 GB before this bound.
const BATCH_BYTES: usize = 8 << 20;

impl Batch {
    pub(super) fn new(head: String, tail: String, width: usize, doing: String) -> Self {
        // SQLite allows 32,766 bound values per statement.
        let max_rows = (32_000 / width.max(1)).clamp(1, 500);
        Self {
            head,
            tail,
            width,
            max_rows,
            rows: Vec::new(),
            bytes: 0,
            doing,
        }
    }

    pub(super) async fn add(
        &mut self,
        conn: &mut SqliteConnection,
        row: Vec<serde_json::Value>,
    ) -> Result<(), LoadError> {
        self.bytes += row
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s.len(),
                _ => 16,
            })
            .sum::<usize>();
        self.rows.push(row);
        if self.rows.len() >= self.max_rows || self.bytes >= BATCH_BYTES {
            self.flush(conn).await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self, conn: &mut SqliteConnection) -> Result<(), LoadError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let one = format!("({})", vec!["?"; self.width].join(", "));
        let sql = format!(
            "{}{}{}",
            self.head,
            vec![one.as_str(); self.rows.len()].join(", "),
            self.tail
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in &self.rows {
            for v in row {
                query = bind_json(query, v)?;
            }
        }
        query
            .execute(&mut *conn)
            .await
            .map_err(LoadError::db_lazy(&self.doing))?;
        self.rows.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// `"a", "b"`: quoted column names.
fn quoted_list<S: AsRef<str>>(cols: &[S]) -> String {
    cols.iter()
        .map(|c| quote_ident(c.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `INSERT` of one table's rows (with `ON CONFLICT … DO UPDATE` for
/// partials), batched.
struct Insert<'t> {
    table: &'t Table,
    cols: Vec<&'t str>,
    batch: Batch,
}

impl<'t> Insert<'t> {
    fn new(t: &'t Table, on_conflict: bool) -> Self {
        let cols: Vec<&str> = t
            .columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| c.name.as_str())
            .collect();
        let head = format!(
            "INSERT INTO {} ({}) VALUES ",
            t.name.quoted(),
            quoted_list(&cols)
        );
        let mut tail = String::new();
        if on_conflict {
            let pk = quoted_list(&t.primary_key);
            let set = cols
                .iter()
                .filter(|c| !t.primary_key.iter().any(|p| p == *c))
                .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
            tail = if set.is_empty() {
                format!(" ON CONFLICT ({pk}) DO NOTHING")
            } else {
                format!(" ON CONFLICT ({pk}) DO UPDATE SET {set}")
            };
        }
        let batch = Batch::new(
            head,
            tail,
            cols.len(),
            format!("writing rows of {}", t.name),
        );
        Self {
            table: t,
            cols,
            batch,
        }
    }

    async fn add(
        &mut self,
        conn: &mut SqliteConnection,
        mut row: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), LoadError> {
        let mut values = Vec::with_capacity(self.cols.len());
        for c in &self.cols {
            values.push(row.remove(*c).ok_or_else(|| {
                LoadError::Refused(format!("a row of {} lacks column {c:?}", self.table.name))
            })?);
        }
        self.batch.add(conn, values).await
    }

    async fn flush(&mut self, conn: &mut SqliteConnection) -> Result<(), LoadError> {
        self.batch.flush(conn).await
    }
}

/// The key columns' values of a row or key object, in key order.
fn key_of(t: &Table, obj: &serde_json::Map<String, serde_json::Value>) -> Vec<serde_json::Value> {
    t.primary_key
        .iter()
        .map(|c| obj.get(c).cloned().unwrap_or(serde_json::Value::Null))
        .collect()
}

pub(super) async fn load_complete(
    conn: &mut SqliteConnection,
    v: &Verified,
) -> Result<u64, LoadError> {
    let m = &v.manifest;
    for t in &m.tables {
        sqlx::raw_sql(q(format!("DROP TABLE IF EXISTS {}", t.name.quoted())))
            .execute(&mut *conn)
            .await
            .map_err(LoadError::db(format!("dropping the previous {}", t.name)))?;
    }
    sqlx::raw_sql(q(v.text("schema/pre-data.sql")?))
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("running the bundle's pre-data DDL"))?;
    let mut rows = 0;
    for member in m.members.iter().filter(|x| x.role == Role::Data) {
        let mut insert = Insert::new(table_of(m, member)?, false);
        let file = tokio::fs::File::open(v.file(member)).await?;
        let mut lines = tokio::io::BufReader::new(file).lines();
        while let Some(line) = lines.next_line().await? {
            let (_, row) = split_change(&line)?;
            insert.add(conn, parse_object(row, "a row")?).await?;
            rows += 1;
        }
        insert.flush(conn).await?;
    }
    sqlx::raw_sql(q(v.text("schema/post-data.sql")?))
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("running the bundle's post-data DDL"))?;
    Ok(rows)
}

fn table_of<'m>(
    m: &'m ferry_common::Manifest,
    member: &ferry_common::Member,
) -> Result<&'m Table, LoadError> {
    member
        .table
        .as_ref()
        .and_then(|n| m.tables.iter().find(|t| &t.name == n))
        .ok_or_else(|| LoadError::Refused(format!("{} names no listed table", member.path)))
}

pub(super) async fn load_partial(
    conn: &mut SqliteConnection,
    v: &Verified,
) -> Result<u64, LoadError> {
    let m = &v.manifest;
    for t in &m.tables {
        let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
            .bind(&t.name.name)
            .fetch_all(&mut *conn)
            .await
            .map_err(LoadError::db(format!("checking table {}", t.name)))?;
        if cols.is_empty() {
            return Err(LoadError::Refused(format!(
                "table {} does not exist on the target; a complete bundle creates it",
                t.name
            )));
        }
        if let Some(c) = t.columns.iter().find(|c| !cols.contains(&c.name)) {
            return Err(LoadError::Refused(format!(
                "table {} on the target has no column {:?}; take a complete",
                t.name, c.name
            )));
        }
    }
    let order = parents_first(&m.tables);
    let mut rows = 0;
    for op in ["upsert", "delete"] {
        let tables: Vec<usize> = if op == "upsert" {
            order.clone()
        } else {
            order.iter().rev().copied().collect()
        };
        for i in tables {
            let t = &m.tables[i];
            let mut insert = Insert::new(t, true);
            let pk = quoted_list(&t.primary_key);
            let mut delete = Batch::new(
                format!("DELETE FROM {} WHERE ({pk}) IN (VALUES ", t.name.quoted()),
                ")".into(),
                t.primary_key.len(),
                format!("deleting rows of {}", t.name),
            );
            // A table sent whole: its keys are kept aside, and the rows of the
            // table that the set lacks are deleted in the delete pass.
            let whole = m
                .members
                .iter()
                .any(|x| x.whole && x.table.as_ref() == Some(&t.name));
            let keep = format!("temp.ferry_keep_{i}");
            if whole && op == "upsert" {
                sqlx::raw_sql(q(format!(
                    "DROP TABLE IF EXISTS {keep};
                     CREATE TEMP TABLE ferry_keep_{i} AS SELECT {pk} FROM {} WHERE 0;",
                    t.name.quoted()
                )))
                .execute(&mut *conn)
                .await
                .map_err(LoadError::db(format!("preparing the set of {}", t.name)))?;
            }
            let mut keeping = Batch::new(
                format!("INSERT INTO {keep} VALUES "),
                String::new(),
                t.primary_key.len(),
                format!("keeping the keys of {}", t.name),
            );
            for member in m
                .members
                .iter()
                .filter(|x| x.role == Role::Data && x.table.as_ref() == Some(&t.name))
            {
                let file = tokio::fs::File::open(v.file(member)).await?;
                let mut lines = tokio::io::BufReader::new(file).lines();
                while let Some(line) = lines.next_line().await? {
                    let (kind, payload) = split_change(&line)?;
                    if kind != op {
                        continue;
                    }
                    if op == "upsert" {
                        let row = parse_object(payload, "a row")?;
                        if whole {
                            keeping.add(conn, key_of(t, &row)).await?;
                        }
                        insert.add(conn, row).await?;
                    } else {
                        let key = parse_object(payload, "a key")?;
                        delete.add(conn, key_of(t, &key)).await?;
                    }
                    rows += 1;
                }
            }
            insert.flush(conn).await?;
            keeping.flush(conn).await?;
            delete.flush(conn).await?;
            if whole && op == "delete" {
                let on = t
                    .primary_key
                    .iter()
                    .map(|c| format!("k.{0} IS t.{0}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                rows += sqlx::raw_sql(q(format!(
                    "DELETE FROM {} AS t WHERE NOT EXISTS (SELECT 1 FROM {keep} k WHERE {on});
                     DROP TABLE {keep};",
                    t.name.quoted()
                )))
                .execute(&mut *conn)
                .await
                .map_err(LoadError::db(format!(
                    "deleting the rows {} no longer holds",
                    t.name
                )))?
                .rows_affected();
            }
        }
    }
    Ok(rows)
}
