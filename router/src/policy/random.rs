//! Random: a uniformly random instance per request; stateless, so several routers never
//! herd onto the same worker.

use runtime::discovery::Instance;

use super::{RouteContext, RoutingPolicy};

pub struct Random;

impl RoutingPolicy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn select(&self, instances: &[Instance], _request: &RouteContext<'_>) -> usize {
        rand::random_range(0..instances.len())
    }
}
