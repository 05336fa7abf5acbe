//! ferry-sender on the embedded default, SQLite: complete and partial round trips
//! (integers, reals, text, blobs, NULLs), deletes through the sender's triggers,
//! foreign-key closure, media files new and changed.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_common::manifest::{DataFormat, Kind, Role};
use ferry_sender::Config;
use ferry_sender::job;
use ferry_tests::bundle_contents;
use ferry_tests::loader::{apply, sqlite_rows};
use sqlx::{Connection, SqliteConnection};
use std::path::Path;

async fn open(path: &Path, create: bool) -> SqliteConnection {
    let url = format!(
        "sqlite://{}{}",
        path.display(),
        if create { "?mode=rwc" } else { "" }
    );
    SqliteConnection::connect(&url).await.expect("open SQLite")
}

async fn exec(conn: &mut SqliteConnection, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
}

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
CREATE TABLE author (id INTEGER PRIMARY KEY, name TEXT NOT NULL, updated_at DATETIME NOT NULL);
CREATE TABLE "AndroidRequests_report" (
  id INTEGER PRIMARY KEY,
  author_id INTEGER REFERENCES author(id),
  score REAL,
  body TEXT,
  photo BLOB,
  "timeStamp" DATETIME NOT NULL);
CREATE INDEX report_ts ON "AndroidRequests_report" ("timeStamp");
CREATE TABLE tag (name TEXT, lang TEXT, note TEXT, updated_at TEXT NOT NULL, PRIMARY KEY (name, lang));
INSERT INTO author VALUES (1, 'ann', '2024-01-01 10:00:00.000000'), (2, 'bob', '2024-01-01 10:00:00.000000');
INSERT INTO "AndroidRequests_report" VALUES
 (1, 1, -0.0, 'tab	and
newline \ backslash', X'00FF10', '2024-01-01 10:00:00.000000'),
 (2, 2, 1.5e300, '', X'', '2024-01-01 10:00:00.000000'),
 (3, NULL, NULL, NULL, NULL, '2024-01-01 10:00:00.000000');
INSERT INTO tag VALUES ('a', 'en', 'x', '2024-01-01T10:00:00'), ('a', 'de', NULL, '2024-01-01T10:00:00');
"#;

const TABLES: [&str; 3] = ["author", "AndroidRequests_report", "tag"];

async fn assert_same(a: &mut SqliteConnection, b: &mut SqliteConnection) {
    for t in TABLES {
        let (x, y) = (sqlite_rows(a, t).await, sqlite_rows(b, t).await);
        assert_eq!(x, y, "table {t} differs");
    }
}

#[tokio::test]
async fn sqlite_complete_and_partials_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.sqlite3");
    let media = dir.path().join("media");
    std::fs::create_dir_all(media.join("2024")).unwrap();
    std::fs::write(media.join("2024/a.jpg"), b"jpeg-a").unwrap();
    let mut src = open(&db, true).await;
    exec(&mut src, SCHEMA).await;
    let text = format!(
        r#"sender_id = "app"
state_dir = {:?}
[source]
url = "sqlite://{}"
[partial]
change_column = "updated_at"
overlap = "0s"
[partial.tables."AndroidRequests_report"]
change_column = "timeStamp"
[[media]]
name = "images"
path = {:?}
"#,
        dir.path().join("state"),
        db.display(),
        media
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();

    let out = job::run(&config, Kind::Complete).await.expect("complete");
    let (m, members) = bundle_contents(out.file.as_deref().unwrap());
    assert_eq!(m.source.engine, "sqlite");
    assert_eq!(members["media/images/2024/a.jpg"], b"jpeg-a");
    assert!(
        m.members
            .iter()
            .all(|x| x.role != Role::Data || x.format == Some(DataFormat::JsonLines))
    );
    let copy_path = dir.path().join("copy.sqlite3");
    let copy_url = format!("sqlite://{}", copy_path.display());
    apply(&copy_url, out.file.as_deref().unwrap()).await;
    let mut copy = open(&copy_path, true).await;
    assert_same(&mut src, &mut copy).await;

    // A new parent row stamped in the past travels with the child that references it.
    exec(
        &mut src,
        r#"INSERT INTO author VALUES (3, 'cy', '2000-01-01 00:00:00.000000');
           INSERT INTO "AndroidRequests_report" VALUES (4, 3, 2.25, 'new', X'CAFE', '2024-06-01 09:00:00.000000');
           UPDATE "AndroidRequests_report" SET body = 'edited', "timeStamp" = '2024-06-01 09:00:01.000000' WHERE id = 2;
           DELETE FROM "AndroidRequests_report" WHERE id = 3;
           DELETE FROM tag WHERE lang = 'de';
           INSERT INTO tag VALUES ('k', 'fr', NULL, '2024-01-01T10:00:00');
           UPDATE tag SET name = 'kk', updated_at = '2024-06-01T09:00:00' WHERE name = 'k';
           UPDATE tag SET note = 'y', updated_at = '2024-06-01T09:00:00' WHERE lang = 'en';"#,
    )
    .await;
    std::fs::write(media.join("2024/a.jpg"), b"jpeg-a-changed").unwrap();
    std::fs::write(media.join("b.png"), b"png").unwrap();
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    let (m, members) = bundle_contents(out.file.as_deref().unwrap());
    assert_eq!(m.kind, Kind::Partial);
    assert!(String::from_utf8_lossy(&members["data/author.jsonl"]).contains("\"cy\""));
    assert_eq!(members["media/images/2024/a.jpg"], b"jpeg-a-changed");
    assert_eq!(members["media/images/b.png"], b"png");
    apply(&copy_url, out.file.as_deref().unwrap()).await;
    assert_same(&mut src, &mut copy).await;

    // A key update: the old key leaves the copy.
    exec(
        &mut src,
        "UPDATE tag SET name = 'z', updated_at = '2024-06-02T09:00:00' WHERE name = 'a' AND lang = 'en'",
    )
    .await;
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    apply(&copy_url, out.file.as_deref().unwrap()).await;
    assert_same(&mut src, &mut copy).await;

    // Unchanged media is not sent again; nothing changed means no bundle.
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    assert_eq!(out.seq, None);
}

/// Column and table names that ferry's SQL uses as aliases, or that need
/// quoting (a double quote, a space, reserved words), on the embedded engine.
#[tokio::test]
async fn sqlite_awkward_identifiers_survive_complete_partial_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.sqlite3");
    let mut src = open(&db, true).await;
    exec(
        &mut src,
        r#"PRAGMA journal_mode = WAL;
        CREATE TABLE "x" ("t" INTEGER, "key" TEXT, "x" TEXT, "k" INTEGER, "d" TEXT,
          "j" TEXT, "value" TEXT, "op" TEXT, "row" TEXT, "with ""quote""" TEXT,
          "with space" TEXT, "select" TEXT, updated_at TEXT NOT NULL,
          PRIMARY KEY ("t", "with ""quote"""));
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10)
        INSERT INTO "x" SELECT i, 'k', 'x', 1, 'd', 'j', 'v', 'op', 'row', 'q' || i,
          's p', 'sel', '2024-01-01T10:00:00' FROM n;"#,
    )
    .await;
    let text = format!(
        "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}\"\n\
         [partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\n",
        dir.path().join("state"),
        db.display(),
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();
    let copy_path = dir.path().join("copy.sqlite3");
    let copy_url = format!("sqlite://{}", copy_path.display());
    let out = job::run(&config, Kind::Complete).await.expect("complete");
    apply(&copy_url, out.file.as_deref().unwrap()).await;
    let mut copy = open(&copy_path, true).await;
    let same = |a: Vec<String>, b: Vec<String>| assert_eq!(a, b, "table x differs");
    same(
        sqlite_rows(&mut src, "x").await,
        sqlite_rows(&mut copy, "x").await,
    );

    exec(
        &mut src,
        r#"UPDATE "x" SET "x" = 'changed', updated_at = '2024-06-01T00:00:00' WHERE "t" <= 3;
           DELETE FROM "x" WHERE "t" IN (4, 5);
           INSERT INTO "x" ("t", "with ""quote""", "row", updated_at)
             VALUES (50, 'q50', 'r', '2024-06-01T00:00:00');"#,
    )
    .await;
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    let (_, members) = bundle_contents(out.file.as_deref().unwrap());
    let lines = String::from_utf8_lossy(&members["data/x.jsonl"]).into_owned();
    assert_eq!(lines.matches("\"op\":\"delete\"").count(), 2, "{lines}");
    apply(&copy_url, out.file.as_deref().unwrap()).await;
    same(
        sqlite_rows(&mut src, "x").await,
        sqlite_rows(&mut copy, "x").await,
    );
}

