//! The soak's processes: NATS and etcd (test_support), a frontend, decode and prefill workers
//! (`baton run …` on the mock engine), and the faults done to them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{EtcdServer, LocalProcess, NatsServer};
use tokio::runtime::Runtime;

use super::{Fault, FaultRecord, SoakConfig};
use crate::baseline::procs::{listening_url, Proc, ServeError};

/// The served model name: the mock runs behind SmolLM2's tokenizer.
pub const MODEL: &str = "smollm2";

/// How long a component gets to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{what} was not ready within {secs} s\n{tail}")]
    NotReady {
        what: String,
        secs: u64,
        tail: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Alive,
    Killed,
    Stopped,
}

struct Worker {
    name: String,
    proc: Proc,
    state: State,
}

pub struct Graph {
    /// The frontend's `http://127.0.0.1:PORT`.
    pub url: String,
    config: SoakConfig,
    nats: NatsServer,
    etcd: EtcdServer,
    namespace: String,
    frontend: Proc,
    decode: Vec<Worker>,
    prefill: Vec<Worker>,
    spawned: usize,
    client: reqwest::Client,
}

impl Graph {
    pub fn start(config: &SoakConfig, rt: &Runtime) -> Result<Graph, GraphError> {
        let nats =
            NatsServer::start().map_err(|e| GraphError::Io("starting nats-server".into(), e))?;
        let etcd = EtcdServer::start().map_err(|e| GraphError::Io("starting etcd".into(), e))?;
        std::fs::create_dir_all(&config.work)
            .map_err(|e| GraphError::Io(config.work.display().to_string(), e))?;
        let namespace = format!("soak{}", std::process::id());
        let mut cmd = Self::command_for(config, &nats.url, &etcd.url, &namespace, "frontend");
        cmd.args(["--port", "0"]);
        let log = config.work.join("frontend.log");
        let mut frontend = Proc::spawn("frontend", cmd, &log, Duration::from_secs(10), true)?;
        let url = listening_url(&mut frontend, START_TIMEOUT)?;
        let mut graph = Graph {
            url,
            config: config.clone(),
            namespace,
            frontend,
            nats,
            etcd,
            decode: Vec::new(),
            prefill: Vec::new(),
            spawned: 0,
            client: reqwest::Client::new(),
        };
        for _ in 0..config.decode_workers {
            graph.spawn_worker("decode-worker")?;
        }
        for _ in 0..config.prefill_workers {
            graph.spawn_worker("prefill-worker")?;
        }
        for w in graph.prefill.iter_mut() {
            wait_for_log(&mut w.proc, "prefill worker ready")?;
        }
        let want = config.decode_workers;
        graph.wait_workers(rt, want, START_TIMEOUT)?;
        Ok(graph)
    }

    fn command_for(
        config: &SoakConfig,
        nats: &str,
        etcd: &str,
        namespace: &str,
        component: &str,
    ) -> Command {
        let mut cmd = Command::new(&config.baton);
        // Settings from the caller's environment would change what is measured.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("BATON_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("NATS_SERVER", nats)
            .env("ETCD_ENDPOINTS", etcd)
            .args([
                "run",
                component,
                "--executor",
                "mock",
                "--namespace",
                namespace,
            ])
            .arg("--mock-speedup")
            .arg(config.mock_speedup.to_string())
            .arg("--lease-ttl")
            .arg(config.lease_ttl.to_string())
            .arg("--stream-timeout")
            .arg(config.stream_timeout.to_string())
            .arg("--router")
            .arg(&config.router)
            .arg("--migration-limit")
            .arg(config.migration_limit.to_string())
            .arg("--max-inflight")
            .arg(config.max_inflight.to_string())
            .args(["--remote-prefill", "true"])
            .arg("--remote-prefill-timeout")
            .arg(config.remote_prefill_timeout.to_string());
        cmd
    }

    fn spawn_worker(&mut self, component: &str) -> Result<String, GraphError> {
        let name = format!("{component}-{}", self.spawned);
        self.spawned += 1;
        let cmd = Self::command_for(
            &self.config,
            &self.nats.url,
            &self.etcd.url,
            &self.namespace,
            component,
        );
        let log = self.config.work.join(format!("{name}.log"));
        let proc = Proc::spawn(&name, cmd, &log, Duration::from_secs(10), false)?;
        let worker = Worker {
            name: name.clone(),
            proc,
            state: State::Alive,
        };
        if component == "decode-worker" {
            self.decode.push(worker);
        } else {
            self.prefill.push(worker);
        }
        Ok(name)
    }

    fn alive_decode(&self) -> usize {
        self.decode
            .iter()
            .filter(|w| w.state == State::Alive)
            .count()
    }

    /// The worker count the frontend's `/health` reports.
    async fn health_workers(&self) -> Option<u64> {
        let resp = self
            .client
            .get(format!("{}/health", self.url))
            .send()
            .await
            .ok()?;
        let v: Value = resp.json().await.ok()?;
        v["workers"].as_u64()
    }

