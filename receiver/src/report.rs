//! `status`, `check` and `failures`: what the receiver has applied, what waits and
//! why, what failed, and whether it can work.

use crate::config::{Config, Engine, redact_url};
use crate::load::{Applied, Target};
use crate::plan::Step;
use crate::quarantine::{self, Failure};
use crate::{health, inbox, run};
use ferry_common::health::{Health, JobRecord, Level as HealthLevel};
use serde::Serialize;
use sqlx::Connection;

#[derive(Debug, Serialize)]
pub struct Status {
    /// The newest applied complete and partial of each sender (from the
    /// ledger; from the state directory while the target is unreachable).
    pub applied: Vec<Applied>,
    /// Seconds between the newest applied bundle's creation and now.
    pub lag_seconds: Option<i64>,
    /// Bundles that the next `load` would apply (while the target is
    /// unreachable: the inbox's bundles newer than the last applied).
    pub pending: Vec<String>,
    /// Bundles waiting, with the reason.
    pub held: Vec<run::Held>,
    pub failures: Vec<Failure>,
    /// Why the target database could not be asked, if it could not.
    pub target_error: Option<String>,
    /// How the latest load passes went.
    pub last_pass: JobRecord,
    /// With `[bucket]`: where bundles come from, this receiver's position
    /// there and how the latest polls went.
    pub bucket: Option<BucketStatus>,
    /// With `[export]`: how the latest automatic exports went.
    pub last_export: Option<JobRecord>,
    /// The verdict `status` exits with (0 ok, 1 warning, 2 critical).
    pub health: Health,
}

#[derive(Debug, Serialize)]
pub struct BucketStatus {
    pub url: String,
    /// The newest object name taken.
    pub position: Option<String>,
    pub last_fetch: JobRecord,
}

pub async fn status(config: &Config) -> anyhow::Result<Status> {
    let failures = quarantine::list(&config.quarantine_dir())?;
    let mut status = Status {
        applied: Vec::new(),
        lag_seconds: None,
        pending: Vec::new(),
        held: Vec::new(),
        failures,
        target_error: None,
        last_pass: JobRecord::read(&config.state_dir, health::LOAD),
        bucket: config.bucket.as_ref().map(|b| BucketStatus {
            url: b.url.clone(),
            position: crate::bucket_pull::cursor(config),
            last_fetch: JobRecord::read(&config.state_dir, crate::bucket_pull::FETCH),
        }),
        last_export: config
            .export
            .as_ref()
            .map(|_| JobRecord::read(&config.state_dir, crate::export::EXPORT)),
        health: Health::default(),
    };
    match Target::connect(config).await {
        Ok(mut target) => {
            status.applied = target.history().await?;
            for s in run::plan_all(config, &mut target, false).await? {
                match s {
                    Step::Apply(e) => status.pending.push(e.file),
                    Step::Hold(e, reason) | Step::OtherChain(e, reason) => {
                        status.held.push(run::Held {
                            file: e.file,
                            reason,
                        })
                    }
                    _ => {}
                }
            }
        }
        Err(e) => {
            // What the state directory knows: the last applied bundles, and
            // the inbox's newer ones.
            status.target_error = Some(e.to_string());
            let known = health::last_applied(&config.state_dir);
            status.applied = known.values().map(Applied::from).collect();
            let newest = |sender: &str| {
                known
                    .values()
                    .filter(|a| a.sender_id == sender)
                    .map(|a| a.seq)
                    .max()
            };
            status.pending = inbox::scan(&config.inbox)?
                .into_iter()
                .filter(|e| newest(&e.sender).is_none_or(|n| e.seq > n))
                .map(|e| e.file)
                .collect();
        }
    }
    status.lag_seconds = health::lag(&status.applied).map(|d| d.as_secs() as i64);
    let held: Vec<(String, String)> = status
        .held
        .iter()
        .map(|h| (h.file.clone(), h.reason.clone()))
        .collect();
    let mut verdict = health::judge(config, &status.applied, &held, status.failures.len());
    if let Some(x) = &status.last_export {
        x.judge(
            &mut verdict,
            "the automatic export",
            config.health.failures_critical,
        );
    }
    if let Some(b) = &status.bucket {
        b.last_fetch.judge(
            &mut verdict,
            &format!("fetching from {}", b.url),
            config.health.failures_critical,
        );
    }
    if let Some(e) = &status.target_error {
        verdict.add(
            HealthLevel::Critical,
            format!("the target database cannot be asked ({e}); the rest is what the state directory knows"),
        );
    }
    status.health = verdict.settle();
    Ok(status)
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.applied.is_empty() {
            writeln!(f, "applied: nothing yet")?;
        }
        for a in &self.applied {
            writeln!(
                f,
                "last {:<8} {} #{} created {} applied {} ({} rows)",
                a.kind, a.sender_id, a.seq, a.created_at, a.applied_at, a.rows
            )?;
        }
        match self.lag_seconds {
            Some(lag) => writeln!(
                f,
                "lag: {lag} s ({}) since the newest applied bundle was created",
                ferry_common::health::human(std::time::Duration::from_secs(lag.max(0) as u64))
            )?,
            None => writeln!(f, "lag: unknown (nothing applied yet)")?,
        }
        let pass = &self.last_pass;
        if let Some(t) = pass.last_ok_at {
            writeln!(
                f,
                "last load pass that succeeded: {}",
                t.format("%Y-%m-%d %H:%M:%S UTC")
            )?;
        }
        if let (Some(e), Some(at)) = (&pass.last_error, pass.last_error_at) {
            writeln!(
                f,
                "last load error ({}): {e}",
                at.format("%Y-%m-%d %H:%M:%S UTC")
            )?;
        }
        if let Some(b) = &self.bucket {
            writeln!(
                f,
                "bucket: {}, position {}",
                b.url,
                b.position
                    .as_deref()
                    .unwrap_or("none (nothing fetched yet)")
            )?;
            let r = &b.last_fetch;
            match r.last_ok_at {
                Some(t) => writeln!(
                    f,
                    "last fetch that succeeded: {}",
                    t.format("%Y-%m-%d %H:%M:%S UTC")
                )?,
                None => writeln!(f, "last fetch that succeeded: never")?,
            }
            if let (true, Some(e), Some(at)) = (r.failing(), &r.last_error, r.last_error_at) {
                writeln!(
                    f,
                    "last fetch error ({}): {e}",
                    at.format("%Y-%m-%d %H:%M:%S UTC")
                )?;
            }
        }
        if let Some(x) = &self.last_export {
            match x.last_ok_at {
                Some(t) => writeln!(
                    f,
                    "last export that succeeded: {}",
                    t.format("%Y-%m-%d %H:%M:%S UTC")
                )?,
                None => writeln!(f, "last export that succeeded: never")?,
            }
            if let (true, Some(e)) = (x.failing(), &x.last_error) {
                writeln!(f, "last export error: {e}")?;
            }
        }
        writeln!(f, "pending: {}", self.pending.len())?;
        for p in &self.pending {
            writeln!(f, "  {p}")?;
        }
        writeln!(f, "held: {}", self.held.len())?;
        for h in &self.held {
            writeln!(f, "  {}: {}", h.file, h.reason)?;
        }
        writeln!(
            f,
            "failures: {} (ferry-receiver failures)",
            self.failures.len()
        )?;
        f.write_str(&self.health.render())
    }
}

