//! One shard of the in-memory store: a bounded table of counter states keyed by 128-bit
//! key hashes, with lazy expiry and sampled eviction.
//!
//! States live inline in one `Vec` (no per-counter allocation, no reference counts) and a
//! hash index maps key hashes to their slot. A slot that outlived its state's lifetime
//! reads as empty. When the shard is full, a few random slots are sampled and the one that
//! expires first goes — Redis's approximated LRU: with equal lifetimes that is the least
//! recently used of the sample, and an already expired slot is always taken first.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::algorithm::CounterState;

/// Slots examined to choose an eviction victim (Redis's default `maxmemory-samples`).
const EVICTION_SAMPLES: usize = 5;

/// One counter: its key hash, when it stops mattering, and its state.
struct Slot {
    key: u128,
    /// Milliseconds on the decision clock after which the state can no longer influence a
    /// decision (last use + the state's lifetime).
    expires_at_millis: u64,
    state: CounterState,
}

/// What an insertion into a full shard removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    Nothing,
    /// A slot whose state had already expired: not counted as an eviction.
    Expired,
    /// A live counter, dropped to stay within capacity.
    Evicted,
}

/// The store-wide bound all shards share. Capacity is not split per shard: keys do not
/// spread exactly evenly, and a store of N must hold N counters, not evict from one full
/// shard while others have room.
pub struct Room {
    entries: AtomicU64,
    capacity: u64,
}

impl Room {
    pub fn new(capacity: u64) -> Self {
        Self {
            entries: AtomicU64::new(0),
            capacity: capacity.max(1),
        }
    }

    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Takes a place for a new counter; `false` when the store is full and the taker must
    /// free one first. (Taking before checking means two shards inserting at once cannot
    /// both slip past the bound.)
    fn take(&self) -> bool {
        self.entries.fetch_add(1, Ordering::Relaxed) < self.capacity
    }

