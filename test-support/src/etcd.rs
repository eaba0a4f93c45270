//! Local etcd server for tests and benchmarks: a single-member cluster on free loopback client
//! and peer ports, its data and log in a private temp folder. `restart()` brings it back on the
//! same ports with the same data, so registered leases and keys survive as they would in a real
//! etcd outage — the distributed-runtime tests use it to check that discovery reconnects.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::{free_port, venv_binary, LocalProcess};

/// How long a fresh (or restarted) etcd gets to open its client port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `etcd` child process. Dropping it kills the process and removes its folder.
pub struct EtcdServer {
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// Client URL to hand to `EtcdDiscovery::connect` (`http://127.0.0.1:{port}`).
    pub url: String,
    peer_port: u16,
    /// Holds `data/` and `etcd.log`.
    process: LocalProcess,
}

impl EtcdServer {
    /// Starts etcd on free ports and waits until its client port accepts connections.
    pub fn start() -> io::Result<Self> {
        let port = free_port();
        let mut server = Self {
            port,
            url: format!("http://127.0.0.1:{port}"),
            peer_port: free_port(),
            process: LocalProcess::new("etcd")?,
        };
        // On failure `server` is dropped here, which removes the folder.
        server.spawn()?;
        Ok(server)
    }

    /// Kills etcd (SIGKILL: the harshest outage; etcd recovers from its WAL on restart).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Stops etcd if running and starts it again on the same ports with the same data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.process.log_path()
    }

    fn spawn(&mut self) -> io::Result<()> {
        let binary = venv_binary("etcd")?;
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        // Every URL is explicit: etcd's defaults listen on localhost:2379/2380, which would
        // collide between parallel tests, and advertise a name that may not resolve.
        let args = [
            "--name".into(),
            "baton-test".into(),
            "--data-dir".into(),
            self.process.dir.join("data").into(),
            "--listen-client-urls".into(),
            client.clone().into(),
            "--advertise-client-urls".into(),
            client.into(),
            "--listen-peer-urls".into(),
            peer.clone().into(),
            "--initial-advertise-peer-urls".into(),
            peer.clone().into(),
            "--initial-cluster".into(),
            format!("baton-test={peer}").into(),
        ];
        self.process.start(&binary, &args, self.port, START_TIMEOUT)
    }
}
