//! `ferry-receiver export --format parquet` against a real PostgreSQL target
//! and a SQLite one, read back by pyarrow and DuckDB (a venv that
//! tests/needs.sh fills from the package registry): the type zoo value by
//! value after the documented mapping (docs/analytics.md), a 1,000,000-row
//! table by aggregates against the target, a schema BigQuery's Parquet loader
//! accepts, and an unknown type refused with the column and the way out.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use ferry_tests::binary;
use ferry_tests::fixtures::{ZOO, ZOO_ROWS};
use ferry_tests::pg::PgServer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn python() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = std::env::var("FERRY_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&home).join(".cache/ferry-tests/venv"))
        .join("bin/python");
    assert!(
        p.exists(),
        "{} is missing: tests/needs.sh installs pyarrow and duckdb into it",
        p.display()
    );
    p
}

/// Every table file of `dir` as pyarrow reads it (values normalised to JSON:
/// temporal values as their integers, floats' specials as strings, bytes as
/// hex), its Parquet leaf types, and DuckDB's aggregates of `big`.
const READ: &str = r#"
import json, math, sys, glob, os, decimal
import pyarrow as pa, pyarrow.parquet as pq, duckdb
out = {}
def norm(v):
    if isinstance(v, float):
        if math.isnan(v): return "NaN"
        if math.isinf(v): return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, bytes): return v.hex()
    if isinstance(v, decimal.Decimal): return str(v)
    if isinstance(v, list): return [norm(x) for x in v]
    return v
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.parquet"))):
    t = pq.read_table(f)
    cols = {}
    for name in t.column_names:
        c = t.column(name)
        ty = c.type
        if pa.types.is_timestamp(ty) or pa.types.is_date32(ty) or pa.types.is_time64(ty):
            c = c.cast(pa.int64() if not pa.types.is_date32(ty) else pa.int32())
        if pa.types.is_dictionary(ty):
            c = c.cast(pa.string())
        cols[name] = {"type": str(ty), "values": [norm(v) for v in c.to_pylist()]}
    schema = pq.ParquetFile(f).schema
    leaves = [[schema.column(i).path, schema.column(i).physical_type, str(schema.column(i).logical_type)]
              for i in range(len(schema))]
    out[os.path.basename(f)] = {"rows": t.num_rows, "columns": cols if t.num_rows < 100 else {}, "leaves": leaves}
big = os.path.join(sys.argv[1], "big.parquet")
if os.path.exists(big):
    out["duckdb_big"] = list(duckdb.sql(
        f"SELECT count(*), sum(id), sum(length(t)), round(sum(f), 3), count(ts) FROM '{big}'").fetchall()[0])
print(json.dumps(out))
"#;

