//! Baton's KV indexer (`router::indexer::KvIndexer`, single-threaded) on the Mooncake
//! conversation trace, on exactly the workload and phases of the Dynamo anchor harness
//! (`shared/anchors/dynamo-indexer`), so the two print comparable figures side by side:
//!
//! * each trace `hash_id` (512 tokens) becomes 512/block_size blocks, floor(input_length /
//!   block_size) full blocks per request; local block hash = splitmix64(id·sub + k); chained
//!   hashes with `runtime::block_hash::chain_hash` (the anchor chains with Dynamo's own XXH3
//!   scheme: other values, same structure);
//! * requests go to workers at random (splitmix64 stream, seed 42, as the anchor draws them);
//!   each worker's cache is unbounded and a request emits one Stored event with only the blocks
//!   its worker lacks; teardown removes every stored block in reverse store order;
//! * phases: build, find_matches of every request on the full tree, a routing decision (query
//!   + the DESIGN §5 cost over every worker), remove everything, replay (query then store).
//!
//! Usage: `indexer-bench [TRACE] [WORKERS] [BLOCK_SIZE]` (the anchor's positional arguments).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use router::indexer::KvIndexer;
use runtime::block_hash::{chain_hash, BlockHash};
use runtime::kv_event::{KvEvent, KvEventData};

#[derive(Parser)]
struct Args {
    #[arg(default_value = "../shared/traces/conversation_trace.jsonl")]
    trace: PathBuf,
    #[arg(default_value_t = 64)]
    workers: u64,
    #[arg(default_value_t = 128)]
    block_size: u64,
}

const SEED: u64 = 42;

struct Req {
    worker: u64,
    /// Chained block hashes of the prompt's full blocks.
    hashes: Vec<u64>,
    /// Index of this request's Stored event, if it stored anything.
    event: Option<usize>,
}

struct Workload {
    reqs: Vec<Req>,
    /// (worker, event) in trace order.
    stored: Vec<(u64, KvEvent)>,
    /// Reverse store order: children before parents.
    removed: Vec<(u64, KvEvent)>,
    total_stored_blocks: u64,
    total_query_blocks: u64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E3779B97F4A7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

fn mix(v: u64) -> u64 {
    let mut s = v;
    splitmix(&mut s)
}

fn build_workload(path: &PathBuf, workers: u64, block_size: u64) -> Result<Workload> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let sub = 512 / block_size;
    let mut rng = SEED;
    let mut reqs = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line: serde_json::Value = serde_json::from_str(&line?)?;
        let input_length = line["input_length"].as_u64().context("input_length")?;
        let ids: Vec<u64> = line["hash_ids"]
            .as_array()
            .context("hash_ids")?
            .iter()
            .map(|v| v.as_u64().context("hash_id"))
            .collect::<Result<_>>()?;
        let n = (input_length / block_size) as usize;
        let mut parent = None;
        let hashes = (0..n)
            .map(|j| {
                let id = ids[j / sub as usize];
                let h = chain_hash(parent, mix(id * sub + (j as u64 % sub)));
                parent = Some(h);
                h
            })
            .collect();
        let worker = splitmix(&mut rng) % workers;
        reqs.push(Req {
            worker,
            hashes,
            event: None,
        });
    }
    let mut cached: Vec<HashSet<u64>> = (0..workers).map(|_| HashSet::new()).collect();
    let mut event_ids = vec![0u64; workers as usize];
    let mut next_id = |w: u64| {
        let id = event_ids[w as usize];
        event_ids[w as usize] += 1;
        id
    };
    let (mut stored, mut total_stored_blocks, mut total_query_blocks) = (Vec::new(), 0, 0);
    for r in reqs.iter_mut() {
        total_query_blocks += r.hashes.len() as u64;
        let set = &mut cached[r.worker as usize];
        let j = r
            .hashes
            .iter()
            .position(|h| !set.contains(h))
            .unwrap_or(r.hashes.len());
        if j == r.hashes.len() {
            continue;
        }
        set.extend(&r.hashes[j..]);
        total_stored_blocks += (r.hashes.len() - j) as u64;
        let blocks = r.hashes[j..]
            .iter()
            .map(|&h| BlockHash {
                block_hash: h,
                tokens_hash: 0,
            })
            .collect();
        let data = KvEventData::Stored {
            parent_hash: j.checked_sub(1).map(|p| r.hashes[p]),
            blocks,
        };
        let event_id = next_id(r.worker);
        stored.push((r.worker, KvEvent { event_id, data }));
        r.event = Some(stored.len() - 1);
    }
    let removed = stored
        .iter()
        .rev()
        .map(|(w, ev)| {
            let KvEventData::Stored { blocks, .. } = &ev.data else {
                unreachable!("only Stored events are built above")
            };
            let data = KvEventData::Removed {
                block_hashes: blocks.iter().map(|b| b.block_hash).collect(),
            };
            (
                *w,
                KvEvent {
                    event_id: next_id(*w),
                    data,
                },
            )
        })
        .collect();
    Ok(Workload {
        reqs,
        stored,
        removed,
        total_stored_blocks,
        total_query_blocks,
    })
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64
}

