//! The `ferry-sender` command line: parses arguments, starts logging, runs one
//! command from the library and maps the outcome to an exit status, here and
//! nowhere else.
//!
//! Exit status: 0 success; 1 failure; 2 bad usage or configuration;
//! 75 (EX_TEMPFAIL) a transient failure worth retrying (database down, lock busy).
//! `status` alone follows the monitoring-plugin convention: 0 ok, 1 warning,
//! 2 critical, 3 unknown (its state could not be read).

use clap::{Parser, Subcommand, ValueEnum};
use ferry_common::manifest::Kind;
use ferry_sender::report::Level;
use ferry_sender::{Config, job, report};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ferry-sender",
    version,
    about = "Ship an app's database and media as verified bundles"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "/etc/ferry/sender.toml")]
    config: PathBuf,
    /// Log line format on stderr.
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

#[derive(Subcommand)]
enum Command {
    /// Take a complete snapshot of the selected tables and media, then push.
    Complete {
        #[arg(long)]
        json: bool,
        /// Leave the bundle in the outbox.
        #[arg(long)]
        no_push: bool,
        /// Only these tables (`schema.table`, `*` and `?` wildcards; repeat
        /// for more): a resync of chosen tables without resending the rest.
        /// It travels as the chain's next partial with those tables whole;
        /// the receiver replaces exactly their rows and the chain goes on.
        #[arg(long = "table", value_name = "PATTERN")]
        tables: Vec<String>,
    },
    /// Take the changes since the last bundle, then push.
    Partial {
        #[arg(long)]
        json: bool,
        /// Leave the bundle in the outbox.
        #[arg(long)]
        no_push: bool,
    },
    /// A complete now that re-bases the chain (waits for a running job), drops the
    /// queued bundles it supersedes, then pushes.
    Resync {
        #[arg(long)]
        json: bool,
        /// Leave the bundle in the outbox.
        #[arg(long)]
        no_push: bool,
        /// How long to wait for a job in progress (the daemon's) to finish.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// The daemon: completes on `[complete] schedule`, partials every
    /// `[partial] interval`, pushing after each; stops on SIGTERM/SIGINT.
    Run,
    /// Deliver the bundles waiting in the outbox, in order.
    Push {
        #[arg(long)]
        json: bool,
    },
    /// Show the last bundles, the watermarks, the outbox and the health; exits
    /// 0 ok, 1 warning, 2 critical, 3 unknown (for a monitoring system).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration, the database, the tables and their change columns.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Remove what `[bucket] keep_completes` and `keep_for` no longer keep
    /// from the bucket (chain-aware: every kept point stays restorable).
    PruneBucket {
        /// List what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print a commented example configuration.
    ExampleConfig,
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_common::service::init_logging(matches!(cli.log_format, LogFormat::Json));
    if let Command::ExampleConfig = cli.command {
        print!("{}", ferry_sender::config::EXAMPLE);
        return ExitCode::SUCCESS;
    }
    if let Command::GenerateDocs { dir } = &cli.command {
        return generate_docs(dir);
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-sender: {e}");
            return match cli.command {
                Command::Status { .. } => {
                    ExitCode::from(ferry_common::health::Level::Unknown.exit_code())
                }
                _ => ExitCode::from(2),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry-sender: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command, config))
}

async fn run(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Complete {
            json,
            no_push,
            tables,
        } => bundle_job(&config, Kind::Complete, &tables, json, no_push).await,
        Command::Partial { json, no_push } => {
            bundle_job(&config, Kind::Partial, &[], json, no_push).await
        }
        Command::Resync {
            json,
            no_push,
            wait,
        } => match job::resync(&config, wait).await {
            Ok(r) => {
                if json {
                    print_json(&r);
                } else {
                    print_outcome(&r.complete);
                    for f in &r.dropped {
                        println!("dropped {f}: queued, superseded by the resync");
                    }
                }
                if no_push || (config.push.is_none() && config.bucket.is_none()) {
                    ExitCode::SUCCESS
                } else {
                    push(&config, json).await
                }
            }
            Err(e) => job_failed(Kind::Complete, &e),
        },
        Command::Run => {
            let signals = match ferry_common::service::StopSignals::register() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("ferry-sender: could not install signal handlers: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match ferry_sender::daemon::run(std::sync::Arc::new(config), signals).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "the sender stopped on an error");
                    eprintln!("ferry-sender: {e:#}");
                    if e.downcast_ref::<ferry_common::lock::LockError>().is_some() {
                        ExitCode::from(75)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
        Command::Push { json } => {
            if config.push.is_none() && config.bucket.is_none() {
                eprintln!(
                    "ferry-sender: push: the configuration has no [push] (SFTP) or [bucket] section; add one (see `ferry-sender example-config`)"
                );
                return ExitCode::from(2);
            }
            push(&config, json).await
        }
        // The monitoring-plugin convention: 0 ok, 1 warning, 2 critical, 3 unknown.
        Command::Status { json } => match report::status(&config).await {
            Ok(s) => {
                if json {
                    print_json(&s);
                } else {
                    print!("{s}");
                }
                ExitCode::from(s.health.level().exit_code())
            }
            Err(e) => {
                eprintln!("ferry-sender: status: {e:#}");
                ExitCode::from(ferry_common::health::Level::Unknown.exit_code())
            }
        },
        Command::Check { json } => {
            let findings = report::check(&config).await;
            let failed = findings.iter().any(|f| f.level == Level::Error);
            if json {
                print_json(&findings);
            } else {
                for f in &findings {
                    let tag = match f.level {
                        Level::Ok => "ok   ",
                        Level::Warn => "warn ",
                        Level::Error => "ERROR",
                    };
                    println!("{tag} {}", f.what);
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::PruneBucket { dry_run, json } => {
            let Some(b) = &config.bucket else {
                eprintln!("ferry-sender: prune-bucket: the configuration has no [bucket] section");
                return ExitCode::from(2);
            };
            match ferry_sender::bucket_push::prune(&config, b, dry_run).await {
                Ok(p) if json => print_json(&p),
                Ok(p) => {
                    let verb = if dry_run { "would remove" } else { "removed" };
                    for f in &p.removed {
                        println!("{verb} {f}");
                    }
                    println!("{} object(s) {verb}, {} kept", p.removed.len(), p.kept);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ferry-sender: prune-bucket: {e}");
                    if e.is_transient() {
                        ExitCode::from(75)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
        Command::ExampleConfig | Command::GenerateDocs { .. } => ExitCode::SUCCESS,
    }
}

async fn bundle_job(
    config: &Config,
    kind: Kind,
    tables: &[String],
    json: bool,
    no_push: bool,
) -> ExitCode {
    // A complete sent in volumes is pushed volume by volume while it is written.
    let pushing = config.push.as_ref().filter(|_| !no_push);
    let code = build(config, kind, tables, json, pushing).await;
    let delivers = config.push.is_some() || config.bucket.is_some();
    if code == ExitCode::SUCCESS && !no_push && delivers {
        push(config, json).await
    } else {
        code
    }
}

/// Ships the outbox; the exit status says whether everything was delivered.
async fn push(config: &Config, json: bool) -> ExitCode {
    let to = match (&config.push, &config.bucket) {
        (Some(p), _) => format!("{}@{}:{}", p.user, p.host, p.remote_dir),
        (None, Some(b)) => b.url.clone(),
        (None, None) => String::new(),
    };
    let Some(result) = ferry_sender::push::deliver_pending(config).await else {
        return ExitCode::SUCCESS;
    };
    match result {
        Ok(outcome) => {
            if json {
                return print_json(&outcome);
            }
            if outcome.delivered.is_empty() {
                println!("push: nothing pending");
            } else {
                println!(
                    "push: {} bundle(s), {} bytes delivered to {to} in {} ms",
                    outcome.delivered.len(),
                    outcome.bytes,
                    outcome.duration_ms
                );
            }
            ExitCode::SUCCESS
        }
        // The daemon (or another manual push) is delivering the same outbox.
        Err(e @ ferry_sender::push::PushError::Busy(_)) => {
            tracing::info!(reason = %e, "push skipped");
            println!("push: another push is running; it delivers what is queued");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "push failed");
            eprintln!(
                "ferry-sender: push failed: {e}\nThe bundles stay queued in {}; `ferry-sender push` retries.",
                config.outbox().display()
            );
            if e.is_transient() {
                ExitCode::from(75)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn build(
    config: &Config,
    kind: Kind,
    tables: &[String],
    json: bool,
    push: Option<&ferry_sender::config::PushConfig>,
) -> ExitCode {
    match ferry_sender::push::job_following(config, kind, tables, push).await {
        Ok(outcome) => {
            if json {
                return print_json(&outcome);
            }
            print_outcome(&outcome);
            ExitCode::SUCCESS
        }
        Err(e) => job_failed(kind, &e),
    }
}

fn print_outcome(outcome: &job::JobOutcome) {
    if let Some(note) = &outcome.note {
        println!("note: {note}");
    }
    match (&outcome.seq, &outcome.file) {
        (Some(seq), Some(file)) => println!(
            "{} #{seq}: {} rows in {} tables, {} media files, {} bytes, {} ms -> {}",
            outcome.kind,
            outcome.rows,
            outcome.tables,
            outcome.media_files,
            outcome.bytes,
            outcome.duration_ms,
            file.display()
        ),
        _ => println!("partial: no changes since the last bundle; nothing written"),
    }
}

fn job_failed(kind: Kind, e: &job::JobError) -> ExitCode {
    tracing::error!(kind = %kind, error = %e, "job failed");
    eprintln!("ferry-sender: {kind} failed: {e}");
    if e.is_transient() {
        ExitCode::from(75)
    } else {
        ExitCode::FAILURE
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-sender: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate_docs(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    match ferry_common::cli_docs::generate(Cli::command(), dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-sender: generate-docs {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
