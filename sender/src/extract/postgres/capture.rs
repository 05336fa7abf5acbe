//! Delete capture: the `ferry.deleted_rows` log and the `ferry_capture_delete`
//! triggers the sender installs (and removes when `deletes = "off"`).

use super::{PgSource, TRIGGER_NAME, q};
use crate::extract::{ExtractError, TableMeta};
use ferry_common::TableName;
use ferry_common::ident::quote_literal;
use sqlx::Connection;
use std::time::Duration;

/// The body of `ferry.capture_delete()`: one delete-log row with the key
/// columns (the trigger's arguments after the table name) of the deleted row,
/// or of the old row of an update that changed the key (the old key is gone as
/// surely as if the row had been deleted).
///
/// The function is `SECURITY DEFINER` with a pinned `search_path`: it fires in
/// the application's transactions, as the application's role, which need not
/// (and should not) have any right on schema `ferry`. Run with its owner's
/// rights (the sender's role), it can always write the log, so capture never
/// makes an application's DELETE fail. Nothing is granted to anyone.
const CAPTURE_BODY: &str = "
BEGIN
  IF TG_OP = 'UPDATE' AND NOT EXISTS (
       SELECT 1 FROM unnest(TG_ARGV[1:TG_NARGS - 1]) AS k
       WHERE to_jsonb(OLD) -> k IS DISTINCT FROM to_jsonb(NEW) -> k) THEN
    RETURN NULL;
  END IF;
  INSERT INTO ferry.deleted_rows (table_name, key)
  SELECT TG_ARGV[0], jsonb_object_agg(k, to_jsonb(OLD) -> k)
  FROM unnest(TG_ARGV[1:TG_NARGS - 1]) AS k;
  RETURN NULL;
END ";

/// The comment ferry-sender puts on the schema it creates, so that it only
/// ever removes its own.
pub(super) const SCHEMA_MARKER: &str = "ferry-sender delete capture: created by ferry-sender, removed by it when [partial] deletes = \"off\"";

/// Whose schema `ferry` is in the source database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FerrySchema {
    Absent,
    /// Marked by ferry-sender, or (made before the marker) holding nothing but
    /// ferry's delete log and function.
    Ours,
    /// The application's: never written to, never dropped.
    Foreign,
}

impl PgSource {
    async fn ferry_schema(&mut self) -> Result<FerrySchema, ExtractError> {
        let row: Option<(bool, i64)> = sqlx::query_as(
            "SELECT coalesce(obj_description(n.oid, 'pg_namespace') = $1, false),
                    (SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid
                       AND c.relname NOT IN ('deleted_rows', 'deleted_rows_id_seq',
                                             'deleted_rows_pkey', 'deleted_rows_deleted_at'))
                  + (SELECT count(*) FROM pg_proc p WHERE p.pronamespace = n.oid
                       AND p.proname <> 'capture_delete')
                  + (SELECT count(*) FROM pg_type t WHERE t.typnamespace = n.oid
                       AND t.typname NOT IN ('deleted_rows', '_deleted_rows'))
             FROM pg_namespace n WHERE n.nspname = 'ferry'",
        )
        .bind(SCHEMA_MARKER)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(ExtractError::db("looking at schema ferry"))?;
        Ok(match row {
            None => FerrySchema::Absent,
            Some((true, _)) | Some((false, 0)) => FerrySchema::Ours,
            Some(_) => FerrySchema::Foreign,
        })
    }

