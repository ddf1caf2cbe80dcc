//! Properties every algorithm must keep for any traffic, checked with random hit sequences
//! and an explicit clock (no sleeping).

use proptest::prelude::*;

use super::{CounterState, apply};
use crate::limit::{Algorithm, Limit};
use crate::store::{Check, MemoryStore};

/// Runs `(gap_ms, hits)` steps through one counter, keeping the state only when admitted
/// (as the stores do), and returns `(time, hits)` of every admitted request.
fn admitted(limit: &Limit, steps: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut state = CounterState::Empty;
    let mut now = 1_700_000_000_000;
    let mut out = Vec::new();
    for &(gap, hits) in steps {
        now += gap;
        if !apply(&mut state, limit, hits, now, false).over_limit {
            out.push((now, hits));
        }
    }
    out
}

fn steps(max_gap: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0..max_gap, 1..4u64), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn token_bucket_never_admits_more_than_burst_plus_rate_times_t(
        rate in 1..50u32,
        burst in 1..30u32,
        steps in steps(300),
    ) {
        let limit = Limit { requests_per_unit: rate, window_millis: 1_000, algorithm: Algorithm::TokenBucket, burst: Some(burst), hybrid: false, calendar: None };
        let admitted = admitted(&limit, &steps);
        for (i, &(start, _)) in admitted.iter().enumerate() {
            let mut total = 0u64;
            for &(end, hits) in &admitted[i..] {
                total += hits;
                // In [start, end]: at most burst + rate × (end − start) / 1 s.
                let bound = f64::from(burst) + f64::from(rate) * (end - start) as f64 / 1_000.0;
                prop_assert!(total as f64 <= bound + 1e-9, "{total} admitted in {} ms, bound {bound}", end - start);
            }
        }
    }

    #[test]
    fn window_algorithms_never_admit_more_than_the_limit_in_one_aligned_window(
        requests_per_unit in 1..40u32,
        sliding in any::<bool>(),
        steps in steps(200),
    ) {
        let algorithm = if sliding { Algorithm::SlidingWindow } else { Algorithm::FixedWindow };
        let limit = Limit { requests_per_unit, window_millis: 1_000, algorithm, burst: None, hybrid: false, calendar: None };
        let mut per_window = std::collections::HashMap::<u64, u64>::new();
        for (time, hits) in admitted(&limit, &steps) {
            *per_window.entry(time / 1_000).or_default() += hits;
        }
        for (window, total) in per_window {
            prop_assert!(total <= u64::from(requests_per_unit), "window {window}: {total} > {requests_per_unit}");
        }
    }

    #[test]
    fn several_limits_on_one_descriptor_are_all_or_nothing(
        short in 1..20u32,
        long in 1..60u32,
        hits in prop::collection::vec(1..4u64, 1..100),
    ) {
        let store = MemoryStore::new(100);
        let check = |key, requests_per_unit, window_millis, hits| Check {
            key,
            limit: Limit { requests_per_unit, window_millis, algorithm: Algorithm::FixedWindow, burst: None, hybrid: false, calendar: None },
            hits,
            group: 0,
            count_rejected: false,
            penalty: None,
        };
        let mut admitted = 0u64;
        let mut out = Vec::new();
        for h in hits {
            out.clear();
            store.apply_group(&[check("a|1s", short, 1_000, h), check("a|1h", long, 3_600_000, h)], 0, &mut out);
            prop_assert_eq!(out[0].over_limit || out[1].over_limit, out.iter().any(|v| v.over_limit));
            if out.iter().all(|v| !v.over_limit) {
                admitted += h;
            }
        }
        // A zero-hit check reads each counter: both saw exactly the admitted hits.
        out.clear();
        store.apply_group(&[check("a|1s", short, 1_000, 0), check("a|1h", long, 3_600_000, 0)], 0, &mut out);
        prop_assert_eq!(out[0].remaining, u64::from(short) - admitted);
        prop_assert_eq!(out[1].remaining, u64::from(long) - admitted);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn sliding_log_never_admits_more_than_the_limit_in_any_window(
        requests_per_unit in 1..20u32,
        steps in steps(150),
    ) {
        let limit = Limit { requests_per_unit, window_millis: 1_000, algorithm: Algorithm::SlidingLog, burst: None, hybrid: false, calendar: None };
        let admitted = admitted(&limit, &steps);
        // Brute force: every window (t − 1000, t] ending at an admitted request.
        for &(end, _) in &admitted {
            let inside: u64 = admitted.iter().filter(|(t, _)| *t + 1_000 > end && *t <= end).map(|(_, h)| h).sum();
            prop_assert!(inside <= u64::from(requests_per_unit), "{inside} in the window ending at {end}");
        }
    }

    #[test]
    fn leaky_bucket_never_admits_more_than_capacity_plus_rate_times_t(
        rate in 1..50u32,
        capacity in 1..30u32,
        steps in steps(300),
    ) {
        let limit = Limit { requests_per_unit: rate, window_millis: 1_000, algorithm: Algorithm::LeakyBucket, burst: Some(capacity), hybrid: false, calendar: None };
        let admitted = admitted(&limit, &steps);
        for (i, &(start, _)) in admitted.iter().enumerate() {
            let mut total = 0u64;
            for &(end, hits) in &admitted[i..] {
                total += hits;
                let bound = f64::from(capacity) + f64::from(rate) * (end - start) as f64 / 1_000.0;
                prop_assert!(total as f64 <= bound + 1e-9, "{total} admitted in {} ms, bound {bound}", end - start);
            }
        }
    }
}
