//! Random: a uniformly random instance per request; stateless, so several routers never
//! herd onto the same worker.

use super::{NoCapacity, RouteContext, RoutingPolicy, Selection};

pub struct Random;

impl RoutingPolicy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity> {
        let i = rand::random_range(0..ctx.candidates.len());
        Ok(Selection::of(&ctx.candidates[i]))
    }
}
