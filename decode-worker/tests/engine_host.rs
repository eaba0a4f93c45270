//! The engine host and the worker service with a scripted executor (no model): the next token
//! is always the chunk's last token + 1, so outputs are known exactly, and each step sleeps a
//! little so a cancellation lands mid-generation.

use std::sync::Arc;
use std::time::Duration;

use decode_worker::{worker_endpoint, DecodeWorker, EngineEvent, EngineHost};
use engine::model::ForwardBatch;
use engine::{Engine, EngineConfig, Executor};
use router::{RoundRobin, Router};
use runtime::discovery::MemoryDiscovery;
use runtime::protocol::{FinishReason, GenerateRequest, GenerateResponse, SamplingParams};
use runtime::request_plane::MemoryRequestPlane;
use tch::Tensor;
use tokio::sync::mpsc;

const VOCAB: usize = 64;
const BLOCKS: usize = 16;
const BLOCK_SIZE: usize = 4;

struct NextToken;

impl Executor for NextToken {
    fn execute(&mut self, batch: &ForwardBatch<'_>) -> engine::Result<Tensor> {
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
        Ok(Tensor::stack(&rows, 0))
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

fn host() -> EngineHost {
    let engine = Engine::new(
        Box::new(NextToken),
        EngineConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            enable_prefix_caching: true,
            eos_token_ids: vec![0],
            max_context: 48,
        },
        None,
    );
    EngineHost::start(engine, "engine-test").unwrap()
}

fn request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        token_ids: prompt,
        sampling: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        },
    }
}

async fn wait_for_free_blocks(host: &EngineHost) {
    for _ in 0..500 {
        let load = host.load();
        if load.kv_blocks_used == 0 && load.running == 0 && load.waiting == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("blocks still in use: {:?}", host.load());
}

#[tokio::test]
async fn a_request_streams_its_tokens_then_frees_its_blocks() {
    let host = host();
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("a", vec![5, 6, 7], 6), tx).unwrap();
    let mut tokens = Vec::new();
    let mut finish = None;
    while let Some(event) = rx.recv().await {
        match event {
            EngineEvent::Tokens(d) => {
                assert_eq!(d.prompt_tokens, 3);
                tokens.extend(d.token_ids);
                finish = d.finish_reason;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tokens, vec![8, 9, 10, 11, 12, 13]);
    assert_eq!(finish, Some(FinishReason::Length));
    wait_for_free_blocks(&host).await;
}

#[tokio::test]
async fn a_caller_that_goes_away_or_aborts_frees_the_blocks() {
    let host = host();
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("gone", vec![1, 2, 3, 4, 5], 40), tx)
        .unwrap();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    host.add(request("aborted", vec![9, 9, 9, 9, 9], 40), tx2)
        .unwrap();
    assert!(matches!(rx.recv().await, Some(EngineEvent::Tokens(_))));
    assert!(matches!(rx2.recv().await, Some(EngineEvent::Tokens(_))));
    assert!(host.load().kv_blocks_used > 0);
    drop(rx);
    host.abort("aborted");
    wait_for_free_blocks(&host).await;
}

#[tokio::test]
async fn requests_the_engine_refuses_are_rejected_naming_the_field() {
    let host = host();
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("long", vec![1; 40], 20), tx).unwrap();
    match rx.recv().await {
        Some(EngineEvent::Rejected { param, message }) => {
            assert_eq!(param.as_deref(), Some("max_tokens"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    host.add(request("vocab", vec![1, 999], 2), tx).unwrap();
    assert!(matches!(
        rx.recv().await,
        Some(EngineEvent::Rejected { param: Some(p), .. }) if p == "prompt"
    ));
}

#[tokio::test]
async fn through_router_and_request_plane_and_cancelled_by_dropping_the_stream() {
    let discovery = MemoryDiscovery::new();
    let plane = Arc::new(MemoryRequestPlane::new(Duration::from_secs(5)));
    let endpoint = worker_endpoint("test");
    let router = Router::new(
        &discovery,
        plane.clone(),
        endpoint.clone(),
        Box::new(RoundRobin::default()),
    )
    .await
    .unwrap();
    let worker = DecodeWorker::start(host(), &discovery, plane, endpoint, "m")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let dispatch = router.generate(&request("r1", vec![3], 4)).await.unwrap();
    assert_eq!(dispatch.instance_id, worker.instance_id());
    let mut stream = dispatch.stream;
    let mut tokens = Vec::new();
    while let Some(frame) = stream.next().await {
        match serde_json::from_slice(&frame.unwrap()).unwrap() {
            GenerateResponse::Tokens(d) => tokens.extend(d.token_ids),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        tokens,
        vec![4, 5, 6, 7],
        "stream ends with End after the finish"
    );

    let mut stream = router
        .generate(&request("r2", vec![3; 6], 40))
        .await
        .unwrap()
        .stream;
    assert!(stream.next().await.unwrap().is_ok());
    assert!(worker.host().load().kv_blocks_used > 0);
    drop(stream);
    wait_for_free_blocks(worker.host()).await;
    worker.stop();
}
