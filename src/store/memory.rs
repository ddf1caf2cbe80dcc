//! The in-memory counter store: a bounded moka cache of per-key counter state.
//!
//! Keys are hashed to 128 bits so the cache holds no key strings (collisions are
//! negligible at 2^-64 for billions of keys) and a lookup allocates nothing. Each entry
//! expires once its state can no longer influence a decision; when the cache is full,
//! moka evicts the least useful entries, so a flood of distinct keys cannot exhaust memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use moka::Expiry;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use parking_lot::{Mutex, MutexGuard};

use super::{Check, CounterStore, StoreError, groups};
use crate::algorithm::penalty::{Penalty, PenaltyState};
use crate::algorithm::{self, CounterState, Verdict};

/// One key's state. Its lifetime rides along so expiry needs no lookup.
struct Counter {
    lifetime: Duration,
    // A short critical section with no await inside: a plain mutex is cheaper than atomics
    // juggling several related fields, and uncontended it costs a couple of atomic ops.
    state: Mutex<CounterState>,
}

struct ExpireAfterLastUse;

impl Expiry<u128, Arc<Counter>> for ExpireAfterLastUse {
    fn expire_after_create(
        &self,
        _: &u128,
        counter: &Arc<Counter>,
        _: Instant,
    ) -> Option<Duration> {
        Some(counter.lifetime)
    }

    fn expire_after_read(
        &self,
        _: &u128,
        counter: &Arc<Counter>,
        _: Instant,
        _: Option<Duration>,
        _: Instant,
    ) -> Option<Duration> {
        Some(counter.lifetime)
    }
}

/// Counters in this process's memory, bounded by entry count.
#[derive(Clone)]
pub struct MemoryStore {
    // foldhash rather than moka's default SipHash: the keys are already xxh3 hashes, and
    // hashing them again with a DoS-resistant hasher cost ~15 % of a lookup.
    counters: Cache<u128, Arc<Counter>, foldhash::fast::RandomState>,
    /// Counters dropped to stay within capacity (not those that expired).
    evictions: Arc<AtomicU64>,
}

impl MemoryStore {
    /// A store holding at most `capacity` counters.
    pub fn new(capacity: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        Self {
            counters: Cache::builder()
                .max_capacity(capacity)
                .expire_after(ExpireAfterLastUse)
                .eviction_listener(move |_, _, cause| {
                    if cause == RemovalCause::Size {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .build_with_hasher(foldhash::fast::RandomState::default()),
            evictions,
        }
    }

    /// Counters evicted to stay within capacity so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Counters held, without forcing moka's pending maintenance (cheap, for metrics).
    pub fn entry_count(&self) -> u64 {
        self.counters.entry_count()
    }

    /// Counters currently held (approximate until moka's pending maintenance runs).
    pub fn len(&self) -> u64 {
        self.counters.run_pending_tasks();
        self.counters.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn counter(&self, check: &Check<'_>) -> (u128, Arc<Counter>) {
        let hash = xxhash_rust::xxh3::xxh3_128(check.key.as_bytes());
        let lifetime = algorithm::state_lifetime_millis(&check.limit);
        (hash, self.counter_at(hash, lifetime))
    }

    fn counter_at(&self, hash: u128, lifetime_millis: u64) -> Arc<Counter> {
        // `_by_ref`: moka allocates its key only when the entry is new, not on every hit.
        self.counters.get_with_by_ref(&hash, || {
            Arc::new(Counter {
                lifetime: Duration::from_millis(lifetime_millis),
                state: Mutex::new(CounterState::Empty),
            })
        })
    }

    /// The penalty box state of a group, under its first key with `|penalty` appended.
    fn penalty_counter(&self, key: &str, penalty: &Penalty) -> Arc<Counter> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(key.as_bytes());
        hasher.update(b"|penalty");
        self.counter_at(hasher.digest128(), PenaltyState::lifetime_millis(penalty))
    }

    /// Applies one check synchronously; the in-memory store never waits.
    pub fn apply_one(&self, check: &Check<'_>, now_millis: u64) -> Verdict {
        let (_, counter) = self.counter(check);
        let mut state = counter.state.lock();
        algorithm::apply(
            &mut state,
            &check.limit,
            check.hits,
            now_millis,
            check.count_rejected,
        )
    }

    /// Applies one descriptor's checks all or nothing, appending their verdicts to `out`.
    /// (`count_rejected` only matters alone: envoyproxy-style rules carry a single limit.)
    pub fn apply_group(&self, group: &[Check<'_>], now_millis: u64, out: &mut Vec<Verdict>) {
        let Some((first, penalty)) = group.first().and_then(|c| Some((c, c.penalty?))) else {
            self.apply_limits(group, now_millis, out);
            return;
        };
        // The penalty lock is taken before any limit's: every request for this descriptor
        // takes them in the same order.
        let counter = self.penalty_counter(first.key, &penalty);
        let mut guard = counter.state.lock();
        let mut state = match &*guard {
            CounterState::Penalty(state) => *state,
            _ => PenaltyState::default(),
        };
        if let Some(left) = state.blocked_for(now_millis) {
            out.extend(group.iter().map(|_| Verdict {
                over_limit: true,
                remaining: 0,
                reset_after_millis: left,
            }));
            return;
        }
        let start = out.len();
        self.apply_limits(group, now_millis, out);
        let verdicts = out.get_mut(start..).unwrap_or_default();
        // A zero-hit check (a usage query) only looks; it never earns a penalty.
        if verdicts.iter().any(|v| v.over_limit) && group.iter().any(|c| c.hits > 0) {
            if let Some(block) = state.record_rejection(&penalty, now_millis) {
                for verdict in verdicts.iter_mut().filter(|v| v.over_limit) {
                    verdict.reset_after_millis = block;
                }
            }
            *guard = CounterState::Penalty(state);
        }
    }

    fn apply_limits(&self, group: &[Check<'_>], now_millis: u64, out: &mut Vec<Verdict>) {
        if let [check] = group {
            out.push(self.apply_one(check, now_millis));
            return;
        }
        let counters: Vec<(u128, Arc<Counter>)> = group.iter().map(|c| self.counter(c)).collect();
        // Lock in hash order so two requests sharing counters can never deadlock; a key
        // listed twice is locked once.
        let mut by_hash: Vec<&(u128, Arc<Counter>)> = counters.iter().collect();
        by_hash.sort_by_key(|(hash, _)| *hash);
        by_hash.dedup_by_key(|(hash, _)| *hash);
        // Each locked counter with the state it would have if this group is admitted.
        let mut locked: Vec<(u128, MutexGuard<'_, CounterState>, CounterState)> = by_hash
            .into_iter()
            .map(|(hash, counter)| {
                let guard = counter.state.lock();
                let state = guard.clone();
                (*hash, guard, state)
            })
            .collect();
        let start = out.len();
        for (check, (hash, _)) in group.iter().zip(&counters) {
            if let Some((_, _, state)) = locked.iter_mut().find(|(h, _, _)| h == hash) {
                out.push(algorithm::apply(
                    state,
                    &check.limit,
                    check.hits,
                    now_millis,
                    false,
                ));
            }
        }
        let admitted = out
            .get(start..)
            .is_some_and(|verdicts| verdicts.iter().all(|v| !v.over_limit));
        if admitted {
            for (_, guard, state) in &mut locked {
                **guard = std::mem::take(state);
            }
        }
    }
}

impl CounterStore for MemoryStore {
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
