//! Local nats-server for tests and benchmarks: JetStream on, a free loopback port, its store and
//! log in a private temp folder. `restart()` brings it back on the same port with the same store,
//! as a real NATS outage would, so the request plane, event plane and JetStream queue tests can
//! check that clients reconnect by themselves.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::{free_port, venv_binary, LocalProcess};

/// How long a fresh (or restarted) nats-server gets to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `nats-server -js` child process. Dropping it kills the process and removes its
/// folder.
pub struct NatsServer {
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// `nats://127.0.0.1:{port}`, for the planes' `connect`.
    pub url: String,
    /// Holds the JetStream store (`store/`) and `nats.log`.
    process: LocalProcess,
}

impl NatsServer {
    /// Starts nats-server on a free port and waits until it accepts connections.
    pub fn start() -> io::Result<Self> {
        let port = free_port();
        let mut server = Self {
            port,
            url: format!("nats://127.0.0.1:{port}"),
            process: LocalProcess::new("nats")?,
        };
        // On failure `server` is dropped here, which removes the folder.
        server.spawn()?;
        Ok(server)
    }

    /// Kills nats-server (SIGKILL: clients see the connection drop, as in a crash).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Stops nats-server if running and starts it again on the same port with the same store.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.process.log_path()
    }

    fn spawn(&mut self) -> io::Result<()> {
        let binary = venv_binary("nats-server")?;
        let args = [
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string().into(),
            "-js".into(),
            "-sd".into(),
            self.process.dir.join("store").into(),
        ];
        self.process.start(&binary, &args, self.port, START_TIMEOUT)
    }
}
