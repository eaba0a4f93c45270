//! `baton serve`: the whole graph in one process — frontend, processor and router, and
//! `--workers` engine workers over one copy of the weights — on in-process planes, started by
//! the same component functions `baton run` uses (`components`). With
//! `-f CONFIG` the seed's YAML shape supplies what flags do not; when it (or the flags, or
//! `NATS_SERVER` + `ETCD_ENDPOINTS`) names NATS and etcd, each component runs as its own
//! process instead (`graph`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use decode_worker::{DisaggConfig, DisaggThresholds};
use engine::mock::{GpuSpec, MockModel, Roofline, CALIBRATED_EFFICIENCY};
use engine::{parse_device, resolve_kind, EngineOptions, ModelCard};
use kv_transfer::{BackendChoice, TransferBackend};
use processor::{ChatTemplate, ServedModel};
use router::{KvCostConfig, KvMode, RouterOptions};
use runtime::{PlaneSettings, Planes};

use crate::components;
use crate::config::GraphConfig;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Graph config in the seed's YAML shape (`Frontend:`, `Processor:`, `VllmWorker:`, `Baton:`).
    #[arg(short = 'f', long = "config", env = "BATON_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "BATON_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// HTTP port [default: `Frontend.port`, else 8000]; 0 picks a free one.
    #[arg(long, env = "BATON_PORT")]
    port: Option<u16>,
    /// A GGUF file, a Hugging Face folder, or `smollm2` [default: `Baton.model`, else
    /// `VllmWorker.model`, else smollm2].
    #[arg(long, env = "BATON_MODEL")]
    model: Option<String>,
    /// The name clients send as `model` [default: `Frontend.served_model_name`, else the model].
    #[arg(long, env = "BATON_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on every route but /health and /live.
    #[arg(long, env = "BATON_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, env = "BATON_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Requests in flight at once; more wait in the admission queue (--max-queued).
    #[arg(long, env = "BATON_MAX_INFLIGHT", default_value_t = 1024)]
    pub max_inflight: usize,
    /// Requests waiting for a slot of --max-inflight, served first in, first out; past it a
    /// request gets 503 at once, with a Retry-After from how fast slots free. 0: no queue.
    #[arg(long, env = "BATON_MAX_QUEUED", default_value_t = 1024)]
    pub max_queued: usize,
    /// Seconds a request waits in the admission queue before a 503.
    #[arg(long, env = "BATON_QUEUE_TIMEOUT", value_name = "SECONDS", default_value = "60",
          value_parser = positive_seconds, allow_hyphen_values = true)]
    pub queue_timeout: Duration,
    /// Seconds to receive a request's headers, and then its body: a slower client is cut
    /// (408 when its body is late). Serving the request is not bounded by it.
    #[arg(long, env = "BATON_REQUEST_TIMEOUT", value_name = "SECONDS", default_value = "30",
          value_parser = positive_seconds, allow_hyphen_values = true)]
    pub request_timeout: Duration,
    /// Engine workers in this process [default: `VllmWorker.ServiceArgs.workers`, else 1]; 0
    /// serves the frontend alone (it answers 503 until a worker registers).
    #[arg(long, env = "BATON_WORKERS")]
    workers: Option<usize>,
    /// Routing policy: round-robin, random, least-loaded, power-of-two or kv [default:
    /// `Router.router`, else `Processor.router`, else round-robin].
    #[arg(long, env = "BATON_ROUTER")]
    router: Option<String>,
    /// KV router: prefill blocks one cached block saves [default: `Router.kv-overlap-credit`,
    /// else 1].
    #[arg(long, env = "BATON_KV_OVERLAP_CREDIT")]
    kv_overlap_credit: Option<f64>,
    /// KV router: weight of the prefill term against the decode term [default:
    /// `Router.kv-prefill-load-scale`, else 1].
    #[arg(long, env = "BATON_KV_PREFILL_LOAD_SCALE")]
    kv_prefill_load_scale: Option<f64>,
    /// KV router: 0 always picks the cheapest worker; higher draws among near-cheapest ones
    /// [default: `Router.router-temperature`, else 0].
    #[arg(long, env = "BATON_ROUTER_TEMPERATURE")]
    router_temperature: Option<f64>,
    /// KV router: weight of the load of its recent decisions, so traffic paced one request at
    /// a time still spreads (0.1 keeps long conversations on their worker) [default:
    /// `Router.kv-recent-load-weight`, else 0: Dynamo's cost].
    #[arg(long, env = "BATON_KV_RECENT_LOAD_WEIGHT")]
    kv_recent_load_weight: Option<f64>,
    /// Learn the workers' caches from the router's own decisions (each kept
    /// `--kv-approx-ttl` seconds) instead of their KV events, for engines that publish none.
    #[arg(long, env = "BATON_NO_KV_EVENTS")]
    no_kv_events: bool,
    #[arg(long, env = "BATON_KV_APPROX_TTL")]
    kv_approx_ttl: Option<u64>,
    /// Times a stream whose worker dies mid-generation moves to another worker with the
    /// tokens so far [default: `Router.migration-limit`, else 0: it ends with an error].
    #[arg(long, env = "BATON_MIGRATION_LIMIT")]
    migration_limit: Option<u32>,
    /// Requests wait until this many workers registered [default: `Router.min-workers`,
    /// else 0: with none, 503 at once].
    #[arg(long, env = "BATON_MIN_WORKERS")]
    min_workers: Option<usize>,
    /// Seconds a request waits for `--min-workers` before a 503 [default:
    /// `Router.min-workers-wait`, else 30].
    #[arg(long, env = "BATON_MIN_WORKERS_WAIT")]
    min_workers_wait: Option<u64>,
    /// Compute dtype: auto (bf16 on CUDA and on CPUs with AVX-512-BF16 or AMX, else f32),
    /// bf16, f16 or f32 [default: `Baton.dtype`, else auto].
    #[arg(long, env = "BATON_DTYPE")]
    dtype: Option<String>,
    /// `model` runs the weights; `mock` simulates `--mock-model` on `--tensor-parallel-size`
    /// `--mock-gpu`s behind the real scheduler, with `--model`'s tokenizer [default:
    /// `Baton.executor`, else model].
    #[arg(long, env = "BATON_EXECUTOR")]
    executor: Option<String>,
    /// h100 or h200 [default: `Baton.mock-gpu`, else h100].
    #[arg(long, env = "BATON_MOCK_GPU")]
    mock_gpu: Option<String>,
    /// [default: `Baton.mock-model`, else deepseek-r1-distill-llama-70b].
    #[arg(long, env = "BATON_MOCK_MODEL")]
    mock_model: Option<String>,
    /// GPUs per simulated worker [default: `VllmWorker.tensor-parallel-size`, else 1].
    #[arg(long, env = "BATON_TENSOR_PARALLEL_SIZE")]
    tensor_parallel_size: Option<usize>,
    /// Divides the mock's step sleeps; `inf`: no sleeping [default: `Baton.mock-speedup`, else 1].
    #[arg(long, env = "BATON_MOCK_SPEEDUP")]
    mock_speedup: Option<f64>,
    /// GB/s of the simulated KV link from prefill to decode workers [default:
    /// `Baton.mock-kv-link-gbs`, else the `--mock-gpu`'s NVLink, 450; a NIC's rate across nodes].
    #[arg(long, env = "BATON_MOCK_KV_LINK_GBS")]
    mock_kv_link_gbs: Option<f64>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "BATON_DEVICE")]
    device: Option<String>,
    /// KV cache size in blocks [default: what fits in --kv-cache-mib].
    #[arg(long, env = "BATON_NUM_KV_BLOCKS")]
    num_kv_blocks: Option<usize>,
    #[arg(long, env = "BATON_KV_CACHE_MIB", default_value_t = 1024)]
    kv_cache_mib: usize,
    /// Tokens per KV block [default: `VllmWorker.block-size`, else 128].
    #[arg(long, env = "BATON_BLOCK_SIZE")]
    block_size: Option<usize>,
    #[arg(long, env = "BATON_MAX_NUM_SEQS")]
    max_num_seqs: Option<usize>,
    #[arg(long, env = "BATON_MAX_NUM_BATCHED_TOKENS")]
    max_num_batched_tokens: Option<usize>,
    /// Decode first: while streams decode, prompts prefill at most this many tokens per step,
    /// so a long prompt delays each running stream's next token by one such chunk instead of
    /// a whole `--max-num-batched-tokens`; 0 gives prefill the whole budget (vLLM's default).
    #[arg(
        long,
        env = "BATON_PREFILL_CHUNK_WHILE_DECODING",
        default_value_t = 512
    )]
    prefill_chunk_while_decoding: usize,
    /// Caps the model's context (prompt + output).
    #[arg(long, env = "BATON_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    #[arg(long, env = "BATON_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    /// Steps on CPU through Baton's own kernels (long prompt chunks keep libtorch's GEMMs, with
    /// the kernels' fused element-wise pieces and, with AMX, their tile attention); `false` runs
    /// every step as libtorch ops (to compare, or if the kernels misbehave on some CPU).
    #[arg(long, env = "BATON_CPU_KERNELS", default_value_t = true, action = clap::ArgAction::Set)]
    cpu_kernels: bool,
    /// Seconds Ctrl-C waits for in-flight requests before ending them with an error.
    #[arg(long, env = "BATON_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Seconds a response may stay silent before the frontend gives up on its worker (a dead
    /// worker is noticed sooner, when its discovery lease ends) [default: `Baton.stream-timeout`,
    /// else 600].
    #[arg(long, env = "BATON_STREAM_TIMEOUT")]
    stream_timeout: Option<u64>,
    /// NATS server URL; with etcd, components run as separate processes [default:
    /// `Baton.nats-server`].
    #[arg(long, env = "NATS_SERVER")]
    nats_server: Option<String>,
    /// etcd endpoints, comma-separated [default: `Baton.etcd-endpoints`].
    #[arg(long, env = "ETCD_ENDPOINTS")]
    etcd_endpoints: Option<String>,
    /// Namespace of discovery keys and subjects [default: `Baton.namespace`, else baton].
    #[arg(long, env = "BATON_NAMESPACE")]
    namespace: Option<String>,
    /// Discovery lease TTL in seconds [default: `Baton.lease-ttl`, else 10].
    #[arg(long, env = "BATON_LEASE_TTL")]
    lease_ttl: Option<u64>,
    /// Disaggregate: decode workers may send prefills to prefill workers [default:
    /// `VllmWorker.remote-prefill`, else false].
    #[arg(long, env = "BATON_REMOTE_PREFILL")]
    remote_prefill: Option<bool>,
    /// Only prompts whose uncached part exceeds --max-local-prefill-length go remote, while the
    /// queue is shorter than --max-prefill-queue-size; false sends every prefill remote
    /// [default: `VllmWorker.conditional-disagg`, else true].
    #[arg(long, env = "BATON_CONDITIONAL_DISAGG")]
    conditional_disagg: Option<bool>,
    /// [default: `VllmWorker.max-local-prefill-length`, else 1000]; changes at run time through
    /// `POST /admin/disagg`.
    #[arg(long, env = "BATON_MAX_LOCAL_PREFILL_LENGTH")]
    max_local_prefill_length: Option<usize>,
    /// [default: `VllmWorker.max-prefill-queue-size`, else 2]; changes at run time as above.
    #[arg(long, env = "BATON_MAX_PREFILL_QUEUE_SIZE")]
    max_prefill_queue_size: Option<usize>,
    /// Seconds a decode worker waits for a prefill worker to claim a job, and then to finish
    /// it, before prefilling locally [default: `Baton.remote-prefill-timeout`, else 30].
    #[arg(long, env = "BATON_REMOTE_PREFILL_TIMEOUT")]
    remote_prefill_timeout: Option<f64>,
    /// Prefill workers [default: `PrefillWorker.ServiceArgs.workers`, else 1 when
    /// disaggregating].
    #[arg(long, env = "BATON_PREFILL_WORKERS")]
    prefill_workers: Option<usize>,
    /// Each prefill worker's KV cache (its own prefix cache and the prompt in flight).
    #[arg(long, env = "BATON_PREFILL_KV_CACHE_MIB", default_value_t = 256)]
    prefill_kv_cache_mib: usize,
    /// How KV reaches decode workers: auto (in-process copy in `baton serve`; shared memory on
    /// one host, else TCP, with NATS/etcd), memory, shm or tcp [default: `Baton.kv-transfer`].
    #[arg(long, env = "BATON_KV_TRANSFER")]
    kv_transfer: Option<String>,
    /// Address a decode worker's KV server binds and advertises for TCP transfers [default:
    /// `Baton.kv-host`, else this host's address on the route to NATS — 127.0.0.1 when NATS
    /// is local or unset].
    #[arg(long, env = "BATON_KV_HOST")]
    kv_host: Option<IpAddr>,
    /// PEM certificate chain for a decode worker's KV server: TCP transfers then use TLS (the
    /// certificate must name the address it advertises); with --kv-tls-key.
    #[arg(long, env = "BATON_KV_TLS_CERT", requires = "kv_tls_key")]
    kv_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --kv-tls-cert.
    #[arg(long, env = "BATON_KV_TLS_KEY", requires = "kv_tls_cert")]
    kv_tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates a prefill worker trusts for decode workers' TLS KV servers; a
    /// prefill worker given it writes only over TLS.
    #[arg(long, env = "BATON_KV_TLS_CA")]
    kv_tls_ca: Option<std::path::PathBuf>,
}

