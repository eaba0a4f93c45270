//! Scripted workers for the router's load tests: each accepts requests, sends one token and
//! holds the stream open until the caller cancels it (a long generation), so the requests in
//! flight on each worker are exactly what the test left open.

#![allow(dead_code)]

use runtime::discovery::{EndpointId, InstanceSpec, Registration};
use runtime::protocol::{GenerateRequest, GenerateResponse, SamplingParams, TokenDelta};
use runtime::request_plane::IncomingRequest;
use runtime::Planes;

pub fn endpoint(namespace: &str) -> EndpointId {
    EndpointId::new(namespace, "decode-worker", "generate")
}

pub fn request(id: &str, tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        token_ids: (0..tokens as u32).collect(),
        sampling: SamplingParams::greedy(100),
        router_overlap_blocks: 0,
    }
}

/// A worker of `namespace` at `address` that holds every request open until cancelled.
pub async fn holding_worker(planes: &Planes, namespace: &str, address: &str) -> Registration {
    let mut incoming = planes.requests.serve(address).await.unwrap();
    tokio::spawn(async move {
        while let Some(IncomingRequest { mut response, .. }) = incoming.recv().await {
            tokio::spawn(async move {
                let first = GenerateResponse::Tokens(TokenDelta {
                    token_ids: vec![7],
                    logprobs: vec![],
                    finish_reason: None,
                    prompt_tokens: 1,
                    cached_tokens: 0,
                });
                let _ = response.data(serde_json::to_vec(&first).unwrap()).await;
                response.cancelled().await;
            });
        }
    });
    planes
        .discovery
        .register(InstanceSpec {
            endpoint: endpoint(namespace),
            address: address.into(),
            model: None,
            metadata: serde_json::Value::Null,
        })
        .await
        .unwrap()
}
