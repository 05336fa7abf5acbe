//! The sender's durable state, in `<state_dir>/state.db` (SQLite): the bundles it
//! has committed, the change-capture watermarks, and the media index (what was last
//! sent of each media file).
//!
//! Invariant: a bundle's row, its watermarks and its media entries are written in
//! one transaction, *after* the bundle file is durable under its final name. A crash
//! in between leaves a bundle the state does not know; [`crate::outbox::recover`]
//! adopts it from its manifest at the next start, so no sequence number is reused
//! and no watermark moves past rows that were not shipped.

use crate::extract::Watermarks;
use ferry_common::manifest::{Kind, Manifest, Role, Seq};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use std::path::Path;

/// An error reading or writing the state database.
#[derive(Debug, thiserror::Error)]
#[error("sender state {path}: {doing}: {}", ferry_common::db::describe(.source))]
pub struct StateError {
    path: String,
    doing: &'static str,
    #[source]
    source: sqlx::Error,
}

/// One committed bundle.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BundleRecord {
    pub seq: u64,
    pub kind: String,
    pub file: String,
    pub base_seq: u64,
    pub created_at: String,
    pub rows: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    pub schema_fingerprint: String,
}

/// The table homes after complete `manifest` (written as `file`): a table it
/// dumped lives in it (or the volume of it that holds each member); a table
/// it carried keeps its earlier home. Only PostgreSQL completes (the ones with
/// a snapshot horizon) make homes.
fn homes(manifest: &Manifest, file: &str) -> Vec<(String, Home)> {
    let Some(xmin) = manifest.snapshot_xmin else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in &manifest.tables {
        let members: Vec<ferry_common::manifest::Member> = manifest
            .members
            .iter()
            .filter(|m| m.role == Role::Data && m.table.as_ref() == Some(&t.name))
            .map(|m| {
                let mut m = m.clone();
                if m.carried.is_none() {
                    let holder = match m.volume {
                        Some(k) => ferry_common::manifest::volume_file_name(
                            &manifest.sender_id,
                            &manifest.chain,
                            manifest.seq,
                            manifest.kind,
                            k,
                        ),
                        None => file.to_owned(),
                    };
                    m.carried = Some(ferry_common::manifest::Carried {
                        seq: manifest.seq,
                        file: holder,
                        xmin,
                    });
                    m.volume = None;
                }
                m
            })
            .collect();
        if members.is_empty() {
            continue;
        }
        out.push((
            t.name.to_string(),
            Home {
                table: t.clone(),
                members,
            },
        ));
    }
    out
}

/// The outcome of the last push.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushStatus {
    pub last_attempt_at: String,
    pub last_ok_at: Option<String>,
    pub last_error: Option<String>,
}

