//! The PostgreSQL target.

use super::{Applied, LoadError, check_order, col, parents_first};
use crate::plan::LedgerState;
use crate::verify::{Piece, Verified};
use ferry_common::ident::TableName;
use ferry_common::ident::{quote_ident, quote_literal};
use ferry_common::manifest::{DataFormat, Kind, Manifest, Member, Role, Table};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Postgres, Transaction};
use std::path::PathBuf;

/// A session with the settings every load connection uses.
pub(super) async fn session(url: &str) -> Result<PgConnection, LoadError> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|source| LoadError::Connect {
            url: crate::config::redact_url(url),
            source,
        })?;
    sqlx::raw_sql(
        "SET statement_timeout = 0; SET lock_timeout = 0; SET IntervalStyle = 'postgres';
     SET client_min_messages = warning;",
    )
    .execute(&mut conn)
    .await
    .map_err(LoadError::db("setting up the session"))?;
    Ok(conn)
}

pub struct PgTarget {
    pub(super) conn: PgConnection,
    pub(super) url: String,
    /// This session's server process, to end it when a load is abandoned.
    pub(super) backend_pid: i32,
    /// `[target] fire_triggers`.
    pub(crate) fire_triggers: bool,
    /// `[target] departed_tables`.
    departed: crate::config::Departed,
}

pub(super) fn q(sql: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(sql)
}

const LEDGER: &str = "
CREATE SCHEMA IF NOT EXISTS ferry_receiver;
CREATE TABLE IF NOT EXISTS ferry_receiver.applied (
  sender_id text NOT NULL,
  chain text NOT NULL DEFAULT '',
  seq bigint NOT NULL,
  kind text NOT NULL,
  base_seq bigint NOT NULL,
  created_at timestamptz NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now(),
  file text NOT NULL,
  rows bigint NOT NULL,
  schema_fingerprint text NOT NULL,
  PRIMARY KEY (sender_id, chain, seq));
-- The tables each sender's newest applied complete holds: a table that leaves
-- the source (or its selection) is dropped from the copy by the next complete.
CREATE TABLE IF NOT EXISTS ferry_receiver.complete_tables (
  sender_id text NOT NULL,
  table_name text NOT NULL,
  PRIMARY KEY (sender_id, table_name));
DO $$ BEGIN
  -- Added later: what identifies each applied bundle beyond its seq.
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = 'ferry_receiver' AND table_name = 'applied'
                   AND column_name = 'manifest_id') THEN
    ALTER TABLE ferry_receiver.applied ADD COLUMN manifest_id text;
  END IF;
  -- Added later: the sender state's chain, part of the key.
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = 'ferry_receiver' AND table_name = 'applied'
                   AND column_name = 'chain') THEN
    ALTER TABLE ferry_receiver.applied ADD COLUMN chain text NOT NULL DEFAULT '';
    ALTER TABLE ferry_receiver.applied DROP CONSTRAINT applied_pkey;
    ALTER TABLE ferry_receiver.applied ADD PRIMARY KEY (sender_id, chain, seq);
  END IF;
  -- Added later: the bundle's tables (a JSON array), for the version history.
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = 'ferry_receiver' AND table_name = 'applied'
                   AND column_name = 'tables') THEN
    ALTER TABLE ferry_receiver.applied ADD COLUMN tables text;
  END IF;
  -- Added later: the completes a complete carries tables from (a JSON array).
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = 'ferry_receiver' AND table_name = 'applied'
                   AND column_name = 'carried_from') THEN
    ALTER TABLE ferry_receiver.applied ADD COLUMN carried_from text;
  END IF;
END $$;";

