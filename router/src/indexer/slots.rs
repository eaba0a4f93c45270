//! The small pieces under the index: hashers for maps keyed by block hashes (pass-through) and
//! by worker ids, and the per-node set of worker slots.

use std::hash::{BuildHasherDefault, Hasher};

/// Keys are XXH3 outputs, already uniformly mixed: hashing them again would only cost time.
#[derive(Default, Clone, Copy)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are expected; anything else still hashes, just slowly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(crate) type HashMap<V> = std::collections::HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// Worker ids are arbitrary (not mixed), but a map of them is looked up on every event, so a
/// folded multiply (as FxHash) stands in for SipHash: the ids are not attacker-chosen.
#[derive(Default, Clone, Copy)]
pub(crate) struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (m >> 64) as u64 ^ m as u64;
    }
}

pub(crate) type WorkerMap<V> = std::collections::HashMap<u64, V, BuildHasherDefault<FoldHasher>>;

/// Set of worker slots holding one block. Slots below 64 live in `low`, so a deployment of up to
/// 64 workers never touches the heap; larger slots spill into `high` (word `i` covers slots
/// `64·(i+1)..64·(i+2)`). The spill is a boxed `Vec` — one thin pointer — so the set stays 16
/// bytes and a node 32.
#[derive(Default, Debug)]
pub(crate) struct SlotSet {
    pub(crate) low: u64,
    #[allow(clippy::box_collection)]
    high: Option<Box<Vec<u64>>>,
}

impl SlotSet {
    /// Adds `slot`; true when it was not there.
    #[inline]
    pub(crate) fn insert(&mut self, slot: usize) -> bool {
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        let w = if word == 0 {
            &mut self.low
        } else {
            let high = self.high.get_or_insert_with(Default::default);
            if high.len() < word {
                high.resize(word, 0);
            }
            &mut high[word - 1]
        };
        let added = *w & bit == 0;
        *w |= bit;
        added
    }

    /// Removes `slot`; true when it was there.
    #[inline]
    pub(crate) fn remove(&mut self, slot: usize) -> bool {
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        let w = if word == 0 {
            &mut self.low
        } else {
            match self.high.as_mut().and_then(|h| h.get_mut(word - 1)) {
                Some(w) => w,
                None => return false,
            }
        };
        let removed = *w & bit != 0;
        *w &= !bit;
        if removed
            && word > 0
            && self
                .high
                .as_ref()
                .is_some_and(|h| h.iter().all(|&w| w == 0))
        {
            // Back to the inline form, so `is_empty` stays one comparison for the common case.
            self.high = None;
        }
        removed
    }

    #[inline]
    pub(crate) fn contains(&self, slot: usize) -> bool {
        self.word(slot / 64) & (1u64 << (slot % 64)) != 0
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.low == 0 && self.high.is_none()
    }

    /// Word `i` of the set (slots `64·i..64·(i+1)`), zero past the end.
    #[inline]
    pub(crate) fn word(&self, i: usize) -> u64 {
        if i == 0 {
            self.low
        } else {
            self.high
                .as_ref()
                .and_then(|h| h.get(i - 1))
                .copied()
                .unwrap_or(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_and_shrinks_back() {
        let mut s = SlotSet::default();
        assert!(s.is_empty());
        assert!(s.insert(3));
        assert!(!s.insert(3));
        assert!(s.insert(130));
        assert!(s.contains(130) && s.contains(3) && !s.contains(66));
        assert_eq!(s.word(2), 1 << 2);
        assert!(!s.remove(66));
        assert!(s.remove(130));
        assert!(s.high.is_none());
        assert!(s.remove(3));
        assert!(s.is_empty());
        assert!(!s.remove(500));
    }
}
