//! The SQLite source.
//!
//! One read transaction on one connection is the snapshot (SQLite isolates a
//! reader from later commits, in WAL and rollback-journal mode alike). SQLite has a
//! single writer, so a row's change column is set under the write lock, and the
//! largest value visible is a safe watermark for numbers; for datetimes written as
//! text (as Django does) the watermark is that value minus the configured overlap,
//! which covers an application that stamps the row before it gets the lock.
//!
//! Rows travel as JSON lines in both complete and partial bundles: integers and
//! reals as JSON numbers (±infinity as `9e999`/`-9e999`), text as strings, blobs as
//! `{"$hex": "…"}`.

use super::select::CatalogTable;
use super::stage::{BATCH, BlockingSink, member, stage_text};
use super::{
    ChangeKind, DELETES_KEY, ExtractError, ExtractSettings, Extracted, Stager, TableMeta,
    Watermarks, closure_statements, column_list, join_on, keyed,
};
use crate::config::Carry;
use crate::extract::col;
use ferry_common::TableName;
use ferry_common::ident::{quote_ident, quote_literal};
use ferry_common::manifest::{self, DataFormat, Role};
use futures_util::TryStreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteRow};
use sqlx::{AssertSqlSafe, Connection, Row, TypeInfo, ValueRef};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

const LOG: &str = "ferry_deleted_rows";
const TRIGGER_PREFIX: &str = "ferry_capture_delete:";

pub struct SqliteSource {
    pub(super) conn: SqliteConnection,
    version: String,
}

fn q(sql: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(sql)
}

