//! The PostgreSQL source.
//!
//! Complete: the horizon is read first (autocommit), then one connection opens a
//! `REPEATABLE READ` transaction and exports its snapshot; `jobs` more connections
//! and `pg_dump` (schema DDL) import it, so every table is read at the same instant.
//!
//! Partial: per table, rows with `change_column >= watermark`. The next watermark is
//! the *safe horizon*: the earlier of now and the start of the oldest transaction
//! still running (read from `pg_stat_activity` *before* the snapshot), minus the
//! configured overlap. A transaction that began before the horizon and commits after
//! the snapshot stamped its rows with `now()` = its start, which is at or after the
//! horizon, so the next partial still sees them. See docs/change-capture.md.

use super::select::CatalogTable;
use super::stage::{BATCH, BlockingSink, member, stage_text};
use super::{
    ChangeKind, DELETES_KEY, ExtractError, ExtractSettings, Extracted, Stager, TableMeta,
    Watermarks, column_list, join_on, partial_graph,
};
use crate::config::SourceConfig;
use ferry_common::TableName;
use ferry_common::ident::{quote_ident, quote_literal};
use ferry_common::manifest::{self, DataFormat, Role};
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRIGGER_NAME: &str = "ferry_capture_delete";
// Type oids: date, timestamp, timestamptz; json, json[].
const TIMESTAMP_OIDS: [i64; 3] = [1082, 1114, 1184];
const JSON_OIDS: [i64; 2] = [114, 199];

pub struct PgSource {
    conn: PgConnection,
    options: PgConnectOptions,
    url: String,
    pg_dump: PathBuf,
    timezone: String,
    version: String,
    /// Every table of the catalog (selected or not), from the last `catalog()`.
    all_tables: Vec<TableName>,
    /// Columns carried as text in JSON (json and json[]), by table.
    json_columns: HashMap<TableName, HashSet<String>>,
}

fn q(sql: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(sql)
}

