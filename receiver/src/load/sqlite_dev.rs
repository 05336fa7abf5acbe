//! A PostgreSQL history as a SQLite development database: the point is
//! restored into a scratch PostgreSQL database (the same loaders as every
//! restore), then each selected table is copied into the SQLite file with its
//! values mapped as Django's SQLite backend stores them. PostgreSQL itself
//! turns each value into the text the mapping needs (its own types, domains
//! and arrays included), so nothing here decodes COPY formats.
//!
//! The mapping, type by type, is documented in docs/restore.md ("Into
//! SQLite"); [`column`] is its code.

use super::LoadError;
use super::sqlite::Batch;
use ferry_common::TableName;
use ferry_common::ident::quote_ident;
use ferry_common::manifest::Table;
use futures_util::TryStreamExt;
use sqlx::Row;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnection;

/// How a column's text (as PostgreSQL renders it by `expr`) becomes a SQLite value.
#[derive(Clone, Copy)]
enum Conv {
    Int,
    Real,
    Text,
    Blob,
}

struct Column {
    name: String,
    decl: String,
    not_null: bool,
    expr: String,
    conv: Conv,
}

/// The SQLite name of a restored table: its own name in `public`,
/// `<schema>_<name>` elsewhere.
pub(super) fn sqlite_name(t: &TableName) -> String {
    match t.schema.as_deref() {
        None | Some("public") => t.name.clone(),
        Some(s) => format!("{s}_{}", t.name),
    }
}

/// The mapping of one column, from its base type's name and category.
fn column(name: String, base: &str, category: &str, not_null: bool) -> Column {
    let c = quote_ident(&name);
    let datetime = |v: &str| {
        format!(
            "CASE WHEN isfinite({v}) THEN to_char({v}, 'YYYY-MM-DD HH24:MI:SS') || \
             CASE WHEN extract(microseconds FROM {v})::bigint % 1000000 <> 0 \
             THEN to_char({v}, '.US') ELSE '' END ELSE ({v})::text END"
        )
    };
    let (decl, expr, conv) = match base {
        "smallint" | "integer" | "bigint" => (base.to_owned(), format!("{c}::text"), Conv::Int),
        "real" | "double precision" => ("real".into(), format!("{c}::text"), Conv::Real),
        "boolean" => ("bool".into(), format!("{c}::int::text"), Conv::Int),
        "date" => ("date".into(), format!("{c}::text"), Conv::Text),
        "interval" => (
            "bigint".into(),
            format!("(extract(epoch FROM {c}) * 1000000)::bigint::text"),
            Conv::Int,
        ),
        "uuid" => (
            "char(32)".into(),
            format!("replace({c}::text, '-', '')"),
            Conv::Text,
        ),
        "json" | "jsonb" => ("text".into(), format!("{c}::text"), Conv::Text),
        "bytea" => ("BLOB".into(), format!("encode({c}, 'hex')"), Conv::Blob),
        _ if category == "A" => ("text".into(), format!("to_json({c})::text"), Conv::Text),
        _ if base.starts_with("numeric") => ("decimal".into(), format!("{c}::text"), Conv::Text),
        _ if base.starts_with("timestamp") && base.ends_with("with time zone") => (
            "datetime".into(),
            datetime(&format!("({c} AT TIME ZONE 'UTC')")),
            Conv::Text,
        ),
        _ if base.starts_with("timestamp") => ("datetime".into(), datetime(&c), Conv::Text),
        _ if base.starts_with("time") => ("time".into(), format!("{c}::text"), Conv::Text),
        _ if base.starts_with("character varying(") => (
            base.replace("character varying", "varchar"),
            format!("{c}::text"),
            Conv::Text,
        ),
        _ => ("text".into(), format!("{c}::text"), Conv::Text),
    };
    Column {
        name,
        decl,
        not_null,
        expr,
        conv,
    }
}

