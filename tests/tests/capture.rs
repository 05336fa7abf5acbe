//! Change capture against a real PostgreSQL server, through the sender's jobs
//! and the receiver's loaders: deletes of equal keys in several tables (one
//! partial and across partials, integer, composite and text keys, rows deleted,
//! re-inserted and deleted again) all reach the copy; identical upsert lines in
//! two tables both travel; and tables whose names and columns are the words
//! ferry's own SQL uses (`x`, `t`, `k`, `key`, `row`, …) survive a complete, a
//! partial, delete capture and the load.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_common::manifest::Kind;
use ferry_sender::Config;
use ferry_sender::job;
use ferry_tests::Rng;
use ferry_tests::loader::apply;
use ferry_tests::pg::{PgServer, exec};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use std::path::{Path, PathBuf};

struct Fixture {
    server: PgServer,
    dir: tempfile::TempDir,
    config: Config,
    src: PgConnection,
    copy: PgConnection,
}

impl Fixture {
    async fn new(schema: &str) -> Self {
        let server = PgServer::start();
        let src = server.create_db("app", schema).await;
        let copy = server.create_db("copy", "").await;
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n\
             [partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\ndeletes = \"trigger\"\n",
            dir.path().join("state"),
            server.url("app"),
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        Self {
            server,
            dir,
            config,
            src,
            copy,
        }
    }

    fn bundle(&self, seq: u64, kind: Kind) -> PathBuf {
        let outbox = self.dir.path().join("state/outbox");
        outbox.join(ferry_tests::name_in(&outbox, "app", seq, kind))
    }

    /// Takes a bundle of `kind` and applies it to the copy; returns its seq
    /// (`None`: the partial found nothing to send).
    async fn ship(&mut self, kind: Kind) -> Option<u64> {
        let out = job::run(&self.config, kind).await.expect("job");
        let seq = out.seq?;
        apply(&self.server.url("copy"), &self.bundle(seq, kind)).await;
        Some(seq)
    }

    async fn sql(&mut self, sql: &str) {
        exec(&mut self.src, sql).await;
    }

    /// Every listed table is identical, row for row, in the source and the copy.
    async fn assert_same(&mut self, tables: &[&str]) {
        for t in tables {
            let (a, b) = (rows(&mut self.src, t).await, rows(&mut self.copy, t).await);
            assert_eq!(a, b, "table {t} differs between source and copy");
        }
    }
}

/// Every row of a table as JSON text, sorted (works whatever the columns are named).
async fn rows(conn: &mut PgConnection, table: &str) -> Vec<String> {
    let sql = format!("SELECT to_jsonb(r.*)::text FROM {table} r ORDER BY 1");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(conn)
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"))
}

const EQUAL_KEYS: &str = "
CREATE TABLE a (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE b (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE c1 (n int, s text, v text, updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (n, s));
CREATE TABLE c2 (n int, s text, v text, updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (n, s));
CREATE TABLE t1 (code text PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE t2 (code text PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO a SELECT i, 'a' || i FROM generate_series(1, 10) i;
INSERT INTO b SELECT i, 'b' || i FROM generate_series(1, 10) i;
INSERT INTO c1 SELECT i, 'k' || i, 'c1' FROM generate_series(1, 10) i;
INSERT INTO c2 SELECT i, 'k' || i, 'c2' FROM generate_series(1, 10) i;
INSERT INTO t1 SELECT 'code ' || i FROM generate_series(1, 10) i;
INSERT INTO t2 SELECT 'code ' || i FROM generate_series(1, 10) i;
";

const EQUAL_TABLES: [&str; 6] = ["a", "b", "c1", "c2", "t1", "t2"];

#[tokio::test]
async fn deletes_of_equal_keys_in_several_tables_all_reach_the_copy() {
    let mut fx = Fixture::new(EQUAL_KEYS).await;
    fx.ship(Kind::Complete).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;

    // The issue's sequence: the same key deleted in a, then in b, one partial each.
    fx.sql("DELETE FROM a WHERE id = 5").await;
    assert!(fx.ship(Kind::Partial).await.is_some());
    fx.sql("DELETE FROM b WHERE id = 5").await;
    assert!(
        fx.ship(Kind::Partial).await.is_some(),
        "the delete of b.5 must make a bundle although a.5's delete line was identical"
    );
    fx.assert_same(&EQUAL_TABLES).await;

    // Composite and text keys, across partials.
    fx.sql("DELETE FROM c1 WHERE n = 3; DELETE FROM t1 WHERE code = 'code 3'")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.sql("DELETE FROM c2 WHERE n = 3; DELETE FROM t2 WHERE code = 'code 3'")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;

    // Equal keys in every table in one partial.
    fx.sql(
        "DELETE FROM a WHERE id = 7; DELETE FROM b WHERE id = 7;
         DELETE FROM c1 WHERE n = 7; DELETE FROM c2 WHERE n = 7;
         DELETE FROM t1 WHERE code = 'code 7'; DELETE FROM t2 WHERE code = 'code 7'",
    )
    .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;

    // Identical upsert lines in two tables (same columns, same values), one
    // partial apart. A change time in the future keeps the rows inside every
    // partial's window, as a late-committing writer's rows are.
    fx.sql(
        "INSERT INTO a VALUES (100, 'same', '2099-01-01T00:00:00Z');
         INSERT INTO c1 VALUES (100, 'same', 'same', '2099-01-01T00:00:00Z')",
    )
    .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.sql(
        "INSERT INTO b VALUES (100, 'same', '2099-01-01T00:00:00Z');
         INSERT INTO c2 VALUES (100, 'same', 'same', '2099-01-01T00:00:00Z')",
    )
    .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;

    // Deleted, re-inserted, deleted again: each delete line equals an earlier one.
    fx.sql("DELETE FROM a WHERE id = 2; DELETE FROM b WHERE id = 2")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.sql("INSERT INTO a VALUES (2, 'again'); INSERT INTO b VALUES (2, 'again')")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;
    fx.sql("DELETE FROM a WHERE id = 2").await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.sql("DELETE FROM b WHERE id = 2").await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;
    // Deleted and re-inserted between two partials: the copy holds the new row.
    fx.sql("DELETE FROM a WHERE id = 4; INSERT INTO a VALUES (4, 'back')")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;

    // Nothing changed: no bundle (the dedup still works within a table).
    assert_eq!(fx.ship(Kind::Partial).await, None);
}

/// Table and column names that ferry's generated SQL uses as aliases, or that
/// need quoting.
const AWKWARD: &str = r#"
CREATE TABLE "x" (
  "t" int, "key" text, "x" text, "k" int, "d" text, "r" int, "op" text, "row" text,
  "MixedCase" text, "with ""quote""" text, "with space" text, "select" text,
  "order" int, updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY ("t", "key"));
CREATE TABLE "Row Table" (
  "key" int PRIMARY KEY, "x" int, "t" text,
  updated_at timestamptz NOT NULL DEFAULT now(),
  FOREIGN KEY ("x", "t") REFERENCES "x" ("t", "key"));
"#;

#[tokio::test]
async fn identifiers_named_like_ferrys_aliases_survive_every_path() {
    let mut fx = Fixture::new(AWKWARD).await;
    let tables = [r#""x""#, r#""Row Table""#];
    fx.sql(
        r#"INSERT INTO "x" SELECT i, 'k' || i, 'x' || i, i, 'd', i, 'op', 'row', 'M',
              'q"uote', 'sp ace', 'sel', i FROM generate_series(1, 20) i;
           INSERT INTO "Row Table" SELECT i, i, 'k' || i FROM generate_series(1, 20) i"#,
    )
    .await;
    fx.ship(Kind::Complete).await.unwrap();
    fx.assert_same(&tables).await;

    fx.sql(
        r#"UPDATE "x" SET "x" = 'changed', updated_at = now() WHERE "t" <= 3;
           DELETE FROM "Row Table" WHERE "key" IN (4, 5);
           DELETE FROM "x" WHERE "t" IN (4, 5);
           INSERT INTO "x" ("t", "key", "x", "row") VALUES (50, 'k50', 'new', 'r');
           INSERT INTO "Row Table" VALUES (50, 50, 'k50');
           UPDATE "Row Table" SET updated_at = now() WHERE "key" = 6"#,
    )
    .await;
    let seq = fx.ship(Kind::Partial).await.unwrap();
    assert_eq!(seq, 2);
    fx.assert_same(&tables).await;
    fx.sql(r#"DELETE FROM "Row Table" WHERE "key" = 50; DELETE FROM "x" WHERE "t" = 50"#)
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&tables).await;
}

const PROP_SCHEMA: &str = "
CREATE TABLE parent (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id) ON DELETE CASCADE,
                    v text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE other (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE pair (a int, b text, v text, updated_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (a, b));
CREATE INDEX ON parent (updated_at); CREATE INDEX ON child (updated_at);
CREATE INDEX ON other (updated_at); CREATE INDEX ON pair (updated_at);
";

const PROP_TABLES: [&str; 4] = ["parent", "child", "other", "pair"];

/// One random statement. Keys come from a small range, so equal keys meet in
/// every table and deleted rows come back.
fn random_op(rng: &mut Rng) -> String {
    let id = rng.below(25) + 1;
    let v = format!("v{}", rng.below(1000));
    let table = ["parent", "child", "other"][rng.below(3) as usize];
    match rng.below(10) {
        0..=2 if table == "child" => format!(
            "INSERT INTO child SELECT {id}, p.id, '{v}' FROM parent p WHERE p.id = {}
             ON CONFLICT DO NOTHING",
            rng.below(25) + 1
        ),
        0..=2 => format!("INSERT INTO {table} (id, v) VALUES ({id}, '{v}') ON CONFLICT DO NOTHING"),
        3..=5 => format!("UPDATE {table} SET v = '{v}', updated_at = now() WHERE id = {id}"),
        6 => format!(
            "INSERT INTO pair (a, b, v) VALUES ({}, 'k{}', '{v}')
             ON CONFLICT (a, b) DO UPDATE SET v = excluded.v, updated_at = now()",
            rng.below(5),
            rng.below(5)
        ),
        7 => format!(
            "DELETE FROM pair WHERE a = {} AND b = 'k{}'",
            rng.below(5),
            rng.below(5)
        ),
        // Re-parent a child: the new parent must travel with it.
        8 => format!(
            "UPDATE child SET parent_id = (SELECT id FROM parent ORDER BY id OFFSET {} LIMIT 1),
                              updated_at = now() WHERE id = {id}",
            rng.below(5)
        ),
        _ => format!("DELETE FROM {table} WHERE id = {id}"),
    }
}

/// Random interleavings of inserts, updates, deletes and re-inserts across
/// tables with a foreign key and equal keys, some in a transaction that is
/// still open while the partial is taken and commits after it (a late commit);
/// after every partial the copy equals what the source shows, row for row.
/// `FERRY_PROP_SEED` and `FERRY_PROP_ROUNDS` replay or lengthen a run
/// (tests/chaos/capture-hunt runs it long).
#[tokio::test]
async fn random_workloads_converge_after_every_partial() {
    let seed: u64 = std::env::var("FERRY_PROP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f3e1);
    let rounds: u64 = std::env::var("FERRY_PROP_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let mut rng = Rng(seed | 1);
    let mut fx = Fixture::new(PROP_SCHEMA).await;
    let mut late_conn = fx.server.connect("app").await;
    fx.ship(Kind::Complete).await.unwrap();
    let mut bundles = 0;
    for round in 0..rounds {
        for _ in 0..rng.below(30) {
            let op = random_op(&mut rng);
            fx.sql(&op).await;
        }
        // A transaction that began before the partial and commits after it.
        let late = rng.below(3) == 0;
        if late {
            let mut ops = String::from("BEGIN;");
            for _ in 0..rng.below(6) + 1 {
                ops.push_str(&random_op(&mut rng));
                ops.push(';');
            }
            exec(&mut late_conn, &ops).await;
        }
        if rng.below(12) == 0 {
            fx.ship(Kind::Complete).await.unwrap();
        } else if fx.ship(Kind::Partial).await.is_some() {
            bundles += 1;
        }
        for t in PROP_TABLES {
            let (a, b) = (rows(&mut fx.src, t).await, rows(&mut fx.copy, t).await);
            assert_eq!(
                a, b,
                "seed {seed}, round {round}: table {t} differs between source and copy"
            );
        }
        if late {
            exec(&mut late_conn, "COMMIT").await;
        }
    }
    // The last late commit arrives with one more partial.
    fx.ship(Kind::Partial).await;
    fx.assert_same(&PROP_TABLES).await;
    eprintln!("seed {seed}: {rounds} rounds, {bundles} partials, source = copy after each");
}

/// The application writes as its own role, which has no right on ferry's
/// schema (the sender owns the tables and installs capture): the app's
/// DELETEs must succeed — capture runs with its owner's rights — and reach
/// the copy. Before, every app transaction with a DELETE failed with
/// "permission denied for schema ferry" and rolled back the app's other writes.
#[tokio::test]
async fn delete_capture_never_makes_the_apps_writes_fail() {
    let mut fx = Fixture::new(EQUAL_KEYS).await;
    fx.sql(
        "CREATE ROLE app LOGIN;
         GRANT USAGE ON SCHEMA public TO app;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app;",
    )
    .await;
    fx.ship(Kind::Complete).await.unwrap(); // installs ferry.deleted_rows and the triggers
    let url = fx.server.url("app").replace("postgres@", "app@");
    let mut app = sqlx::PgConnection::connect(&url).await.unwrap();
    // One app transaction: an insert, an update and a delete together.
    sqlx::raw_sql(
        "BEGIN; INSERT INTO a VALUES (50, 'new'); UPDATE b SET v = 'upd', updated_at = now()
         WHERE id = 1; DELETE FROM a WHERE id = 3; DELETE FROM c1 WHERE n = 3; COMMIT;",
    )
    .execute(&mut app)
    .await
    .expect("the app's transaction must not fail because of delete capture");
    // The app role still has no right on ferry's schema.
    let usage: bool = sqlx::query_scalar("SELECT has_schema_privilege('app', 'ferry', 'USAGE')")
        .fetch_one(&mut fx.src)
        .await
        .unwrap();
    assert!(!usage);
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;

    // `check` names the roles that delete, and says whether their deletes
    // would fail.
    let path = fx.dir.path().join("sender.toml");
    std::fs::write(
        &path,
        format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n\
             [partial]\nchange_column = \"updated_at\"\n",
            fx.dir.path().join("state"),
            fx.server.url("app"),
        ),
    )
    .unwrap();
    // The `delete capture:` line of `check`.
    let capture_line = || {
        let out = std::process::Command::new(ferry_tests::binary("ferry-sender"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.contains("delete capture:"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{text}"))
    };
    let line = capture_line();
    assert!(
        line.contains("app") && line.contains("as its owner"),
        "{line}"
    );
    fx.sql("ALTER FUNCTION ferry.capture_delete() SECURITY INVOKER")
        .await;
    let line = capture_line();
    assert!(
        line.contains("would fail") && line.contains("not SECURITY DEFINER"),
        "{line}"
    );
}

/// An application schema that happens to be called `ferry` is never touched:
/// with `deletes = "off"` it survives every job (ferry-sender used to run
/// `DROP SCHEMA ferry CASCADE` on every job), it is replicated like any other
/// schema, and capture refuses to use it, naming the fix. ferry-sender's own
/// schema is removed when capture is turned off, and only then.
#[tokio::test]
async fn an_application_schema_named_ferry_is_never_dropped() {
    let mut fx = Fixture::new(&format!(
        "{EQUAL_KEYS}
         CREATE SCHEMA ferry;
         CREATE TABLE ferry.orders (id int PRIMARY KEY, total numeric,
                                    updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO ferry.orders SELECT i, i * 1.5 FROM generate_series(1, 30) i;"
    ))
    .await;
    let text = |deletes: &str| {
        format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n\
             [partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\ndeletes = \"{deletes}\"\n",
            fx.dir.path().join("state"),
            fx.server.url("app"),
        )
    };
    let off = Config::parse(&text("off"), Path::new("t.toml")).unwrap();
    let on = Config::parse(&text("trigger"), Path::new("t.toml")).unwrap();
    fx.config = off;
    fx.ship(Kind::Complete).await.unwrap();
    fx.sql("UPDATE ferry.orders SET total = 0, updated_at = now() WHERE id = 1")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&["ferry.orders", "a"]).await;
    // Capture refuses the application's schema, and changes nothing in it.
    fx.config = on;
    let e = job::run(&fx.config, Kind::Partial).await.unwrap_err();
    assert!(
        e.to_string().contains("application schema named `ferry`"),
        "{e}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ferry.orders")
        .fetch_one(&mut fx.src)
        .await
        .unwrap();
    assert_eq!(n, 30);
}

/// Capture on, then off: ferry-sender removes its triggers, its log, its
/// function and its (marked) schema.
#[tokio::test]
async fn turning_capture_off_removes_only_what_ferry_installed() {
    let mut fx = Fixture::new(EQUAL_KEYS).await;
    fx.ship(Kind::Complete).await.unwrap();
    let installed: bool = sqlx::query_scalar(
        "SELECT obj_description('ferry'::regnamespace, 'pg_namespace') LIKE 'ferry-sender%'",
    )
    .fetch_one(&mut fx.src)
    .await
    .unwrap();
    assert!(installed);
    let text = format!(
        "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n\
         [partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\ndeletes = \"off\"\n",
        fx.dir.path().join("state"),
        fx.server.url("app"),
    );
    fx.config = Config::parse(&text, Path::new("t.toml")).unwrap();
    fx.sql("UPDATE a SET v = 'x', updated_at = now() WHERE id = 1")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    let left: (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = 'ferry_capture_delete'),
                to_regnamespace('ferry') IS NOT NULL",
    )
    .fetch_one(&mut fx.src)
    .await
    .unwrap();
    assert_eq!(left, (0, false));
    fx.assert_same(&EQUAL_TABLES).await;
}

/// A stock Django project's own tables: no `updated_at` anywhere, foreign keys
/// from the app's table into them, a session table bigger than the "small"
/// limit and a table without a primary key.
const DJANGO: &str = r#"
CREATE TABLE django_migrations (id bigserial PRIMARY KEY, app varchar(255) NOT NULL,
  name varchar(255) NOT NULL, applied timestamptz NOT NULL DEFAULT now());
CREATE TABLE django_content_type (id serial PRIMARY KEY, app_label varchar(100) NOT NULL,
  model varchar(100) NOT NULL, UNIQUE (app_label, model));
CREATE TABLE auth_group (id serial PRIMARY KEY, name varchar(150) NOT NULL UNIQUE);
CREATE TABLE auth_user (id serial PRIMARY KEY, username varchar(150) NOT NULL UNIQUE,
  last_login timestamptz);
CREATE TABLE auth_user_groups (id bigserial PRIMARY KEY,
  user_id int NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  group_id int NOT NULL REFERENCES auth_group (id) DEFERRABLE INITIALLY DEFERRED,
  UNIQUE (user_id, group_id));
CREATE TABLE django_session (session_key varchar(40) PRIMARY KEY, session_data text NOT NULL,
  expire_date timestamptz NOT NULL);
CREATE TABLE "AndroidRequests_report" (id serial PRIMARY KEY,
  user_id int REFERENCES auth_user (id), message text,
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE "AndroidRequests_log" (line text);
INSERT INTO django_migrations (app, name) SELECT 'app', 'm' || i FROM generate_series(1, 5) i;
INSERT INTO django_content_type (app_label, model) VALUES ('auth', 'user'), ('auth', 'group');
INSERT INTO auth_group (name) VALUES ('staff'), ('ops');
INSERT INTO auth_user (username) SELECT 'u' || i FROM generate_series(1, 30) i;
INSERT INTO auth_user_groups (user_id, group_id) VALUES (1, 1), (2, 2);
INSERT INTO django_session SELECT 's' || i, 'data', now() FROM generate_series(1, 50) i;
INSERT INTO "AndroidRequests_report" (user_id, message) VALUES (1, 'first');
INSERT INTO "AndroidRequests_log" VALUES ('started');
"#;

/// `include = ["public.*"]` on a stock Django database works with no table
/// stanza: tables without the change column are sent whole when small
/// (inserts, updates and deletes all reach the copy) and in completes only
/// when big, where partials still carry the rows that changed rows reference;
/// `check` lists how each table travels; a pattern stanza covers many tables.
#[tokio::test]
async fn a_stock_django_database_needs_no_table_stanza() {
    let mut fx = Fixture::new(DJANGO).await;
    let (state, url) = (fx.dir.path().join("state"), fx.server.url("app"));
    let conf = |extra: &str| {
        format!(
            "sender_id = \"app\"\nstate_dir = {state:?}\n[source]\nurl = {url:?}\ninclude = [\"public.*\"]\n\
             [partial]\nchange_column = \"updated_at\"\noverlap = \"0s\"\nwhole_max_rows = 40\n{extra}",
        )
    };
    fx.config = Config::parse(&conf(""), Path::new("t.toml")).unwrap();
    let small = [
        "django_migrations",
        "django_content_type",
        "auth_group",
        "auth_user",
        "auth_user_groups",
        r#""AndroidRequests_report""#,
    ];
    fx.ship(Kind::Complete).await.unwrap();
    fx.assert_same(&small).await;
    fx.assert_same(&["django_session", r#""AndroidRequests_log""#])
        .await;

    // The first partial after a complete sends the small tables whole once;
    // then, nothing changed: no bundle (unchanged whole tables are not re-sent).
    fx.ship(Kind::Partial).await.unwrap();
    assert_eq!(fx.ship(Kind::Partial).await, None);

    // Inserts, updates and deletes in the small tables, and a new user in a
    // new group with a report.
    fx.sql(
        "INSERT INTO django_migrations (app, name) VALUES ('app', 'm6');
         DELETE FROM django_migrations WHERE name = 'm2';
         UPDATE django_content_type SET model = 'person' WHERE model = 'user';
         INSERT INTO auth_group (name) VALUES ('new');
         INSERT INTO auth_user (username) VALUES ('newcomer');
         INSERT INTO auth_user_groups (user_id, group_id)
           SELECT u.id, g.id FROM auth_user u, auth_group g
           WHERE u.username = 'newcomer' AND g.name = 'new';
         DELETE FROM auth_user_groups WHERE user_id = 2;
         INSERT INTO \"AndroidRequests_report\" (user_id, message)
           SELECT id, 'from the newcomer' FROM auth_user WHERE username = 'newcomer';",
    )
    .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&small).await;

    // Past the limit auth_user travels in completes only; a report by a new
    // user still brings that user along (the copy never lacks a parent).
    fx.sql(
        "INSERT INTO auth_user (username) SELECT 'more' || i FROM generate_series(1, 20) i;
         INSERT INTO \"AndroidRequests_report\" (user_id, message)
           SELECT id, 'late' FROM auth_user WHERE username = 'more7';",
    )
    .await;
    fx.ship(Kind::Partial).await.unwrap();
    let has =
        |name: &'static str| format!("SELECT count(*) FROM auth_user WHERE username = '{name}'");
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(has("more7")))
        .fetch_one(&mut fx.copy)
        .await
        .unwrap();
    assert_eq!(n, 1, "the referenced user must reach the copy");
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(has("more8")))
        .fetch_one(&mut fx.copy)
        .await
        .unwrap();
    assert_eq!(n, 0, "an unreferenced user waits for the next complete");
    fx.assert_same(&[r#""AndroidRequests_report""#, "auth_user_groups"])
        .await;
    fx.ship(Kind::Complete).await.unwrap();
    fx.assert_same(&small).await;

    // `check` (the binary) lists how each table travels.
    let path = fx.dir.path().join("sender.toml");
    std::fs::write(&path, conf("")).unwrap();
    let out = std::process::Command::new(ferry_tests::binary("ferry-sender"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for want in [
        "public.django_migrations: whole in every partial",
        "public.auth_user: completes only, and in partials the rows that changed rows reference \
         (no change column and more than 40 rows",
        "public.AndroidRequests_log: completes only (no primary key)",
        "public.AndroidRequests_report: change column \"updated_at\"",
    ] {
        assert!(text.contains(want), "check lacks {want:?}:\n{text}");
    }

    // A pattern stanza: every auth table whole, whatever its size; an exact
    // name wins over the pattern.
    fx.config = Config::parse(
        &conf(
            "[partial.tables.\"public.auth_*\"]\npartial = \"whole\"\n\
             [partial.tables.\"public.auth_group\"]\npartial = \"complete\"\n",
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    fx.sql("DELETE FROM auth_user WHERE username = 'more8'; UPDATE auth_group SET name = 'x' WHERE name = 'ops'")
        .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&["auth_user"]).await;
    let ops: i64 = sqlx::query_scalar("SELECT count(*) FROM auth_group WHERE name = 'ops'")
        .fetch_one(&mut fx.copy)
        .await
        .unwrap();
    assert_eq!(ops, 1, "auth_group travels in completes only");

    // The old behaviour on request: a clear error naming the table and the keys.
    fx.config = Config::parse(
        &conf("without_change_column = \"error\"\n"),
        Path::new("t.toml"),
    )
    .unwrap();
    let e = job::run(&fx.config, Kind::Partial)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("table public.auth_user has no change column"),
        "{e}"
    );
    assert!(e.contains("public.auth_*"), "{e}");
}

/// Updates that change a primary key (one row, a composite key, a text key,
/// two rows swapping keys) and rows inserted and deleted between two partials
/// all reach the copy through the set-based apply: capture logs the old key of
/// a key update as deleted.
#[tokio::test]
async fn key_updates_and_rows_born_and_gone_in_one_partial_reach_the_copy() {
    let mut fx = Fixture::new(EQUAL_KEYS).await;
    fx.ship(Kind::Complete).await.unwrap();
    fx.sql(
        "UPDATE a SET id = 1000, updated_at = now() WHERE id = 1;
         UPDATE c1 SET n = 500, updated_at = now() WHERE n = 2;
         UPDATE t1 SET code = 'renamed', updated_at = now() WHERE code = 'code 4';
         INSERT INTO b VALUES (77, 'short-lived'); DELETE FROM b WHERE id = 77;
         UPDATE b SET v = 'not a key', updated_at = now() WHERE id = 8;",
    )
    .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;
    // Two rows swap keys (through a third value, as an application must).
    fx.sql(
        "UPDATE a SET id = -id, updated_at = now() WHERE id IN (2, 3);
         UPDATE a SET id = CASE id WHEN -2 THEN 3 ELSE 2 END, updated_at = now()
         WHERE id IN (-2, -3);",
    )
    .await;
    fx.ship(Kind::Partial).await.unwrap();
    fx.assert_same(&EQUAL_TABLES).await;
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM ferry.deleted_rows")
        .fetch_one(&mut fx.src)
        .await
        .unwrap();
    assert!(logged >= 7, "old keys are logged: {logged}");
}
