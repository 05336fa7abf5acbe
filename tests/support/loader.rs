//! Applying bundles in tests: through the receiver's own verification and loaders
//! (no inbox, no ledger ordering beyond the receiver's), so that sender tests can
//! compare a source with its copy row for row.

use ferry_common::ident::quote_ident;
use ferry_common::manifest::Manifest;
use sqlx::{AssertSqlSafe, SqliteConnection};
use std::path::Path;

/// Verifies `bundle` and applies it to the database at `url` (PostgreSQL or
/// SQLite), exactly as `ferry-receiver load` would; panics with the reason if
/// the receiver refuses it.
pub async fn apply(url: &str, bundle: &Path) -> Manifest {
    apply_with(url, bundle, "").await
}

/// [`apply`] with more `[target]` settings (TOML lines).
pub async fn apply_with(url: &str, bundle: &Path, target: &str) -> Manifest {
    let staging = tempfile::tempdir().expect("temp dir");
    let config = ferry_receiver::Config::parse(
        &format!(
            "state_dir = \"/nonexistent\"\ninbox = \"/nonexistent\"\n[target]\nurl = {url:?}\n{target}"
        ),
        Path::new("test"),
    )
    .expect("receiver config");
    let v = ferry_receiver::verify::stage(
        bundle,
        &staging.path().join("s"),
        &ferry_common::reader::Limits::default(),
        std::time::Duration::ZERO,
    )
    .unwrap_or_else(|e| panic!("bundle {} does not verify: {e}", bundle.display()));
    let mut target = ferry_receiver::load::Target::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("target {url}: {e}"));
    let file = bundle
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    target
        .apply(&v, &file, &[])
        .await
        .unwrap_or_else(|e| panic!("applying {file} failed: {e}"));
    v.manifest.clone()
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
