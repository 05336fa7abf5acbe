//! A throwaway PostgreSQL cluster on a free loopback port, stopped and removed on
//! drop. `initdb` refuses to run as root, so as root the cluster runs as the
//! `postgres` user; otherwise as the current user.

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The directory holding initdb/pg_ctl: `FERRY_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else whatever `PATH` has.
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("FERRY_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .unwrap_or_else(|| PathBuf::from(""))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgServer {
    pub fn start() -> Self {
        let bin = pg_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("ferry-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&dir));
        }
        let mut server = Self {
            dir,
            bin,
            port: 0,
            as_postgres,
        };
        let data = server.dir.join("data");
        server.pg(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        // Retry on the rare port race with another process.
        for _ in 0..5 {
            server.port = free_port();
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} \
                 -c fsync=off -c full_page_writes=off -c synchronous_commit=off \
                 -c max_connections=50",
                server.port,
                path_str(&server.dir)
            );
            let log = server.dir.join("log");
            let ok = server.pg_status(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data),
                    "-o",
                    &opts,
                    "-l",
                    path_str(&log),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            );
            if ok {
                return server;
            }
        }
        let log = std::fs::read_to_string(server.dir.join("log")).unwrap_or_default();
        panic!("PostgreSQL did not start:\n{log}");
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        assert!(self.pg_status(tool, args), "{tool} {args:?} failed");
    }

    fn pg_status(&self, tool: &str, args: &[&str]) -> bool {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {tool} from {}: {e}; install postgresql (tests/run does)",
                    self.bin.display()
                )
            });
        if !out.status.success() {
            eprintln!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub async fn connect(&self, db: &str) -> PgConnection {
        PgConnection::connect(&self.url(db))
            .await
            .unwrap_or_else(|e| panic!("connect to {db}: {e}"))
    }

    /// Creates a database and runs `sql` in it.
    pub async fn create_db(&self, db: &str, sql: &str) -> PgConnection {
        let mut admin = self.connect("postgres").await;
        exec(&mut admin, &format!("CREATE DATABASE \"{db}\"")).await;
        let mut conn = self.connect(db).await;
        if !sql.is_empty() {
            exec(&mut conn, sql).await;
        }
        conn
    }

    /// Stops the server now (for "database is down" tests).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        self.pg_status(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Crashes the server (`-m immediate`, as a power loss or an OOM kill
    /// would) and starts it again on the same port.
    pub fn restart(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-m",
                "immediate",
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "60",
                "restart",
            ],
        );
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs one or more statements (simple query protocol).
pub async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
}

/// Every row of a table as its text form, sorted: what "identical" means in tests.
pub async fn table_rows(conn: &mut PgConnection, table: &str) -> Vec<String> {
    let sql = format!("SELECT ferry_row_::text FROM {table} ferry_row_ ORDER BY 1");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(conn)
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"))
}

/// Every table of schema `public`, by quoted name, with its rows as
/// [`table_rows`] gives them: a database's content, to compare whole.
pub async fn public_content(
    conn: &mut PgConnection,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I', table_name) FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap_or_else(|e| panic!("listing tables: {e}"));
    let mut out = std::collections::BTreeMap::new();
    for n in names {
        let rows = table_rows(conn, &n).await;
        out.insert(n, rows);
    }
    out
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("run command");
    assert!(status.success(), "{cmd:?} failed");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}
