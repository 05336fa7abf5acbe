//! A PostgreSQL complete loaded on several connections at once, keeping the
//! atomic view readers get from the one-transaction load:
//!
//! 1. **Setup** (one short committed transaction): the bundle's pre-data DDL runs
//!    into fresh staging schemas `ferry_stage_N`. pg_dump names every object
//!    `schema.name`, so inside the transaction each source schema is renamed
//!    aside, an empty one is created under its name for the DDL, that one is
//!    renamed `ferry_stage_N` and the real schema gets its name back before the
//!    commit. Readers never see any of it.
//! 2. **Copy**: every table's data is COPYed into its staging table on one of
//!    `target.jobs` connections, each in a transaction that truncated the table
//!    first, so `COPY … FREEZE` applies. Tables load side by side; verification
//!    of the stream continues meanwhile.
//! 3. **Swap** (the load transaction, with the ledger check, the ledger row and
//!    the SQL hooks): the previous copy's tables are moved aside into
//!    `ferry_old_N` schemas, the rest of it is dropped by the pre-data's own
//!    `DROP … IF EXISTS` statements, every object in a staging schema is moved
//!    into its real schema, and the post-data DDL (indexes, constraints) and
//!    sequence values run. Readers wait on the table locks for this step only.
//! 4. **After the commit**, the previous tables are dropped in a transaction of
//!    their own ([`after_commit`]). Freeing a large table's files takes the
//!    file system a while (1.2 s for 1 GB on a `discard`-mounted ext4), and
//!    readers should not wait on the swap's locks for that.
//!
//! What cannot be staged (an extension type living in the renamed schema, no
//! right to rename it, an object kind that is not moved) fails here, and the
//! caller loads the bundle in one transaction instead.

use super::postgres::{
    PgTarget, copy_file, copy_stream, data_table, drop_tables, q, run_script, session, staged_text,
};
use super::{LoadError, post_data};
use crate::verify::Piece;
use ferry_common::ident::{TableName, quote_ident};
use ferry_common::manifest::{Manifest, Member, Role};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Postgres, Transaction};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Serializes staging between receivers sharing a target database.
const STAGE_LOCK: &str = "SELECT pg_advisory_lock(hashtext('ferry-receiver:staging'))";
const STAGE_UNLOCK: &str = "SELECT pg_advisory_unlock(hashtext('ferry-receiver:staging'))";

/// Each source schema and the staging schema that holds its new copy.
struct Staging {
    schemas: Vec<(String, String)>,
}

impl Staging {
    /// The quoted staging name of a table.
    fn table(&self, t: &TableName) -> Result<String, LoadError> {
        let schema = t.schema.as_deref().unwrap_or("public");
        let (_, stage) = self
            .schemas
            .iter()
            .find(|(real, _)| real == schema)
            .ok_or_else(|| {
                LoadError::Refused(format!(
                    "table {t} is in no schema the bundle's DDL creates"
                ))
            })?;
        Ok(format!("{}.{}", quote_ident(stage), quote_ident(&t.name)))
    }
}

/// The outcome of the pieces up to the swap: the open load transaction, rows,
/// staged media.
pub type Begun<'c> = (Transaction<'c, Postgres>, u64, Vec<(Member, PathBuf)>);

/// Loads a complete from a verifying stream on `jobs` connections and swaps it
/// in; returns the open load transaction for the caller to [`finish`] once the
/// stream verified. After a failure the caller calls [`abandon`].
///
/// [`finish`]: super::postgres::finish
pub async fn begin<'c>(
    pg: &'c mut PgTarget,
    m: &Manifest,
    rx: &mut mpsc::Receiver<Piece>,
    jobs: usize,
) -> Result<Begun<'c>, LoadError> {
    let started = std::time::Instant::now();
    let (pre, early) = pre_data(rx).await?;
    sqlx::raw_sql(STAGE_LOCK)
        .execute(&mut pg.conn)
        .await
        .map_err(LoadError::db("waiting for the staging lock"))?;
    stage_and_swap(pg, m, rx, jobs, &pre, early, started).await
}

