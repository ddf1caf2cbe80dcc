//! The in-memory counter store: per-key counter state in a bounded, sharded table.
//!
//! Keys are hashed to 128 bits (xxh3 with a per-process seed, so clients cannot aim keys
//! at one bucket) and the table holds no key strings; collisions are negligible at 2^-64
//! for billions of keys. Each state is dropped once it can no longer influence a decision;
//! when the table is full, sampled eviction drops the least recently used of a few, so a
//! flood of distinct keys cannot exhaust memory (see `shard`).
//!
//! Why not a general-purpose cache (moka, which the Redis store's over-limit cache uses):
//! a counter lookup is the whole work of a decision, and moka's per-entry bookkeeping
//! (reference-counted entries, access-order queues drained by maintenance) cost ~4x the
//! time and ~2.5x the memory of this table, see BENCHMARKS.md.

mod shard;
mod snapshot;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use self::shard::{Removed, Room, Shard};
use super::{Check, CounterStore, StoreError, groups};
use crate::algorithm::penalty::PenaltyState;
use crate::algorithm::{self, CounterState, Verdict};
use crate::key::KeyForm;

pub use self::snapshot::SnapshotError;

/// Most shards a store is split into. More than the cores that could contend for them, so
/// two decisions rarely wait on the same lock; few enough that summing them is cheap.
const MAX_SHARDS: usize = 64;
/// A shard per this many counters of capacity: a small store needs little parallelism,
/// and a full shard must have counters of its own to evict (see `shard::Room`).
const MIN_SHARD_CAPACITY: u64 = 1_024;

/// A shard's lock on its own cache lines, so neighbouring shards' locks do not share one.
#[repr(align(128))]
struct Padded(Mutex<Shard>);

struct Inner {
    shards: Box<[Padded]>,
    /// `shards.len() - 1`; the count is a power of two.
    mask: usize,
    seed: u64,
    room: Room,
    /// Counters dropped to stay within capacity (not those that expired).
    evictions: AtomicU64,
}

/// What `load_snapshot` took back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub counters: u64,
    /// Saved counters whose windows had ended by the time they were read.
    pub expired: u64,
    /// Saved counters left out because the store's capacity is smaller than it was.
    pub over_capacity: u64,
}

