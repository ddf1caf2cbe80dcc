//! Leaky bucket as a meter: a bucket of `capacity` hits drains at `requests_per_unit` per
//! window; a request is admitted when its hits fit in the bucket on top of what has not yet
//! drained. In any interval of length t at most `capacity + rate × t` hits are admitted.
//!
//! Compared with `token_bucket`: the same long-run rate, and as a meter the same admission
//! rule with `capacity` in the role of `burst`. What differs is the picture and what is
//! reported: `limit_remaining` is the room left in the bucket and `duration_until_reset`
//! the time until it has drained empty (or, when over, until the request would fit).
//! The level is kept scaled by the window length (hit·ms), so draining is exact integer
//! arithmetic: `requests_per_unit` per elapsed millisecond.
//!
//! With `count_rejected` (costs charged after the fact) a charge that does not fit still
//! fills the bucket, past its capacity by at most one window's drain, and nothing is
//! admitted until it has drained back — as a token bucket goes into debt.

use super::Verdict;
use crate::limit::Limit;

/// The bucket's fill level in hit·ms and when it was last drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub level: u128,
    pub updated_millis: u64,
}

pub fn apply(
    bucket: &mut Bucket,
    limit: &Limit,
    hits: u64,
    now_millis: u64,
    count_rejected: bool,
) -> Verdict {
    let window = u128::from(limit.window_millis());
    let rate = u128::from(limit.requests_per_unit);
    let capacity = u128::from(limit.burst()) * window;
    let elapsed = u128::from(now_millis.saturating_sub(bucket.updated_millis));
    let level = bucket.level.saturating_sub(elapsed * rate);
    let added = u128::from(hits) * window;
    if level + added > capacity {
        let mut over = level;
        if count_rejected && hits > 0 {
            over = (level + added).min(capacity + rate * window).max(level);
            *bucket = Bucket {
                level: over,
                updated_millis: now_millis.max(bucket.updated_millis),
            };
        }
        let wait = if rate == 0 || added > capacity {
            u128::from(limit.window_millis())
        } else {
            (over + added - capacity).div_ceil(rate)
        };
        return Verdict {
            over_limit: true,
            remaining: 0,
            reset_after_millis: u64::try_from(wait).unwrap_or(u64::MAX).max(1),
            from_local_cache: false,
        };
    }
    *bucket = Bucket {
        level: level + added,
        updated_millis: now_millis.max(bucket.updated_millis),
    };
    let empty_in = if rate == 0 {
        window
    } else {
        bucket.level.div_ceil(rate)
    };
    Verdict {
        over_limit: false,
        remaining: u64::try_from((capacity - bucket.level) / window).unwrap_or(u64::MAX),
        reset_after_millis: u64::try_from(empty_in).unwrap_or(u64::MAX),
        from_local_cache: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Algorithm;

    fn bucket(per_second: u32, capacity: u32) -> Limit {
        Limit {
            requests_per_unit: per_second,
            window_millis: 1_000,
            algorithm: Algorithm::LeakyBucket,
            burst: Some(capacity),
            hybrid: false,
            calendar: None,
        }
    }

    #[test]
    fn fills_to_capacity_then_admits_at_the_drain_rate() {
        let limit = bucket(10, 3);
        let mut state = Bucket::default();
        let t = 50_000;
        let fills: Vec<_> = (0..4)
            .map(|_| apply(&mut state, &limit, 1, t, false))
            .collect();
        assert_eq!(
            fills.iter().map(|v| v.over_limit).collect::<Vec<_>>(),
            [false, false, false, true]
        );
        assert_eq!(fills[2].remaining, 0);
        assert_eq!(
            fills[2].reset_after_millis, 300,
            "three hits drain in 300 ms"
        );
        assert_eq!(
            fills[3].reset_after_millis, 100,
            "one hit's room frees in 100 ms"
        );
        assert!(apply(&mut state, &limit, 1, t + 99, false).over_limit);
        assert!(!apply(&mut state, &limit, 1, t + 100, false).over_limit);
    }

    #[test]
    fn a_rejection_leaves_the_bucket_as_it_was() {
        let limit = bucket(1, 2);
        let mut state = Bucket::default();
        apply(&mut state, &limit, 2, 1_000, false);
        let before = state;
        assert!(apply(&mut state, &limit, 1, 1_000, false).over_limit);
        assert_eq!(state, before);
    }

    #[test]
    fn a_charge_counted_when_rejected_overfills_the_bucket_by_at_most_a_window() {
        // 10 a second drain, capacity 5.
        let limit = bucket(10, 5);
        let mut state = Bucket::default();
        let t = 50_000;
        assert!(!apply(&mut state, &limit, 4, t, true).over_limit);
        // 3 more do not fit but are poured in: 7 in a bucket of 5, 200 ms over.
        let charge = apply(&mut state, &limit, 3, t, true);
        assert!(charge.over_limit);
        assert_eq!(state.level, 7 * 1_000);
        assert_eq!(
            charge.reset_after_millis, 500,
            "200 ms to drain the excess, 300 for 3"
        );
        assert!(apply(&mut state, &limit, 0, t + 199, true).over_limit);
        assert!(!apply(&mut state, &limit, 0, t + 200, true).over_limit);
        // A charge of 1 000 overfills by one window's drain (10), not by 995.
        let mut state = Bucket::default();
        assert!(apply(&mut state, &limit, 1_000, t, true).over_limit);
        assert_eq!(state.level, 15 * 1_000);
        assert!(apply(&mut state, &limit, 0, t + 999, true).over_limit);
        assert!(!apply(&mut state, &limit, 0, t + 1_000, true).over_limit);
        // Without count_rejected the same charge pours nothing.
        let mut state = Bucket::default();
        assert!(apply(&mut state, &limit, 1_000, t, false).over_limit);
        assert_eq!(state, Bucket::default());
    }

    #[test]
    fn an_idle_bucket_drains_completely() {
        let limit = bucket(1, 5);
        let mut state = Bucket::default();
        apply(&mut state, &limit, 5, 0, false);
        let later = apply(&mut state, &limit, 1, 10_000, false);
        assert_eq!(later.remaining, 4);
    }
}
