//! KV-cache-aware routing (DESIGN.md §5, the shape of Dynamo's cost): each worker is charged
//! the prefill it would still have to compute and the decode load it would carry,
//!
//! `cost = prefill_load_scale · max(prefill_blocks − overlap_credit · overlap_blocks, 0) + decode_blocks`
//!
//! with `prefill_blocks = (pending prefill tokens on the worker + this prompt) / block size`
//! and `decode_blocks = the worker's active prompt blocks + this prompt's`, both from the
//! router's live accounting. At temperature 0 the cheapest worker wins; at temperature `t` > 0
//! a worker is drawn with probability ∝ `exp(−c/t)` over costs min-max normalised to 0..1.
//!
//! Where it departs from Dynamo, on purpose:
//! - Ties go to the worker with more overlap first, so a conversation keeps its worker when its
//!   score ties with a cold one (ai-dynamo/dynamo#3581), then — only when some worker holds a
//!   prefix — to the smaller cache; cold requests (no overlap anywhere) break ties by active
//!   requests and then at random, never by tree size, which sends every cold burst that
//!   arrives before the counts move to the same worker.
//! - Load is charged in the same unit as the overlap credit (blocks), and the counts move at
//!   dispatch, not at the workers' next report, so a popular shared prefix stops attracting
//!   requests as soon as the queue it builds costs more than the prefill it saves
//!   (ai-dynamo/dynamo#7836: workers starved under single-turn traffic).

use super::{random_among, Candidate, NoCapacity, RouteContext, RoutingPolicy, Selection};
use crate::error::RouterError;

/// The knobs of the KV cost (`--kv-overlap-credit`, `--kv-prefill-load-scale`,
/// `--router-temperature`; the `Router:` section of a graph config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCostConfig {
    /// Weight of the prefill term against the decode term.
    pub prefill_load_scale: f64,
    /// Blocks of prefill one cached block saves (1: a cached block costs nothing to prefill).
    pub overlap_credit: f64,
    /// 0: always the cheapest; higher spreads requests over near-cheapest workers.
    pub temperature: f64,
    /// Weight of the recent-load signal (`Candidate::recent_blocks`) added to the decode term;
    /// 0 (the default) is Dynamo's cost. Above 0, traffic paced so that nothing is in flight at
    /// a decision still spreads once one worker has taken enough of it to outweigh the prefill
    /// a shared prefix saves (Infera#103's symptom); 0.1 keeps long conversations (overlap of
    /// many blocks) on their worker.
    pub recent_load_weight: f64,
}

impl Default for KvCostConfig {
    fn default() -> Self {
        Self {
            prefill_load_scale: 1.0,
            overlap_credit: 1.0,
            temperature: 0.0,
            recent_load_weight: 0.0,
        }
    }
}

impl KvCostConfig {
    pub fn check(&self) -> Result<(), RouterError> {
        for (name, value) in [
            ("kv-prefill-load-scale", self.prefill_load_scale),
            ("kv-overlap-credit", self.overlap_credit),
            ("router-temperature", self.temperature),
            ("kv-recent-load-weight", self.recent_load_weight),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(RouterError::InvalidOption {
                    name,
                    value: value.to_string(),
                    reason: "must be a finite number ≥ 0",
                });
            }
        }
        Ok(())
    }
}

pub struct KvRouting {
    config: KvCostConfig,
}

impl KvRouting {
    pub fn new(config: KvCostConfig) -> Result<Self, RouterError> {
        config.check()?;
        Ok(Self { config })
    }

    /// The cost of sending the request to `c`.
    pub fn cost(&self, ctx: &RouteContext<'_>, c: &Candidate<'_>) -> f64 {
        let bs = ctx.block_size.max(1) as f64;
        let prefill_blocks = (c.counts.prefill_tokens + ctx.token_ids.len()) as f64 / bs;
        let uncached =
            (prefill_blocks - self.config.overlap_credit * c.overlap_blocks as f64).max(0.0);
        let decode_blocks = (c.counts.active_blocks + ctx.prompt_blocks()) as f64
            + self.config.recent_load_weight * c.recent_blocks;
        self.config.prefill_load_scale * uncached + decode_blocks
    }
}

/// Costs closer than this are ties (they are sums of small multiples of 1/block size).
const TIE: f64 = 1e-9;

impl RoutingPolicy for KvRouting {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity> {
        let c = ctx.candidates;
        let costs: Vec<f64> = c.iter().map(|cand| self.cost(ctx, cand)).collect();
        let pick = if self.config.temperature > 0.0 {
            softmax_draw(&costs, self.config.temperature)
        } else {
            argmin_with_ties(c, &costs)
        };
        Ok(Selection::of(&c[pick]))
    }
}

