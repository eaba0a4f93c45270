//! A disaggregated graph over in-process planes on the real SmolLM2 (f32, CPU): one decode
//! worker whose KV cache is a kv-transfer sink, prefill workers writing through a chosen
//! backend, and a router in front; plus the golden cases.
#![allow(dead_code)]

use std::time::Duration;

use decode_worker::{
    worker_endpoint, DecodeWorker, DisaggConfig, DisaggState, DisaggThresholds, Disaggregation,
    EngineHost, HostDisagg,
};
use engine::{loader, EngineOptions, SharedModel};
use kv_transfer::{BackendChoice, KvSink, TransferBackend};
use prefill_worker::{PrefillHost, PrefillOptions, PrefillWorker};
use router::{policy_from_name, KvCostConfig, Router, RouterOptions};
use runtime::protocol::{GenerateRequest, GenerateResponse, PrefillCounters, SamplingParams};
use runtime::{PlaneSettings, Planes};
use tch::Kind;

pub const BLOCK_SIZE: usize = 16;

pub fn model() -> SharedModel {
    let loaded = loader::load("smollm2").expect("SmolLM2 loads (run `make test`)");
    SharedModel::new(loaded, Kind::Float, tch::Device::Cpu).expect("placed")
}

pub fn options(num_blocks: usize) -> EngineOptions {
    EngineOptions {
        kind: Kind::Float,
        block_size: BLOCK_SIZE,
        num_blocks: Some(num_blocks),
        max_num_batched_tokens: 512,
        ..EngineOptions::default()
    }
}

pub struct GoldenCase {
    pub id: String,
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    pub ended_with_eos: bool,
}

pub fn golden() -> Vec<GoldenCase> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/golden/smollm2-135m-instruct-q4_1.json"
    ))
    .expect("golden file");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| GoldenCase {
            id: c["id"].as_str().unwrap().to_string(),
            prompt: ids(&c["prompt_token_ids"]),
            greedy: ids(&c["greedy_token_ids"]),
            ended_with_eos: c["ended_with_eos"].as_bool().unwrap(),
        })
        .collect()
}

pub fn rule(conditional: bool, max_local: usize, max_queue: usize) -> DisaggConfig {
    DisaggConfig {
        remote_prefill: true,
        conditional,
        thresholds: DisaggThresholds {
            max_local_prefill_length: max_local,
            max_prefill_queue_size: max_queue,
        },
        remote_prefill_timeout: Duration::from_secs(3),
    }
}

pub struct Graph {
    pub planes: Planes,
    pub decode: DecodeWorker,
    pub prefill: Vec<PrefillWorker>,
    pub router: Router,
}

pub struct GraphSpec<'a> {
    pub disagg: DisaggConfig,
    pub sink: Vec<TransferBackend>,
    pub choice: BackendChoice,
    pub prefill_workers: usize,
    /// The prefill workers' engine options (their block size may differ, to test refusals).
    pub prefill_options: EngineOptions,
    pub model: &'a SharedModel,
    /// How long the router waits on a silent stream.
    pub stream_timeout: Duration,
}

impl<'a> GraphSpec<'a> {
    pub fn new(model: &'a SharedModel, disagg: DisaggConfig, backend: TransferBackend) -> Self {
        Self {
            disagg,
            sink: vec![backend],
            choice: BackendChoice::Only(backend),
            prefill_workers: 1,
            stream_timeout: Duration::from_secs(60),
            prefill_options: options(128),
            model,
        }
    }
}

pub async fn graph(spec: GraphSpec<'_>) -> Graph {
    let planes = Planes::in_process(PlaneSettings {
        stream_timeout: spec.stream_timeout,
        // A job whose worker vanished comes back quickly.
        prefill_ack_wait: Duration::from_secs(2),
        ..PlaneSettings::new("test", "smollm2")
    });
    let opts = options(256);
    let layout = spec.model.kv_layout(&opts).unwrap();
    let sink = KvSink::new(layout, &spec.sink, "127.0.0.1".parse().unwrap())
        .await
        .expect("sink opens");
    let (engine, _) = spec.model.engine_in(&opts, Some(sink.memory())).unwrap();
    let state = DisaggState::new(spec.disagg);
    let host_disagg = HostDisagg {
        rule: state.clone(),
        fences: sink.fences(),
    };
    let host = EngineHost::start_with(engine, None, "decode-test", Some(host_disagg)).unwrap();
    let decode = DecodeWorker::start_with(
        host,
        &planes,
        "smollm2",
        Some(Disaggregation { state, sink }),
    )
    .await
    .unwrap();
    let mut prefill = Vec::new();
    for i in 0..spec.prefill_workers {
        let layout = spec.model.kv_layout(&spec.prefill_options).unwrap();
        let (engine, _) = spec.model.engine(&spec.prefill_options).unwrap();
        let host = PrefillHost::start(engine, layout, &format!("prefill-test-{i}")).unwrap();
        let options = PrefillOptions {
            backend: spec.choice,
            ..PrefillOptions::default()
        };
        prefill.push(PrefillWorker::start(host, &planes, options).await.unwrap());
    }
    let router = Router::new(
        &planes,
        worker_endpoint("test"),
        policy_from_name("round-robin", KvCostConfig::default()).unwrap(),
        RouterOptions {
            block_size: BLOCK_SIZE,
            ..RouterOptions::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    Graph {
        planes,
        decode,
        prefill,
        router,
    }
}

pub fn greedy(id: &str, prompt: Vec<u32>, max_tokens: usize, ignore_eos: bool) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        token_ids: prompt,
        sampling: SamplingParams {
            ignore_eos,
            ..SamplingParams::greedy(max_tokens)
        },
        router_overlap_blocks: 0,
    }
}

impl Graph {
    /// Every token of a request, which must finish.
    pub async fn tokens(&self, request: GenerateRequest) -> Vec<u32> {
        let id = request.request_id.clone();
        let mut stream = self.router.generate(request).await.unwrap();
        let mut tokens = Vec::new();
        while let Some(item) = stream.next().await {
            match item.unwrap_or_else(|e| panic!("{id}: {e}")) {
                GenerateResponse::Tokens(d) => tokens.extend(d.token_ids),
                other => panic!("{id}: unexpected {other:?}"),
            }
        }
        tokens
    }

    /// Runs each golden case and checks its tokens are the reference's.
    pub async fn assert_golden(&self, what: &str) {
        for case in golden() {
            let n = case.greedy.len();
            let got = self
                .tokens(greedy(
                    &format!("{what}-{}", case.id),
                    case.prompt.clone(),
                    n,
                    false,
                ))
                .await;
            assert_eq!(got, case.greedy, "{what}: golden case {}", case.id);
        }
    }

    pub fn counters(&self) -> PrefillCounters {
        self.decode
            .host()
            .prefill_counters()
            .lock()
            .unwrap()
            .clone()
    }

    /// Waits until neither side holds a block for a request.
    pub async fn assert_no_blocks_held(&self, what: &str) {
        for _ in 0..1000 {
            let load = self.decode.host().load();
            let prefill: usize = self.prefill.iter().map(|p| p.kv_blocks_used()).sum();
            if load.kv_blocks_used == 0 && load.running == 0 && load.waiting == 0 && prefill == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let prefill: Vec<usize> = self.prefill.iter().map(|p| p.kv_blocks_used()).collect();
        panic!(
            "{what}: blocks still held: decode {:?}, prefill {prefill:?}",
            self.decode.host().load()
        );
    }

    pub fn stop(self) {
        for p in self.prefill {
            p.stop();
        }
        self.decode.stop();
    }
}