impl PgTarget {
    pub async fn connect(target: &crate::config::TargetConfig) -> Result<Self, LoadError> {
        let url = target.url.as_str();
        let mut conn = session(url).await?;
        sqlx::raw_sql(LEDGER)
            .execute(&mut conn)
            .await
            .map_err(LoadError::db("creating the ledger (schema ferry_receiver; the user needs CREATE on the database)"))?;
        let backend_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .map_err(LoadError::db("reading the session's backend pid"))?;
        Ok(Self {
            conn,
            url: url.to_owned(),
            backend_pid,
            fire_triggers: target.fire_triggers,
            departed: target.departed_tables,
        })
    }

    /// What [`end_session`] needs after this target is dropped mid-load.
    pub fn session(&self) -> (String, i32) {
        (self.url.clone(), self.backend_pid)
    }

    pub async fn ledger(&mut self, sender: &str) -> Result<LedgerState, LoadError> {
        ledger(&mut self.conn, sender).await
    }

    /// The identity recorded with an applied bundle (`None`: not applied, or
    /// applied before identities were recorded).
    pub async fn applied_identity(
        &mut self,
        sender: &str,
        chain: &str,
        seq: u64,
    ) -> Result<Option<String>, LoadError> {
        let id: Option<Option<String>> = sqlx::query_scalar(
            "SELECT manifest_id FROM ferry_receiver.applied
             WHERE sender_id = $1 AND chain = $2 AND seq = $3",
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
    pub async fn applied_all(&mut self) -> Result<Vec<super::LedgerRow>, LoadError> {
        let rows = sqlx::query(
            "SELECT sender_id, chain, seq, kind, base_seq, created_at::text AS c,
                    applied_at::text AS a, file, rows, tables, carried_from
             FROM ferry_receiver.applied ORDER BY sender_id, chain, seq",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(LoadError::db("reading the ledger"))?;
        rows.iter().map(super::LedgerRow::from_row).collect()
    }

    pub async fn history(&mut self) -> Result<Vec<Applied>, LoadError> {
        let rows = sqlx::query(
            "SELECT DISTINCT ON (sender_id, kind) sender_id, seq, kind, created_at::text AS c,
                    applied_at::text AS a, file, rows
             FROM ferry_receiver.applied ORDER BY sender_id, kind, chain DESC, seq DESC",
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
                    created_at: col(r, "c")?,
                    applied_at: col(r, "a")?,
                    file: col(r, "file")?,
                    rows: col(r, "rows")?,
                })
            })
            .collect()
    }

