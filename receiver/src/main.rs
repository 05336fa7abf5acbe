//! The `ferry-receiver` command line; outcomes map to exit status here only.
//!
//! Exit status: 0 success (everything applied or nothing pending); 1 a bundle
//! failed or is held, a hook failed, or another failure; 2 bad usage or configuration; 75 a
//! transient failure (target database unreachable, lock busy). `status` alone
//! follows the monitoring-plugin convention: 0 ok, 1 warning, 2 critical,
//! 3 unknown.

use clap::{Parser, Subcommand, ValueEnum};
use ferry_common::health::Level;
use ferry_common::lock::StateLock;
use ferry_receiver::load::Target;
use ferry_receiver::{Config, daemon, quarantine, report, run};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ferry-receiver",
    version,
    about = "Verify and load ferry bundles, in order and exactly once"
)]
struct Cli {
    #[arg(long, global = true, default_value = "/etc/ferry/receiver.toml")]
    config: PathBuf,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Parquet,
}

#[derive(Subcommand)]
enum Command {
    /// Apply every pending bundle in the inbox, then exit.
    Load {
        #[arg(long)]
        json: bool,
    },
    /// With `[bucket]`: download what the bucket holds beyond this
    /// receiver's position into the inbox, without applying it (`load` and
    /// the daemon fetch first themselves).
    Fetch,
    /// The replicated tables as one Parquet file per table, as of the newest
    /// applied bundle, with `_manifest.json` (docs/analytics.md).
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Parquet)]
        format: ExportFormat,
        /// A new directory, or `s3://bucket/prefix` (endpoint and
        /// credentials from `[bucket]`, else the AWS environment).
        #[arg(long)]
        to: String,
        /// Only these tables (schema.name or name, glob patterns); repeatable.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Export this column (`table.column`) as its text form; repeatable.
        #[arg(long = "as-text")]
        as_text: Vec<String>,
        /// Export every column whose type has no mapping as its text form.
        #[arg(long)]
        unknown_as_text: bool,
        /// The point: `latest` (the target as it is), a bundle's seq, or a
        /// time (as `restore --at`); a past point is rebuilt from the inbox's
        /// history in a scratch database, which is dropped afterwards.
        #[arg(long, default_value = "latest")]
        at: String,
        /// Instead of whole tables, the changes of the applied partial with
        /// this seq (`_ferry_seq`, `_ferry_op`, then the columns).
        #[arg(long, conflicts_with = "at")]
        changes: Option<u64>,
        /// The sender whose history is meant, when the inbox holds several.
        #[arg(long)]
        sender: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The daemon: watch the inbox, load, prune.
    Run,
    /// Last applied bundles, lag, pending, held, failures and the health; exits
    /// 0 ok, 1 warning, 2 critical, 3 unknown (for a monitoring system).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration, target database, inbox and media directories.
    Check,
    /// List quarantined bundles with their reasons.
    Failures {
        #[arg(long)]
        json: bool,
    },
    /// Put a quarantined bundle back into the inbox.
    Retry { bundle: String },
    /// Remove applied bundles past their lifetime.
    Prune,
    /// The version history: every applied bundle, whether it is still kept,
    /// and which points can be restored.
    Versions {
        #[arg(long)]
        json: bool,
    },
    /// Rebuild tables as they were at a point of the history (the complete it
    /// builds on plus every partial up to it) in another database: an empty
    /// PostgreSQL database, chosen tables of an existing one (--replace), or a
    /// new SQLite file. Nothing is visible there until all of it is.
    Restore(RestoreArgs),
    /// Print a commented example configuration.
    ExampleConfig,
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// `latest`, a bundle's seq, or a time (2026-12-03T17:00:00Z; a day
    /// alone means its end), UTC.
    #[arg(long, default_value = "latest")]
    at: String,
    /// postgres://user@host/db, or sqlite:///path/new.db (a new file).
    #[arg(long)]
    into: String,
    /// Only these tables (schema.name or name, glob patterns); repeatable.
    #[arg(long = "table", value_name = "PATTERN")]
    tables: Vec<String>,
    /// Also write the media files as of that point, under DIR/<set>/.
    #[arg(long, value_name = "DIR")]
    media_into: Option<PathBuf>,
    /// Replace the selected tables where they exist (in one transaction;
    /// every other table is untouched).
    #[arg(long)]
    replace: bool,
    /// Say what would be restored, from which bundles; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// A directory of bundles to restore from instead of this receiver's
    /// inbox (the sender's delivered bundles, a copy of the history), or a
    /// bucket (`s3://bucket/prefix`: only the bundles the point needs are
    /// downloaded; endpoint and credentials from `[bucket]`, else the AWS
    /// environment); no configuration or running receiver needed.
    #[arg(long, value_name = "DIR|s3://…")]
    from: Option<PathBuf>,
    /// For a PostgreSQL history into SQLite: a PostgreSQL server (URL) where
    /// a scratch database may be created and dropped; default: the target's.
    #[arg(long, value_name = "URL")]
    via: Option<String>,
    /// The sender whose bundles to restore, when the directory holds several.
    #[arg(long)]
    sender: Option<String>,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_common::service::init_logging(matches!(cli.log_format, LogFormat::Json));
    if let Command::ExampleConfig = cli.command {
        print!("{}", ferry_receiver::config::EXAMPLE);
        return ExitCode::SUCCESS;
    }
    if let Command::GenerateDocs { dir } = &cli.command {
        use clap::CommandFactory;
        return match ferry_common::cli_docs::generate(Cli::command(), dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("generate-docs {}: {e}", dir.display()), false),
        };
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => Some(c),
        // A restore from a directory of bundles needs no receiver.
        Err(_)
            if matches!(&cli.command, Command::Restore(a) if a.from.is_some())
                && !cli.config.exists() =>
        {
            None
        }
        Err(e) => {
            eprintln!("ferry-receiver: {e}");
            return match cli.command {
                Command::Status { .. } => ExitCode::from(Level::Unknown.exit_code()),
                _ => ExitCode::from(2),
            };
        }
    };
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(async move {
            match (cli.command, config) {
                (Command::Restore(args), config) => restore(args, config.as_ref()).await,
                (command, Some(config)) => execute(command, config).await,
                (_, None) => ExitCode::from(2),
            }
        }),
        Err(e) => {
            eprintln!("ferry-receiver: could not start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long `load` and `prune` wait for a pass of the daemon (or another
/// command) to finish.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

fn fail(e: impl std::fmt::Display, transient: bool) -> ExitCode {
    eprintln!("ferry-receiver: {e}");
    if transient {
        ExitCode::from(75)
    } else {
        ExitCode::FAILURE
    }
}

/// The state lock and the target, for commands that change either; a failure
/// is already reported and mapped to its exit status.
async fn lock_and_connect(config: &Config) -> Result<(StateLock, Target), ExitCode> {
    // Beside the daemon: wait for its pass to end, then run between passes.
    if ferry_receiver::daemon::running(config) {
        eprintln!("ferry-receiver: the daemon runs here; this runs between its passes");
    }
    let lock = StateLock::acquire_waiting(&config.state_dir, LOCK_WAIT)
        .await
        .map_err(|e| fail(e, true))?;
    let target = Target::connect(config).await.map_err(|e| {
        let t = e.is_transient();
        ferry_receiver::health::record_pass(config, Some((&e.to_string(), t)));
        fail(e, t)
    })?;
    Ok((lock, target))
}

async fn execute(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Load { json } => {
            let (_lock, mut target) = match lock_and_connect(&config).await {
                Ok(v) => v,
                Err(code) => return code,
            };
            // The bucket out of reach: what the inbox already holds is
            // still applied; the exit code then says the fetch failed.
            let fetch_error = match config.bucket {
                Some(_) => ferry_receiver::bucket_pull::pull(&config, &mut target)
                    .await
                    .err(),
                None => None,
            };
            let pass = run::pass(&config, &mut target).await;
            ferry_receiver::health::record_pass(
                &config,
                pass.as_ref()
                    .err()
                    .map(|e| (e.to_string(), matches!(e, run::PassError::Transient { .. })))
                    .as_ref()
                    .map(|(e, t)| (e.as_str(), *t)),
            );
            // `[export]`, outside the load's transaction; never holds the chain.
            if let Ok(r) = &pass {
                ferry_receiver::export::after_pass(&config, r).await;
            }
            match pass {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    } else {
                        for a in &r.applied {
                            println!(
                                "applied {} ({} #{}): {} rows, {} media files, {} ms",
                                a.file, a.kind, a.seq, a.rows, a.media_files, a.duration_ms
                            );
                        }
                        for d in &r.dropped {
                            println!("dropped {d}: superseded by a newer complete");
                        }
                        for h in &r.held {
                            println!("held    {}: {}", h.file, h.reason);
                        }
                        for f in &r.failed {
                            println!("FAILED  {} (quarantined): {}", f.file, f.reason);
                        }
                        for (file, h) in &r.hook_failures {
                            println!("hook failed after {file}: {} ({})", h.command, h.reason);
                        }
                        if r.applied.is_empty() && r.held.is_empty() && r.failed.is_empty() {
                            println!("nothing pending");
                        }
                    }
                    if let Some(e) = fetch_error {
                        let t = e.transient;
                        return fail(e, t);
                    }
                    // A failed hook does not hold the chain, but it is not success.
                    if r.failed.is_empty() && r.held.is_empty() && r.hook_failures.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    let t = matches!(e, run::PassError::Transient { .. });
                    fail(e, t)
                }
            }
        }
        Command::Export {
            format: ExportFormat::Parquet,
            to,
            tables,
            as_text,
            unknown_as_text,
            at,
            changes,
            sender,
            json,
        } => {
            let at = match at.parse() {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("ferry-receiver: {e}");
                    return ExitCode::from(2);
                }
            };
            // `[export]`'s column decisions hold for exports by hand too.
            let (mut as_text, mut unknown_as_text) = (as_text, unknown_as_text);
            if let Some(e) = &config.export {
                as_text.extend(e.as_text.iter().cloned());
                unknown_as_text |= e.unknown_as_text;
            }
            let req = ferry_receiver::export::Request {
                to,
                tables,
                as_text,
                unknown_as_text,
                at,
                sender,
            };
            let done = match changes {
                Some(seq) => {
                    match ferry_receiver::export::partial_file(&config, seq, req.sender.as_deref())
                    {
                        Ok(file) => {
                            ferry_receiver::export::export_changes(&config, &file, &req).await
                        }
                        Err(e) => Err(e),
                    }
                }
                None => ferry_receiver::export::export(&config, &req).await,
            };
            match done {
                Ok(m) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
                    } else {
                        for t in &m.tables {
                            println!(
                                "exported {}: {} rows, {} bytes ({})",
                                t.table, t.rows, t.bytes, t.file
                            );
                        }
                        println!("to {} (_manifest.json written last)", req.to);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("export: {e:#}"), false),
            }
        }
        Command::Fetch => {
            if config.bucket.is_none() {
                return fail(
                    "fetch: the configuration has no [bucket] section (bundles arrive in the inbox by SFTP)",
                    false,
                );
            }
            let (_lock, mut target) = match lock_and_connect(&config).await {
                Ok(v) => v,
                Err(code) => return code,
            };
            match ferry_receiver::bucket_pull::pull(&config, &mut target).await {
                Ok(p) => {
                    println!("fetched {} file(s), {} bytes", p.files, p.bytes);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let t = e.transient;
                    fail(e, t)
                }
            }
        }
        Command::Run => {
            let signals = match ferry_common::service::StopSignals::register() {
                Ok(s) => s,
                Err(e) => return fail(format!("could not install signal handlers: {e}"), false),
            };
            match daemon::run(&config, signals).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let busy = e.downcast_ref::<ferry_common::lock::LockError>().is_some();
                    fail(format!("{e:#}"), busy)
                }
            }
        }
        // The monitoring-plugin convention: 0 ok, 1 warning, 2 critical, 3 unknown.
        Command::Status { json } => match report::status(&config).await {
            Ok(s) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                } else {
                    print!("{s}");
                }
                ExitCode::from(s.health.level().exit_code())
            }
            Err(e) => {
                eprintln!("ferry-receiver: status: {e:#}");
                ExitCode::from(Level::Unknown.exit_code())
            }
        },
        Command::Check => {
            let findings = report::check(&config).await;
            for (level, what) in &findings {
                let tag = match level {
                    report::Level::Ok => "ok   ",
                    report::Level::Warning => "WARN ",
                    report::Level::Error => "ERROR",
                };
                println!("{tag} {what}");
            }
            if findings
                .iter()
                .all(|(level, _)| *level != report::Level::Error)
            {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Failures { json } => match quarantine::list(&config.quarantine_dir()) {
            Ok(list) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Ok(list) => {
                if list.is_empty() {
                    println!("no failed bundles");
                }
                for f in list {
                    println!(
                        "== {} ({} #{} {})\n{}",
                        f.file, f.sender, f.seq, f.kind, f.report
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, false),
        },
        Command::Retry { bundle } => {
            match quarantine::retry(&config.quarantine_dir(), &config.inbox, &bundle) {
                Ok(p) => {
                    if ferry_receiver::daemon::running(&config) {
                        println!(
                            "{} is back in the inbox; the running daemon applies it now",
                            p.display()
                        );
                    } else {
                        println!(
                            "{} is back in the inbox; `ferry-receiver load` (or the daemon, once started) applies it",
                            p.display()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, false),
            }
        }
        Command::Prune => {
            let (_lock, mut target) = match lock_and_connect(&config).await {
                Ok(v) => v,
                Err(code) => return code,
            };
            match run::prune(&config, &mut target).await {
                Ok(removed) => {
                    for (file, why) in &removed {
                        println!("pruned {file}: {why}");
                    }
                    println!("pruned {} bundle(s)", removed.len());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, false),
            }
        }
        Command::Versions { json } => {
            let mut target = match Target::connect(&config).await {
                Ok(t) => t,
                Err(e) => {
                    let t = e.is_transient();
                    return fail(e, t);
                }
            };
            match ferry_receiver::versions::list(&config, &mut target).await {
                Ok(v) if json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    print!("{}", ferry_receiver::versions::render(&v));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let t = e.is_transient();
                    fail(e, t)
                }
            }
        }
        Command::ExampleConfig | Command::GenerateDocs { .. } | Command::Restore(_) => {
            ExitCode::SUCCESS
        }
    }
}

async fn restore(args: RestoreArgs, config: Option<&Config>) -> ExitCode {
    let at = match args.at.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ferry-receiver: {e}");
            return ExitCode::from(2);
        }
    };
    let req = ferry_receiver::restore::Request {
        at,
        into: args.into,
        tables: args.tables,
        media_into: args.media_into,
        replace: args.replace,
        dry_run: args.dry_run,
        from: args
            .from
            .or_else(|| config.map(|c| c.inbox.clone()))
            .unwrap_or_default(),
        sender: args.sender,
        live_target: config.map(|c| c.target.url.clone()),
        via: args.via,
        // Not the receiver's staging directory, which each load pass
        // empties. A complete's data streams; only its DDL, the partials and
        // media are staged here.
        staging: std::env::temp_dir().join(format!("ferry-restore-{}", std::process::id())),
        jobs: config.map_or(2, |c| c.target.jobs),
        limits: ferry_common::reader::Limits {
            trust: config.and_then(ferry_receiver::trust::from_config),
            ..Default::default()
        },
    };
    let mut req = req;
    // A bucket as the history: what the plan needs, fetched into a scratch
    // directory first.
    let from_bucket = req.from.to_string_lossy().starts_with("s3://");
    let scratch = std::env::temp_dir().join(format!("ferry-restore-s3-{}", std::process::id()));
    if from_bucket {
        let url = req.from.to_string_lossy().into_owned();
        let fetched = ferry_receiver::bucket_pull::fetch_for_restore(
            &url,
            config.and_then(|c| c.bucket.as_ref()),
            &scratch,
            &req.at,
            req.sender.as_deref(),
        )
        .await;
        if let Err(e) = fetched {
            let _ = std::fs::remove_dir_all(&scratch);
            return fail(format!("restore from {url}: {e}"), false);
        }
        req.from = scratch.clone();
    }
    let result = ferry_receiver::restore::restore(&req).await;
    let _ = std::fs::remove_dir_all(&req.staging);
    if from_bucket {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    match result {
        Ok(o) if args.json => {
            println!("{}", serde_json::to_string_pretty(&o).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(o) => {
            print!("{}", o.render());
            ExitCode::SUCCESS
        }
        Err(e) if e.is_usage() => {
            eprintln!("ferry-receiver: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            let transient =
                matches!(&e, ferry_receiver::restore::RestoreError::Load(l) if l.is_transient());
            fail(format!("restore: {e}"), transient)
        }
    }
}