impl PgSource {
    pub async fn connect(config: &SourceConfig) -> Result<Self, ExtractError> {
        let connect_err = |source| ExtractError::Connect {
            url: crate::config::redact_url(&config.url),
            source,
        };
        let options: PgConnectOptions = config.url.parse().map_err(connect_err)?;
        let options = options.application_name("ferry-sender");
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(connect_err)?;
        setup_session(&mut conn, &config.timezone).await?;
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut conn)
            .await
            .map_err(ExtractError::db("reading the server version"))?;
        Ok(Self {
            conn,
            options,
            url: config.url.clone(),
            pg_dump: config.pg_dump.clone(),
            timezone: config.timezone.clone(),
            version,
            all_tables: Vec::new(),
            json_columns: HashMap::new(),
        })
    }

    async fn connect_more(&self) -> Result<PgConnection, ExtractError> {
        let mut conn = PgConnection::connect_with(&self.options)
            .await
            .map_err(|source| ExtractError::Connect {
                url: crate::config::redact_url(&self.url),
                source,
            })?;
        setup_session(&mut conn, &self.timezone).await?;
        Ok(conn)
    }

    pub fn info(&self) -> manifest::Source {
        manifest::Source {
            engine: "postgresql".into(),
            version: self.version.clone(),
        }
    }

    /// The tables of the database (outside system schemas and ferry's own).
    pub async fn catalog(&mut self) -> Result<Vec<CatalogTable>, ExtractError> {
        let rows = sqlx::query(
            "SELECT c.oid::int8 AS oid, n.nspname::text AS schema, c.relname::text AS name,
                    greatest(c.relpages, 0)::int8 AS pages
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname NOT IN ('information_schema', 'ferry')
               AND n.nspname NOT LIKE 'pg\\_%'
             ORDER BY 2, 3",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("listing tables"))?;
        let mut tables: Vec<(i64, CatalogTable)> = Vec::new();
        for r in rows {
            let name = TableName::new(Some(r.get::<String, _>("schema").as_str()), r.get("name"));
            tables.push((
                r.get("oid"),
                CatalogTable {
                    info: manifest::Table {
                        name,
                        columns: vec![],
                        primary_key: vec![],
                        foreign_keys: vec![],
                        change_column: None,
                    },
                    change_kinds: HashMap::new(),
                    indexed_first: HashSet::new(),
                    size_hint: r.get("pages"),
                },
            ));
        }
        self.all_tables = tables.iter().map(|(_, t)| t.info.name.clone()).collect();
        let oids: Vec<i64> = tables.iter().map(|(o, _)| *o).collect();
        let by_oid: HashMap<i64, usize> = oids.iter().enumerate().map(|(i, o)| (*o, i)).collect();

        let cols = sqlx::query(
            "SELECT a.attrelid::int8 AS rel, a.attname::text AS name,
                    format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
                    a.attgenerated <> '' AS generated,
                    CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' END
                      AS identity,
                    (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END)::int8 AS base
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid::int8 = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attrelid, a.attnum",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading columns"))?;
        self.json_columns.clear();
        for r in cols {
            let t = &mut tables[by_oid[&r.get::<i64, _>("rel")]].1;
            let name: String = r.get("name");
            let base: i64 = r.get("base");
            if TIMESTAMP_OIDS.contains(&base) {
                t.change_kinds.insert(name.clone(), ChangeKind::Timestamp);
            }
            if JSON_OIDS.contains(&base) {
                self.json_columns
                    .entry(t.info.name.clone())
                    .or_default()
                    .insert(name.clone());
            }
            t.info.columns.push(manifest::Column {
                name,
                sql_type: r.get("type"),
                not_null: r.get("not_null"),
                generated: r.get("generated"),
                identity: r.get("identity"),
            });
        }

        let pks = sqlx::query(
            "SELECT i.indrelid::int8 AS rel, array_agg(a.attname::text ORDER BY k.ord) AS cols
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indisprimary AND i.indrelid::int8 = ANY($1)
             GROUP BY i.indrelid",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading primary keys"))?;
        for r in pks {
            tables[by_oid[&r.get::<i64, _>("rel")]].1.info.primary_key = r.get("cols");
        }

        let idx = sqlx::query(
            "SELECT DISTINCT i.indrelid::int8 AS rel, a.attname::text AS col
             FROM pg_index i JOIN pg_attribute a
               ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid::int8 = ANY($1)",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading indexes"))?;
        for r in idx {
            tables[by_oid[&r.get::<i64, _>("rel")]]
                .1
                .indexed_first
                .insert(r.get("col"));
        }

        let fks = sqlx::query(
            "SELECT c.conrelid::int8 AS rel, c.confrelid::int8 AS ref,
               (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM unnest(c.conkey) WITH ORDINALITY k(n, ord)
                  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n) AS cols,
               (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM unnest(c.confkey) WITH ORDINALITY k(n, ord)
                  JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n) AS refcols
             FROM pg_constraint c
             WHERE c.contype = 'f' AND c.conrelid::int8 = ANY($1)
             ORDER BY c.conname",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading foreign keys"))?;
        for r in fks {
            let Some(&pi) = by_oid.get(&r.get::<i64, _>("ref")) else {
                continue;
            };
            let references = tables[pi].1.info.name.clone();
            tables[by_oid[&r.get::<i64, _>("rel")]]
                .1
                .info
                .foreign_keys
                .push(manifest::ForeignKey {
                    columns: r.get("cols"),
                    references,
                    referenced_columns: r.get("refcols"),
                });
        }
        Ok(tables.into_iter().map(|(_, t)| t).collect())
    }

    /// Whether this session can see every session's transaction start (needed for
    /// a safe horizon): superuser or a member of `pg_read_all_stats`.
    pub async fn can_see_all_sessions(&mut self) -> Result<bool, ExtractError> {
        sqlx::query_scalar(
            "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
             FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(ExtractError::db("checking the role's privileges"))
    }

    /// The safe horizon, as timestamptz text. Must run outside (before) the
    /// snapshot transaction.
    async fn horizon(&mut self, overlap: Duration) -> Result<String, ExtractError> {
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
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
        result?;
        let mut watermarks = Watermarks::new();
        for t in tables.iter().filter(|t| t.change.is_some()) {
            watermarks.insert(t.key(), Some(horizon.clone()));
        }
        watermarks.insert(DELETES_KEY.into(), Some(horizon));
        Ok(Extracted { watermarks })
    }

    async fn complete_in_snapshot(
        &mut self,
        tables: &[TableMeta],
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<(), ExtractError> {
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut self.conn)
            .await
            .map_err(ExtractError::db("exporting the snapshot"))?;
        if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(ExtractError::Selection(format!(
                "unexpected snapshot id {snapshot:?}"
            )));
        }

        let pre = plain_sql(&self.pg_dump(&snapshot, tables, "pre-data").await?);
        stage_text(stager, "schema/pre-data.sql", Role::PreData, pre).await?;

        // Readers: `jobs` connections sharing the snapshot, largest tables first.
        let mut order: Vec<TableMeta> = tables.to_vec();
        order.sort_by_key(|t| std::cmp::Reverse(t.size_hint));
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
            readers.spawn(async move {
                loop {
                    let next = queue.lock().map(|mut q| q.pop_front()).ok().flatten();
                    let Some(table) = next else { break };
                    copy_table(&mut conn, &table, &stager).await?;
                }
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut conn).await;
                Ok::<(), ExtractError>(())
            });
        }
        let post = self.pg_dump(&snapshot, tables, "post-data");
        let post = post.await;
        while let Some(done) = readers.join_next().await {
            done.map_err(|e| ExtractError::WriterGone(format!("table reader failed: {e}")))??;
        }
        let post = plain_sql(&post?);
        stage_text(stager, "schema/post-data.sql", Role::PostData, post).await?;

        let sequences = self.sequences(tables).await?;
        stage_text(stager, "schema/sequences.sql", Role::Sequences, sequences).await
    }

    /// Runs pg_dump for one section with the exported snapshot, returning its SQL.
    async fn pg_dump(
        &self,
        snapshot: &str,
        tables: &[TableMeta],
        section: &str,
    ) -> Result<String, ExtractError> {
        let selected: HashSet<&TableName> = tables.iter().map(|t| &t.info.name).collect();
        let schemas: std::collections::BTreeSet<&str> = tables
            .iter()
            .filter_map(|t| t.info.name.schema.as_deref())
            .collect();
        let (url, password) = split_password(&self.url);
        let mut cmd = tokio::process::Command::new(&self.pg_dump);
        cmd.arg("--schema-only")
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg(format!("--section={section}"))
            .arg(format!("--snapshot={snapshot}"))
            .arg("--exclude-schema=ferry")
            .arg("--dbname")
            .arg(&url)
            .env("PGAPPNAME", "ferry-sender")
            .kill_on_drop(true);
        if let Some(pw) = password {
            cmd.env("PGPASSWORD", pw);
        }
        for s in &schemas {
            cmd.arg(format!("--schema={}", quote_ident(s)));
        }
        for t in &self.all_tables {
            if !selected.contains(t) && t.schema.as_deref().is_some_and(|s| schemas.contains(s)) {
                cmd.arg(format!("--exclude-table={}", t.quoted()));
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

    /// `setval` calls for the sequences in the dumped schemas, read now (sequences
    /// are not transactional; values at or past the snapshot are what we want).
    async fn sequences(&mut self, tables: &[TableMeta]) -> Result<String, ExtractError> {
        let schemas: Vec<String> = tables
            .iter()
            .filter_map(|t| t.info.name.schema.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows = sqlx::query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS seq,
                    pg_sequence_last_value(c.oid) AS v
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S' AND n.nspname = ANY($1) ORDER BY 1",
        )
        .bind(&schemas)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading sequence values"))?;
        let mut sql = String::new();
        for r in rows {
            if let Some(v) = r.get::<Option<i64>, _>("v") {
                sql.push_str(&format!(
                    "SELECT pg_catalog.setval({}, {v}, true);\n",
                    quote_literal(&r.get::<String, _>("seq"))
                ));
            }
        }
        Ok(sql)
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
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
        result?;
        let mut out = Watermarks::new();
        for t in tables.iter().filter(|t| t.change.is_some()) {
            out.insert(t.key(), Some(horizon.clone()));
        }
        out.insert(DELETES_KEY.into(), Some(horizon));
        Ok(Extracted { watermarks: out })
    }

    async fn partial_in_snapshot(
        &mut self,
        tables: &[TableMeta],
        watermarks: &Watermarks,
        settings: &ExtractSettings,
        stager: &Stager,
    ) -> Result<(), ExtractError> {
        let keys = |i: usize| format!("pg_temp.ferry_keys_{i}");
        // 1. The keys of changed rows, per table.
        for (i, t) in tables.iter().enumerate() {
            let Some((col, _)) = &t.change else { continue };
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
            // No watermark yet: every row. Otherwise an index range on the change column.
            let wm = watermarks.get(&t.key()).cloned().flatten();
            let filter = match wm {
                Some(_) => format!("WHERE {} >= $1::timestamptz", quote_ident(col)),
                None => "WHERE $1::text IS NULL".into(),
            };
            let sql = format!("INSERT INTO {k} SELECT {pk} FROM {name} {filter}", k = keys(i));
            sqlx::query(q(sql))
                .bind(wm)
                .execute(&mut self.conn)
                .await
                .map_err(ExtractError::db(format!("selecting changed rows of {}", t.key())))?;
        }
        // 2. Rows the changed rows reference, until nothing new is added.
        let edges = partial_graph(tables);
        loop {
            let mut added = 0;
            for (ci, pi, fk) in &edges {
                let (c, p) = (&tables[*ci], &tables[*pi]);
                let sql = format!(
                    "INSERT INTO {kp} SELECT DISTINCT {ppk} FROM {kc} kc
                     JOIN {cname} c ON {ckey}
                     JOIN {pname} p ON {fkjoin}
                     ON CONFLICT DO NOTHING",
                    kp = keys(*pi),
                    kc = keys(*ci),
                    ppk = column_list(Some("p"), &p.info.primary_key),
                    cname = c.info.name.quoted(),
                    pname = p.info.name.quoted(),
                    ckey = join_on("c", &c.info.primary_key, "kc", &c.info.primary_key),
                    fkjoin = join_on("p", &fk.referenced_columns, "c", &fk.columns),
                );
                added += sqlx::query(q(sql))
                    .execute(&mut self.conn)
                    .await
                    .map_err(ExtractError::db(format!(
                        "following foreign keys from {} to {}",
                        c.key(),
                        p.key()
                    )))?
                    .rows_affected();
            }
            if added == 0 {
                break;
            }
        }
        // 3. Export: upserts (whole rows) and deletes (keys), one JSON line each.
        for (i, t) in tables.iter().enumerate() {
            if t.change.is_none() {
                continue;
            }
            let path = format!("data/{}.jsonl", t.info.name.file_stem());
            let mut m = member(path, Role::Data);
            m.table = Some(t.info.name.clone());
            m.format = Some(DataFormat::JsonLines);
            let sink = BlockingSink::spawn_changes(stager.create(m)?, stager.dedup());
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
            let sql = format!(
                "SELECT '{{\"op\":\"upsert\",\"row\":' || row_to_json(x)::text || '}}'
                 FROM (SELECT {select} FROM {name} t JOIN {k} k ON {on}) x",
                name = t.info.name.quoted(),
                k = keys(i),
                on = join_on("t", &t.info.primary_key, "k", &t.info.primary_key),
            );
            stream_lines(&mut self.conn, sqlx::query_scalar(q(sql)), &sink, &t.key()).await?;
            if settings.capture_deletes {
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
                         AND NOT EXISTS (SELECT 1 FROM {name} t WHERE {exists})) x",
                    name = t.info.name.quoted(),
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

    /// Installs the delete log and a trigger on every partial table with a primary
    /// key (only where missing), or removes all of it when `enabled` is false.
    pub async fn set_delete_capture(
        &mut self,
        tables: &[TableMeta],
        enabled: bool,
    ) -> Result<(), ExtractError> {
        let err = || ExtractError::db("setting up delete capture (the source user needs CREATE on the database and ownership of the tables; or set `[partial] deletes = \"off\"`)");
        let existing: Vec<String> = sqlx::query_scalar(
            "SELECT n.nspname || '.' || c.relname FROM pg_trigger g
             JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE g.tgname = $1",
        )
        .bind(TRIGGER_NAME)
        .fetch_all(&mut self.conn)
        .await
        .map_err(err())?;
        let mut tx = self.conn.begin().await.map_err(err())?;
        if enabled {
            sqlx::raw_sql(
                "CREATE SCHEMA IF NOT EXISTS ferry;
                 CREATE TABLE IF NOT EXISTS ferry.deleted_rows (
                   id bigserial PRIMARY KEY,
                   table_name text NOT NULL,
                   key jsonb NOT NULL,
                   deleted_at timestamptz NOT NULL DEFAULT now());
                 CREATE INDEX IF NOT EXISTS deleted_rows_deleted_at
                   ON ferry.deleted_rows (deleted_at);
                 CREATE OR REPLACE FUNCTION ferry.capture_delete() RETURNS trigger
                 LANGUAGE plpgsql AS $f$
                 BEGIN
                   INSERT INTO ferry.deleted_rows (table_name, key)
                   SELECT TG_ARGV[0], jsonb_object_agg(k, to_jsonb(OLD) -> k)
                   FROM unnest(TG_ARGV[1:TG_NARGS - 1]) AS k;
                   RETURN OLD;
                 END $f$;",
            )
            .execute(&mut *tx)
            .await
            .map_err(err())?;
        }
        for t in tables {
            let wanted = enabled && t.change.is_some() && !t.info.primary_key.is_empty();
            let has = existing.contains(&t.key());
            if wanted && !has {
                let args = std::iter::once(t.key())
                    .chain(t.info.primary_key.iter().cloned())
                    .map(|a| quote_literal(&a))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!(
                    "CREATE TRIGGER {TRIGGER_NAME} AFTER DELETE ON {} FOR EACH ROW \
                     EXECUTE FUNCTION ferry.capture_delete({args})",
                    t.info.name.quoted()
                );
                sqlx::raw_sql(q(sql)).execute(&mut *tx).await.map_err(err())?;
                tracing::info!(table = %t.key(), "delete capture installed");
            } else if !wanted && has {
                let sql = format!("DROP TRIGGER {TRIGGER_NAME} ON {}", t.info.name.quoted());
                sqlx::raw_sql(q(sql)).execute(&mut *tx).await.map_err(err())?;
                tracing::info!(table = %t.key(), "delete capture removed");
            }
        }
        if !enabled {
            // Triggers on tables no longer selected, then the log itself.
            for key in &existing {
                if let Some((s, n)) = key.split_once('.') {
                    let sql = format!(
                        "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {}",
                        TableName::new(Some(s), n).quoted()
                    );
                    sqlx::raw_sql(q(sql)).execute(&mut *tx).await.map_err(err())?;
                }
            }
            sqlx::raw_sql("DROP SCHEMA IF EXISTS ferry CASCADE")
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
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('ferry.deleted_rows') IS NOT NULL")
                .fetch_one(&mut self.conn)
                .await
                .map_err(ExtractError::db("pruning the delete log"))?;
        if !exists {
            return Ok(0);
        }
        Ok(sqlx::query(
            "DELETE FROM ferry.deleted_rows
             WHERE deleted_at < $1::timestamptz - make_interval(secs => $2)",
        )
        .bind(wm)
        .bind(retention.as_secs_f64())
        .execute(&mut self.conn)
        .await
        .map_err(ExtractError::db("pruning the delete log"))?
        .rows_affected())
    }

    /// The number of rows in the delete log (for status and tests).
    pub async fn delete_log_len(&mut self) -> Result<i64, ExtractError> {
        sqlx::query_scalar(
            "SELECT CASE WHEN to_regclass('ferry.deleted_rows') IS NULL THEN 0
                    ELSE (SELECT count(*) FROM ferry.deleted_rows) END",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(ExtractError::db("counting the delete log"))
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
        .map(|l| match l.strip_prefix("CREATE SCHEMA ") {
            // The receiver's database may have the schema already (always `public`).
            Some(rest) if !rest.starts_with("IF NOT EXISTS") => {
                format!("CREATE SCHEMA IF NOT EXISTS {rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect()
}

async fn setup_session(conn: &mut PgConnection, timezone: &str) -> Result<(), ExtractError> {
    let sql = format!(
        "SET statement_timeout = 0; SET lock_timeout = '60s';
         SET idle_in_transaction_session_timeout = 0; SET IntervalStyle = 'postgres';
         SET TimeZone = {}",
        quote_literal(timezone)
    );
    sqlx::raw_sql(q(sql))
        .execute(conn)
        .await
        .map_err(ExtractError::db(format!(
            "setting up the session (is `source.timezone` = {timezone:?} a valid time zone?)"
        )))?;
    Ok(())
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

/// COPY one table into one or more staged members.
async fn copy_table(
    conn: &mut PgConnection,
    table: &TableMeta,
    stager: &Stager,
) -> Result<(), ExtractError> {
    let started = std::time::Instant::now();
    let new_part = |part: u32| -> Result<BlockingSink, ExtractError> {
        let mut m = member(copy_part_path(&table.info.name, part), Role::Data);
        m.table = Some(table.info.name.clone());
        m.format = Some(DataFormat::PgCopyText);
        Ok(BlockingSink::spawn(stager.create(m)?, true))
    };
    let mut part = 1;
    let mut sink = new_part(part)?;
    let mut in_part = 0usize;
    let mut rows = 0u64;
    let sql = format!("COPY {} TO STDOUT", table.info.name.quoted());
    let doing = format!("reading {}", table.key());
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
        if in_part + buf.len() > PART_BYTES && in_part > 0 && !done {
            // Close this part at the last row boundary; the rest starts the next.
            let cut = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let rest = buf.split_off(cut);
            sink.send(std::mem::replace(&mut buf, rest)).await?;
            let staged = sink.finish().await?;
            rows += staged.member.rows.unwrap_or(0);
            stager.send(staged).await?;
            part += 1;
            sink = new_part(part)?;
            in_part = 0;
        }
        in_part += buf.len();
        if !buf.is_empty() {
            sink.send(std::mem::replace(&mut buf, Vec::with_capacity(BATCH + 64 * 1024)))
                .await?;
        }
        if done {
            break;
        }
    }
    drop(stream);
    let staged = sink.finish().await?;
    rows += staged.member.rows.unwrap_or(0);
    stager.send(staged).await?;
    tracing::info!(
        table = %table.key(),
        rows,
        parts = part,
        ms = started.elapsed().as_millis() as u64,
        "table read"
    );
    Ok(())
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

/// Splits the password out of a connection URL (so that it reaches pg_dump through
/// `PGPASSWORD`, not its command line).
fn split_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let at = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(at);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, pw)) => (
                format!("{scheme}://{user}@{host}{tail}"),
                Some(percent_decode(pw)),
            ),
            None => (url.to_owned(), None),
        },
        None => (url.to_owned(), None),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        let dump = "\\restrict abc\nCREATE TABLE t ();\nCREATE TRIGGER ferry_capture_delete AFTER DELETE ON t;\n\\unrestrict abc\n";
        assert_eq!(plain_sql(dump), "CREATE TABLE t ();\n");
    }

    #[test]
    fn password_leaves_the_url() {
        assert_eq!(
            split_password("postgres://u:p%40ss@h:5432/db?sslmode=disable"),
            (
                "postgres://u@h:5432/db?sslmode=disable".to_owned(),
                Some("p@ss".to_owned())
            )
        );
        assert_eq!(split_password("postgres://u@h/db").1, None);
    }
}