    /// Begins the load transaction: locks the sender's ledger and checks that the
    /// bundle follows it (the exactly-once guard).
    pub(super) async fn begin_checked(
        &mut self,
        m: &Manifest,
    ) -> Result<Transaction<'_, Postgres>, LoadError> {
        let mut tx = self
            .conn
            .begin()
            .await
            .map_err(LoadError::db("beginning"))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('ferry-receiver:' || $1))")
            .bind(&m.sender_id)
            .execute(&mut *tx)
            .await
            .map_err(LoadError::db("locking the sender's ledger"))?;
        let state = ledger(&mut tx, &m.sender_id).await?;
        check_order(m, &state)?;
        if m.kind == Kind::Complete {
            drop_departed(&mut tx, m, self.departed).await?;
        }
        Ok(tx)
    }

    pub async fn apply(
        &mut self,
        v: &Verified,
        file: &str,
        sql_hooks: &[String],
    ) -> Result<u64, LoadError> {
        let m = &v.manifest;
        if m.source.engine != "postgresql" {
            return Err(LoadError::Refused(format!(
                "bundle {file} comes from a {} source; a PostgreSQL target loads bundles from PostgreSQL",
                m.source.engine
            )));
        }
        let fire = self.fire_triggers;
        let mut tx = self.begin_checked(m).await?;
        let rows = match m.kind {
            Kind::Complete => load_complete(&mut tx, v).await?,
            Kind::Partial => load_partial(&mut tx, v).await?,
        };
        finish(tx, m, file, rows, sql_hooks, fire).await?;
        Ok(rows)
    }

    /// Starts a complete from a verifying stream: in a new transaction, drops the
    /// previous copy, runs the DDL and COPYs each data member as it streams in.
    /// Returns the open transaction, the rows and the staged media; the caller
    /// commits with [`finish`] only once the stream verified completely.
    pub async fn begin_streamed_complete(
        &mut self,
        m: &Manifest,
        rx: &mut tokio::sync::mpsc::Receiver<Piece>,
    ) -> Result<(Transaction<'_, Postgres>, u64, Vec<(Member, PathBuf)>), LoadError> {
        if m.source.engine != "postgresql" {
            return Err(LoadError::Refused(format!(
                "the bundle comes from a {} source; a PostgreSQL target loads bundles from PostgreSQL",
                m.source.engine
            )));
        }
        let mut tx = self.begin_checked(m).await?;
        let started = std::time::Instant::now();
        drop_tables(&mut tx, m).await?;
        let mut rows = 0;
        let mut later: Vec<(Member, PathBuf)> = Vec::new();
        let mut media = Vec::new();
        let mut pre_done = false;
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Staged(member, path) => match member.role {
                    Role::PreData => {
                        run_script(
                            &mut tx,
                            &tokio::fs::read_to_string(&path).await?,
                            "pre-data DDL",
                        )
                        .await?;
                        pre_done = true;
                        for (member, path) in std::mem::take(&mut later)
                            .into_iter()
                            .filter(|(x, _)| x.role == Role::Data)
                        {
                            rows +=
                                copy_file(&mut tx, &data_table(&member)?.quoted(), &member, &path)
                                    .await?;
                        }
                    }
                    Role::Data if pre_done => {
                        let t = data_table(&member)?.quoted();
                        rows += copy_file(&mut tx, &t, &member, &path).await?
                    }
                    Role::Media => media.push((member, path)),
                    _ => later.push((member, path)),
                },
                Piece::Start(member) => {
                    let t = data_table(&member)?.quoted();
                    rows += copy_stream(&mut tx, &t, &member, rx).await?;
                }
                Piece::Chunk(_) | Piece::End => {
                    return Err(LoadError::Refused("a stream piece out of place".into()));
                }
                // Member counts matter only to the parallel load's index builds.
                Piece::Final(_) => {}
            }
        }
        tracing::info!(
            rows,
            ms = started.elapsed().as_millis() as u64,
            "tables copied"
        );
        let text = |role| staged_text(&later, role);
        run_script(&mut tx, &text(Role::PostData)?, "post-data DDL").await?;
        run_script(&mut tx, &text(Role::Sequences)?, "sequence values").await?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "indexes and constraints built"
        );
        Ok((tx, rows, media))
    }
}

/// Writes the ledger row, runs the SQL hooks and commits.
pub async fn finish(
    mut tx: Transaction<'_, Postgres>,
    m: &Manifest,
    file: &str,
    rows: u64,
    sql_hooks: &[String],
    fire_triggers: bool,
) -> Result<(), LoadError> {
    // What this complete holds, for the next one to drop what leaves
    // (`drop_departed`).
    if m.kind == Kind::Complete {
        let names: Vec<String> = m.tables.iter().map(|t| t.name.quoted()).collect();
        sqlx::query("DELETE FROM ferry_receiver.complete_tables WHERE sender_id = $1")
            .bind(&m.sender_id)
            .execute(&mut *tx)
            .await
            .map_err(LoadError::db("recording the complete's tables"))?;
        sqlx::query(
            "INSERT INTO ferry_receiver.complete_tables (sender_id, table_name)
             SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&m.sender_id)
        .bind(&names)
        .execute(&mut *tx)
        .await
        .map_err(LoadError::db("recording the complete's tables"))?;
    }
    // The complete created the application's triggers with its tables: turn
    // them off (user triggers only; foreign keys keep being checked), so no
    // load of this copy fires them, unless the operator asked for them.
    if m.kind == Kind::Complete && !fire_triggers {
        let sql: String = m
            .tables
            .iter()
            .map(|t| format!("ALTER TABLE {} DISABLE TRIGGER USER;\n", t.name.quoted()))
            .collect();
        sqlx::raw_sql(q(sql))
            .execute(&mut *tx)
            .await
            .map_err(LoadError::db(
                "disabling the application's triggers on the copy",
            ))?;
    }
    sqlx::query(
        "INSERT INTO ferry_receiver.applied
           (sender_id, seq, kind, base_seq, created_at, file, rows, schema_fingerprint,
            manifest_id, chain, tables, carried_from)
         VALUES ($1, $2, $3, $4, $5::timestamptz, $6, $7, $8, $9, $10, $11, $12)",
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
    let started = std::time::Instant::now();
    tx.commit().await.map_err(LoadError::db("committing"))?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "committed");
    Ok(())
}

