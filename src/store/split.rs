//! Two stores behind one: per-second limits counted in a store of their own, the rest in
//! the main one — envoyproxy/ratelimit's `REDIS_PERSECOND`, which gives the busiest,
//! shortest-lived counters a Redis of their own.
//!
//! The split is by descriptor (a check group): a group goes to the per-second store when
//! every limit of it has a window of a second or less, so a group is never divided and
//! stays all or nothing. A request touching both stores calls them concurrently.

use super::{Check, CounterStore, StoreError, groups};
use crate::algorithm::Verdict;
use crate::limit::Limit;

/// The longest window counted in the per-second store.
const PER_SECOND_MILLIS: u64 = 1_000;

#[derive(Clone)]
pub struct SplitStore<A, B> {
    main: A,
    per_second: B,
}

impl<A: CounterStore, B: CounterStore> SplitStore<A, B> {
    pub fn new(main: A, per_second: B) -> Self {
        Self { main, per_second }
    }

    pub fn main(&self) -> &A {
        &self.main
    }

    pub fn per_second(&self) -> &B {
        &self.per_second
    }
}

fn is_per_second(group: &[Check<'_>]) -> bool {
    group.iter().all(|check| is_per_second_limit(&check.limit))
}

fn is_per_second_limit(limit: &Limit) -> bool {
    limit.window_millis <= PER_SECOND_MILLIS
}

impl<A: CounterStore, B: CounterStore> CounterStore for SplitStore<A, B> {
    const NAME: &'static str = A::NAME;
    const WAITS: bool = A::WAITS || B::WAITS;
    // Both stores are handed the same keys, so they must agree on how they are written.
    const KEY_FORM: crate::key::KeyForm = A::KEY_FORM;

    async fn apply(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
        out: &mut Vec<Verdict>,
    ) -> Result<(), StoreError> {
        // Most requests touch one store only: hand it the checks as they are.
        let per_second = groups(checks).filter(|g| is_per_second(g)).count();
        let all = groups(checks).count();
        if per_second == 0 {
            return self.main.apply(checks, now_millis, out).await;
        }
        if per_second == all {
            return self.per_second.apply(checks, now_millis, out).await;
        }
        // Both: each store gets its groups, and the verdicts go back in the checks' order.
        let (mut to_main, mut to_second) = (Vec::new(), Vec::new());
        let mut routed_to_second = Vec::with_capacity(checks.len());
        for group in groups(checks) {
            let second = is_per_second(group);
            let target = if second { &mut to_second } else { &mut to_main };
            target.extend_from_slice(group);
            routed_to_second.extend(std::iter::repeat_n(second, group.len()));
        }
        let (mut from_main, mut from_second) = (Vec::new(), Vec::new());
        let (main, second) = tokio::join!(
            self.main.apply(&to_main, now_millis, &mut from_main),
            self.per_second
                .apply(&to_second, now_millis, &mut from_second)
        );
        main?;
        second?;
        let (mut from_main, mut from_second) = (from_main.into_iter(), from_second.into_iter());
        out.clear();
        for second in routed_to_second {
            let next = if second {
                from_second.next()
            } else {
                from_main.next()
            };
            out.push(next.ok_or_else(|| StoreError {
                message: "a store answered fewer checks than it was given".to_owned(),
                transient: false,
            })?);
        }
        Ok(())
    }

    async fn forget(&self, checks: &[Check<'_>], now_millis: u64) -> Result<(), StoreError> {
        let (mut to_main, mut to_second) = (Vec::new(), Vec::new());
        for group in groups(checks) {
            let target = if is_per_second(group) {
                &mut to_second
            } else {
                &mut to_main
            };
            target.extend_from_slice(group);
        }
        let (main, second) = tokio::join!(
            self.main.forget(&to_main, now_millis),
            self.per_second.forget(&to_second, now_millis)
        );
        main.and(second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Algorithm, Unit};
    use crate::store::MemoryStore;

    fn check<'a>(key: &'a str, limit: Limit, group: u32) -> Check<'a> {
        Check {
            key,
            limit,
            hits: 1,
            group,
            count_rejected: false,
            penalty: None,
        }
    }

    fn run(store: &SplitStore<MemoryStore, MemoryStore>, checks: &[Check<'_>]) -> Vec<Verdict> {
        let mut out = Vec::new();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(store.apply(checks, 10_000, &mut out))
            .unwrap();
        out
    }

    #[test]
    fn per_second_descriptors_count_in_their_own_store_and_answers_keep_their_order() {
        let store = SplitStore::new(MemoryStore::new(100), MemoryStore::new(100));
        let second = Limit::per_unit(1, Unit::Second, Algorithm::FixedWindow);
        let minute = Limit::per_unit(5, Unit::Minute, Algorithm::FixedWindow);
        let checks = [
            check("m1", minute, 0),
            check("s1", second, 1),
            check("m2", minute, 2),
            // One descriptor with both: it stays whole, in the main store.
            check("both-s", second, 3),
            check("both-m", minute, 3),
        ];
        let first = run(&store, &checks);
        assert!(first.iter().all(|v| !v.over_limit), "{first:?}");
        assert_eq!(store.main().len(), 4, "m1, m2, both-s, both-m");
        assert_eq!(store.per_second().len(), 1, "s1");
        // Again: only the per-second limits of 1 are over, each answer in its check's place.
        let over: Vec<bool> = run(&store, &checks).iter().map(|v| v.over_limit).collect();
        assert_eq!(over, [false, true, false, true, false]);
        // A request of per-second descriptors only goes to that store alone.
        let only = [check("s2", second, 0)];
        assert!(!run(&store, &only)[0].over_limit);
        assert_eq!(store.per_second().len(), 2);
        assert_eq!(store.main().len(), 4);
    }
}