/// A flag's seconds: positive and finite (fractions allowed), refused as the flags are parsed,
/// before anything is loaded.
fn positive_seconds(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("must be a positive number of seconds, not {value}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{value} seconds: {e}"))
}

impl Resolved {
    pub fn plane_settings(&self) -> PlaneSettings {
        PlaneSettings {
            stream_timeout: self.stream_timeout,
            lease_ttl: self.lease_ttl,
            ..PlaneSettings::new(&self.namespace, &self.served_model_name)
        }
    }
}

/// Settings after flags, config and defaults are merged (flags win).
pub(crate) struct Resolved {
    pub model: String,
    pub served_model_name: String,
    pub port: u16,
    pub workers: usize,
    pub policy: String,
    pub router: RouterOptions,
    pub kv_cost: KvCostConfig,
    pub engine: EngineOptions,
    pub namespace: String,
    /// Set when both are known: the graph runs distributed.
    pub nats: Option<String>,
    pub etcd: Option<Vec<String>>,
    pub lease_ttl: Duration,
    pub stream_timeout: Duration,
    pub disagg: DisaggConfig,
    pub prefill_workers: usize,
    /// The prefill workers' engines (`PrefillWorker:` keys over the decode workers' options).
    pub prefill_engine: EngineOptions,
    pub kv_transfer: BackendChoice,
    pub kv_host: IpAddr,
    /// TLS for the decode worker's KV server (`--kv-tls-cert`/`--kv-tls-key`), and what a
    /// prefill worker verifies it with (`--kv-tls-ca`); read and checked before any weight.
    pub kv_tls_server: Option<Arc<kv_transfer::tls::ServerConfig>>,
    pub kv_tls_client: Option<Arc<kv_transfer::tls::ClientConfig>>,
    /// Set with `--executor mock`.
    pub mock: Option<MockGraph>,
}