/// Drops the tables the sender's previous complete brought that this one does
/// not (dropped on the source, or no longer selected), with what depends on
/// them, so that the complete's DDL (which drops and re-creates shared
/// functions, say) applies to a target that holds exactly its tables.
async fn drop_departed(
    conn: &mut PgConnection,
    m: &Manifest,
    departed: crate::config::Departed,
) -> Result<(), LoadError> {
    let keep: Vec<String> = m.tables.iter().map(|t| t.name.quoted()).collect();
    let gone: Vec<String> = sqlx::query_scalar(
        "SELECT table_name FROM ferry_receiver.complete_tables
         WHERE sender_id = $1 AND NOT (table_name = ANY($2)) ORDER BY 1",
    )
    .bind(&m.sender_id)
    .bind(&keep)
    .fetch_all(&mut *conn)
    .await
    .map_err(LoadError::db("reading the tables of the previous complete"))?;
    for t in &gone {
        if departed == crate::config::Departed::Keep {
            super::departed(t, m, false);
            continue;
        }
        // The names were quoted by this receiver when it recorded them.
        sqlx::raw_sql(q(format!("DROP TABLE IF EXISTS {t} CASCADE")))
            .execute(&mut *conn)
            .await
            .map_err(LoadError::db(format!(
                "dropping {t}, which left the source"
            )))?;
        super::departed(t, m, true);
    }
    Ok(())
}

pub(super) async fn drop_tables(conn: &mut PgConnection, m: &Manifest) -> Result<(), LoadError> {
    let names = m
        .tables
        .iter()
        .map(|t| t.name.quoted())
        .collect::<Vec<_>>()
        .join(", ");
    if names.is_empty() {
        return Ok(());
    }
    sqlx::raw_sql(q(format!("DROP TABLE IF EXISTS {names} CASCADE")))
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("dropping the previous copy"))?;
    Ok(())
}

/// The text of the staged member with `role` (post-data, sequences); empty when
/// the bundle has none.
pub(super) fn staged_text(staged: &[(Member, PathBuf)], role: Role) -> std::io::Result<String> {
    match staged.iter().find(|(m, _)| m.role == role) {
        Some((_, p)) => std::fs::read_to_string(p),
        None => Ok(String::new()),
    }
}

/// The table a data member fills.
pub(super) fn data_table(member: &Member) -> Result<&TableName, LoadError> {
    member
        .table
        .as_ref()
        .ok_or_else(|| LoadError::Refused(format!("{} names no table", member.path)))
}

/// The COPY statement loading `member` into `table` (a quoted name), in the
/// member's format. FREEZE: the table was created or truncated in this
/// transaction, so its rows can be written frozen (no hint-bit rewrites or
/// anti-wraparound vacuum later). A partitioned table routes its rows to
/// its partitions and refuses FREEZE.
async fn copy_in_sql(
    conn: &mut PgConnection,
    table: &str,
    member: &Member,
) -> Result<String, LoadError> {
    let freeze = if partitioned(conn, table).await? {
        ""
    } else {
        ", FREEZE"
    };
    Ok(match member.format {
        Some(DataFormat::PgCopyBinary) => {
            format!("COPY {table} FROM STDIN WITH (FORMAT binary{freeze})")
        }
        _ => format!("COPY {table} FROM STDIN WITH (FORMAT text{freeze})"),
    })
}

