//! `ferry-sender run`: completes on a cron schedule (local time), partials on an
//! interval, pushes after each bundle and retries queued bundles. One job at a
//! time: a partial tick that finds a job still running is skipped (and logged);
//! a complete that comes due then runs right after it. SIGTERM or SIGINT lets the
//! job in flight finish for a few seconds, then abandons it (jobs are crash-safe:
//! temporaries are removed at the next start, the state moves only on commit).

use crate::config::Config;
use crate::control::{self, Snapshots, Stage};
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

#[derive(Debug, Clone)]
enum Work {
    Bundle(Kind),
    Push,
    /// A snapshot asked for over HTTP (see [`crate::control`]).
    Snapshot(control::Order),
}

impl std::fmt::Display for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Work::Bundle(k) => write!(f, "{k}"),
            Work::Push => f.write_str("push"),
            Work::Snapshot(o) => write!(f, "snapshot {}", o.id),
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
    let mut retries =
        (config.push.is_some() || config.bucket.is_some()).then(|| ticker(retry_interval(&config)));
    let mut bucket_prune = config
        .bucket
        .as_ref()
        .filter(|b| b.keep_completes.is_some())
        .map(|_| ticker(Duration::from_secs(3600)));
    let mut running: Option<(Work, JoinHandle<()>)> = None;
    let mut complete_due = false;

    // Without a complete, partials have nothing to build on: take one first.
    if !job::has_complete(&config).await? {
        tracing::info!("no complete bundle yet: taking one now");
        running = Some(start(&config, Work::Bundle(Kind::Complete)));
    } else if config.push.is_some() || config.bucket.is_some() {
        running = Some(start(&config, Work::Push));
    }
    tracing::info!(
        complete_schedule = %config.complete.schedule,
        next_complete = %next_complete.map_or("off".to_owned(), |t| t.to_rfc3339()),
        partial_interval = %config.partial.interval.map_or("off".to_owned(), |d| humantime::format_duration(d).to_string()),
        "sender running"
    );
    let _metrics = crate::metrics::serve(&config).await?.map(AbortOnDrop);
    let snapshots = Arc::new(Snapshots::default());
    let (_control, mut orders) = match control::serve(&config, Arc::clone(&snapshots)).await? {
        Some((task, rx)) => (Some(AbortOnDrop(task)), Some(rx)),
        None => (None, None),
    };
    let mut ordered: Option<control::Order> = None;
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
                if let Some(order) = ordered.take() {
                    running = Some(start_snapshot(&config, &snapshots, order));
                } else if complete_due {
                    complete_due = false;
                    running = Some(start(&config, Work::Bundle(Kind::Complete)));
                }
            }
            Some(order) = next_order(&mut orders) => {
                match &running {
                    Some((work, _)) => {
                        tracing::info!(busy = %work, snapshot = %order.id, "snapshot queued behind the running job");
                        ordered = Some(order);
                    }
                    None => running = Some(start_snapshot(&config, &snapshots, order)),
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
            () = tick(&mut bucket_prune) => {
                if let Some(b) = &config.bucket {
                    match crate::bucket_push::prune(&config, b, false).await {
                        Ok(p) if !p.removed.is_empty() => tracing::info!(removed = p.removed.len(), kept = p.kept, "bucket retention"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "bucket retention failed; the next hour tries again"),
                    }
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

async fn next_order(
    rx: &mut Option<tokio::sync::mpsc::Receiver<control::Order>>,
) -> Option<control::Order> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Takes a snapshot asked for over HTTP, moving its status along: a complete
/// (of its tables only, if it names some), then the push.
fn start_snapshot(
    config: &Arc<Config>,
    snapshots: &Arc<Snapshots>,
    order: control::Order,
) -> (Work, JoinHandle<()>) {
    let config = Arc::clone(config);
    let snapshots = Arc::clone(snapshots);
    let work = Work::Snapshot(order.clone());
    let handle = tokio::spawn(async move {
        let id = order.id.as_str();
        snapshots.set(id, Stage::Extracting, |_| {});
        service::status(&format!("taking snapshot {id}"));
        let outcome =
            push::job_following(&config, Kind::Complete, &order.tables, config.push.as_ref()).await;
        match outcome {
            Err(e) => {
                tracing::error!(snapshot = id, error = %e, "snapshot failed");
                snapshots.set(id, Stage::Failed, |s| s.error = Some(e.to_string()));
            }
            Ok(o) => {
                let file = o
                    .file
                    .as_ref()
                    .and_then(|f| f.file_name())
                    .map(|f| f.to_string_lossy().into_owned());
                if config.push.is_none() && config.bucket.is_none() {
                    snapshots.set(id, Stage::Written, |s| {
                        s.seq = o.seq;
                        s.file = file;
                    });
                    return;
                }
                snapshots.set(id, Stage::Pushing, |s| {
                    s.seq = o.seq;
                    s.file = file;
                });
                service::status("pushing");
                match push::deliver_pending(&config)
                    .await
                    .unwrap_or(Ok(Default::default()))
                {
                    // A manual push holds the lock: it delivers the bundle.
                    Ok(_) | Err(push::PushError::Busy(_)) => {
                        snapshots.set(id, Stage::Delivered, |_| {})
                    }
                    Err(e) => {
                        tracing::error!(snapshot = id, error = %e, "snapshot written, push failed; it stays queued");
                        snapshots.set(id, Stage::Failed, |s| {
                            s.error = Some(format!(
                                "written, but the push failed (it stays queued and is retried): {e}"
                            ))
                        });
                    }
                }
            }
        }
        service::status("idle");
    });
    (work, handle)
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
            Some(work.clone())
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

/// How often queued bundles are retried after a failed delivery.
fn retry_interval(config: &Config) -> Duration {
    config
        .push
        .as_ref()
        .map_or(Duration::from_secs(60), |p| p.retry_interval)
}

fn has_pending(config: &Config) -> bool {
    outbox::list(&config.outbox(), &config.sender_id).is_ok_and(|v| !v.is_empty())
}

fn start(config: &Arc<Config>, work: Work) -> (Work, JoinHandle<()>) {
    let config = Arc::clone(config);
    let doing = work.clone();
    let handle = tokio::spawn(async move {
        if let Work::Bundle(kind) = doing {
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
        if has_pending(&config)
            && let Some(result) = push::deliver_pending(&config).await
        {
            service::status("pushing");
            let retry = retry_interval(&config);
            match result {
                Ok(_) => {}
                // A manual push is delivering the same bundles.
                Err(e @ push::PushError::Busy(_)) => tracing::info!(reason = %e, "push skipped"),
                Err(e) if e.is_transient() && !persistent(&config, "push") => {
                    tracing::warn!(error = %e, retry_in = %humantime::format_duration(retry), "push failed; the bundles stay queued")
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = %humantime::format_duration(retry), "push failed; the bundles stay queued")
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
