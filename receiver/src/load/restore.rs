//! The loaders, pointed at a restore's destination instead of the live target:
//! a complete and the partials after it, applied in one transaction with the
//! same `load_complete` / `load_partial` the chain uses, and no ledger.
//!
//! PostgreSQL: the complete streams, while it is verified, into committed
//! staging schemas on several connections (the live chain's parallel load,
//! each table's own indexes built there). Then, in one transaction, each real
//! schema is renamed aside and its staging schema takes its name, so the rest
//! of pg_dump's schema-qualified DDL and the partials apply to the restored
//! tables, out of the way of whatever the database holds. The unselected
//! tables are dropped, the restored schema is renamed `ferry_restored_N`, the
//! real one gets its name back, (with `--replace`) the selected tables' current
//! versions are dropped, and every restored object is moved into the real
//! schema. Nothing but the staging schemas is visible before the commit, and a
//! failure anywhere rolls the transaction back and drops them.

use super::postgres::{self, q, run_script, session};
use super::sqlite;
use super::{LoadError, col};
use crate::restore::{Bundles, RestoreError, live_target_message};
use ferry_common::TableName;
use ferry_common::ident::{quote_ident, quote_literal};
use ferry_common::manifest::{Kind, Manifest};
use sqlx::Connection;
use std::path::Path;

fn db(doing: &str) -> impl FnOnce(sqlx::Error) -> LoadError + '_ {
    LoadError::db_lazy(doing)
}

