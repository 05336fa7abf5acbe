//! A complete: one exported snapshot shared by `jobs` COPY readers and pg_dump.

use super::framing::{BINARY_HEADER, BINARY_TRAILER, Framing};
use super::{PgSource, TRIGGER_NAME, q, split_password};
use crate::extract::col;
use crate::extract::stage::{BATCH, BlockingSink, member, stage_text};
use crate::extract::{
    DELETES_KEY, ExtractError, ExtractSettings, Extracted, Stager, TableMeta, Watermarks,
};
use ferry_common::TableName;
use ferry_common::ident::{quote_ident, quote_literal};
use ferry_common::manifest::{DataFormat, Member, Role};
use futures_util::TryStreamExt;
use sqlx::postgres::PgConnection;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

impl PgSource {
    pub async fn complete(
        &mut self,
        tables: &[TableMeta],
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<Extracted, ExtractError> {
        if settings.capture_deletes {
            self.set_delete_capture(tables, true).await?;
        }
        let horizon = self.horizon(settings.overlap).await?;
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut self.conn)
            .await
            .map_err(ExtractError::db("starting the snapshot"))?;
        // Whatever happens inside, the exporting transaction ends here.
        let result = self.complete_in_snapshot(tables, settings, stager).await;
        let ended = crate::extract::end_snapshot(&mut self.conn).await;
        let (snapshot_xmin, carried, catalog_prints) = result?;
        ended?;
        let mut watermarks = Watermarks::new();
        for t in tables.iter().filter(|t| t.change.is_some()) {
            watermarks.insert(t.key(), Some(horizon.clone()));
        }
        watermarks.insert(DELETES_KEY.into(), Some(horizon));
        Ok(Extracted {
            watermarks,
            snapshot_xmin: Some(snapshot_xmin),
            carried,
            catalog_prints,
        })
    }