fn read_back(dir: &Path) -> Value {
    let out = Command::new(python())
        .args(["-c", READ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn export(cfg: &Path, args: &[&str]) -> Output {
    Command::new("/usr/bin/time")
        .args(["-f", "peak_kib=%M"])
        .arg(binary("ferry-receiver"))
        .arg("--config")
        .arg(cfg)
        .arg("export")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// (type, values) of one column of one file.
fn column<'a>(v: &'a Value, file: &str, col: &str) -> (&'a str, &'a Vec<Value>) {
    let c = &v[file]["columns"][col];
    (
        c["type"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}.{col} missing: {v}")),
        c["values"].as_array().unwrap(),
    )
}

#[tokio::test]
async fn postgres_tables_as_parquet_read_back_by_pyarrow_and_duckdb() {
    let server = PgServer::start();
    let big = "CREATE TABLE big (id bigint PRIMARY KEY, t text, f double precision, ts timestamptz);
               INSERT INTO big SELECT i, md5(i::text), i / 7.0, '2026-01-01'::timestamptz + i * interval '1 second'
               FROM generate_series(1, 1000000) i;
               CREATE TABLE money_t (id int PRIMARY KEY, price numeric(12,2), tags varchar(10)[]);
               INSERT INTO money_t VALUES (1, 1234567890.12, '{a,b}'), (2, -0.5, NULL), (3, NULL, '{}');";
    let mut viz = server
        .create_db("viz", &format!("{ZOO}{ZOO_ROWS}{big}"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("receiver.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n",
            dir.path().join("state"),
            dir.path().join("inbox"),
            server.url("viz")
        ),
    )
    .unwrap();
    let to = dir.path().join("export");

    // An unknown type: refused, naming the column and the way out; nothing written.
    let out = export(&cfg, &["--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("column zoo.ip has type inet") && err.contains("--as-text zoo.ip"),
        "{err}"
    );
    assert!(!to.exists(), "nothing of a refused export stays");
    let out = export(&cfg, &["--to", to.to_str().unwrap(), "--table", "nope*"]);
    assert!(
        text(&out.stderr).contains("matches no table"),
        "{}",
        text(&out.stderr)
    );

    let out = export(
        &cfg,
        &[
            "--to",
            to.to_str().unwrap(),
            "--as-text",
            "zoo.ip",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let peak: u64 = text(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("peak_kib="))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "export of 1,000,000 + zoo rows: peak RSS {} MiB",
        peak / 1024
    );
    assert!(peak < 128 * 1024, "peak RSS {peak} KiB");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(to.join("_manifest.json")).unwrap()).unwrap();
    let tables: Vec<&str> = manifest["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["TextKey", "big", "composite", "money_t", "zoo"]);

    let v = read_back(&to);
    // The 1,000,000-row table, by DuckDB against the target.
    let (n, sum_id, sum_len, sum_f, n_ts): (i64, i64, i64, f64, i64) = sqlx::query_as(
        "SELECT count(*), sum(id)::bigint, sum(length(t))::bigint, round(sum(f)::numeric, 3)::float8, count(ts) FROM big",
    )
    .fetch_one(&mut viz)
    .await
    .unwrap();
    let d = &v["duckdb_big"];
    assert_eq!(d[0].as_i64(), Some(n));
    assert_eq!(d[1].as_i64(), Some(sum_id));
    assert_eq!(d[2].as_i64(), Some(sum_len));
    assert!(
        (d[3].as_f64().unwrap() - sum_f).abs() < 1e-3,
        "{d} vs {sum_f}"
    );
    assert_eq!(d[4].as_i64(), Some(n_ts));
    // And row for row: DuckDB joins the Parquet file with psql's CSV of the
    // target's table by key; no row may be missing on either side or differ.
    let csv = dir.path().join("big.csv");
    let psql = ferry_tests::pg::pg_bin().join("psql");
    let out = Command::new(&psql)
        .arg(server.url("viz"))
        .arg("-c")
        .arg(format!(
            "\\copy (SELECT id, t, f, (extract(epoch FROM ts) * 1000000)::bigint FROM big) TO '{}' CSV",
            csv.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = Command::new(python())
        .arg("-c")
        .arg(
            "import duckdb, sys\n\
             print(duckdb.sql(f\"SELECT count(*) FILTER (WHERE a.id IS NULL OR b.id IS NULL \
               OR a.t IS DISTINCT FROM b.t OR a.f IS DISTINCT FROM b.f OR epoch_us(a.ts) IS DISTINCT FROM b.us), \
               count(*) FROM read_parquet('{sys.argv[1]}') a FULL JOIN read_csv('{sys.argv[2]}', header = false, \
               columns = {{'id': 'BIGINT', 't': 'VARCHAR', 'f': 'DOUBLE', 'us': 'BIGINT'}}) b USING (id)\").fetchall()[0])",
        )
        .arg(to.join("big.parquet"))
        .arg(&csv)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("(0, {n})"),
        "rows of big that differ, of all rows"
    );

    // The type zoo, value by value, as docs/analytics.md maps it.
    let z = "zoo.parquet";
    assert_eq!(v[z]["rows"], 4);
    let row_a = |col: &str| column(&v, z, col).1[0].clone();
    let (ty, _) = column(&v, z, "id");
    assert_eq!(ty, "int32");
    assert_eq!(column(&v, z, "ident").0, "int64");
    assert_eq!(
        column(&v, z, "camelCase").1[..3],
        [Value::from("a"), "b".into(), "c".into()]
    );
    assert_eq!(column(&v, z, "num").0, "string");
    assert_eq!(
        column(&v, z, "num").1[..2],
        [
            Value::from("NaN"),
            "123456789012345678901234567890.123456789".into()
        ]
    );
    assert_eq!(column(&v, z, "r").0, "float");
    assert_eq!(
        column(&v, z, "r").1[..2],
        [Value::from("NaN"), "Infinity".into()]
    );
    assert_eq!(
        column(&v, z, "d").1[..2],
        [Value::from("NaN"), "-Infinity".into()]
    );
    assert_eq!(column(&v, z, "b").0, "binary");
    assert_eq!(
        column(&v, z, "b").1,
        &[Value::from("00ff5c0a"), "".into(), Value::Null, "".into()]
    );
    assert_eq!(row_a("t"), "tab\there\nnew line\\back\\slash");
    assert_eq!(column(&v, z, "t").1[3], "ünïcødé ✓ 🚀");
    assert_eq!(row_a("j"), r#"{"k": [1, 2.50]}"#);
    assert_eq!(row_a("jb"), r#"{"k": 1}"#);
    assert_eq!(column(&v, z, "arr").0, "list<element: int32>");
    assert_eq!(row_a("arr"), serde_json::json!([1, null, 3]));
    assert_eq!(row_a("tarr"), serde_json::json!(["a b", null, "c\"d"]));
    assert_eq!(column(&v, z, "tarr").1[3], serde_json::json!([""]));
    assert_eq!(column(&v, z, "ts").0, "timestamp[us]");
    assert_eq!(row_a("ts"), 1_709_210_096_789_000i64);
    assert_eq!(column(&v, z, "tstz").0, "timestamp[us, tz=UTC]");
    assert_eq!(row_a("tstz"), 1_709_210_096_789_000i64 - 19_800_000_000);
    assert_eq!(column(&v, z, "ts").1[1], i64::MIN, "-infinity");
    assert_eq!(column(&v, z, "tstz").1[1], i64::MAX, "infinity");
    assert_eq!(column(&v, z, "dt").0, "date32[day]");
    assert_eq!(row_a("dt"), 19782);
    assert_eq!(column(&v, z, "dt").1[1], -719162, "0001-01-01");
    assert_eq!(column(&v, z, "tm").0, "time64[us]");
    assert_eq!(row_a("tm"), 86_399_999_999i64);
    assert_eq!(row_a("iv"), "P1Y2M3DT4H5M6S");
    assert_eq!(row_a("ip"), "192.168.0.1/24");
    assert_eq!(row_a("u"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(
        column(&v, z, "m").0,
        "dictionary<values=string, indices=int32, ordered=0>"
    );
    assert_eq!(row_a("m"), "happy");
    assert_eq!(
        column(&v, z, "p").0,
        "int32",
        "a domain goes out as its base type"
    );
    assert_eq!(column(&v, z, "p").1[3], 2147483647);
    // Row c: NULLs and negative zeros.
    assert_eq!(column(&v, z, "num").1[2], "0.000");
    assert_eq!(column(&v, z, "ts").1[2], Value::Null);
    let m = "money_t.parquet";
    assert_eq!(column(&v, m, "price").0, "decimal128(12, 2)");
    assert_eq!(
        column(&v, m, "price").1,
        &[Value::from("1234567890.12"), "-0.50".into(), Value::Null]
    );
    assert_eq!(
        column(&v, m, "tags").1,
        &[
            serde_json::json!(["a", "b"]),
            Value::Null,
            serde_json::json!([])
        ]
    );
    assert_eq!(v["TextKey.parquet"]["rows"], 3);

    // Every leaf is a type BigQuery's Parquet loader takes.
    for (file, t) in v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.ends_with(".parquet"))
    {
        for leaf in t["leaves"].as_array().unwrap() {
            let physical = leaf[1].as_str().unwrap();
            let logical = leaf[2].as_str().unwrap();
            let ok = matches!(
                physical,
                "BOOLEAN"
                    | "INT32"
                    | "INT64"
                    | "FLOAT"
                    | "DOUBLE"
                    | "BYTE_ARRAY"
                    | "FIXED_LEN_BYTE_ARRAY"
            ) && (logical == "None"
                || logical == "String"
                || logical == "JSON"
                || logical.starts_with("Int(")
                || logical.starts_with("Decimal(")
                || logical == "Date"
                || logical.starts_with("Time(isAdjustedToUTC=false, timeUnit=microseconds")
                || logical.starts_with("Timestamp(isAdjustedToUTC=")
                    && logical.contains("timeUnit=microseconds"));
            assert!(ok, "{file} {leaf}: not a type BigQuery loads");
        }
    }

    // A directory that holds something is not written into.
    let out = export(&cfg, &["--to", to.to_str().unwrap(), "--unknown-as-text"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not empty"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn sqlite_target_as_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("copy.sqlite3");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL, photo BLOB, at TEXT);
             INSERT INTO t VALUES (1, 'a', 1.5, x'00ff', '2024-01-01 00:00:00'), (2, NULL, NULL, NULL, NULL);
             CREATE TABLE ferry_complete_tables (x);",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cfg = dir.path().join("receiver.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = \"sqlite://{}\"\n",
            dir.path().join("state"),
            dir.path().join("inbox"),
            db.display()
        ),
    )
    .unwrap();
    let to = dir.path().join("export");
    let out = export(&cfg, &["--to", to.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = read_back(&to);
    assert_eq!(
        v.as_object().unwrap().len(),
        1,
        "ferry's own tables stay out: {v}"
    );
    assert_eq!(
        column(&v, "t.parquet", "id"),
        ("int64", &vec![Value::from(1), 2.into()])
    );
    assert_eq!(
        column(&v, "t.parquet", "score").1,
        &[Value::from(1.5), Value::Null]
    );
    assert_eq!(
        column(&v, "t.parquet", "photo").1,
        &[Value::from("00ff"), Value::Null]
    );
    assert_eq!(column(&v, "t.parquet", "at").1[0], "2024-01-01 00:00:00");
}

#[tokio::test]
async fn exports_follow_each_applied_complete_and_a_failed_export_holds_nothing() {
    use ferry_tests::lite::{Lite, run, sqlite};
    let exports = tempfile::tempdir().unwrap();
    let l = Lite::new(&format!(
        "[export]\nto = {:?}\nchanges = true\n",
        exports.path()
    ))
    .await;
    let f = l.send("complete");
    l.deliver(&f);
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = exports.path().join(
        f.replace(".tar.zst", "")
            .split('-')
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .join("-"),
    );
    assert!(
        dir.join("_manifest.json").exists(),
        "{}: {:?}",
        dir.display(),
        std::fs::read_dir(exports.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    let v = read_back(&dir);
    assert_eq!(v["report.parquet"]["rows"], 2);
    assert_eq!(v["phone.parquet"]["rows"], 2);

    // A partial: no export (after = "complete").
    let mut app = sqlite(&l.p("app.sqlite3")).await;
    sqlx::raw_sql("UPDATE phone SET model = 'z', updated_at = '2024-06-01 00:00:00' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    let p = l.send("partial");
    l.deliver(&p);
    assert!(
        run("ferry-receiver", &l.p("receiver.toml"), &["load"])
            .status
            .success()
    );
    // A partial: no whole export (after = "complete"), its change set.
    let mut made: Vec<String> = std::fs::read_dir(exports.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(made.len(), 2, "{made:?}");
    assert!(made[1].ends_with("-000000000002-changes"), "{made:?}");
    let ch = read_back(&exports.path().join(&made[1]));
    assert_eq!(
        column(&ch, "phone.parquet", "_ferry_op").1,
        &[Value::from("upsert")]
    );
    assert_eq!(
        column(&ch, "phone.parquet", "_ferry_seq").1,
        &[Value::from(2)]
    );
    assert_eq!(column(&ch, "phone.parquet", "id").1, &[Value::from(1)]);
    assert_eq!(column(&ch, "phone.parquet", "model").1, &[Value::from("z")]);

    // A past point of a SQLite history: #1, before the partial.
    let at1 = exports.path().join("by-hand-at-1");
    let out = run(
        "ferry-receiver",
        &l.p("receiver.toml"),
        &["export", "--at", "1", "--to", at1.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let old = read_back(&at1);
    assert_eq!(old["phone.parquet"]["rows"], 2);
    let i = column(&old, "phone.parquet", "id")
        .1
        .iter()
        .position(|v| v == 1)
        .unwrap();
    assert_ne!(column(&old, "phone.parquet", "model").1[i], "z", "as of #1");
    assert!(
        std::fs::read_dir(l.p("rstate")).map_or(true, |d| d
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("export"))),
        "the scratch SQLite file and staging are removed"
    );
    std::fs::remove_dir_all(&at1).unwrap();

    // An export that cannot be written: the complete still applies, status says why.
    let cfg = std::fs::read_to_string(l.p("receiver.toml")).unwrap();
    std::fs::write(
        l.p("receiver.toml"),
        cfg.replace(
            &format!("{:?}", exports.path()),
            "\"/proc/ferry-export-here\"",
        ),
    )
    .unwrap();
    sqlx::raw_sql("UPDATE phone SET model = 'y', updated_at = '2024-06-02 00:00:00' WHERE id = 2")
        .execute(&mut app)
        .await
        .unwrap();
    let c = l.send("complete");
    l.deliver(&c);
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["load"]);
    assert!(
        out.status.success(),
        "a failed export holds nothing: {}",
        text(&out.stderr)
    );
    l.assert_same().await;
    let out = run("ferry-receiver", &l.p("receiver.toml"), &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("last export error"),
        "{}",
        text(&out.stdout)
    );
}

/// A PostgreSQL chain (sender → inbox → receiver) with `[export] changes`:
/// each applied partial's change files, a past point rebuilt and exported
/// (`--at`), `--changes` by hand, and the refusals.
#[tokio::test]
async fn past_points_and_change_files_of_a_postgres_chain() {
    let server = PgServer::start();
    let shop = "CREATE TABLE shop (id int PRIMARY KEY, name text, price numeric(8,2),
                  updated_at timestamptz NOT NULL DEFAULT now());
                INSERT INTO shop (id, name, price) VALUES (1, 'one', 1.50), (2, 'two', 2.00), (3, 'three', 3.00);
                CREATE TABLE tags (id int PRIMARY KEY, name text);
                INSERT INTO tags VALUES (1, 'red'), (2, 'blue');";
    let mut app = server
        .create_db("app", &format!("{ZOO}{ZOO_ROWS}{shop}"))
        .await;
    server.create_db("viz", "").await;
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel);
    let exports = p("exports");
    std::fs::create_dir_all(p("inbox")).unwrap();
    std::fs::write(
        p("sender.toml"),
        format!(
            "sender_id = \"app\"\nstate_dir = {:?}\n[source]\nurl = {:?}\n[partial]\n\
             change_column = \"updated_at\"\noverlap = \"0s\"\n",
            p("sstate"),
            server.url("app")
        ),
    )
    .unwrap();
    let cfg = p("receiver.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\ninbox = {:?}\n[target]\nurl = {:?}\n\
             [export]\nto = {:?}\nchanges = true\nas_text = [\"zoo.ip\"]\n",
            p("rstate"),
            p("inbox"),
            server.url("viz"),
            exports
        ),
    )
    .unwrap();
    let send = |kind: &str| {
        let out = Command::new(binary("ferry-sender"))
            .arg("--config")
            .arg(p("sender.toml"))
            .arg(kind)
            .output()
            .unwrap();
        assert!(out.status.success(), "sender {kind}: {}", text(&out.stderr));
    };
    let deliver_and_load = || {
        let outbox = p("sstate/outbox");
        for f in ferry_tests::outbox_files(&outbox) {
            std::fs::copy(outbox.join(&f), p("inbox").join(&f)).unwrap();
        }
        let out = Command::new(binary("ferry-receiver"))
            .arg("--config")
            .arg(&cfg)
            .arg("load")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let exec = |sql: &'static str| sqlx::raw_sql(sql);

    // #1 the complete, #2 a partial: updates, an insert, a table sent whole.
    send("complete");
    exec(
        "UPDATE shop SET name = 'uno', price = 1.25, updated_at = now() WHERE id = 1;
          INSERT INTO shop (id, name, price) VALUES (4, 'four', 4.00);
          UPDATE zoo SET t = 'changed', updated_at = now() WHERE \"camelCase\" = 'a';
          UPDATE tags SET name = 'green' WHERE id = 2;",
    )
    .execute(&mut app)
    .await
    .unwrap();
    send("partial");
    let log = deliver_and_load();
    let mut made: Vec<String> = std::fs::read_dir(&exports)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(
        made,
        ["app-000000000002-changes", "app-000000000002-partial"],
        "{log}"
    );

    // The change set of #2, typed as the whole export is.
    let ch = read_back(&exports.join("app-000000000002-changes"));
    let s = "shop.parquet";
    assert_eq!(
        column(&ch, s, "_ferry_seq"),
        ("int64", &vec![Value::from(2), 2.into()])
    );
    assert_eq!(
        column(&ch, s, "_ferry_op").1,
        &[Value::from("upsert"), "upsert".into()]
    );
    let mut ids = column(&ch, s, "id").1.clone();
    ids.sort_by_key(|v| v.as_i64());
    assert_eq!(ids, [Value::from(1), 4.into()]);
    assert_eq!(column(&ch, s, "price").0, "decimal128(8, 2)");
    let whole = read_back(&exports.join("app-000000000002-partial"));
    let z = "zoo.parquet";
    assert_eq!(ch[z]["rows"], 1, "only the changed zoo row");
    let a = column(&whole, z, "camelCase")
        .1
        .iter()
        .position(|v| v == "a")
        .unwrap();
    assert_eq!(column(&whole, z, "t").1[a], "changed");
    for (name, c) in whole[z]["columns"].as_object().unwrap() {
        assert_eq!(
            column(&ch, z, name),
            (c["type"].as_str().unwrap(), &vec![c["values"][a].clone()]),
            "zoo.{name}: the change file maps it as the whole export does"
        );
    }
    for v in [&ch, &whole] {
        let leaves = v[z]["leaves"].as_array().unwrap();
        for col in ["j", "jb"] {
            let leaf = leaves.iter().find(|l| l[0] == col).unwrap();
            assert_eq!(leaf[2], "JSON", "{col}: the JSON logical type");
        }
    }
    let m: Value = serde_json::from_slice(
        &std::fs::read(exports.join("app-000000000002-changes/_manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["contents"], "changes");
    assert_eq!(m["source"]["seq"], 2);
    assert_eq!(m["whole_tables"], serde_json::json!(["tags"]));
    assert_eq!(column(&ch, "tags.parquet", "name").1.len(), 2);

    // #3: a delete. Its change file carries the key; the rest is null.
    exec("DELETE FROM shop WHERE id = 2")
        .execute(&mut app)
        .await
        .unwrap();
    send("partial");
    deliver_and_load();
    let ch3 = read_back(&exports.join("app-000000000003-changes"));
    assert_eq!(column(&ch3, s, "_ferry_op").1, &[Value::from("delete")]);
    assert_eq!(column(&ch3, s, "id").1, &[Value::from(2)]);
    assert_eq!(column(&ch3, s, "name").1, &[Value::Null]);
    assert!(
        !exports.join("app-000000000003-partial").exists(),
        "after = \"complete\": no whole export for a pass of partials"
    );
    // The same by hand.
    let by_hand = dir.path().join("by-hand");
    let out = export(&cfg, &["--changes", "3", "--to", by_hand.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(read_back(&by_hand)[s], ch3[s]);

    // A past point: #1, before any of it, rebuilt in a scratch database.
    let at1 = dir.path().join("at1");
    let out = export(
        &cfg,
        &[
            "--at",
            "1",
            "--to",
            at1.to_str().unwrap(),
            "--as-text",
            "zoo.ip",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["source"]["seq"], 1);
    let old = read_back(&at1);
    let mut names: Vec<(Value, Value)> = column(&old, s, "id")
        .1
        .iter()
        .cloned()
        .zip(column(&old, s, "name").1.iter().cloned())
        .collect();
    names.sort_by_key(|(id, _)| id.as_i64());
    assert_eq!(
        names,
        [
            (Value::from(1), Value::from("one")),
            (2.into(), "two".into()),
            (3.into(), "three".into())
        ]
    );
    assert_eq!(column(&old, "tags.parquet", "name").1.len(), 2);
    assert!(
        column(&old, "tags.parquet", "name")
            .1
            .contains(&"blue".into())
    );
    // #2 rebuilt equals the automatic export of #2, table by table.
    let at2 = dir.path().join("at2");
    let out = export(
        &cfg,
        &[
            "--at",
            "2",
            "--to",
            at2.to_str().unwrap(),
            "--as-text",
            "zoo.ip",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rebuilt = read_back(&at2);
    for f in [
        "shop.parquet",
        "tags.parquet",
        "zoo.parquet",
        "composite.parquet",
    ] {
        assert_eq!(rebuilt[f]["rows"], whole[f]["rows"], "{f}");
        for (name, c) in whole[f]["columns"].as_object().unwrap() {
            let mut a = c["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>();
            let mut b = column(&rebuilt, f, name)
                .1
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{f}.{name} at #2");
        }
    }
    let mut viz = server.connect("viz").await;
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'ferry\\_export%'")
            .fetch_one(&mut viz)
            .await
            .unwrap();
    assert_eq!(left, 0, "the scratch database is dropped");

    // Refusals, each naming the fix.
    let nowhere = dir.path().join("nowhere");
    let out = export(&cfg, &["--changes", "1", "--to", nowhere.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is a complete"),
        "{}",
        text(&out.stderr)
    );
    let out = export(&cfg, &["--changes", "9", "--to", nowhere.to_str().unwrap()]);
    assert!(
        text(&out.stderr).contains("ferry-receiver versions"),
        "{}",
        text(&out.stderr)
    );
    let out = export(
        &cfg,
        &["--at", "yesterday-ish", "--to", nowhere.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = export(&cfg, &["--at", "9", "--to", nowhere.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!nowhere.exists(), "nothing of a refused export stays");
}
