//! A minimal reference loader for tests: applies complete and partial bundles to
//! PostgreSQL or SQLite exactly as `docs/bundle-format.md` describes, so tests can
//! check that a bundle carries every value. (The receiver, issue 3, is the real
//! loader; this one trades speed and ordering for brevity: it disables foreign
//! key enforcement while applying.)

use crate::bundle_contents;
use crate::pg::exec;
use ferry_common::ident::{quote_ident, quote_literal};
use ferry_common::manifest::{DataFormat, Manifest, Role, Table};
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqliteConnection};
use std::collections::BTreeMap;
use std::path::Path;

fn table<'a>(m: &'a Manifest, name: &ferry_common::TableName) -> &'a Table {
    m.tables
        .iter()
        .find(|t| &t.name == name)
        .expect("data member of a listed table")
}

fn text(members: &BTreeMap<String, Vec<u8>>, path: &str) -> String {
    String::from_utf8(members.get(path).cloned().unwrap_or_default()).expect("UTF-8 member")
}

/// Splits a change line into ("upsert" | "delete", JSON payload text).
pub fn split_change(line: &str) -> (&'static str, &str) {
    if let Some(rest) = line.strip_prefix("{\"op\":\"upsert\",\"row\":") {
        ("upsert", rest.strip_suffix('}').expect("closing brace"))
    } else if let Some(rest) = line.strip_prefix("{\"op\":\"delete\",\"key\":") {
        ("delete", rest.strip_suffix('}').expect("closing brace"))
    } else {
        panic!("not a change line: {line}")
    }
}

/// Loads a complete bundle into an empty PostgreSQL database.
pub async fn load_complete_pg(conn: &mut PgConnection, bundle: &Path) -> Manifest {
    let (m, members) = bundle_contents(bundle);
    // pg_dump's DDL empties search_path for the session: reset it after each script.
    exec(conn, &text(&members, "schema/pre-data.sql")).await;
    exec(conn, "RESET search_path").await;
    for member in m.members.iter().filter(|x| x.role == Role::Data) {
        assert_eq!(member.format, Some(DataFormat::PgCopyText));
        let t = member.table.as_ref().expect("data member names its table");
        let sql = format!("COPY {} FROM STDIN", t.quoted());
        let mut copy = conn.copy_in_raw(&sql).await.expect("COPY FROM STDIN");
        copy.send(members[&member.path].as_slice())
            .await
            .expect("COPY data");
        copy.finish().await.expect("COPY finish");
    }
    exec(conn, &text(&members, "schema/post-data.sql")).await;
    exec(conn, &text(&members, "schema/sequences.sql")).await;
    exec(conn, "RESET search_path").await;
    m
}

/// Applies a partial bundle to a PostgreSQL copy.
pub async fn apply_partial_pg(conn: &mut PgConnection, bundle: &Path) -> Manifest {
    let (m, members) = bundle_contents(bundle);
    let mut tx = conn.begin().await.expect("begin");
    exec(&mut tx, "SET LOCAL session_replication_role = replica").await;
    for member in m.members.iter().filter(|x| x.role == Role::Data) {
        let t = table(&m, member.table.as_ref().expect("table"));
        let name = t.name.quoted();
        let cols: Vec<_> = t.columns.iter().filter(|c| !c.generated).collect();
        let list = cols
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        // json columns travel as their text in a JSON string.
        let exprs = cols
            .iter()
            .map(|c| match c.sql_type.as_str() {
                "json" | "json[]" => {
                    format!("($1::json ->> {})::{}", quote_literal(&c.name), c.sql_type)
                }
                _ => format!("r.{}", quote_ident(&c.name)),
            })
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
        let upsert = format!(
            "INSERT INTO {name} ({list}) OVERRIDING SYSTEM VALUE
             SELECT {exprs} FROM json_populate_record(NULL::{name}, $1::json) r
             ON CONFLICT ({pk}) {conflict}"
        );
        let matchpk = t
            .primary_key
            .iter()
            .map(|c| format!("t.{0} = r.{0}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let delete = format!(
            "DELETE FROM {name} t USING json_populate_record(NULL::{name}, $1::json) r WHERE {matchpk}"
        );
        for line in text(&members, &member.path).lines() {
            let (op, payload) = split_change(line);
            let sql = if op == "upsert" { &upsert } else { &delete };
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(payload)
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("{op} into {name} failed: {e}\n{payload}"));
        }
    }
    tx.commit().await.expect("commit");
    m
}