/// How a `check` finding counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Works, but an operator should change it; `check` still exits 0.
    Warning,
    Error,
}

/// `check`: config, target database, inbox, media and state directories.
pub async fn check(config: &Config) -> Vec<(Level, String)> {
    let mut out: Vec<(Level, String)> = check_basics(config)
        .await
        .into_iter()
        .map(|(ok, what)| (if ok { Level::Ok } else { Level::Error }, what))
        .collect();
    if config.senders.is_empty() {
        out.push((
            Level::Warning,
            "any sender's bundles are applied: whoever can write into the inbox can replace \
             the copy's tables (and run a complete's DDL); name your senders with \
             `[senders.<sender_id>]`, and give each a `public_key` so only signed bundles \
             apply (docs/receiver.md)"
                .to_owned(),
        ));
    } else {
        for (id, s) in &config.senders {
            match &s.public_key {
                Some(_) => out.push((
                    Level::Ok,
                    format!("sender {id:?}: only bundles signed with its key are applied"),
                )),
                None => out.push((
                    Level::Warning,
                    format!(
                        "sender {id:?} is accepted without a signature: anyone who can write \
                         into the inbox can pass as it; set `[senders.{id}] public_key`"
                    ),
                )),
            }
        }
    }
    if let Some(Engine::Postgres) = config.target.engine()
        && let Ok(mut conn) = sqlx::PgConnection::connect(&config.target.url).await
        && let Ok(true) = sqlx::query_scalar::<_, bool>(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&mut conn)
        .await
    {
        out.push((
            Level::Warning,
            "the receiver connects to the target as a superuser: a complete's DDL runs as \
             written, so whoever can write into the inbox can run any SQL there (and, as a \
             superuser, on the server). Connect as a role that owns only the target database \
             (docs/install.md)"
                .to_owned(),
        ));
    }
    out
}

async fn check_basics(config: &Config) -> Vec<(bool, String)> {
    let mut out = vec![(true, "configuration is valid".to_owned())];
    for (what, dir) in [("state_dir", &config.state_dir), ("inbox", &config.inbox)]
        .into_iter()
        .chain(config.media.iter().map(|(k, v)| (k.as_str(), v)))
    {
        let probe = dir.join(".ferry-check");
        match std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&probe, b""))
            .and_then(|_| std::fs::remove_file(&probe))
        {
            Ok(()) => out.push((true, format!("{what} {} is writable", dir.display()))),
            Err(e) => out.push((
                false,
                format!(
                    "{what} {} is not writable ({e}); create it and give it to the receiver's user",
                    dir.display()
                ),
            )),
        }
    }
    if let Some(b) = &config.bucket {
        out.push(check_bucket(b).await);
    }
    match Target::connect(config).await {
        Ok(_) => out.push((
            true,
            format!(
                "target database {} reachable, ledger ready",
                redact_url(&config.target.url)
            ),
        )),
        Err(e) => out.push((false, e.to_string())),
    }
    out
}

/// The bucket exists and these credentials may list it.
async fn check_bucket(cfg: &ferry_common::bucket::BucketConfig) -> (bool, String) {
    let bucket = match ferry_common::bucket::Bucket::open(cfg) {
        Ok(b) => b,
        Err(e) => return (false, e),
    };
    match bucket.probe().await {
        Ok(()) => (
            true,
            format!("bucket {} reachable, listing allowed", bucket.url),
        ),
        Err(e) => (false, e.to_string()),
    }
}