    fn give_back(&self) {
        self.entries.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Shard {
    index: HashMap<u128, u32, KeyHashIsTheHash>,
    slots: Vec<Slot>,
    /// xorshift state for sampling; its quality only affects which slots get sampled.
    random: u64,
}

impl Shard {
    pub fn new(seed: u64) -> Self {
        Self {
            index: HashMap::with_hasher(KeyHashIsTheHash),
            slots: Vec::new(),
            random: seed | 1,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The state under `key` as of `now_millis` (empty when absent or expired), without
    /// touching the slot.
    pub fn read(&self, key: u128, now_millis: u64) -> CounterState {
        self.index
            .get(&key)
            .and_then(|&at| self.slots.get(at as usize))
            .filter(|slot| slot.expires_at_millis > now_millis)
            .map(|slot| slot.state.clone())
            .unwrap_or_default()
    }

    /// The state under `key`, created empty (or reset, when expired) if need be, and kept
    /// for `lifetime_millis` from now. Creating one in a full store removes another from
    /// this shard first.
    /// (`None` only if the index pointed past the slots, which `insert` and `remove` rule
    /// out; callers then decide on an empty state rather than panic.)
    pub fn get_mut(
        &mut self,
        room: &Room,
        key: u128,
        now_millis: u64,
        lifetime_millis: u64,
    ) -> (Option<&mut CounterState>, Removed) {
        let expires_at_millis = now_millis.saturating_add(lifetime_millis);
        let (at, removed) = match self.index.get(&key) {
            Some(&at) => (at as usize, Removed::Nothing),
            None => self.insert(room, key, now_millis),
        };
        let state = self.slots.get_mut(at).map(|slot| {
            if slot.expires_at_millis <= now_millis {
                slot.state = CounterState::Empty;
            }
            slot.expires_at_millis = expires_at_millis;
            &mut slot.state
        });
        (state, removed)
    }

    /// Every counter still live at `now_millis`: its key hash, expiry and state.
    pub fn live(&self, now_millis: u64) -> impl Iterator<Item = (u128, u64, &CounterState)> {
        self.slots
            .iter()
            .filter(move |slot| slot.expires_at_millis > now_millis)
            .map(|slot| (slot.key, slot.expires_at_millis, &slot.state))
    }

    /// Drops the state under `key`, if any, giving its place back to `room`.
    pub fn forget(&mut self, room: &Room, key: u128) {
        if let Some(&at) = self.index.get(&key) {
            self.remove(at as usize);
            room.give_back();
        }
    }

    /// Puts a saved counter back, at start-up. `false` when the store is full: a snapshot
    /// larger than today's capacity keeps what fits, and evicts nothing to make room.
    pub fn restore(
        &mut self,
        room: &Room,
        key: u128,
        expires_at_millis: u64,
        state: CounterState,
    ) -> bool {
        if let Some(&at) = self.index.get(&key) {
            if let Some(slot) = self.slots.get_mut(at as usize) {
                slot.expires_at_millis = expires_at_millis;
                slot.state = state;
            }
            return true;
        }
        if !room.take() {
            room.give_back();
            return false;
        }
        self.index.insert(key, self.slots.len() as u32);
        self.slots.push(Slot {
            key,
            expires_at_millis,
            state,
        });
        true
    }

    fn insert(&mut self, room: &Room, key: u128, now_millis: u64) -> (usize, Removed) {
        let removed = if !room.take() {
            // Full: this insertion's place is paid for by one of this shard's counters. (A
            // shard with none to give holds under 1/64 of a full store's share, which
            // uniform hashing does not produce; the counter is kept regardless, since
            // dropping it would stop limiting its key.)
            let removed = self.evict_one(now_millis);
            if removed != Removed::Nothing {
                room.give_back();
            }
            removed
        } else {
            // Below capacity, one sampled slot per insertion is still dropped if expired,
            // so a shard's size follows the live counters rather than only ever growing.
            let sampled = self.sample();
            if self
                .slots
                .get(sampled)
                .is_some_and(|slot| slot.expires_at_millis <= now_millis)
            {
                self.remove(sampled);
                room.give_back();
                Removed::Expired
            } else {
                Removed::Nothing
            }
        };
        let at = self.slots.len();
        self.slots.push(Slot {
            key,
            expires_at_millis: now_millis,
            state: CounterState::Empty,
        });
        // Shard capacity is far below u32::MAX (the store splits at most u64 entries
        // over at least one shard, and a u32 index of 4 billion counters is ~400 GB).
        self.index.insert(key, at as u32);
        (at, removed)
    }

    fn evict_one(&mut self, now_millis: u64) -> Removed {
        let mut victim: Option<(usize, u64)> = None;
        for _ in 0..EVICTION_SAMPLES {
            let at = self.sample();
            let Some(slot) = self.slots.get(at) else {
                continue;
            };
            if victim.is_none_or(|(_, expires)| slot.expires_at_millis < expires) {
                victim = Some((at, slot.expires_at_millis));
            }
        }
        match victim {
            Some((at, expires)) => {
                self.remove(at);
                if expires <= now_millis {
                    Removed::Expired
                } else {
                    Removed::Evicted
                }
            }
            None => Removed::Nothing,
        }
    }

    /// Removes the slot at `at`, moving the last slot into its place.
    fn remove(&mut self, at: usize) {
        if at >= self.slots.len() {
            return;
        }
        let gone = self.slots.swap_remove(at);
        self.index.remove(&gone.key);
        if let Some(moved) = self.slots.get(at) {
            self.index.insert(moved.key, at as u32);
        }
    }

    /// A random slot position (0 when empty).
    fn sample(&mut self) -> usize {
        // xorshift64: a few cycles, and nothing here needs better randomness.
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random = x;
        match self.slots.len() {
            0 => 0,
            len => (x % len as u64) as usize,
        }
    }
}

/// The index's hasher: keys are already uniform 128-bit hashes (xxh3 with a per-process
/// seed), so their low half is used as is rather than hashed a second time. The store picks
/// a shard from the high half, so the two choices stay independent.
#[derive(Clone, Copy, Default)]
struct KeyHashIsTheHash;

impl BuildHasher for KeyHashIsTheHash {
    type Hasher = LowHalf;

    fn build_hasher(&self) -> LowHalf {
        LowHalf(0)
    }
}

struct LowHalf(u64);

impl Hasher for LowHalf {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed here; this keeps the trait total all the same.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::WindowState;

    fn window(current: u64) -> CounterState {
        CounterState::Window(WindowState {
            window: 1,
            current,
            previous: 0,
        })
    }

    #[test]
    fn a_state_reads_back_until_it_expires() {
        let (room, mut shard) = (Room::new(10), Shard::new(7));
        *shard.get_mut(&room, 1, 1_000, 500).0.unwrap() = window(3);
        assert_eq!(shard.read(1, 1_499), window(3));
        assert_eq!(shard.read(1, 1_500), CounterState::Empty, "expired");
        assert_eq!(shard.read(2, 1_000), CounterState::Empty, "never written");
        // Using an expired slot starts it over rather than resurrecting the old counts.
        assert_eq!(
            *shard.get_mut(&room, 1, 2_000, 500).0.unwrap(),
            CounterState::Empty
        );
    }

    #[test]
    fn each_use_extends_the_lifetime() {
        let (room, mut shard) = (Room::new(10), Shard::new(7));
        *shard.get_mut(&room, 1, 0, 100).0.unwrap() = window(1);
        shard.get_mut(&room, 1, 90, 100);
        assert_eq!(shard.read(1, 150), window(1));
    }

    #[test]
    fn a_full_shard_evicts_to_stay_within_capacity() {
        let (room, mut shard) = (Room::new(100), Shard::new(7));
        let mut evicted = 0;
        for key in 0..10_000u128 {
            if shard.get_mut(&room, key, 0, 60_000).1 == Removed::Evicted {
                evicted += 1;
            }
        }
        assert_eq!(shard.len(), 100);
        assert_eq!(room.entries(), 100);
        assert_eq!(evicted, 9_900);
        // Every index entry still points at its own slot.
        for (key, &at) in &shard.index {
            assert_eq!(shard.slots[at as usize].key, *key);
        }
    }

    #[test]
    fn expired_slots_go_before_live_ones_and_are_not_evictions() {
        let (room, mut shard) = (Room::new(4), Shard::new(7));
        for key in 0..4u128 {
            *shard.get_mut(&room, key, 0, 10).0.unwrap() = window(1);
        }
        // All four expired at 10: replacing them is expiry, not eviction.
        for key in 10..14u128 {
            assert_ne!(shard.get_mut(&room, key, 100, 1_000).1, Removed::Evicted);
        }
        assert_eq!((shard.len(), room.entries()), (4, 4));
    }

    #[test]
    fn shards_share_one_capacity() {
        // Two shards of one store of 10: the busy one holds more than half, and once the
        // store is full each new key takes the place of one in its own shard.
        let (room, mut busy, mut quiet) = (Room::new(10), Shard::new(7), Shard::new(8));
        for key in 0..8u128 {
            assert_eq!(busy.get_mut(&room, key, 0, 1_000).1, Removed::Nothing);
        }
        for key in 8..10u128 {
            assert_eq!(quiet.get_mut(&room, key, 0, 1_000).1, Removed::Nothing);
        }
        for key in 10..30u128 {
            assert_eq!(quiet.get_mut(&room, key, 0, 1_000).1, Removed::Evicted);
        }
        assert_eq!((busy.len(), quiet.len(), room.entries()), (8, 2, 10));
    }

    #[test]
    fn eviction_prefers_the_least_recently_used() {
        // One hot key used on every step survives a stream of one-off keys.
        let (room, mut shard) = (Room::new(50), Shard::new(7));
        for step in 0..5_000u64 {
            *shard.get_mut(&room, u128::MAX, step, 1_000).0.unwrap() = window(step);
            shard.get_mut(&room, u128::from(step), step, 1_000);
        }
        assert_eq!(shard.read(u128::MAX, 5_000), window(4_999));
    }
}