/// Counters in this process's memory, bounded by entry count.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl MemoryStore {
    /// A store holding at most `capacity` counters.
    pub fn new(capacity: u64) -> Self {
        let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), capacity);
        Self::with_seed(capacity, seed)
    }

    /// A store whose keys hash with `seed`: a new one's is random, a restored one's is the
    /// seed its counters were saved under.
    fn with_seed(capacity: u64, seed: u64) -> Self {
        let capacity = capacity.max(1);
        let shards = usize::try_from(capacity / MIN_SHARD_CAPACITY)
            .unwrap_or(MAX_SHARDS)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        let shards: Box<[Padded]> = (0..shards as u64)
            .map(|i| {
                Padded(Mutex::new(Shard::new(
                    seed ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                )))
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                mask: shards.len() - 1,
                shards,
                seed,
                room: Room::new(capacity),
                evictions: AtomicU64::new(0),
            }),
        }
    }

    /// Counters evicted to stay within capacity so far.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// Counters held, including expired ones not yet reclaimed (they go first when a
    /// shard needs room, and one is checked on every insertion).
    pub fn len(&self) -> u64 {
        self.inner.room.entries()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key_hash(&self, key: &str) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_seed(key.as_bytes(), self.inner.seed)
    }

    /// The penalty box state of a group lives under its first key with `|penalty` appended.
    fn penalty_hash(&self, key: &str) -> u128 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::with_seed(self.inner.seed);
        hasher.update(key.as_bytes());
        hasher.update(b"|penalty");
        hasher.digest128()
    }

    fn shard_of(&self, hash: u128) -> usize {
        // The high half picks the shard; the shard's index uses the low half.
        ((hash >> 64) as usize) & self.inner.mask
    }

    fn lock(&self, shard: usize) -> Option<MutexGuard<'_, Shard>> {
        self.inner.shards.get(shard).map(|padded| padded.0.lock())
    }

    fn counted(&self, removed: Removed) {
        if removed == Removed::Evicted {
            self.inner.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes every counter live at `now_millis` to `path` (replacing it whole); returns how
    /// many. Shards are copied one at a time, each under its lock only while its counters
    /// are copied out (encoding them happens after), so decisions go on meanwhile.
    pub fn save_snapshot(&self, path: &Path, now_millis: u64) -> Result<u64, SnapshotError> {
        let mut writer = snapshot::Writer::new(self.inner.seed);
        // Room for a shard's share and some, taken (and its pages touched) before any lock:
        // growing it while a shard is locked would make decisions there wait on the
        // allocator and page faults (up to 1 ms a shard instead of 0.3 ms at a million
        // counters, BENCHMARKS.md section 19).
        let share = self.len() as usize / self.inner.shards.len();
        let mut copied = vec![(0, 0, CounterState::Empty); share + share / 4 + 64];
        for padded in self.inner.shards.iter() {
            copied.clear();
            copied
                .extend((padded.0.lock().live(now_millis)).map(
                    |(key, expires_at_millis, state)| (key, expires_at_millis, state.clone()),
                ));
            for (key, expires_at_millis, state) in &copied {
                writer.push(*key, *expires_at_millis, state);
            }
        }
        let count = writer.count();
        snapshot::write_file(path, &writer.finish())?;
        Ok(count)
    }

    /// A store of `capacity` holding the counters `path` saved that are still live at
    /// `now_millis`, with how many it took back and how many had expired. Counters beyond
    /// `capacity` are left out.
    pub fn load_snapshot(
        capacity: u64,
        path: &Path,
        now_millis: u64,
    ) -> Result<(Self, Restored), SnapshotError> {
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut reader = snapshot::Reader::new(path, &bytes)?;
        let store = Self::with_seed(capacity, reader.seed);
        let mut restored = Restored::default();
        while let Some(entry) = reader.next_entry() {
            let entry = entry.map_err(|why| SnapshotError::Damaged {
                path: path.display().to_string(),
                why,
            })?;
            if entry.expires_at_millis <= now_millis {
                restored.expired += 1;
                continue;
            }
            let Some(mut shard) = store.lock(store.shard_of(entry.key)) else {
                continue;
            };
            if shard.restore(
                &store.inner.room,
                entry.key,
                entry.expires_at_millis,
                entry.state,
            ) {
                restored.counters += 1;
            } else {
                restored.over_capacity += 1;
            }
        }
        Ok((store, restored))
    }

    /// Applies one check synchronously; the in-memory store never waits.
    pub fn apply_one(&self, check: &Check<'_>, now_millis: u64) -> Verdict {
        let hash = self.key_hash(check.key);
        let lifetime = algorithm::state_lifetime_millis(&check.limit, check.count_rejected);
        let mut scratch = CounterState::Empty;
        let mut guard = self.lock(self.shard_of(hash));
        let (state, removed) = match guard.as_mut() {
            Some(shard) => shard.get_mut(&self.inner.room, hash, now_millis, lifetime),
            None => (None, Removed::Nothing),
        };
        let verdict = algorithm::apply(
            state.unwrap_or(&mut scratch),
            &check.limit,
            check.hits,
            now_millis,
            check.count_rejected,
        );
        drop(guard);
        self.counted(removed);
        verdict
    }

    /// Drops the counters of `checks` and the penalty boxes of their groups: the next hit
    /// finds them as if never used.
    pub fn forget_now(&self, checks: &[Check<'_>]) {
        for group in groups(checks) {
            let penalty = group
                .first()
                .filter(|c| c.penalty.is_some())
                .map(|c| self.penalty_hash(c.key));
            let hashes = group.iter().map(|c| self.key_hash(c.key)).chain(penalty);
            for hash in hashes {
                if let Some(mut shard) = self.lock(self.shard_of(hash)) {
                    shard.forget(&self.inner.room, hash);
                }
            }
        }
    }

    /// Applies one descriptor's checks all or nothing, appending their verdicts to `out`.
    /// (`count_rejected` only matters alone: envoyproxy-style rules carry a single limit.)
    pub fn apply_group(&self, group: &[Check<'_>], now_millis: u64, out: &mut Vec<Verdict>) {
        let penalty = group.first().and_then(|c| Some((c.key, c.penalty?)));
        if penalty.is_none()
            && let [check] = group
        {
            out.push(self.apply_one(check, now_millis));
            return;
        }
        let hashes: Vec<u128> = group.iter().map(|c| self.key_hash(c.key)).collect();
        let penalty = penalty.map(|(key, penalty)| (self.penalty_hash(key), penalty));
        let mut locked = Locked::new(self, hashes.iter().chain(penalty.iter().map(|(h, _)| h)));

        let mut box_state = None;
        if let Some((hash, penalty)) = penalty {
            let state = match locked.read(hash, now_millis) {
                CounterState::Penalty(state) => state,
                _ => PenaltyState::default(),
            };
            if let Some(left) = state.blocked_for(now_millis) {
                out.extend(group.iter().map(|_| Verdict {
                    over_limit: true,
                    remaining: 0,
                    reset_after_millis: left,
                    from_local_cache: false,
                }));
                return;
            }
            box_state = Some((hash, penalty, state));
        }

        let start = out.len();
        locked.apply_limits(group, &hashes, now_millis, out);
        let Some((hash, penalty, mut state)) = box_state else {
            return;
        };
        let verdicts = out.get_mut(start..).unwrap_or_default();
        // A zero-hit check (a usage query) only looks; it never earns a penalty.
        if verdicts.iter().any(|v| v.over_limit) && group.iter().any(|c| c.hits > 0) {
            let limit_reset = (verdicts.iter().filter(|v| v.over_limit))
                .map(|v| v.reset_after_millis)
                .max()
                .unwrap_or(0);
            let mut lifetime = PenaltyState::lifetime_millis(&penalty);
            if let Some(block) = state.record_rejection(&penalty, now_millis, limit_reset) {
                lifetime = lifetime.max(block);
                for verdict in verdicts.iter_mut().filter(|v| v.over_limit) {
                    verdict.reset_after_millis = block;
                }
            }
            locked.write(hash, CounterState::Penalty(state), now_millis, lifetime);
        }
    }
}

/// The shards one group touches, locked in index order so two groups sharing shards can
/// never deadlock; each shard is locked once however many of the group's keys it holds.
struct Locked<'s> {
    store: &'s MemoryStore,
    guards: Vec<(usize, MutexGuard<'s, Shard>)>,
}

impl<'s> Locked<'s> {
    fn new<'h>(store: &'s MemoryStore, hashes: impl Iterator<Item = &'h u128>) -> Self {
        let mut shards: Vec<usize> = hashes.map(|&hash| store.shard_of(hash)).collect();
        shards.sort_unstable();
        shards.dedup();
        let guards = shards
            .into_iter()
            .filter_map(|i| Some((i, store.lock(i)?)))
            .collect();
        Self { store, guards }
    }

    fn shard(&mut self, hash: u128) -> Option<&mut Shard> {
        let shard = self.store.shard_of(hash);
        let at = self.guards.binary_search_by_key(&shard, |(i, _)| *i).ok()?;
        self.guards.get_mut(at).map(|(_, guard)| &mut **guard)
    }

    fn read(&mut self, hash: u128, now_millis: u64) -> CounterState {
        self.shard(hash)
            .map(|shard| shard.read(hash, now_millis))
            .unwrap_or_default()
    }

    fn write(&mut self, hash: u128, state: CounterState, now_millis: u64, lifetime: u64) {
        let store = self.store;
        let Some(shard) = self.shard(hash) else {
            return;
        };
        let (slot, removed) = shard.get_mut(&store.inner.room, hash, now_millis, lifetime);
        if let Some(slot) = slot {
            *slot = state;
        }
        store.counted(removed);
    }

    /// The group's limits on copies of their states, kept only if every limit admits.
    fn apply_limits(
        &mut self,
        group: &[Check<'_>],
        hashes: &[u128],
        now_millis: u64,
        out: &mut Vec<Verdict>,
    ) {
        // A key listed twice is one state, counted twice, kept for the longer lifetime.
        let mut working: Vec<(u128, CounterState, u64)> = Vec::with_capacity(group.len());
        let start = out.len();
        for (check, &hash) in group.iter().zip(hashes) {
            let lifetime = algorithm::state_lifetime_millis(&check.limit, check.count_rejected);
            let at = match working.iter().position(|(h, _, _)| *h == hash) {
                Some(at) => at,
                None => {
                    let state = self.read(hash, now_millis);
                    working.push((hash, state, 0));
                    working.len() - 1
                }
            };
            let Some((_, state, kept_for)) = working.get_mut(at) else {
                continue;
            };
            *kept_for = (*kept_for).max(lifetime);
            out.push(algorithm::apply(
                state,
                &check.limit,
                check.hits,
                now_millis,
                check.count_rejected,
            ));
        }
        let admitted = out
            .get(start..)
            .is_some_and(|verdicts| verdicts.iter().all(|v| !v.over_limit));
        // A group is all or nothing, but for limits that count rejected hits: a cost charged
        // after the fact is charged to every limit (a lone check's state may have rolled).
        if admitted || group.len() == 1 || group.iter().all(|c| c.count_rejected) {
            for (hash, state, lifetime) in working {
                self.write(hash, state, now_millis, lifetime);
            }
        }
    }
}

impl CounterStore for MemoryStore {
    const NAME: &'static str = "memory";
    const WAITS: bool = false;
    // Keys are only hashed here, never shown: the packed form skips scanning and escaping.
    const KEY_FORM: KeyForm = KeyForm::Packed;

    fn apply(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
        out: &mut Vec<Verdict>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        out.clear();
        for group in groups(checks) {
            self.apply_group(group, now_millis, out);
        }
        std::future::ready(Ok(()))
    }

    fn forget(
        &self,
        checks: &[Check<'_>],
        _now_millis: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.forget_now(checks);
        std::future::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Algorithm, Limit, Unit};

    fn check(key: &str, requests_per_unit: u32) -> Check<'_> {
        Check {
            key,
            limit: Limit::per_unit(requests_per_unit, Unit::Minute, Algorithm::FixedWindow),
            hits: 1,
            group: 0,
            count_rejected: true,
            penalty: None,
        }
    }

    #[test]
    fn counters_saved_to_a_snapshot_decide_the_same_once_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counters");
        let store = MemoryStore::new(1_000);
        for _ in 0..2 {
            store.apply_one(&check("a", 3), 1_000);
        }
        store.apply_one(&check("b", 1), 1_000);
        assert_eq!(store.save_snapshot(&path, 1_000).unwrap(), 2);

        let (loaded, restored) = MemoryStore::load_snapshot(1_000, &path, 2_000).unwrap();
        assert_eq!(
            restored,
            Restored {
                counters: 2,
                expired: 0,
                over_capacity: 0
            }
        );
        let third = loaded.apply_one(&check("a", 3), 2_000);
        assert!(!third.over_limit && third.remaining == 0, "{third:?}");
        assert!(loaded.apply_one(&check("a", 3), 2_000).over_limit);
        assert!(loaded.apply_one(&check("b", 1), 2_000).over_limit);
        let fresh = MemoryStore::new(1_000);
        assert!(!fresh.apply_one(&check("b", 1), 2_000).over_limit);

        // Read back once the minute is long over, nothing is live any more.
        let (_, late) = MemoryStore::load_snapshot(1_000, &path, 600_000).unwrap();
        assert_eq!((late.counters, late.expired), (0, 2));
        // Into a smaller store, what fits.
        let (small, cut) = MemoryStore::load_snapshot(1, &path, 2_000).unwrap();
        assert_eq!((cut.counters, cut.over_capacity, small.len()), (1, 1, 1));
        let missing = MemoryStore::load_snapshot(1, &dir.path().join("none"), 0);
        assert!(missing.err().unwrap().to_string().contains("none"));
    }

    #[test]
    fn keys_count_independently() {
        let store = MemoryStore::new(1_000);
        for _ in 0..3 {
            assert!(!store.apply_one(&check("a", 3), 0).over_limit);
        }
        assert!(store.apply_one(&check("a", 3), 0).over_limit);
        assert!(!store.apply_one(&check("b", 3), 0).over_limit);
    }

    #[test]
    fn concurrent_hits_are_neither_lost_nor_doubled() {
        let store = MemoryStore::new(1_000);
        let threads = 8;
        let per_thread = 5_000;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for _ in 0..per_thread {
                        store.apply_one(&check("shared", u32::MAX), 0);
                    }
                });
            }
        });
        let last = store.apply_one(&check("shared", u32::MAX), 0);
        let counted = u64::from(u32::MAX) - last.remaining;
        assert_eq!(counted, threads * per_thread + 1);
    }

    #[test]
    fn capacity_bounds_the_number_of_counters() {
        let store = MemoryStore::new(100);
        for i in 0..10_000 {
            store.apply_one(&check(&format!("flood-{i}"), 10), 0);
        }
        assert!(store.len() <= 100, "held {}", store.len());
    }

    #[test]
    fn a_sharded_store_holds_its_full_capacity_then_evicts_one_per_new_key() {
        // 5 000 counters over 4 shards: keys never spread evenly, and none may be evicted
        // before the store as a whole is full.
        let store = MemoryStore::new(5_000);
        assert_eq!(store.inner.shards.len(), 4);
        let keys: Vec<String> = (0..6_000).map(|i| format!("user={i}")).collect();
        for key in &keys[..5_000] {
            store.apply_one(&check(key, 10), 0);
        }
        assert_eq!((store.len(), store.evictions()), (5_000, 0));
        for key in &keys[5_000..] {
            store.apply_one(&check(key, 10), 0);
        }
        assert_eq!((store.len(), store.evictions()), (5_000, 1_000));
    }

    #[test]
    fn expired_counters_make_room_before_live_ones_are_evicted() {
        let store = MemoryStore::new(2_000);
        for i in 0..2_000 {
            store.apply_one(&check(&format!("old-{i}"), 10), 0);
        }
        // An hour later every per-minute counter has expired. Replacing half of them, a
        // sample of five finds an expired one nearly every time (all five live has
        // probability (live share)^5, ~5 expected over the 1 000), so live counters are
        // almost never evicted.
        for i in 0..1_000 {
            store.apply_one(&check(&format!("new-{i}"), 10), 3_600_000);
        }
        assert_eq!(store.len(), 2_000);
        assert!(store.evictions() < 50, "evicted {}", store.evictions());
    }

    fn multi(per_second: u32, per_minute: u32) -> [Check<'static>; 2] {
        [
            Check {
                key: "k|1s",
                limit: Limit::per_unit(per_second, Unit::Second, Algorithm::SlidingWindow),
                hits: 1,
                group: 7,
                count_rejected: false,
                penalty: None,
            },
            Check {
                key: "k|1m",
                limit: Limit::per_unit(per_minute, Unit::Minute, Algorithm::SlidingWindow),
                hits: 1,
                group: 7,
                count_rejected: false,
                penalty: None,
            },
        ]
    }

    #[test]
    fn a_group_rejected_by_one_limit_consumes_from_none() {
        let store = MemoryStore::new(1_000);
        let checks = multi(2, 100);
        let mut out = Vec::new();
        for _ in 0..5 {
            out.clear();
            store.apply_group(&checks, 0, &mut out);
        }
        // Two admitted; the three rejected by the per-second limit left the minute alone.
        assert!(out[0].over_limit);
        assert_eq!(
            out[1].remaining, 97,
            "the minute limit saw only the two admitted hits"
        );
    }

    #[test]
    fn concurrent_groups_sharing_counters_stay_exact_and_never_deadlock() {
        let store = MemoryStore::new(1_000);
        let checks = multi(u32::MAX, u32::MAX);
        let reversed = [checks[1], checks[0]];
        std::thread::scope(|scope| {
            for t in 0..4 {
                let store = &store;
                let group = if t % 2 == 0 { checks } else { reversed };
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for _ in 0..2_000 {
                        out.clear();
                        store.apply_group(&group, 0, &mut out);
                    }
                });
            }
        });
        let mut out = Vec::new();
        store.apply_group(&checks, 0, &mut out);
        assert_eq!(u64::from(u32::MAX) - out[1].remaining, 8_001);
    }
}