/// Waits for the pre-data DDL: everything before it is staged (the stream only
/// starts COPY data after it) and kept for later.
async fn pre_data(
    rx: &mut mpsc::Receiver<Piece>,
) -> Result<(String, Vec<(Member, PathBuf)>), LoadError> {
    let mut early = Vec::new();
    loop {
        match rx.recv().await {
            Some(Piece::Staged(member, path)) if member.role == Role::PreData => {
                return Ok((tokio::fs::read_to_string(&path).await?, early));
            }
            Some(Piece::Staged(member, path)) => early.push((member, path)),
            Some(_) => return Err(out_of_place()),
            None => return Err(LoadError::Refused("the bundle has no pre-data DDL".into())),
        }
    }
}

/// A complete loaded into committed staging schemas only, each table's own
/// indexes built there, for a restore that moves it into place itself (in its
/// own transaction, with the partials after it).
pub(super) struct StagedOnly {
    /// Each real schema and the staging schema holding its new tables.
    pub schemas: Vec<(String, String)>,
    /// The complete's media files, staged.
    pub media: Vec<(Member, PathBuf)>,
    /// The post-data left to run once the tables are in their real schemas.
    pub post: String,
    pub sequences: String,
}

/// Steps 1 and 2 of a load without the swap: see [`StagedOnly`]. After a
/// failure the caller drops what was staged with [`drop_staging`].
pub(super) async fn stage_only(
    conn: &mut PgConnection,
    url: &str,
    m: &Manifest,
    rx: &mut mpsc::Receiver<Piece>,
    jobs: usize,
) -> Result<StagedOnly, LoadError> {
    let (pre, early) = pre_data(rx).await?;
    let staging = Arc::new(setup(conn, m, &pre).await?);
    let copied = copy_all(url, m, &staging, rx, jobs, early).await?;
    let post = match copied.post_rest {
        Some(rest) => rest,
        None => staged_text(&copied.later, Role::PostData)?,
    };
    Ok(StagedOnly {
        schemas: staging.schemas.clone(),
        media: copied.media,
        post,
        sequences: staged_text(&copied.later, Role::Sequences)?,
    })
}

/// Drops staging schemas left by a failed [`stage_only`].
pub(super) async fn drop_staging(conn: &mut PgConnection) {
    if let Err(e) = cleanup(conn).await {
        tracing::warn!(error = %e, "could not remove the staging schemas");
    }
}

/// After the load transaction committed: drops the previous copy moved aside by
/// the swap and releases the staging lock (held until then, so that another
/// receiver sharing the database does not stage into the same names meanwhile).
/// The load is done by then; a failure here is only logged, and the next
/// complete removes what is left.
pub async fn after_commit(pg: &mut PgTarget) {
    let started = std::time::Instant::now();
    match cleanup(&mut pg.conn).await {
        Ok(()) => tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "previous copy dropped"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not drop the previous copy moved aside; the next complete will")
        }
    }
    release_stage_lock(pg).await;
}

/// Releases the staging lock. The connection stays open for the next bundle,
/// so a lock that could not be released would block every later complete
/// (this receiver's and any other sharing the database): when the unlock
/// fails, the session is replaced, which makes the server release it.
async fn release_stage_lock(pg: &mut PgTarget) {
    match sqlx::query_scalar::<_, bool>(STAGE_UNLOCK)
        .fetch_one(&mut pg.conn)
        .await
    {
        Ok(true) => {}
        Ok(false) => tracing::debug!("the staging lock was not held"),
        Err(error) => {
            tracing::warn!(%error, "could not release the staging lock; opening a new session so the server releases it");
            match super::postgres::session(&pg.url).await {
                Ok(fresh) => {
                    pg.conn = fresh; // the old session closes, and its lock goes
                    if let Ok(pid) = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                        .fetch_one(&mut pg.conn)
                        .await
                    {
                        pg.backend_pid = pid;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "could not open a new session; the next load reconnects")
                }
            }
        }
    }
}

/// After a failed [`begin`] (its transaction rolled back): removes what was
/// staged and releases the staging lock.
pub async fn abandon(pg: &mut PgTarget) {
    if let Err(e) = cleanup(&mut pg.conn).await {
        tracing::warn!(error = %e, "could not remove the staging schemas; the next complete will");
    }
    release_stage_lock(pg).await;
}

