//! `status` and `check`: what the sender has done, and whether it can work.

use crate::config::{Carry, Config, Engine, redact_url};
use crate::extract::{ChangeKind, Source, Watermarks};
use crate::outbox::{self, Pending};
use crate::state::{BundleRecord, PushStatus, State};
use ferry_common::health::{self, Health, JobRecord, Level as HealthLevel};
use ferry_common::manifest::Kind;
use serde::Serialize;

/// `ferry-sender status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub sender_id: String,
    pub state_dir: String,
    pub last_complete: Option<BundleRecord>,
    pub last_partial: Option<BundleRecord>,
    pub watermarks: Watermarks,
    pub outbox: Vec<Pending>,
    pub outbox_bytes: u64,
    /// `user@host:port:dir`, or `None` without a `[push]` section.
    pub push_to: Option<String>,
    pub last_push: Option<PushStatus>,
    /// How each job's latest runs went (`complete`, `partial`, `push`).
    pub jobs: std::collections::BTreeMap<String, JobRecord>,
    /// The verdict `status` exits with (0 ok, 1 warning, 2 critical).
    pub health: Health,
}

/// Reads the status without taking the lock (it only reads).
pub async fn status(config: &Config) -> anyhow::Result<Status> {
    let mut s = Status {
        sender_id: config.sender_id.clone(),
        state_dir: config.state_dir.display().to_string(),
        last_complete: None,
        last_partial: None,
        watermarks: Watermarks::new(),
        outbox: outbox::list(&config.outbox(), &config.sender_id)?,
        outbox_bytes: 0,
        push_to: match (&config.push, &config.bucket) {
            (Some(p), _) => Some(format!("{}@{}:{}:{}", p.user, p.host, p.port, p.remote_dir)),
            (None, Some(b)) => Some(b.url.clone()),
            (None, None) => None,
        },
        last_push: None,
        jobs: Default::default(),
        health: Health::default(),
    };
    s.outbox_bytes = s.outbox.iter().map(|p| p.bytes).sum();
    if config.state_dir.join("state.db").exists() {
        let mut state = State::open(&config.state_dir).await?;
        s.last_complete = state.last(Some(Kind::Complete)).await?;
        s.last_partial = state.last(Some(Kind::Partial)).await?;
        s.watermarks = state.watermarks().await?;
        s.last_push = state.push_status().await?;
    }
    for job in ["complete", "partial", "push"] {
        let r = JobRecord::read(&config.state_dir, job);
        if r != JobRecord::default() {
            s.jobs.insert(job.to_owned(), r);
        }
    }
    s.health = judge(config, &s).settle();
    Ok(s)
}

