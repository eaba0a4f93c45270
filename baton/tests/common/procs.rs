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
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("distributed-{name}-{}.log", std::process::id()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
        for (key, _) in std::env::vars() {
            if key.starts_with("BATON_") || key == "NATS_SERVER" || key == "ETCD_ENDPOINTS" {
                cmd.env_remove(key);
            }
        }
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