/// On the embedded engine too, a table without the change column travels
/// whole when small: its inserts, updates and deletes all reach the copy
/// (composite key included), with no table stanza.
#[tokio::test]
async fn sqlite_small_tables_without_a_change_column_travel_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.sqlite3");
    let mut src = open(&db, true).await;
    exec(
        &mut src,
        r#"PRAGMA journal_mode = WAL;
        CREATE TABLE settings (name TEXT, scope TEXT, value TEXT, PRIMARY KEY (name, scope));
        CREATE TABLE item (id INTEGER PRIMARY KEY, label TEXT, updated_at TEXT NOT NULL);
        INSERT INTO settings VALUES ('a', 'x', '1'), ('b', 'x', '2'), ('c', 'y', NULL);
        INSERT INTO item VALUES (1, 'one', '2024-01-01T10:00:00');"#,
    )
    .await;
    let text = format!(
        "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}\"\n\
         [partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\n",
        dir.path().join("state"),
        db.display(),
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();
    let copy_path = dir.path().join("copy.sqlite3");
    let copy_url = format!("sqlite://{}", copy_path.display());
    let out = job::run(&config, Kind::Complete).await.expect("complete");
    apply(&copy_url, out.file.as_deref().unwrap()).await;
    let mut copy = open(&copy_path, true).await;
    exec(
        &mut src,
        "DELETE FROM settings WHERE name = 'b'; UPDATE settings SET value = '9' WHERE name = 'a';
         INSERT INTO settings VALUES ('d', 'z', 'new');",
    )
    .await;
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    let (m, _) = bundle_contents(out.file.as_deref().unwrap());
    assert!(m.members.iter().any(|x| x.whole), "settings travels whole");
    apply(&copy_url, out.file.as_deref().unwrap()).await;
    for t in ["settings", "item"] {
        let (x, y) = (
            sqlite_rows(&mut src, t).await,
            sqlite_rows(&mut copy, t).await,
        );
        assert_eq!(x, y, "table {t} differs");
    }
    // Unchanged since the last partial: no bundle.
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    assert_eq!(out.seq, None);
}