async fn stage_and_swap<'c>(
    pg: &'c mut PgTarget,
    m: &Manifest,
    rx: &mut mpsc::Receiver<Piece>,
    jobs: usize,
    pre: &str,
    early: Vec<(Member, PathBuf)>,
    started: std::time::Instant,
) -> Result<Begun<'c>, LoadError> {
    let staging = Arc::new(setup(&mut pg.conn, m, pre).await?);
    let copied = copy_all(&pg.url, m, &staging, rx, jobs, early).await?;
    let (rows, later, media) = (copied.rows, copied.later, copied.media);
    tracing::info!(
        rows,
        jobs,
        built = copied.built,
        ms = started.elapsed().as_millis() as u64,
        "tables copied into staging, their own indexes built"
    );
    let post = match copied.post_rest {
        Some(rest) => rest,
        None => staged_text(&later, Role::PostData)?,
    };
    let sequences = staged_text(&later, Role::Sequences)?;
    let mut tx = pg.begin_checked(m).await?;
    swap(&mut tx, m, &staging, pre).await?;
    run_script(&mut tx, &post, "post-data DDL").await?;
    run_script(&mut tx, &sequences, "sequence values").await?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "swapped in, indexes and constraints built"
    );
    Ok((tx, rows, media))
}

/// Drops staging schemas, and previous copies moved aside, left by a failed or
/// killed load.
async fn cleanup(conn: &mut PgConnection) -> Result<(), LoadError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(nspname) FROM pg_namespace
         WHERE nspname LIKE 'ferry\\_stage\\_%' OR nspname LIKE 'ferry\\_old\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(LoadError::db("listing staging schemas"))?;
    if !names.is_empty() {
        sqlx::raw_sql(q(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            names.join(", ")
        )))
        .execute(&mut *conn)
        .await
        .map_err(LoadError::db("dropping staging schemas"))?;
    }
    Ok(())
}

/// Step 1: the pre-data DDL into staging schemas, committed.
async fn setup(conn: &mut PgConnection, m: &Manifest, pre: &str) -> Result<Staging, LoadError> {
    cleanup(conn).await?;
    let reals: std::collections::BTreeSet<&str> = m
        .tables
        .iter()
        .map(|t| t.name.schema.as_deref().unwrap_or("public"))
        .collect();
    let mut tx = conn
        .begin()
        .await
        .map_err(LoadError::db("beginning the staging setup"))?;
    let mut renames = String::new();
    let mut restore = String::new();
    let mut schemas = Vec::new();
    for (i, real) in reals.into_iter().enumerate() {
        let stage = format!("ferry_stage_{}", i + 1);
        let aside = format!("ferry_aside_{}", i + 1);
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(real)
                .fetch_one(&mut *tx)
                .await
                .map_err(LoadError::db("looking up the target's schemas"))?;
        let (r, a, s) = (quote_ident(real), quote_ident(&aside), quote_ident(&stage));
        if exists {
            renames.push_str(&format!("ALTER SCHEMA {r} RENAME TO {a};\n"));
        }
        renames.push_str(&format!("CREATE SCHEMA {r};\n"));
        restore.push_str(&format!("ALTER SCHEMA {r} RENAME TO {s};\n"));
        if exists {
            restore.push_str(&format!("ALTER SCHEMA {a} RENAME TO {r};\n"));
        }
        schemas.push((real.to_owned(), stage));
    }
    run_script(&mut tx, &renames, "staging setup (renaming schemas aside)").await?;
    run_script(&mut tx, pre, "pre-data DDL, into staging").await?;
    run_script(&mut tx, &restore, "staging setup (renaming schemas back)").await?;
    tx.commit()
        .await
        .map_err(LoadError::db("committing the staging setup"))?;
    Ok(Staging { schemas })
}

/// What a copy connection is given: a table's data, or the script building
/// that table's own indexes and constraints once its data is in.
enum Work {
    Piece(Piece),
    Build(TableName, String),
}

impl From<Work> for Option<Piece> {
    fn from(w: Work) -> Self {
        match w {
            Work::Piece(p) => Some(p),
            Work::Build(..) => None,
        }
    }
}

/// One copy connection's queue and task.
struct Worker {
    tx: mpsc::Sender<Work>,
    task: tokio::task::JoinHandle<Result<u64, LoadError>>,
    bytes: u64,
}

type Later = Vec<(Member, PathBuf)>;

/// A copy connection's queue, in 1 MiB chunks: room for a whole data part (at
/// most 32 MiB) and some, so the stream can hand a part to one connection while
/// the other is still loading its own. That is what makes tables load side by
/// side; it costs up to this many MiB of memory per connection.
const QUEUE_CHUNKS: usize = 40;

