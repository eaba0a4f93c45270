//! `baton run <component>` children over real NATS and etcd, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Short leases so a dead worker leaves routing quickly.
pub const LEASE_TTL: &str = "2";

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str], nats: &str, etcd: &str) -> Proc {
        Self::spawn_in(None, name, args, nats, etcd)
    }

    /// As [`Proc::spawn`], with `env` set in the child (after the `BATON_*` variables of the
    /// test's own environment are removed).
    pub fn spawn_env(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        nats: &str,
        etcd: &str,
    ) -> Proc {
        Self::spawn_full(None, name, args, env, nats, etcd)
    }

    /// As [`Proc::spawn`], inside network namespace `netns` when given (`ip netns exec`, which
    /// execs baton in place: the child is baton itself).
    pub fn spawn_in(
        netns: Option<&str>,
        name: &str,
        args: &[&str],
        nats: &str,
        etcd: &str,
    ) -> Proc {
        Self::spawn_full(netns, name, args, &[], nats, etcd)
    }

    fn spawn_full(
        netns: Option<&str>,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        nats: &str,
        etcd: &str,
    ) -> Proc {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("distributed-{name}-{}.log", std::process::id()));
        let baton = env!("CARGO_BIN_EXE_baton");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, baton]);
                c
            }
            None => Command::new(baton),
        };
        for (key, _) in std::env::vars() {
            if key.starts_with("BATON_") || key == "NATS_SERVER" || key == "ETCD_ENDPOINTS" {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .args(args)
            .args(["--nats-server", nats, "--etcd-endpoints", etcd])
            .args(["--lease-ttl", LEASE_TTL])
            .args(if args.contains(&"--num-kv-blocks") {
                &[][..]
            } else {
                &["--num-kv-blocks", "48"][..]
            })
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning baton");
        Proc { child, log }
    }

    /// Reads stdout until the frontend's listening line; returns the base URL.
    pub fn listening(&mut self) -> String {
        let stdout = self.child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("baton: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no listening line; {}", self.log_tail()))
    }

    pub fn log_tail(&self) -> String {
        format!(
            "log {}:\n{}",
            self.log.display(),
            test_support::log_tail(&self.log, 30)
        )
    }

    /// Whether this process's log shows a prefill job claimed and not yet finished (a
    /// `baton serve` graph's log holds its children's lines too).
    pub fn holds_a_prefill_job(&self) -> bool {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.matches("claimed a prefill job").count() > log.matches("finished a prefill job").count()
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace this test created, joined to the host by a veth pair with addresses the
/// test assigns (`10.231.N.1` on the host side, `.2` inside): a second "node" on one machine.
/// Deleted, with its veth pair, when dropped.
pub struct NetNs {
    pub name: String,
    pub host_ip: std::net::IpAddr,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("`ip` cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    pub fn create() -> Result<NetNs, String> {
        let pid = std::process::id();
        let name = format!("baton-test-{pid}");
        let tag = pid % 100_000;
        let (host_if, ns_if) = (format!("bth{tag}"), format!("btn{tag}"));
        let subnet = 1 + pid % 250;
        let (host_ip, ns_ip) = (format!("10.231.{subnet}.1"), format!("10.231.{subnet}.2"));
        ip(&["netns", "add", &name])?;
        let ns = NetNs {
            name: name.clone(),
            host_ip: host_ip.parse().expect("an address"),
            host_if: host_if.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", name.as_str(), "ip"];
            all.extend(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