/// A table dropped on the source leaves the SQLite copy with the next
/// complete; with `departed_tables = "keep"` it stays.
#[tokio::test]
async fn sqlite_a_table_dropped_on_the_source_leaves_the_copy() {
    for keep in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.sqlite3");
        let mut src = open(&db, true).await;
        exec(
            &mut src,
            "PRAGMA journal_mode = WAL;
             CREATE TABLE a (id INTEGER PRIMARY KEY, updated_at TEXT NOT NULL);
             CREATE TABLE b (id INTEGER PRIMARY KEY, updated_at TEXT NOT NULL);
             INSERT INTO a VALUES (1, '2024-01-01'); INSERT INTO b VALUES (1, '2024-01-01');",
        )
        .await;
        let text = format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}\"\n\
             [partial]\nchange_column = \"updated_at\"\n",
            dir.path().join("state"),
            db.display(),
        );
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        let copy_path = dir.path().join("copy.sqlite3");
        let copy_url = format!("sqlite://{}", copy_path.display());
        let target = if keep {
            "departed_tables = \"keep\"\n"
        } else {
            ""
        };
        let out = job::run(&config, Kind::Complete).await.expect("complete");
        ferry_tests::loader::apply_with(&copy_url, out.file.as_deref().unwrap(), target).await;
        exec(&mut src, "DROP TABLE b").await;
        let out = job::run(&config, Kind::Complete).await.expect("complete");
        ferry_tests::loader::apply_with(&copy_url, out.file.as_deref().unwrap(), target).await;
        let mut copy = open(&copy_path, false).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'b'",
        )
        .fetch_one(&mut copy)
        .await
        .unwrap();
        assert_eq!(n, i64::from(keep), "keep = {keep}");
    }
}
