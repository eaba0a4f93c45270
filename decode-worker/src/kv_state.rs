//! What a decode worker remembers of its own KV events so a router can catch up: a ring of
//! the most recent events and a mirror of its prefix cache (every cached block with its
//! parent), both as of the last event it published. A router that saw a gap in the event ids
//! asks for the events since the gap; if the ring no longer reaches back that far, or it asks
//! for a dump outright (a worker it meets for the first time), it gets the mirror.

use std::collections::{HashMap, VecDeque};

use runtime::kv_event::{CachedBlock, KvDump, KvEvent, KvEventData, KvStateQuery, KvStateReply};

/// Events kept for routers that missed some.
pub const KV_RING_EVENTS: usize = 4096;

pub struct KvState {
    ring: VecDeque<KvEvent>,
    capacity: usize,
    /// Block hash → (order of storing, the block): the order puts parents before children.
    mirror: HashMap<u64, (u64, CachedBlock)>,
    stored: u64,
    last_event_id: Option<u64>,
}

impl KvState {
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            mirror: HashMap::new(),
            stored: 0,
            last_event_id: None,
        }
    }

    /// Takes in the next event the worker publishes.
    pub fn record(&mut self, event: &KvEvent) {
        match &event.data {
            KvEventData::Stored {
                parent_hash,
                blocks,
            } => {
                let mut parent = *parent_hash;
                for block in blocks {
                    self.stored += 1;
                    self.mirror.insert(
                        block.block_hash,
                        (
                            self.stored,
                            CachedBlock {
                                parent_hash: parent,
                                block: *block,
                            },
                        ),
                    );
                    parent = Some(block.block_hash);
                }
            }
            KvEventData::Removed { block_hashes } => {
                for h in block_hashes {
                    self.mirror.remove(h);
                }
            }
            KvEventData::Cleared => self.mirror.clear(),
        }
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(event.clone());
        self.last_event_id = Some(event.event_id);
    }

    /// The events from `query.since` on when the ring still holds them all, else a dump.
    pub fn answer(&self, query: &KvStateQuery) -> KvStateReply {
        if let Some(since) = query.since {
            let next = self.last_event_id.map_or(0, |id| id + 1);
            let oldest = self.ring.front().map_or(next, |e| e.event_id);
            if since >= oldest && since <= next {
                return KvStateReply::Events(
                    self.ring
                        .iter()
                        .filter(|e| e.event_id >= since)
                        .cloned()
                        .collect(),
                );
            }
        }
        KvStateReply::Dump(self.dump())
    }

    pub fn dump(&self) -> KvDump {
        let mut blocks: Vec<&(u64, CachedBlock)> = self.mirror.values().collect();
        blocks.sort_unstable_by_key(|(order, _)| *order);
        KvDump {
            last_event_id: self.last_event_id,
            blocks: blocks.into_iter().map(|(_, b)| *b).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use runtime::block_hash::BlockHash;

    use super::*;

    fn stored(id: u64, parent: Option<u64>, hashes: &[u64]) -> KvEvent {
        KvEvent {
            event_id: id,
            data: KvEventData::Stored {
                parent_hash: parent,
                blocks: hashes
                    .iter()
                    .map(|&h| BlockHash {
                        block_hash: h,
                        tokens_hash: h + 100,
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn answers_from_the_ring_while_it_reaches_back_and_dumps_otherwise() {
        let mut state = KvState::new(2);
        state.record(&stored(0, None, &[1, 2]));
        state.record(&stored(1, Some(2), &[3]));
        state.record(&KvEvent {
            event_id: 2,
            data: KvEventData::Removed {
                block_hashes: vec![2],
            },
        });
        // Events 1 and 2 are in the ring; 0 is gone.
        match state.answer(&KvStateQuery { since: Some(1) }) {
            KvStateReply::Events(events) => {
                assert_eq!(
                    events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                    [1, 2]
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            state.answer(&KvStateQuery { since: Some(3) }),
            KvStateReply::Events(vec![])
        );
        let KvStateReply::Dump(dump) = state.answer(&KvStateQuery { since: Some(0) }) else {
            panic!("the ring no longer holds event 0");
        };
        assert_eq!(dump.last_event_id, Some(2));
        let hashes: Vec<(Option<u64>, u64)> = dump
            .blocks
            .iter()
            .map(|b| (b.parent_hash, b.block.block_hash))
            .collect();
        assert_eq!(hashes, [(None, 1), (Some(2), 3)]);
        assert!(matches!(
            KvState::new(4).answer(&KvStateQuery { since: None }),
            KvStateReply::Dump(KvDump {
                last_event_id: None,
                ..
            })
        ));
    }
}
