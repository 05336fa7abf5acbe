//! Change files: one applied partial's changes as Parquet, for a warehouse
//! that merges rather than reloads. Per table, one file whose rows are the
//! partial's change lines in order: `_ferry_seq` (the bundle's seq),
//! `_ferry_op` (`upsert` or `delete`), then the table's columns as the
//! target defines them (a delete carries its key; the other columns are
//! null). A warehouse applies a change set's upserts, then its deletes (as the
//! receiver did), sets in seq order on top of the newest whole export before
//! them. A table the partial sent whole is listed in the manifest's
//! `whole_tables`: its rows that the file lacks were deleted.
//!
//! The lines are read from the bundle in the inbox (verified again). On
//! PostgreSQL they are typed by the server itself (`json_populate_record`
//! into the table's row type, printed by COPY as a whole export's values are),
//! so a change file and a whole export map every type the same way.

use super::{Col, Kind, Manifest, Out, Point, Request};
use crate::config::{Config, Engine};
use crate::load::postgres::{COPY_LINES, DOC, column_value, copy_raw};
use anyhow::{Context, anyhow, bail};
use ferry_common::manifest::{Role, Table};
use sqlx::Connection;
use std::path::Path;
use tokio::io::AsyncBufReadExt;

/// Writes the changes of the applied partial `file` (in the inbox) to
/// `req.to`. `req.tables`, `as_text` and `unknown_as_text` apply as to a whole
/// export.
pub async fn export(config: &Config, file: &str, req: &Request) -> anyhow::Result<Manifest> {
    let entry = crate::inbox::scan(&config.inbox)
        .with_context(|| format!("reading {}", config.inbox.display()))?
        .into_iter()
        .find(|e| e.file == file)
        .ok_or_else(|| {
            anyhow!(
                "{file} is no longer in {} (pruned?): its changes cannot be exported",
                config.inbox.display()
            )
        })?;
    if entry.kind != ferry_common::manifest::Kind::Partial {
        bail!("{file} is a complete: change files are made of partials; export the tables whole");
    }
    let staging = config
        .state_dir
        .join(format!("export-changes-{}", std::process::id()));
    let limits = ferry_common::reader::Limits {
        trust: crate::trust::from_config(config),
        ..Default::default()
    };
    let (path, dir) = (entry.path.clone(), staging.join(&entry.file));
    let verified = tokio::task::spawn_blocking(move || {
        crate::verify::stage(&path, &dir, &limits, std::time::Duration::ZERO)
    })
    .await?
    .map_err(|e| anyhow!("{file}: {e}"))?;
    let stage = super::stage_for(config, &req.to)?;
    let written = write(config, &verified, req, &stage).await;
    let _ = std::fs::remove_dir_all(&staging);
    super::deliver(config, &req.to, &stage, written).await
}

async fn write(
    config: &Config,
    v: &crate::verify::Verified,
    req: &Request,
    stage: &Path,
) -> anyhow::Result<Manifest> {
    let m = &v.manifest;
    let mut manifest = Manifest {
        format: "parquet",
        contents: "changes",
        created_at: chrono::Utc::now().to_rfc3339(),
        source: Some(Point {
            sender_id: m.sender_id.clone(),
            seq: m.seq.0 as i64,
            kind: m.kind.to_string(),
            created_at: m.created_at.to_rfc3339(),
        }),
        tables: Vec::new(),
        whole_tables: Vec::new(),
    };
    let names: Vec<String> = m.tables.iter().map(display).collect();
    let chosen = super::select(names, &req.tables)?;
    // The tables the partial carries changes of.
    let tables = m
        .tables
        .iter()
        .filter(|t| chosen.contains(&display(t)) && data_members(v, t).next().is_some());
    match config.target.engine() {
        Some(Engine::Postgres) => {
            let mut conn = super::pg_session(&config.target.url).await?;
            sqlx::raw_sql("BEGIN").execute(&mut conn).await?;
            for t in tables {
                manifest
                    .tables
                    .push(postgres(&mut conn, v, t, req, stage).await?);
            }
            sqlx::raw_sql("ROLLBACK").execute(&mut conn).await?;
        }
        _ => {
            let mut conn = sqlx::SqliteConnection::connect(&config.target.url)
                .await
                .map_err(|e| anyhow!("target database: {}", ferry_common::db::describe(&e)))?;
            for t in tables {
                manifest
                    .tables
                    .push(sqlite(&mut conn, v, t, req, stage).await?);
            }
        }
    }
    manifest.whole_tables = m
        .tables
        .iter()
        .filter(|t| {
            m.members
                .iter()
                .any(|x| x.whole && x.table.as_ref() == Some(&t.name))
        })
        .map(display)
        .filter(|n| manifest.tables.iter().any(|o| o.table == *n))
        .collect();
    super::write_manifest(stage, &manifest)?;
    Ok(manifest)
}

/// `name` in `public` (or without a schema), else `schema.name`: as a whole
/// export names its files.
fn display(t: &Table) -> String {
    match t.name.schema.as_deref() {
        None | Some("public") => t.name.name.clone(),
        Some(s) => format!("{s}.{}", t.name.name),
    }
}

