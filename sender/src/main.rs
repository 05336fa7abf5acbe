//! The `ferry-sender` command line: parses arguments, starts logging, runs one
//! command from the library and maps the outcome to an exit status, here and
//! nowhere else.
//!
//! Exit status: 0 success; 1 failure; 2 bad usage or configuration;
//! 75 (EX_TEMPFAIL) a transient failure worth retrying (database down, lock busy).

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
    },
    /// Take the changes since the last bundle, then push.
    Partial {
        #[arg(long)]
        json: bool,
        /// Leave the bundle in the outbox.
        #[arg(long)]
        no_push: bool,
    },
    /// Deliver the bundles waiting in the outbox, in order.
    Push {
        #[arg(long)]
        json: bool,
    },
    /// Show the last bundles, the watermarks and the outbox.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration, the database, the tables and their change columns.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Print a commented example configuration.
    ExampleConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Command::ExampleConfig = cli.command {
        print!("{}", ferry_sender::config::EXAMPLE);
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-sender: {e}");
            return ExitCode::from(2);
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
        Command::Complete { json, no_push } => {
            bundle_job(&config, Kind::Complete, json, no_push).await
        }
        Command::Partial { json, no_push } => {
            bundle_job(&config, Kind::Partial, json, no_push).await
        }
        Command::Push { json } => match &config.push {
            None => {
                eprintln!(
                    "ferry-sender: push: the configuration has no [push] section; add one (see `ferry-sender example-config`)"
                );
                ExitCode::from(2)
            }
            Some(p) => push(&config, p, json).await,
        },
        Command::Status { json } => match report::status(&config).await {
            Ok(s) if json => print_json(&s),
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry-sender: status: {e:#}");
                ExitCode::FAILURE
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
        Command::ExampleConfig => ExitCode::SUCCESS,
    }
}

async fn bundle_job(config: &Config, kind: Kind, json: bool, no_push: bool) -> ExitCode {
    let code = build(config, kind, json).await;
    match &config.push {
        Some(p) if code == ExitCode::SUCCESS && !no_push => push(config, p, json).await,
        _ => code,
    }
}

/// Ships the outbox; the exit status says whether everything was delivered.
async fn push(config: &Config, p: &ferry_sender::config::PushConfig, json: bool) -> ExitCode {
    match ferry_sender::push::push_pending(config, p).await {
        Ok(outcome) => {
            if json {
                return print_json(&outcome);
            }
            if outcome.delivered.is_empty() {
                println!("push: nothing pending");
            } else {
                println!(
                    "push: {} bundle(s), {} bytes delivered to {}@{}:{} in {} ms",
                    outcome.delivered.len(),
                    outcome.bytes,
                    p.user,
                    p.host,
                    p.remote_dir,
                    outcome.duration_ms
                );
            }
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

async fn build(config: &Config, kind: Kind, json: bool) -> ExitCode {
    match job::run(config, kind).await {
        Ok(outcome) => {
            if json {
                return print_json(&outcome);
            }
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(kind = %kind, error = %e, "job failed");
            eprintln!("ferry-sender: {kind} failed: {e}");
            if e.is_transient() {
                ExitCode::from(75)
            } else {
                ExitCode::FAILURE
            }
        }
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

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
