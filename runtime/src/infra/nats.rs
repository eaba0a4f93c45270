//! Local nats-server for tests and benchmarks: JetStream on, a free loopback port, its store and
//! log in a private temp folder. `restart()` brings it back on the same port with the same store,
//! as a real NATS outage would, so the request plane, event plane and JetStream queue tests can
//! check that clients reconnect by themselves.

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{free_port, venv_binary, wait_for_port};

/// How long a fresh (or restarted) nats-server gets to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `nats-server -js` child process. Dropping it kills the process and removes its
/// folder.
pub struct NatsServer {
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// `nats://127.0.0.1:{port}`, for the planes' `connect`.
    pub url: String,
    /// Temp folder holding the JetStream store (`store/`) and `nats.log`.
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts nats-server on a free port and waits until it accepts connections.
    pub fn start() -> io::Result<Self> {
        let port = free_port();
        let mut server = Self {
            port,
            url: format!("nats://127.0.0.1:{port}"),
            dir: unique_dir()?,
            child: None,
        };
        // On failure `server` is dropped here, which removes the folder.
        server.spawn()?;
        Ok(server)
    }

    /// Kills nats-server (SIGKILL: clients see the connection drop, as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops nats-server if running and starts it again on the same port with the same store.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    fn spawn(&mut self) -> io::Result<()> {
        let binary = venv_binary("nats-server")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut child = Command::new(&binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", binary.display())))?;
        if !wait_for_port(self.port, START_TIMEOUT) {
            let exited = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "nats-server did not open port {} within {START_TIMEOUT:?} (exit: {exited:?}); \
                     log {}:\n{}",
                    self.port,
                    self.log_path().display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ),
            ));
        }
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for NatsServer {
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
        let dir = std::env::temp_dir().join(format!("baton-nats-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            // Left over from an earlier process with the same pid: pick the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}
