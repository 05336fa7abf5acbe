//! Running as a service: logging set-up, systemd notification (readiness,
//! status, watchdog, stopping) and the stop signals. Outside systemd the
//! notifications are no-ops (`NOTIFY_SOCKET` is unset).

use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Log events to stderr: plain lines by default (no timestamp under journald,
/// which adds its own), or one JSON object per line with the event's fields at
/// the top level. `RUST_LOG` filters (default `info`).
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // sqlx logs every statement slower than 1 s at WARN with its whole text
    // (kilobytes of DDL), and PostgreSQL's notices (`schema "ferry" already
    // exists, skipping`) as events of their own: neither belongs in an
    // operator's log. `RUST_LOG=sqlx=…` brings them back.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("sqlx")) {
        for quiet in ["sqlx::query=error", "sqlx::postgres::notice=error"] {
            if let Ok(d) = quiet.parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal && !json)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else if std::env::var_os("JOURNAL_STREAM").is_some() && !terminal {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Tells systemd the service is up (`Type=notify`), with a status line.
pub fn ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    notify(&[sd_notify::NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// When systemd's watchdog is on (`WatchdogSec=`), pings it at half the period
/// from a runtime task: a wedged runtime stops the pings and systemd restarts
/// the service. Returns the period, if any.
pub fn spawn_watchdog() -> Option<Duration> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    });
    Some(period)
}

/// SIGTERM and SIGINT, registered at once so that a signal that arrives during
/// start-up is not lost.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    pub fn register() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT, with the signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// A progress bar on stderr for manual runs, hidden unless stderr is a
/// terminal (services, pipes and tests see nothing of it).
pub fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// A spinner with a message and the elapsed time, for steps without a known
/// length; hidden unless stderr is a terminal.
pub fn progress_spinner(message: String) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        return bar;
    }
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