/// COPYs one staged data file into `table` (a quoted name).
pub(super) async fn copy_file(
    conn: &mut PgConnection,
    table: &str,
    member: &Member,
    path: &std::path::Path,
) -> Result<u64, LoadError> {
    let doing = format!("loading {} ({})", table, member.path);
    let sql = copy_in_sql(conn, table, member).await?;
    copy_raw(conn, &sql, &doing, path).await
}

/// Runs a `COPY … FROM STDIN` statement with a file's bytes.
pub(crate) async fn copy_raw(
    conn: &mut PgConnection,
    sql: &str,
    doing: &str,
    path: &std::path::Path,
) -> Result<u64, LoadError> {
    let mut copy = conn
        .copy_in_raw(sql)
        .await
        .map_err(LoadError::db_lazy(doing))?;
    // 1 MiB CopyData messages: sqlx's `read_from` sends one small message and a
    // flush per read, which measured slower.
    let mut file = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut file, &mut buf).await?;
        if n == 0 {
            break;
        }
        if let Err(e) = copy.send(&buf[..n]).await {
            let _ = copy.abort("ferry: sending failed").await;
            return Err(LoadError::db_lazy(doing)(e));
        }
    }
    copy.finish().await.map_err(LoadError::db_lazy(doing))
}

/// COPYs one streamed data member into `table` (a quoted name): the chunks that
/// follow its [`Piece::Start`] on `rx`, up to [`Piece::End`] (anything else
/// there is out of place).
pub(super) async fn copy_stream<T: Into<Option<Piece>>>(
    conn: &mut PgConnection,
    table: &str,
    member: &Member,
    rx: &mut tokio::sync::mpsc::Receiver<T>,
) -> Result<u64, LoadError> {
    let doing = format!("loading {} ({})", table, member.path);
    let sql = copy_in_sql(conn, table, member).await?;
    let mut copy = conn
        .copy_in_raw(&sql)
        .await
        .map_err(LoadError::db(doing.clone()))?;
    while let Some(p) = rx.recv().await {
        match p.into() {
            Some(Piece::Chunk(c)) => {
                if let Err(e) = copy.send(c.as_slice()).await {
                    let _ = copy.abort("ferry: sending failed").await;
                    return Err(LoadError::Db { doing, source: e });
                }
            }
            Some(Piece::End) => return copy.finish().await.map_err(LoadError::db(doing)),
            _ => break,
        }
    }
    let _ = copy.abort("ferry: the bundle stream ended early").await;
    Err(LoadError::Refused(format!(
        "the bundle ended in the middle of {}",
        member.path
    )))
}

