//! `baton serve` with NATS and etcd: the graph as separate processes — `ServiceArgs.workers`
//! decode workers, `PrefillWorker.ServiceArgs.workers` prefill workers when disaggregating, and
//! one frontend, each `baton run <component>` with the same flags — supervised: a child that
//! dies is logged with its exit status and started again after a backoff, while the rest keeps
//! serving (requests it held are retried, migrated, redelivered or prefilled locally by the
//! survivors). Only a signal to `baton serve`, or a child that keeps dying past its restart
//! budget, stops the graph — frontend first, so in-flight streams drain while workers still run.
//! Children stay in `baton serve`'s process group with their `baton run <component>` command
//! lines, so operators (and `pgrep`) find them.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::serve::{self, Resolved};

/// How long a component may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The first restart waits this long; each further one within the window doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A child may be restarted this many times within [`RESTART_WINDOW`]; one more death in the
/// window means it cannot run here (bad flags, a port taken, a broken machine), and the graph
/// stops with an error instead of restarting it forever.
const RESTART_BUDGET: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// One supervised component process.
struct Slot {
    component: &'static str,
    /// Its place among its kind (for the logs).
    index: usize,
    child: Option<Child>,
    /// When it died, within the window (the budget's count).
    deaths: Vec<Instant>,
    /// When the next start is due, while it is down.
    restart_at: Option<Instant>,
}

impl Slot {
    fn name(&self) -> String {
        format!("{} {}", self.component, self.index)
    }
}

/// What a death means for the slot: restart after this backoff, or give up.
fn after_death(deaths: &mut Vec<Instant>, now: Instant) -> Option<Duration> {
    deaths.retain(|&t| now.duration_since(t) < RESTART_WINDOW);
    deaths.push(now);
    let n = deaths.len();
    if n > RESTART_BUDGET {
        return None;
    }
    let backoff = FIRST_BACKOFF.saturating_mul(1 << (n - 1).min(16));
    Some(backoff.min(MAX_BACKOFF))
}

/// An exit status in words: the code, or the signal that ended it.
fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => format!("{s}"),
        },
        Err(e) => format!("unknown status ({e})"),
    }
}

struct Spawner {
    exe: PathBuf,
    tail: Vec<OsString>,
    nats: String,
    etcd: String,
}

impl Spawner {
    fn spawn(&self, component: &str) -> Result<Child> {
        Command::new(&self.exe)
            .arg("run")
            .arg(component)
            .args(&self.tail)
            .env("NATS_SERVER", &self.nats)
            .env("ETCD_ENDPOINTS", &self.etcd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {component}"))
    }
}

/// Waits for the first live child to exit; pending forever when none is live.
async fn any_exit(slots: &mut [Slot]) -> (usize, std::io::Result<ExitStatus>) {
    let waits: Vec<_> = slots
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| s.child.as_mut().map(|c| (i, c)))
        .map(|(i, c)| Box::pin(async move { (i, c.wait().await) }))
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(waits).await.0
}