/// Restores into PostgreSQL; returns what was left out (foreign keys to tables
/// not restored, objects the database already had its own of).
pub async fn postgres(
    url: &str,
    base: &Manifest,
    tables: &[TableName],
    replace: bool,
    dry_run: bool,
    jobs: usize,
    bundles: &mut Bundles<'_>,
) -> Result<Vec<String>, RestoreError> {
    if base.source.engine != "postgresql" {
        return Err(RestoreError::Refused(format!(
            "these bundles come from a {} source; restore them into a SQLite file (--into sqlite:///path)",
            base.source.engine
        )));
    }
    let mut conn = session(url).await?;
    let live: bool = sqlx::query_scalar("SELECT to_regclass('ferry_receiver.applied') IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .map_err(db("looking for a ferry-receiver ledger"))?;
    if live {
        return Err(RestoreError::Refused(live_target_message(url)));
    }
    let mut existing = Vec::new();
    for t in tables {
        let there: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(t.quoted())
            .fetch_one(&mut conn)
            .await
            .map_err(db("looking up the tables to restore"))?;
        if there {
            existing.push(t.to_string());
        }
    }
    if !existing.is_empty() && !replace {
        return Err(RestoreError::Refused(format!(
            "{} already exist(s) in {}: add --replace to replace exactly the selected tables \
             (in one transaction; every other table stays as it is), or restore into an empty database",
            existing.join(", "),
            crate::config::redact_url(url)
        )));
    }
    if dry_run {
        return Ok(Vec::new());
    }
    // 1. The complete, streamed while it is verified, into committed staging
    //    schemas on `jobs` connections with each table's own indexes (the live
    //    chain's parallel load); nothing in the real schemas changes yet.
    let mut stream = bundles.stream_complete()?;
    let staged =
        super::staged::stage_only(&mut conn, url, &stream.manifest, &mut stream.rx, jobs).await;
    let verified = stream.verified().await;
    let mut staged = match (staged, verified) {
        (Ok(s), Ok(_)) => s,
        (_, Err(e)) => {
            super::staged::drop_staging(&mut conn).await;
            return Err(e);
        }
        (Err(e), _) => {
            super::staged::drop_staging(&mut conn).await;
            return Err(e.into());
        }
    };
    if let Err(e) = bundles
        .install_media(std::mem::take(&mut staged.media))
        .await
    {
        super::staged::drop_staging(&mut conn).await;
        return Err(e);
    }
    let result = swap_in(&mut conn, url, base, tables, &existing, staged, bundles).await;
    if result.is_err() {
        super::staged::drop_staging(&mut conn).await;
    }
    result
}

/// Steps 2 to 6, in one transaction: the staged tables under their real
/// schemas' names (the real ones aside), the rest of the DDL, the partials,
/// the unselected tables dropped, the real schemas back, and the restored
/// objects moved into them.
async fn swap_in(
    conn: &mut sqlx::PgConnection,
    url: &str,
    base: &Manifest,
    tables: &[TableName],
    existing: &[String],
    staged: super::staged::StagedOnly,
    bundles: &mut Bundles<'_>,
) -> Result<Vec<String>, RestoreError> {
    let mut tx = conn.begin().await.map_err(db("beginning the restore"))?;
    // 2. Each real schema aside, the staged one under its name.
    let mut aside = Vec::new();
    for (i, (s, stage)) in staged.schemas.iter().enumerate() {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(s)
                .fetch_one(&mut *tx)
                .await
                .map_err(db("looking up schemas"))?;
        let a = format!("ferry_restore_aside_{}", i + 1);
        let mut sql = String::new();
        if exists {
            sql.push_str(&format!(
                "ALTER SCHEMA {} RENAME TO {};",
                quote_ident(s),
                quote_ident(&a)
            ));
        }
        sql.push_str(&format!(
            "ALTER SCHEMA {} RENAME TO {};",
            quote_ident(stage),
            quote_ident(s)
        ));
        run_script(&mut tx, &sql, "restore setup (schemas aside)").await?;
        aside.push((s.clone(), exists.then_some(a)));
    }
    run_script(&mut tx, &staged.post, "post-data DDL").await?;
    run_script(&mut tx, &staged.sequences, "sequence values").await?;
    // The partials, by the live chain's loader.
    while let Some(v) = bundles.next().await? {
        postgres::load_partial(&mut tx, &v).await?;
    }
    // 3. Tables not asked for go, with the foreign keys that point at them.
    let left_out: Vec<&TableName> = base
        .tables
        .iter()
        .map(|t| &t.name)
        .filter(|n| !tables.contains(n))
        .collect();
    let mut notes = Vec::new();
    if !left_out.is_empty() {
        let names: Vec<String> = left_out.iter().map(|t| t.quoted()).collect();
        let fks = sqlx::query(q(format!(
            "SELECT c.conname::text AS name, c.conrelid::regclass::text AS child,
                    c.confrelid::regclass::text AS parent
             FROM pg_constraint c
             WHERE c.contype = 'f' AND c.confrelid IN ({list})
               AND c.conrelid NOT IN ({list})",
            list = names
                .iter()
                .map(|n| format!("{}::regclass", quote_literal(n)))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .fetch_all(&mut *tx)
        .await
        .map_err(db("listing foreign keys to tables left out"))?;
        for r in fks {
            let (name, child, parent): (String, String, String) =
                (col(&r, "name")?, col(&r, "child")?, col(&r, "parent")?);
            notes.push(format!(
                "foreign key {name} of {child} (it references {parent}, which is not restored)"
            ));
        }
        run_script(
            &mut tx,
            &format!("DROP TABLE {} CASCADE;", names.join(", ")),
            "dropping the tables not restored",
        )
        .await?;
    }
    // 4. The restored schemas out of the way, the real ones back.
    let mut restored = Vec::new();
    for (i, (s, a)) in aside.iter().enumerate() {
        let r = format!("ferry_restored_{}", i + 1);
        let mut sql = format!(
            "ALTER SCHEMA {} RENAME TO {};",
            quote_ident(s),
            quote_ident(&r)
        );
        match a {
            Some(a) => sql.push_str(&format!(
                "ALTER SCHEMA {} RENAME TO {};",
                quote_ident(a),
                quote_ident(s)
            )),
            None => sql.push_str(&format!("CREATE SCHEMA {};", quote_ident(s))),
        }
        run_script(&mut tx, &sql, "restore setup (schemas back)").await?;
        restored.push((s.clone(), r));
    }
    // 5. With --replace, the current versions of the selected tables go.
    if !existing.is_empty() {
        let names: Vec<String> = tables
            .iter()
            .filter(|t| existing.contains(&t.to_string()))
            .map(|t| t.quoted())
            .collect();
        sqlx::raw_sql(q(format!("DROP TABLE {}", names.join(", "))))
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                RestoreError::Refused(format!(
                    "could not replace {}: {}; objects outside the restore depend on them \
                     (a view, a foreign key from another table): drop those first, or add \
                     their tables to the restore with --table",
                    existing.join(", "),
                    e.as_database_error().map_or(e.to_string(), |d| {
                        let detail = d
                            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                            .and_then(|p| p.detail().map(str::to_owned))
                            .unwrap_or_default();
                        format!("{} {detail}", d.message())
                    })
                ))
            })?;
    }
    // 6. Every restored object into its real schema.
    sqlx::raw_sql("SET LOCAL search_path TO pg_catalog")
        .execute(&mut *tx)
        .await
        .map_err(db("setting search_path"))?;
    for (real, r) in &restored {
        let objects = sqlx::query(super::staged::MOVABLE)
            .bind(r)
            .bind(real)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("listing the restored objects"))?;
        let (rq, realq) = (quote_ident(r), quote_ident(real));
        let mut moves = String::new();
        for o in objects {
            let (kind, name, taken): (String, String, bool) =
                (col(&o, "kind")?, col(&o, "name")?, col(&o, "taken")?);
            if !taken {
                moves.push_str(&format!("ALTER {kind} {rq}.{name} SET SCHEMA {realq};\n"));
                continue;
            }
            match kind.as_str() {
                "TYPE" | "DOMAIN" => {
                    // The database has its own: the restored columns take it.
                    let uses = sqlx::query(
                        "SELECT format('%I.%I', n.nspname, c.relname) AS rel,
                                quote_ident(a.attname) AS col
                         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.relkind IN ('r', 'p') AND n.nspname = $1 AND a.attnum > 0
                           AND NOT a.attisdropped
                           AND a.atttypid = to_regtype(format('%I.%s', $1::text, $2::text))",
                    )
                    .bind(r)
                    .bind(&name)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db("finding the columns of a restored type"))?;
                    let mut sql = String::new();
                    for u in uses {
                        let (rel, c): (String, String) = (col(&u, "rel")?, col(&u, "col")?);
                        sql.push_str(&format!(
                            "ALTER TABLE {rel} ALTER COLUMN {c} TYPE {realq}.{name} USING {c}::text::{realq}.{name};\n"
                        ));
                    }
                    sql.push_str(&format!("DROP {kind} {rq}.{name};\n"));
                    run_script(
                        &mut tx,
                        &sql,
                        &format!("using the database's own type {real}.{name}"),
                    )
                    .await
                    .map_err(|e| {
                        RestoreError::Refused(format!(
                            "the restored tables use type {real}.{name}, and the database has \
                                 another type of that name whose values they do not fit ({e}); \
                                 restore into an empty database instead"
                        ))
                    })?;
                    notes.push(format!(
                        "type {real}.{name}: the database's own kept, the restored columns use it"
                    ));
                }
                "TABLE" => {
                    return Err(RestoreError::Refused(format!(
                        "table {real}.{name} appeared in {} during the restore; try again",
                        crate::config::redact_url(url)
                    )));
                }
                _ => {
                    moves.push_str(&format!("DROP {kind} {rq}.{name} CASCADE;\n"));
                    notes.push(format!(
                        "{} {real}.{name}: the database's own kept",
                        kind.to_lowercase()
                    ));
                }
            }
        }
        // RESTRICT: anything not moved stops the restore here.
        moves.push_str(&format!("DROP SCHEMA {rq};\n"));
        sqlx::raw_sql(q(moves))
            .execute(&mut *tx)
            .await
            .map_err(db(&format!("moving the restored objects into {real}")))?;
    }
    sqlx::raw_sql("SET LOCAL search_path TO DEFAULT")
        .execute(&mut *tx)
        .await
        .map_err(db("resetting search_path"))?;
    tx.commit().await.map_err(db("committing the restore"))?;
    Ok(notes)
}

