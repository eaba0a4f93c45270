//! Graph configs in the seed's YAML shape (DESIGN.md §7): `Frontend`, `Processor`, `Router`,
//! `VllmWorker`, `PrefillWorker`, plus Baton's own `Baton` section. Keys are accepted as the
//! seed writes them (kebab-case for workers); an unknown key is a warning, a wrongly typed one
//! an error that names it.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config `{path}`: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config `{path}` is not valid YAML: {reason}")]
    Yaml { path: String, reason: String },
    #[error("config `{path}`: key `{key}` is invalid: {reason}")]
    Key {
        path: String,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GraphConfig {
    pub frontend: Option<FrontendSection>,
    pub processor: Option<ProcessorSection>,
    pub router: Option<RouterSection>,
    pub vllm_worker: Option<WorkerSection>,
    pub prefill_worker: Option<WorkerSection>,
    pub baton: Option<BatonSection>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FrontendSection {
    pub served_model_name: Option<String>,
    /// Dynamo's internal route (`dynamo.Processor.chat/completions`); Baton serves the
    /// OpenAI routes directly, so it is read and ignored.
    pub endpoint: Option<String>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProcessorSection {
    pub model: Option<String>,
    /// Routing policy name (`round-robin`, `random`, `kv`).
    pub router: Option<String>,
    pub block_size: Option<usize>,
    pub max_model_len: Option<usize>,
}

/// The router's knobs (`Router:`); the seed writes `model-name` and `min-workers`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RouterSection {
    /// The model the router serves; Baton routes for the served model, so it is read only.
    pub model_name: Option<String>,
    /// Requests wait (bounded by `min-workers-wait`) until this many workers registered.
    pub min_workers: Option<usize>,
    /// Seconds a request waits for `min-workers` before a 503.
    pub min_workers_wait: Option<u64>,
    /// Routing policy, as `Processor.router`.
    pub router: Option<String>,
    pub kv_overlap_credit: Option<f64>,
    pub kv_prefill_load_scale: Option<f64>,
    pub router_temperature: Option<f64>,
    pub kv_recent_load_weight: Option<f64>,
    /// Learn the workers' caches from the router's own decisions instead of KV events.
    pub no_kv_events: Option<bool>,
    /// Seconds the approximate index remembers a decision.
    pub kv_approx_ttl: Option<u64>,
    pub migration_limit: Option<u32>,
}

/// A worker section; the disaggregation keys are read now and used by later components.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WorkerSection {
    pub model: Option<String>,
    pub kv_transfer_config: Option<String>,
    pub block_size: Option<usize>,
    pub max_model_len: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub remote_prefill: Option<bool>,
    pub conditional_disagg: Option<bool>,
    pub max_local_prefill_length: Option<usize>,
    pub max_prefill_queue_size: Option<usize>,
    pub tensor_parallel_size: Option<usize>,
    pub enable_prefix_caching: Option<bool>,
    pub router: Option<String>,
    #[serde(rename = "ServiceArgs")]
    pub service_args: Option<ServiceArgs>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServiceArgs {
    pub workers: Option<usize>,
    pub resources: Option<serde_yaml::Value>,
}

/// Baton's own keys: what runs the graph here rather than what the seed describes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BatonSection {
    /// Overrides the workers' `model` (e.g. `smollm2` to run a seed config on CPU).
    pub model: Option<String>,
    pub namespace: Option<String>,
    pub dtype: Option<String>,
    /// `model` (the default) or `mock`: a simulated model on simulated GPUs.
    pub executor: Option<String>,
    /// The mock's GPU: `h100` or `h200`.
    pub mock_gpu: Option<String>,
    /// The mock's model shape (`deepseek-r1-distill-llama-70b`).
    pub mock_model: Option<String>,
    /// Divides the mock's sleeps; `inf` makes steps take no time.
    pub mock_speedup: Option<f64>,
    /// GB/s of the mock's KV link from prefill to decode workers (default: the GPU's NVLink;
    /// a NIC's rate for workers on different nodes).
    pub mock_kv_link_gbs: Option<f64>,
    pub device: Option<String>,
    /// NATS URL (`nats://127.0.0.1:4222`); with `etcd-endpoints`, `baton serve` runs each
    /// component as its own process. `NATS_SERVER` / `--nats-server` win over it.
    pub nats_server: Option<String>,
    /// Comma-separated etcd URLs; `ETCD_ENDPOINTS` / `--etcd-endpoints` win over it.
    pub etcd_endpoints: Option<String>,
    /// Discovery lease TTL in seconds (default 10).
    pub lease_ttl: Option<u64>,
    /// Seconds a response stream may stay silent before the caller fails it.
    pub stream_timeout: Option<u64>,
    /// KV cache size in blocks per worker.
    pub num_kv_blocks: Option<usize>,
    /// Seconds a decode worker waits for a prefill worker (to claim, then to finish) before
    /// prefilling itself.
    pub remote_prefill_timeout: Option<f64>,
    /// KV transfer backend: auto, memory, shm or tcp (cuda with the `cuda` feature).
    pub kv_transfer: Option<String>,
    /// Address decode workers' KV servers bind and advertise for TCP transfers.
    pub kv_host: Option<std::net::IpAddr>,
}

impl GraphConfig {
    /// Reads `path`; returns the config and a warning per unknown key.
    pub fn load(path: &Path) -> Result<(Self, Vec<String>), ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: name.clone(),
            source,
        })?;
        Self::parse(&text, &name)
    }

    pub fn parse(text: &str, name: &str) -> Result<(Self, Vec<String>), ConfigError> {
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml {
                path: name.to_string(),
                reason: e.to_string(),
            })?;
        if value.is_null() {
            return Ok((Self::default(), Vec::new()));
        }
        let mut unknown = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
        let config = serde_ignored::deserialize(deserializer, |path| {
            // `?` marks an `Option` level in serde_ignored's path; users never wrote it.
            let key = path.to_string().replace(".?", "");
            unknown.push(format!("config `{name}`: unknown key `{key}` is ignored"))
        })
        .map_err(|e: serde_yaml::Error| ConfigError::Key {
            path: name.to_string(),
            key: track.path().to_string(),
            reason: e.to_string(),
        })?;
        Ok((config, unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
Frontend:
  served_model_name: neuralmagic/DeepSeek-R1-Distill-Llama-70B-FP8-dynamic
  endpoint: dynamo.Processor.chat/completions
  port: 8000
Processor:
  model: neuralmagic/DeepSeek-R1-Distill-Llama-70B-FP8-dynamic
  router: round-robin
VllmWorker:
  model: neuralmagic/DeepSeek-R1-Distill-Llama-70B-FP8-dynamic
  kv-transfer-config: '{"kv_connector":"DynamoNixlConnector"}'
  block-size: 128
  max-model-len: 16384
  remote-prefill: true
  conditional-disagg: true
  max-local-prefill-length: 10
  max-prefill-queue-size: 2
  tensor-parallel-size: 4
  ServiceArgs:
    workers: 1
    resources:
      gpu: 4
"#;

    #[test]
    fn seed_config_parses_without_warnings() {
        let (c, warnings) = GraphConfig::parse(SEED, "disagg.yaml").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let f = c.frontend.unwrap();
        assert_eq!(f.port, Some(8000));
        let w = c.vllm_worker.unwrap();
        assert_eq!(w.max_local_prefill_length, Some(10));
        assert_eq!(w.service_args.unwrap().workers, Some(1));
        assert_eq!(c.processor.unwrap().router.as_deref(), Some("round-robin"));
    }

    #[test]
    fn router_section_is_typed() {
        let (c, warnings) = GraphConfig::parse(
            "Router:\n  model-name: m\n  min-workers: 2\n  kv-overlap-credit: 0.5\n  migration-limit: 1\n",
            "x",
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let r = c.router.unwrap();
        assert_eq!(r.min_workers, Some(2));
        assert_eq!(r.kv_overlap_credit, Some(0.5));
        assert_eq!(r.migration_limit, Some(1));
        let e = GraphConfig::parse("Router:\n  min-workers: many\n", "x").unwrap_err();
        assert!(e.to_string().contains("Router.min-workers"), "{e}");
    }

    #[test]
    fn unknown_keys_warn_and_wrong_types_name_the_key() {
        let (_, warnings) =
            GraphConfig::parse("Frontend:\n  port: 1\n  colour: red\nExtra: 1\n", "x").unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings.iter().any(|w| w.contains("Frontend.colour")),
            "{warnings:?}"
        );
        let e = GraphConfig::parse("Frontend:\n  port: eighty\n", "x").unwrap_err();
        assert!(e.to_string().contains("Frontend.port"), "{e}");
    }
}
