//! The decode worker's side: a [`KvSink`] owns the cache memory and every endpoint that
//! serves writes into it, and describes them in a [`KvDescriptor`] for discovery.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::shm::ShmFile;
use crate::backend::tcp::{ServerParts, TcpServer};
use crate::backend::{cuda, shm, simulated};
use crate::descriptor::{local_host_name, KvDescriptor, KvEndpoint, SinkSecret, TransferBackend};
use crate::error::TransferError;
use crate::fence::KvFences;
use crate::layout::KvLayout;
use crate::memory::{HostMemory, KvMemory};
use crate::registry::{self, Registration};

/// The decode worker's side: the cache memory plus whatever serves writes into it. Dropping it
/// closes the endpoints (unregisters, unlinks the shm file, stops the TCP server); the memory
/// itself lives on while the engine holds an `Arc` to it.
pub struct KvSink {
    layout: KvLayout,
    memory: Arc<dyn KvMemory>,
    host: String,
    endpoints: Vec<KvEndpoint>,
    received: Arc<AtomicU64>,
    /// Who may write which block now (`fence.rs`); the decode worker grants and closes.
    fences: KvFences,
    /// The fence table's shm file, for writers in other processes (shm, CUDA).
    fence_file: Option<ShmFile>,
    secret: Option<SinkSecret>,
    /// Whether the TCP endpoint speaks TLS.
    tcp_tls: bool,
    _registrations: Vec<Registration>,
    _shm: Option<ShmFile>,
    _tcp: Option<TcpServer>,
}

/// The fence table of a sink: in a shm file when writers in other processes of this host
/// copy into the cache themselves (shm, CUDA IPC), else in anonymous memory.
fn fence_table(
    num_blocks: usize,
    shared: bool,
) -> Result<(KvFences, Option<ShmFile>), TransferError> {
    if shared {
        let (memory, file) = shm::create(crate::fence::table_bytes(num_blocks))?;
        Ok((KvFences::create(memory, num_blocks)?, Some(file)))
    } else {
        Ok((KvFences::in_process(num_blocks)?, None))
    }
}

impl KvSink {
    /// Allocates zeroed memory of `layout.total_bytes()` and opens an endpoint per backend, in
    /// the order given (the descriptor's preference order). Host backends share one memory:
    /// the shm file when `Shm` is among them, else an anonymous mapping. `Tcp` binds
    /// `tcp_host:0` and needs a tokio runtime; `Cuda` stands alone (device memory, ordinal 0).
    pub async fn new(
        layout: KvLayout,
        backends: &[TransferBackend],
        tcp_host: IpAddr,
    ) -> Result<KvSink, TransferError> {
        Self::with_tls(layout, backends, tcp_host, None).await
    }

