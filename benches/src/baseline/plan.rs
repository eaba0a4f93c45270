//! What the side-by-side report measures: the engine points (the same for vLLM and Baton, with
//! the same prompts) and the routing workloads of the seed's baseline shape, at full size or
//! tiny (`make test`'s proof that the report runs end to end).

use serde::Serialize;

/// Which figure a point's table row shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Figure {
    /// ISL / median TTFT, tok/s (single requests, one output token).
    Prefill,
    /// 1000 / mean ITL, tok/s of one stream.
    Decode,
    /// Output tok/s of the whole run.
    Throughput,
    /// The seed's shape: output tok/s, and mean ITL, E2E and TTFT.
    Seed,
}

#[derive(Clone, Debug, Serialize)]
pub struct PointSpec {
    /// Stable name, the same at every size (`prefill-512` stays `prefill-512` when tiny).
    pub key: &'static str,
    /// Short category name for plots.
    pub short: &'static str,
    /// `completions` or `chat`.
    pub endpoint: &'static str,
    pub isl: usize,
    pub osl: usize,
    pub concurrency: usize,
    pub requests: usize,
    pub warmup: usize,
    pub figure: Figure,
    /// Part of the dtype probe.
    pub probe: bool,
}

impl PointSpec {
    /// The row title, with the sizes this run used.
    pub fn title(&self) -> String {
        match self.figure {
            Figure::Prefill => format!("prefill, ISL {}", self.isl),
            Figure::Decode => format!("single stream, ISL {} / OSL {}", self.isl, self.osl),
            Figure::Throughput => format!(
                "{} streams, ISL {} / OSL {}",
                self.concurrency, self.isl, self.osl
            ),
            Figure::Seed => format!(
                "seed's shape (chat), ISL {} / OSL {}, concurrency {}",
                self.isl, self.osl, self.concurrency
            ),
        }
    }
}

/// A workload for the routing comparison (nginx `least_conn` against Baton's kv router).
#[derive(Clone, Debug, Serialize)]
pub struct RoutingSpec {
    pub key: &'static str,
    pub isl: usize,
    /// Tokens every prompt starts with (0: none shared).
    pub shared_prefix: usize,
    pub osl: usize,
    pub concurrency: usize,
    pub requests: usize,
    pub warmup: usize,
}

