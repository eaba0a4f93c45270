//! CPU accounting of a process from /proc, split by thread: what the serving-overhead
//! benches charge to a server per request and per token. Time on CPU per thread comes from
//! `/proc/PID/task/TID/schedstat` (nanoseconds); threads that exit during a run are caught by
//! the process's utime + stime in `/proc/PID/stat`.

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
#[error("cannot read {what}: {reason}")]
pub struct ProcError {
    what: String,
    reason: String,
}

type Result<T> = std::result::Result<T, ProcError>;

fn unparsable(what: String) -> ProcError {
    ProcError {
        what,
        reason: "unparsable".into(),
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ProcError {
    move |e| ProcError {
        what,
        reason: e.to_string(),
    }
}

#[derive(Clone)]
pub struct TaskCpu {
    pub comm: String,
    pub run_ns: u64,
    pub ticks: u64,
}

pub struct CpuSnap {
    pub at: Instant,
    pub tasks: HashMap<u32, TaskCpu>,
    /// utime + stime of the whole process, exited threads included.
    pub proc_ticks: u64,
}

/// utime + stime (clock ticks) from a `stat` line; the comm field may hold spaces.
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "(comm) ": state is field 3 of the man page, utime 14 and stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

pub fn snapshot(pid: u32) -> Result<CpuSnap> {
    let at = Instant::now();
    let stat_path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&stat_path).map_err(io(stat_path.clone()))?;
    let proc_ticks = stat_ticks(&stat).ok_or_else(|| unparsable(stat_path))?;
    let mut tasks = HashMap::new();
    let task_dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&task_dir).map_err(io(task_dir.clone()))? {
        let entry = entry.map_err(io(task_dir.clone()))?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = entry.path();
        // A thread may exit between the listing and the reads.
        let (Ok(comm), Ok(sched), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("schedstat")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        let run_ns = sched
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unparsable(format!("schedstat of thread {tid}")))?;
        let ticks = stat_ticks(&stat).ok_or_else(|| unparsable(format!("stat of thread {tid}")))?;
        tasks.insert(
            tid,
            TaskCpu {
                comm: comm.trim().to_string(),
                run_ns,
                ticks,
            },
        );
    }
    Ok(CpuSnap {
        at,
        tasks,
        proc_ticks,
    })
}

/// CPU seconds of one run, split by thread.
#[derive(Clone, Copy, Default)]
pub struct CpuDelta {
    pub wall: f64,
    /// Every engine thread ([`is_engine`]).
    pub engine: f64,
    /// The engine loop's own thread (the first engine thread): its time on CPU is the
    /// time the engine was busy, as it blocks when idle.
    pub engine_main: f64,
    /// Every other thread, plus threads that exited during the run.
    pub frontend: f64,
    /// Part of `frontend`: CPU of threads that exited during the run.
    pub exited: f64,
}

impl CpuDelta {
    pub fn total(&self) -> f64 {
        self.engine + self.frontend
    }
}

pub fn cpu_delta(a: &CpuSnap, b: &CpuSnap, tick: f64) -> CpuDelta {
    let mut d = CpuDelta {
        wall: (b.at - a.at).as_secs_f64(),
        ..Default::default()
    };
    let engine_main_tid = b
        .tasks
        .iter()
        .filter(|(_, t)| is_engine(&t.comm))
        .map(|(tid, _)| *tid)
        .min();
    let mut live_ticks = 0u64;
    for (tid, t) in &b.tasks {
        let before = a.tasks.get(tid);
        let run = (t.run_ns - before.map_or(0, |x| x.run_ns)) as f64 / 1e9;
        live_ticks += t.ticks - before.map_or(0, |x| x.ticks);
        if is_engine(&t.comm) {
            d.engine += run;
            if Some(*tid) == engine_main_tid {
                d.engine_main += run;
            }
        } else {
            d.frontend += run;
        }
    }
    // When a thread exited during the run, the process's ticks that no live thread accounts
    // for are its CPU (per-thread and per-process ticks round apart by a tick or so, so this
    // is not done otherwise).
    if a.tasks.keys().any(|tid| !b.tasks.contains_key(tid)) {
        let exited_ticks = (b.proc_ticks - a.proc_ticks).saturating_sub(live_ticks);
        d.exited = exited_ticks as f64 * tick;
    }
    d.frontend += d.exited;
    d
}

pub fn clock_tick() -> f64 {
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    1.0 / hz
}

/// CPU seconds of this process (the load generator), over its live threads.
pub fn self_cpu() -> f64 {
    snapshot(std::process::id()).map_or(0.0, |s| {
        s.tasks.values().map(|t| t.run_ns).sum::<u64>() as f64 / 1e9
    })
}

/// Engine threads: a real engine's `engine-*` (and the libtorch threads it starts) and the
/// mock engine's `mock-*`.
pub fn is_engine(comm: &str) -> bool {
    comm.starts_with("engine-") || comm.starts_with("mock-")
}