/// What [`copy_all`] did.
struct Copied {
    rows: u64,
    later: Later,
    media: Later,
    /// The post-data left for the swap, when part of it was built in staging.
    post_rest: Option<String>,
    /// Tables whose indexes were built in staging.
    built: usize,
}

/// Hands out the work: which connection holds which table, how many data
/// members each table still has to come, and the per-table index scripts.
struct Dispatch {
    workers: Vec<Worker>,
    owner: HashMap<TableName, usize>,
    /// Data members handed out, per table.
    dispatched: HashMap<TableName, usize>,
    /// Data members still to come, per table: known from the start for a bundle
    /// in one file, from the final file's manifest for a volume set.
    remaining: Option<HashMap<TableName, usize>>,
    /// Tables whose data is all handed out, waiting for the post-data.
    waiting: Vec<TableName>,
    split: Option<post_data::Split>,
    built: usize,
}

impl Dispatch {
    /// The connection for a member's table (a table stays on one connection; a
    /// new table goes to the least loaded one).
    fn pick(&mut self, table: &TableName, bytes: u64) -> usize {
        let workers = &self.workers;
        let w = *self.owner.entry(table.clone()).or_insert_with(|| {
            (0..workers.len())
                .min_by_key(|&i| workers[i].bytes)
                .unwrap_or(0)
        });
        self.workers[w].bytes += bytes;
        w
    }

    /// Queues work on connection `w`; false when that connection has failed (its
    /// error is collected when the tasks are joined).
    async fn send(&mut self, w: usize, work: Work) -> bool {
        self.workers[w].tx.send(work).await.is_ok()
    }

    /// A data member of `table` is handed out entirely.
    async fn member_done(&mut self, table: &TableName) -> bool {
        *self.dispatched.entry(table.clone()).or_default() += 1;
        let Some(remaining) = self.remaining.as_mut() else {
            return true; // a volume set: counts come with its final file
        };
        let left = remaining.entry(table.clone()).or_insert(1);
        *left = left.saturating_sub(1);
        if *left > 0 {
            return true;
        }
        self.waiting.push(table.clone());
        self.build_ready().await
    }

    /// A volume set's final manifest: every table's count of data members is
    /// known now, and those handed out entirely get their indexes.
    async fn counts_known(&mut self, all: &Manifest) -> Result<bool, LoadError> {
        let mut remaining = data_counts(all)?;
        for (t, left) in remaining.iter_mut() {
            *left = left.saturating_sub(self.dispatched.get(t).copied().unwrap_or(0));
        }
        self.waiting.extend(
            remaining
                .iter()
                .filter(|(_, n)| **n == 0)
                .map(|(t, _)| t.clone()),
        );
        self.remaining = Some(remaining);
        Ok(self.build_ready().await)
    }

    /// Queues the index scripts of the tables whose data is all handed out.
    async fn build_ready(&mut self) -> bool {
        let Some(split) = self.split.as_mut() else {
            return true;
        };
        let mut ready = Vec::new();
        for t in std::mem::take(&mut self.waiting) {
            if let Some(script) = split.per_table.remove(&t) {
                ready.push((t, script));
            }
        }
        for (t, script) in ready {
            let w = self.pick(&t, 0);
            self.built += 1;
            if !self.send(w, Work::Build(t, script)).await {
                return false;
            }
        }
        true
    }
}

