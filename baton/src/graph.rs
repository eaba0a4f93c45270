//! `baton serve` with NATS and etcd: the graph as separate processes — `ServiceArgs.workers`
//! decode workers, `PrefillWorker.ServiceArgs.workers` prefill workers when disaggregating, and
//! one frontend, each `baton run <component>` with the same flags — stopped
//! together on Ctrl-C (frontend first, so in-flight streams drain while workers still run).

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

use crate::serve::{self, Resolved};

/// How long a component may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(settings: &Resolved) -> Result<()> {
    let exe = std::env::current_exe().context("locating the baton binary")?;
    // The flags after `serve`, passed on unchanged: every component reads the same graph.
    let tail: Vec<OsString> = std::env::args_os().skip(2).collect();
    let nats = settings.nats.clone().unwrap_or_default();
    let etcd = settings.etcd.clone().unwrap_or_default().join(",");
    let spawn = |component: &str| -> Result<Child> {
        Command::new(&exe)
            .arg("run")
            .arg(component)
            .args(&tail)
            .env("NATS_SERVER", &nats)
            .env("ETCD_ENDPOINTS", &etcd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {component}"))
    };
    let mut workers = Vec::new();
    for _ in 0..settings.workers {
        workers.push(spawn("decode-worker")?);
    }
    for _ in 0..settings.prefill_workers {
        workers.push(spawn("prefill-worker")?);
    }
    let mut frontend = spawn("frontend")?;
    tracing::info!(
        workers = settings.workers,
        prefill_workers = settings.prefill_workers,
        "graph started as separate processes"
    );

    let failed = tokio::select! {
        _ = serve::shutdown_signal() => None,
        status = frontend.wait() => Some(format!("the frontend exited ({:?})", status.ok())),
        (status, i, _) = futures::future::select_all(workers.iter_mut().map(|w| Box::pin(w.wait()))) => {
            Some(format!("worker process {i} exited ({:?})", status.ok()))
        }
    };
    if let Some(reason) = &failed {
        tracing::error!("{reason}; stopping the graph");
    }
    stop(&mut frontend).await;
    for w in &mut workers {
        terminate(w);
    }
    for w in &mut workers {
        stop(w).await;
    }
    match failed {
        None => Ok(()),
        Some(reason) => anyhow::bail!(reason),
    }
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SIGTERM lets the component drain; the id is our own child's.
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
