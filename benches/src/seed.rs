//! The seed's published results (DESIGN.md §8, read off Dynamo's plots of the benchmarking
//! guide's runs: DeepSeek-R1-Distill-Llama-70B FP8 on 8×H100 per node, ISL 3000 / OSL 150) and
//! the graphs that produced them, as simulation clusters.

use engine::mock::{Efficiency, MockModel, H100_SXM};

use crate::sim::{Cluster, Disagg, Point, Pool};

/// A published point: tok/s/GPU at tok/s/user.
pub type Published = (f64, f64);

/// 1 node, vLLM TP4 × 2 behind nginx `least_conn`.
pub const AGG_1_NODE: &[Published] = &[
    (171.0, 11.0),
    (159.0, 19.0),
    (139.0, 29.0),
    (112.0, 42.0),
    (81.0, 54.0),
    (52.0, 63.0),
    (17.0, 73.0),
];

/// 1 node, 4 × TP1 prefill + 1 × TP4 decode.
pub const DISAGG_1_NODE: &[Published] = &[(146.0, 50.0), (91.0, 58.0), (50.0, 63.0), (26.0, 65.0)];

/// 2 nodes, vLLM TP8 × 2 behind nginx `least_conn`.
pub const AGG_2_NODES: &[Published] = &[
    (115.0, 15.0),
    (91.0, 37.0),
    (71.0, 51.0),
    (52.0, 69.0),
    (34.0, 80.0),
];

/// 2 nodes, 8 × TP1 prefill (one node) + 1 × TP8 decode (the other).
pub const DISAGG_2_NODES: &[Published] = &[
    (146.0, 44.0),
    (132.0, 47.0),
    (78.0, 57.0),
    (44.0, 63.0),
    (28.0, 71.0),
];

/// Per GPU across nodes: an H100 node's ConnectX-7 NICs, 400 Gb/s for each GPU.
pub const NIC_BYTES_PER_S: f64 = 50e9;

/// The seed's sweep.
pub const CONCURRENCY: &[usize] = &[1, 2, 4, 8, 16, 32, 64, 128, 256];

/// `vllm serve --tensor-parallel-size 4` of the seed's era (vLLM 0.7, engine V0): the 70B's
/// 128K context turns chunked prefill on, with its default budget of 2 048 tokens a step.
fn vllm_tp4() -> Pool {
    Pool {
        workers: 2,
        tensor_parallel: 4,
        max_num_batched_tokens: 2048,
        max_num_seqs: 256,
        max_model_len: 131_072,
    }
}

/// The aggregated baseline: two TP4 workers behind least-loaded routing.
pub fn aggregated_1_node(efficiency: Efficiency) -> Cluster {
    Cluster {
        gpu: H100_SXM,
        model: MockModel::deepseek_r1_distill_llama_70b(),
        efficiency,
        block_size: 128,
        decode: vllm_tp4(),
        disagg: None,
        policy: "least-loaded".into(),
    }
}

/// `configs/disagg.yaml` as the seed runs it: one TP4 decode worker (max-model-len 16 384, so
/// no chunked prefill and a 16 384-token budget), four TP1 prefill workers (max-model-len and
/// budget 4 096), conditional disaggregation at 10 tokens / queue 2, KV over NVLink.
pub fn disaggregated_1_node(efficiency: Efficiency) -> Cluster {
    Cluster {
        decode: Pool {
            workers: 1,
            max_num_batched_tokens: 16_384,
            max_model_len: 16_384,
            ..vllm_tp4()
        },
        disagg: Some(Disagg {
            prefill: Pool {
                workers: 4,
                tensor_parallel: 1,
                max_num_batched_tokens: 4096,
                max_num_seqs: 256,
                max_model_len: 4096,
            },
            max_local_prefill_length: 10,
            max_prefill_queue_size: 2,
            link_bytes_per_s: H100_SXM.nvlink_bytes_per_s,
        }),
        policy: "round-robin".into(),
        ..aggregated_1_node(efficiency)
    }
}

/// Two nodes, one TP8 vLLM each, behind least-loaded routing.
pub fn aggregated_2_nodes(efficiency: Efficiency) -> Cluster {
    let one = aggregated_1_node(efficiency);
    Cluster {
        decode: Pool {
            tensor_parallel: 8,
            ..one.decode.clone()
        },
        ..one
    }
}

/// The seed's multi-node config: a TP8 decode worker (budget 16 384) on one node, eight TP1
/// prefill workers on the other, so every KV transfer crosses a NIC.
pub fn disaggregated_2_nodes(efficiency: Efficiency) -> Cluster {
    let mut c = disaggregated_1_node(efficiency);
    c.decode.tensor_parallel = 8;
    if let Some(d) = c.disagg.as_mut() {
        d.prefill.workers = 8;
        d.link_bytes_per_s = NIC_BYTES_PER_S;
    }
    c
}

/// The simulated curve's tok/s/GPU at tok/s/user `user`, linear between the two sweep points
/// around it on the Pareto front (the way the published points were read off Dynamo's Pareto
/// plots: a point another beats on both axes, such as concurrency 1 beside 2 on two workers,
/// is not on the curve); `None` outside the simulated range.
pub fn interpolate(points: &[Point], user: f64) -> Option<f64> {
    let all: Vec<(f64, f64)> = points.iter().map(|p| (p.tok_s_user, p.tok_s_gpu)).collect();
    let dominated = |&(u, g): &(f64, f64)| {
        all.iter()
            .any(|&(u2, g2)| u2 >= u && g2 >= g && (u2 > u || g2 > g))
    };
    let mut curve: Vec<(f64, f64)> = all.iter().copied().filter(|p| !dominated(p)).collect();
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    curve.windows(2).find_map(|w| {
        let ((u0, g0), (u1, g1)) = (w[0], w[1]);
        (u0 <= user && user <= u1).then(|| {
            if u1 == u0 {
                g0.max(g1)
            } else {
                g0 + (g1 - g0) * (user - u0) / (u1 - u0)
            }
        })
    })
}

/// Each published point with the simulation's tok/s/GPU at its tok/s/user and the deviation
/// (simulated / published − 1).
pub fn deviations(points: &[Point], published: &[Published]) -> Vec<(Published, Option<f64>)> {
    published
        .iter()
        .map(|&(gpu, user)| {
            let dev = interpolate(points, user).map(|g| g / gpu - 1.0);
            ((gpu, user), dev)
        })
        .collect()
}

/// The worst deviation (infinite when a point lies outside the simulated curve).
pub fn worst(devs: &[(Published, Option<f64>)]) -> f64 {
    devs.iter()
        .map(|(_, d)| d.map_or(f64::INFINITY, f64::abs))
        .fold(0.0, f64::max)
}