fn argmin_with_ties(c: &[Candidate<'_>], costs: &[f64]) -> usize {
    let best = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let tied = |i: usize| costs[i] - best <= TIE;
    let most_overlap = (0..c.len())
        .filter(|&i| tied(i))
        .map(|i| c[i].overlap_blocks)
        .max()
        .unwrap_or(0);
    let tied = |i: usize| tied(i) && c[i].overlap_blocks == most_overlap;
    if most_overlap > 0 {
        let smallest = (0..c.len())
            .filter(|&i| tied(i))
            .map(|i| c[i].cached_blocks)
            .min()
            .unwrap_or(0);
        random_among(c.len(), |i| tied(i) && c[i].cached_blocks == smallest)
    } else {
        let fewest = (0..c.len())
            .filter(|&i| tied(i))
            .map(|i| c[i].counts.active_requests)
            .min()
            .unwrap_or(0);
        random_among(c.len(), |i| {
            tied(i) && c[i].counts.active_requests == fewest
        })
    }
}

/// Draws an index with probability ∝ exp(−normalised cost / t).
fn softmax_draw(costs: &[f64], t: f64) -> usize {
    let lo = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = costs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = if hi - lo > TIE { hi - lo } else { 1.0 };
    let weights: Vec<f64> = costs.iter().map(|c| (-(c - lo) / span / t).exp()).collect();
    let mut x = rand::random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    costs.len() - 1
}

#[cfg(test)]
mod tests {
    use runtime::discovery::{EndpointId, Instance};

    use super::*;
    use crate::policy::WorkerCounts;

    fn instance(id: u64) -> Instance {
        Instance {
            instance_id: id,
            endpoint: EndpointId::new("t", "w", "g"),
            address: format!("a{id}"),
            model: None,
            metadata: serde_json::Value::Null,
        }
    }

    fn pick(
        policy: &KvRouting,
        prompt: usize,
        workers: &[(usize, usize, WorkerCounts)],
    ) -> Vec<usize> {
        let instances: Vec<Instance> = (0..workers.len() as u64).map(instance).collect();
        let candidates: Vec<Candidate<'_>> = workers
            .iter()
            .zip(&instances)
            .map(|(&(overlap, cached, counts), instance)| Candidate {
                instance,
                overlap_blocks: overlap,
                cached_blocks: cached,
                counts,
                recent_blocks: 0.0,
                reported: None,
            })
            .collect();
        let tokens = vec![0u32; prompt];
        let ctx = RouteContext {
            request_id: "r",
            token_ids: &tokens,
            block_hashes: &[],
            block_size: 128,
            candidates: &candidates,
        };
        (0..200)
            .map(|_| policy.select(&ctx).unwrap().instance_id as usize)
            .collect()
    }

    fn load(active_requests: usize, prefill_tokens: usize, active_blocks: usize) -> WorkerCounts {
        WorkerCounts {
            active_requests,
            prefill_tokens,
            active_blocks,
        }
    }

    #[test]
    fn overlap_wins_when_load_is_equal_and_load_wins_when_it_outweighs_it() {
        let kv = KvRouting::new(KvCostConfig::default()).unwrap();
        let idle = load(0, 0, 0);
        // 8 blocks of prompt, 7 cached on worker 0: 1 + 8 against 8 + 8.
        assert!(pick(&kv, 1024, &[(7, 7, idle), (0, 0, idle)])
            .iter()
            .all(|&w| w == 0));
        // Worker 0 carries 20 blocks of decode: 1 + 28 against 8 + 8 — the load wins.
        assert!(pick(&kv, 1024, &[(7, 7, load(3, 0, 20)), (0, 0, idle)])
            .iter()
            .all(|&w| w == 1));
    }

    #[test]
    fn ties_prefer_overlap_then_a_smaller_cache_and_spread_cold_requests() {
        let kv = KvRouting::new(KvCostConfig {
            overlap_credit: 0.0,
            ..KvCostConfig::default()
        })
        .unwrap();
        let idle = load(0, 0, 0);
        // Overlap earns no credit, so costs tie: the worker with the overlap keeps it.
        assert!(
            pick(&kv, 1024, &[(0, 0, idle), (4, 50, idle), (4, 90, idle)])
                .iter()
                .all(|&w| w == 1)
        );
        // Cold everywhere: tree sizes do not matter, ties spread at random.
        let cold = pick(&kv, 1024, &[(0, 0, idle), (0, 500, idle)]);
        assert!(cold.contains(&0) && cold.contains(&1));
    }

    #[test]
    fn temperature_spreads_over_near_cheapest_and_bad_knobs_are_named() {
        let kv = KvRouting::new(KvCostConfig {
            temperature: 1.0,
            ..KvCostConfig::default()
        })
        .unwrap();
        let idle = load(0, 0, 0);
        let picks = pick(&kv, 1024, &[(7, 7, idle), (0, 0, idle)]);
        let to_cached = picks.iter().filter(|&&w| w == 0).count();
        assert!(to_cached > 100 && to_cached < 200, "{to_cached}");
        let err = KvRouting::new(KvCostConfig {
            overlap_credit: f64::NAN,
            ..KvCostConfig::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("kv-overlap-credit"), "{err}");
    }
}