/// The columns of a restored table, by the scratch database's catalog.
async fn columns(pg: &mut PgConnection, t: &TableName) -> Result<Vec<Column>, LoadError> {
    let rows = sqlx::query(
        "SELECT a.attname::text AS name,
                format_type(b.oid, CASE WHEN t.typbasetype <> 0 THEN t.typtypmod
                                        ELSE a.atttypmod END) AS base,
                b.typcategory::text AS category, a.attnotnull AS not_null
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         JOIN pg_type b ON b.oid = CASE WHEN t.typbasetype <> 0 THEN t.typbasetype
                                        ELSE a.atttypid END
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(t.quoted())
    .fetch_all(&mut *pg)
    .await
    .map_err(LoadError::db(format!("reading the columns of {t}")))?;
    rows.iter()
        .map(|r| {
            Ok(column(
                super::col(r, "name")?,
                &super::col::<String, _>(r, "base")?,
                &super::col::<String, _>(r, "category")?,
                super::col(r, "not_null")?,
            ))
        })
        .collect()
}

/// The SQLite table: mapped columns, the primary key (a single integer key as
/// the rowid, as Django declares it) and the foreign keys among `restored`.
fn ddl(t: &Table, cols: &[Column], restored: &[TableName]) -> String {
    let single_int_key = t.primary_key.len() == 1
        && cols
            .iter()
            .any(|c| c.name == t.primary_key[0] && matches!(c.conv, Conv::Int));
    let mut parts: Vec<String> = cols
        .iter()
        .map(|c| {
            if single_int_key && c.name == t.primary_key[0] {
                format!("{} integer NOT NULL PRIMARY KEY", quote_ident(&c.name))
            } else {
                format!(
                    "{} {}{}",
                    quote_ident(&c.name),
                    c.decl,
                    if c.not_null { " NOT NULL" } else { "" }
                )
            }
        })
        .collect();
    let list = |cols: &[String]| {
        cols.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !single_int_key && !t.primary_key.is_empty() {
        parts.push(format!("PRIMARY KEY ({})", list(&t.primary_key)));
    }
    for fk in &t.foreign_keys {
        if let Some(parent) = restored.iter().find(|r| **r == fk.references) {
            parts.push(format!(
                "FOREIGN KEY ({}) REFERENCES {} ({})",
                list(&fk.columns),
                quote_ident(&sqlite_name(parent)),
                list(&fk.referenced_columns)
            ));
        }
    }
    format!(
        "CREATE TABLE {} (\n  {}\n)",
        quote_ident(&sqlite_name(&t.name)),
        parts.join(",\n  ")
    )
}

fn value(text: Option<String>, conv: Conv, column: &str) -> Result<serde_json::Value, LoadError> {
    use serde_json::Value;
    let Some(s) = text else {
        return Ok(Value::Null);
    };
    let bad = |e: &dyn std::fmt::Display| {
        LoadError::Refused(format!("column {column}: value {s:?} does not map: {e}"))
    };
    Ok(match conv {
        Conv::Int => Value::from(s.parse::<i64>().map_err(|e| bad(&e))?),
        Conv::Real => match s.as_str() {
            "NaN" => Value::Null,
            "Infinity" | "-Infinity" => serde_json::json!({ "$float": s }),
            _ => serde_json::Number::from_f64(s.parse::<f64>().map_err(|e| bad(&e))?)
                .map_or(Value::Null, Value::Number),
        },
        Conv::Text => Value::String(s),
        Conv::Blob => serde_json::json!({ "$hex": s }),
    })
}

/// Copies the restored `tables` from the scratch database into the SQLite
/// file (inside its open transaction); returns the rows copied.
pub(super) async fn copy(
    pg: &mut PgConnection,
    lite: &mut SqliteConnection,
    tables: &[&Table],
) -> Result<u64, LoadError> {
    let restored: Vec<TableName> = tables.iter().map(|t| t.name.clone()).collect();
    let mut rows = 0;
    for t in tables {
        let cols = columns(pg, &t.name).await?;
        sqlx::raw_sql(super::postgres::q(ddl(t, &cols, &restored)))
            .execute(&mut *lite)
            .await
            .map_err(LoadError::db(format!("creating {} in SQLite", t.name)))?;
        let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
        let mut insert = Batch::new(
            format!(
                "INSERT INTO {} ({}) VALUES ",
                quote_ident(&sqlite_name(&t.name)),
                names.join(", ")
            ),
            String::new(),
            cols.len(),
            format!("copying {} into SQLite", t.name),
        );
        let select = format!(
            "SELECT {} FROM {}",
            cols.iter()
                .map(|c| c.expr.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            t.name.quoted()
        );
        let doing = format!("reading {}", t.name);
        let mut stream = sqlx::query(super::postgres::q(select)).fetch(&mut *pg);
        while let Some(r) = stream
            .try_next()
            .await
            .map_err(LoadError::db_lazy(&doing))?
        {
            let mut row = Vec::with_capacity(cols.len());
            for (i, c) in cols.iter().enumerate() {
                let text: Option<String> = r.try_get(i).map_err(LoadError::db_lazy(&doing))?;
                row.push(value(text, c.conv, &c.name)?);
            }
            insert.add(lite, row).await?;
            rows += 1;
        }
        drop(stream);
        insert.flush(lite).await?;
    }
    Ok(rows)
}