    /// Returns the snapshot's horizon, the members carried from earlier
    /// completes, and every table's catalog print.
    async fn complete_in_snapshot(
        &mut self,
        tables: &[TableMeta],
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<(u64, Vec<Member>, std::collections::HashMap<String, String>), ExtractError> {
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut self.conn)
            .await
            .map_err(ExtractError::db("exporting the snapshot"))?;
        // The snapshot's horizon (the oldest transaction it does not see) and
        // its end (the first transaction id it does not know).
        let (xmin, xmax): (i64, i64) = sqlx::query_as(
            "SELECT txid_snapshot_xmin(s)::bigint, txid_snapshot_xmax(s)::bigint
             FROM txid_current_snapshot() s",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading the snapshot's horizon"))?;
        let carried = Arc::new(Mutex::new(Vec::new()));
        let prints = Arc::new(Mutex::new(std::collections::HashMap::new()));
        if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(ExtractError::Selection(format!(
                "unexpected snapshot id {snapshot:?}"
            )));
        }

        // Both DDL sections go before the data: a receiver can then build each
        // table's indexes as soon as that table's data is in.
        let (pre, post) = tokio::join!(
            self.pg_dump(&snapshot, tables, "pre-data"),
            self.pg_dump(&snapshot, tables, "post-data")
        );
        let (pre, post) = (plain_sql(&pre?), plain_sql(&post?));
        stage_text(stager, "schema/pre-data.sql", Role::PreData, pre).await?;
        stage_text(stager, "schema/post-data.sql", Role::PostData, post).await?;

        // Readers: `jobs` connections sharing the snapshot, largest tables
        // first; tables that may be carried last (their test is one scan,
        // much cheaper than a dump, and a dump started early ends early).
        let mut order: Vec<TableMeta> = tables.to_vec();
        order.sort_by_key(|t| {
            (
                settings.carry.contains_key(&t.key()),
                std::cmp::Reverse(t.size_hint),
            )
        });
        let queue = Arc::new(Mutex::new(VecDeque::from(order)));
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..settings.jobs.min(tables.len()).max(1) {
            let mut conn = self.connect_more().await?;
            let begin = format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&snapshot)
            );
            sqlx::raw_sql(q(begin))
                .execute(&mut conn)
                .await
                .map_err(ExtractError::db("importing the snapshot"))?;
            let queue = queue.clone();
            let stager = stager.clone();
            let binary = settings.binary_copy;
            let (carry, carried) = (settings.carry.clone(), carried.clone());
            let (prints, prints_before) = (prints.clone(), settings.catalog_prints.clone());
            readers.spawn(async move {
                loop {
                    let next = queue.lock().map(|mut q| q.pop_front()).ok().flatten();
                    let Some(table) = next else { break };
                    if let Some(home) = carry.get(&table.key()) {
                        let expected = prints_before.get(&table.key());
                        let (same, print) =
                            unchanged(&mut conn, &table, home, expected, xmax as u64).await?;
                        if same {
                            if let Ok(mut c) = carried.lock() {
                                c.extend(home.iter().cloned());
                            }
                            if let Ok(mut p) = prints.lock() {
                                p.insert(table.key(), print);
                            }
                            continue;
                        }
                    }
                    copy_table(&mut conn, &table, &stager, binary).await?;
                    // After the COPY, under its lock: what the next complete compares.
                    let print = catalog_print(&mut conn, &table).await?;
                    if let Ok(mut p) = prints.lock() {
                        p.insert(table.key(), print);
                    }
                }
                crate::extract::end_snapshot(&mut conn).await
            });
        }
        while let Some(done) = readers.join_next().await {
            done.map_err(|e| ExtractError::WriterGone(format!("table reader failed: {e}")))??;
        }

        let sequences = self.sequences(tables).await?;
        stage_text(stager, "schema/sequences.sql", Role::Sequences, sequences).await?;
        let carried = std::mem::take(&mut *carried.lock().unwrap_or_else(|p| p.into_inner()));
        let prints = std::mem::take(&mut *prints.lock().unwrap_or_else(|p| p.into_inner()));
        Ok((xmin as u64, carried, prints))
    }

    /// See [`crate::extract::Source::change_counters`].
    pub async fn change_counters(
        &mut self,
        tables: &[TableMeta],
    ) -> Result<std::collections::HashMap<String, i64>, ExtractError> {
        let schemas: Vec<String> = tables
            .iter()
            .map(|t| t.info.name.schema.clone().unwrap_or_default())
            .collect();
        let names: Vec<String> = tables.iter().map(|t| t.info.name.name.clone()).collect();
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT s.schemaname::text, s.relname::text,
                    (s.n_tup_ins + s.n_tup_upd + s.n_tup_del)::bigint
             FROM pg_stat_all_tables s
             JOIN unnest($1::text[], $2::text[]) AS sel(schema, name)
               ON sel.schema = s.schemaname AND sel.name = s.relname",
        )
        .bind(&schemas)
        .bind(&names)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading table statistics"))?;
        Ok(rows
            .into_iter()
            .map(|(s, n, c)| (TableName::new(Some(&s), &n).to_string(), c))
            .collect())
    }

    /// Runs pg_dump for one section with the exported snapshot, returning its SQL.
    async fn pg_dump(
        &self,
        snapshot: &str,
        tables: &[TableMeta],
        section: &str,
    ) -> Result<String, ExtractError> {
        let selected: HashSet<&TableName> = tables.iter().map(|t| &t.info.name).collect();
        let partitions = |t: &TableName| self.partitions.get(t).into_iter().flatten();
        // A partition may live in another schema than its table.
        let schemas: std::collections::BTreeSet<&str> = tables
            .iter()
            .flat_map(|t| std::iter::once(&t.info.name).chain(partitions(&t.info.name)))
            .filter_map(|t| t.schema.as_deref())
            .collect();
        let (url, password) = split_password(&self.url);
        let mut cmd = tokio::process::Command::new(&self.pg_dump);
        cmd.arg("--schema-only")
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg(format!("--section={section}"))
            // Pre-data starts with `DROP … IF EXISTS` for every object it creates,
            // so a receiver can replace a previous copy in one transaction.
            .args(if section == "pre-data" {
                &["--clean", "--if-exists"][..]
            } else {
                &[][..]
            })
            .arg(format!("--snapshot={snapshot}"))
            .arg("--dbname")
            .arg(&url)
            .env("PGAPPNAME", "ferry-sender")
            .kill_on_drop(true);
        if let Some(pw) = password {
            cmd.env("PGPASSWORD", pw);
        }
        // Only the selected tables' schemas: ferry-sender's own `ferry` schema is
        // never among them (the catalog leaves it out), an application schema
        // that happens to be named `ferry` is when its tables are selected.
        for s in &schemas {
            cmd.arg(format!("--schema={}", quote_ident(s)));
        }
        // A table left out takes its partitions along (pg_dump before 16 does
        // not: their DDL would name the missing table).
        for t in &self.all_tables {
            if !selected.contains(t) && t.schema.as_deref().is_some_and(|s| schemas.contains(s)) {
                for t in std::iter::once(t).chain(partitions(t)) {
                    cmd.arg(format!("--exclude-table={}", t.quoted()));
                }
            }
        }
        let out = cmd.output().await.map_err(|e| ExtractError::PgDump {
            what: section.into(),
            message: format!(
                "could not run {}: {e}; install the PostgreSQL client (postgresql-client) or \
                 set `source.pg_dump`",
                self.pg_dump.display()
            ),
        })?;
        if !out.status.success() {
            return Err(ExtractError::PgDump {
                what: section.into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        String::from_utf8(out.stdout).map_err(|e| ExtractError::PgDump {
            what: section.into(),
            message: format!("output is not UTF-8: {e}"),
        })
    }

    /// `setval` calls for exactly the sequences the selected tables own (serial,
    /// identity) or use in a column default, read now (sequences are not
    /// transactional; values at or past the snapshot are what we want). A
    /// sequence of an unselected table is not in the bundle's DDL, and a
    /// `setval` for it would fail the load on the receiver.
    async fn sequences(&mut self, tables: &[TableMeta]) -> Result<String, ExtractError> {
        let schemas: Vec<String> = tables
            .iter()
            .map(|t| t.info.name.schema.clone().unwrap_or_default())
            .collect();
        let names: Vec<String> = tables.iter().map(|t| t.info.name.name.clone()).collect();
        let rows = sqlx::query(
            "WITH t AS (
               SELECT c.oid FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN unnest($1::text[], $2::text[]) AS sel(schema, name)
                 ON sel.schema = n.nspname AND sel.name = c.relname)
             SELECT quote_ident(n.nspname) || '.' || quote_ident(s.relname) AS seq,
                    pg_sequence_last_value(s.oid) AS v
             FROM pg_class s JOIN pg_namespace n ON n.oid = s.relnamespace
             WHERE s.relkind = 'S' AND (
               EXISTS (SELECT 1 FROM pg_depend d
                       WHERE d.classid = 'pg_class'::regclass AND d.objid = s.oid
                         AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                         AND d.refobjid IN (SELECT oid FROM t))
               OR EXISTS (SELECT 1 FROM pg_depend d
                          JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass
                                            AND d.objid = ad.oid
                          WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = s.oid
                            AND ad.adrelid IN (SELECT oid FROM t)))
             ORDER BY 1",
        )
        .bind(&schemas)
        .bind(&names)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading sequence values"))?;
        let mut sql = String::new();
        for r in rows {
            if let Some(v) = col::<Option<i64>, _>(&r, "v")? {
                sql.push_str(&format!(
                    "SELECT pg_catalog.setval({}, {v}, true);\n",
                    quote_literal(&col::<String, _>(&r, "seq")?)
                ));
            }
        }
        Ok(sql)
    }
}

/// pg_dump's output as plain SQL for any client: without psql's `\restrict` /
/// `\unrestrict` meta-commands (pg_dump 15.14+), and without ferry's own
/// delete-capture triggers, which must not exist on a receiver.
fn plain_sql(dump: &str) -> String {
    let ours = format!("CREATE TRIGGER {TRIGGER_NAME} ");
    dump.lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .filter(|l| !l.starts_with(&ours))
        // A schema holds more than the selected tables: never drop it.
        .filter(|l| !l.starts_with("DROP SCHEMA "))
        .map(|l| match l.strip_prefix("CREATE SCHEMA ") {
            // The receiver's database may have the schema already (always `public`).
            Some(rest) if !rest.starts_with("IF NOT EXISTS") => {
                format!("CREATE SCHEMA IF NOT EXISTS {rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect()
}

/// Whether `table` certainly holds, in this snapshot (whose end is `xmax`),
/// exactly the rows of the earlier complete whose members are `home`.
///
/// The test, one scan of the table reading only each row version's `xmin`:
/// every visible row version was written by a transaction older than the
/// earlier snapshot's horizon (so it was visible to that snapshot too: it was
/// committed before it, and is not deleted now), and there are as many as that
/// complete dumped (so none was deleted since). An insert, an update (a new
/// version), a delete, a TRUNCATE, a COPY, whatever the session settings or
/// triggers, leaves a newer `xmin` or a lower count. Ages are exact for
/// every version younger than 2^31 transactions, which all versions the test
/// must catch are (it refuses when the earlier horizon is 2^30 or more
/// transactions back); a frozen version is as old as can be, and an ancient
/// one whose age wrapped can only look newer, never older, than it is.
async fn unchanged(
    conn: &mut PgConnection,
    table: &TableMeta,
    home: &[Member],
    expected_print: Option<&String>,
    xmax: u64,
) -> Result<(bool, String), ExtractError> {
    let Some(since) = home.first().and_then(|m| m.carried.as_ref()) else {
        return Ok((false, catalog_print(conn, table).await?));
    };
    if xmax
        .checked_sub(since.xmin)
        .is_none_or(|span| span >= 1 << 30)
    {
        return Ok((false, catalog_print(conn, table).await?));
    }
    let rows: u64 = home.iter().filter_map(|m| m.rows).sum();
    let started = std::time::Instant::now();
    // `age()` counts back from one transaction id, the same for every row
    // and for the horizon within this transaction: a version is newer than
    // the horizon exactly when its age is at most the horizon's. The
    // horizon's age is taken once and bound as a number: written into the
    // scan, `age()` of it ran again for every row (40% of the scan's time).
    let checking = || format!("checking {} for changes", table.key());
    let horizon_age: i32 = sqlx::query_scalar("SELECT age($1::text::xid)")
        .bind((since.xmin % (1 << 32)).to_string())
        .fetch_one(&mut *conn)
        .await
        .map_err(ExtractError::db_lazy(&checking()))?;
    let sql = format!(
        "SELECT count(*) AS n, count(*) FILTER (WHERE age(xmin) <= $1) AS newer FROM ONLY {}",
        table.info.name.quoted()
    );
    let (n, newer): (i64, i64) = sqlx::query_as(q(sql))
        .bind(horizon_age)
        .fetch_one(&mut *conn)
        .await
        .map_err(ExtractError::db_lazy(&checking()))?;
    // The scan holds the table's lock: what the catalog says now holds for
    // what was read. A column dropped and added again under the same name and
    // type, or an enum label renamed, changes data without writing a row.
    let print = catalog_print(conn, table).await?;
    // A partitioned table's rows move with ATTACH and DETACH, which write
    // none: never carried.
    let partitioned = print.starts_with("p|");
    let same = n as u64 == rows && newer == 0 && expected_print == Some(&print) && !partitioned;
    tracing::info!(
        table = %table.key(),
        since = since.seq.0,
        rows = n,
        newer_versions = newer,
        catalog_same = expected_print == Some(&print),
        carried = same,
        ms = started.elapsed().as_millis() as u64,
        "{}",
        if same {
            "table unchanged since that complete: carried, not dumped"
        } else {
            "table changed since that complete: dumped"
        }
    );
    Ok((same, print))
}

/// What the catalog says of a table's rows beyond its described columns: its
/// kind, each column's number, name, type and modifier, the labels of the
/// enums it uses (directly, as an array's element, or under a domain), and
/// the relation's file (a rewrite, TRUNCATE or VACUUM FULL makes a new one). Taken
/// at every complete (with the table's lock held) for the next one's test.
async fn catalog_print(conn: &mut PgConnection, table: &TableMeta) -> Result<String, ExtractError> {
    sqlx::query_scalar(
        "SELECT c.relkind::text || '|' || c.relfilenode::text || '|' || coalesce(string_agg(
                  a.attnum || ':' || a.attname || ':' || a.atttypid || ':' || a.atttypmod || ':' ||
                  coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumtypid, e.enumsortorder)
                            FROM pg_enum e
                            WHERE e.enumtypid IN (a.atttypid, t.typelem, t.typbasetype)), ''),
                  ';' ORDER BY a.attnum), '')
         FROM pg_class c
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         JOIN pg_type t ON t.oid = a.atttypid
         WHERE c.oid = $1::regclass
         GROUP BY c.relkind, c.relfilenode",
    )
    .bind(table.info.name.quoted())
    .fetch_one(&mut *conn)
    .await
    .map_err(ExtractError::db_lazy(&format!(
        "reading the catalog of {}",
        table.key()
    )))
}

