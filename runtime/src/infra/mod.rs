//! Local NATS and etcd servers for tests and benchmarks: the binaries `scripts/infra` installs
//! into the project venv, started on free loopback ports with their data in a temp folder, and
//! restartable on the same port (to test reconnection). Production deployments run their own.

pub mod etcd;
pub mod nats;

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

/// Waits until `port` accepts connections.
pub fn wait_for_port(port: u16, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}
