//! What Baton's tests and benchmarks share and nothing ships: local NATS and etcd servers (the
//! binaries `scripts/infra` installs into the project venv, started on free loopback ports with
//! their data in a temp folder, restartable on the same port to test reconnection), free ports,
//! and the tail of a child's log for failure messages. Production deployments run their own
//! NATS and etcd; no shipped crate depends on this one.

pub mod etcd;
pub mod nats;

pub use etcd::EtcdServer;
pub use nats::NatsServer;

/// Runs `start` with fresh ports until one is not taken by a server started at the same moment.
fn on_free_port<T>(mut start: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut tries = 0;
    loop {
        match start() {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 5 => tries += 1,
            other => return other,
        }
    }
}

/// A local server of kind `K` (see [`NatsServer`], [`EtcdServer`]); `stop`, `restart` and
/// `log_path` come from its [`LocalProcess`]. Dropping it kills the process and removes its
/// folder.
pub struct LocalServer<K> {
    /// Client port (on 127.0.0.1 unless started `start_on` another address).
    pub port: u16,
    /// The URL clients connect to.
    pub url: String,
    process: LocalProcess,
    kind: std::marker::PhantomData<K>,
}

impl<K> std::ops::Deref for LocalServer<K> {
    type Target = LocalProcess;
    fn deref(&self) -> &LocalProcess {
        &self.process
    }
}

impl<K> std::ops::DerefMut for LocalServer<K> {
    fn deref_mut(&mut self) -> &mut LocalProcess {
        &mut self.process
    }
}

use std::path::PathBuf;

/// `.venv/bin/<name>` of this checkout, installing the infra packages when missing.
pub fn venv_binary(name: &str) -> std::io::Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(".venv/bin").join(name);
    if !path.exists() {
        let status = std::process::Command::new(root.join("scripts/infra"))
            .arg("install")
            .status()?;
        if !status.success() || !path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is missing; run scripts/infra install", path.display()),
            ));
        }
    }
    Ok(path)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("loopback has free ports")
}

/// Waits until `port` of 127.0.0.1 accepts connections.
pub fn wait_for_port(port: u16, timeout: std::time::Duration) -> bool {
    wait_for_port_on(LOOPBACK, port, timeout)
}

/// 127.0.0.1, where every local server listens unless a test names another address.
pub const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Waits until `host:port` accepts connections.
pub fn wait_for_port_on(host: std::net::IpAddr, port: u16, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect((host, port)).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// The last `lines` lines of a log file (empty when it cannot be read), for failure messages.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A server child process with a private temp folder (its data and `{name}.log`), shared by
/// the NATS and etcd wrappers (which deref to it for `stop`, `restart` and `log_path`). Dropping
/// it kills the process and removes the folder.
pub struct LocalProcess {
    name: &'static str,
    dir: PathBuf,
    child: Option<std::process::Child>,
    /// The binary and its arguments, kept for restarts.
    command: Option<(PathBuf, Vec<std::ffi::OsString>)>,
    host: std::net::IpAddr,
    port: u16,
    timeout: std::time::Duration,
}

impl LocalProcess {
    fn new(
        name: &'static str,
        host: std::net::IpAddr,
        port: u16,
        timeout: std::time::Duration,
    ) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("baton-{name}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    return Ok(Self {
                        name,
                        dir,
                        child: None,
                        command: None,
                        host,
                        port,
                        timeout,
                    })
                }
                // Left over from an earlier process with the same pid: pick the next name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The log file (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Runs `binary args` and waits until it opens its port; restarts run the same command.
    fn launch(&mut self, binary: PathBuf, args: Vec<std::ffi::OsString>) -> std::io::Result<()> {
        self.command = Some((binary, args));
        self.spawn()
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        use std::io;
        let (binary, args) = self.command.clone().expect("launched before");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut child = std::process::Command::new(&binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", binary.display())))?;
        if !wait_for_port_on(self.host, self.port, self.timeout) {
            let exited = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not open port {} within {:?} (exit: {exited:?}); log {}:\n{}",
                    self.name,
                    self.port,
                    self.timeout,
                    self.log_path().display(),
                    log_tail(&self.log_path(), 20)
                ),
            ));
        }
        // Another test's server may have taken the port between `free_port` and our bind: then
        // the port answers but our child exits. Say so, and let the caller pick a new port.
        std::thread::sleep(std::time::Duration::from_millis(150));
        if let Ok(Some(status)) = child.try_wait() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} exited ({status}) after port {} opened: taken by another process",
                    self.name, self.port
                ),
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: clients see the connection drop, as in a crash (etcd recovers from its WAL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after [`stop`](Self::stop), on the same port with the same data, so an
    /// outage can last as long as a test wants; a no-op while it runs.
    pub fn start(&mut self) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// Stops the server if running and starts it again on the same port with the same data.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for LocalProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
