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
//!
//! Files: `catalog` (tables, columns, keys), `complete` (snapshot, pg_dump, COPY
//! parts), `partial` (horizon, changed rows, foreign-key closure, deletes),
//! `capture` (the delete log and its triggers).

mod capture;
mod catalog;
mod complete;
mod framing;
mod partial;

pub use complete::{PART_BYTES, copy_part_path};

use super::ExtractError;
use crate::config::SourceConfig;
use ferry_common::TableName;
use ferry_common::ident::quote_literal;
use ferry_common::manifest;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

const TRIGGER_NAME: &str = "ferry_capture_delete";
// Type oids: date, timestamp, timestamptz; json, json[].
const TIMESTAMP_OIDS: [i64; 3] = [1082, 1114, 1184];
const JSON_OIDS: [i64; 2] = [114, 199];

pub struct PgSource {
    pub(super) conn: PgConnection,
    options: PgConnectOptions,
    url: String,
    pg_dump: PathBuf,
    timezone: String,
    version: String,
    /// Every table of the catalog (selected or not), from the last `catalog()`.
    all_tables: Vec<TableName>,
    /// The partitions (at any depth) of each partitioned table of
    /// `all_tables`: pg_dump must leave them out with their table, and
    /// dump their schemas with it.
    partitions: HashMap<TableName, Vec<TableName>>,
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
            partitions: HashMap::new(),
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
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
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