/// A SQLite value from its bundle JSON.
fn bind_json<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    v: &serde_json::Value,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    use serde_json::Value;
    match v {
        Value::Null => q.bind(None::<String>),
        Value::Bool(b) => q.bind(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => q.bind(i),
            None => q.bind(n.as_f64().expect("finite number")),
        },
        Value::String(s) => q.bind(s.clone()),
        Value::Object(o) => {
            let hex = o["$hex"].as_str().expect("only {\"$hex\"} objects");
            q.bind(hex::decode(hex).expect("hex"))
        }
        Value::Array(_) => panic!("no arrays in SQLite bundles"),
    }
}

async fn insert_sqlite(conn: &mut SqliteConnection, t: &Table, row: &str, replace: bool) {
    let row: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(row).expect("row JSON");
    let cols: Vec<_> = t.columns.iter().filter(|c| !c.generated).collect();
    let sql = format!(
        "INSERT {} INTO {} ({}) VALUES ({})",
        if replace { "OR REPLACE" } else { "" },
        t.name.quoted(),
        cols.iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", "),
        vec!["?"; cols.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for c in &cols {
        q = bind_json(q, &row[&c.name]);
    }
    q.execute(&mut *conn).await.expect("insert row");
}

/// Loads a complete bundle from a SQLite source into an empty SQLite database.
pub async fn load_complete_sqlite(conn: &mut SqliteConnection, bundle: &Path) -> Manifest {
    let (m, members) = bundle_contents(bundle);
    sqlx::raw_sql("PRAGMA foreign_keys = OFF")
        .execute(&mut *conn)
        .await
        .expect("pragma");
    sqlx::raw_sql(AssertSqlSafe(text(&members, "schema/pre-data.sql")))
        .execute(&mut *conn)
        .await
        .expect("pre-data");
    for member in m.members.iter().filter(|x| x.role == Role::Data) {
        let t = table(&m, member.table.as_ref().expect("table"));
        for line in text(&members, &member.path).lines() {
            let (op, row) = split_change(line);
            assert_eq!(op, "upsert");
            insert_sqlite(conn, t, row, false).await;
        }
    }
    sqlx::raw_sql(AssertSqlSafe(text(&members, "schema/post-data.sql")))
        .execute(&mut *conn)
        .await
        .expect("post-data");
    m
}

/// Applies a partial bundle to a SQLite copy.
pub async fn apply_partial_sqlite(conn: &mut SqliteConnection, bundle: &Path) -> Manifest {
    let (m, members) = bundle_contents(bundle);
    sqlx::raw_sql("PRAGMA foreign_keys = OFF")
        .execute(&mut *conn)
        .await
        .expect("pragma");
    for member in m.members.iter().filter(|x| x.role == Role::Data) {
        let t = table(&m, member.table.as_ref().expect("table"));
        for line in text(&members, &member.path).lines() {
            match split_change(line) {
                ("upsert", row) => insert_sqlite(conn, t, row, true).await,
                (_, key) => {
                    let key: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(key).expect("key JSON");
                    let cond = t
                        .primary_key
                        .iter()
                        .map(|c| format!("{} = ?", quote_ident(c)))
                        .collect::<Vec<_>>()
                        .join(" AND ");
                    let sql = format!("DELETE FROM {} WHERE {cond}", t.name.quoted());
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for c in &t.primary_key {
                        q = bind_json(q, &key[c]);
                    }
                    q.execute(&mut *conn).await.expect("delete row");
                }
            }
        }
    }
    m
}

/// Every row of a SQLite table as typed literals (`quote()`), sorted.
pub async fn sqlite_rows(conn: &mut SqliteConnection, table: &str) -> Vec<String> {
    let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .expect("columns");
    let expr = cols
        .iter()
        .map(|c| format!("quote({})", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" || '|' || ");
    let sql = format!("SELECT {expr} FROM {} ORDER BY 1", quote_ident(table));
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(conn)
        .await
        .expect("rows")
}
