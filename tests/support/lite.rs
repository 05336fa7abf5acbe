//! A SQLite app and a SQLite receiver in a temp dir, for end-to-end tests of the
//! embedded default: a sender and a receiver configuration, the real binaries,
//! and a row-by-row comparison of both sides.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use crate::loader::sqlite_rows;
use crate::{binary, outbox_files};
use sqlx::{Connection, SqliteConnection};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn run(bin: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(binary(bin))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn sqlite(path: &Path) -> SqliteConnection {
    SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap()
}

pub struct Lite {
    pub dir: tempfile::TempDir,
}

impl Lite {
    pub async fn new(receiver_extra: &str) -> Self {
        Self::with(receiver_extra, "").await
    }

    /// `sender_extra` goes into the sender's configuration inside `[partial]`
    /// (so it may set `interval`, then open sections of its own).
    pub async fn with(receiver_extra: &str, sender_extra: &str) -> Self {
        let l = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(l.p("media-src")).unwrap();
        std::fs::create_dir_all(l.p("inbox")).unwrap();
        let mut app = sqlite(&l.p("app.sqlite3")).await;
        sqlx::raw_sql(
            "CREATE TABLE phone (id INTEGER PRIMARY KEY, model TEXT, updated_at TEXT NOT NULL);
             CREATE TABLE report (id INTEGER PRIMARY KEY, phone_id INTEGER REFERENCES phone(id),
               msg TEXT, photo BLOB, score REAL, updated_at TEXT NOT NULL);
             CREATE INDEX report_at ON report (updated_at);
             INSERT INTO phone VALUES (1, 'a', '2024-01-01 00:00:00'), (2, 'b', '2024-01-01 00:00:00');
             INSERT INTO report VALUES (1, 1, 'x', X'00FF', -0.0, '2024-01-01 00:00:00'),
                                       (2, 2, NULL, NULL, 1.5, '2024-01-01 00:00:00');",
        )
        .execute(&mut app)
        .await
        .unwrap();
        std::fs::write(
            l.p("sender.toml"),
            format!(
                "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = \"sqlite://{}\"\n[partial]\n\
                 change_column = \"updated_at\"\noverlap = \"0s\"\n{sender_extra}\n[[media]]\nname = \"images\"\npath = {:?}\n",
                l.p("sstate"),
                l.p("app.sqlite3").display(),
                l.p("media-src")
            ),
        )
        .unwrap();
        std::fs::write(
            l.p("receiver.toml"),
            format!(
                "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = \"sqlite://{}\"\n[media]\nimages = {:?}\n{receiver_extra}",
                l.p("rstate"),
                l.p("inbox"),
                l.p("viz.sqlite3").display(),
                l.p("media-dst")
            ),
        )
        .unwrap();
        l
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn send(&self, kind: &str) -> String {
        let out = run("ferry-sender", &self.p("sender.toml"), &[kind]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        outbox_files(&self.p("sstate/outbox")).pop().unwrap()
    }

    pub fn deliver(&self, file: &str) {
        let tmp = self.p("inbox").join(format!(".{file}.part"));
        std::fs::copy(self.p("sstate/outbox").join(file), &tmp).unwrap();
        std::fs::rename(&tmp, self.p("inbox").join(file)).unwrap();
    }

    pub async fn assert_same(&self) {
        let mut a = sqlite(&self.p("app.sqlite3")).await;
        let mut b = sqlite(&self.p("viz.sqlite3")).await;
        for t in ["phone", "report"] {
            assert_eq!(
                sqlite_rows(&mut a, t).await,
                sqlite_rows(&mut b, t).await,
                "{t} differs"
            );
        }
    }
}
