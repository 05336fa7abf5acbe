//! `ferry-receiver restore` with the real binaries and a real PostgreSQL
//! server: a workload of inserts, updates, deletes, a column added and a table
//! dropped over a dozen bundles, the source's content recorded after each; a
//! restore of every point into a fresh database equals what was recorded, the
//! type zoo included. Chosen tables, `--replace`, media, `--at` by time, and
//! every refusal.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::fixtures::{ZOO, ZOO_ROWS};
use ferry_tests::pg::{PgServer, exec};
use ferry_tests::{binary, bundle_contents, outbox_files};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

const SHOP: &str = "
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
  total numeric(10,2), updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE notes (id serial PRIMARY KEY, body text, updated_at timestamptz NOT NULL DEFAULT now());
";

/// What the source held after one bundle: every table's rows.
type Content = BTreeMap<String, Vec<String>>;

struct Shop {
    server: PgServer,
    dir: tempfile::TempDir,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Shop {
    async fn new() -> Self {
        let server = PgServer::start();
        server
            .create_db("app", &format!("{ZOO}{ZOO_ROWS}{SHOP}"))
            .await;
        server.create_db("viz", "").await;
        let s = Self {
            server,
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(s.path("media-src")).unwrap();
        std::fs::create_dir_all(s.path("inbox")).unwrap();
        std::fs::write(
            s.path("sender.toml"),
            format!(
                "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\n\
                 change_column = \"updated_at\"\noverlap = \"0s\"\n[[media]]\nname = \"images\"\npath = {:?}\n",
                s.path("sstate"),
                s.server.url("app"),
                s.path("media-src")
            ),
        )
        .unwrap();
        std::fs::write(
            s.path("receiver.toml"),
            format!(
                "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n[media]\nimages = {:?}\n",
                s.path("rstate"),
                s.path("inbox"),
                s.server.url("viz"),
                s.path("media-dst")
            ),
        )
        .unwrap();
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn outbox(&self) -> PathBuf {
        self.path("sstate/outbox")
    }

    /// Runs the sender; returns the seq of the bundle it wrote.
    fn send(&self, kind: &str) -> u64 {
        let out = Command::new(binary("ferry-sender"))
            .arg("--config")
            .arg(self.path("sender.toml"))
            .arg(kind)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "sender {kind}: {}", text(&out.stderr));
        outbox_files(&self.outbox())
            .into_iter()
            .filter_map(|n| ferry_common::manifest::parse_bundle_file_name(&n))
            .map(|b| b.seq.0)
            .max()
            .unwrap()
    }

    /// `ferry-receiver restore …` with the receiver's configuration.
    fn restore(&self, args: &[&str]) -> Output {
        Command::new(binary("ferry-receiver"))
            .arg("--config")
            .arg(self.path("receiver.toml"))
            .arg("restore")
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    fn restore_ok(&self, args: &[&str]) -> String {
        let out = self.restore(args);
        assert!(
            out.status.success(),
            "restore {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// A refused restore: exit status 1 or 2, and its message.
    fn restore_refused(&self, args: &[&str]) -> String {
        let out = self.restore(args);
        assert!(
            !out.status.success(),
            "restore {args:?} should be refused: {}",
            text(&out.stdout)
        );
        text(&out.stderr)
    }

    async fn content(&self, db: &str) -> Content {
        ferry_tests::pg::public_content(&mut self.server.connect(db).await).await
    }

    async fn app(&self, sql: &str) {
        let mut conn = self.server.connect("app").await;
        exec(&mut conn, sql).await;
    }
}

async fn empty_db(shop: &Shop, name: &str) -> String {
    shop.server.create_db(name, "").await;
    shop.server.url(name)
}

#[tokio::test]
async fn every_point_of_the_history_restores_exactly() {
    let shop = Shop::new().await;
    let mut recorded: Vec<(u64, Content)> = Vec::new();
    let steps: &[(&str, &str)] = &[
        ("complete", ""),
        (
            "partial",
            "INSERT INTO customers (name) VALUES ('ann'), ('bob'), ('cy');
             INSERT INTO orders (customer_id, total) VALUES (1, 10.50), (2, 20), (2, 3.25);",
        ),
        (
            "partial",
            "UPDATE zoo SET t = 'changed ' || id, updated_at = now() WHERE id <= 2;
             UPDATE orders SET total = total * 2, updated_at = now() WHERE customer_id = 2;",
        ),
        (
            "partial",
            "DELETE FROM orders WHERE id = 1; DELETE FROM zoo WHERE id = 3;",
        ),
        (
            "partial",
            "INSERT INTO notes (body) VALUES ('short-lived'); DELETE FROM notes;
             INSERT INTO notes (body) VALUES (E'kept\\twith tab');",
        ),
        (
            "complete",
            "ALTER TABLE customers ADD COLUMN email text;
             UPDATE customers SET email = name || '@example.com', updated_at = now();",
        ),
        (
            "partial",
            "INSERT INTO customers (name, email) VALUES ('dee', NULL);
             UPDATE composite SET v = 'v1 again', updated_at = now() WHERE a = 1 AND b = 'one';",
        ),
        ("complete", "DROP TABLE \"TextKey\";"),
        (
            "partial",
            "INSERT INTO orders (customer_id, total) VALUES (4, 99.99);
             UPDATE customers SET id = 40, updated_at = now() WHERE id = 3;",
        ),
        (
            "partial",
            "DELETE FROM composite WHERE a = 2; UPDATE zoo SET m = 'sad', updated_at = now();",
        ),
        (
            "partial",
            "DELETE FROM orders; DELETE FROM customers WHERE id = 40;",
        ),
    ];
    for (kind, sql) in steps {
        if !sql.is_empty() {
            shop.app(sql).await;
        }
        let seq = shop.send(kind);
        recorded.push((seq, shop.content("app").await));
    }
    assert!(recorded.len() >= 10);
    let from = shop.outbox();
    let from = from.to_str().unwrap();
    for (seq, want) in &recorded {
        let url = empty_db(&shop, &format!("r{seq}")).await;
        let out = shop.restore_ok(&["--at", &seq.to_string(), "--into", &url, "--from", from]);
        assert!(out.contains(&format!("as of #{seq}")), "{out}");
        let got = shop.content(&format!("r{seq}")).await;
        assert_eq!(&got, want, "restore at #{seq} differs from the source then");
    }
    // `latest` is the newest point.
    let url = empty_db(&shop, "rlatest").await;
    shop.restore_ok(&["--into", &url, "--from", from]);
    assert_eq!(shop.content("rlatest").await, recorded.last().unwrap().1);
}

#[tokio::test]
async fn chosen_tables_replace_media_time_and_refusals() {
    let shop = Shop::new().await;
    std::fs::write(shop.path("media-src/a.jpg"), b"first image").unwrap();
    shop.app(
        "INSERT INTO customers (name) VALUES ('ann'), ('bob');
              INSERT INTO orders (customer_id, total) VALUES (1, 1), (2, 2);",
    )
    .await;
    let first = shop.send("complete");
    let at_first = shop.content("app").await;
    std::fs::write(shop.path("media-src/b.jpg"), b"second image").unwrap();
    shop.app(
        "UPDATE customers SET name = 'ann 2', updated_at = now() WHERE id = 1;
              INSERT INTO orders (customer_id, total) VALUES (1, 3);",
    )
    .await;
    let second = shop.send("partial");
    let at_second = shop.content("app").await;
    shop.app("DELETE FROM orders WHERE customer_id = 2; DELETE FROM customers WHERE id = 2;")
        .await;
    let third = shop.send("partial");
    // The receiver applies them all: its inbox is the history.
    for f in outbox_files(&shop.outbox()) {
        std::fs::copy(shop.outbox().join(&f), shop.path("inbox").join(&f)).unwrap();
    }
    let out = Command::new(binary("ferry-receiver"))
        .arg("--config")
        .arg(shop.path("receiver.toml"))
        .arg("load")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Chosen tables, from the receiver's own history (no --from).
    let url = empty_db(&shop, "two").await;
    let out = shop.restore_ok(&[
        "--at",
        &second.to_string(),
        "--into",
        &url,
        "--table",
        "customers",
        "--table",
        "public.ord*",
    ]);
    assert!(out.contains("2 table(s)"), "{out}");
    let got = shop.content("two").await;
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        vec!["customers".to_owned(), "orders".to_owned()]
    );
    assert_eq!(got["customers"], at_second["customers"]);
    assert_eq!(got["orders"], at_second["orders"]);

    // --at by time: the source time of the second bundle picks it, a moment
    // before it picks the first.
    let name = ferry_tests::name_in(
        &shop.outbox(),
        "app",
        second,
        ferry_common::manifest::Kind::Partial,
    );
    let t = bundle_contents(&shop.outbox().join(&name)).0.created_at;
    let url = empty_db(&shop, "bytime").await;
    let out = shop.restore_ok(&["--at", &t.to_rfc3339(), "--into", &url, "--dry-run"]);
    assert!(out.contains(&format!("as of #{second}")), "{out}");
    let before = (t - chrono::Duration::microseconds(1)).to_rfc3339();
    let out = shop.restore_ok(&["--at", &before, "--into", &url, "--dry-run"]);
    assert!(out.contains(&format!("as of #{first}")), "{out}");
    // A dry run changed nothing.
    assert!(shop.content("bytime").await.is_empty());

    // --replace: exactly the selected tables change; others stay as they are.
    let url = empty_db(&shop, "prod").await;
    {
        let mut prod = shop.server.connect("prod").await;
        exec(
            &mut prod,
            "CREATE TABLE customers (id int PRIMARY KEY, name text);
             INSERT INTO customers VALUES (1, 'current');
             CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers);
             CREATE TABLE keepme (k int PRIMARY KEY); INSERT INTO keepme VALUES (7), (8);",
        )
        .await;
    }
    let err = shop.restore_refused(&["--into", &url, "--table", "customers"]);
    assert!(
        err.contains("public.customers") && err.contains("--replace"),
        "{err}"
    );
    // orders references customers: replacing customers alone is refused.
    let err = shop.restore_refused(&["--into", &url, "--table", "customers", "--replace"]);
    assert!(err.contains("depend"), "{err}");
    assert_eq!(
        shop.content("prod").await["customers"],
        vec!["(1,current)".to_owned()]
    );
    shop.restore_ok(&[
        "--at",
        &first.to_string(),
        "--into",
        &url,
        "--table",
        "customers",
        "--table",
        "orders",
        "--replace",
    ]);
    let prod = shop.content("prod").await;
    assert_eq!(prod["customers"], at_first["customers"]);
    assert_eq!(prod["orders"], at_first["orders"]);
    assert_eq!(prod["keepme"], vec!["(7)".to_owned(), "(8)".to_owned()]);
    assert_eq!(prod.len(), 3, "{:?}", prod.keys());

    // Media as of each point.
    let media = shop.path("media-at-first");
    let url = empty_db(&shop, "m1").await;
    shop.restore_ok(&[
        "--at",
        &first.to_string(),
        "--into",
        &url,
        "--media-into",
        media.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(media.join("images/a.jpg")).unwrap(),
        b"first image"
    );
    assert!(!media.join("images/b.jpg").exists());
    let media = shop.path("media-latest");
    let url = empty_db(&shop, "m2").await;
    shop.restore_ok(&["--into", &url, "--media-into", media.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(media.join("images/b.jpg")).unwrap(),
        b"second image"
    );

    // Refusals, each naming the fix; none creates anything.
    let url = empty_db(&shop, "untouched").await;
    let viz = shop.server.url("viz");
    let err = shop.restore_refused(&["--into", &viz]);
    assert!(err.contains("live target"), "{err}");
    // The ledger gives the live target away whatever the URL looks like.
    let viz2 = viz.replace("127.0.0.1", "localhost");
    let out = Command::new(binary("ferry-receiver"))
        .args(["restore", "--into", &viz2, "--from"])
        .arg(shop.outbox())
        .arg("--config")
        .arg(shop.path("no-such-config.toml"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out.stderr).contains("ferry_receiver.applied"),
        "{}",
        text(&out.stderr)
    );
    let err = shop.restore_refused(&["--into", &url, "--table", "no_such_table"]);
    assert!(
        err.contains("no_such_table") && err.contains("customers"),
        "{err}"
    );
    let err = shop.restore_refused(&["--into", &url, "--at", "999"]);
    assert!(err.contains("versions"), "{err}");
    let err = shop.restore_refused(&["--into", &url, "--at", "yesterday-ish"]);
    assert!(err.contains("latest"), "{err}");
    let lite = shop.path("dev.db");
    std::fs::write(&lite, b"").unwrap();
    let err = shop.restore_refused(&["--into", &format!("sqlite://{}", lite.display())]);
    assert!(err.contains("exists"), "{err}");
    // A PostgreSQL history into SQLite needs a server for its scratch
    // database: without the configuration, --via names one.
    let out = Command::new(binary("ferry-receiver"))
        .args([
            "restore",
            "--into",
            "sqlite:///tmp/ferry-never.db",
            "--from",
        ])
        .arg(shop.outbox())
        .arg("--config")
        .arg(shop.path("no-such-config.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--via"), "{}", text(&out.stderr));
    // A gap in the history: the missing bundle is named.
    let gappy = shop.path("gappy");
    std::fs::create_dir_all(&gappy).unwrap();
    for f in outbox_files(&shop.outbox()) {
        if !f.contains(&format!("-{second:012}-")) {
            std::fs::copy(shop.outbox().join(&f), gappy.join(&f)).unwrap();
        }
    }
    let err = shop.restore_refused(&[
        "--into",
        &url,
        "--at",
        &third.to_string(),
        "--from",
        gappy.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!("#{second}")) && err.contains("missing"),
        "{err}"
    );
    // A corrupted bundle fails verification and nothing is restored.
    let bad = shop.path("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in outbox_files(&shop.outbox()) {
        std::fs::copy(shop.outbox().join(&f), bad.join(&f)).unwrap();
    }
    let victim = bad.join(ferry_tests::name_in(
        &bad,
        "app",
        third,
        ferry_common::manifest::Kind::Partial,
    ));
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let err = shop.restore_refused(&["--into", &url, "--from", bad.to_str().unwrap()]);
    assert!(err.contains("verification"), "{err}");
    // The complete itself damaged: found while it streams into staging.
    let complete = bad.join(ferry_tests::name_in(
        &bad,
        "app",
        first,
        ferry_common::manifest::Kind::Complete,
    ));
    let mut bytes = std::fs::read(&complete).unwrap();
    let at = bytes.len() * 2 / 3;
    bytes[at] ^= 0xff;
    std::fs::write(&complete, bytes).unwrap();
    let err = shop.restore_refused(&["--into", &url, "--from", bad.to_str().unwrap()]);
    assert!(err.contains("verification"), "{err}");
    assert!(shop.content("untouched").await.is_empty());
    let mut untouched = shop.server.connect("untouched").await;
    let leftovers: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'ferry%'")
            .fetch_all(&mut untouched)
            .await
            .unwrap();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A SQLite sender's history restores into a new SQLite file.
#[tokio::test]
async fn a_sqlite_history_restores_into_a_new_sqlite_file() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.db");
    let mut conn = sqlx::sqlite::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&app)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, updated_at TEXT NOT NULL);
         INSERT INTO t VALUES (1, 'one', '2026-01-01 00:00:00'), (2, 'two', '2026-01-01 00:00:00');",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let config = dir.path().join("sender.toml");
    std::fs::write(
        &config,
        format!(
            "sender_id = \"lite\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}\"\n[partial]\n\
             change_column = \"updated_at\"\noverlap = \"0s\"\n",
            dir.path().join("sstate"),
            app.display()
        ),
    )
    .unwrap();
    let send = |kind: &str| {
        let out = Command::new(binary("ferry-sender"))
            .arg("--config")
            .arg(&config)
            .arg(kind)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    send("complete");
    sqlx::raw_sql(
        "UPDATE t SET v = 'uno', updated_at = '2026-01-02 00:00:00' WHERE id = 1;
         INSERT INTO t VALUES (3, 'three', '2026-01-02 00:00:00');",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    send("partial");
    let dev = dir.path().join("dev.db");
    let out = Command::new(binary("ferry-receiver"))
        .args(["restore", "--from"])
        .arg(dir.path().join("sstate/outbox"))
        .arg("--into")
        .arg(format!("sqlite://{}", dev.display()))
        .arg("--config")
        .arg(dir.path().join("none.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut restored = sqlx::sqlite::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new().filename(&dev),
    )
    .await
    .unwrap();
    let want = ferry_tests::loader::sqlite_rows(&mut conn, "t").await;
    let got = ferry_tests::loader::sqlite_rows(&mut restored, "t").await;
    assert_eq!(got, want);
    assert_eq!(got.len(), 3);
}

/// A PostgreSQL history as a SQLite development database: the type zoo and the
/// shop, read back by the sqlite3 shell, hold the source's rows after the
/// documented mapping (docs/restore.md).
#[tokio::test]
async fn a_postgres_history_becomes_a_sqlite_development_database() {
    let shop = Shop::new().await;
    shop.app(
        "INSERT INTO customers (name) VALUES ('ann'), ('bob');
              INSERT INTO orders (customer_id, total) VALUES (1, 10.50), (2, 20);",
    )
    .await;
    shop.send("complete");
    shop.app(
        "UPDATE customers SET name = 'ann 2', updated_at = now() WHERE id = 1;
              DELETE FROM orders WHERE id = 2;
              INSERT INTO notes (body) VALUES (E'tab\\there');",
    )
    .await;
    shop.send("partial");
    let dev = shop.path("dev.db");
    // From the sender's bundles, the scratch database on the receiver's
    // target server (its configuration is read).
    let out = shop.restore_ok(&[
        "--into",
        &format!("sqlite://{}", dev.display()),
        "--from",
        shop.outbox().to_str().unwrap(),
    ]);
    assert!(out.contains("6 table(s)"), "{out}");
    // The scratch database is gone.
    let mut admin = shop.server.connect("postgres").await;
    let scratch: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'ferry_restore%'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(scratch.is_empty(), "{scratch:?}");
    let sqlite3 = |sql: &str| -> String {
        let out = Command::new("sqlite3")
            .arg(&dev)
            .arg(sql)
            .output()
            .expect("the sqlite3 shell (tests/needs.sh installs it)");
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
        text(&out.stdout).trim_end().to_owned()
    };
    // Every table, every row.
    let mut app = shop.server.connect("app").await;
    for (pg, lite) in [
        ("zoo", "zoo"),
        ("\"TextKey\"", "\"TextKey\""),
        ("composite", "composite"),
        ("customers", "customers"),
        ("orders", "orders"),
        ("notes", "notes"),
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {pg}")))
            .fetch_one(&mut app)
            .await
            .unwrap();
        assert_eq!(
            sqlite3(&format!("SELECT count(*) FROM {lite}")),
            n.to_string(),
            "{lite}"
        );
    }
    assert_eq!(
        sqlite3("SELECT id, name FROM customers ORDER BY id"),
        "1|ann 2\n2|bob"
    );
    assert_eq!(
        sqlite3("SELECT customer_id, total, typeof(total) FROM orders"),
        "1|10.5|real"
    );
    assert_eq!(
        sqlite3("SELECT hex(CAST(body AS BLOB)) FROM notes"),
        hex_of("tab\there")
    );
    // The type zoo's first row, column by column, as documented.
    let row = |col: &str| sqlite3(&format!("SELECT {col} FROM zoo WHERE \"camelCase\" = 'a'"));
    assert_eq!(row("typeof(id) || ' ' || typeof(ident)"), "integer integer");
    assert_eq!(row("r IS NULL AND d IS NULL"), "1", "NaN becomes NULL");
    assert_eq!(row("hex(b)"), "00FF5C0A");
    assert_eq!(row("t"), "tab\there\nnew line\\back\\slash");
    assert_eq!(row("j"), r#"{"k": [1, 2.50]}"#);
    assert_eq!(row("jb"), r#"{"k": 1}"#);
    assert_eq!(row("arr"), "[1,null,3]");
    assert_eq!(row("tarr"), r#"["a b",null,"c\"d"]"#);
    assert_eq!(row("ts"), "2024-02-29 12:34:56.789000");
    assert_eq!(row("tstz"), "2024-02-29 07:04:56.789000", "UTC");
    assert_eq!(row("dt"), "2024-02-29");
    assert_eq!(row("tm"), "23:59:59.999999");
    // 1 year 2 mons 3 days 04:05:06: (365.25 + 60 + 3) days and 14,706 s.
    assert_eq!(row("iv"), "37015506000000");
    assert_eq!(row("ip"), "192.168.0.1/24");
    assert_eq!(row("u"), "a0eebc999c0b4ef8bb6d6bb9bd380a11");
    assert_eq!(row("m"), "happy");
    assert_eq!(
        row("p || ' ' || typeof(p)"),
        "7 integer",
        "a domain maps as its base type"
    );
    let b = |col: &str| sqlite3(&format!("SELECT {col} FROM zoo WHERE \"camelCase\" = 'b'"));
    assert_eq!(b("r > 1e308 AND d < -1e308"), "1", "±Infinity");
    // A decimal column is NUMERIC: past 15 significant digits a number is
    // REAL, as with Django's own DecimalField on SQLite.
    assert_eq!(b("num || ' ' || typeof(num)"), "1.23456789012346e+29 real");
    assert_eq!(b("ts || ' ' || tstz"), "-infinity infinity");
    // The declared types Django's SQLite backend uses.
    let decl = sqlite3("SELECT name || ':' || type FROM pragma_table_info('zoo') ORDER BY cid");
    for want in [
        "id:integer",
        "num:decimal",
        "r:real",
        "b:BLOB",
        "ts:datetime",
        "tstz:datetime",
        "dt:date",
        "tm:time",
        "iv:bigint",
        "u:char(32)",
        "jb:text",
    ] {
        // (SQLite reports some type names in capitals.)
        assert!(
            decl.lines().any(|l| l.eq_ignore_ascii_case(want)),
            "{want} in {decl}"
        );
    }
    assert_eq!(sqlite3("PRAGMA foreign_key_check"), "");
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02X}")).collect()
}
