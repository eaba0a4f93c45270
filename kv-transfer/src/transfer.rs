//! The prefill worker's side: [`connect`] to a decode worker's [`KvDescriptor`] and get a
//! [`KvTransfer`] that writes whole blocks into its cache, through the nearest endpoint both
//! sides can use (the same process, then the same host, then the network).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::{cuda, memory, shm, simulated, tcp};
use crate::descriptor::{KvDescriptor, KvEndpoint, TransferBackend};
use crate::error::TransferError;
use crate::fence::{Generation, KvFences};
use crate::layout::KvLayout;

/// The prefill worker's side: writes whole blocks into a decode worker's cache.
#[async_trait]
pub trait KvTransfer: Send + Sync {
    fn backend(&self) -> TransferBackend;
    /// `blocks[i]` (each `layout.block_bytes()`) goes to block `dst_blocks[i]`, under the
    /// grant of `generation` (the decode worker's answer to this writer's claim). Validates
    /// with `KvLayout::check_write` before any byte moves; a block not granted to
    /// `generation` is refused with [`TransferError::Fenced`] before a byte lands in it.
    /// Returns the bytes written. When it returns Ok, the bytes are in the destination memory
    /// (TCP: the server acknowledged after writing).
    async fn write_blocks(
        &self,
        generation: Generation,
        dst_blocks: &[u32],
        blocks: &[Vec<u8>],
    ) -> Result<u64, TransferError>;
}

/// Choice of endpoint. `Auto`: Memory if this process registered that name (same pid and
/// host), else Shm if same host name and the path opens, else Tcp, else Cuda (same host). A
/// forced backend uses only that endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Only(TransferBackend),
}

impl FromStr for BackendChoice {
    type Err = TransferError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            other => other.parse().map(BackendChoice::Only),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoice::Auto => f.write_str("auto"),
            BackendChoice::Only(backend) => backend.fmt(f),
        }
    }
}

/// Nearest first: what `Auto` tries, in this order.
const AUTO_ORDER: [TransferBackend; 5] = [
    TransferBackend::Memory,
    TransferBackend::Shm,
    TransferBackend::Tcp,
    TransferBackend::Cuda,
    TransferBackend::Simulated,
];

/// Checks `ours.check_compatible(&desc.layout)` first (blocks computed under another layout
/// must never be written), then opens the endpoint `choice` picks.
pub async fn connect(
    desc: &KvDescriptor,
    ours: &KvLayout,
    choice: BackendChoice,
) -> Result<Box<dyn KvTransfer>, TransferError> {
    connect_with(desc, ours, choice, None).await
}

/// As [`connect`]; `tls` (`tls::client_config`) is how a TLS TCP endpoint is verified. A
/// writer given one refuses a plain TCP endpoint (it was asked not to send in clear), and one
/// without it cannot use a TLS endpoint.
pub async fn connect_with(
    desc: &KvDescriptor,
    ours: &KvLayout,
    choice: BackendChoice,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn KvTransfer>, TransferError> {
    ours.check_compatible(&desc.layout)?;
    desc.layout.checked_total_bytes()?;
    let offered = || TransferError::NoUsableEndpoint {
        offered: desc
            .endpoints
            .iter()
            .map(|e| e.backend.to_string())
            .collect(),
    };
    match choice {
        BackendChoice::Only(backend) => {
            let endpoint = desc
                .endpoints
                .iter()
                .find(|e| e.backend == backend)
                .ok_or_else(offered)?;
            open(desc, ours, endpoint, tls.clone()).await
        }
        BackendChoice::Auto => {
            let mut failures = Vec::new();
            for backend in AUTO_ORDER {
                let Some(endpoint) = desc.endpoints.iter().find(|e| e.backend == backend) else {
                    continue;
                };
                if !reachable(desc, endpoint) {
                    continue;
                }
                match open(desc, ours, endpoint, tls.clone()).await {
                    Ok(transfer) => return Ok(transfer),
                    Err(e) => {
                        tracing::debug!(%backend, address = %endpoint.address, error = %e, "KV endpoint unusable; trying the next");
                        failures.push(format!("{backend} `{}`: {e}", endpoint.address));
                    }
                }
            }
            if failures.is_empty() {
                Err(offered())
            } else {
                Err(TransferError::NoEndpointOpened { failures })
            }
        }
    }
}

/// Whether `Auto` should try `endpoint` at all from here.
fn reachable(desc: &KvDescriptor, endpoint: &KvEndpoint) -> bool {
    match endpoint.backend {
        TransferBackend::Memory => {
            desc.is_same_process() && crate::registry::lookup(&endpoint.address).is_some()
        }
        TransferBackend::Shm | TransferBackend::Cuda => desc.is_same_host(),
        TransferBackend::Tcp | TransferBackend::Simulated => true,
    }
}

async fn open(
    desc: &KvDescriptor,
    ours: &KvLayout,
    endpoint: &KvEndpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn KvTransfer>, TransferError> {
    let layout = desc.layout.clone();
    Ok(match endpoint.backend {
        TransferBackend::Memory => Box::new(memory::open(&endpoint.address, ours)?),
        TransferBackend::Shm => {
            let mapping = shm::open(&endpoint.address, layout.checked_total_bytes()?)?;
            Box::new(memory::HostWriter::new(
                TransferBackend::Shm,
                Arc::new(mapping),
                layout.clone(),
                attach_fences(desc)?,
            )?)
        }
        TransferBackend::Tcp => {
            let secret = desc.secret.clone().ok_or_else(|| TransferError::Tcp {
                addr: endpoint.address.clone(),
                reason: "the decode worker publishes no secret for its KV server".into(),
            })?;
            let refuse = |reason: &str| TransferError::Tcp {
                addr: endpoint.address.clone(),
                reason: reason.into(),
            };
            match (desc.tls, &tls) {
                (true, None) => {
                    return Err(refuse(
                        "the KV server speaks TLS: this writer needs the CA (--kv-tls-ca)",
                    ))
                }
                (false, Some(_)) => {
                    return Err(refuse(
                        "this writer is set up for TLS (--kv-tls-ca) but the KV server speaks \
                         plain TCP",
                    ))
                }
                _ => {}
            }
            Box::new(tcp::TcpWriter::connect(&endpoint.address, layout, secret, tls).await?)
        }
        TransferBackend::Cuda => cuda::open(desc, &endpoint.address)?,
        TransferBackend::Simulated => {
            Box::new(simulated::SimulatedLink::open(layout, &endpoint.address)?)
        }
    })
}

/// A writer's view of the fence table a same-host decode worker published (shm, CUDA IPC).
pub(crate) fn attach_fences(desc: &KvDescriptor) -> Result<KvFences, TransferError> {
    let path = desc.fence.as_deref().ok_or_else(|| {
        TransferError::Fence(
            "the decode worker publishes no fence table: it cannot be written safely".into(),
        )
    })?;
    let num_blocks = desc.layout.num_blocks;
    let mapping = shm::open(path, crate::fence::table_bytes(num_blocks))?;
    KvFences::attach(mapping, num_blocks)
}
