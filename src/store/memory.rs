//! The in-memory counter store: a bounded moka cache of per-key counter state.
//!
//! Keys are hashed to 128 bits so the cache holds no key strings (collisions are
//! negligible at 2^-64 for billions of keys) and a lookup allocates nothing. Each entry
//! expires once its state can no longer influence a decision; when the cache is full,
//! moka evicts the least useful entries, so a flood of distinct keys cannot exhaust memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;
use parking_lot::Mutex;

use super::{Check, CounterStore, StoreError};
use crate::algorithm::{self, Verdict, WindowState};

/// One key's state. The window length rides along so expiry needs no lookup.
struct Counter {
    lifetime: Duration,
    // A short critical section with no await inside: a plain mutex is cheaper than atomics
    // juggling three related fields, and uncontended it costs a couple of atomic ops.
    state: Mutex<WindowState>,
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
    counters: Cache<u128, Arc<Counter>>,
}

impl MemoryStore {
    /// A store holding at most `capacity` counters.
    pub fn new(capacity: u64) -> Self {
        Self {
            counters: Cache::builder()
                .max_capacity(capacity)
                .expire_after(ExpireAfterLastUse)
                .build(),
        }
    }

    /// Counters currently held (approximate until moka's pending maintenance runs).
    pub fn len(&self) -> u64 {
        self.counters.run_pending_tasks();
        self.counters.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one check synchronously; the in-memory store never waits.
    pub fn apply_one(&self, check: &Check<'_>, now_millis: u64) -> Verdict {
        let hash = xxhash_rust::xxh3::xxh3_128(check.key.as_bytes());
        let lifetime = Duration::from_millis(algorithm::state_lifetime_millis(&check.limit));
        let counter = self.counters.get_with(hash, || {
            Arc::new(Counter {
                lifetime,
                state: Mutex::new(WindowState::default()),
            })
        });
        let mut state = counter.state.lock();
        algorithm::apply(&mut state, &check.limit, check.hits, now_millis)
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
        out.extend(checks.iter().map(|check| self.apply_one(check, now_millis)));
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
            limit: Limit {
                requests_per_unit,
                unit: Unit::Minute,
                algorithm: Algorithm::FixedWindow,
            },
            hits: 1,
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
}