async fn ledger(conn: &mut PgConnection, sender: &str) -> Result<LedgerState, LoadError> {
    // The copy follows the newest chain it applied a bundle of.
    let row = sqlx::query(
        "SELECT coalesce(c.chain, '') AS chain, max(a.seq) AS last,
                max(a.seq) FILTER (WHERE a.kind = 'complete') AS base
         FROM (SELECT max(chain) AS chain FROM ferry_receiver.applied
               WHERE sender_id = $1) c
         LEFT JOIN ferry_receiver.applied a ON a.sender_id = $1 AND a.chain = c.chain
         GROUP BY c.chain",
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

pub(super) async fn load_complete(conn: &mut PgConnection, v: &Verified) -> Result<u64, LoadError> {
    let m = &v.manifest;
    drop_tables(conn, m).await?;
    run_script(conn, &v.text("schema/pre-data.sql")?, "pre-data DDL").await?;
    let mut rows = 0;
    let mut data: Vec<_> = m.members.iter().filter(|x| x.role == Role::Data).collect();
    data.sort_by(|a, b| a.path.cmp(&b.path));
    for member in data {
        rows += copy_file(conn, &data_table(member)?.quoted(), member, v.file(member)).await?;
    }
    run_script(conn, &v.text("schema/post-data.sql")?, "post-data DDL").await?;
    run_script(conn, &v.text("schema/sequences.sql")?, "sequence values").await?;
    Ok(rows)
}

/// Fills `buf` as far as the file allows; 0 at the end.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

pub(super) async fn run_script(
    conn: &mut PgConnection,
    sql: &str,
    what: &str,
) -> Result<(), LoadError> {
    sqlx::raw_sql(q(sql.to_owned()))
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db(format!("running the bundle's {what}")))?;
    // pg_dump's scripts empty search_path for the session.
    sqlx::raw_sql("RESET search_path")
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("resetting search_path"))?;
    Ok(())
}