    /// As [`KvSink::new`]; with `tls`, the TCP endpoint speaks TLS with that configuration
    /// (`tls::server_config`) and the descriptor says so.
    pub async fn with_tls(
        layout: KvLayout,
        backends: &[TransferBackend],
        tcp_host: IpAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<KvSink, TransferError> {
        let len = layout.checked_total_bytes()?;
        let mut wanted: Vec<TransferBackend> = Vec::new();
        for &backend in backends {
            if !wanted.contains(&backend) {
                wanted.push(backend);
            }
        }
        let names = || wanted.iter().map(|b| b.to_string()).collect::<Vec<_>>();
        if wanted.contains(&TransferBackend::Simulated) {
            return Err(TransferError::Backends {
                backends: names(),
                reason: "`simulated` is the mock engine's link: it has no memory to share; \
                         open it with `KvSink::simulated`"
                    .into(),
            });
        }
        if wanted.contains(&TransferBackend::Cuda) {
            if wanted.len() > 1 {
                return Err(TransferError::Backends {
                    backends: names(),
                    reason: "`cuda` keeps the cache in device memory, which the host backends \
                             cannot write; use it alone"
                        .into(),
                });
            }
            let (memory, handle) = cuda::allocate(len, 0)?;
            let memory: Arc<dyn KvMemory> = Arc::new(memory);
            let (fences, fence_file) = fence_table(layout.num_blocks, true)?;
            // Registered under its handle so a writer in this same process can skip the IPC
            // open (which the driver refuses inside the allocating process).
            let registration = registry::register(
                handle.clone(),
                memory.clone(),
                layout.clone(),
                fences.clone(),
            );
            return Ok(KvSink {
                layout,
                memory,
                host: local_host_name(),
                endpoints: vec![KvEndpoint {
                    backend: TransferBackend::Cuda,
                    address: handle,
                }],
                received: Arc::default(),
                fences,
                fence_file,
                secret: None,
                tcp_tls: false,
                _registrations: vec![registration],
                _shm: None,
                _tcp: None,
            });
        }
        if wanted.contains(&TransferBackend::Tcp) && tokio::runtime::Handle::try_current().is_err()
        {
            return Err(TransferError::Backends {
                backends: names(),
                reason:
                    "the `tcp` backend's server needs a tokio runtime; create the sink inside one"
                        .into(),
            });
        }

        let (memory, shm_file): (HostMemory, Option<ShmFile>) =
            if wanted.contains(&TransferBackend::Shm) {
                let (memory, file) = shm::create(len)?;
                (memory, Some(file))
            } else {
                let memory = HostMemory::anonymous(len).map_err(|e| TransferError::Alloc {
                    bytes: len,
                    reason: e.to_string(),
                })?;
                (memory, None)
            };
        let memory: Arc<dyn KvMemory> = Arc::new(memory);
        let (fences, fence_file) =
            fence_table(layout.num_blocks, wanted.contains(&TransferBackend::Shm))?;
        let secret = wanted
            .contains(&TransferBackend::Tcp)
            .then(SinkSecret::random);
        let received = Arc::new(AtomicU64::new(0));
        let mut endpoints = Vec::new();
        let mut registrations = Vec::new();
        let mut tcp = None;
        // Anything opened before a failure is closed again by the guards going out of scope.
        for backend in wanted {
            let address = match backend {
                TransferBackend::Memory => {
                    let registration = registry::register(
                        registry::unique_name(),
                        memory.clone(),
                        layout.clone(),
                        fences.clone(),
                    );
                    let name = registration.name().to_string();
                    registrations.push(registration);
                    name
                }
                TransferBackend::Shm => match &shm_file {
                    Some(file) => file.path().display().to_string(),
                    None => unreachable!("the shm file is created whenever `shm` is asked for"),
                },
                TransferBackend::Tcp => {
                    let parts = ServerParts {
                        memory: memory.clone(),
                        layout: layout.clone(),
                        received: received.clone(),
                        fences: fences.clone(),
                        secret: secret.clone().expect("made whenever `tcp` is asked for"),
                        tls: tls.clone(),
                    };
                    let server = TcpServer::start(parts, tcp_host).await?;
                    let address = server.addr().to_string();
                    tcp = Some(server);
                    address
                }
                TransferBackend::Cuda | TransferBackend::Simulated => {
                    unreachable!("handled above")
                }
            };
            endpoints.push(KvEndpoint { backend, address });
        }
        Ok(KvSink {
            layout,
            memory,
            host: local_host_name(),
            endpoints,
            received,
            fences,
            fence_file,
            secret,
            tcp_tls: tls.is_some() && tcp.is_some(),
            _registrations: registrations,
            _shm: shm_file,
            _tcp: tcp,
        })
    }

    /// A sink for a cache that exists only in simulation (the mock engine): no memory, one
    /// `simulated` endpoint whose writes take `bytes / bytes_per_s` (infinite: no time).
    pub fn simulated(layout: KvLayout, bytes_per_s: f64) -> Result<KvSink, TransferError> {
        let address = bytes_per_s.to_string();
        simulated::parse_rate(&address)?;
        // Grants and closes run as on a real sink (the decode worker's code is the same);
        // the simulated writer moves no bytes, so it never needs to acquire.
        let (fences, fence_file) = fence_table(layout.num_blocks, false)?;
        Ok(KvSink {
            layout,
            memory: Arc::new(simulated::NoMemory),
            host: local_host_name(),
            endpoints: vec![KvEndpoint {
                backend: TransferBackend::Simulated,
                address,
            }],
            received: Arc::default(),
            fences,
            fence_file,
            secret: None,
            tcp_tls: false,
            _registrations: Vec::new(),
            _shm: None,
            _tcp: None,
        })
    }

    pub fn memory(&self) -> Arc<dyn KvMemory> {
        self.memory.clone()
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// What a prefill worker needs to [`crate::connect`]: the layout, this host and process,
    /// and the endpoints in preference order.
    pub fn descriptor(&self) -> KvDescriptor {
        KvDescriptor {
            layout: self.layout.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            endpoints: self.endpoints.clone(),
            fence: self
                .fence_file
                .as_ref()
                .map(|f| f.path().display().to_string()),
            secret: self.secret.clone(),
            tls: self.tcp_tls,
        }
    }

    /// The cache's fence table: the decode worker grants a claimant its blocks here and
    /// closes them before it frees or reuses them.
    pub fn fences(&self) -> KvFences {
        self.fences.clone()
    }

    /// Bytes the TCP server has written into this sink so far (memory and shm writers copy
    /// without the sink seeing it; they count on their own side).
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}
