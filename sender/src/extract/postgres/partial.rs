//! A partial: the safe horizon, changed rows, foreign-key closure, deletes.

use super::{PgSource, q};
use crate::config::Carry;
use crate::extract::stage::{BATCH, BlockingSink, member};
use crate::extract::{
    DELETES_KEY, ExtractError, ExtractSettings, Extracted, Stager, TableMeta, Watermarks,
    closure_statements, column_list, join_on, keyed,
};
use ferry_common::ident::quote_ident;
use ferry_common::manifest::{DataFormat, Role};
use futures_util::TryStreamExt;
use sqlx::postgres::PgConnection;
use std::time::Duration;

impl PgSource {
    /// The safe horizon, as timestamptz text. Must run outside (before) the
    /// snapshot transaction.
    pub(super) async fn horizon(&mut self, overlap: Duration) -> Result<String, ExtractError> {
        if !self.can_see_all_sessions().await? {
            return Err(ExtractError::Selection(
                "the source user cannot see other sessions' transactions, so no safe watermark \
                 can be computed: run `GRANT pg_read_all_stats TO <ferry user>` on the source"
                    .into(),
            ));
        }
        sqlx::query_scalar(
            "SELECT (least(clock_timestamp(),
                      (SELECT min(xact_start) FROM pg_stat_activity
                       WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()
                         AND backend_type NOT IN ('autovacuum worker', 'autovacuum launcher',
                                                  'walsender')))
                     - make_interval(secs => $1))::text",
        )
        .bind(overlap.as_secs_f64())
        .fetch_one(&mut self.conn)
        .await
        .map_err(ExtractError::db("computing the safe horizon"))
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
        let horizon = self.horizon(settings.overlap).await?;
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut self.conn)
            .await
            .map_err(ExtractError::db("starting the snapshot"))?;
        let result = self
            .partial_in_snapshot(tables, watermarks, settings, stager)
            .await;
        let ended = crate::extract::end_snapshot(&mut self.conn).await;
        result?;
        ended?;
        let mut out = Watermarks::new();
        for t in tables.iter().filter(|t| t.change.is_some()) {
            out.insert(t.key(), Some(horizon.clone()));
        }
        out.insert(DELETES_KEY.into(), Some(horizon));
        Ok(Extracted {
            watermarks: out,
            ..Default::default()
        })
    }

    async fn partial_in_snapshot(
        &mut self,
        tables: &[TableMeta],
        watermarks: &Watermarks,
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<(), ExtractError> {
        let keys = |i: usize| format!("pg_temp.ferry_keys_{i}");
        // 1. The keys of changed rows, per table (and an empty set for each
        //    other keyed table, which step 2 may fill).
        let mut ranges: Vec<Option<(String, Option<String>)>> = vec![None; tables.len()];
        for (i, t) in tables.iter().enumerate() {
            if !keyed(t) {
                continue;
            }
            let pk = column_list(None, &t.info.primary_key);
            let name = t.info.name.quoted();
            let sql = format!(
                "CREATE TEMP TABLE {k} ON COMMIT DROP AS SELECT {pk} FROM {name} WITH NO DATA;
                 ALTER TABLE {k} ADD PRIMARY KEY ({pk})",
                k = keys(i)
            );
            sqlx::raw_sql(q(sql))
                .execute(&mut self.conn)
                .await
                .map_err(ExtractError::db(format!("preparing {}", t.key())))?;
            let Some((col, _)) = &t.change else { continue };
            // No watermark yet: every row. Otherwise an index range on the change column.
            let wm = watermarks.get(&t.key()).cloned().flatten();
            let filter = match wm {
                Some(_) => format!("WHERE {} >= $1::timestamptz", quote_ident(col)),
                None => "WHERE $1::text IS NULL".into(),
            };
            let sql = format!(
                "INSERT INTO {k} SELECT {pk} FROM {rows} {filter}",
                k = keys(i),
                rows = t.pg_rows()
            );
            sqlx::query(q(sql))
                .bind(wm.clone())
                .execute(&mut self.conn)
                .await
                .map_err(ExtractError::db(format!(
                    "selecting changed rows of {}",
                    t.key()
                )))?;
            ranges[i] = Some((filter, wm));
        }
        // 2. Rows the changed rows reference, until nothing new is added.
        let closure = closure_statements(
            tables,
            keys,
            TableMeta::pg_rows,
            "INSERT INTO",
            "ON CONFLICT DO NOTHING",
        );
        // Tables whose key set the closure added to: their rows are read by
        // key; the others' by the change column's range that selected them.
        let mut grown = std::collections::HashSet::new();
        loop {
            let mut added = 0;
            for (sql, doing, parent) in &closure {
                let n = sqlx::query(q(sql.clone()))
                    .execute(&mut self.conn)
                    .await
                    .map_err(ExtractError::db_lazy(doing))?
                    .rows_affected();
                if n > 0 {
                    grown.insert(*parent);
                }
                added += n;
            }
            if added == 0 {
                break;
            }
        }
        // Statistics for the key sets read by key below: a temporary table has
        // none, and the planner, guessing, joins thousands of keys to a large
        // table by scanning all of it.
        let analyze: Vec<String> = (0..tables.len())
            .filter(|&i| keyed(&tables[i]) && (grown.contains(&i) || ranges[i].is_none()))
            .map(|i| format!("ANALYZE {};", keys(i)))
            .collect();
        if !analyze.is_empty() {
            sqlx::raw_sql(q(analyze.concat()))
                .execute(&mut self.conn)
                .await
                .map_err(ExtractError::db("analyzing the changed keys"))?;
        }
        // 3. Export: upserts (whole rows) and deletes (keys), one JSON line each.
        for (i, t) in tables.iter().enumerate() {
            let whole = t.carry == Carry::Whole;
            if !whole && !keyed(t) {
                continue;
            }
            let path = format!("data/{}.jsonl", t.info.name.file_stem());
            let mut m = member(path, Role::Data);
            m.table = Some(t.info.name.clone());
            m.format = Some(DataFormat::JsonLines);
            let sink = if whole {
                BlockingSink::spawn_whole(stager.create(m)?, t.whole_dedup(stager))
            } else {
                BlockingSink::spawn_changes(stager.create(m)?, stager.dedup())
            };
            let json_cols = self.json_columns.get(&t.info.name);
            let select = t
                .info
                .columns
                .iter()
                .map(|c| {
                    if json_cols.is_some_and(|j| j.contains(&c.name)) {
                        format!("t.{0}::text AS {0}", quote_ident(&c.name))
                    } else {
                        format!("t.{}", quote_ident(&c.name))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            // `x.*` names the subquery's row even when the table has a column
            // `x` (a bare `x` would be that column); every other reference is
            // qualified, so no user identifier can capture one of ours.
            let by_range = ranges[i].as_ref().filter(|_| !whole && !grown.contains(&i));
            let from = if whole {
                // In key order, so that an unchanged table fingerprints the same.
                format!(
                    "{name} t ORDER BY {pk}",
                    name = t.pg_rows(),
                    pk = column_list(Some("t"), &t.info.primary_key)
                )
            } else if let Some((filter, _)) = by_range {
                // The key set is exactly the range step 1 read, in this same
                // snapshot: read it again by the change column's index. The
                // join by key costs three times as much (10,000 index probes),
                // or a scan of the whole table when the planner prefers one.
                format!("{name} t {filter}", name = t.pg_rows())
            } else {
                format!(
                    "{name} t JOIN {k} k ON {on}",
                    name = t.pg_rows(),
                    k = keys(i),
                    on = join_on("t", &t.info.primary_key, "k", &t.info.primary_key),
                )
            };
            let sql = format!(
                "SELECT '{{\"op\":\"upsert\",\"row\":' || row_to_json(x.*)::text || '}}'
                 FROM (SELECT {select} FROM {from}) x"
            );
            let query = sqlx::query_scalar(q(sql));
            let query = match by_range {
                Some((_, wm)) => query.bind(wm.clone()),
                None => query,
            };
            stream_lines(&mut self.conn, query, &sink, &t.key()).await?;
            if whole {
                if let Some(staged) = sink.finish_whole().await? {
                    stager.send(staged).await?;
                }
                continue;
            }
            if settings.capture_deletes && t.change.is_some() {
                let wm = watermarks.get(DELETES_KEY).cloned().flatten();
                let exists = t
                    .info
                    .primary_key
                    .iter()
                    .map(|c| {
                        format!(
                            "t.{0} = (jsonb_populate_record(NULL::{name}, d.key)).{0}",
                            quote_ident(c),
                            name = t.info.name.quoted()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let sql = format!(
                    "SELECT '{{\"op\":\"delete\",\"key\":' || k || '}}' FROM (
                       SELECT DISTINCT d.key::text AS k FROM ferry.deleted_rows d
                       WHERE d.table_name = $1 AND {since}
                         AND NOT EXISTS (SELECT 1 FROM {rows} t WHERE {exists})) x",
                    rows = t.pg_rows(),
                    since = if wm.is_some() {
                        "d.deleted_at >= $2::timestamptz"
                    } else {
                        "$2::text IS NULL"
                    },
                );
                let query = sqlx::query_scalar(q(sql)).bind(t.key()).bind(wm);
                stream_lines(&mut self.conn, query, &sink, &t.key()).await?;
            }
            stager.send(sink.finish().await?).await?;
        }
        Ok(())
    }
}

/// Streams a one-column text query into a sink, one line per row.
async fn stream_lines<'q>(
    conn: &mut PgConnection,
    query: sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>,
    sink: &BlockingSink,
    table: &str,
) -> Result<(), ExtractError> {
    let doing = format!("reading changes of {table}");
    let mut rows = query.fetch(conn);
    let mut buf = Vec::with_capacity(BATCH + 64 * 1024);
    while let Some(line) = rows
        .try_next()
        .await
        .map_err(ExtractError::db_lazy(&doing))?
    {
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if buf.len() >= BATCH {
            sink.send(std::mem::take(&mut buf)).await?;
        }
    }
    if !buf.is_empty() {
        sink.send(buf).await?;
    }
    Ok(())
}