/// Refuses a partial whose tables or columns the target lacks (schema drift: a
/// complete is needed), naming what is missing. Returns, for each table, the
/// name its deletes go to (see [`rows_of`]).
async fn check_tables(conn: &mut PgConnection, tables: &[Table]) -> Result<Vec<String>, LoadError> {
    let mut targets = Vec::with_capacity(tables.len());
    for t in tables {
        let schema = t.name.schema.clone().unwrap_or_else(|| "public".into());
        let cols: Vec<(String, bool)> = sqlx::query_as(
            "SELECT a.attname::text, c.relkind = 'p' FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(&schema)
        .bind(&t.name.name)
        .fetch_all(&mut *conn)
        .await
        .map_err(LoadError::db(format!("checking table {}", t.name)))?;
        let Some(&(_, partitioned)) = cols.first() else {
            return Err(LoadError::Refused(format!(
                "table {} does not exist on the target; a complete bundle creates it \
                 (ferry-sender complete)",
                t.name
            )));
        };
        if let Some(c) = t
            .columns
            .iter()
            .find(|c| !cols.iter().any(|(name, _)| *name == c.name))
        {
            return Err(LoadError::Refused(format!(
                "table {} on the target has no column {:?}; the source's schema changed: \
                 take a complete (ferry-sender complete)",
                t.name, c.name
            )));
        }
        targets.push(rows_name(&t.name.quoted(), partitioned));
    }
    Ok(targets)
}

/// How statements that read or delete `table`'s rows name it (`table` is a
/// quoted name): `ONLY table` for a plain table, so a table that others
/// inherit from (`INHERITS`) means its own rows only, as `COPY` does; the
/// bare name for a partitioned table, whose rows are all its partitions'
/// (`ONLY` would mean none).
pub(crate) async fn rows_of(conn: &mut PgConnection, table: &str) -> Result<String, LoadError> {
    Ok(rows_name(table, partitioned(conn, table).await?))
}

fn rows_name(table: &str, partitioned: bool) -> String {
    if partitioned {
        table.to_owned()
    } else {
        format!("ONLY {table}")
    }
}

/// Whether `table` (a quoted name) is a partitioned table on the target.
pub(crate) async fn partitioned(conn: &mut PgConnection, table: &str) -> Result<bool, LoadError> {
    sqlx::query_scalar("SELECT relkind = 'p' FROM pg_class WHERE oid = $1::regclass")
        .bind(table)
        .fetch_one(&mut *conn)
        .await
        .map_err(LoadError::db(format!("looking up {table}")))
}

/// The temporary table a partial's change lines of table `i` are copied into.
fn lines_table(i: usize) -> String {
    format!("pg_temp.ferry_lines_{i}")
}

/// JSON change lines are copied as CSV with delimiter and quote bytes that JSON
/// text never holds raw (control characters are escaped in JSON), so each line
/// arrives as one value, untouched: no backslash or quote processing.
pub(crate) const COPY_LINES: &str =
    "(line) FROM STDIN WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')";

const IS_UPSERT: &str = "starts_with(s.line, '{\"op\":\"upsert\",\"row\":')";
const IS_DELETE: &str = "starts_with(s.line, '{\"op\":\"delete\",\"key\":')";

/// The JSON object of a change line `s.line`: both prefixes are 21 bytes
/// (`{"op":"upsert","row":`, `{"op":"delete","key":`) and the line ends with
/// the closing `}`, so the object is cut out as text and parsed once rather
/// than the whole line parsed and the object extracted and parsed again.
pub(crate) const DOC: &str = "substr(s.line, 22, length(s.line) - 22)::json";

/// The rows of a table's upsert lines, as `r` (typed as the table) beside the
/// JSON document `s.doc`.
fn upserted_rows(t: &Table, i: usize) -> String {
    format!(
        "(SELECT {DOC} AS doc FROM {lines} s WHERE {IS_UPSERT}) s,
         json_populate_record(NULL::{name}, s.doc) r",
        lines = lines_table(i),
        name = t.name.quoted()
    )
}

/// A column's value from a change line: `r.<column>` of the row typed by
/// `json_populate_record`, except json columns, which travel as their exact
/// text in a JSON string (`s.doc` is the line's object).
pub(crate) fn column_value(c: &ferry_common::manifest::Column) -> String {
    match c.sql_type.as_str() {
        "json" | "json[]" => format!("(s.doc ->> {})::{}", quote_literal(&c.name), c.sql_type),
        _ => format!("r.{}", quote_ident(&c.name)),
    }
}

/// One `INSERT … SELECT … ON CONFLICT DO UPDATE` for every upsert line of
/// table `i`.
fn upsert_sql(t: &Table, i: usize) -> String {
    let name = t.name.quoted();
    let cols: Vec<_> = t.columns.iter().filter(|c| !c.generated).collect();
    let list = cols
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let exprs = cols
        .iter()
        .map(|c| column_value(c))
        .collect::<Vec<_>>()
        .join(", ");
    let pk = t
        .primary_key
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let updates = cols
        .iter()
        .filter(|c| !t.primary_key.contains(&c.name))
        .filter(|c| c.identity.as_deref() != Some("always"))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let conflict = if updates.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!("DO UPDATE SET {updates}")
    };
    // In key order: the conflict checks and updates then walk the primary
    // key's index (and, for a table clustered by its key, the heap) in
    // order. Measured on 5 M rows: 1,000,000 upserts arriving in random key
    // order took half the time sorted; 10,000 the same; rows that already
    // arrive in key order pay only the sort.
    let order = t
        .primary_key
        .iter()
        .map(|c| format!("r.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {name} ({list}) OVERRIDING SYSTEM VALUE
         SELECT {exprs} FROM {rows}
         ORDER BY {order}
         ON CONFLICT ({pk}) {conflict}",
        rows = upserted_rows(t, i)
    )
}

/// One `DELETE` for every delete line of table `i`, from `target` (see
/// [`rows_of`]).
fn delete_sql(t: &Table, i: usize, target: &str) -> String {
    let name = t.name.quoted();
    let on = t
        .primary_key
        .iter()
        .map(|c| format!("t.{0} = d.{0}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "DELETE FROM {target} t USING (
           SELECT r.* FROM {lines} s, json_populate_record(NULL::{name}, {DOC}) r
           WHERE {IS_DELETE}) d
         WHERE {on}",
        lines = lines_table(i)
    )
}

/// For a table sent whole: deletes the rows its set lacks from `target`.
fn delete_absent_sql(t: &Table, i: usize, target: &str) -> String {
    let on = t
        .primary_key
        .iter()
        .map(|c| format!("r.{0} = t.{0}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "DELETE FROM {target} t WHERE NOT EXISTS (SELECT 1 FROM {rows} WHERE {on})",
        rows = upserted_rows(t, i)
    )
}

/// Applies a partial as sets: each table's change lines are copied into a
/// temporary table (one COPY, streamed from the staged member), then one
/// statement upserts them and one deletes (per table: parents first for
/// upserts, children first for deletes). The staged file is read once; nothing
/// of it is held in memory.
pub(super) async fn load_partial(conn: &mut PgConnection, v: &Verified) -> Result<u64, LoadError> {
    let m = &v.manifest;
    let targets = check_tables(conn, &m.tables).await?;
    sqlx::raw_sql("SET CONSTRAINTS ALL DEFERRED")
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("deferring constraints"))?;
    let mut whole = vec![false; m.tables.len()];
    for (i, t) in m.tables.iter().enumerate() {
        if t.primary_key.is_empty() {
            continue;
        }
        let lines = lines_table(i);
        sqlx::raw_sql(q(format!(
            // Dropped first: a restore applies several partials in one transaction.
            "DROP TABLE IF EXISTS {lines}; CREATE TEMP TABLE {} (line text NOT NULL) ON COMMIT DROP",
            lines.trim_start_matches("pg_temp.")
        )))
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("creating a staging table"))?;
        for member in m
            .members
            .iter()
            .filter(|x| x.role == Role::Data && x.table.as_ref() == Some(&t.name))
        {
            whole[i] |= member.whole;
            let copy = format!("COPY {lines} {COPY_LINES}");
            let doing = format!("staging the changes of {} ({})", t.name, member.path);
            copy_raw(conn, &copy, &doing, v.file(member)).await?;
        }
        let bad: Option<String> = sqlx::query_scalar(q(format!(
            "SELECT left(s.line, 200) FROM {lines} s WHERE NOT ({IS_UPSERT} OR {IS_DELETE}) LIMIT 1"
        )))
        .fetch_optional(&mut *conn)
        .await
        .map_err(LoadError::db(format!("checking the changes of {}", t.name)))?;
        if let Some(line) = bad {
            return Err(LoadError::Refused(format!(
                "not a change line in {}: {line}",
                t.name
            )));
        }
    }
    let order = parents_first(&m.tables);
    let mut rows = 0;
    for &i in &order {
        let t = &m.tables[i];
        if t.primary_key.is_empty() {
            continue;
        }
        rows += exec(
            conn,
            upsert_sql(t, i),
            format!("applying upserts to {}", t.name),
        )
        .await?;
    }
    for &i in order.iter().rev() {
        let t = &m.tables[i];
        if t.primary_key.is_empty() {
            continue;
        }
        rows += exec(
            conn,
            delete_sql(t, i, &targets[i]),
            format!("applying deletes to {}", t.name),
        )
        .await?;
        if whole[i] {
            rows += exec(
                conn,
                delete_absent_sql(t, i, &targets[i]),
                format!("deleting the rows {} no longer holds", t.name),
            )
            .await?;
        }
    }
    Ok(rows)
}

/// Runs one statement; the rows it affected.
async fn exec(conn: &mut PgConnection, sql: String, doing: String) -> Result<u64, LoadError> {
    Ok(sqlx::query(q(sql))
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db(doing))?
        .rows_affected())
}

/// Ends a session whose load was abandoned (a stop signal): the server would
/// otherwise run its statement (a long hook, say) to the end before noticing
/// the client is gone, holding the load's locks. Its transaction rolls back.
pub async fn end_session(url: &str, pid: i32) {
    let ended = async {
        let mut conn = session(url).await?;
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut conn)
            .await
            .map_err(LoadError::db("ending the abandoned session"))?;
        Ok::<(), LoadError>(())
    };
    if let Err(error) = ended.await {
        tracing::warn!(%error, pid, "could not end the abandoned load's session; the server ends it when its statement finishes");
    }
}
