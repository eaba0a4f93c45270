//! TCP backend: a KV server in the decode worker writes framed blocks from any host into the
//! cache memory, and a writer in the prefill worker that keeps one connection open.
//!
//! # Wire format (little-endian throughout)
//! A connection opens with a hello, then carries any number of request/reply exchanges, one
//! at a time.
//!
//! Hello: `"BKVH"` then the sink's 64-character secret (from its discovery record). The server
//! compares it in constant time and, on a mismatch or silence past [`HELLO_TIMEOUT`], replies
//! with an error and hangs up: nothing else from an unauthenticated peer is ever read.
//!
//! Request:
//! ```text
//! magic        4 bytes   "BKV2"
//! n_blocks     u32       blocks in this request, at most the cache's num_blocks
//! block_bytes  u64       bytes per block; must equal the server layout's block_bytes()
//! generation   u64       the grant the writer's claim was answered with
//! block_ids    n × u32   destination block ids, each < num_blocks
//! payload      n × block_bytes   block i for block_ids[i]: layer 0's chunk, layer 1's, ...
//! ```
//! The server answers the header first: `[3u8]` (go: send the payload), or a refusal. After the
//! payload it answers `[0u8][bytes written u64]`. A refusal is
//! `[2u8][block u32][presented u64][current u64]` when a block is not granted to the
//! generation, `[1u8][len u32][len bytes of UTF-8 message]` for anything else; after one the
//! server closes the connection. The go costs a round trip per request, and buys a refusal
//! the writer reads before it sends a byte of payload (a server that hung up mid-payload could
//! only be heard as a broken pipe). Should a grant end while its payload travels, the server
//! reads the rest without copying it and then refuses.
//!
//! The whole header — every destination id, the block size and the generation — comes before
//! any payload, so the server validates a request completely (including that every block is
//! granted to it) before a single byte lands in the cache, and a garbage frame only costs the
//! connection it came on. Each layer chunk is read into a staging buffer and copied into the
//! cache while the block's fence is held (`fence.rs`): holding it across a socket read would
//! let a stalled peer keep the decode worker from ever freeing the block. A client dying
//! mid-payload leaves its granted blocks partly written, which is harmless: without a reply
//! the prefill worker never sends `PrefillDone`, and the decode worker closes the grant and
//! prefills those blocks itself.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};

use subtle::ConstantTimeEq;

use crate::descriptor::{SinkSecret, TransferBackend};
use crate::error::TransferError;
use crate::fence::{Generation, KvFences};
use crate::layout::KvLayout;
use crate::memory::{checked_len, layer_chunk_mut, KvMemory, MemoryLocation};
use crate::transfer::KvTransfer;

const HELLO_MAGIC: [u8; 4] = *b"BKVH";
const SECRET_BYTES: usize = 64;
const MAGIC: [u8; 4] = *b"BKV2";
const HEADER_BYTES: usize = 24;
const STATUS_OK: u8 = 0;
const STATUS_ERR: u8 = 1;
const STATUS_FENCED: u8 = 2;
/// After a valid header: the server takes the payload.
const STATUS_GO: u8 = 3;
/// How long a new connection may take to say who it is.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket buffers for bulk KV: a few MB in flight keeps loopback and LAN links busy while the
/// receiver is copying. (The kernel caps it at `net.core.{r,w}mem_max`.)
const SOCKET_BUFFER: u32 = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An error reply longer than this is not a Baton KV server talking.
const MAX_ERROR_LEN: u32 = 64 << 10;

fn tcp_err(addr: impl ToString, reason: impl ToString) -> TransferError {
    TransferError::Tcp {
        addr: addr.to_string(),
        reason: reason.to_string(),
    }
}

/// A connection, plain or TLS: the protocol above is the same.
trait KvStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> KvStream for T {}
type Stream = Box<dyn KvStream>;