impl SqliteSource {
    pub async fn connect(url: &str) -> Result<Self, ExtractError> {
        let connect_err = |source| ExtractError::Connect {
            url: url.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_err)?
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(30));
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(connect_err)?;
        let version: String = sqlx::query_scalar("SELECT sqlite_version()")
            .fetch_one(&mut conn)
            .await
            .map_err(ExtractError::db("reading the SQLite version"))?;
        Ok(Self { conn, version })
    }

    pub fn info(&self) -> manifest::Source {
        manifest::Source {
            engine: "sqlite".into(),
            version: self.version.clone(),
        }
    }

    pub async fn catalog(&mut self) -> Result<Vec<CatalogTable>, ExtractError> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name <> 'ferry_deleted_rows'
             ORDER BY name",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("listing tables"))?;
        let mut out = Vec::new();
        for name in names {
            let cols = sqlx::query(
                "SELECT name, type, \"notnull\" AS nn, pk, hidden FROM pragma_table_xinfo(?)
                 WHERE hidden <> 1 ORDER BY cid",
            )
            .bind(&name)
            .fetch_all(&mut self.conn)
            .await
            .map_err(ExtractError::db(format!("reading columns of {name}")))?;
            let mut t = CatalogTable {
                info: manifest::Table {
                    name: TableName::new(None, &name),
                    columns: vec![],
                    primary_key: vec![],
                    foreign_keys: vec![],
                    change_column: None,
                },
                change_kinds: HashMap::new(),
                indexed_first: HashSet::new(),
                size_hint: 0,
                partitions: None,
                inherits: Vec::new(),
            };
            let mut pk: Vec<(i64, String)> = Vec::new();
            for c in cols {
                let cname: String = col(&c, "name")?;
                let ty: String = col(&c, "type")?;
                let upper = ty.to_ascii_uppercase();
                let kind = if upper.contains("DATE")
                    || upper.contains("TIME")
                    || upper.contains("TEXT")
                    || upper.contains("CHAR")
                {
                    ChangeKind::Timestamp
                } else {
                    ChangeKind::Number
                };
                t.change_kinds.insert(cname.clone(), kind);
                let pk_pos: i64 = col(&c, "pk")?;
                if pk_pos > 0 {
                    pk.push((pk_pos, cname.clone()));
                }
                t.info.columns.push(manifest::Column {
                    name: cname,
                    sql_type: ty,
                    not_null: col::<i64, _>(&c, "nn")? != 0,
                    generated: col::<i64, _>(&c, "hidden")? >= 2,
                    identity: None,
                });
            }
            pk.sort();
            t.info.primary_key = pk.into_iter().map(|(_, c)| c).collect();
            if let [only] = t.info.primary_key.as_slice() {
                t.indexed_first.insert(only.clone());
            }
            let firsts: Vec<String> = sqlx::query_scalar(
                "SELECT ii.name FROM pragma_index_list(?1) il
                 JOIN pragma_index_info(il.name) ii WHERE ii.seqno = 0",
            )
            .bind(&name)
            .fetch_all(&mut self.conn)
            .await
            .map_err(ExtractError::db(format!("reading indexes of {name}")))?;
            t.indexed_first.extend(firsts);
            let fks = sqlx::query(
                "SELECT id, \"table\" AS ref, \"from\" AS col, \"to\" AS refcol
                 FROM pragma_foreign_key_list(?) ORDER BY id, seq",
            )
            .bind(&name)
            .fetch_all(&mut self.conn)
            .await
            .map_err(ExtractError::db(format!("reading foreign keys of {name}")))?;
            let mut by_id: Vec<(i64, manifest::ForeignKey, bool)> = Vec::new();
            for r in fks {
                let id: i64 = col(&r, "id")?;
                if by_id.last().is_none_or(|(last, _, _)| *last != id) {
                    by_id.push((
                        id,
                        manifest::ForeignKey {
                            columns: vec![],
                            references: TableName::new(None, col(&r, "ref")?),
                            referenced_columns: vec![],
                        },
                        false,
                    ));
                }
                let entry = by_id.last_mut().expect("pushed above");
                entry.1.columns.push(col(&r, "col")?);
                match col::<Option<String>, _>(&r, "refcol")? {
                    Some(c) => entry.1.referenced_columns.push(c),
                    None => entry.2 = true, // references the parent's primary key
                }
            }
            t.info.foreign_keys = by_id
                .into_iter()
                .map(|(_, fk, implicit)| (fk, implicit))
                .map(|(fk, implicit)| {
                    if implicit {
                        manifest::ForeignKey {
                            referenced_columns: vec![],
                            ..fk
                        }
                    } else {
                        fk
                    }
                })
                .collect();
            out.push(t);
        }
        // Foreign keys that name no columns reference the parent's primary key.
        let pks: HashMap<TableName, Vec<String>> = out
            .iter()
            .map(|t| (t.info.name.clone(), t.info.primary_key.clone()))
            .collect();
        for t in &mut out {
            for fk in &mut t.info.foreign_keys {
                if fk.referenced_columns.is_empty() {
                    fk.referenced_columns = pks.get(&fk.references).cloned().unwrap_or_default();
                }
            }
        }
        Ok(out)
    }

    pub async fn complete(
        &mut self,
        tables: &[TableMeta],
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<Extracted, ExtractError> {
        if settings.capture_deletes {
            self.set_delete_capture(tables, true).await?;
        }
        sqlx::raw_sql("BEGIN")
            .execute(&mut self.conn)
            .await
            .map_err(ExtractError::db("starting the snapshot"))?;
        let result = self.complete_in_snapshot(tables, settings, stager).await;
        let ended = crate::extract::end_snapshot(&mut self.conn).await;
        let out = result?;
        ended?;
        Ok(out)
    }

    async fn complete_in_snapshot(
        &mut self,
        tables: &[TableMeta],
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<Extracted, ExtractError> {
        // The watermarks first: the first read fixes the snapshot.
        let watermarks = self
            .watermarks(tables, &Watermarks::new(), settings)
            .await?;
        let mut pre = String::new();
        for t in tables {
            let sql: String = sqlx::query_scalar(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
            )
            .bind(&t.info.name.name)
            .fetch_one(&mut self.conn)
            .await
            .map_err(ExtractError::db(format!(
                "reading the schema of {}",
                t.key()
            )))?;
            pre.push_str(&sql);
            pre.push_str(";\n");
        }
        stage_text(stager, "schema/pre-data.sql", Role::PreData, pre).await?;
        for t in tables {
            let path = format!("data/{}.jsonl", t.info.name.file_stem());
            let sql = format!(
                "SELECT {} FROM {}",
                column_list(None, &column_names(t)),
                t.info.name.quoted()
            );
            self.export(t, path, sql, None, false, stager).await?;
        }
        let names: Vec<String> = tables.iter().map(|t| t.info.name.name.clone()).collect();
        let mut post = String::new();
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT tbl_name, sql FROM sqlite_master
             WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading indexes"))?;
        for (table, sql) in indexes {
            if names.contains(&table) {
                post.push_str(&sql);
                post.push_str(";\n");
            }
        }
        stage_text(stager, "schema/post-data.sql", Role::PostData, post).await?;
        Ok(Extracted {
            watermarks,
            ..Default::default()
        })
    }

    /// The watermarks visible in the current snapshot; `previous` where a table
    /// is empty (or the log has no entries).
    async fn watermarks(
        &mut self,
        tables: &[TableMeta],
        previous: &Watermarks,
        settings: &ExtractSettings,
    ) -> Result<Watermarks, ExtractError> {
        let mut out = Watermarks::new();
        let secs = settings.overlap.as_secs();
        for t in tables {
            let Some((col, kind)) = &t.change else {
                continue;
            };
            let c = quote_ident(col);
            let sql = match kind {
                ChangeKind::Number => format!("SELECT CAST(max({c}) AS TEXT) FROM {}", t.info.name.quoted()),
                // Keep the column's own format (`T` or space between date and time)
                // so that text comparison stays correct.
                ChangeKind::Timestamp => format!(
                    "SELECT CASE WHEN m IS NULL THEN NULL
                       WHEN substr(m, 11, 1) = 'T' THEN strftime('%Y-%m-%dT%H:%M:%f', m, '-{secs} seconds')
                       ELSE strftime('%Y-%m-%d %H:%M:%f', m, '-{secs} seconds') END
                     FROM (SELECT max({c}) AS m FROM {})",
                    t.info.name.quoted()
                ),
            };
            let wm: Option<String> = sqlx::query_scalar(q(sql))
                .fetch_one(&mut self.conn)
                .await
                .map_err(ExtractError::db(format!(
                    "reading the watermark of {}",
                    t.key()
                )))?;
            out.insert(
                t.key(),
                wm.or_else(|| previous.get(&t.key()).cloned().flatten()),
            );
        }
        let log_max: Option<String> = if self.has_log().await? {
            sqlx::query_scalar("SELECT CAST(max(id) AS TEXT) FROM ferry_deleted_rows")
                .fetch_one(&mut self.conn)
                .await
                .map_err(ExtractError::db("reading the delete log"))?
        } else {
            None
        };
        out.insert(
            DELETES_KEY.into(),
            log_max
                .or_else(|| previous.get(DELETES_KEY).cloned().flatten())
                .or(Some("0".into())),
        );
        Ok(out)
    }

    async fn has_log(&mut self) -> Result<bool, ExtractError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'ferry_deleted_rows'",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(ExtractError::db("looking for the delete log"))?;
        Ok(n > 0)
    }

    /// Streams a query's rows as upsert lines (and optionally delete lines from
    /// `deletes`) into one staged member.
    async fn export(
        &mut self,
        t: &TableMeta,
        path: String,
        sql: String,
        deletes: Option<(String, Vec<String>)>,
        whole: bool,
        stager: &Stager,
    ) -> Result<(), ExtractError> {
        let mut m = member(path, Role::Data);
        m.table = Some(t.info.name.clone());
        m.format = Some(DataFormat::JsonLines);
        let sink = if whole {
            BlockingSink::spawn_whole(stager.create(m)?, t.whole_dedup(stager))
        } else {
            BlockingSink::spawn_changes(stager.create(m)?, stager.dedup())
        };
        let names = column_names(t);
        let mut buf = Vec::with_capacity(BATCH + 64 * 1024);
        let doing = format!("reading {}", t.key());
        {
            let mut rows = sqlx::query(q(sql)).fetch(&mut self.conn);
            while let Some(row) = rows
                .try_next()
                .await
                .map_err(ExtractError::db_lazy(&doing))?
            {
                encode_row(&row, &names, &mut buf).map_err(ExtractError::db_lazy(&doing))?;
                if buf.len() >= BATCH {
                    sink.send(std::mem::take(&mut buf)).await?;
                }
            }
        }
        if let Some((sql, binds)) = deletes {
            let mut query = sqlx::query_scalar::<_, String>(q(sql));
            for b in binds {
                query = query.bind(b);
            }
            let mut keys = query.fetch(&mut self.conn);
            while let Some(key) = keys
                .try_next()
                .await
                .map_err(ExtractError::db_lazy(&doing))?
            {
                buf.extend_from_slice(b"{\"op\":\"delete\",\"key\":");
                buf.extend_from_slice(key.as_bytes());
                buf.extend_from_slice(b"}\n");
                if buf.len() >= BATCH {
                    sink.send(std::mem::take(&mut buf)).await?;
                }
            }
        }
        if !buf.is_empty() {
            sink.send(buf).await?;
        }
        if whole {
            return match sink.finish_whole().await? {
                Some(staged) => stager.send(staged).await,
                None => Ok(()),
            };
        }
        stager.send(sink.finish().await?).await
    }

    pub async fn partial(
        &mut self,
        tables: &[TableMeta],
        watermarks: &Watermarks,
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<Extracted, ExtractError> {
        if settings.capture_deletes {
            self.set_delete_capture(tables, true).await?;
        }
        sqlx::raw_sql("BEGIN")
            .execute(&mut self.conn)
            .await
            .map_err(ExtractError::db("starting the snapshot"))?;
        let result = self
            .partial_in_snapshot(tables, watermarks, settings, stager)
            .await;
        let ended = crate::extract::end_snapshot(&mut self.conn).await;
        for i in 0..tables.len() {
            let _ = sqlx::raw_sql(q(format!("DROP TABLE IF EXISTS temp.ferry_keys_{i}")))
                .execute(&mut self.conn)
                .await;
        }
        let out = result?;
        ended?;
        Ok(out)
    }

    async fn partial_in_snapshot(
        &mut self,
        tables: &[TableMeta],
        watermarks: &Watermarks,
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<Extracted, ExtractError> {
        let next = self.watermarks(tables, watermarks, settings).await?;
        let keys = |i: usize| format!("temp.ferry_keys_{i}");
        for (i, t) in tables.iter().enumerate() {
            if !keyed(t) {
                continue;
            }
            let pk = column_list(None, &t.info.primary_key);
            let name = t.info.name.quoted();
            let sql = format!(
                "DROP TABLE IF EXISTS {k};
                 CREATE TEMP TABLE ferry_keys_{i} AS SELECT {pk} FROM {name} WHERE 0;
                 CREATE UNIQUE INDEX temp.ferry_keys_{i}_pk ON ferry_keys_{i} ({pk});",
                k = keys(i)
            );
            sqlx::raw_sql(q(sql))
                .execute(&mut self.conn)
                .await
                .map_err(ExtractError::db(format!("preparing {}", t.key())))?;
            let Some((col, kind)) = &t.change else {
                continue;
            };
            let wm = watermarks.get(&t.key()).cloned().flatten();
            let c = quote_ident(col);
            let sql = format!("INSERT INTO {k} SELECT {pk} FROM {name}", k = keys(i));
            let query = match (&wm, kind) {
                (None, _) => sqlx::query(q(sql)),
                (Some(w), ChangeKind::Timestamp) => {
                    sqlx::query(q(format!("{sql} WHERE {c} >= ?"))).bind(w.clone())
                }
                (Some(w), ChangeKind::Number) => match w.parse::<i64>() {
                    Ok(n) => sqlx::query(q(format!("{sql} WHERE {c} >= ?"))).bind(n),
                    Err(_) => sqlx::query(q(format!("{sql} WHERE {c} >= ?")))
                        .bind(w.parse::<f64>().unwrap_or(f64::NEG_INFINITY)),
                },
            };
            query
                .execute(&mut self.conn)
                .await
                .map_err(ExtractError::db(format!(
                    "selecting changed rows of {}",
                    t.key()
                )))?;
        }
        let closure = closure_statements(
            tables,
            keys,
            |t| t.info.name.quoted(),
            "INSERT OR IGNORE INTO",
            "",
        );
        loop {
            let mut added = 0;
            for (sql, doing, _) in &closure {
                added += sqlx::query(q(sql.clone()))
                    .execute(&mut self.conn)
                    .await
                    .map_err(ExtractError::db_lazy(doing))?
                    .rows_affected();
            }
            if added == 0 {
                break;
            }
        }
        let has_log = settings.capture_deletes && self.has_log().await?;
        for (i, t) in tables.iter().enumerate() {
            let whole = t.carry == Carry::Whole;
            if !whole && !keyed(t) {
                continue;
            }
            let path = format!("data/{}.jsonl", t.info.name.file_stem());
            let cols = column_list(Some("t"), &column_names(t));
            let name = t.info.name.quoted();
            let sql = if whole {
                // In key order, so that an unchanged table fingerprints the same.
                let pk = column_list(Some("t"), &t.info.primary_key);
                format!("SELECT {cols} FROM {name} t ORDER BY {pk}")
            } else {
                format!(
                    "SELECT {cols} FROM {name} t JOIN {k} k ON {on}",
                    k = keys(i),
                    on = join_on("t", &t.info.primary_key, "k", &t.info.primary_key),
                )
            };
            let deletes = (has_log && t.change.is_some() && !whole).then(|| {
                let exists = t
                    .info
                    .primary_key
                    .iter()
                    .map(|c| {
                        // json_each, not a JSON path: a path cannot name a
                        // column whose name holds a double quote.
                        format!(
                            "t.{} = (SELECT j.value FROM json_each(d.key) j WHERE j.key = {})",
                            quote_ident(c),
                            quote_literal(c)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let since = watermarks
                    .get(DELETES_KEY)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "0".into());
                (
                    format!(
                        "SELECT DISTINCT d.key FROM {LOG} d
                         WHERE d.table_name = ? AND d.id > CAST(? AS INTEGER)
                           AND NOT EXISTS (SELECT 1 FROM {name} t WHERE {exists})",
                        name = t.info.name.quoted()
                    ),
                    vec![t.key(), since],
                )
            });
            self.export(t, path, sql, deletes, whole, stager).await?;
        }
        Ok(Extracted {
            watermarks: next,
            ..Default::default()
        })
    }

    pub async fn set_delete_capture(
        &mut self,
        tables: &[TableMeta],
        enabled: bool,
    ) -> Result<(), ExtractError> {
        let err = || {
            ExtractError::db(
                "setting up delete capture (the database file must be writable by the sender; or set `[partial] deletes = \"off\"`)",
            )
        };
        let existing: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, 21) = ?",
        )
        .bind(TRIGGER_PREFIX)
        .fetch_all(&mut self.conn)
        .await
        .map_err(err())?;
        let mut todo = Vec::new();
        for t in tables {
            // A delete, and an update that changes the key (the old key is gone
            // as surely as if the row had been deleted).
            let trigger = format!("{TRIGGER_PREFIX}{}", t.info.name.name);
            let key_trigger = format!("{trigger} (key update)");
            let wanted = enabled && t.change.is_some() && !t.info.primary_key.is_empty();
            let pk = &t.info.primary_key;
            let obj = pk
                .iter()
                .map(|c| format!("{}, OLD.{}", quote_literal(c), quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let log = format!(
                "INSERT INTO {LOG} (table_name, key) VALUES ({}, json_object({obj}));",
                quote_literal(&t.key())
            );
            for (name, when) in [
                (&trigger, "AFTER DELETE".to_owned()),
                (
                    &key_trigger,
                    format!(
                        "AFTER UPDATE OF {} ON {} WHEN {}",
                        pk.iter()
                            .map(|c| quote_ident(c))
                            .collect::<Vec<_>>()
                            .join(", "),
                        t.info.name.quoted(),
                        pk.iter()
                            .map(|c| format!("OLD.{0} IS NOT NEW.{0}", quote_ident(c)))
                            .collect::<Vec<_>>()
                            .join(" OR ")
                    ),
                ),
            ] {
                let has = existing.contains(name);
                if wanted && !has {
                    let on = if when == "AFTER DELETE" {
                        format!("AFTER DELETE ON {}", t.info.name.quoted())
                    } else {
                        when
                    };
                    todo.push(format!(
                        "CREATE TRIGGER {} {on} BEGIN {log} END",
                        quote_ident(name)
                    ));
                } else if !wanted && has {
                    todo.push(format!("DROP TRIGGER {}", quote_ident(name)));
                }
            }
        }
        if !enabled {
            for name in &existing {
                todo.push(format!("DROP TRIGGER IF EXISTS {}", quote_ident(name)));
            }
            todo.push(format!("DROP TABLE IF EXISTS {LOG}"));
        }
        if todo.is_empty() && (!enabled || self.has_log().await?) {
            return Ok(());
        }
        let mut tx = self.conn.begin().await.map_err(err())?;
        if enabled {
            sqlx::raw_sql(q(format!(
                "CREATE TABLE IF NOT EXISTS {LOG} (
                   id INTEGER PRIMARY KEY AUTOINCREMENT,
                   table_name TEXT NOT NULL,
                   key TEXT NOT NULL,
                   deleted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')))"
            )))
            .execute(&mut *tx)
            .await
            .map_err(err())?;
        }
        for sql in todo {
            sqlx::raw_sql(q(sql))
                .execute(&mut *tx)
                .await
                .map_err(err())?;
        }
        tx.commit().await.map_err(err())?;
        Ok(())
    }

    pub async fn prune_delete_log(
        &mut self,
        watermark: Option<&str>,
        retention: Duration,
    ) -> Result<u64, ExtractError> {
        let Some(wm) = watermark else { return Ok(0) };
        if !self.has_log().await? {
            return Ok(0);
        }
        let sql = format!(
            "DELETE FROM {LOG} WHERE id <= CAST(? AS INTEGER)
             AND deleted_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-{} seconds')",
            retention.as_secs()
        );
        Ok(sqlx::query(q(sql))
            .bind(wm)
            .execute(&mut self.conn)
            .await
            .map_err(ExtractError::db("pruning the delete log"))?
            .rows_affected())
    }
}

fn column_names(t: &TableMeta) -> Vec<String> {
    t.info.columns.iter().map(|c| c.name.clone()).collect()
}

/// Appends `{"op":"upsert","row":{…}}\n` for one row.
fn encode_row(row: &SqliteRow, names: &[String], out: &mut Vec<u8>) -> Result<(), sqlx::Error> {
    use std::io::Write;
    let json = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));
    out.extend_from_slice(b"{\"op\":\"upsert\",\"row\":{");
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, name).map_err(json)?;
        out.push(b':');
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            out.extend_from_slice(b"null");
            continue;
        }
        let type_name = raw.type_info().name().to_owned();
        match type_name.as_str() {
            "INTEGER" => {
                let v: i64 = row.try_get_unchecked(i)?;
                let _ = write!(out, "{v}");
            }
            "REAL" => {
                let v: f64 = row.try_get_unchecked(i)?;
                if v.is_finite() {
                    serde_json::to_writer(&mut *out, &v).map_err(json)?;
                } else if v > 0.0 {
                    out.extend_from_slice(b"9e999");
                } else {
                    out.extend_from_slice(b"-9e999");
                }
            }
            "BLOB" => {
                let v: Vec<u8> = row.try_get_unchecked(i)?;
                out.extend_from_slice(b"{\"$hex\":\"");
                out.extend_from_slice(hex::encode(v).as_bytes());
                out.extend_from_slice(b"\"}");
            }
            _ => {
                let v: String = row.try_get_unchecked(i)?;
                serde_json::to_writer(&mut *out, &v).map_err(json)?;
            }
        }
    }
    out.extend_from_slice(b"}}\n");
    Ok(())
}
