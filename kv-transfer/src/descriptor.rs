//! What a decode worker publishes in discovery so prefill workers can fill its cache.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::TransferError;
use crate::layout::KvLayout;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferBackend {
    /// Same process: a copy into the registered memory (`baton serve`).
    Memory,
    /// Same host: the cache is a `/dev/shm` segment the writer maps.
    Shm,
    /// Any host: framed block writes to the decode worker's KV server.
    Tcp,
    /// Same node, GPU memory: CUDA IPC handle, device copies.
    Cuda,
    /// No bytes: a write takes the time its bytes would need at the endpoint's rate (the mock
    /// engine's transfers; the address is the rate in bytes/s).
    Simulated,
}

impl TransferBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferBackend::Memory => "memory",
            TransferBackend::Shm => "shm",
            TransferBackend::Tcp => "tcp",
            TransferBackend::Cuda => "cuda",
            TransferBackend::Simulated => "simulated",
        }
    }
}

impl fmt::Display for TransferBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransferBackend {
    type Err = TransferError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "memory" | "in-process" => Ok(TransferBackend::Memory),
            "shm" => Ok(TransferBackend::Shm),
            "tcp" => Ok(TransferBackend::Tcp),
            "cuda" => Ok(TransferBackend::Cuda),
            "simulated" => Ok(TransferBackend::Simulated),
            other => Err(TransferError::UnknownBackend(other.to_string())),
        }
    }
}

/// One way into the cache: the backend and where (registry name, shm path, `ip:port`, or the
/// CUDA IPC handle in hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEndpoint {
    pub backend: TransferBackend,
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvDescriptor {
    pub layout: KvLayout,
    /// The decode worker's host name and process id: shm and in-process endpoints are only
    /// usable from the same host (and process).
    pub host: String,
    pub pid: u32,
    /// Preferred first.
    pub endpoints: Vec<KvEndpoint>,
    /// The fence table's `/dev/shm` segment, for writers in other processes of this host
    /// (shm, CUDA); in-process writers find it in the registry and the TCP server holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<String>,
    /// What a TCP writer must present before the server reads a byte from it. It travels only
    /// in discovery, which is the trust boundary: whoever may read the decode worker's record
    /// may write its cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SinkSecret>,
    /// Whether the TCP endpoint speaks TLS (a writer then needs the CA that signed it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

/// A sink's TCP secret: 32 random bytes in hex. Its `Debug` shows no digit of it, so logging a
/// descriptor does not leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SinkSecret(String);

impl SinkSecret {
    pub(crate) fn random() -> SinkSecret {
        let bytes: [u8; 32] = rand::random();
        SinkSecret(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for SinkSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SinkSecret(…)")
    }
}

impl KvDescriptor {
    /// Whether the decode worker runs on this host (shm and CUDA IPC reach it).
    pub fn is_same_host(&self) -> bool {
        self.host == local_host_name()
    }

    /// Whether the decode worker is this very process (its in-process registry is ours).
    pub fn is_same_process(&self) -> bool {
        self.pid == std::process::id() && self.is_same_host()
    }
}

/// Who "this host" is for shared memory and CUDA IPC: the host name, and the network
/// namespace's inode. Two containers (or `ip netns` nodes) on one machine have separate network
/// namespaces and usually separate `/dev/shm`, so they count as two hosts and talk TCP; that
/// is never wrong, where guessing "same host" would be.
pub(crate) fn local_host_name() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/net") {
        Ok(ns) => format!("{}/net:{}", host_name(), ns.ino()),
        Err(_) => host_name(),
    }
}

/// The address other hosts reach this one at on the way to `peer` (`host:port`, or a URL such
/// as `nats://host:port`; the first of a comma-separated list): the source address the kernel
/// picks for it. No packet is sent. `None` when `peer` does not resolve or has no route.
pub fn address_towards(peer: &str) -> Option<std::net::IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let first = peer.split(',').next()?.trim();
    let authority = first.split_once("://").map_or(first, |(_, rest)| rest);
    let authority = authority.split('/').next()?;
    // Credentials (`user:pass@host:port`) are not part of the address.
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let target = authority.to_socket_addrs().ok()?.next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// This machine's host name (`gethostname`), or "localhost" should the call fail.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    // POSIX leaves truncated names possibly unterminated: stop at the first NUL or the end.
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_towards_a_peer_is_the_one_that_reaches_it() {
        let lo = Some(std::net::IpAddr::from([127, 0, 0, 1]));
        assert_eq!(address_towards("nats://127.0.0.1:4222"), lo);
        assert_eq!(
            address_towards("http://127.0.0.1:2379,http://10.0.0.9:2379"),
            lo
        );
        assert_eq!(address_towards("nats://user:secret@127.0.0.1:4222/"), lo);
        assert_eq!(address_towards("not an address"), None);
    }

    #[test]
    fn the_host_identity_names_the_network_namespace() {
        let me = local_host_name();
        assert!(me.contains("/net:"), "{me}");
    }
}