struct Shared {
    memory: Arc<dyn KvMemory>,
    layout: KvLayout,
    received: Arc<AtomicU64>,
    fences: KvFences,
    secret: SinkSecret,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// What a sink's TCP server needs besides its address.
pub(crate) struct ServerParts {
    pub(crate) memory: Arc<dyn KvMemory>,
    pub(crate) layout: KvLayout,
    pub(crate) received: Arc<AtomicU64>,
    pub(crate) fences: KvFences,
    pub(crate) secret: SinkSecret,
    /// Serve TLS with this configuration (`tls.rs`), else plain TCP.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

/// The KV server of a sink; stops accepting, and drops its connections, when dropped.
pub(crate) struct TcpServer {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl TcpServer {
    pub(crate) async fn start(
        parts: ServerParts,
        host: IpAddr,
    ) -> Result<TcpServer, TransferError> {
        let ServerParts {
            memory,
            layout,
            received,
            fences,
            secret,
            tls,
        } = parts;
        checked_len(&layout, &*memory)?;
        if memory.location() != MemoryLocation::Host {
            return Err(TransferError::NotHostMemory(memory.location()));
        }
        let want = SocketAddr::new(host, 0);
        let err = |what: &str, e: io::Error| tcp_err(want, format!("{what}: {e}"));
        let socket = match host {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| err("socket", e))?;
        // Accepted sockets inherit the receive buffer; it must be set before listen.
        socket
            .set_recv_buffer_size(SOCKET_BUFFER)
            .map_err(|e| err("SO_RCVBUF", e))?;
        socket.bind(want).map_err(|e| err("bind", e))?;
        let listener = socket.listen(1024).map_err(|e| err("listen", e))?;
        let addr = listener.local_addr().map_err(|e| err("local address", e))?;
        let shared = Arc::new(Shared {
            memory,
            layout,
            received,
            fences,
            secret,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
        });
        let accept = tokio::spawn(accept_loop(listener, shared));
        Ok(TcpServer { addr, accept })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "KV server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Why a request was not served.
enum ServeError {
    /// The peer sent something no writer of this crate sends: tell it, then hang up.
    Frame(String),
    /// A block of the request is not granted to its generation: tell it, then hang up.
    Fenced {
        block: u32,
        presented: u64,
        current: u64,
    },
    Io(io::Error),
}

impl From<TransferError> for ServeError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Fenced {
                block,
                presented,
                current,
            } => ServeError::Fenced {
                block,
                presented,
                current,
            },
            other => ServeError::Frame(other.to_string()),
        }
    }
}

impl From<io::Error> for ServeError {
    fn from(e: io::Error) -> Self {
        ServeError::Io(e)
    }
}

/// Reads the hello and checks the secret in constant time; nothing else is read first.
async fn hello(stream: &mut Stream, secret: &SinkSecret) -> Result<(), ServeError> {
    let mut hello = [0u8; 4 + SECRET_BYTES];
    match tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut hello)).await {
        Err(_) => {
            return Err(ServeError::Frame(format!(
                "no hello within {HELLO_TIMEOUT:?}"
            )))
        }
        Ok(read) => {
            read?;
        }
    }
    let magic_ok = hello[..4] == HELLO_MAGIC;
    let secret_ok: bool = hello[4..].ct_eq(secret.as_bytes()).into();
    if magic_ok && secret_ok {
        Ok(())
    } else {
        Err(ServeError::Frame(
            "not authenticated: the hello must carry the secret of this sink's discovery record"
                .into(),
        ))
    }
}

