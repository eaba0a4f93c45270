//! Times one SmolLM2-sized linear layer (576 → 3072) per dtype and row count, to see which
//! libtorch kernel a decode batch hits. `cargo run --release -p baton-benches --example linear_ops`
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() {
    let _g = tch::no_grad_guard();
    let (h, o) = (576i64, 3072i64);
    for kind in [Kind::BFloat16, Kind::Float] {
        for m in [1i64, 8, 32, 512] {
            let x = Tensor::randn([m, h], (kind, Device::Cpu));
            let w = Tensor::randn([o, h], (kind, Device::Cpu));
            let wt = w.tr().contiguous();
            let wm = w.to_mkldnn();
            for (name, f) in [
                (
                    "linear",
                    Box::new(|| x.linear(&w, None::<Tensor>)) as Box<dyn Fn() -> Tensor>,
                ),
                ("matmul[in,out]", Box::new(|| x.matmul(&wt))),
                (
                    "mkldnn_linear",
                    Box::new(|| {
                        x.to_mkldnn()
                            .mkldnn_linear(&wm, None::<Tensor>)
                            .to_dense(None, false)
                    }),
                ),
            ] {
                for _ in 0..3 {
                    let _ = f();
                }
                let n = 50;
                let t = Instant::now();
                for _ in 0..n {
                    let _ = f();
                }
                let dt = t.elapsed().as_secs_f64() / n as f64;
                println!(
                    "{kind:?} M={m:<4} {name:<15} {:>8.0} us {:>7.1} GFLOP/s {:>6.1} GB/s",
                    dt * 1e6,
                    2.0 * (m * h * o) as f64 / dt / 1e9,
                    (o * h) as f64 * kind.elt_size_in_bytes() as f64 / dt / 1e9
                );
            }
        }
    }
}
