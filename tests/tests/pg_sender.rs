//! ferry-sender against a real PostgreSQL server: every value of a type zoo
//! survives a complete and a partial, a late commit is not missed, foreign-key
//! closure is transitive, deletes travel, tables without a primary key are refused
//! with options, and a crash between writing and recording is recovered.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_common::manifest::Kind;
use ferry_sender::Config;
use ferry_sender::job::{self, JobError};
use ferry_tests::fixtures::{ZOO, ZOO_ROWS};
use ferry_tests::loader::{apply, split_change};
use ferry_tests::pg::{PgServer, exec, table_rows};
use ferry_tests::{bundle_contents, outbox_files};
use std::path::{Path, PathBuf};

const TABLES: [&str; 3] = ["zoo", "\"TextKey\"", "composite"];

struct Fixture {
    server: PgServer,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(schema: &str) -> Self {
        let server = PgServer::start();
        server.create_db("app", schema).await;
        Self {
            server,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn config(&self, extra: &str) -> Config {
        let text = format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n{extra}",
            self.state_dir(),
            self.server.url("app"),
        );
        Config::parse(&text, Path::new("test.toml")).expect("valid test config")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn bundle(&self, seq: u64, kind: Kind) -> PathBuf {
        let outbox = self.state_dir().join("outbox");
        outbox.join(ferry_tests::name_in(&outbox, "app", seq, kind))
    }
}

const PARTIAL: &str = "[partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\n";

async fn assert_same(a: &mut sqlx::PgConnection, b: &mut sqlx::PgConnection, tables: &[&str]) {
    for t in tables {
        let (x, y) = (table_rows(a, t).await, table_rows(b, t).await);
        assert!(!x.is_empty(), "{t} is empty on the source");
        assert_eq!(x, y, "table {t} differs between source and copy");
    }
}

#[tokio::test]
async fn type_zoo_survives_complete_and_partial() {
    let fx = Fixture::new(ZOO).await;
    let mut src = fx.server.connect("app").await;
    exec(&mut src, ZOO_ROWS).await;
    let config = fx.config(PARTIAL);

    let out = job::run(&config, Kind::Complete).await.expect("complete");
    assert_eq!(out.seq, Some(1));
    let mut copy = fx.server.create_db("copy", "").await;
    let copy_url = fx.server.url("copy");
    let m = apply(&copy_url, &fx.bundle(1, Kind::Complete)).await;
    assert_eq!(m.rows(), 10);
    assert_same(&mut src, &mut copy, &TABLES).await;
    // Sequences continue where the source's are, so new rows do not collide.
    let next: i32 = sqlx::query_scalar("SELECT nextval('zoo_id_seq')::int")
        .fetch_one(&mut copy)
        .await
        .unwrap();
    assert_eq!(next, 5);

    // Updates, inserts and deletes across all of them.
    exec(
        &mut src,
        r#"UPDATE zoo SET t = E'changed\t\\', num = 'NaN', d = '-0', updated_at = now() WHERE id IN (1, 3);
           INSERT INTO zoo ("camelCase", j, b, arr) VALUES ('new', '{"multi":
             "line"}', '\xdeadbeef', '{7,NULL}');
           DELETE FROM zoo WHERE id = 2;
           UPDATE "TextKey" SET "Label" = 'renamed', updated_at = now() WHERE code = 'y''quote';
           DELETE FROM "TextKey" WHERE code = '';
           DELETE FROM composite WHERE a = 1 AND b = 'two';
           INSERT INTO composite (a, b, v) VALUES (3, 'three', 'v4');"#,
    )
    .await;
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    assert_eq!(out.seq, Some(2));
    let m = apply(&copy_url, &fx.bundle(2, Kind::Partial)).await;
    assert_eq!(m.base_seq.0, 1);
    assert_eq!(m.prev_seq.map(|s| s.0), Some(1));
    assert_same(&mut src, &mut copy, &TABLES).await;

    // Deleting a row and inserting it again with the same key sends the row.
    exec(
        &mut src,
        "DELETE FROM composite WHERE a = 2; INSERT INTO composite (a, b, v) VALUES (2, 'one', 'again');",
    )
    .await;
    job::run(&config, Kind::Partial).await.expect("partial");
    let (_, members) = bundle_contents(&fx.bundle(3, Kind::Partial));
    let lines = String::from_utf8(members["data/public.composite.jsonl"].clone()).unwrap();
    assert!(
        lines.lines().all(|l| split_change(l).0 == "upsert"),
        "{lines}"
    );
    apply(&copy_url, &fx.bundle(3, Kind::Partial)).await;
    assert_same(&mut src, &mut copy, &TABLES).await;

    // Nothing changed: no bundle.
    let out = job::run(&config, Kind::Partial)
        .await
        .expect("empty partial");
    assert_eq!(out.seq, None);
    assert_eq!(outbox_files(&fx.state_dir().join("outbox")).len(), 3);
}

#[tokio::test]
async fn a_late_commit_is_not_missed() {
    let fx = Fixture::new(
        "CREATE TABLE events (id serial PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX ON events (updated_at);
         INSERT INTO events (v) VALUES ('before');",
    )
    .await;
    let config = fx.config(PARTIAL);
    job::run(&config, Kind::Complete).await.expect("complete");

    // A writer stamps its row with now() (its transaction start) and commits late.
    let mut late = fx.server.connect("app").await;
    exec(&mut late, "BEGIN; INSERT INTO events (v) VALUES ('late');").await;
    let mut other = fx.server.connect("app").await;
    exec(&mut other, "INSERT INTO events (v) VALUES ('on time');").await;

    let out = job::run(&config, Kind::Partial).await.expect("partial 1");
    let (m, members) = bundle_contents(out.file.as_deref().unwrap());
    let first = String::from_utf8(members["data/public.events.jsonl"].clone()).unwrap();
    assert!(
        first.contains("on time") && !first.contains("\"late\""),
        "{first}"
    );
    // The watermark stayed at or before the open transaction's start.
    let started: String = sqlx::query_scalar(
        "SELECT xact_start::text FROM pg_stat_activity WHERE query LIKE '%''late''%'",
    )
    .fetch_one(&mut other)
    .await
    .unwrap();
    let wm = m.watermarks["public.events"].clone().unwrap();
    let ok: bool = sqlx::query_scalar("SELECT $1::timestamptz <= $2::timestamptz")
        .bind(&wm)
        .bind(&started)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert!(
        ok,
        "watermark {wm} is past the open transaction's start {started}"
    );

    exec(&mut late, "COMMIT").await;
    let out = job::run(&config, Kind::Partial).await.expect("partial 2");
    let (_, members) = bundle_contents(out.file.as_deref().unwrap());
    let second = String::from_utf8(members["data/public.events.jsonl"].clone()).unwrap();
    assert!(
        second.contains("\"late\""),
        "the late row was lost: {second}"
    );
}

#[tokio::test]
async fn referenced_rows_travel_transitively() {
    let fx = Fixture::new(
        "CREATE TABLE region (id int PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE city (id int PRIMARY KEY, region_id int REFERENCES region(id), name text, updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE report (id int PRIMARY KEY, city_id int REFERENCES city(id), body text, updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE node (id int PRIMARY KEY, parent_id int REFERENCES node(id), updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO region (id, name) VALUES (1, 'r1');",
    )
    .await;
    let config = fx.config(PARTIAL);
    job::run(&config, Kind::Complete).await.expect("complete");
    // Parents whose change column is old (as after a bulk import): not "changed".
    let mut src = fx.server.connect("app").await;
    exec(
        &mut src,
        "INSERT INTO region (id, name, updated_at) VALUES (2, 'r2', '2000-01-01');
         INSERT INTO city (id, region_id, name, updated_at) VALUES (20, 2, 'c20', '2000-01-01');
         INSERT INTO node (id, parent_id, updated_at) VALUES (1, NULL, '2000-01-01'), (2, 1, '2000-01-01');
         INSERT INTO report (id, city_id, body) VALUES (200, 20, 'news');
         INSERT INTO node (id, parent_id) VALUES (3, 2);",
    )
    .await;
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    let (_, members) = bundle_contents(out.file.as_deref().unwrap());
    let get =
        |t: &str| String::from_utf8(members[&format!("data/public.{t}.jsonl")].clone()).unwrap();
    assert!(get("report").contains("\"id\":200"));
    assert!(
        get("city").contains("\"id\":20"),
        "city 20 missing: {}",
        get("city")
    );
    assert!(
        get("region").contains("\"id\":2,"),
        "region 2 missing: {}",
        get("region")
    );
    assert!(
        !get("region").contains("\"id\":1,"),
        "unreferenced region 1 sent"
    );
    let nodes = get("node");
    for id in [1, 2, 3] {
        assert!(
            nodes.contains(&format!("\"id\":{id},")),
            "node {id} missing: {nodes}"
        );
    }
}

#[tokio::test]
async fn tables_without_a_primary_key_are_refused_with_options() {
    let fx = Fixture::new(
        "CREATE TABLE audit_log (at timestamptz NOT NULL DEFAULT now(), what text);
         CREATE TABLE events (at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz);
         CREATE TABLE items (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO audit_log (what) VALUES ('x'); INSERT INTO items (id) VALUES (1);",
    )
    .await;
    // A table with the change column but no key cannot travel in partials.
    let config = fx.config("[partial]\nchange_column = \"updated_at\"\n");
    let err = job::run(&config, Kind::Complete)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("public.events has no primary key"), "{err}");
    assert!(
        err.contains("partial = \"complete\"") && err.contains("exclude"),
        "{err}"
    );
    // One without either travels in completes only, unless the operator asked
    // for every table to have a change column.
    assert!(!err.contains("audit_log"), "{err}");
    let config = fx.config(
        "exclude = [\"public.events\"]\n[partial]\nchange_column = \"updated_at\"\n\
         without_change_column = \"error\"\n",
    );
    let err = job::run(&config, Kind::Complete)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("table public.audit_log has no change column \"updated_at\""),
        "{err}"
    );

    let config = fx.config(
        "exclude = [\"public.events\"]\n[partial]\nchange_column = \"updated_at\"\n\
         [partial.tables.\"public.audit_log\"]\npartial = false\n",
    );
    let out = job::run(&config, Kind::Complete).await.expect("complete");
    let (m, members) = bundle_contents(out.file.as_deref().unwrap());
    assert!(members.contains_key("data/public.audit_log.copy"));
    assert!(
        m.tables
            .iter()
            .any(|t| t.name.name == "audit_log" && t.change_column.is_none())
    );
    let mut src = fx.server.connect("app").await;
    exec(&mut src, "INSERT INTO items (id) VALUES (2)").await;
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    let (_, members) = bundle_contents(out.file.as_deref().unwrap());
    assert!(!members.contains_key("data/public.audit_log.jsonl"));
}

#[tokio::test]
async fn integer_change_columns_are_refused_on_postgres() {
    let fx = Fixture::new("CREATE TABLE t (id serial PRIMARY KEY, v text);").await;
    let config = fx.config("[partial]\nchange_column = \"id\"\n");
    let err = job::run(&config, Kind::Complete)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must be a timestamp") && err.contains("commits late"),
        "{err}"
    );
}