async fn refuse(stream: &mut Stream, peer: SocketAddr, error: ServeError) {
    let reply = match error {
        ServeError::Frame(message) => {
            tracing::warn!(%peer, %message, "KV server: refused a request");
            let mut reply = vec![STATUS_ERR];
            reply.extend_from_slice(&(message.len() as u32).to_le_bytes());
            reply.extend_from_slice(message.as_bytes());
            reply
        }
        ServeError::Fenced {
            block,
            presented,
            current,
        } => {
            tracing::warn!(%peer, block, presented, current, "KV server: refused a write its grant no longer covers");
            let mut reply = vec![STATUS_FENCED];
            reply.extend_from_slice(&block.to_le_bytes());
            reply.extend_from_slice(&presented.to_le_bytes());
            reply.extend_from_slice(&current.to_le_bytes());
            reply
        }
        ServeError::Io(e) => {
            tracing::debug!(%peer, error = %e, "KV server: connection ended");
            return;
        }
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let mut stream: Stream = match &shared.tls {
        None => Box::new(tcp),
        // The handshake shares the hello's deadline: a peer that stalls it costs nothing else.
        Some(acceptor) => match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Box::new(tls),
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "KV server: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "KV server: no TLS handshake within {HELLO_TIMEOUT:?}");
                return;
            }
        },
    };
    if let Err(e) = hello(&mut stream, &shared.secret).await {
        refuse(&mut stream, peer, e).await;
        return;
    }
    // One layer chunk at a time is staged here before it is copied under the block's fence.
    let mut staging = vec![0u8; shared.layout.layer_block_bytes()];
    loop {
        match serve_request(&mut stream, &shared, &mut staging).await {
            Ok(None) => return,
            Ok(Some(bytes)) => {
                shared.received.fetch_add(bytes, Ordering::Relaxed);
                let mut reply = [0u8; 9];
                reply[0] = STATUS_OK;
                reply[1..].copy_from_slice(&bytes.to_le_bytes());
                // Flushed: TLS holds what it encrypts until told to send it.
                if stream.write_all(&reply).await.is_err() || stream.flush().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                refuse(&mut stream, peer, e).await;
                return;
            }
        }
    }
}