/// The sender's health: each job's failures, and the age of the last
/// complete, of the last partial run and of the oldest bundle not yet pushed
/// against [`Config::health_limits`].
fn judge(config: &Config, s: &Status) -> Health {
    let mut h = Health::default();
    let limits = config.health_limits();
    for (job, r) in &s.jobs {
        // A push record outlives a removed `[push]` or `[bucket]` section.
        if job != "push" || config.push.is_some() || config.bucket.is_some() {
            r.judge(&mut h, job, config.health.failures_critical);
        }
    }
    let created =
        |b: &Option<BundleRecord>| b.as_ref().and_then(|b| health::parse_time(&b.created_at));
    match (created(&s.last_complete), limits.complete) {
        (None, _) => h.add(
            HealthLevel::Warning,
            "no complete yet: the copy has nothing to build on (`ferry-sender complete`)",
        ),
        (Some(t), Some(l)) => h.age(
            "the last complete",
            health::age(t),
            l,
            "health.complete_warning / complete_critical",
        ),
        (Some(_), None) => {}
    }
    if let Some(l) = limits.partial
        && s.last_complete.is_some()
    {
        // A run that found nothing to send succeeded too; before any run, the
        // newest bundle stands in.
        let last_ok = s
            .jobs
            .get("partial")
            .and_then(|r| r.last_ok_at)
            .into_iter()
            .chain(created(&s.last_partial))
            .chain(created(&s.last_complete))
            .max();
        if let Some(t) = last_ok {
            h.age(
                "the last partial run that succeeded",
                health::age(t),
                l,
                "health.partial_warning / partial_critical",
            );
        }
    }
    if let Some(l) = limits.push {
        let oldest = s
            .outbox
            .iter()
            .filter_map(|p| std::fs::metadata(config.outbox().join(&p.file)).ok())
            .filter_map(|m| m.modified().ok())
            .min();
        if let Some(t) = oldest {
            h.age(
                "the oldest bundle waiting to be pushed",
                t.elapsed().unwrap_or_default(),
                l,
                "health.push_warning / push_critical",
            );
        }
    }
    h
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "sender {}  (state {})", self.sender_id, self.state_dir)?;
        for (label, b) in [
            ("complete", &self.last_complete),
            ("partial", &self.last_partial),
        ] {
            match b {
                Some(b) => writeln!(
                    f,
                    "last {label:<8} #{} at {} ({} ago)  {} rows  {} bytes  {} ms  ({})",
                    b.seq,
                    b.created_at,
                    health::parse_time(&b.created_at)
                        .map_or_else(|| "?".to_owned(), |t| health::human(health::age(t))),
                    b.rows,
                    b.bytes,
                    b.duration_ms,
                    b.file
                )?,
                None => writeln!(f, "last {label:<8} none")?,
            }
        }
        if self.watermarks.is_empty() {
            writeln!(f, "watermarks: none (no complete yet)")?;
        } else {
            writeln!(f, "watermarks (partials resend rows changed at or after):")?;
            for (k, v) in &self.watermarks {
                writeln!(f, "  {k:<40} {}", v.as_deref().unwrap_or("(all rows)"))?;
            }
        }
        writeln!(
            f,
            "outbox: {} bundle(s), {} bytes",
            self.outbox.len(),
            self.outbox_bytes
        )?;
        for p in &self.outbox {
            writeln!(f, "  {}  {} bytes", p.file, p.bytes)?;
        }
        match (&self.push_to, &self.last_push) {
            (None, _) => writeln!(f, "push: not configured (no [push] or [bucket] section)")?,
            (Some(to), None) => writeln!(f, "push: to {to}, never attempted")?,
            (Some(to), Some(p)) => {
                writeln!(
                    f,
                    "push: to {to}; last attempt {}, last success {}",
                    p.last_attempt_at,
                    p.last_ok_at.as_deref().unwrap_or("never")
                )?;
                if let Some(e) = &p.last_error {
                    writeln!(f, "last push error: {e}")?;
                }
            }
        }
        // The push's own line above says how the last push went.
        for (job, r) in self.jobs.iter().filter(|(job, _)| *job != "push") {
            if let (Some(e), Some(at)) = (&r.last_error, r.last_error_at) {
                writeln!(
                    f,
                    "last {job} error ({}): {e}",
                    at.format("%Y-%m-%d %H:%M:%S UTC")
                )?;
            }
        }
        f.write_str(&self.health.render())
    }
}

/// One line of `check`.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub level: Level,
    pub what: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Error,
}