/// What `--executor mock` simulates.
#[derive(Clone, Debug)]
pub struct MockGraph {
    /// The decode workers' model, GPUs and tensor parallelism.
    pub roofline: Roofline,
    /// Divides every sleep (infinite: none).
    pub speedup: f64,
    /// GPUs per prefill worker (`PrefillWorker.tensor-parallel-size`, else 1).
    pub prefill_tensor_parallel: usize,
    /// The KV link's bytes/s, already multiplied by `speedup`.
    pub kv_link_bytes_per_s: f64,
}

impl MockGraph {
    /// The prefill workers' roofline: the same model and GPUs on their own parallelism.
    pub fn prefill_roofline(&self) -> Roofline {
        Roofline {
            tensor_parallel: self.prefill_tensor_parallel,
            ..self.roofline.clone()
        }
    }
}

impl Resolved {
    /// The KV endpoints a decode worker opens.
    pub fn sink_backends(&self) -> Vec<TransferBackend> {
        match self.kv_transfer {
            BackendChoice::Only(b) => vec![b],
            BackendChoice::Auto if self.nats.is_some() => {
                vec![TransferBackend::Shm, TransferBackend::Tcp]
            }
            BackendChoice::Auto => vec![TransferBackend::Memory],
        }
    }
}

fn resolve(args: &ServeArgs, config: &GraphConfig) -> Result<Resolved> {
    let nats = args
        .nats_server
        .clone()
        .or(config.baton.as_ref().and_then(|b| b.nats_server.clone()))
        .filter(|s| !s.is_empty());
    let etcd = args
        .etcd_endpoints
        .clone()
        .or(config.baton.as_ref().and_then(|b| b.etcd_endpoints.clone()))
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split(',')
                .map(|e| e.trim().to_string())
                .collect::<Vec<_>>()
        });
    let baton = config.baton.clone().unwrap_or_default();
    let worker = config.vllm_worker.clone().unwrap_or_default();
    let prefill_section = config.prefill_worker.clone().unwrap_or_default();
    let processor = config.processor.clone().unwrap_or_default();
    let router_section = config.router.clone().unwrap_or_default();
    let frontend = config.frontend.clone().unwrap_or_default();
    let model = args
        .model
        .clone()
        .or(baton.model)
        .or(worker.model.clone())
        .unwrap_or_else(|| "smollm2".to_string());
    let served_model_name = args
        .served_model_name
        .clone()
        .or(frontend.served_model_name)
        .unwrap_or_else(|| model.clone());
    let dtype = args.dtype.clone().or(baton.dtype).unwrap_or("auto".into());
    let device = parse_device(&args.device.clone().or(baton.device).unwrap_or("cpu".into()))?;
    let (kind, why) = resolve_kind(&dtype, device)
        .with_context(|| format!("unknown `--dtype` {dtype:?} (use auto, bf16, f16 or f32)"))?;
    if let Some(why) = why {
        tracing::info!("dtype auto: {kind:?}, because {why}");
    }
    let defaults = EngineOptions::default();
    let engine = EngineOptions {
        kind,
        device,
        block_size: args
            .block_size
            .or(worker.block_size)
            .or(processor.block_size)
            .unwrap_or(defaults.block_size),
        num_blocks: args.num_kv_blocks.or(baton.num_kv_blocks),
        kv_cache_bytes: args.kv_cache_mib << 20,
        max_num_seqs: args
            .max_num_seqs
            .or(worker.max_num_seqs)
            .unwrap_or(defaults.max_num_seqs),
        max_num_batched_tokens: args
            .max_num_batched_tokens
            .or(worker.max_num_batched_tokens)
            .unwrap_or(defaults.max_num_batched_tokens),
        enable_prefix_caching: !args.no_prefix_caching
            && worker.enable_prefix_caching.unwrap_or(true),
        max_model_len: args
            .max_model_len
            .or(worker.max_model_len)
            .or(processor.max_model_len),
        cpu_kernels: args.cpu_kernels,
        prefill_chunk_while_decoding: args.prefill_chunk_while_decoding,
        kv_events: None,
    };
    let remote_prefill = args
        .remote_prefill
        .or(worker.remote_prefill)
        .unwrap_or(false);
    let d = DisaggConfig::default();
    let disagg = DisaggConfig {
        remote_prefill,
        conditional: args
            .conditional_disagg
            .or(worker.conditional_disagg)
            .unwrap_or(d.conditional),
        thresholds: DisaggThresholds {
            max_local_prefill_length: args
                .max_local_prefill_length
                .or(worker.max_local_prefill_length)
                .unwrap_or(d.thresholds.max_local_prefill_length),
            max_prefill_queue_size: args
                .max_prefill_queue_size
                .or(worker.max_prefill_queue_size)
                .unwrap_or(d.thresholds.max_prefill_queue_size),
        },
        remote_prefill_timeout: {
            let secs = args
                .remote_prefill_timeout
                .or(baton.remote_prefill_timeout)
                .unwrap_or(d.remote_prefill_timeout.as_secs_f64());
            if !(secs.is_finite() && secs > 0.0) {
                bail!(
                    "`--remote-prefill-timeout` must be a positive number of seconds, not {secs}"
                );
            }
            Duration::from_secs_f64(secs)
        },
    };
    let prefill_workers = if remote_prefill {
        args.prefill_workers
            .or(prefill_section
                .service_args
                .as_ref()
                .and_then(|s| s.workers))
            .unwrap_or(1)
    } else {
        0
    };
    // Flags apply to both kinds of worker; each config section to its own.
    let prefill_engine = EngineOptions {
        block_size: args
            .block_size
            .or(prefill_section.block_size)
            .unwrap_or(engine.block_size),
        num_blocks: None,
        kv_cache_bytes: args.prefill_kv_cache_mib << 20,
        max_num_seqs: args
            .max_num_seqs
            .or(prefill_section.max_num_seqs)
            .unwrap_or(engine.max_num_seqs),
        max_num_batched_tokens: args
            .max_num_batched_tokens
            .or(prefill_section.max_num_batched_tokens)
            .unwrap_or(engine.max_num_batched_tokens),
        max_model_len: args
            .max_model_len
            .or(prefill_section.max_model_len)
            .or(engine.max_model_len),
        kv_events: None,
        ..engine.clone()
    };
    let kv_transfer_name = args
        .kv_transfer
        .clone()
        .or(baton.kv_transfer.clone())
        .unwrap_or_else(|| "auto".into());
    let kv_transfer: BackendChoice = kv_transfer_name
        .parse()
        .map_err(|e| anyhow::anyhow!("`--kv-transfer` {kv_transfer_name:?}: {e}"))?;
    // Advertised to prefill workers, so by default the address that reaches NATS (where every
    // component meets): loopback when NATS is local or absent, the routable interface when
    // the graph spans hosts.
    let kv_host = args.kv_host.or(baton.kv_host).unwrap_or_else(|| {
        nats.as_deref()
            .and_then(kv_transfer::address_towards)
            .unwrap_or(IpAddr::from([127, 0, 0, 1]))
    });
    let kv_tls_server = match (&args.kv_tls_cert, &args.kv_tls_key) {
        (Some(cert), Some(key)) => Some(
            kv_transfer::tls::server_config(cert, key)
                .map_err(|e| anyhow::anyhow!("`--kv-tls-cert`/`--kv-tls-key`: {e}"))?,
        ),
        _ => None,
    };
    let kv_tls_client = args
        .kv_tls_ca
        .as_deref()
        .map(kv_transfer::tls::client_config)
        .transpose()
        .map_err(|e| anyhow::anyhow!("`--kv-tls-ca`: {e}"))?;
    let executor = args
        .executor
        .clone()
        .or(baton.executor.clone())
        .unwrap_or_else(|| "model".into());
    let mock = match executor.as_str() {
        "model" => None,
        "mock" => {
            let gpu_name = args
                .mock_gpu
                .clone()
                .or(baton.mock_gpu.clone())
                .unwrap_or_else(|| "h100".into());
            let gpu = GpuSpec::by_name(&gpu_name)
                .with_context(|| format!("unknown `--mock-gpu` {gpu_name:?} (use h100 or h200)"))?;
            let model_name = args
                .mock_model
                .clone()
                .or(baton.mock_model.clone())
                .unwrap_or_else(|| "deepseek-r1-distill-llama-70b".into());
            let model = MockModel::by_name(&model_name).with_context(|| {
                format!("unknown `--mock-model` {model_name:?} (use deepseek-r1-distill-llama-70b)")
            })?;
            let tp = args
                .tensor_parallel_size
                .or(worker.tensor_parallel_size)
                .unwrap_or(1);
            if tp == 0 {
                bail!("`--tensor-parallel-size` must be at least 1");
            }
            let speedup = args.mock_speedup.or(baton.mock_speedup).unwrap_or(1.0);
            if speedup.is_nan() || speedup <= 0.0 {
                bail!("`--mock-speedup` must be positive (or inf), not {speedup}");
            }
            let link_gbs = args
                .mock_kv_link_gbs
                .or(baton.mock_kv_link_gbs)
                .unwrap_or(gpu.nvlink_bytes_per_s / 1e9);
            if link_gbs.is_nan() || link_gbs <= 0.0 {
                bail!("`--mock-kv-link-gbs` must be positive, not {link_gbs}");
            }
            let prefill_tp = prefill_section.tensor_parallel_size.unwrap_or(1);
            if prefill_tp == 0 {
                bail!("`PrefillWorker.tensor-parallel-size` must be at least 1");
            }
            let roofline = Roofline {
                model,
                gpu: gpu.clone(),
                tensor_parallel: tp,
                efficiency: CALIBRATED_EFFICIENCY,
            };
            Some(MockGraph {
                roofline,
                speedup,
                prefill_tensor_parallel: prefill_tp,
                kv_link_bytes_per_s: link_gbs * 1e9 * speedup,
            })
        }
        other => bail!("unknown `--executor` {other:?} (use model or mock)"),
    };
    Ok(Resolved {
        mock,
        disagg,
        prefill_workers,
        prefill_engine,
        kv_transfer,
        kv_host,
        kv_tls_server,
        kv_tls_client,
        model,
        served_model_name,
        port: args.port.or(frontend.port).unwrap_or(8000),
        workers: args
            .workers
            .or(worker.service_args.and_then(|s| s.workers))
            .unwrap_or(1),
        policy: args
            .router
            .clone()
            .or(router_section.router.clone())
            .or(processor.router)
            .unwrap_or_else(|| "round-robin".to_string()),
        router: RouterOptions {
            block_size: engine.block_size,
            migration_limit: args
                .migration_limit
                .or(router_section.migration_limit)
                .unwrap_or(0),
            min_workers: args.min_workers.or(router_section.min_workers).unwrap_or(0),
            min_workers_wait: Duration::from_secs(
                args.min_workers_wait
                    .or(router_section.min_workers_wait)
                    .unwrap_or(30),
            ),
            kv_mode: if args.no_kv_events || router_section.no_kv_events == Some(true) {
                KvMode::Approximate {
                    ttl: Duration::from_secs(
                        args.kv_approx_ttl
                            .or(router_section.kv_approx_ttl)
                            .unwrap_or(120),
                    ),
                }
            } else {
                KvMode::Events
            },
            ..RouterOptions::default()
        },
        kv_cost: {
            let d = KvCostConfig::default();
            let kv = KvCostConfig {
                prefill_load_scale: args
                    .kv_prefill_load_scale
                    .or(router_section.kv_prefill_load_scale)
                    .unwrap_or(d.prefill_load_scale),
                overlap_credit: args
                    .kv_overlap_credit
                    .or(router_section.kv_overlap_credit)
                    .unwrap_or(d.overlap_credit),
                temperature: args
                    .router_temperature
                    .or(router_section.router_temperature)
                    .unwrap_or(d.temperature),
                recent_load_weight: args
                    .kv_recent_load_weight
                    .or(router_section.kv_recent_load_weight)
                    .unwrap_or(d.recent_load_weight),
            };
            kv.check()?;
            kv
        },
        engine,
        namespace: args
            .namespace
            .clone()
            .or(baton.namespace)
            .unwrap_or_else(|| "baton".to_string()),
        nats,
        etcd,
        lease_ttl: Duration::from_secs(args.lease_ttl.or(baton.lease_ttl).unwrap_or(10).max(1)),
        stream_timeout: Duration::from_secs(
            args.stream_timeout.or(baton.stream_timeout).unwrap_or(600),
        ),
    })
}