/// Bytes after which a table's COPY data continues in a new member (a *part*), so
/// that the bundle writer can compress one part while the next is being read.
pub const PART_BYTES: usize = 32 << 20;

/// The member path of a table's COPY data, part 1, 2, …: `data/<t>.copy`, then
/// `data/<t>.copy.000002`, … (in name order, which is load order).
pub fn copy_part_path(table: &TableName, part: u32) -> String {
    match part {
        1 => format!("data/{}.copy", table.file_stem()),
        n => format!("data/{}.copy.{n:06}", table.file_stem()),
    }
}

/// COPY one table into one or more staged members, each holding whole rows (and,
/// binary, a whole COPY stream of its own).
async fn copy_table(
    conn: &mut PgConnection,
    table: &TableMeta,
    stager: &Stager,
    binary: bool,
) -> Result<(), ExtractError> {
    let started = std::time::Instant::now();
    let new_part = |part: u32| -> Result<BlockingSink, ExtractError> {
        let mut m = member(copy_part_path(&table.info.name, part), Role::Data);
        m.table = Some(table.info.name.clone());
        m.format = Some(if binary {
            DataFormat::PgCopyBinary
        } else {
            DataFormat::PgCopyText
        });
        Ok(BlockingSink::spawn(stager.create(m)?))
    };
    let doing = format!("reading {}", table.key());
    let mut framing = Framing::new(binary);
    let mut part = 1;
    let mut sink = Part::open(new_part(part)?, binary).await?;
    let mut rows = 0u64;
    // A partitioned table's rows are read through it: `COPY` of the table
    // itself is refused, and its partitions are not listed as tables.
    let from = if table.partitions.is_some() {
        format!("(SELECT * FROM {})", table.info.name.quoted())
    } else {
        table.info.name.quoted()
    };
    let sql = match binary {
        true => format!("COPY {from} TO STDOUT (FORMAT binary)"),
        false => format!("COPY {from} TO STDOUT"),
    };
    let mut stream = conn
        .copy_out_raw(&sql)
        .await
        .map_err(ExtractError::db_lazy(&doing))?;
    let mut buf = Vec::with_capacity(BATCH + 64 * 1024);
    loop {
        let chunk = stream
            .try_next()
            .await
            .map_err(ExtractError::db_lazy(&doing))?;
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            buf.extend_from_slice(&chunk);
        }
        if buf.len() < BATCH && !done {
            continue;
        }
        // Only whole rows go into a part; the rest waits for the next chunks.
        let whole = framing
            .scan(&buf, done)
            .map_err(|e| ExtractError::Selection(format!("{doing}: unexpected COPY data: {e}")))?;
        let mut rest = Vec::with_capacity(BATCH + 64 * 1024);
        rest.extend_from_slice(&buf[whole.end + whole.trailer..]);
        buf.truncate(whole.end);
        buf.drain(..whole.skip);
        let rows_out = std::mem::replace(&mut buf, rest);
        if sink.bytes + rows_out.len() > PART_BYTES && sink.bytes > 0 {
            rows += sink.close(stager).await?;
            part += 1;
            sink = Part::open(new_part(part)?, binary).await?;
        }
        sink.rows += whole.rows;
        sink.bytes += rows_out.len();
        if !rows_out.is_empty() {
            sink.sink.send(rows_out).await?;
        }
        if done {
            break;
        }
    }
    drop(stream);
    rows += sink.close(stager).await?;
    tracing::info!(
        table = %table.key(),
        rows,
        parts = part,
        ms = started.elapsed().as_millis() as u64,
        "table read"
    );
    Ok(())
}

