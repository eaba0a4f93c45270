//! Times one SmolLM2 layer's causal prefill attention (9 query heads over 3 KV heads, d 64)
//! per dtype and formulation. `cargo run --release -p baton-benches --example prefill_attention`
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn time(f: &dyn Fn() -> Tensor) -> f64 {
    for _ in 0..2 {
        let _ = f();
    }
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        let _ = f();
    }
    t.elapsed().as_secs_f64() / n as f64 * 1e6
}

fn main() {
    let _g = tch::no_grad_guard();
    let (h, kvh, d) = (9i64, 3i64, 64i64);
    for kind in [Kind::BFloat16, Kind::Float] {
        for t in [128i64, 512, 2048] {
            // Laid out as the engine has them: [T, heads, d], viewed as [1, heads, T, d].
            let q = Tensor::randn([t, h, d], (kind, Device::Cpu));
            let k = Tensor::randn([t, kvh, d], (kind, Device::Cpu));
            let v = Tensor::randn([t, kvh, d], (kind, Device::Cpu));
            let view = |x: &Tensor| x.transpose(0, 1).unsqueeze(0);
            let sdpa_gqa = || {
                Tensor::scaled_dot_product_attention(
                    &view(&q),
                    &view(&k),
                    &view(&v),
                    None::<Tensor>,
                    0.0,
                    true,
                    None,
                    true,
                )
            };
            let sdpa_contig = || {
                Tensor::scaled_dot_product_attention(
                    &view(&q).contiguous(),
                    &view(&k)
                        .repeat_interleave_self_int(h / kvh, 1, None)
                        .contiguous(),
                    &view(&v)
                        .repeat_interleave_self_int(h / kvh, 1, None)
                        .contiguous(),
                    None::<Tensor>,
                    0.0,
                    true,
                    None,
                    false,
                )
            };
            let bias = Tensor::ones([t, t], (Kind::Bool, Device::Cpu))
                .triu(1)
                .to_kind(kind)
                * -1e30;
            let bias = bias.clamp_min(-1e30).nan_to_num(0.0, None, None);
            let grouped = || {
                // [kvh, T, g, d] -> [kvh, T*g, d]: every query row of a KV head in one matmul.
                let g = h / kvh;
                let qg = q
                    .view([t, kvh, g, d])
                    .permute([1, 0, 2, 3])
                    .reshape([kvh, t * g, d])
                    * (1.0 / (d as f64).sqrt());
                let kt = k.permute([1, 2, 0]);
                let scores = qg.matmul(&kt).view([kvh, t, g, t]) + bias.unsqueeze(1);
                let probs = scores
                    .softmax(-1, Kind::Float)
                    .to_kind(kind)
                    .view([kvh, t * g, t]);
                probs.matmul(&v.transpose(0, 1)).view([kvh, t, g, d])
            };
            println!(
                "{kind:?} T={t:<5} sdpa gqa strided {:>8.0} us   sdpa expanded contiguous {:>8.0} us   grouped matmul {:>8.0} us",
                time(&sdpa_gqa),
                time(&sdpa_contig),
                time(&grouped)
            );
        }
    }
}
