//! Round-robin: each request goes to the next instance in order. Even spread when requests
//! cost the same; blind to load and to cached prefixes.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{NoCapacity, RouteContext, RoutingPolicy, Selection};

#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % ctx.candidates.len();
        Ok(Selection::of(&ctx.candidates[i]))
    }
}