/// Where a PostgreSQL history is rebuilt before it becomes a SQLite file: a
/// server on which ferry may create (and afterwards drops) a scratch database.
pub struct Scratch<'a> {
    /// A PostgreSQL URL on that server (its database is only connected to).
    pub url: &'a str,
    pub jobs: usize,
}

/// Restores into a new SQLite file: built under a temporary name beside it and
/// renamed when complete. A SQLite history loads as it is; a PostgreSQL one is
/// rebuilt in a scratch database on `scratch`'s server and copied over with
/// Django's SQLite mapping (see `sqlite_dev`).
pub async fn sqlite(
    path: &Path,
    base: &Manifest,
    tables: &[TableName],
    dry_run: bool,
    scratch: Option<Scratch<'_>>,
    bundles: &mut Bundles<'_>,
) -> Result<(), RestoreError> {
    if path.exists() {
        return Err(RestoreError::Refused(format!(
            "{} exists: a restore into SQLite writes a new file; remove it or choose another path",
            path.display()
        )));
    }
    let from_postgres = base.source.engine == "postgresql";
    if from_postgres && scratch.is_none() {
        return Err(RestoreError::Usage(
            "a PostgreSQL history becomes a SQLite file by way of a scratch PostgreSQL database: \
             give --via postgres://user@host/postgres (a server where this user may CREATE \
             DATABASE; the scratch database is dropped afterwards), or run with the receiver's \
             configuration, whose target server is used"
                .into(),
        ));
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(RestoreError::Refused(format!(
            "the directory of {} does not exist",
            path.display()
        )));
    }
    if dry_run {
        return Ok(());
    }
    let temp = ferry_common::durable::temp_name(path);
    let result = match scratch {
        Some(scratch) if from_postgres => via_postgres(&temp, base, tables, scratch, bundles).await,
        _ => sqlite_into(&temp, base, tables, bundles).await,
    };
    match result {
        Ok(()) => std::fs::rename(&temp, path).map_err(|e| {
            RestoreError::Io(format!(
                "renaming {} to {}: {e}",
                temp.display(),
                path.display()
            ))
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

async fn open_sqlite(temp: &Path) -> Result<sqlx::sqlite::SqliteConnection, RestoreError> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};
    let options = SqliteConnectOptions::new()
        .filename(temp)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Delete)
        .foreign_keys(false);
    Ok(SqliteConnection::connect_with(&options)
        .await
        .map_err(|source| LoadError::Connect {
            url: format!("sqlite://{}", temp.display()),
            source,
        })?)
}

/// A database ferry creates on a PostgreSQL server for one job and drops
/// afterwards (whatever happened): where a past point is rebuilt before it
/// becomes a SQLite file or a Parquet export.
pub struct ScratchDb {
    admin: sqlx::postgres::PgConnection,
    pub name: String,
    /// The scratch database's URL.
    pub url: String,
}

impl ScratchDb {
    /// Creates `<prefix>_<pid>` on the server of `server_url` (whose own
    /// database is only connected to).
    pub async fn create(server_url: &str, prefix: &str) -> Result<Self, RestoreError> {
        use sqlx::ConnectOptions;
        let options: sqlx::postgres::PgConnectOptions = server_url.parse().map_err(|e| {
            RestoreError::Usage(format!("{}: {e}", crate::config::redact_url(server_url)))
        })?;
        let name = format!("{prefix}_{}", std::process::id());
        let mut admin = session(server_url).await?;
        sqlx::raw_sql(q(format!("CREATE DATABASE {}", quote_ident(&name))))
            .execute(&mut admin)
            .await
            .map_err(|e| {
                RestoreError::Refused(format!(
                    "could not create the scratch database {name} on {}: {e}; the user needs \
                     CREATEDB there (ALTER ROLE … CREATEDB), or give another server",
                    crate::config::redact_url(server_url)
                ))
            })?;
        let url = options.database(&name).to_url_lossy().to_string();
        Ok(Self { admin, name, url })
    }

    /// Drops the database (its sessions too); a failure is logged.
    pub async fn drop(mut self) {
        if let Err(e) = sqlx::raw_sql(q(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&self.name)
        )))
        .execute(&mut self.admin)
        .await
        {
            tracing::warn!(database = %self.name, error = %e, "could not drop the scratch database; drop it by hand");
        }
        let _ = self.admin.close().await;
    }
}