/// The two leading columns, then the table's.
fn with_change_columns(table: &str, cols: Vec<Col>) -> anyhow::Result<Vec<Col>> {
    if let Some(c) = cols
        .iter()
        .find(|c| c.name == "_ferry_seq" || c.name == "_ferry_op")
    {
        bail!(
            "{table} has a column named {}, which change files use for themselves",
            c.name
        );
    }
    let mut all = vec![
        Col {
            name: "_ferry_seq".into(),
            declared: "bigint".into(),
            kind: Kind::Int64,
        },
        Col {
            name: "_ferry_op".into(),
            declared: "text".into(),
            kind: Kind::Text,
        },
    ];
    all.extend(cols);
    Ok(all)
}

fn data_members<'v>(
    v: &'v crate::verify::Verified,
    t: &'v Table,
) -> impl Iterator<Item = &'v ferry_common::manifest::Member> {
    v.manifest
        .members
        .iter()
        .filter(move |x| x.role == Role::Data && x.table.as_ref() == Some(&t.name))
}

async fn postgres(
    conn: &mut sqlx::PgConnection,
    v: &crate::verify::Verified,
    t: &Table,
    req: &Request,
    stage: &Path,
) -> anyhow::Result<super::TableOut> {
    let table = display(t);
    let qualified = t.name.quoted();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&qualified)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        bail!("{table} is no longer on the target: its changes have no row type to be read with");
    }
    let cols = super::decide(&table, super::pg_columns(conn, &qualified).await?, req)?;
    let select = cols
        .iter()
        .map(|c| match t.columns.iter().find(|m| m.name == c.name) {
            Some(m) => column_value(m),
            None => format!("r.{}", super::quote(&c.name)),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let cols = with_change_columns(&table, cols)?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS pg_temp.ferry_change_lines;
         CREATE TEMP TABLE ferry_change_lines (n bigserial, line text NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    for member in data_members(v, t) {
        copy_raw(
            conn,
            &format!("COPY ferry_change_lines {COPY_LINES}"),
            &format!("reading the changes of {table} ({})", member.path),
            v.file(member),
        )
        .await?;
    }
    let mut out = Out::create(stage, &table, cols)?;
    // `{"op":"` is 7 bytes: the op is the next 6.
    super::copy_into(
        conn,
        &format!(
            "COPY (SELECT {seq}::int8, substr(s.line, 8, 6), {select}
                   FROM (SELECT n, line, {DOC} AS doc FROM ferry_change_lines s) s,
                        json_populate_record(NULL::{qualified}, s.doc) r
                   ORDER BY s.n) TO STDOUT",
            seq = v.manifest.seq.0
        ),
        &mut out,
    )
    .await?;
    out.finish()
}

async fn sqlite(
    conn: &mut sqlx::SqliteConnection,
    v: &crate::verify::Verified,
    t: &Table,
    req: &Request,
    stage: &Path,
) -> anyhow::Result<super::TableOut> {
    let table = display(t);
    let info: Vec<(String, String)> = sqlx::query_as("SELECT name, type FROM pragma_table_info(?)")
        .bind(&t.name.name)
        .fetch_all(&mut *conn)
        .await?;
    if info.is_empty() {
        bail!("{table} is no longer on the target: its changes have no columns to be read with");
    }
    let cols = info
        .into_iter()
        .map(|(n, declared)| {
            let kind = super::sqlite_kind(&declared);
            (n, declared, Some(kind))
        })
        .collect();
    let cols = with_change_columns(&table, super::decide(&table, cols, req)?)?;
    let mut out = Out::create(stage, &table, cols)?;
    let seq = v.manifest.seq.0 as i64;
    for member in data_members(v, t) {
        let file = tokio::fs::File::open(v.file(member)).await?;
        let mut lines = tokio::io::BufReader::new(file).lines();
        while let Some(line) = lines.next_line().await? {
            let (op, payload) = crate::load::split_change(&line)?;
            let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(payload)
                .map_err(|e| anyhow!("{table}: a change line that is not a JSON object ({e})"))?;
            let _ = out.builders[0].push_i64(seq);
            let _ = out.builders[1].push_text(Some(op));
            for i in 2..out.builders.len() {
                let value = obj.get(&out.cols[i].name);
                if let Err(e) = push_json(&mut out.builders[i], value) {
                    return Err(out.bad(i, &e));
                }
            }
            out.row_done(line.len())?;
        }
    }
    out.finish()
}

/// One value of a SQLite bundle's JSON (see the SQLite loader's `bind_json`).
fn push_json(
    b: &mut super::Builder,
    v: Option<&serde_json::Value>,
) -> Result<(), super::columns::BadValue> {
    use super::columns::BadValue;
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => {
            b.push_null();
            Ok(())
        }
        Some(Value::Bool(x)) => b.push_i64(i64::from(*x)),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => b.push_i64(i),
            None => b.push_f64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Some(Value::String(s)) => match b {
            super::Builder::Binary(x) => {
                x.append_value(s.as_bytes());
                Ok(())
            }
            b => b.push_text(Some(s)),
        },
        Some(Value::Object(o)) => match (o.get("$hex"), o.get("$float")) {
            (Some(Value::String(h)), _) => {
                b.push_bytes(&hex::decode(h).map_err(|e| BadValue(format!("bad $hex value: {e}")))?)
            }
            (_, Some(Value::String(f))) => b.push_f64(
                f.parse()
                    .map_err(|e| BadValue(format!("bad $float value: {e}")))?,
            ),
            _ => Err(BadValue(format!(
                "unexpected JSON object {}",
                Value::Object(o.clone())
            ))),
        },
        Some(other) => Err(BadValue(format!("unexpected JSON value {other}"))),
    }
}