pub struct State {
    conn: SqliteConnection,
    path: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bundles (
  seq INTEGER PRIMARY KEY,
  kind TEXT NOT NULL,
  file TEXT NOT NULL,
  base_seq INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  rows INTEGER NOT NULL,
  bytes INTEGER NOT NULL,
  duration_ms INTEGER NOT NULL,
  schema_fingerprint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS watermarks (key TEXT PRIMARY KEY, value TEXT);
-- The change-line fingerprints of the newest bundle (see extract::stage::Dedup),
-- 32 bytes each, concatenated in one row. `sent_lines` held unqualified line
-- hashes (without the table) that could drop a delete of an equal key in another
-- table: never trust them.
DROP TABLE IF EXISTS sent_lines;
CREATE TABLE IF NOT EXISTS sent_line_set (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  hashes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS media_index (
  set_name TEXT NOT NULL,
  path TEXT NOT NULL,
  size INTEGER NOT NULL,
  mtime_ns TEXT NOT NULL,
  PRIMARY KEY (set_name, path));
-- Delivered bundles sent again because the receiver asked (see push::resend).
CREATE TABLE IF NOT EXISTS resent (seq INTEGER PRIMARY KEY, times INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS push_status (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  last_attempt_at TEXT NOT NULL,
  last_ok_at TEXT,
  last_error TEXT);
-- The chain this state began (see ferry_common::manifest::chain_id): one row,
-- written when the state is created.
CREATE TABLE IF NOT EXISTS chain (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  chain TEXT NOT NULL);
-- Where each table's data last went whole (see `Home`): a later complete
-- that proves a table unchanged carries this instead of dumping it again.
CREATE TABLE IF NOT EXISTS carry_homes (
  table_key TEXT PRIMARY KEY,
  home TEXT NOT NULL);
-- Which earlier completes each complete carries tables from.
CREATE TABLE IF NOT EXISTS carried_from (
  seq INTEGER NOT NULL,
  from_seq INTEGER NOT NULL,
  PRIMARY KEY (seq, from_seq));
-- Each table's catalog print at the newest complete (see
-- extract::postgres::complete::catalog_print): a table whose print changed
-- is never carried.
CREATE TABLE IF NOT EXISTS catalog_prints (
  table_key TEXT PRIMARY KEY,
  print TEXT NOT NULL);
-- The statistics' change counters at the newest complete: a hint only.
CREATE TABLE IF NOT EXISTS change_counters (
  table_key TEXT PRIMARY KEY,
  n INTEGER NOT NULL);
PRAGMA user_version = 3;
";

/// Where a table's data last went whole: the complete's members of it (each
/// with the file that holds it) and the table as that complete described it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Home {
    pub table: ferry_common::manifest::Table,
    /// The data members, each with `carried` set to where it is.
    pub members: Vec<ferry_common::manifest::Member>,
}

impl State {
    /// Opens (creating if needed) the state database in `state_dir`.
    pub async fn open(state_dir: &Path) -> Result<Self, StateError> {
        let file = state_dir.join("state.db");
        let path = file.display().to_string();
        let err = |doing| {
            let path = path.clone();
            move |source| StateError {
                path,
                doing,
                source,
            }
        };
        let options = SqliteConnectOptions::new()
            .filename(&file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(err("opening"))?;
        // The schema is created idempotently; `user_version` marks its version for
        // future migrations.
        sqlx::raw_sql(SCHEMA)
            .execute(&mut conn)
            .await
            .map_err(err("creating the schema"))?;
        // A new state begins a new chain; a state from before chains (it has
        // bundles but no chain) keeps the empty one, so its receivers go on.
        sqlx::query(
            "INSERT INTO chain (id, chain)
             SELECT 1, CASE WHEN EXISTS (SELECT 1 FROM bundles) THEN '' ELSE ? END
             WHERE NOT EXISTS (SELECT 1 FROM chain)",
        )
        .bind(ferry_common::manifest::chain_id(
            std::time::SystemTime::now(),
            rand::random::<u16>(),
        ))
        .execute(&mut conn)
        .await
        .map_err(err("recording the chain"))?;
        Ok(Self { conn, path })
    }

    /// This state's chain (empty: a state from before chains).
    pub async fn chain(&mut self) -> Result<String, StateError> {
        sqlx::query_scalar("SELECT chain FROM chain WHERE id = 1")
            .fetch_one(&mut self.conn)
            .await
            .map_err(self.err("reading the chain"))
    }

    fn err(&self, doing: &'static str) -> impl FnOnce(sqlx::Error) -> StateError + '_ {
        move |source| StateError {
            path: self.path.clone(),
            doing,
            source,
        }
    }

    /// Records a push attempt: `None` when it delivered everything pending.
    pub async fn record_push(&mut self, error: Option<String>) -> Result<(), StateError> {
        let now = chrono::Utc::now().to_rfc3339();
        sqlx::query(
            "INSERT INTO push_status (id, last_attempt_at, last_ok_at, last_error)
             VALUES (1, ?1, CASE WHEN ?2 IS NULL THEN ?1 END, ?2)
             ON CONFLICT (id) DO UPDATE SET last_attempt_at = ?1,
               last_ok_at = CASE WHEN ?2 IS NULL THEN ?1 ELSE last_ok_at END, last_error = ?2",
        )
        .bind(&now)
        .bind(error)
        .execute(&mut self.conn)
        .await
        .map_err(self.err("recording the push"))?;
        Ok(())
    }

    /// The last push attempt: when, when one last succeeded, its error.
    pub async fn push_status(&mut self) -> Result<Option<PushStatus>, StateError> {
        // query_as: a value of another type is an error, never a panic.
        let row: Option<(String, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT last_attempt_at, last_ok_at, last_error FROM push_status")
                .fetch_optional(&mut self.conn)
                .await
                .map_err(self.err("reading the push status"))?;
        Ok(
            row.map(|(last_attempt_at, last_ok_at, last_error)| PushStatus {
                last_attempt_at,
                last_ok_at,
                last_error,
            }),
        )
    }

    /// The newest bundle, or the newest of a kind.
    pub async fn last(&mut self, kind: Option<Kind>) -> Result<Option<BundleRecord>, StateError> {
        let kind = kind.map(|k| k.as_str().to_owned());
        type Bundle = (i64, String, String, i64, String, i64, i64, i64, String);
        let row: Option<Bundle> = sqlx::query_as(
            "SELECT seq, kind, file, base_seq, created_at, rows, bytes, duration_ms,
                    schema_fingerprint
             FROM bundles WHERE ?1 IS NULL OR kind = ?1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(kind)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(|source| StateError {
            path: self.path.clone(),
            doing: "reading bundles",
            source,
        })?;
        Ok(row.map(
            |(seq, kind, file, base_seq, created_at, rows, bytes, duration_ms, fingerprint)| {
                BundleRecord {
                    seq: seq as u64,
                    kind,
                    file,
                    base_seq: base_seq as u64,
                    created_at,
                    rows: rows as u64,
                    bytes: bytes as u64,
                    duration_ms: duration_ms as u64,
                    schema_fingerprint: fingerprint,
                }
            },
        ))
    }

    pub async fn watermarks(&mut self) -> Result<Watermarks, StateError> {
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT key, value FROM watermarks ORDER BY key")
                .fetch_all(&mut self.conn)
                .await
                .map_err(self.err("reading watermarks"))?;
        Ok(rows.into_iter().collect())
    }

    /// What was last sent of a media file: (size, mtime in ns).
    pub async fn media_entry(
        &mut self,
        set: &str,
        path: &str,
    ) -> Result<Option<(u64, i128)>, StateError> {
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT size, mtime_ns FROM media_index WHERE set_name = ? AND path = ?",
        )
        .bind(set)
        .bind(path)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(self.err("reading the media index"))?;
        Ok(row.map(|(s, m)| (s as u64, m.parse().unwrap_or(-1))))
    }

    /// The fingerprints of the change lines the newest bundle carried.
    pub async fn sent_lines(
        &mut self,
    ) -> Result<std::collections::HashSet<crate::extract::stage::LineHash>, StateError> {
        let blob: Option<Vec<u8>> = sqlx::query_scalar("SELECT hashes FROM sent_line_set")
            .fetch_optional(&mut self.conn)
            .await
            .map_err(self.err("reading sent lines"))?;
        Ok(blob
            .unwrap_or_default()
            .chunks_exact(32)
            .filter_map(|h| h.try_into().ok())
            .collect())
    }

    /// Records a durable bundle: its row, the watermarks after it, its media and
    /// the fingerprints of its change lines, in one transaction. A complete resets
    /// watermarks and the media index, and records where each table's data is
    /// and each table's catalog print (none for a bundle adopted after a
    /// crash: its tables are not carried by the next complete).
    pub async fn commit_bundle(
        &mut self,
        manifest: &Manifest,
        file: &str,
        bytes: u64,
        duration_ms: u64,
        sent_lines: &[crate::extract::stage::LineHash],
        catalog_prints: &std::collections::HashMap<String, String>,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let err = |doing| {
            let path = path.clone();
            move |source| StateError {
                path,
                doing,
                source,
            }
        };
        let mut tx = self
            .conn
            .begin()
            .await
            .map_err(err("committing a bundle"))?;
        sqlx::query(
            "INSERT INTO bundles (seq, kind, file, base_seq, created_at, rows, bytes,
                                  duration_ms, schema_fingerprint)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(manifest.seq.0 as i64)
        .bind(manifest.kind.as_str())
        .bind(file)
        .bind(manifest.base_seq.0 as i64)
        .bind(manifest.created_at.to_rfc3339())
        .bind(manifest.rows() as i64)
        .bind(bytes as i64)
        .bind(duration_ms as i64)
        .bind(&manifest.schema_fingerprint)
        .execute(&mut *tx)
        .await
        .map_err(err("recording the bundle"))?;
        if manifest.kind == Kind::Complete {
            sqlx::raw_sql("DELETE FROM watermarks; DELETE FROM media_index;")
                .execute(&mut *tx)
                .await
                .map_err(err("resetting watermarks"))?;
        }
        sqlx::query("INSERT OR REPLACE INTO sent_line_set (id, hashes) VALUES (1, ?)")
            .bind(sent_lines.concat())
            .execute(&mut *tx)
            .await
            .map_err(err("storing sent lines"))?;
        for (key, value) in &manifest.watermarks {
            sqlx::query("INSERT OR REPLACE INTO watermarks (key, value) VALUES (?, ?)")
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await
                .map_err(err("storing watermarks"))?;
        }
        let from: std::collections::BTreeSet<u64> =
            manifest.carried().map(|(_, c)| c.seq.0).collect();
        for f in from {
            sqlx::query("INSERT OR IGNORE INTO carried_from (seq, from_seq) VALUES (?, ?)")
                .bind(manifest.seq.0 as i64)
                .bind(f as i64)
                .execute(&mut *tx)
                .await
                .map_err(err("recording carried tables"))?;
        }
        if manifest.kind == Kind::Complete {
            sqlx::query("DELETE FROM carry_homes")
                .execute(&mut *tx)
                .await
                .map_err(err("resetting table homes"))?;
            // With the homes, in the same transaction: a print never
            // outlives the data it describes.
            sqlx::query("DELETE FROM catalog_prints")
                .execute(&mut *tx)
                .await
                .map_err(err("resetting catalog prints"))?;
            for (key, print) in catalog_prints {
                sqlx::query("INSERT INTO catalog_prints (table_key, print) VALUES (?, ?)")
                    .bind(key)
                    .bind(print)
                    .execute(&mut *tx)
                    .await
                    .map_err(err("recording catalog prints"))?;
            }
            for (key, home) in homes(manifest, file) {
                let json = serde_json::to_string(&home).unwrap_or_default();
                sqlx::query("INSERT INTO carry_homes (table_key, home) VALUES (?, ?)")
                    .bind(key)
                    .bind(json)
                    .execute(&mut *tx)
                    .await
                    .map_err(err("recording table homes"))?;
            }
        }
        for m in manifest.members.iter().filter(|m| m.role == Role::Media) {
            let (Some(set), Some(mtime)) = (&m.media_set, m.mtime_ns) else {
                continue;
            };
            let rel = m
                .path
                .strip_prefix(&format!("media/{set}/"))
                .unwrap_or(&m.path);
            sqlx::query(
                "INSERT OR REPLACE INTO media_index (set_name, path, size, mtime_ns)
                 VALUES (?, ?, ?, ?)",
            )
            .bind(set)
            .bind(rel)
            .bind(m.size as i64)
            .bind(mtime.to_string())
            .execute(&mut *tx)
            .await
            .map_err(err("updating the media index"))?;
        }
        tx.commit().await.map_err(err("committing a bundle"))?;
        Ok(())
    }

    /// Where each table's data last went whole (by `schema.table`), as of the
    /// newest complete.
    pub async fn homes(&mut self) -> Result<std::collections::HashMap<String, Home>, StateError> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT table_key, home FROM carry_homes")
            .fetch_all(&mut self.conn)
            .await
            .map_err(self.err("reading table homes"))?;
        // A row this version cannot read is dropped: that table is dumped.
        Ok(rows
            .into_iter()
            .filter_map(|(k, h)| serde_json::from_str(&h).ok().map(|h| (k, h)))
            .collect())
    }

    /// The completes that the completes `seqs` carry tables from.
    pub async fn carried_from(
        &mut self,
        seqs: &[u64],
    ) -> Result<std::collections::HashSet<u64>, StateError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT seq, from_seq FROM carried_from")
            .fetch_all(&mut self.conn)
            .await
            .map_err(self.err("reading carried tables"))?;
        Ok(rows
            .into_iter()
            .filter(|(s, _)| seqs.contains(&(*s as u64)))
            .map(|(_, f)| f as u64)
            .collect())
    }

    /// The catalog prints recorded at the newest complete.
    pub async fn catalog_prints(
        &mut self,
    ) -> Result<std::collections::HashMap<String, String>, StateError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT table_key, print FROM catalog_prints")
                .fetch_all(&mut self.conn)
                .await
                .map_err(self.err("reading catalog prints"))?;
        Ok(rows.into_iter().collect())
    }

    /// The change counters recorded at the newest complete.
    pub async fn change_counters(
        &mut self,
    ) -> Result<std::collections::HashMap<String, i64>, StateError> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT table_key, n FROM change_counters")
            .fetch_all(&mut self.conn)
            .await
            .map_err(self.err("reading change counters"))?;
        Ok(rows.into_iter().collect())
    }

    /// Replaces the recorded change counters.
    pub async fn set_change_counters(
        &mut self,
        counters: &std::collections::HashMap<String, i64>,
    ) -> Result<(), StateError> {
        let mut tx = self.conn.begin().await.map_err(|source| StateError {
            path: self.path.clone(),
            doing: "recording change counters",
            source,
        })?;
        let path = self.path.clone();
        let err = |source| StateError {
            path: path.clone(),
            doing: "recording change counters",
            source,
        };
        sqlx::query("DELETE FROM change_counters")
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        for (k, n) in counters {
            sqlx::query("INSERT INTO change_counters (table_key, n) VALUES (?, ?)")
                .bind(k)
                .bind(n)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// How many completes were taken after bundle `seq`.
    pub async fn completes_since(&mut self, seq: u64) -> Result<u64, StateError> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM bundles WHERE kind = 'complete' AND seq > ?")
                .bind(seq as i64)
                .fetch_one(&mut self.conn)
                .await
                .map_err(self.err("counting completes"))?;
        Ok(n as u64)
    }

    /// How often bundle `seq` was sent again.
    pub async fn resent(&mut self, seq: u64) -> Result<u32, StateError> {
        let n: Option<i64> = sqlx::query_scalar("SELECT times FROM resent WHERE seq = ?")
            .bind(seq as i64)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(self.err("reading re-sends"))?;
        Ok(n.unwrap_or(0) as u32)
    }

    /// Counts one more re-send of bundle `seq`.
    pub async fn count_resend(&mut self, seq: u64) -> Result<(), StateError> {
        sqlx::query(
            "INSERT INTO resent (seq, times) VALUES (?, 1)
             ON CONFLICT (seq) DO UPDATE SET times = times + 1",
        )
        .bind(seq as i64)
        .execute(&mut self.conn)
        .await
        .map_err(self.err("counting a re-send"))?;
        Ok(())
    }

    /// The next sequence number (1 for the first bundle).
    pub async fn next_seq(&mut self) -> Result<Seq, StateError> {
        Ok(Seq(self.last(None).await?.map_or(1, |b| b.seq + 1)))
    }

    /// The newest `limit` bundles, newest first.
    pub async fn history(&mut self, limit: u32) -> Result<Vec<(u64, String, String)>, StateError> {
        let rows: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT seq, kind, file FROM bundles ORDER BY seq DESC LIMIT ?")
                .bind(limit as i64)
                .fetch_all(&mut self.conn)
                .await
                .map_err(self.err("reading bundles"))?;
        Ok(rows.into_iter().map(|(s, k, f)| (s as u64, k, f)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_state_begins_a_chain_and_an_older_one_keeps_the_empty_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut fresh = State::open(dir.path()).await.unwrap();
        let chain = fresh.chain().await.unwrap();
        assert!(ferry_common::manifest::is_chain(&chain), "{chain}");
        drop(fresh);
        // Reopened: the same chain.
        assert_eq!(
            State::open(dir.path())
                .await
                .unwrap()
                .chain()
                .await
                .unwrap(),
            chain
        );

        // A state from before chains: it has bundles and no chain.
        let old = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            old.path().join("state.db").display()
        );
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE bundles (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
               file TEXT NOT NULL, base_seq INTEGER NOT NULL, created_at TEXT NOT NULL,
               rows INTEGER NOT NULL, bytes INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
               schema_fingerprint TEXT NOT NULL);
             INSERT INTO bundles VALUES (1, 'complete', 'app-000000000001-complete.tar.zst',
               1, '2026-01-01', 1, 1, 1, 'x');",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        drop(conn);
        let mut upgraded = State::open(old.path()).await.unwrap();
        assert_eq!(upgraded.chain().await.unwrap(), "");
    }
}
