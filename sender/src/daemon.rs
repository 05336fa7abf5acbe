//! `ferry-sender run`: completes on a cron schedule (local time), partials on an
//! interval, pushes after each bundle and retries queued bundles. One job at a
//! time: a partial tick that finds a job still running is skipped (and logged);
//! a complete that comes due then runs right after it. SIGTERM or SIGINT lets the
//! job in flight finish for a few seconds, then abandons it (jobs are crash-safe:
//! temporaries are removed at the next start, the state moves only on commit).

use crate::config::Config;
use crate::{job, outbox, push};
use anyhow::Context;
use chrono::{DateTime, Local};
use ferry_common::lock::StateLock;
use ferry_common::manifest::Kind;
use ferry_common::service::{self, StopSignals};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Stops a background task (the metrics server) when the daemon returns.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a job in flight may finish after a stop signal before it is abandoned.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Bundle(Kind),
    Push,
}

impl std::fmt::Display for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Work::Bundle(k) => write!(f, "{k}"),
            Work::Push => f.write_str("push"),
        }
    }
}

/// The next time `cron` fires strictly after `now`, in local time.
pub fn next_fire(cron: &croner::Cron, now: DateTime<Local>) -> anyhow::Result<DateTime<Local>> {
    cron.find_next_occurrence(&now, false)
        .map_err(|e| anyhow::anyhow!("the complete schedule has no next time: {e}"))
}

pub async fn run(config: Arc<Config>, mut signals: StopSignals) -> anyhow::Result<()> {
    let _instance = StateLock::acquire_named(&config.state_dir, "daemon.lock")
        .context("is another `ferry-sender run` using this state directory?")?;
    let cron = config.complete.cron().map_err(anyhow::Error::msg)?;
    let mut next_complete = match &cron {
        Some(c) => Some(next_fire(c, Local::now())?),
        None => None,
    };
    let mut partials = config.partial.interval.map(ticker);
    let mut retries = config.push.as_ref().map(|p| ticker(p.retry_interval));
    let mut running: Option<(Work, JoinHandle<()>)> = None;
    let mut complete_due = false;

    // Without a complete, partials have nothing to build on: take one first.
    if !job::has_complete(&config).await? {
        tracing::info!("no complete bundle yet: taking one now");
        running = Some(start(&config, Work::Bundle(Kind::Complete)));
    } else if config.push.is_some() {
        running = Some(start(&config, Work::Push));
    }
    tracing::info!(
        complete_schedule = %config.complete.schedule,
        next_complete = %next_complete.map_or("off".to_owned(), |t| t.to_rfc3339()),
        partial_interval = %config.partial.interval.map_or("off".to_owned(), |d| humantime::format_duration(d).to_string()),
        "sender running"
    );
    let _metrics = crate::metrics::serve(&config).await?.map(AbortOnDrop);
    service::ready("running");
    service::spawn_watchdog();

    loop {
        tokio::select! {
            sig = signals.recv() => {
                tracing::info!(signal = sig, "stopping");
                service::stopping();
                break;
            }
            finished = join(&mut running) => {
                if let Some(work) = finished {
                    tracing::debug!(%work, "job finished");
                }
                running = None;
                if complete_due {
                    complete_due = false;
                    running = Some(start(&config, Work::Bundle(Kind::Complete)));
                }
            }
            () = wall_clock(next_complete) => {
                let (Some(due), Some(c)) = (next_complete, &cron) else { continue };
                if Local::now() < due {
                    continue; // woke early to follow wall-clock changes
                }
                next_complete = Some(next_fire(c, Local::now())?);
                match &running {
                    Some((work, _)) => {
                        tracing::warn!(busy = %work, "the complete came due while a job is running; it runs right after");
                        complete_due = true;
                    }
                    None => running = Some(start(&config, Work::Bundle(Kind::Complete))),
                }
            }
            () = tick(&mut partials) => {
                match &running {
                    Some((work, _)) => tracing::warn!(busy = %work, "partial tick skipped: the previous job is still running"),
                    None => running = Some(start(&config, Work::Bundle(Kind::Partial))),
                }
            }
            () = tick(&mut retries) => {
                if running.is_none() && has_pending(&config) {
                    running = Some(start(&config, Work::Push));
                }
            }
        }
    }
    if let Some((work, mut handle)) = running.take() {
        tracing::info!(%work, grace_s = STOP_GRACE.as_secs(), "waiting for the job in flight");
        if tokio::time::timeout(STOP_GRACE, &mut handle).await.is_err() {
            handle.abort();
            let _ = handle.await;
            tracing::warn!(%work, "abandoned the job in flight; nothing was committed, and its temporary files are removed at the next start");
        }
    }
    tracing::info!("sender stopped");
    Ok(())
}

