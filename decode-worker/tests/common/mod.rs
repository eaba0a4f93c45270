//! The scripted engine the decode-worker tests share: no model, the next token is always the
//! chunk's last token + 1 (so outputs are known exactly, and a request continued from any
//! point goes on identically), and each step sleeps a little so a cancellation or a kill
//! lands mid-generation.

#![allow(dead_code)]

use std::time::Duration;

use decode_worker::EngineHost;
use engine::model::ForwardBatch;
use engine::{Engine, EngineConfig, Executor, StepOutput};
use runtime::protocol::{GenerateRequest, GenerateResponse, SamplingParams};
use runtime::{PlaneSettings, Planes};
use tch::Tensor;

pub const VOCAB: usize = 64;
pub const BLOCKS: usize = 16;
pub const BLOCK_SIZE: usize = 4;

pub struct NextToken;

impl Executor for NextToken {
    fn execute(&mut self, batch: &ForwardBatch<'_>) -> engine::Result<StepOutput> {
        std::thread::sleep(Duration::from_millis(3));
        let rows: Vec<Tensor> = batch
            .chunks
            .iter()
            .filter(|c| c.sample)
            .map(|c| {
                let next = (*c.tokens.last().unwrap() as i64 + 1) % VOCAB as i64;
                Tensor::zeros([VOCAB as i64], (tch::Kind::Float, tch::Device::Cpu)).index_fill(
                    0,
                    &Tensor::from_slice(&[next]),
                    10.0,
                )
            })
            .collect();
        Ok(Tensor::stack(&rows, 0).into())
    }
    fn num_blocks(&self) -> usize {
        BLOCKS
    }
    fn block_size(&self) -> usize {
        BLOCK_SIZE
    }
    fn vocab_size(&self) -> usize {
        VOCAB
    }
}

pub fn host() -> EngineHost {
    host_with_events(false)
}

/// With `kv_events`, the block manager's events go to the host (as `baton serve` wires it).
pub fn host_with_events(kv_events: bool) -> EngineHost {
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = Engine::new(
        Box::new(NextToken),
        EngineConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            prefill_chunk_while_decoding: 0,
            enable_prefix_caching: true,
            eos_token_ids: vec![0],
            max_context: 48,
        },
        kv_events.then_some(tx),
    );
    EngineHost::start(engine, kv_events.then_some(rx), "engine-test").unwrap()
}

pub fn request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        token_ids: prompt,
        sampling: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        },
        router_overlap_blocks: 0,
    }
}

pub async fn wait_for_free_blocks(host: &EngineHost) {
    for _ in 0..500 {
        let load = host.load();
        if load.kv_blocks_used == 0 && load.running == 0 && load.waiting == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("blocks still in use: {:?}", host.load());
}

pub fn planes() -> Planes {
    Planes::in_process(PlaneSettings {
        stream_timeout: Duration::from_secs(5),
        ..PlaneSettings::new("test", "m")
    })
}

/// Every token of a routed request, which must finish.
pub async fn tokens_of(stream: &mut router::RoutedStream) -> Vec<u32> {
    let mut tokens = Vec::new();
    while let Some(item) = stream.next().await {
        match item.unwrap() {
            GenerateResponse::Tokens(d) => tokens.extend(d.token_ids),
            other => panic!("unexpected {other:?}"),
        }
    }
    tokens
}
