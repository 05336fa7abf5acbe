//! The `ferry-receiver` command line; outcomes map to exit status here only.
//!
//! Exit status: 0 success (everything applied or nothing pending); 1 a bundle
//! failed or is held, a hook failed, or another failure; 2 bad usage or configuration; 75 a
//! transient failure (target database unreachable, lock busy).

use clap::{Parser, Subcommand, ValueEnum};
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

#[derive(Subcommand)]
enum Command {
    /// Apply every pending bundle in the inbox, then exit.
    Load {
        #[arg(long)]
        json: bool,
    },
    /// The daemon: watch the inbox, load, prune.
    Run,
    /// Last applied bundles, lag, pending, held, failures.
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
    /// Print a commented example configuration.
    ExampleConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_common::service::init_logging(matches!(cli.log_format, LogFormat::Json));
    if let Command::ExampleConfig = cli.command {
        print!("{}", ferry_receiver::config::EXAMPLE);
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-receiver: {e}");
            return ExitCode::from(2);
        }
    };
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(execute(cli.command, config)),
        Err(e) => {
            eprintln!("ferry-receiver: could not start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

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
    let lock = StateLock::acquire(&config.state_dir).map_err(|e| fail(e, true))?;
    let target = Target::connect(config).await.map_err(|e| {
        let t = e.is_transient();
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
            match run::pass(&config, &mut target).await {
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
        Command::Status { json } => match report::status(&config).await {
            Ok(s) if json => {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("status: {e:#}"), false),
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
                    println!(
                        "{} is back in the inbox; `ferry-receiver load` applies it",
                        p.display()
                    );
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
        Command::ExampleConfig => ExitCode::SUCCESS,
    }
}
