//! Command hooks: run after a bundle's transaction committed, as argv (no shell
//! unless the operator writes one), with the bundle's facts in the environment, a
//! timeout, and their output in the log. A failed hook is reported (log, status)
//! but does not hold the chain: the data is committed, and holding fresh data
//! hostage to a report script would be worse. SQL hooks run inside the load
//! transaction instead (see `load`), where a failure does fail the load.

use crate::config::Hook;
use ferry_common::manifest::Manifest;
use std::time::Instant;
use tokio::process::Command;

/// A hook that failed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookFailure {
    pub command: String,
    pub reason: String,
}

/// Runs the command hooks for `kind`; returns the failures.
pub async fn run_commands(hooks: &[Hook], manifest: &Manifest, file: &str) -> Vec<HookFailure> {
    let mut failures = Vec::new();
    let tables = manifest
        .tables
        .iter()
        .map(|t| t.name.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for h in hooks {
        let Some(argv) = &h.command else { continue };
        if !h.on.iter().any(|k| k == manifest.kind.as_str()) {
            continue;
        }
        let shown = argv.join(" ");
        let started = Instant::now();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("FERRY_BUNDLE", file)
            .env("FERRY_KIND", manifest.kind.as_str())
            .env("FERRY_SEQ", manifest.seq.0.to_string())
            .env("FERRY_SENDER", &manifest.sender_id)
            .env("FERRY_TABLES", &tables)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let outcome = match tokio::time::timeout(h.timeout, cmd.output()).await {
            Err(_) => Err(format!(
                "timed out after {}",
                humantime::format_duration(h.timeout)
            )),
            Ok(Err(e)) => Err(format!("could not start: {e}")),
            Ok(Ok(out)) => {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    tracing::info!(hook = %shown, "{line}");
                }
                for line in String::from_utf8_lossy(&out.stderr).lines() {
                    tracing::warn!(hook = %shown, "{line}");
                }
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!("exited with {}", out.status))
                }
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(()) => tracing::info!(hook = %shown, bundle = %file, ms, "hook finished"),
            Err(reason) => {
                tracing::error!(hook = %shown, bundle = %file, ms, error = %reason, "hook failed");
                failures.push(HookFailure {
                    command: shown,
                    reason,
                });
            }
        }
    }
    failures
}