/// A PostgreSQL history: restored into a scratch database, copied into the
/// SQLite file, the scratch database dropped whatever happened.
async fn via_postgres(
    temp: &Path,
    base: &Manifest,
    tables: &[TableName],
    scratch: Scratch<'_>,
    bundles: &mut Bundles<'_>,
) -> Result<(), RestoreError> {
    let scratch_db = ScratchDb::create(scratch.url, "ferry_restore").await?;
    let url = scratch_db.url.clone();
    let result = async {
        postgres(&url, base, tables, false, false, scratch.jobs, bundles).await?;
        let mut pg = session(&url).await?;
        let mut lite = open_sqlite(temp).await?;
        let mut tx = lite
            .begin()
            .await
            .map_err(db("beginning the SQLite file"))?;
        let chosen: Vec<&ferry_common::manifest::Table> = base
            .tables
            .iter()
            .filter(|t| tables.contains(&t.name))
            .collect();
        super::sqlite_dev::copy(&mut pg, &mut tx, &chosen).await?;
        tx.commit()
            .await
            .map_err(db("committing the SQLite file"))?;
        let _ = lite.close().await;
        let _ = pg.close().await;
        Ok::<(), RestoreError>(())
    }
    .await;
    scratch_db.drop().await;
    result
}

async fn sqlite_into(
    temp: &Path,
    base: &Manifest,
    tables: &[TableName],
    bundles: &mut Bundles<'_>,
) -> Result<(), RestoreError> {
    let mut conn = open_sqlite(temp).await?;
    let mut tx = conn.begin().await.map_err(db("beginning the restore"))?;
    match bundles.next().await? {
        Some(v) if v.manifest.kind == Kind::Complete => {
            sqlite::load_complete(&mut tx, &v).await?;
        }
        _ => {
            return Err(RestoreError::Refused(
                "a restore starts from a complete".into(),
            ));
        }
    }
    while let Some(v) = bundles.next().await? {
        sqlite::load_partial(&mut tx, &v).await?;
    }
    for t in base
        .tables
        .iter()
        .map(|t| &t.name)
        .filter(|n| !tables.contains(n))
    {
        sqlx::raw_sql(q(format!("DROP TABLE {}", quote_ident(&t.name))))
            .execute(&mut *tx)
            .await
            .map_err(db("dropping the tables not restored"))?;
    }
    tx.commit().await.map_err(db("committing the restore"))?;
    let _ = conn.close().await;
    Ok(())
}