    /// Waits until `/health` counts `want` workers; the seconds it took.
    fn wait_workers(
        &self,
        rt: &Runtime,
        want: usize,
        timeout: Duration,
    ) -> Result<f64, GraphError> {
        let start = Instant::now();
        rt.block_on(async {
            while start.elapsed() < timeout {
                if self.health_workers().await == Some(want as u64) {
                    return Ok(start.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(GraphError::NotReady {
                what: format!("{want} decode workers in the frontend's /health"),
                secs: timeout.as_secs(),
                tail: self.frontend.tail(),
            })
        })
    }

    /// Any component that exited on its own ends the soak with its log.
    pub fn check_alive(&mut self) -> Result<(), GraphError> {
        self.frontend.check_alive()?;
        for w in self.decode.iter_mut().chain(self.prefill.iter_mut()) {
            if w.state == State::Alive {
                w.proc.check_alive()?;
            }
        }
        Ok(())
    }

    /// `probe(pid)` of the frontend and of every live worker, by name (`None`: left out).
    fn per_live_process<T>(&self, probe: impl Fn(u32) -> Option<T>) -> BTreeMap<String, T> {
        let workers = self.decode.iter().chain(self.prefill.iter());
        let live = workers.filter(|w| w.state == State::Alive);
        std::iter::once(("frontend", self.frontend.pid()))
            .chain(live.map(|w| (w.name.as_str(), w.proc.pid())))
            .filter_map(|(name, pid)| Some((name.to_string(), probe(pid)?)))
            .collect()
    }

    /// VmRSS in KiB of the frontend and of every live worker, by name.
    pub fn rss(&self) -> BTreeMap<String, u64> {
        self.per_live_process(rss_kib)
    }

    /// The TCP addresses each live Baton process listens on.
    pub fn listening(&self) -> BTreeMap<String, Vec<String>> {
        self.per_live_process(|pid| Some(listening(pid)))
    }

    pub fn inject(
        &mut self,
        rt: &Runtime,
        fault: Fault,
        t0: Instant,
    ) -> Result<FaultRecord, GraphError> {
        let at_s = t0.elapsed().as_secs_f64();
        let mut record = FaultRecord {
            fault,
            target: String::new(),
            at_s,
            left_routing_after_s: None,
            replaced_by: None,
        };
        // Leaving routing takes up to a lease TTL; the bound only stops a soak that never ends.
        let leave_bound = Duration::from_secs(self.config.lease_ttl * 4 + 20);
        match fault {
            Fault::KillDecode | Fault::StopDecode => {
                let Some(w) = self.decode.iter_mut().find(|w| w.state == State::Alive) else {
                    record.target = "no live decode worker".into();
                    return Ok(record);
                };
                record.target = w.name.clone();
                if fault == Fault::KillDecode {
                    w.proc.signal(libc::SIGKILL);
                    w.state = State::Killed;
                } else {
                    w.proc.signal(libc::SIGSTOP);
                    w.state = State::Stopped;
                }
                let want = self.alive_decode();
                let took = self.wait_workers(rt, want, leave_bound)?;
                record.left_routing_after_s = Some(took);
                if self.config.replace {
                    record.replaced_by = Some(self.spawn_worker("decode-worker")?);
                    self.wait_workers(rt, want + 1, START_TIMEOUT)?;
                }
            }
            Fault::KillPrefill => {
                let Some(w) = self.prefill.iter_mut().find(|w| w.state == State::Alive) else {
                    record.target = "no live prefill worker".into();
                    return Ok(record);
                };
                record.target = w.name.clone();
                w.proc.signal(libc::SIGKILL);
                w.state = State::Killed;
                if self.config.replace {
                    let name = self.spawn_worker("prefill-worker")?;
                    let w = self.prefill.last_mut().expect("just spawned");
                    wait_for_log(&mut w.proc, "prefill worker ready")?;
                    record.replaced_by = Some(name);
                }
            }
            Fault::RestartNats => {
                record.target = "nats-server".into();
                outage(&mut self.nats, self.config.outage, &record.target)?;
            }
            Fault::RestartEtcd => {
                record.target = "etcd".into();
                outage(&mut self.etcd, self.config.outage, &record.target)?;
            }
        }
        Ok(record)
    }

    /// The frontend's `/metrics` page once every decode worker it routes to reads 0 KV blocks
    /// in use, or the last one read when `timeout` has passed (load reports are periodic).
    pub fn settled_metrics(&self, rt: &Runtime, timeout: Duration) -> String {
        let start = Instant::now();
        rt.block_on(async {
            let mut last = String::new();
            while start.elapsed() < timeout {
                let page = self
                    .client
                    .get(format!("{}/metrics", self.url))
                    .send()
                    .await;
                if let Ok(text) = async { page?.text().await }.await {
                    last = text;
                    if decode_blocks(&last).values().all(|&v| v == 0) {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            last
        })
    }

    /// SIGTERM to every live worker, then the frontend; each worker's KV blocks in use when
    /// it stopped, from its last log line (None: it was killed or stalled, or did not say).
    pub fn stop_workers(&mut self) -> BTreeMap<String, Option<usize>> {
        let mut out = BTreeMap::new();
        for w in self.decode.iter_mut().chain(self.prefill.iter_mut()) {
            let said = if w.state == State::Alive {
                w.proc.stop();
                blocks_at_stop(&w.proc.log().to_path_buf())
            } else {
                w.proc.stop();
                None
            };
            out.insert(w.name.clone(), said);
        }
        self.frontend.stop();
        out
    }
}

/// Stops `server` for `down`, then starts it again on the same port with the same data.
fn outage(server: &mut LocalProcess, down: Duration, what: &str) -> Result<(), GraphError> {
    server.stop();
    std::thread::sleep(down);
    server
        .start()
        .map_err(|e| GraphError::Io(format!("restarting {what}"), e))
}

fn wait_for_log(proc: &mut Proc, needle: &str) -> Result<(), GraphError> {
    let start = Instant::now();
    while start.elapsed() < START_TIMEOUT {
        if std::fs::read_to_string(proc.log()).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        proc.check_alive()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(GraphError::NotReady {
        what: format!("`{needle}` in {}", proc.log().display()),
        secs: START_TIMEOUT.as_secs(),
        tail: proc.tail(),
    })
}

/// The TCP addresses `pid` listens on, from its socket inodes and /proc/net/tcp{,6}.
pub fn listening(pid: u32) -> Vec<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: Vec<String> = fds
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode is the tenth field.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                out.push(hex_socket(f[1]));
            }
        }
    }
    out
}

/// `0100007F:1F90` → `127.0.0.1:8080` (IPv4 in host order); IPv6 as its 32 hex digits.
fn hex_socket(s: &str) -> String {
    let Some((ip, port)) = s.split_once(':') else {
        return s.to_string();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    match u32::from_str_radix(ip, 16) {
        Ok(v) if ip.len() == 8 => format!("{}:{port}", std::net::Ipv4Addr::from(v.swap_bytes())),
        _ => format!("[{ip}]:{port}"),
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Per decode worker (by instance id), the KV blocks in use on a `/metrics` page.
pub fn decode_blocks(metrics: &str) -> BTreeMap<String, u64> {
    worker_gauges(metrics, "baton_worker_kv_blocks_used")
}

/// Prefills the live decode workers sent to prefill workers, on a `/metrics` page.
pub fn remote_prefills(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("baton_prefill_total{") && l.contains("remote"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `name{worker="…"} value` lines of a Prometheus text page, by worker.
fn worker_gauges(text: &str, name: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(labels) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, value)) = labels.split_once('}') else {
            continue;
        };
        let worker = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("worker="))
            .map(|w| w.trim_matches('"').to_string());
        if let (Some(worker), Ok(v)) = (worker, value.trim().parse::<f64>()) {
            out.insert(worker, v as u64);
        }
    }
    out
}

/// N of the worker's `stopped with N KV blocks in use` line.
fn blocks_at_stop(log: &PathBuf) -> Option<usize> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("stopped with"))?;
    let after = line.split("stopped with ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_gauges_are_read_by_label() {
        let text = "# HELP x\nbaton_worker_kv_blocks_used{worker=\"1a\"} 3\n\
                    baton_worker_kv_blocks_used{worker=\"2b\"} 0\nbaton_kv_blocks_used 3\n";
        let g = worker_gauges(text, "baton_worker_kv_blocks_used");
        assert_eq!(g.len(), 2);
        assert_eq!(g["1a"], 3);
        assert_eq!(g["2b"], 0);
    }

    #[test]
    fn proc_net_addresses_read_as_ip_and_port() {
        assert_eq!(hex_socket("0100007F:1F90"), "127.0.0.1:8080");
        assert_eq!(hex_socket("00000000:0050"), "0.0.0.0:80");
        assert!(hex_socket("00000000000000000000000001000000:0050").starts_with('['));
    }

    #[test]
    fn this_test_process_listens_where_it_bound() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let want = l.local_addr().unwrap().to_string();
        assert!(listening(std::process::id()).contains(&want));
    }

    #[test]
    fn the_stop_line_gives_the_blocks_in_use() {
        let dir = std::env::temp_dir().join(format!("soak-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("w.log");
        std::fs::write(
            &log,
            "x\nbaton: decode worker stopped with 7 KV blocks in use\n",
        )
        .unwrap();
        assert_eq!(blocks_at_stop(&log), Some(7));
        std::fs::write(&log, "x\n").unwrap();
        assert_eq!(blocks_at_stop(&log), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
