//! Per-token overhead of the request plane: NATS (`baton run`, one process per component) vs
//! in-process (`baton serve`).
//!
//! A worker task serves one address and answers each request with `--frames` data frames of
//! `--frame-bytes` bytes (a token delta's size as JSON) and `End`, as fast as its sender allows;
//! callers open `S` concurrent streams and read them to the end. Per configuration the figure
//! is wall time over frames: "µs/frame" = wall / (S × frames), the plane's cost per token at
//! that load; "µs/frame/stream" = wall / frames, the inter-token time one stream sees. Medians
//! over `--repeats` runs after one warm-up run, all in one invocation.
//!
//! The NATS plane runs against a nats-server this program starts (`runtime::infra`), with
//! caller and worker on separate connections as separate processes would be. Everything shares
//! the machine's cores: the figures include nats-server's CPU, as a deployment on one host would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use runtime::request_plane::{MemoryRequestPlane, NatsRequestPlane, RequestPlane};
use test_support::NatsServer;

#[derive(Parser)]
struct Args {
    /// Data frames per stream.
    #[arg(long, default_value_t = 1000)]
    frames: u32,
    /// Bytes per data frame (~ one token delta as JSON).
    #[arg(long, default_value_t = 40)]
    frame_bytes: usize,
    /// Concurrent streams per configuration.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    streams: Vec<usize>,
    /// Measured runs per configuration (after one warm-up run); figures are medians.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

const ADDRESS: &str = "bench.decode-worker.generate.1";
/// Generous: a run that stalls should fail loudly, not be timed.
const SILENCE: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let nats = NatsServer::start().context("starting nats-server (scripts/infra install)")?;
    rt.block_on(async {
        let memory = MemoryRequestPlane::new(SILENCE);
        let nats_worker = NatsRequestPlane::connect(&nats.url, SILENCE).await?;
        let nats_caller = NatsRequestPlane::connect(&nats.url, SILENCE).await?;
        serve(&memory, args.frame_bytes).await?;
        serve(&nats_worker, args.frame_bytes).await?;
        let planes: [(&str, Arc<dyn RequestPlane>); 2] = [
            ("in-process", Arc::new(memory)),
            ("NATS", Arc::new(nats_caller)),
        ];
        println!(
            "{} frames of {} B per stream, median of {} runs, {} cores",
            args.frames,
            args.frame_bytes,
            args.repeats,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<11} {:>7} {:>10} {:>16} {:>12}",
            "plane", "streams", "µs/frame", "µs/frame/stream", "frames/s"
        );
        for &streams in &args.streams {
            let mut per_frame = Vec::new();
            for (name, plane) in &planes {
                run(plane, streams, args.frames).await?; // warm-up
                let mut walls = Vec::with_capacity(args.repeats);
                for _ in 0..args.repeats {
                    walls.push(run(plane, streams, args.frames).await?);
                }
                let wall = median(walls);
                let total = streams as f64 * args.frames as f64;
                let us = wall.as_secs_f64() * 1e6 / total;
                println!(
                    "{name:<11} {streams:>7} {us:>10.2} {:>16.2} {:>12.0}",
                    wall.as_secs_f64() * 1e6 / args.frames as f64,
                    total / wall.as_secs_f64()
                );
                per_frame.push(us);
            }
            println!(
                "{:<11} {streams:>7} {:>9.1}x  (NATS / in-process)",
                "ratio",
                per_frame[1] / per_frame[0]
            );
        }
        anyhow::Ok(())
    })
}

/// Answers every request on `ADDRESS` with the number of frames it asks for, then `End`.
async fn serve(plane: &dyn RequestPlane, frame_bytes: usize) -> Result<()> {
    let mut incoming = plane.serve(ADDRESS).await?;
    tokio::spawn(async move {
        while let Some(mut req) = incoming.recv().await {
            tokio::spawn(async move {
                let frames = req
                    .payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u32::from_le_bytes);
                for _ in 0..frames {
                    if req.response.data(vec![b'x'; frame_bytes]).await.is_err() {
                        return;
                    }
                }
                let _ = req.response.end().await;
            });
        }
    });
    Ok(())
}

/// Wall time for `streams` concurrent streams of `frames` frames each, all read to the end.
async fn run(plane: &Arc<dyn RequestPlane>, streams: usize, frames: u32) -> Result<Duration> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let plane = plane.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = plane
                .request(ADDRESS, frames.to_le_bytes().to_vec())
                .await?;
            let mut got = 0u32;
            while let Some(frame) = stream.next().await {
                frame?;
                got += 1;
            }
            anyhow::ensure!(
                got == frames,
                "a stream ended after {got} of {frames} frames"
            );
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a stream task panicked")??;
    }
    Ok(started.elapsed())
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}