/// One part being staged, with its rows; binary parts are whole COPY streams
/// (header first, trailer last).
struct Part {
    sink: BlockingSink,
    binary: bool,
    bytes: usize,
    rows: u64,
}

impl Part {
    async fn open(sink: BlockingSink, binary: bool) -> Result<Self, ExtractError> {
        if binary {
            sink.send(BINARY_HEADER.to_vec()).await?;
        }
        Ok(Self {
            sink,
            binary,
            bytes: 0,
            rows: 0,
        })
    }

    /// Finishes the part, hands it to the bundle writer; returns its rows.
    async fn close(self, stager: &Stager) -> Result<u64, ExtractError> {
        if self.binary {
            self.sink.send(BINARY_TRAILER.to_vec()).await?;
        }
        let mut staged = self.sink.finish().await?;
        staged.member.rows = Some(self.rows);
        stager.send(staged).await?;
        Ok(self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_become_plain_sql() {
        assert_eq!(
            plain_sql("CREATE SCHEMA public;\n"),
            "CREATE SCHEMA IF NOT EXISTS public;\n"
        );
        assert_eq!(plain_sql("DROP SCHEMA IF EXISTS public;\n"), "");
        let dump = "\\restrict abc\nCREATE TABLE t ();\nCREATE TRIGGER ferry_capture_delete AFTER DELETE ON t;\n\\unrestrict abc\n";
        assert_eq!(plain_sql(dump), "CREATE TABLE t ();\n");
    }
}