fn ticker(every: Duration) -> Interval {
    let mut t = tokio::time::interval_at(Instant::now() + every, every);
    t.set_missed_tick_behavior(MissedTickBehavior::Skip);
    t
}

async fn tick(t: &mut Option<Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `due`, but at most 30 s, so that a changed wall clock (NTP, a
/// daylight-saving switch) is noticed.
async fn wall_clock(due: Option<DateTime<Local>>) {
    let Some(due) = due else {
        return std::future::pending().await;
    };
    let left = (due - Local::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::sleep(left.min(Duration::from_secs(30))).await;
}

async fn join(running: &mut Option<(Work, JoinHandle<()>)>) -> Option<Work> {
    match running {
        Some((work, handle)) => {
            if let Err(e) = handle.await
                && e.is_panic()
            {
                tracing::error!(%work, "the job panicked");
            }
            Some(*work)
        }
        None => std::future::pending().await,
    }
}

/// Whether `job` has failed `health.failures_critical` times in a row: a
/// transient failure that keeps coming is logged at ERROR.
fn persistent(config: &Config, job: &str) -> bool {
    ferry_common::health::JobRecord::read(&config.state_dir, job).failures_in_a_row
        >= config.health.failures_critical
}

fn has_pending(config: &Config) -> bool {
    outbox::list(&config.outbox(), &config.sender_id).is_ok_and(|v| !v.is_empty())
}

fn start(config: &Arc<Config>, work: Work) -> (Work, JoinHandle<()>) {
    let config = Arc::clone(config);
    let handle = tokio::spawn(async move {
        if let Work::Bundle(kind) = work {
            service::status(&format!("taking a {kind}"));
            match push::job_following(&config, kind, &[], config.push.as_ref()).await {
                Ok(_) => {}
                // Another job (a manual one) holds the lock: nothing failed.
                Err(e @ job::JobError::Lock(_)) if e.is_transient() => {
                    tracing::info!(%kind, reason = %e, "job skipped; the next tick tries again")
                }
                Err(e) if e.is_transient() && !persistent(&config, &kind.to_string()) => {
                    tracing::warn!(%kind, error = %e, "job failed; the next tick retries")
                }
                Err(e) => tracing::error!(%kind, error = %e, "job failed"),
            }
        }
        if let Some(p) = &config.push
            && has_pending(&config)
        {
            service::status("pushing");
            match push::push_pending(&config, p).await {
                Ok(_) => {}
                // A manual push is delivering the same bundles.
                Err(e @ push::PushError::Busy(_)) => tracing::info!(reason = %e, "push skipped"),
                Err(e) if e.is_transient() && !persistent(&config, "push") => {
                    tracing::warn!(error = %e, retry_in = %humantime::format_duration(p.retry_interval), "push failed; the bundles stay queued")
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = %humantime::format_duration(p.retry_interval), "push failed; the bundles stay queued")
                }
            }
        }
        service::status("idle");
    });
    (work, handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn next_fire_follows_the_cron_schedule_in_local_time() {
        let cron: croner::Cron = "30 3 * * *".parse().unwrap_or_else(|e| panic!("{e}"));
        let at = |d, h, m| {
            Local
                .with_ymd_and_hms(2026, 11, d, h, m, 0)
                .single()
                .unwrap_or_else(|| panic!("ambiguous local time"))
        };
        let next = |t| next_fire(&cron, t).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(next(at(25, 10, 0)), at(26, 3, 30));
        assert_eq!(next(at(25, 3, 0)), at(25, 3, 30));
        // Strictly after: a job that fires at 03:30 is next due the day after.
        assert_eq!(next(at(25, 3, 30)), at(26, 3, 30));
        let every: croner::Cron = "*/15 * * * *".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            next_fire(&every, at(25, 10, 1)).unwrap_or_else(|e| panic!("{e}")),
            at(25, 10, 15)
        );
    }
}
