//! Partitioned tables with the real binaries and a real PostgreSQL server: a
//! table partitioned by range, one range partitioned again by list, a default
//! partition, a table whose foreign key points at the partitioned one, and a
//! partitioned table left out by `[source] exclude` (its partitions go with
//! it). Completes, partials (a row moved between partitions by an update of
//! the partition key, deletes), a partition added (the next partial becomes a
//! complete) and restores give copies equal to the source, every row in the
//! same partition, through the staged load and its swap. Tables that others
//! inherit from (`INHERITS`) travel with their own rows only.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_common::manifest::Kind;
use ferry_tests::pg::{PgServer, exec};
use ferry_tests::{binary, outbox_files};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

const EVENTS: &str = "
CREATE TABLE events (id bigint NOT NULL, at date NOT NULL, kind text NOT NULL, body jsonb,
  updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (id, at, kind))
  PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')
  PARTITION BY LIST (kind);
CREATE TABLE events_2026_click PARTITION OF events_2026 FOR VALUES IN ('click');
CREATE TABLE events_2026_rest PARTITION OF events_2026 DEFAULT;
CREATE TABLE events_other PARTITION OF events DEFAULT;
CREATE INDEX ON events (updated_at);
CREATE TABLE notes (id int PRIMARY KEY, event_id bigint NOT NULL, event_at date NOT NULL,
  event_kind text NOT NULL, body text, updated_at timestamptz NOT NULL DEFAULT now(),
  FOREIGN KEY (event_id, event_at, event_kind) REFERENCES events);
INSERT INTO events (id, at, kind, body)
  SELECT g, date '2024-10-01' + g, CASE WHEN g % 3 = 0 THEN 'click' ELSE 'view' END,
         jsonb_build_object('g', g)
  FROM generate_series(1, 900) g;
INSERT INTO notes (id, event_id, event_at, event_kind, body)
  SELECT id, id, at, kind, 'note ' || id FROM events WHERE id % 10 = 0;
