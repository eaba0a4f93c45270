//! Power of two choices: two distinct workers at random, the one with fewer active requests
//! wins (ties: the first drawn). Nearly least-loaded's balance, but routers that share no
//! state rarely agree on the same worker, so it does not herd (Mitzenmacher's result).

use super::{NoCapacity, RouteContext, RoutingPolicy, Selection};

pub struct PowerOfTwo;

impl RoutingPolicy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn select(&self, ctx: &RouteContext<'_>) -> Result<Selection, NoCapacity> {
        let c = ctx.candidates;
        if c.len() == 1 {
            return Ok(Selection::of(&c[0]));
        }
        let a = rand::random_range(0..c.len());
        let b = (a + rand::random_range(1..c.len())) % c.len();
        let pick = if c[b].counts.active_requests < c[a].counts.active_requests {
            b
        } else {
            a
        };
        Ok(Selection::of(&c[pick]))
    }
}