impl RoutingSpec {
    pub fn title(&self) -> String {
        if self.shared_prefix > 0 {
            format!(
                "{} of {} tokens shared, OSL {}, concurrency {}",
                self.shared_prefix, self.isl, self.osl, self.concurrency
            )
        } else {
            format!(
                "nothing shared, ISL {}, OSL {}, concurrency {}",
                self.isl, self.osl, self.concurrency
            )
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub points: Vec<PointSpec>,
    pub routing: Vec<RoutingSpec>,
}

#[allow(clippy::too_many_arguments)]
fn point(
    key: &'static str,
    short: &'static str,
    endpoint: &'static str,
    (isl, osl): (usize, usize),
    concurrency: usize,
    (requests, warmup): (usize, usize),
    figure: Figure,
    probe: bool,
) -> PointSpec {
    PointSpec {
        key,
        short,
        endpoint,
        isl,
        osl,
        concurrency,
        requests,
        warmup,
        figure,
        probe,
    }
}

impl Plan {
    /// The points. Request counts keep a full run near 20 minutes on two cores: the
    /// prefill medians are over 5 and 3 requests, the stream points over two waves of each
    /// concurrency after one warm-up wave, the seed's shape over 2 × C requests (its own
    /// `--request-count`) after one warm-up request.
    #[rustfmt::skip]
    pub fn full() -> Plan {
        use Figure::*;
        Plan {
            points: vec![
                point("prefill-512", "prefill 512", "completions", (512, 1), 1, (5, 1), Prefill, true),
                point("prefill-2048", "prefill 2048", "completions", (2048, 1), 1, (3, 1), Prefill, false),
                point("single-stream", "1 stream", "completions", (512, 128), 1, (3, 1), Decode, false),
                point("streams-8", "8 streams", "completions", (128, 128), 8, (16, 8), Throughput, true),
                point("streams-32", "32 streams", "completions", (128, 128), 32, (64, 32), Throughput, false),
                point("seed-c2", "seed c=2", "chat", (3000, 150), 2, (4, 1), Seed, false),
                point("seed-c4", "seed c=4", "chat", (3000, 150), 4, (8, 1), Seed, false),
            ],
            routing: vec![
                RoutingSpec { key: "shared-prefix", isl: 1280, shared_prefix: 1024, osl: 32, concurrency: 4, requests: 16, warmup: 4 },
                RoutingSpec { key: "no-sharing", isl: 1280, shared_prefix: 0, osl: 32, concurrency: 4, requests: 16, warmup: 4 },
            ],
        }
    }

    /// The same points at sizes that take seconds: proves the report runs, measures nothing.
    #[rustfmt::skip]
    pub fn tiny() -> Plan {
        use Figure::*;
        Plan {
            points: vec![
                point("prefill-512", "prefill 512", "completions", (64, 1), 1, (2, 1), Prefill, true),
                point("prefill-2048", "prefill 2048", "completions", (128, 1), 1, (2, 0), Prefill, false),
                point("single-stream", "1 stream", "completions", (32, 8), 1, (2, 0), Decode, false),
                point("streams-8", "8 streams", "completions", (16, 8), 8, (8, 0), Throughput, true),
                point("streams-32", "32 streams", "completions", (16, 4), 32, (32, 0), Throughput, false),
                point("seed-c2", "seed c=2", "chat", (64, 8), 2, (2, 0), Seed, false),
                point("seed-c4", "seed c=4", "chat", (64, 8), 4, (4, 0), Seed, false),
            ],
            routing: vec![
                RoutingSpec { key: "shared-prefix", isl: 192, shared_prefix: 128, osl: 4, concurrency: 2, requests: 4, warmup: 0 },
                RoutingSpec { key: "no-sharing", isl: 64, shared_prefix: 0, osl: 4, concurrency: 2, requests: 4, warmup: 0 },
            ],
        }
    }

    /// Every measured request count times `scale` (at least one request, at least one per
    /// stream of a concurrency level so every level is reached).
    pub fn scaled(mut self, scale: f64) -> Plan {
        let f = |n: usize, floor: usize| ((n as f64 * scale).round() as usize).max(floor).max(1);
        for p in &mut self.points {
            p.requests = f(p.requests, p.concurrency);
        }
        for r in &mut self.routing {
            r.requests = f(r.requests, r.concurrency);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_and_tiny_plans_have_the_same_points_and_the_probe_is_in_both() {
        let (full, tiny) = (Plan::full(), Plan::tiny());
        let keys = |p: &Plan| p.points.iter().map(|x| x.key).collect::<Vec<_>>();
        assert_eq!(keys(&full), keys(&tiny));
        for plan in [&full, &tiny] {
            let probe: Vec<_> = plan
                .points
                .iter()
                .filter(|p| p.probe)
                .map(|p| p.key)
                .collect();
            assert_eq!(probe, ["prefill-512", "streams-8"]);
            for r in &plan.routing {
                assert!(r.shared_prefix < r.isl, "{}", r.key);
            }
        }
        let seed = full.points.iter().find(|p| p.key == "seed-c4").unwrap();
        assert_eq!((seed.isl, seed.osl, seed.endpoint), (3000, 150, "chat"));
        assert!(seed.title().contains("3000"));
    }

    #[test]
    fn scaling_keeps_every_stream_busy() {
        let p = Plan::full().scaled(0.01);
        assert!(p.points.iter().all(|x| x.requests >= x.concurrency));
        let p = Plan::full().scaled(2.0);
        assert_eq!(p.points[0].requests, 10);
    }
}
