//! Token bucket as GCRA (generic cell rate algorithm): the whole bucket is one timestamp.
//!
//! Each hit is spaced by the emission interval `T = window / requests_per_unit`. The
//! theoretical arrival time (TAT) is when the bucket would be full again; a request of `n`
//! hits is admitted if, after pushing TAT forward by `n × T`, it lies no further than
//! `burst × T` ahead of now. Hence in any interval of length `t` at most
//! `burst + t / T` hits are admitted. Time is kept in microseconds and `T` rounded up, so
//! rounding can only make the bucket stricter, never looser.

use super::Verdict;
use crate::limit::Limit;

pub fn apply(tat_micros: &mut u64, limit: &Limit, hits: u64, now_millis: u64) -> Verdict {
    let now = u128::from(now_millis) * 1_000;
    let rate = u128::from(limit.requests_per_unit);
    let burst = u128::from(limit.burst());
    if rate == 0 || burst == 0 {
        // A limit of 0 admits nothing and never refills.
        return Verdict {
            over_limit: hits > 0,
            remaining: 0,
            reset_after_millis: limit.window_millis(),
            from_local_cache: false,
        };
    }
    let interval = (u128::from(limit.window_millis()) * 1_000).div_ceil(rate);
    let capacity = burst * interval;
    let tat = u128::from(*tat_micros).max(now);
    let next_tat = tat + u128::from(hits) * interval;
    let ahead = next_tat - now;
    if ahead > capacity {
        // Admitted once enough of the bucket has refilled for these hits.
        let wait = ahead - capacity;
        return Verdict {
            over_limit: true,
            remaining: 0,
            reset_after_millis: to_millis_up(wait).max(1),
            from_local_cache: false,
        };
    }
    *tat_micros = u64::try_from(next_tat).unwrap_or(u64::MAX);
    Verdict {
        over_limit: false,
        remaining: ((capacity - ahead) / interval) as u64,
        reset_after_millis: to_millis_up(ahead),
        from_local_cache: false,
    }
}

fn to_millis_up(micros: u128) -> u64 {
    u64::try_from(micros.div_ceil(1_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Algorithm;

    fn bucket(rate_per_second: u32, burst: u32) -> Limit {
        Limit {
            requests_per_unit: rate_per_second,
            window_millis: 1_000,
            algorithm: Algorithm::TokenBucket,
            burst: Some(burst),
            hybrid: false,
            calendar: None,
        }
    }

    #[test]
    fn a_full_bucket_admits_a_burst_then_refills_at_the_rate() {
        let limit = bucket(10, 5);
        let mut tat = 0;
        let now = 1_000_000;
        let burst: Vec<_> = (0..6).map(|_| apply(&mut tat, &limit, 1, now)).collect();
        assert!(burst[..5].iter().all(|v| !v.over_limit));
        assert_eq!(burst[4].remaining, 0);
        assert!(burst[5].over_limit);
        // One token every 100 ms.
        assert_eq!(burst[5].reset_after_millis, 100);
        assert!(apply(&mut tat, &limit, 1, now + 99).over_limit);
        assert!(!apply(&mut tat, &limit, 1, now + 100).over_limit);
    }

    #[test]
    fn remaining_counts_whole_tokens_left() {
        let limit = bucket(10, 5);
        let mut tat = 0;
        assert_eq!(apply(&mut tat, &limit, 2, 5_000).remaining, 3);
        // After 250 ms two and a half tokens came back: 5 is the cap.
        assert_eq!(apply(&mut tat, &limit, 1, 5_250).remaining, 4);
    }

    #[test]
    fn a_rejected_request_takes_no_tokens() {
        let limit = bucket(1, 2);
        let mut tat = 0;
        apply(&mut tat, &limit, 2, 10_000);
        let before = tat;
        assert!(apply(&mut tat, &limit, 1, 10_000).over_limit);
        assert_eq!(tat, before);
    }

    #[test]
    fn a_request_larger_than_the_burst_never_fits() {
        let limit = bucket(100, 3);
        let mut tat = 0;
        assert!(apply(&mut tat, &limit, 4, 0).over_limit);
    }

    #[test]
    fn a_zero_limit_admits_nothing() {
        let limit = bucket(0, 0);
        let mut tat = 0;
        assert!(apply(&mut tat, &limit, 1, 0).over_limit);
        assert!(!apply(&mut tat, &limit, 0, 0).over_limit);
    }
}
