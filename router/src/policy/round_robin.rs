//! Round-robin: each request goes to the next instance in order. Even spread when requests
//! cost the same; blind to load and to cached prefixes.

use std::sync::atomic::{AtomicUsize, Ordering};

use runtime::discovery::Instance;

use super::{RouteContext, RoutingPolicy};

#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn select(&self, instances: &[Instance], _request: &RouteContext<'_>) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % instances.len()
    }
}
