//! Baton's benchmarks. Today: engine throughput on CPU (`engine-bench`); the HTTP load
//! generator, trace replay and policy comparisons arrive with the benchmark issue.
