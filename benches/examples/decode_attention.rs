//! Times decode attention variants for a batch (SmolLM2 heads: 9 query, 3 KV, dim 64).
//! `cargo run --release -p baton-benches --example decode_attention`
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn time(name: &str, f: impl Fn() -> Tensor) {
    for _ in 0..3 {
        let _ = f();
    }
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        let _ = f();
    }
    println!(
        "{name:<40} {:>8.1} us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}

fn main() {
    let _g = tch::no_grad_guard();
    let (h, kvh, d) = (9i64, 3i64, 64i64);
    for kind in [Kind::BFloat16, Kind::Float] {
        for (b, l) in [(1i64, 256i64), (8, 256), (32, 256)] {
            let opts = (kind, Device::Cpu);
            let q = Tensor::randn([b, h, 1, d], opts);
            let k = Tensor::randn([b, kvh, l, d], opts);
            let v = Tensor::randn([b, kvh, l, d], opts);
            let mask = Tensor::ones([b, 1, 1, l], (Kind::Bool, Device::Cpu));
            println!("{kind:?} B={b} L={l}");
            time("  sdpa gqa + mask", || {
                Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    Some(&mask),
                    0.0,
                    false,
                    None,
                    true,
                )
            });
            time("  sdpa repeat_interleave + mask", || {
                let kk = k.repeat_interleave_self_int(h / kvh, 1, None);
                let vv = v.repeat_interleave_self_int(h / kvh, 1, None);
                Tensor::scaled_dot_product_attention(
                    &q,
                    &kk,
                    &vv,
                    Some(&mask),
                    0.0,
                    false,
                    None,
                    false,
                )
            });
            time("  grouped matmul + softmax", || {
                let qg = q.view([b, kvh, h / kvh, d]);
                let s = qg.matmul(&k.transpose(2, 3)) * (1.0 / (d as f64).sqrt());
                let s = s.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
                let p = s.softmax(-1, Kind::Float).to_kind(kind);
                p.matmul(&v)
            });
        }
    }
}