/// Step 2: hands each table's data to one of `jobs` copy connections, and each
/// table's own indexes to its connection once its data is in (when the bundle
/// brings its post-data first, as ferry-sender writes it, that overlaps the
/// other tables' copies).
async fn copy_all(
    url: &str,
    m: &Manifest,
    staging: &Arc<Staging>,
    rx: &mut mpsc::Receiver<Piece>,
    jobs: usize,
    early: Vec<(Member, PathBuf)>,
) -> Result<Copied, LoadError> {
    let mut d = Dispatch {
        workers: Vec::new(),
        owner: HashMap::new(),
        dispatched: HashMap::new(),
        remaining: None,
        waiting: Vec::new(),
        split: None,
        built: 0,
    };
    for _ in 0..jobs.max(1) {
        let (tx, wrx) = mpsc::channel(QUEUE_CHUNKS);
        let (url, staging) = (url.to_owned(), staging.clone());
        d.workers.push(Worker {
            tx,
            task: tokio::spawn(copy_worker(url, staging, wrx)),
            bytes: 0,
        });
    }
    if m.volume.is_none() {
        d.remaining = Some(data_counts(m)?);
    }
    let (mut later, mut media) = (Vec::new(), Vec::new());
    let mut current: Option<(usize, TableName)> = None;
    let mut early = early.into_iter();
    let dispatched: Result<(), LoadError> = async {
        loop {
            let piece = match early.next() {
                Some((member, path)) => Piece::Staged(member, path),
                None => match rx.recv().await {
                    Some(p) => p,
                    None => break,
                },
            };
            let sent = match piece {
                Piece::Start(member) => {
                    let t = data_table(&member)?.clone();
                    let w = d.pick(&t, member.size);
                    current = Some((w, t));
                    d.send(w, Work::Piece(Piece::Start(member))).await
                }
                Piece::Chunk(c) => {
                    let w = current.as_ref().ok_or_else(out_of_place)?.0;
                    d.send(w, Work::Piece(Piece::Chunk(c))).await
                }
                Piece::End => {
                    let (w, t) = current.take().ok_or_else(out_of_place)?;
                    d.send(w, Work::Piece(Piece::End)).await && d.member_done(&t).await
                }
                Piece::Final(all) => d.counts_known(&all).await?,
                Piece::Staged(member, path) if member.role == Role::Data => {
                    let t = data_table(&member)?.clone();
                    let w = d.pick(&t, member.size);
                    d.send(w, Work::Piece(Piece::Staged(member, path))).await
                        && d.member_done(&t).await
                }
                Piece::Staged(member, path) => {
                    match member.role {
                        Role::Media => media.push((member, path)),
                        Role::PostData => {
                            d.split = Some(split_post_data(m, staging, &path)?);
                            later.push((member, path));
                            if !d.build_ready().await {
                                break;
                            }
                        }
                        _ => later.push((member, path)),
                    }
                    true
                }
            };
            if !sent {
                break; // that worker failed: its error is collected below
            }
        }
        // Tables without data members still get their indexes in staging.
        let left: Vec<TableName> = d
            .split
            .as_ref()
            .map(|s| s.per_table.keys().cloned().collect())
            .unwrap_or_default();
        d.waiting.extend(left);
        d.build_ready().await;
        Ok(())
    }
    .await;
    let mut rows = 0;
    let mut failed = dispatched.err();
    for w in d.workers {
        drop(w.tx);
        match w.task.await {
            Ok(Ok(n)) => rows += n,
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(j) => {
                failed = failed.or(Some(LoadError::Refused(format!("a copy task failed: {j}"))))
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(Copied {
            rows,
            later,
            media,
            post_rest: d.split.map(|s| s.rest),
            built: d.built,
        }),
    }
}

/// Data members per table.
fn data_counts(m: &Manifest) -> Result<HashMap<TableName, usize>, LoadError> {
    let mut counts = HashMap::new();
    for member in m.members.iter().filter(|x| x.role == Role::Data) {
        *counts.entry(data_table(member)?.clone()).or_default() += 1;
    }
    Ok(counts)
}

/// Splits the staged post-data into per-table scripts naming the staging tables
/// and the rest.
fn split_post_data(
    m: &Manifest,
    staging: &Staging,
    path: &std::path::Path,
) -> Result<post_data::Split, LoadError> {
    let text = std::fs::read_to_string(path)?;
    let tables: Vec<(TableName, String)> = m
        .tables
        .iter()
        .filter_map(|t| Some((t.name.clone(), staging.table(&t.name).ok()?)))
        .collect();
    let schemas: Vec<&str> = staging.schemas.iter().map(|(r, _)| r.as_str()).collect();
    Ok(post_data::split(&text, &tables, &schemas))
}

fn out_of_place() -> LoadError {
    LoadError::Refused("a stream piece out of place".into())
}

/// One copy connection: every table it is given is truncated (so COPY FREEZE
/// applies), loaded and then indexed, in one transaction committed when its
/// queue closes.
async fn copy_worker(
    url: String,
    staging: Arc<Staging>,
    mut rx: mpsc::Receiver<Work>,
) -> Result<u64, LoadError> {
    let mut conn = session(&url).await?;
    // A copy connection touches only staging tables, which nothing but the
    // other copy connections locks, and they all commit only at the end: a
    // lock wait here is one loader waiting for another, a deadlock PostgreSQL
    // cannot see. Give up after a minute; the load then runs in one
    // transaction.
    sqlx::raw_sql("SET lock_timeout = '60s'")
        .execute(&mut conn)
        .await
        .map_err(LoadError::db("setting up a copy connection"))?;
    let mut tx = conn
        .begin()
        .await
        .map_err(LoadError::db("beginning a copy transaction"))?;
    let mut truncated = std::collections::HashSet::new();
    let mut rows = 0;
    while let Some(work) = rx.recv().await {
        let piece = match work {
            Work::Piece(p) => p,
            Work::Build(table, script) => {
                let started = std::time::Instant::now();
                run_script(&mut tx, &script, &format!("indexes of {table}, in staging")).await?;
                tracing::debug!(%table, ms = started.elapsed().as_millis() as u64, "indexes built");
                continue;
            }
        };
        let member = match &piece {
            Piece::Start(m) | Piece::Staged(m, _) => m.clone(),
            _ => return Err(out_of_place()),
        };
        let table = staging.table(data_table(&member)?)?;
        if truncated.insert(table.clone()) {
            // ONLY: a table others inherit from must not empty (or lock)
            // tables another connection is loading.
            let rows = super::postgres::rows_of(&mut tx, &table).await?;
            sqlx::raw_sql(q(format!("TRUNCATE {rows}")))
                .execute(&mut *tx)
                .await
                .map_err(LoadError::db(format!("truncating {table}")))?;
        }
        rows += match piece {
            Piece::Staged(_, path) => copy_file(&mut tx, &table, &member, &path).await?,
            _ => copy_stream(&mut tx, &table, &member, &mut rx).await?,
        };
    }
    tx.commit()
        .await
        .map_err(LoadError::db("committing a copy transaction"))?;
    Ok(rows)
}

/// The leading `DROP … IF EXISTS` / `ALTER TABLE IF EXISTS …` statements of
/// pg_dump's `--clean` pre-data: the previous copy's objects, in an order
/// pg_dump worked out from their dependencies. One statement a line.
fn clean_statements(pre: &str) -> String {
    let mut out = String::new();
    let mut seen = false;
    for line in pre.lines() {
        let t = line.trim_start();
        if t.starts_with("DROP ") || t.starts_with("ALTER TABLE IF EXISTS ") {
            seen = true;
            out.push_str(line);
            out.push('\n');
        } else if t.is_empty()
            || t.starts_with("--")
            || (!seen && (t.starts_with("SET ") || t.starts_with("SELECT pg_catalog.set_config")))
        {
            continue;
        } else {
            break;
        }
    }
    out
}

/// The objects of schema `$1` that `ALTER … SET SCHEMA` moves one by one
/// (indexes, owned sequences and row types follow their table; partitions do
/// not follow theirs), each with
/// whether schema `$2` already has one of that name (and arguments).
pub(super) const MOVABLE: &str = "
SELECT kind, name, taken FROM (
  SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
           WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END AS kind,
         quote_ident(c.relname) AS name,
         EXISTS (SELECT 1 FROM pg_class x JOIN pg_namespace xn ON xn.oid = x.relnamespace
                 WHERE xn.nspname = $2 AND x.relname = c.relname) AS taken
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    -- a partition is moved on its own (its parent takes only itself along);
    -- a partitioned table depends on its own key columns
    AND (c.relispartition
         OR NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                        AND d.objid = c.oid AND d.refobjid <> c.oid AND d.deptype IN ('a', 'i')))
  UNION ALL
  SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, quote_ident(t.typname),
         EXISTS (SELECT 1 FROM pg_type x JOIN pg_namespace xn ON xn.oid = x.typnamespace
                 WHERE xn.nspname = $2 AND x.typname = t.typname)
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
  WHERE n.nspname = $1 AND (t.typtype IN ('e', 'd', 'r')
    OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
  UNION ALL
  SELECT CASE p.prokind WHEN 'a' THEN 'AGGREGATE' ELSE 'ROUTINE' END,
         quote_ident(p.proname) || '(' || pg_get_function_identity_arguments(p.oid) || ')',
         EXISTS (SELECT 1 FROM pg_proc x JOIN pg_namespace xn ON xn.oid = x.pronamespace
                 WHERE xn.nspname = $2 AND x.proname = p.proname
                   AND x.proargtypes = p.proargtypes)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname = $1
) o ORDER BY kind <> 'TABLE', kind, name";

/// The previous copy out of the way, inside the load transaction: its tables
/// (with their indexes and owned sequences) moved into `ferry_old_N`, for
/// [`after_commit`] to drop, then everything else dropped by the pre-data's
/// `DROP … IF EXISTS` statements. When those fail with the tables moved (a
/// type the old tables still use, say), the move is rolled back and the
/// previous copy is dropped here, as a whole.
async fn move_aside(
    tx: &mut PgConnection,
    m: &Manifest,
    staging: &Staging,
    pre: &str,
) -> Result<(), LoadError> {
    let clean = clean_statements(pre);
    let mut moves = String::from("SAVEPOINT ferry_aside;\n");
    for (i, (real, _)) in staging.schemas.iter().enumerate() {
        let old = quote_ident(&format!("ferry_old_{}", i + 1));
        moves.push_str(&format!("CREATE SCHEMA {old};\n"));
        for t in m
            .tables
            .iter()
            .filter(|t| t.name.schema.as_deref().unwrap_or("public") == real)
        {
            moves.push_str(&format!(
                "ALTER TABLE IF EXISTS {} SET SCHEMA {old};\n",
                t.name.quoted()
            ));
        }
    }
    moves.push_str(&clean);
    if let Err(e) = sqlx::raw_sql(q(moves)).execute(&mut *tx).await {
        tracing::debug!(error = %e, "the previous copy could not be moved aside; dropping it in the swap");
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT ferry_aside")
            .execute(&mut *tx)
            .await
            .map_err(LoadError::db("rolling back the move aside"))?;
        drop_tables(tx, m).await?;
        sqlx::raw_sql(q(clean))
            .execute(&mut *tx)
            .await
            .map_err(LoadError::db("dropping the previous copy's objects"))?;
    }
    Ok(())
}

/// Step 3: the previous copy out, the staged one in, inside the load transaction.
async fn swap(
    tx: &mut PgConnection,
    m: &Manifest,
    staging: &Staging,
    pre: &str,
) -> Result<(), LoadError> {
    // regprocedure names come out schema-qualified with only pg_catalog visible.
    sqlx::raw_sql("SET LOCAL search_path TO pg_catalog")
        .execute(&mut *tx)
        .await
        .map_err(LoadError::db("setting search_path"))?;
    move_aside(tx, m, staging, pre).await?;
    for (real, stage) in &staging.schemas {
        let objects = sqlx::query(MOVABLE)
            .bind(stage)
            .bind(real)
            .fetch_all(&mut *tx)
            .await
            .map_err(LoadError::db(format!(
                "listing the objects staged in {stage}"
            )))?;
        let mut moves = format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(real));
        for o in objects {
            let (kind, name): (String, String) = (super::col(&o, "kind")?, super::col(&o, "name")?);
            moves.push_str(&format!(
                "ALTER {kind} {}.{name} SET SCHEMA {};\n",
                quote_ident(stage),
                quote_ident(real)
            ));
        }
        // RESTRICT: an object that was not moved stops the swap here.
        moves.push_str(&format!("DROP SCHEMA {};\n", quote_ident(stage)));
        sqlx::raw_sql(q(moves))
            .execute(&mut *tx)
            .await
            .map_err(LoadError::db(format!(
                "moving the staged copy from {stage} into {real}"
            )))?;
    }
    sqlx::raw_sql("SET LOCAL search_path TO DEFAULT")
        .execute(&mut *tx)
        .await
        .map_err(LoadError::db("resetting search_path"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::clean_statements;

    #[test]
    fn clean_statements_are_the_leading_drops_only() {
        let pre = "SET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\
                   ALTER TABLE IF EXISTS public.t ALTER COLUMN id DROP DEFAULT;\n\
                   DROP SEQUENCE IF EXISTS public.t_id_seq;\n\n-- x\nDROP TABLE IF EXISTS public.t;\n\
                   CREATE SCHEMA IF NOT EXISTS public;\nCREATE FUNCTION public.f() RETURNS void\n\
                   LANGUAGE plpgsql AS $$\nbegin\nDROP TABLE x;\nend $$;\n";
        assert_eq!(
            clean_statements(pre),
            "ALTER TABLE IF EXISTS public.t ALTER COLUMN id DROP DEFAULT;\n\
             DROP SEQUENCE IF EXISTS public.t_id_seq;\nDROP TABLE IF EXISTS public.t;\n"
        );
    }
}