#[cfg(test)]
mod penalty_tests {
    use super::*;
    use crate::algorithm::penalty::Penalty;
    use crate::limit::{Algorithm, Limit, Unit};

    const LOGIN: Penalty = Penalty {
        after_rejections: 2,
        within_millis: 60_000,
        block_millis: 600_000,
    };

    fn login(key: &str) -> Check<'_> {
        Check {
            key,
            limit: Limit::per_unit(1, Unit::Second, Algorithm::SlidingWindow),
            hits: 1,
            group: 0,
            count_rejected: false,
            penalty: Some(LOGIN),
        }
    }

    fn decide(store: &MemoryStore, key: &str, now: u64) -> Verdict {
        let mut out = Vec::new();
        store.apply_group(&[login(key)], now, &mut out);
        out[0]
    }

    #[test]
    fn repeated_rejections_block_the_key_until_the_block_ends() {
        let store = MemoryStore::new(100);
        let t = 1_000_000;
        assert!(!decide(&store, "ip=1", t).over_limit);
        assert!(decide(&store, "ip=1", t).over_limit, "first rejection");
        let second = decide(&store, "ip=1", t + 10);
        assert!(second.over_limit);
        assert_eq!(
            second.reset_after_millis, 600_000,
            "the second rejection starts the block"
        );
        // Long after the per-second limit would allow it, the key is still blocked.
        let blocked = decide(&store, "ip=1", t + 5_000);
        assert!(blocked.over_limit);
        assert_eq!(blocked.reset_after_millis, 600_000 - 4_990);
        // Other keys are not affected; the block ends by itself.
        assert!(!decide(&store, "ip=2", t + 5_000).over_limit);
        assert!(!decide(&store, "ip=1", t + 10 + 600_000).over_limit);
    }
}