CREATE TABLE audit (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE audit_2025 PARTITION OF audit FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO audit VALUES (1, '2025-02-02');
";

type Content = BTreeMap<String, Vec<String>>;

struct Site {
    server: PgServer,
    dir: tempfile::TempDir,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Site {
    async fn new(schema: &str) -> Self {
        let server = PgServer::start();
        server.create_db("app", schema).await;
        server.create_db("viz", "").await;
        let s = Self {
            server,
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(s.path("inbox")).unwrap();
        std::fs::write(
            s.path("sender.toml"),
            format!(
                "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\nexclude = [\"public.audit\"]\n[partial]\n\
                 change_column = \"updated_at\"\noverlap = \"0s\"\n",
                s.path("sstate"),
                s.server.url("app"),
            ),
        )
        .unwrap();
        std::fs::write(
            s.path("receiver.toml"),
            format!(
                "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n",
                s.path("rstate"),
                s.path("inbox"),
                s.server.url("viz"),
            ),
        )
        .unwrap();
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn run(&self, bin: &str, config: &str, args: &[&str]) -> Output {
        let out = Command::new(binary(bin))
            .arg("--config")
            .arg(self.path(config))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{bin} {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }

    /// A sender job, delivered and loaded; returns its seq. The load takes
    /// the staged path (no fallback warning).
    fn send_and_load(&self, kind: &str) -> u64 {
        self.run("ferry-sender", "sender.toml", &[kind, "--no-push"]);
        let outbox = self.path("sstate/outbox");
        let files = outbox_files(&outbox);
        for f in &files {
            let to = self.path("inbox").join(f);
            if !to.exists() {
                std::fs::copy(outbox.join(f), to).unwrap();
            }
        }
        let out = self.run("ferry-receiver", "receiver.toml", &["load"]);
        let log = text(&out.stderr);
        assert!(!log.contains("could not be staged"), "{log}");
        files
            .iter()
            .filter_map(|n| ferry_common::manifest::parse_bundle_file_name(n))
            .map(|b| b.seq.0)
            .max()
            .unwrap()
    }

    /// The content of `db` without the excluded partitioned table `audit`.
    async fn content(&self, db: &str) -> Content {
        let mut c = ferry_tests::pg::public_content(&mut self.server.connect(db).await).await;
        c.retain(|t, _| !t.starts_with("audit"));
        c
    }

    async fn app(&self, sql: &str) {
        exec(&mut self.server.connect("app").await, sql).await;
    }

    /// Each leaf partition of `events` with its row count, in database `db`.
    async fn placement(&self, db: &str) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&mut self.server.connect(db).await)
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn partitioned_tables_travel_in_completes_partials_and_restores() {
    let site = Site::new(EVENTS).await;
    site.send_and_load("complete");
    let first = site.content("app").await;
    assert!(
        first.contains_key("events_2026_click"),
        "{:?}",
        first.keys()
    );
    assert_eq!(site.content("viz").await, first);
    assert_eq!(site.placement("viz").await, site.placement("app").await);
    // The excluded partitioned table is left out with its partitions.
    let audit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relname LIKE 'audit%'")
            .fetch_one(&mut site.server.connect("viz").await)
            .await
            .unwrap();
    assert_eq!(audit, 0);

    // Inserts into every leaf, a row moved to another partition by its key,
    // one moved within the sub-partitioned range, deletes, a note added.
    site.app(
        "INSERT INTO events (id, at, kind) VALUES (2001, '2025-05-05', 'view'),
           (2002, '2026-05-05', 'click'), (2003, '2026-05-05', 'view'), (2004, '2030-01-01', 'view');
         UPDATE events SET at = '2026-03-03', updated_at = now() WHERE id = 101;
         UPDATE events SET kind = 'click', updated_at = now() WHERE id = 503;
         DELETE FROM notes WHERE event_id = 20;
         DELETE FROM events WHERE id IN (20, 21, 701);
         INSERT INTO notes (id, event_id, event_at, event_kind, body) VALUES (9001, 2004, '2030-01-01', 'view', 'new');",
    )
    .await;
    let partial = site.send_and_load("partial");
    let after_partial = site.content("app").await;
    assert_ne!(after_partial, first);
    assert_eq!(site.content("viz").await, after_partial);
    assert_eq!(site.placement("viz").await, site.placement("app").await);

    // A partition added on the source (next year's, say): the receiver's copy
    // lacks it, so the next partial is taken as a complete.
    site.app(
        "CREATE TABLE events_2031 PARTITION OF events FOR VALUES FROM ('2031-01-01') TO ('2032-01-01');
         INSERT INTO events (id, at, kind) VALUES (3001, '2031-02-02', 'view');",
    )
    .await;
    let seq = site.send_and_load("partial");
    let newest = ferry_tests::name_in(&site.path("sstate/outbox"), "app", seq, Kind::Complete);
    assert!(
        site.path("sstate/outbox").join(&newest).exists(),
        "the partial after a partition was added should be a complete ({newest})"
    );
    assert_eq!(site.content("viz").await, site.content("app").await);
    assert_eq!(site.placement("viz").await, site.placement("app").await);

    // A second complete replaces the copy (the swap moves every partition).
    site.app("UPDATE events SET body = '{\"again\": true}', updated_at = now() WHERE id % 7 = 0;")
        .await;
    site.send_and_load("complete");
    let last = site.content("app").await;
    assert_eq!(site.content("viz").await, last);
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'ferry\\_stage%' OR nspname LIKE 'ferry\\_old%'",
    )
    .fetch_all(&mut site.server.connect("viz").await)
    .await
    .unwrap();
    assert!(left.is_empty(), "schemas left behind: {left:?}");

    // A restore as of the partial into a fresh database, and the latest
    // into a SQLite file.
    site.server.create_db("back", "").await;
    site.run(
        "ferry-receiver",
        "receiver.toml",
        &[
            "restore",
            "--at",
            &partial.to_string(),
            "--into",
            &site.server.url("back"),
        ],
    );
    assert_eq!(site.content("back").await, after_partial);
    // (the content holds each partition's rows: every row is in its place)
    let lite = site.path("dev.db");
    site.run(
        "ferry-receiver",
        "receiver.toml",
        &[
            "restore",
            "--at",
            "latest",
            "--into",
            &format!("sqlite://{}", lite.display()),
        ],
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut ferry_tests::lite::sqlite(&lite).await)
        .await
        .unwrap();
    assert_eq!(n as usize, last["events"].len());
}

/// A table others inherit from, and one that inherits it with more rows and
/// keys shared with it: each copy holds its own rows. (The staged load's
/// `TRUNCATE` of the parent once waited for the child's loader and would
/// have emptied it; partials read the parent with its children's rows.)
const INHERITED: &str = "
CREATE TABLE base (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE kid (extra text) INHERITS (base);
ALTER TABLE kid ADD PRIMARY KEY (id);
INSERT INTO base (id, v) SELECT g, 'b' FROM generate_series(1, 10) g;
INSERT INTO kid (id, v, extra) SELECT g, 'k', 'x' FROM generate_series(1, 50000) g;
";

#[tokio::test]
async fn inherited_tables_travel_with_their_own_rows() {
    let site = Site::new(INHERITED).await;
    let own = |db: &'static str| {
        let site = &site;
        async move {
            let mut c = site.server.connect(db).await;
            let mut out = Vec::new();
            for t in ["ONLY base", "kid"] {
                out.push(ferry_tests::pg::table_rows(&mut c, t).await);
            }
            out
        }
    };
    site.send_and_load("complete");
    assert_eq!(own("viz").await, own("app").await);

    // Changes to both; a key deleted from the parent that the child keeps.
    site.app(
        "UPDATE ONLY base SET v = 'b2', updated_at = now() WHERE id = 3;
         UPDATE kid SET v = 'k2', updated_at = now() WHERE id IN (3, 4);
         DELETE FROM ONLY base WHERE id = 5;
         INSERT INTO base (id, v) VALUES (11, 'new');",
    )
    .await;
    site.send_and_load("partial");
    assert_eq!(own("viz").await, own("app").await);
    site.send_and_load("complete");
    assert_eq!(own("viz").await, own("app").await);

    // The child without its parent: refused, both named, nothing written.
    let config = std::fs::read_to_string(site.path("sender.toml"))
        .unwrap()
        .replace("\"public.audit\"", "\"public.base\"");
    std::fs::write(site.path("sender-no-base.toml"), config).unwrap();
    let before = outbox_files(&site.path("sstate/outbox"));
    let out = Command::new(binary("ferry-sender"))
        .arg("--config")
        .arg(site.path("sender-no-base.toml"))
        .args(["complete", "--no-push"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("table public.kid inherits from public.base, which is not selected")
            && err.contains("select public.base too")
            && err.contains("or exclude public.kid"),
        "{err}"
    );
    assert_eq!(outbox_files(&site.path("sstate/outbox")), before);
}
