//! Local etcd for tests: a single-member cluster on free loopback ports (client and peer), its
//! data and log in a private temp folder. `restart()` brings it back on the same ports with the
//! same data, so discovery tests can check that leases, registrations and watches recover.

use std::io;
use std::time::Duration;

use std::net::IpAddr;

use super::{free_port, on_free_port, venv_binary, LocalProcess, LocalServer, LOOPBACK};

/// How long a fresh (or restarted) etcd gets to open its client port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Marks a [`LocalServer`] as Etcd.
pub enum Etcd {}

pub type EtcdServer = LocalServer<Etcd>;

impl LocalServer<Etcd> {
    /// Starts etcd on free ports and waits until its client port accepts connections.
    pub fn start() -> io::Result<Self> {
        Self::start_on(LOOPBACK)
    }

    /// As [`LocalServer::start`], clients on `host` only (peers stay on loopback).
    pub fn start_on(host: IpAddr) -> io::Result<Self> {
        on_free_port(|| Self::start_once(host))
    }

    fn start_once(host: IpAddr) -> io::Result<Self> {
        let port = free_port();
        let client = format!("http://{host}:{port}");
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut process = LocalProcess::new("etcd", host, port, START_TIMEOUT)?;
        // Every URL is explicit: etcd's defaults listen on localhost:2379/2380, which would
        // collide between parallel tests, and advertise a name that may not resolve.
        let args = vec![
            "--name".into(),
            "baton-test".into(),
            "--data-dir".into(),
            process.dir.join("data").into(),
            "--listen-client-urls".into(),
            client.clone().into(),
            "--advertise-client-urls".into(),
            client.clone().into(),
            "--listen-peer-urls".into(),
            peer.clone().into(),
            "--initial-advertise-peer-urls".into(),
            peer.clone().into(),
            "--initial-cluster".into(),
            format!("baton-test={peer}").into(),
        ];
        // On failure `process` is dropped here, which removes the folder.
        process.launch(venv_binary("etcd")?, args)?;
        Ok(Self {
            port,
            url: client,
            process,
            kind: std::marker::PhantomData,
        })
    }
}
