//! Disaggregation on the real SmolLM2 (f32) over in-process planes: every golden prompt decodes
//! token for token as the reference under forced-remote prefill through each host backend
//! (in-process copy, shared memory, TCP) and under the conditional rule; the rule's thresholds
//! and a full queue keep prefills local (counted); a prefill worker with another KV layout is
//! refused and the request prefills locally; cancelled and abandoned remote prefills leak no
//! block on either side.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use kv_transfer::TransferBackend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_prompts_decode_the_same_aggregated_remote_and_conditional_over_each_backend() {
    let model = model();
    // Aggregated: the rule never sends anything remote.
    let mut aggregated = rule(false, 0, 0);
    aggregated.remote_prefill = false;
    let g = graph(GraphSpec::new(&model, aggregated, TransferBackend::Memory)).await;
    g.assert_golden("aggregated").await;
    assert_eq!(g.counters().remote, 0);
    g.stop();

    for backend in [
        TransferBackend::Memory,
        TransferBackend::Shm,
        TransferBackend::Tcp,
    ] {
        let g = graph(GraphSpec::new(&model, rule(false, 0, 0), backend)).await;
        g.assert_golden(&format!("remote-{backend}")).await;
        let c = g.counters();
        assert_eq!(
            (c.remote, c.local),
            (10, 0),
            "{backend}: every prefill remote"
        );
        assert!(c.fallbacks.values().all(|&n| n == 0), "{backend}: {c:?}");
        assert_eq!(c.transfers, 10);
        assert!(c.transfer_bytes[backend.as_str()] > 0, "{c:?}");
        g.assert_no_blocks_held(&format!("remote-{backend}")).await;
        g.stop();
    }

    // Conditional: prompts with more than 40 uncached tokens go remote, the rest stay. The
    // chat cases share their template's opening, so some long ones find it cached.
    let g = graph(GraphSpec::new(
        &model,
        rule(true, 40, 100),
        TransferBackend::Shm,
    ))
    .await;
    g.assert_golden("conditional").await;
    let long = golden().iter().filter(|c| c.prompt.len() > 40).count() as u64;
    let c = g.counters();
    assert_eq!(c.remote + c.local, 10, "{c:?}");
    assert!(c.remote >= 1 && c.remote <= long, "{c:?}");
    assert!(c.local >= 10 - long, "{c:?}");
    g.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_and_a_full_queue_decide_where_prefills_run() {
    let model = model();
    let prompt: Vec<u32> = golden()[4].prompt.clone(); // 312 tokens
    let short: Vec<u32> = prompt[..30].to_vec();

    let g = graph(GraphSpec::new(
        &model,
        rule(true, 100, 5),
        TransferBackend::Memory,
    ))
    .await;
    g.tokens(greedy("short", short.clone(), 2, true)).await;
    assert_eq!((g.counters().local, g.counters().remote), (1, 0), "below");
    g.tokens(greedy("long", prompt.clone(), 2, true)).await;
    assert_eq!(g.counters().remote, 1, "above");
    // The same long prompt again: its prefix is cached here, so the uncached part is short.
    g.tokens(greedy("again", prompt.clone(), 2, true)).await;
    assert_eq!(g.counters().local, 2, "a cached prefix does not count");
    g.stop();

    // A queue of size 0 is always full: long prompts stay local and are counted as such.
    let g = graph(GraphSpec::new(
        &model,
        rule(true, 10, 0),
        TransferBackend::Memory,
    ))
    .await;
    g.tokens(greedy("full", prompt.clone(), 2, true)).await;
    let c = g.counters();
    assert_eq!((c.local, c.remote), (1, 0));
    assert_eq!(c.fallbacks["queue_full"], 1);
    g.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_with_another_layout_is_refused_and_the_request_prefills_locally() {
    let model = model();
    let mut spec = GraphSpec::new(&model, rule(false, 0, 0), TransferBackend::Memory);
    spec.prefill_options.block_size = BLOCK_SIZE * 2;
    let g = graph(spec).await;
    let case = &golden()[1];
    let got = g
        .tokens(greedy(
            "mismatch",
            case.prompt.clone(),
            case.greedy.len(),
            false,
        ))
        .await;
    assert_eq!(
        got, case.greedy,
        "the local prefill gives the reference tokens"
    );
    let c = g.counters();
    assert_eq!(c.fallbacks["failed"], 1, "{c:?}");
    assert_eq!(c.transfers, 0, "nothing was written");
    g.assert_no_blocks_held("after the refusal").await;
    g.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_requests_cancelled_mid_prefill_leak_no_block_on_either_side() {
    let model = model();
    let g = graph(GraphSpec::new(
        &model,
        rule(false, 0, 0),
        TransferBackend::Shm,
    ))
    .await;
    let base = golden()[4].prompt.clone();
    let cancels = (0..100).map(|i| {
        let mut prompt = base.clone();
        prompt[0] = 1000 + i as u32; // no shared prefix between them
        let g = &g;
        async move {
            let mut stream = g
                .router
                .generate(greedy(&format!("c{i}"), prompt, 8, true))
                .await
                .unwrap();
            // Gone while queued, while claimed and computing, or right after the transfer.
            let wait = Duration::from_millis((i % 10) as u64 * 15);
            let _ = tokio::time::timeout(wait, stream.next()).await;
            drop(stream);
        }
    });
    join_all(cancels).await;
    g.assert_no_blocks_held("after 100 cancellations").await;
    // The graph still serves.
    let case = &golden()[0];
    let got = g
        .tokens(greedy(
            "after",
            case.prompt.clone(),
            case.greedy.len(),
            false,
        ))
        .await;
    assert_eq!(got, case.greedy);
    g.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_prefill_worker_vanishes_complete_locally_and_once() {
    let model = model();
    let mut spec = GraphSpec::new(&model, rule(false, 0, 0), TransferBackend::Memory);
    spec.prefill_workers = 2;
    let mut g = graph(spec).await;
    let victim = g.prefill.remove(0);
    let base = golden()[4].prompt.clone();
    let prompts: Vec<Vec<u32>> = (0..20)
        .map(|i| {
            let mut p = base[..150].to_vec();
            p[0] = 2000 + i;
            p
        })
        .collect();
    // The reference: each prompt aggregated, on its own.
    let reference = {
        let mut aggregated = rule(false, 0, 0);
        aggregated.remote_prefill = false;
        let a = graph(GraphSpec::new(&model, aggregated, TransferBackend::Memory)).await;
        let mut out = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            out.push(
                a.tokens(greedy(&format!("ref{i}"), p.clone(), 4, true))
                    .await,
            );
        }
        a.stop();
        out
    };
    let results = {
        let runs = prompts.iter().enumerate().map(|(i, p)| {
            let g = &g;
            async move { g.tokens(greedy(&format!("r{i}"), p.clone(), 4, true)).await }
        });
        let all = join_all(runs);
        tokio::pin!(all);
        // One prefill worker vanishes mid-run while it holds a claimed job: the job is
        // neither acked nor reported.
        let holding = async {
            while victim.jobs_held() == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::select! {
            r = &mut all => panic!("all {} finished before the victim held a job", r.len()),
            _ = holding => {
                victim.stop();
                all.await
            }
        }
    };
    assert_eq!(
        results, reference,
        "every request completes with its own tokens, once"
    );
    g.assert_no_blocks_held("after the prefill worker vanished")
        .await;
    g.stop();
}

/// Heartbeats: with no prefill worker, a remote request waits out --remote-prefill-timeout
/// (3 s) before prefilling locally — three times the router's 1 s silence timeout — and still
/// completes: the decode worker says it is alive while the request waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_prefill_worker_is_busy_not_silent() {
    let model = model();
    let mut spec = GraphSpec::new(&model, rule(false, 0, 0), TransferBackend::Memory);
    spec.prefill_workers = 0;
    spec.stream_timeout = Duration::from_secs(1);
    let g = graph(spec).await;
    let prompt = golden()[4].prompt[..40].to_vec();
    let started = std::time::Instant::now();
    let tokens = g.tokens(greedy("waits", prompt, 4, true)).await;
    assert_eq!(tokens.len(), 4);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "it waited for the remote prefill's timeout"
    );
    g.stop();
}
