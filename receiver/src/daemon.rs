//! `ferry-receiver run`: holds the lock, loads at start, then whenever the inbox
//! changes (notify events are hints), on a periodic rescan (the safety net), and
//! prunes on its own schedule. SIGTERM or SIGINT stops it between passes.

use crate::config::Config;
use crate::load::Target;
use crate::{health, run};
use ferry_common::lock::StateLock;
use ferry_common::service::{self, StopSignals};
use notify::{EventKind, RecursiveMode, Watcher};
use std::time::Duration;
use tokio::time::MissedTickBehavior;

/// Stops a background task when the daemon returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a load in flight may finish after a stop signal before it is abandoned
/// (its transaction rolls back; the bundle stays in the inbox).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The lock file that marks a running daemon (see [`running`]).
pub const DAEMON_LOCK: &str = "daemon.lock";

/// Whether a daemon runs on this state directory.
pub fn running(config: &Config) -> bool {
    matches!(
        StateLock::acquire_named(&config.state_dir, DAEMON_LOCK),
        Err(ferry_common::lock::LockError::Busy { .. })
    )
}

/// Sleeps until `at`, or forever without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub async fn run(config: &Config, mut signals: StopSignals) -> anyhow::Result<()> {
    // One daemon per state directory; the state lock itself is taken per
    // pass, so that `load`, `prune` and `retry` by hand run between passes.
    let _instance = StateLock::acquire_named(&config.state_dir, DAEMON_LOCK)?;
    std::fs::create_dir_all(&config.inbox)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            // A rename into the inbox is Modify(Name(To)), a new file Create.
            let relevant = matches!(
                ev.kind,
                EventKind::Create(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
            ) || ev.need_rescan();
            if relevant {
                let _ = tx.try_send(());
            }
        }
    })?;
    watcher.watch(&config.inbox, RecursiveMode::NonRecursive)?;
    let mut rescan = tokio::time::interval(config.daemon.rescan_interval);
    rescan.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut poll = tokio::time::interval(
        config
            .bucket
            .as_ref()
            .map_or(Duration::from_secs(3600), |b| b.poll_interval),
    );
    poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut prune = tokio::time::interval(config.daemon.prune_interval);
    prune.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // The embedded SFTP endpoint serves while the daemon runs.
    let _endpoint = match &config.sftp_server {
        Some(cfg) => {
            let endpoint = crate::sftp_server::Endpoint::bind(cfg, &config.inbox).await?;
            tracing::info!(listen = %endpoint.local_addr()?, inbox = %config.inbox.display(), "SFTP endpoint listening");
            Some(AbortOnDrop(tokio::spawn(async move {
                if let Err(error) = endpoint.serve().await {
                    tracing::error!(%error, "the SFTP endpoint stopped");
                }
            })))
        }
        None => None,
    };
    let _metrics = crate::metrics::serve(config).await?.map(AbortOnDrop);
    let _control = crate::control::serve(config).await?.map(AbortOnDrop);
    let mut target: Option<Target> = None;
    let mut stop = false;
    let mut again: Option<tokio::time::Instant> = None;
    tracing::info!(inbox = %config.inbox.display(), "receiver running");
    service::ready("running");
    service::spawn_watchdog();
    loop {
        let prune_now = tokio::select! {
            sig = signals.recv() => {
                tracing::info!(signal = sig, "stopping");
                service::stopping();
                break;
            }
            _ = rx.recv() => {
                // Coalesce a burst of events into one pass. Draining happens
                // before the pass scans, so an event that arrives during the
                // pass stays queued and triggers the next one.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                false
            }
            _ = rescan.tick() => false,
            _ = poll.tick(), if config.bucket.is_some() => false,
            _ = prune.tick() => true,
            () = until(again) => false,
        };
        again = None;
        // A manual `load` or `prune` holds the state lock: this pass waits
        // for a second.
        let _pass = match StateLock::acquire(&config.state_dir) {
            Ok(lock) => lock,
            Err(ferry_common::lock::LockError::Busy { .. }) => {
                tracing::debug!("a manual command holds the state lock; passing in a second");
                again = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if target.is_none() {
            match Target::connect(config).await {
                Ok(t) => target = Some(t),
                Err(error) => {
                    let level = health::record_pass(
                        config,
                        Some((&error.to_string(), error.is_transient())),
                    );
                    if level == tracing::Level::ERROR {
                        tracing::error!(%error, "target database unavailable; retrying at the next rescan");
                    } else {
                        tracing::warn!(%error, "target database unavailable; retrying at the next rescan");
                    }
                    continue;
                }
            }
        }
        let Some(t) = target.as_mut() else { continue };
        if config.bucket.is_some()
            && let Err(error) = crate::bucket_pull::pull(config, t).await
        {
            if error.transient {
                tracing::warn!(%error, "could not fetch from the bucket; the next poll retries");
            } else {
                tracing::error!(%error, "could not fetch from the bucket");
            }
        }
        let pg_session = t.pg_session();
        let outcome = {
            let pass = run::pass(config, t);
            tokio::pin!(pass);
            tokio::select! {
                r = &mut pass => Some(r),
                sig = signals.recv() => {
                    tracing::info!(signal = sig, grace_s = STOP_GRACE.as_secs(), "stopping; waiting for the load in flight");
                    service::stopping();
                    stop = true;
                    tokio::time::timeout(STOP_GRACE, &mut pass).await.ok()
                }
            }
        };
        match outcome {
            Some(Ok(report)) => {
                health::record_pass(config, None);
                for h in &report.held {
                    tracing::debug!(bundle = %h.file, reason = %h.reason, "held");
                }
                crate::export::after_pass(config, &report).await;
            }
            Some(Err(error)) => {
                let transient = matches!(error, run::PassError::Transient { .. });
                if health::record_pass(config, Some((&error.to_string(), transient)))
                    == tracing::Level::ERROR
                {
                    tracing::error!(%error, "load pass failed");
                } else {
                    tracing::warn!(%error, "load pass failed; retrying at the next rescan");
                }
                target = None; // reconnect next time
            }
            None => {
                // Dropping the pass rolled its transaction back: nothing committed.
                target = None;
                if let Some((url, pid)) = &pg_session {
                    crate::load::postgres::end_session(url, *pid).await;
                }
                tracing::warn!(
                    "abandoned the load in flight; nothing was committed, and the bundle loads at the next start"
                );
            }
        }
        if stop {
            break;
        }
        if prune_now
            && let Some(t) = target.as_mut()
            && let Err(error) = run::prune(config, t).await
        {
            tracing::error!(%error, "prune failed");
        }
    }
    tracing::info!("receiver stopped");
    Ok(())
}