pub async fn run(settings: &Resolved) -> Result<()> {
    let spawner = Spawner {
        exe: std::env::current_exe().context("locating the baton binary")?,
        // The flags after `serve`, passed on unchanged: every component reads the same graph.
        tail: std::env::args_os().skip(2).collect(),
        nats: settings.nats.clone().unwrap_or_default(),
        etcd: settings.etcd.clone().unwrap_or_default().join(","),
    };
    // Workers first, the frontend last (it waits for workers anyway); stopped in reverse.
    let mut kinds: Vec<&'static str> = Vec::new();
    kinds.extend(std::iter::repeat_n("decode-worker", settings.workers));
    kinds.extend(std::iter::repeat_n(
        "prefill-worker",
        settings.prefill_workers,
    ));
    kinds.push("frontend");
    let mut slots = Vec::new();
    for (i, component) in kinds.iter().enumerate() {
        let index = kinds[..i].iter().filter(|k| *k == component).count();
        slots.push(Slot {
            component,
            index,
            child: Some(spawner.spawn(component)?),
            deaths: Vec::new(),
            restart_at: None,
        });
    }
    tracing::info!(
        workers = settings.workers,
        prefill_workers = settings.prefill_workers,
        "graph started as separate processes, supervised"
    );

    let failed = 'supervise: loop {
        let next_restart = slots.iter().filter_map(|s| s.restart_at).min();
        tokio::select! {
            _ = serve::shutdown_signal() => break None,
            (i, status) = any_exit(&mut slots) => {
                let slot = &mut slots[i];
                slot.child = None;
                let now = Instant::now();
                match after_death(&mut slot.deaths, now) {
                    Some(backoff) => {
                        tracing::error!(
                            component = slot.name(),
                            status = describe(&status),
                            restart_in = ?backoff,
                            restarts_in_window = slot.deaths.len(),
                            budget = RESTART_BUDGET,
                            "a graph process exited; the rest keeps serving and it is restarted"
                        );
                        slot.restart_at = Some(now + backoff);
                    }
                    None => {
                        break Some(format!(
                            "{} exited ({}) for the {}th time within {:?}: past its restart \
                             budget",
                            slot.name(),
                            describe(&status),
                            slot.deaths.len(),
                            RESTART_WINDOW
                        ));
                    }
                }
            }
            _ = tokio::time::sleep_until(next_restart.unwrap_or_else(Instant::now)), if next_restart.is_some() => {
                let now = Instant::now();
                for slot in slots.iter_mut().filter(|s| s.restart_at.is_some_and(|t| t <= now)) {
                    slot.restart_at = None;
                    match spawner.spawn(slot.component) {
                        Ok(child) => {
                            tracing::info!(component = slot.name(), pid = child.id(), "restarted");
                            slot.child = Some(child);
                        }
                        Err(e) => {
                            // Counted like a death: a start that keeps failing uses the budget.
                            tracing::error!(component = slot.name(), "cannot restart: {e:#}");
                            match after_death(&mut slot.deaths, now) {
                                Some(backoff) => slot.restart_at = Some(now + backoff),
                                None => {
                                    break 'supervise Some(format!(
                                        "{} cannot be restarted: {e:#}",
                                        slot.name()
                                    ))
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    if let Some(reason) = &failed {
        tracing::error!("{reason}; stopping the graph");
    }
    // The frontend (last) first, so streams drain while the workers still run.
    if let Some(front) = slots.last_mut().and_then(|s| s.child.as_mut()) {
        stop(front).await;
    }
    for slot in &slots {
        if let Some(child) = &slot.child {
            terminate(child);
        }
    }
    for slot in &mut slots {
        if let Some(child) = slot.child.as_mut() {
            stop(child).await;
        }
    }
    match failed {
        None => Ok(()),
        Some(reason) => anyhow::bail!(reason),
    }
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: SIGTERM lets the component drain; the id is our own live child's.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

async fn stop(child: &mut Child) {
    terminate(child);
    if tokio::time::timeout(STOP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_stop_past_the_budget_within_the_window() {
        let start = Instant::now();
        let mut deaths = Vec::new();
        let backoffs: Vec<_> = (0..RESTART_BUDGET)
            .map(|i| after_death(&mut deaths, start + Duration::from_secs(i as u64)))
            .collect();
        assert_eq!(backoffs[0], Some(FIRST_BACKOFF));
        assert_eq!(backoffs[1], Some(FIRST_BACKOFF * 2));
        assert!(backoffs.iter().all(|b| b.is_some_and(|b| b <= MAX_BACKOFF)));
        assert_eq!(
            after_death(&mut deaths, start + Duration::from_secs(10)),
            None,
            "one death past the budget within the window"
        );
        // Deaths spread out over more than the window never exhaust it.
        let mut spread = Vec::new();
        for i in 0..3 * RESTART_BUDGET {
            let at = start + RESTART_WINDOW * i as u32;
            assert_eq!(after_death(&mut spread, at), Some(FIRST_BACKOFF), "{i}");
        }
    }
}
