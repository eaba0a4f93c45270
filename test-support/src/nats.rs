//! Local nats-server for tests and benchmarks: JetStream on, a free loopback port, its store and
//! log in a private temp folder. `restart()` brings it back on the same port with the same store,
//! as a real NATS outage would, so the request plane, event plane and JetStream queue tests can
//! check that clients reconnect by themselves.

use std::io;
use std::time::Duration;

use std::net::IpAddr;

use super::{free_port, on_free_port, venv_binary, LocalProcess, LocalServer, LOOPBACK};

/// How long a fresh (or restarted) nats-server gets to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Marks a [`LocalServer`] as Nats.
pub enum Nats {}

pub type NatsServer = LocalServer<Nats>;

impl LocalServer<Nats> {
    /// Starts nats-server on a free port and waits until it accepts connections.
    pub fn start() -> io::Result<Self> {
        Self::start_on(LOOPBACK)
    }

    /// As [`LocalServer::start`], listening on `host` only (an address a test gave an
    /// interface it created, so a network namespace can reach it).
    pub fn start_on(host: IpAddr) -> io::Result<Self> {
        on_free_port(|| Self::start_once(host))
    }

    fn start_once(host: IpAddr) -> io::Result<Self> {
        let port = free_port();
        let mut process = LocalProcess::new("nats", host, port, START_TIMEOUT)?;
        let args = vec![
            "-a".into(),
            host.to_string().into(),
            "-p".into(),
            port.to_string().into(),
            "-js".into(),
            "-sd".into(),
            process.dir.join("store").into(),
        ];
        // On failure `process` is dropped here, which removes the folder.
        process.launch(venv_binary("nats-server")?, args)?;
        Ok(Self {
            port,
            url: format!("nats://{host}:{port}"),
            process,
            kind: std::marker::PhantomData,
        })
    }
}