fn lat_summary(name: &str, mut v: Vec<u64>) -> String {
    v.sort_unstable();
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    format!(
        "{name}: n={} p50={:.2}us p90={:.2}us p99={:.2}us max={:.2}us mean={:.2}us",
        v.len(),
        pct(&v, 0.50) / 1e3,
        pct(&v, 0.90) / 1e3,
        pct(&v, 0.99) / 1e3,
        *v.last().unwrap_or(&0) as f64 / 1e3,
        mean / 1e3
    )
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn apply_all(index: &mut KvIndexer, events: &[(u64, KvEvent)]) -> usize {
    events
        .iter()
        .filter(|(w, ev)| index.apply(*w, ev).is_err())
        .count()
}

fn own_full_match(r: &Req, matches: &[(u64, usize)]) -> bool {
    matches.contains(&(r.worker, r.hashes.len())) || r.hashes.is_empty()
}

/// One KV-aware decision as DESIGN §5 costs it: per worker `max(prefill_blocks − overlap, 0) +
/// decode_blocks` over synthetic loads, argmin; the chosen worker's loads grow by the request.
struct Router {
    matches: Vec<(u64, usize)>,
    overlap: Vec<usize>,
    prefill_tokens: Vec<u64>,
    decode_blocks: Vec<u64>,
}

impl Router {
    fn new(workers: u64) -> Self {
        let mut rng = SEED ^ 0x5EED;
        let mut draw = |max: u64| (0..workers).map(|_| splitmix(&mut rng) % max).collect();
        Self {
            matches: Vec::new(),
            overlap: vec![0; workers as usize],
            prefill_tokens: draw(16_384),
            decode_blocks: draw(4_096),
        }
    }

    fn decide(&mut self, index: &KvIndexer, hashes: &[u64], block_size: u64) -> usize {
        index.find_matches_into(hashes, &mut self.matches);
        self.overlap.iter_mut().for_each(|o| *o = 0);
        for &(w, n) in &self.matches {
            self.overlap[w as usize] = n;
        }
        let isl = hashes.len() as u64 * block_size;
        let mut best = (f64::INFINITY, 0);
        for w in 0..self.overlap.len() {
            let prefill_blocks = (self.prefill_tokens[w] + isl) as f64 / block_size as f64;
            let cost =
                (prefill_blocks - self.overlap[w] as f64).max(0.0) + self.decode_blocks[w] as f64;
            if cost < best.0 {
                best = (cost, w);
            }
        }
        let w = best.1;
        self.prefill_tokens[w] = (self.prefill_tokens[w] + isl) % 16_384;
        self.decode_blocks[w] = (self.decode_blocks[w] + hashes.len() as u64) % 4_096;
        w
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let t = Instant::now();
    let w = build_workload(&args.trace, args.workers, args.block_size)?;
    println!(
        "workload: trace={} requests={} workers={} block_size={} seed={SEED}; stored events={} stored (worker,block) pairs={} query blocks={} mean blocks/event={:.1} (prep {:.2}s)",
        args.trace.display(), w.reqs.len(), args.workers, args.block_size, w.stored.len(),
        w.total_stored_blocks, w.total_query_blocks,
        w.total_stored_blocks as f64 / w.stored.len() as f64, t.elapsed().as_secs_f64()
    );
    println!("== Baton KvIndexer (single-threaded) ==");

    let mut index = KvIndexer::new();
    let rss0 = rss_mib();
    let t = Instant::now();
    let errs = apply_all(&mut index, &w.stored);
    let d = t.elapsed();
    println!(
        "build: {} Stored events, {} blocks in {:.3}s -> {:.0} events/s, {:.0} blocks/s (errors={errs}, tree size={}, RSS delta={:.0} MiB)",
        w.stored.len(), w.total_stored_blocks, d.as_secs_f64(), rate(w.stored.len() as u64, d),
        rate(w.total_stored_blocks, d), index.total_blocks(), rss_mib() - rss0
    );

    let mut lats = Vec::with_capacity(w.reqs.len());
    let mut ok = 0;
    let t = Instant::now();
    for r in &w.reqs {
        let t0 = Instant::now();
        let matches = index.find_matches(&r.hashes);
        lats.push(t0.elapsed().as_nanos() as u64);
        ok += usize::from(own_full_match(r, &matches));
    }
    let d = t.elapsed();
    println!(
        "find_matches on full tree: {} queries ({} blocks) in {:.3}s -> {:.0} queries/s, {:.0} query-blocks/s; own-worker full match {ok}/{}",
        w.reqs.len(), w.total_query_blocks, d.as_secs_f64(), rate(w.reqs.len() as u64, d),
        rate(w.total_query_blocks, d), w.reqs.len()
    );
    println!("  {}", lat_summary("find_matches latency", lats));
    anyhow::ensure!(
        ok == w.reqs.len(),
        "a request's own worker did not match in full"
    );

    let mut router = Router::new(args.workers);
    let mut lats = Vec::with_capacity(w.reqs.len());
    let mut picks = 0usize;
    for r in &w.reqs {
        let t0 = Instant::now();
        picks = picks.wrapping_add(router.decide(&index, &r.hashes, args.block_size));
        lats.push(t0.elapsed().as_nanos() as u64);
    }
    std::hint::black_box(picks);
    println!(
        "  {}",
        lat_summary(
            &format!(
                "routing decision (find_matches + cost over {} workers)",
                args.workers
            ),
            lats
        )
    );

    let t = Instant::now();
    let errs = apply_all(&mut index, &w.removed);
    let d = t.elapsed();
    println!(
        "remove: {} Removed events, {} blocks in {:.3}s -> {:.0} events/s, {:.0} blocks/s (errors={errs}, tree size after={})",
        w.removed.len(), w.total_stored_blocks, d.as_secs_f64(), rate(w.removed.len() as u64, d),
        rate(w.total_stored_blocks, d), index.total_blocks()
    );
    drop(index);

    let mut index = KvIndexer::new();
    let mut qlat = Vec::with_capacity(w.reqs.len());
    let mut elat = Vec::with_capacity(w.stored.len());
    let t = Instant::now();
    for r in &w.reqs {
        let t0 = Instant::now();
        let matches = index.find_matches(&r.hashes);
        qlat.push(t0.elapsed().as_nanos() as u64);
        std::hint::black_box(&matches);
        if let Some(e) = r.event {
            let (worker, event) = &w.stored[e];
            let t0 = Instant::now();
            let _ = index.apply(*worker, event);
            elat.push(t0.elapsed().as_nanos() as u64);
        }
    }
    let d = t.elapsed();
    let ops = (w.reqs.len() + w.stored.len()) as u64;
    let bops = w.total_query_blocks + w.total_stored_blocks;
    println!(
        "replay (find_matches + apply Stored per request, serial): {ops} ops, {bops} block-ops in {:.3}s -> {:.0} ops/s, {:.0} block-ops/s",
        d.as_secs_f64(), rate(ops, d), rate(bops, d)
    );
    println!("  {}", lat_summary("query latency", qlat));
    println!("  {}", lat_summary("apply_event(Stored) latency", elat));
    Ok(())
}