/// Reads one request into the cache. `Ok(None)`: the peer closed between requests.
async fn serve_request(
    stream: &mut Stream,
    shared: &Shared,
    staging: &mut [u8],
) -> Result<Option<u64>, ServeError> {
    let layout = &shared.layout;
    let mut header = [0u8; HEADER_BYTES];
    let first = stream.read(&mut header).await?;
    if first == 0 {
        return Ok(None);
    }
    stream.read_exact(&mut header[first..]).await?;
    if header[..4] != MAGIC {
        return Err(ServeError::Frame(format!(
            "bad magic {:02x?}, expected {:02x?} (\"BKV2\")",
            &header[..4],
            MAGIC
        )));
    }
    let n_blocks = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    let block_bytes = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let generation = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if n_blocks > layout.num_blocks {
        return Err(ServeError::Frame(format!(
            "`n_blocks` {n_blocks} exceeds the cache's {} blocks",
            layout.num_blocks
        )));
    }
    if block_bytes != layout.block_bytes() as u64 {
        return Err(ServeError::Frame(format!(
            "`block_bytes` {block_bytes} differs from the layout's {}",
            layout.block_bytes()
        )));
    }
    let mut raw_ids = vec![0u8; 4 * n_blocks];
    stream.read_exact(&mut raw_ids).await?;
    let ids: Vec<usize> = raw_ids
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .collect();
    if let Some(&bad) = ids.iter().find(|&&id| id >= layout.num_blocks) {
        return Err(ServeError::Frame(format!(
            "block id {bad} is outside the cache of {} blocks",
            layout.num_blocks
        )));
    }
    // Refused before the payload: a writer whose claim ended learns it without sending it.
    if let Some(&stale) = ids
        .iter()
        .find(|&&id| !shared.fences.is_granted(id as u32, generation))
    {
        shared.fences.count_refused();
        return Err(ServeError::Fenced {
            block: stale as u32,
            presented: generation,
            current: 0,
        });
    }
    stream.write_all(&[STATUS_GO]).await?;
    stream.flush().await?;
    let mut refused = None;
    for &block in &ids {
        for layer in 0..layout.num_layers {
            stream.read_exact(staging).await?;
            if refused.is_some() {
                continue; // read to the end, so the writer hears the refusal
            }
            // The grant may have ended while the bytes travelled: taken again for each copy.
            match shared.fences.acquire(block as u32, generation) {
                Ok(_hold) => {
                    // SAFETY: `start` checked the layout against the memory, `block` and
                    // `layer` are in range (checked above), and the hold keeps the block ours
                    // for the copy (aliasing invariant, memory.rs).
                    let chunk = unsafe { layer_chunk_mut(&*shared.memory, layout, layer, block) };
                    chunk.copy_from_slice(staging);
                }
                Err(e) => refused = Some(ServeError::from(e)),
            }
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(Some(ids.len() as u64 * block_bytes)),
    }
}

/// The prefill worker's side: one kept-open connection, re-dialled once when it fails.
pub(crate) struct TcpWriter {
    addr: String,
    layout: KvLayout,
    secret: SinkSecret,
    tls: Option<tokio_rustls::TlsConnector>,
    /// `None` while disconnected — and while an exchange is in flight: the stream is taken out
    /// so a write cancelled mid-payload drops (closes) it, instead of leaving a half-sent frame
    /// for the next write to continue as if it were payload.
    conn: Mutex<Option<Stream>>,
}

impl TcpWriter {
    /// `tls`: speak TLS, verifying the server against that configuration's roots.
    pub(crate) async fn connect(
        addr: &str,
        layout: KvLayout,
        secret: SinkSecret,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<TcpWriter, TransferError> {
        let tls = tls.map(tokio_rustls::TlsConnector::from);
        let stream = dial(addr, &secret, tls.as_ref()).await?;
        Ok(TcpWriter {
            addr: addr.to_string(),
            layout,
            secret,
            tls,
            conn: Mutex::new(Some(stream)),
        })
    }

    async fn send(
        &self,
        conn: &mut Option<Stream>,
        generation: Generation,
        ids: &[u32],
        blocks: &[Vec<u8>],
    ) -> Result<u64, TransferError> {
        let mut retried = false;
        loop {
            let mut stream = match conn.take() {
                Some(stream) => stream,
                None => dial(&self.addr, &self.secret, self.tls.as_ref()).await?,
            };
            match exchange(&mut stream, &self.layout, generation, ids, blocks).await {
                Ok(bytes) => {
                    *conn = Some(stream);
                    return Ok(bytes);
                }
                Err(Exchange::Fenced(e)) => return Err(e),
                Err(Exchange::Refused(message)) => {
                    return Err(tcp_err(
                        &self.addr,
                        format!("the KV server refused the write: {message}"),
                    ));
                }
                // Rewriting the same bytes to the same blocks is harmless, so one retry on a
                // fresh connection covers a server that restarted or dropped an idle link.
                Err(Exchange::Io(e)) if !retried => {
                    tracing::debug!(addr = %self.addr, error = %e, "KV write failed; reconnecting");
                    retried = true;
                }
                Err(Exchange::Io(e)) => return Err(tcp_err(&self.addr, e)),
            }
        }
    }
}

/// Connects (and, with `tls`, shakes hands, checking the server's certificate for the address
/// dialled) and says hello with the sink's secret.
async fn dial(
    addr: &str,
    secret: &SinkSecret,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Stream, TransferError> {
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| tcp_err(addr, format!("resolve: {e}")))?
        .next()
        .ok_or_else(|| tcp_err(addr, "resolves to no address"))?;
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| tcp_err(addr, format!("socket: {e}")))?;
    socket
        .set_send_buffer_size(SOCKET_BUFFER)
        .map_err(|e| tcp_err(addr, format!("SO_SNDBUF: {e}")))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| tcp_err(addr, format!("connect timed out after {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| tcp_err(addr, format!("connect: {e}")))?;
    // The header is small and the reply tiny: neither may wait on Nagle or a delayed ACK.
    stream
        .set_nodelay(true)
        .map_err(|e| tcp_err(addr, format!("TCP_NODELAY: {e}")))?;
    let mut stream: Stream = match tls {
        None => Box::new(stream),
        Some(connector) => {
            let name = rustls::pki_types::ServerName::from(target.ip());
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream))
                .await
                .map_err(|_| tcp_err(addr, "TLS handshake timed out"))?
                .map_err(|e| tcp_err(addr, format!("TLS handshake: {e}")))?;
            Box::new(tls)
        }
    };
    let mut hello = HELLO_MAGIC.to_vec();
    hello.extend_from_slice(secret.as_bytes());
    stream
        .write_all(&hello)
        .await
        .map_err(|e| tcp_err(addr, format!("hello: {e}")))?;
    // TLS buffers what it encrypts: the hello must leave now, not with the first request.
    stream
        .flush()
        .await
        .map_err(|e| tcp_err(addr, format!("hello: {e}")))?;
    Ok(stream)
}

enum Exchange {
    Refused(String),
    Fenced(TransferError),
    Io(io::Error),
}

impl From<io::Error> for Exchange {
    fn from(e: io::Error) -> Self {
        Exchange::Io(e)
    }
}

async fn exchange(
    stream: &mut Stream,
    layout: &KvLayout,
    generation: Generation,
    ids: &[u32],
    blocks: &[Vec<u8>],
) -> Result<u64, Exchange> {
    let mut header = Vec::with_capacity(HEADER_BYTES + 4 * ids.len());
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    header.extend_from_slice(&(layout.block_bytes() as u64).to_le_bytes());
    header.extend_from_slice(&generation.to_le_bytes());
    for id in ids {
        header.extend_from_slice(&id.to_le_bytes());
    }
    stream.write_all(&header).await?;
    stream.flush().await?;
    let status = stream.read_u8().await?;
    if status == STATUS_GO {
        // Each block straight from the caller's buffer: the kernel's copy is the only one.
        for block in blocks {
            stream.write_all(block).await?;
        }
        stream.flush().await?;
        let status = stream.read_u8().await?;
        return reply(stream, status).await;
    }
    reply(stream, status).await
}

/// The rest of a reply whose status byte was `status`.
async fn reply(stream: &mut Stream, status: u8) -> Result<u64, Exchange> {
    match status {
        STATUS_OK => Ok(stream.read_u64_le().await?),
        STATUS_FENCED => {
            let block = stream.read_u32_le().await?;
            let presented = stream.read_u64_le().await?;
            let current = stream.read_u64_le().await?;
            Err(Exchange::Fenced(TransferError::Fenced {
                block,
                presented,
                current,
            }))
        }
        STATUS_ERR => {
            let len = stream.read_u32_le().await?;
            if len > MAX_ERROR_LEN {
                return Err(Exchange::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("error reply of {len} bytes"),
                )));
            }
            let mut message = vec![0u8; len as usize];
            stream.read_exact(&mut message).await?;
            Err(Exchange::Refused(
                String::from_utf8_lossy(&message).into_owned(),
            ))
        }
        other => Err(Exchange::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply status {other} from something that is not a Baton KV server"),
        ))),
    }
}

#[async_trait]
impl KvTransfer for TcpWriter {
    fn backend(&self) -> TransferBackend {
        TransferBackend::Tcp
    }

    async fn write_blocks(
        &self,
        generation: Generation,
        dst_blocks: &[u32],
        blocks: &[Vec<u8>],
    ) -> Result<u64, TransferError> {
        self.layout.check_write(dst_blocks, blocks)?;
        // One writer's requests go in order on its connection.
        let mut conn = self.conn.lock().await;
        let mut written = 0;
        // The server takes at most `num_blocks` ids per request (so a garbage count cannot
        // make it allocate); longer writes go as several requests.
        let per_request = self.layout.num_blocks.max(1);
        for (ids, data) in dst_blocks
            .chunks(per_request)
            .zip(blocks.chunks(per_request))
        {
            written += self.send(&mut conn, generation, ids, data).await?;
        }
        Ok(written)
    }
}