/// `ferry-sender check`: config, database, tables, change columns and their
/// indexes, pg_dump, privileges, media sets and the state directory.
pub async fn check(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |level, what: String| out.push(Finding { level, what });
    push(Level::Ok, "configuration is valid".into());

    match std::fs::create_dir_all(&config.state_dir).and_then(|_| {
        let probe = config.state_dir.join(".check-probe");
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)
    }) {
        Ok(()) => push(
            Level::Ok,
            format!("state_dir {} is writable", config.state_dir.display()),
        ),
        Err(e) => push(
            Level::Error,
            format!(
                "state_dir {} is not writable ({e}); create it and give it to the sender's user",
                config.state_dir.display()
            ),
        ),
    }

    match (config.signing_key(), crate::bundle::signer(config)) {
        (None, _) => push(
            Level::Ok,
            "bundles are not signed (no `[bundle] signing_key` or `[push] key_file`, or `sign = false`)"
                .into(),
        ),
        (Some(path), Ok(_)) => push(
            Level::Ok,
            format!(
                "bundles are signed with {} (receivers that list its public key in `[senders]` apply only what it signed)",
                path.display()
            ),
        ),
        (Some(_), Err(e)) => push(Level::Error, e.to_string()),
    }
    if let Some(b) = &config.bucket {
        match ferry_common::bucket::Bucket::open(b) {
            Ok(bucket) => match bucket.check_writable(&config.sender_id).await {
                Ok(object) => push(
                    Level::Ok,
                    format!(
                        "bucket {}: listing and writing allowed (wrote {object})",
                        bucket.url
                    ),
                ),
                Err(e) => push(Level::Error, e.to_string()),
            },
            Err(e) => push(Level::Error, e),
        }
    }
    match &config.push {
        None if config.bucket.is_some() => {}
        None => push(
            Level::Warn,
            "no [push] or [bucket] section: bundles stay in the outbox".into(),
        ),
        Some(p) => match crate::push::Link::open(p).await {
            Ok(link) => {
                push(
                    Level::Ok,
                    format!(
                        "SFTP {}@{}:{}: host key matches {}, key accepted",
                        p.user,
                        p.host,
                        p.port,
                        p.known_hosts.display()
                    ),
                );
                match link.probe().await {
                    Ok(()) => push(
                        Level::Ok,
                        format!("remote directory {:?} is writable", p.remote_dir),
                    ),
                    Err(e) => push(Level::Error, e.to_string()),
                }
                link.close().await;
            }
            Err(e) => push(Level::Error, e.to_string()),
        },
    }

    let mut source = match Source::connect(config).await {
        Ok(s) => s,
        Err(e) => {
            push(Level::Error, e.to_string());
            return out;
        }
    };
    let info = source.info();
    push(
        Level::Ok,
        format!(
            "database {} reachable ({} {})",
            redact_url(&config.source.url),
            info.engine,
            info.version
        ),
    );
    if let Source::Postgres(pg) = &mut source {
        match pg.can_see_all_sessions().await {
            Ok(true) => push(
                Level::Ok,
                "the source user can see all sessions (safe horizon)".into(),
            ),
            Ok(false) => push(
                Level::Error,
                "the source user cannot see other sessions' transactions: run \
                 `GRANT pg_read_all_stats TO <ferry user>` so partials can compute a safe watermark"
                    .into(),
            ),
            Err(e) => push(Level::Error, e.to_string()),
        }
        check_pg_dump(config, &info.version, &mut push).await;
    }
    match source.tables(config).await {
        Err(e) => {
            for line in e.to_string().lines() {
                push(Level::Error, line.to_owned());
            }
        }
        Ok(tables) => {
            push(
                Level::Ok,
                format!(
                    "{} table(s) selected: {}",
                    tables.len(),
                    tables
                        .iter()
                        .map(|t| t.key())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            let names = tables.iter().map(|t| t.key()).collect();
            for name in crate::extract::select::missing_includes(config, &names) {
                push(
                    Level::Warn,
                    crate::extract::select::missing_include_message(&name),
                );
            }
            for t in &tables {
                let why = if t.auto {
                    format!(
                        " (no change column; `without_change_column = \"auto\"`: {} rows or fewer)",
                        config.partial.whole_max_rows
                    )
                } else {
                    String::new()
                };
                match &t.change {
                    None if t.carry == Carry::Whole => push(
                        Level::Ok,
                        format!(
                            "{}: whole in every partial that finds it changed{why}",
                            t.key()
                        ),
                    ),
                    None if t.info.primary_key.is_empty() => push(
                        Level::Ok,
                        format!("{}: completes only (no primary key)", t.key()),
                    ),
                    None => push(
                        if t.auto { Level::Warn } else { Level::Ok },
                        format!(
                            "{}: completes only, and in partials the rows that changed rows \
                             reference{}",
                            t.key(),
                            if t.auto {
                                format!(
                                    " (no change column and more than {} rows: its deletes and \
                                     updates reach the copy with the next complete; add a change \
                                     column, or set `partial = \"whole\"` for it)",
                                    config.partial.whole_max_rows
                                )
                            } else {
                                String::new()
                            }
                        ),
                    ),
                    Some((col, kind)) => {
                        let ty = t
                            .info
                            .columns
                            .iter()
                            .find(|c| &c.name == col)
                            .map_or("", |c| c.sql_type.as_str());
                        if t.change_indexed {
                            push(
                                Level::Ok,
                                format!("{}: change column {col:?} ({ty}), indexed", t.key()),
                            );
                        } else {
                            push(
                                Level::Warn,
                                format!(
                                    "{}: change column {col:?} has no index, so every partial \
                                     scans the whole table; create one: CREATE INDEX ON {} ({})",
                                    t.key(),
                                    t.info.name.quoted(),
                                    ferry_common::ident::quote_ident(col)
                                ),
                            );
                        }
                        if *kind == ChangeKind::Timestamp
                            && ty == "timestamp without time zone"
                            && config.source.engine() == Some(Engine::Postgres)
                        {
                            push(
                                Level::Warn,
                                format!(
                                    "{}: {col:?} has no time zone; ferry reads it as {} \
                                     (`source.timezone`): set that to the app's time zone",
                                    t.key(),
                                    config.source.timezone
                                ),
                            );
                        }
                    }
                }
            }
            if let Source::Postgres(pg) = &mut source
                && config.partial.deletes == crate::config::DeleteCapture::Trigger
            {
                let captured: Vec<String> = tables
                    .iter()
                    .filter(|t| t.change.is_some() && !t.info.primary_key.is_empty())
                    .map(|t| t.info.name.quoted())
                    .collect();
                match pg.capture_check(&captured).await {
                    Ok((ok, line)) => push(if ok { Level::Ok } else { Level::Error }, line),
                    Err(e) => push(Level::Error, e.to_string()),
                }
            }
        }
    }
    for set in &config.media {
        let set2 = set.clone();
        match tokio::task::spawn_blocking(move || crate::extract::media::scan(&set2)).await {
            Ok(Ok(files)) => push(
                Level::Ok,
                format!(
                    "media set {:?}: {} ({} files)",
                    set.name,
                    set.path.display(),
                    files.len()
                ),
            ),
            Ok(Err(e)) => push(Level::Error, e.to_string()),
            Err(e) => push(Level::Error, format!("media scan failed: {e}")),
        }
    }
    out
}

async fn check_pg_dump(config: &Config, server: &str, push: &mut impl FnMut(Level, String)) {
    let out = tokio::process::Command::new(&config.source.pg_dump)
        .arg("--version")
        .output()
        .await;
    let major = |v: &str| -> Option<u32> {
        v.split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())?
            .parse()
            .ok()
    };
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let dump = text.rsplit(' ').next().and_then(major);
            match (dump, major(server)) {
                (Some(d), Some(s)) if d < s => push(
                    Level::Error,
                    format!(
                        "{text} is older than the server ({server}); install pg_dump {s} or \
                         newer and set `source.pg_dump`"
                    ),
                ),
                _ => push(Level::Ok, format!("{text} (schema DDL)")),
            }
        }
        _ => push(
            Level::Error,
            format!(
                "{} cannot be run; install the PostgreSQL client tools or set `source.pg_dump`",
                config.source.pg_dump.display()
            ),
        ),
    }
}
