//! Least-loaded: the worker with the fewest active requests, ties broken at random — nginx's
//! `least_conn`, the seed's baseline in front of vLLM. The count is the router's own live
//! accounting (shared by every router of the namespace), so it is current between the
//! workers' load reports.

use super::{random_among, NoCapacity, RouteContext, RoutingPolicy, Selection};

pub struct LeastLoaded;

impl RoutingPolicy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity> {
        let c = ctx.candidates;
        let fewest = c
            .iter()
            .map(|c| c.counts.active_requests)
            .min()
            .unwrap_or(0);
        let i = random_among(c.len(), |i| c[i].counts.active_requests == fewest);
        Ok(Selection::of(&c[i]))
    }
}
