//! Local etcd server for tests and benchmarks: a single-member cluster on free loopback client
//! and peer ports, its data and log in a private temp folder. `restart()` brings it back on the
//! same ports with the same data, so registered leases and keys survive as they would in a real
//! etcd outage — the distributed-runtime tests use it to check that discovery reconnects.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{free_port, venv_binary, wait_for_port};

/// How long a fresh (or restarted) etcd gets to open its client port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `etcd` child process. Dropping it kills the process and removes its folder.
pub struct EtcdServer {
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// Client URL to hand to `EtcdDiscovery::connect` (`http://127.0.0.1:{port}`).
    pub url: String,
    peer_port: u16,
    /// Temp folder holding `data/` and `etcd.log`.
    dir: PathBuf,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free ports and waits until its client port accepts connections.
    pub fn start() -> io::Result<Self> {
        let dir = unique_dir()?;
        let mut server = Self {
            port: free_port(),
            url: String::new(),
            peer_port: free_port(),
            dir,
            child: None,
        };
        server.url = format!("http://127.0.0.1:{}", server.port);
        // On failure `server` is dropped here, which removes the folder.
        server.spawn()?;
        Ok(server)
    }

    /// Kills etcd (SIGKILL: the harshest outage; etcd recovers from its WAL on restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops etcd if running and starts it again on the same ports with the same data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn spawn(&mut self) -> io::Result<()> {
        let binary = venv_binary("etcd")?;
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // Every URL is explicit: etcd's defaults listen on localhost:2379/2380, which would
        // collide between parallel tests, and advertise a name that may not resolve.
        let mut child = Command::new(&binary)
            .arg("--name")
            .arg("baton-test")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("baton-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", binary.display())))?;
        if !wait_for_port(self.port, START_TIMEOUT) {
            let exited = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "etcd did not open client port {} within {START_TIMEOUT:?} (exit: {exited:?}); \
                     log {}:\n{}",
                    self.port,
                    self.log_path().display(),
                    log_tail(&self.log_path())
                ),
            ));
        }
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new, empty folder under the system temp dir, unique across processes and tests.
fn unique_dir() -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("baton-etcd-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            // Left over from an earlier process with the same pid: pick the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = io::Read::read_to_string(&mut f, &mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