/// Reads `-f CONFIG` (warning about unknown keys) and merges it with the flags.
pub(crate) fn settings(args: &ServeArgs) -> Result<Resolved> {
    let config = match &args.config {
        Some(path) => {
            let (config, warnings) = GraphConfig::load(path)?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            config
        }
        None => GraphConfig::default(),
    };
    resolve(args, &config)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let settings = settings(&args)?;
    if settings.nats.is_some() && settings.etcd.is_some() {
        return tokio_rt.block_on(crate::graph::run(&settings));
    }
    tokio_rt.block_on(serve(args, settings))
}

/// The whole graph in this process: in-process planes, `--workers` decode workers over one
/// copy of the weights, and the frontend.
async fn serve(args: ServeArgs, settings: Resolved) -> Result<()> {
    let planes = Planes::in_process(settings.plane_settings());
    let mut workers = Vec::new();
    let mut prefill_workers = Vec::new();
    let card = if settings.mock.is_some() {
        // Simulated workers need only the tokenizer's card.
        let card = components::load_card(&settings).await?;
        for i in 0..settings.workers {
            workers.push(components::mock_decode_worker(&planes, &settings, &card, i).await?);
        }
        for i in 0..settings.prefill_workers {
            prefill_workers
                .push(components::mock_prefill_worker(&planes, &settings, &card, i).await?);
        }
        card
    } else if settings.workers == 0 && settings.prefill_workers == 0 {
        components::load_card(&settings).await?
    } else {
        let model = components::load_model(&settings).await?;
        for i in 0..settings.workers {
            workers.push(components::decode_worker(&planes, &settings, &model, i).await?);
        }
        for i in 0..settings.prefill_workers {
            prefill_workers.push(components::prefill_worker(&planes, &settings, &model, i).await?);
        }
        model.card(&settings.engine)
    };
    // An engine thread that dies takes the process down (non-zero): in one process there is
    // no other worker of the graph to restart, so a supervisor must.
    let engine_died = async {
        if workers.is_empty() {
            return std::future::pending().await;
        }
        futures::future::select_all(workers.iter().map(|w| Box::pin(w.failed())))
            .await
            .0
    };
    tokio::select! {
        served = components::frontend(&planes, &args, &settings, &card) => served?,
        reason = engine_died => anyhow::bail!("a decode worker's engine died: {reason}"),
    }
    for worker in workers {
        worker.stop();
    }
    for worker in prefill_workers {
        worker.stop();
    }
    eprintln!("baton: stopped");
    Ok(())
}

pub(crate) fn served_model(card: &ModelCard, name: &str) -> Result<ServedModel> {
    let token = |id: Option<u32>| id.and_then(|i| card.tokenizer.id_to_token(i));
    let chat_template = card
        .chat_template
        .as_deref()
        .map(|t| {
            ChatTemplate::new(
                t,
                token(card.bos_token_id),
                token(card.eos_token_ids.first().copied()),
            )
        })
        .transpose()?;
    Ok(ServedModel {
        name: name.to_string(),
        tokenizer: Arc::new(card.tokenizer.clone()),
        chat_template,
        eos_token_ids: card.eos_token_ids.clone(),
        add_bos_token: card.add_bos_token,
        max_context: card.max_context,
        vocab_size: card.tokenizer.get_vocab_size(true),
    })
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
