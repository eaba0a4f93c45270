//! The graph simulation: simulated time is the roofline's, replays are identical, the
//! conditional disaggregation rule places prefills as the decode worker would, and the seed
//! comparison reads the curve the way a plot is read.

use baton_benches::seed::{aggregated_1_node, disaggregated_1_node, interpolate};
use baton_benches::sim::{run, Cluster, Point, Workload};
use engine::mock::{Roofline, StepShape, CALIBRATED_EFFICIENCY};

fn work(concurrency: usize, requests: usize, osl: usize) -> Workload {
    Workload {
        isl: 3000,
        osl,
        concurrency,
        requests,
        warmup: 0,
        seed: 7,
    }
}

fn roofline(cluster: &Cluster, tp: usize) -> Roofline {
    Roofline {
        model: cluster.model.clone(),
        gpu: cluster.gpu.clone(),
        tensor_parallel: tp,
        efficiency: cluster.efficiency.clone(),
    }
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got / want - 1.0).abs() < 1e-6,
        "{what}: simulated {got}, roofline {want}"
    );
}

#[test]
fn a_single_stream_takes_exactly_the_roofline_time_of_its_steps() {
    let mut cluster = aggregated_1_node(CALIBRATED_EFFICIENCY);
    cluster.decode.workers = 1;
    let p = run(&cluster, &work(1, 2, 20)).unwrap();
    let r = roofline(&cluster, 4);
    // A 2 048-token budget: the prompt prefills in two chunks, the second sampling token 1.
    let ttft = r.step_seconds(&StepShape {
        chunks: vec![(2048, 0)],
    }) + r.step_seconds(&StepShape {
        chunks: vec![(952, 2048)],
    });
    close(p.ttft_mean_s, ttft, "TTFT");
    let decode: f64 = (3001..3020)
        .map(|c| {
            r.step_seconds(&StepShape {
                chunks: vec![(1, c - 1)],
            })
        })
        .sum();
    close(p.itl_mean_s, decode / 19.0, "ITL");
    assert_eq!((p.requests, p.errors, p.local_prefills), (2, 0, 2));
}

#[test]
fn a_replay_reports_the_same_metrics_and_completes_every_request() {
    let mut cluster = aggregated_1_node(CALIBRATED_EFFICIENCY);
    cluster.policy = "round-robin".into();
    let w = Workload {
        warmup: 4,
        ..work(8, 24, 30)
    };
    let a = run(&cluster, &w).unwrap();
    let b = run(&cluster, &w).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.requests, a.errors), (24, 0));
    // Eight streams on two workers batch: each decodes slower than alone, all together faster.
    let alone = run(&cluster, &work(1, 3, 30)).unwrap();
    assert!(a.itl_mean_s > alone.itl_mean_s, "{a:?} {alone:?}");
    assert!(a.output_tok_s > 3.0 * alone.output_tok_s, "{a:?} {alone:?}");
}

fn disagg(max_local: usize, max_queue: usize) -> Point {
    let mut cluster = disaggregated_1_node(CALIBRATED_EFFICIENCY);
    let d = cluster.disagg.as_mut().unwrap();
    d.max_local_prefill_length = max_local;
    d.max_prefill_queue_size = max_queue;
    run(&cluster, &work(8, 16, 10)).unwrap()
}

#[test]
fn the_conditional_rule_places_prefills_as_a_decode_worker_does() {
    // Long prompts and room in the queue: every prefill is remote.
    let remote = disagg(10, 100);
    assert_eq!((remote.remote_prefills, remote.local_prefills), (16, 0));
    // A full queue (size 0) or a threshold above the prompt: every prefill is local.
    assert_eq!(disagg(10, 0).remote_prefills, 0);
    assert_eq!(disagg(3000, 100).remote_prefills, 0);
    // The seed's queue of 2 with 8 arrivals at once: some stay local.
    let seed = disagg(10, 2);
    assert!(
        seed.local_prefills > 0 && seed.remote_prefills > 0,
        "{seed:?}"
    );

    // A remote first token waits at least for a TP1 prefill of the prompt plus the transfer
    // of its 24 blocks over NVLink.
    let cluster = disaggregated_1_node(CALIBRATED_EFFICIENCY);
    let r = roofline(&cluster, 1);
    let prefill = r.step_seconds(&StepShape {
        chunks: vec![(3000, 0)],
    });
    let bytes = 24.0 * 128.0 * cluster.model.kv_bytes_per_token();
    let floor = prefill + bytes / cluster.gpu.nvlink_bytes_per_s;
    assert!(
        remote.ttft_mean_s >= floor,
        "{} < {floor}",
        remote.ttft_mean_s
    );
}

fn point(user: f64, gpu: f64) -> Point {
    Point {
        concurrency: 1,
        requests: 1,
        ttft_mean_s: 0.0,
        ttft_p90_s: 0.0,
        itl_mean_s: 1.0 / user,
        e2e_mean_s: 0.0,
        duration_s: 1.0,
        output_tok_s: 0.0,
        tok_s_gpu: gpu,
        tok_s_user: user,
        remote_prefills: 0,
        local_prefills: 0,
        errors: 0,
    }
}

#[test]
fn the_curve_is_read_between_its_neighbouring_points_and_not_beyond() {
    let curve = [
        point(70.0, 20.0),
        point(10.0, 200.0),
        point(40.0, 100.0),
        point(69.0, 10.0),
    ];
    // (69, 10) is beaten on both axes by (70, 20): not on the curve.
    assert_eq!(interpolate(&curve, 55.0), Some(60.0));
    let between = interpolate(&curve, 69.5).unwrap();
    assert!(
        (between - (20.0 + 80.0 * 0.5 / 30.0)).abs() < 1e-9,
        "{between}"
    );
    assert_eq!(interpolate(&curve, 10.0), Some(200.0));
    assert_eq!(interpolate(&curve, 75.0), None);
    assert_eq!(interpolate(&curve, 5.0), None);
}