#[tokio::test]
async fn a_partial_needs_a_complete_and_schema_drift_forces_one() {
    let fx = Fixture::new(
        "CREATE TABLE t (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO t (id) VALUES (1);",
    )
    .await;
    let config = fx.config(PARTIAL);
    let err = job::run(&config, Kind::Partial).await.unwrap_err();
    assert!(matches!(err, JobError::NoComplete), "{err}");
    job::run(&config, Kind::Complete).await.expect("complete");
    let mut src = fx.server.connect("app").await;
    exec(
        &mut src,
        "ALTER TABLE t ADD COLUMN extra text; INSERT INTO t (id) VALUES (2);",
    )
    .await;
    let out = job::run(&config, Kind::Partial).await.expect("partial");
    assert_eq!(
        out.kind,
        Kind::Complete,
        "schema drift must force a complete"
    );
    assert!(out.note.unwrap().contains("schema changed"));
}

#[tokio::test]
async fn a_bundle_written_but_not_recorded_is_adopted() {
    let fx = Fixture::new(
        "CREATE TABLE t (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO t (id) VALUES (1);",
    )
    .await;
    let config = fx.config(PARTIAL);
    job::run(&config, Kind::Complete).await.expect("complete");
    // Simulate a crash after the rename, before the state commit.
    let db = fx.state_dir().join("state.db");
    let mut state = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::raw_sql("DELETE FROM bundles; DELETE FROM watermarks;")
        .execute(&mut state)
        .await
        .unwrap();
    drop(state);
    let mut src = fx.server.connect("app").await;
    exec(&mut src, "INSERT INTO t (id) VALUES (2)").await;
    let out = job::run(&config, Kind::Partial)
        .await
        .expect("partial after adoption");
    assert_eq!(
        out.seq,
        Some(2),
        "the sequence must continue after the adopted bundle"
    );
    let (m, _) = bundle_contents(out.file.as_deref().unwrap());
    assert_eq!(m.base_seq.0, 1);
}

use sqlx::Connection;