    /// Installs the delete log and a trigger on every partial table with a primary
    /// key (only where missing), or removes all of it when `enabled` is false.
    pub async fn set_delete_capture(
        &mut self,
        tables: &[TableMeta],
        enabled: bool,
    ) -> Result<(), ExtractError> {
        let err = || {
            ExtractError::db(
                "setting up delete capture (the source user needs CREATE on the database and ownership of the tables; or set `[partial] deletes = \"off\"`)",
            )
        };
        // (A trigger from before key updates were captured fires on DELETE only:
        // it is re-created.)
        let (existing, outdated): (Vec<String>, Vec<String>) = {
            let rows: Vec<(String, bool)> = sqlx::query_as(
                "SELECT n.nspname || '.' || c.relname, (g.tgtype & 16) <> 0 FROM pg_trigger g
                 JOIN pg_class c ON c.oid = g.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE g.tgname = $1",
            )
            .bind(TRIGGER_NAME)
            .fetch_all(&mut self.conn)
            .await
            .map_err(err())?;
            let outdated = rows.iter().filter(|r| !r.1).map(|r| r.0.clone()).collect();
            (rows.into_iter().map(|r| r.0).collect(), outdated)
        };
        // The DDL runs only when something is missing or changed: even `CREATE
        // INDEX IF NOT EXISTS` takes a lock on the delete log that waits behind
        // any open application transaction that deleted a row, and every
        // application DELETE would then queue behind that wait.
        let schema = self.ferry_schema().await?;
        if enabled && schema == FerrySchema::Foreign {
            return Err(ExtractError::Selection(
                "the source database has an application schema named `ferry` (it holds objects \
                 ferry-sender did not create), where delete capture would put its log: ferry-sender \
                 does not touch it. Rename that schema, or set `[partial] deletes = \"off\"`"
                    .into(),
            ));
        }
        let installed: bool = enabled
            && sqlx::query_scalar(
            "SELECT coalesce(obj_description(to_regnamespace('ferry'), 'pg_namespace') = $2, false)
                AND to_regclass('ferry.deleted_rows') IS NOT NULL
                AND to_regclass('ferry.deleted_rows_deleted_at') IS NOT NULL
                AND coalesce((SELECT p.prosrc = $1 AND p.prosecdef
                                     AND p.proconfig @> ARRAY['search_path=pg_catalog, ferry']
                              FROM pg_proc p
                              WHERE p.oid = to_regprocedure('ferry.capture_delete()')), false)",
        )
            .bind(CAPTURE_BODY)
            .bind(SCHEMA_MARKER)
            .fetch_one(&mut self.conn)
            .await
            .map_err(err())?;
        // Turning capture off with nothing of it left: no transaction, no lock.
        if !enabled && existing.is_empty() && schema != FerrySchema::Ours {
            return Ok(());
        }
        let mut tx = self.conn.begin().await.map_err(err())?;
        if enabled && !installed {
            sqlx::raw_sql(q(format!(
                "CREATE SCHEMA IF NOT EXISTS ferry;
                 CREATE TABLE IF NOT EXISTS ferry.deleted_rows (
                   id bigserial PRIMARY KEY,
                   table_name text NOT NULL,
                   key jsonb NOT NULL,
                   deleted_at timestamptz NOT NULL DEFAULT now());
                 CREATE INDEX IF NOT EXISTS deleted_rows_deleted_at
                   ON ferry.deleted_rows (deleted_at);
                 CREATE OR REPLACE FUNCTION ferry.capture_delete() RETURNS trigger
                 LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, ferry
                 AS $f${CAPTURE_BODY}$f$;
                 REVOKE ALL ON FUNCTION ferry.capture_delete() FROM PUBLIC;
                 COMMENT ON SCHEMA ferry IS {marker};",
                marker = quote_literal(SCHEMA_MARKER)
            )))
            .execute(&mut *tx)
            .await
            .map_err(err())?;
        }
        for t in tables {
            let wanted = enabled && t.change.is_some() && !t.info.primary_key.is_empty();
            let mut has = existing.contains(&t.key());
            if wanted && outdated.contains(&t.key()) {
                let sql = format!("DROP TRIGGER {TRIGGER_NAME} ON {}", t.info.name.quoted());
                sqlx::raw_sql(q(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(err())?;
                has = false;
            }
            if wanted && !has {
                let args = std::iter::once(t.key())
                    .chain(t.info.primary_key.iter().cloned())
                    .map(|a| quote_literal(&a))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!(
                    "CREATE TRIGGER {TRIGGER_NAME} AFTER DELETE OR UPDATE OF {} ON {} \
                     FOR EACH ROW EXECUTE FUNCTION ferry.capture_delete({args})",
                    crate::extract::column_list(None, &t.info.primary_key),
                    t.info.name.quoted()
                );
                sqlx::raw_sql(q(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(err())?;
                tracing::info!(table = %t.key(), "delete capture installed");
            } else if !wanted && has {
                let sql = format!("DROP TRIGGER {TRIGGER_NAME} ON {}", t.info.name.quoted());
                sqlx::raw_sql(q(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(err())?;
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
                    sqlx::raw_sql(q(sql))
                        .execute(&mut *tx)
                        .await
                        .map_err(err())?;
                }
            }
            // Only ferry's own objects, and the schema only if nothing else is
            // in it (RESTRICT): never CASCADE into what the application keeps.
            if schema == FerrySchema::Ours {
                sqlx::raw_sql(
                    "DROP TABLE IF EXISTS ferry.deleted_rows;
                     DROP FUNCTION IF EXISTS ferry.capture_delete();
                     DROP SCHEMA IF EXISTS ferry RESTRICT;",
                )
                .execute(&mut *tx)
                .await
                .map_err(err())?;
            }
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

    /// Whether every role that can DELETE from a captured table (`tables`:
    /// quoted names) fires delete capture without error: the function runs as
    /// its owner (`SECURITY DEFINER`), who must be able to write the log. One
    /// line for `check`, and whether it is fine.
    pub async fn capture_check(
        &mut self,
        tables: &[String],
    ) -> Result<(bool, String), ExtractError> {
        let row: Option<(bool, String, bool)> = sqlx::query_as(
            "SELECT p.prosecdef, pg_get_userbyid(p.proowner)::text,
                    to_regclass('ferry.deleted_rows') IS NOT NULL
                    AND has_table_privilege(p.proowner, 'ferry.deleted_rows', 'INSERT')
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'ferry' AND p.proname = 'capture_delete'",
        )
        .fetch_optional(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading the delete-capture function"))?;
        let Some((definer, owner, can_log)) = row else {
            return Ok((
                true,
                "delete capture is not installed yet; the next job installs it".into(),
            ));
        };
        let roles: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT r.rolname::text FROM pg_roles r, unnest($1::text[]) t(name)
             WHERE to_regclass(t.name) IS NOT NULL
               AND has_table_privilege(r.oid, to_regclass(t.name), 'DELETE')
               AND r.rolname !~ '^pg_'
             ORDER BY 1",
        )
        .bind(tables)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db(
            "listing the roles that delete from captured tables",
        ))?;
        let who = if roles.is_empty() {
            "no role".to_owned()
        } else {
            roles.join(", ")
        };
        Ok(if definer && can_log {
            (
                true,
                format!(
                    "delete capture: the roles that can DELETE from captured tables ({who}) fire \
                     ferry.capture_delete() as its owner {owner}, which can write the log"
                ),
            )
        } else {
            (
                false,
                format!(
                    "delete capture: ferry.capture_delete() {} — a DELETE by {who} would fail \
                     and roll back the application's transaction; run one job as the sender's \
                     role (it re-creates the function), or GRANT INSERT ON ferry.deleted_rows TO \
                     {owner}",
                    if definer {
                        format!("runs as {owner}, who cannot write ferry.deleted_rows")
                    } else {
                        "runs with the rights of whoever deletes (not SECURITY DEFINER)".to_owned()
                    }
                ),
            )
        })
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
