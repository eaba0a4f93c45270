use crate::memory::MemoryLocation;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(
        "KV layouts differ in `{field}`: this side has {ours}, the decode worker {theirs}; \
         refusing to write blocks it could not read"
    )]
    LayoutMismatch {
        field: &'static str,
        ours: String,
        theirs: String,
    },
    #[error("block {block} is outside the decode worker's cache of {num_blocks} blocks")]
    NoSuchBlock { block: u32, num_blocks: usize },
    #[error("block {block} carries {got} bytes; the layout says {expected}")]
    BlockSize {
        block: u32,
        expected: usize,
        got: usize,
    },
    #[error("{ids} destination block ids for {blocks} blocks of data")]
    BlockCount { ids: usize, blocks: usize },
    #[error("no KV endpoint this side can use among {offered:?}")]
    NoUsableEndpoint { offered: Vec<String> },
    #[error("no in-process KV cache is registered as `{0}`")]
    UnknownLocal(String),
    #[error("shared memory `{path}`: {reason}")]
    Shm { path: String, reason: String },
    #[error("KV transfer over TCP to `{addr}`: {reason}")]
    Tcp { addr: String, reason: String },
    #[error("CUDA KV transfer: {0}")]
    Cuda(String),
    #[error("unknown KV transfer backend `{0}` (use memory, shm, tcp, cuda or auto)")]
    UnknownBackend(String),
    #[error("could not open any KV endpoint: {}", .failures.join("; "))]
    NoEndpointOpened { failures: Vec<String> },
    #[error("KV layout is unusable: {reason}")]
    InvalidLayout { reason: String },
    #[error("KV memory of {len} bytes cannot hold the layout's {needed} bytes")]
    MemoryTooSmall { needed: usize, len: usize },
    #[error("KV memory on {0:?} cannot be written by a host copy")]
    NotHostMemory(MemoryLocation),
    #[error("allocating {bytes} bytes of KV memory: {reason}")]
    Alloc { bytes: usize, reason: String },
    #[error(
        "block {block} is not granted to this write (it presented generation {presented}, the \
         block carries {current}): its claim ended, so the write is refused before any byte lands"
    )]
    Fenced {
        block: u32,
        presented: u64,
        current: u64,
    },
    #[error("KV transfer TLS: {0}")]
    Tls(String),
    #[error("KV fence table: {0}")]
    Fence(String),
    #[error("KV sink backends {backends:?}: {reason}")]
    Backends {
        backends: Vec<String>,
        reason: String,
    },
}
