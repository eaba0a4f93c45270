//! `baton`: the binary. `serve` runs the whole graph in one process (OpenAI frontend on port
//! 8000, in-process workers); `generate` runs one prompt through the engine directly.
//! With NATS and etcd, `serve` starts each component as a `baton run <component>` process.
//! `bench` is the load generator (`benches::client`), pointed at any OpenAI URL.

mod components;
// The config types accept every key of the seed's YAML as written; the keys that the
// disaggregation and router issues will read are parsed (and type-checked) already.
#[allow(dead_code)]
mod config;
mod export;
mod generate;
mod graph;
mod run;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "baton", version, about = "Disaggregated LLM serving in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt with the engine in this process.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI API with the whole graph in this process.
    Serve(serve::ServeArgs),
    /// Run one component (frontend, decode-worker) as its own process over NATS and etcd.
    Run(run::RunArgs),
    /// Benchmark an OpenAI-compatible server (aiperf's flags and output files); `bench plot`
    /// draws runs as a Pareto chart.
    Bench(benches::client::BenchArgs),
    /// Write a model (a GGUF, or `smollm2`) as a Hugging Face folder: config, tokenizer, chat
    /// template and safetensors weights.
    ExportHf(export::ExportArgs),
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: allocator settings are read as arenas are made.
    engine::host_memory::keep_freed_memory();
    let cli = Cli::parse();
    // A server reports its progress; a one-shot command only its problems.
    let default_level = match cli.command {
        Command::Serve(_) | Command::Run(_) => "info",
        Command::Generate(_) | Command::Bench(_) | Command::ExportHf(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Run(args) => run::run(args),
        Command::ExportHf(args) => export::run(args),
        Command::Bench(args) => benches::client::main(args).map_err(Into::into),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
