//! Token bucket as GCRA (generic cell rate algorithm): the whole bucket is one timestamp.
//!
//! Each hit is spaced by the emission interval `T = window / requests_per_unit`. The
//! theoretical arrival time (TAT) is when the bucket would be full again; a request of `n`
//! hits is admitted if, after pushing TAT forward by `n × T`, it lies no further than
//! `burst × T` ahead of now. Hence in any interval of length `t` at most
//! `burst + t / T` hits are admitted. Time is kept in microseconds and `T` rounded up, so
//! rounding can only make the bucket stricter, never looser.
//!
//! With `count_rejected` (costs charged after the fact) a charge that does not fit is
//! still taken: the bucket goes into debt, TAT past `burst × T` ahead, and admits nothing
//! until it has refilled out of it. The debt is capped at one window's refill beyond an
//! empty bucket, so one enormous charge blocks for about a window, as it would in a
//! sliding window, rather than for as long as its size says.

use super::Verdict;
use crate::limit::Limit;

pub fn apply(
    tat_micros: &mut u64,
    limit: &Limit,
    hits: u64,
    now_millis: u64,
    count_rejected: bool,
) -> Verdict {
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
    let window = u128::from(limit.window_millis()) * 1_000;
    let interval = window.div_ceil(rate);
    let capacity = burst * interval;
    let tat = u128::from(*tat_micros).max(now);
    let cost = u128::from(hits) * interval;
    let next_tat = tat + cost;
    let ahead = next_tat - now;
    if ahead > capacity {
        let mut wait = ahead - capacity;
        if count_rejected && hits > 0 {
            let owed = next_tat.min(now + capacity + window).max(tat);
            *tat_micros = u64::try_from(owed).unwrap_or(u64::MAX);
            // Until a request of this size fits, the debt paid off first.
            wait = (owed + cost - now).saturating_sub(capacity);
        }
        // Admitted once enough of the bucket has refilled for these hits.
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
        let burst: Vec<_> = (0..6)
            .map(|_| apply(&mut tat, &limit, 1, now, false))
            .collect();
        assert!(burst[..5].iter().all(|v| !v.over_limit));
        assert_eq!(burst[4].remaining, 0);
        assert!(burst[5].over_limit);
        // One token every 100 ms.
        assert_eq!(burst[5].reset_after_millis, 100);
        assert!(apply(&mut tat, &limit, 1, now + 99, false).over_limit);
        assert!(!apply(&mut tat, &limit, 1, now + 100, false).over_limit);
    }

    #[test]
    fn remaining_counts_whole_tokens_left() {
        let limit = bucket(10, 5);
        let mut tat = 0;
        assert_eq!(apply(&mut tat, &limit, 2, 5_000, false).remaining, 3);
        // After 250 ms two and a half tokens came back: 5 is the cap.
        assert_eq!(apply(&mut tat, &limit, 1, 5_250, false).remaining, 4);
    }

    #[test]
    fn a_rejected_request_takes_no_tokens() {
        let limit = bucket(1, 2);
        let mut tat = 0;
        apply(&mut tat, &limit, 2, 10_000, false);
        let before = tat;
        assert!(apply(&mut tat, &limit, 1, 10_000, false).over_limit);
        assert_eq!(tat, before);
    }

    #[test]
    fn a_charge_counted_when_rejected_puts_the_bucket_in_debt_for_at_most_a_window() {
        // 10 a second, burst 5: a token every 100 ms, a full bucket 500 ms ahead.
        let limit = bucket(10, 5);
        let mut tat = 0;
        let now = 1_000_000;
        assert!(!apply(&mut tat, &limit, 4, now, true).over_limit);
        // 3 more do not fit, but are taken: the bucket owes 2 tokens (200 ms).
        let charge = apply(&mut tat, &limit, 3, now, true);
        assert!(charge.over_limit);
        assert_eq!(u128::from(tat), u128::from(now + 700) * 1_000);
        assert_eq!(
            charge.reset_after_millis, 500,
            "200 ms of debt, then 300 ms for 3"
        );
        // A peek sees the debt until it is paid, then the bucket admits again.
        assert!(apply(&mut tat, &limit, 0, now + 199, true).over_limit);
        assert!(!apply(&mut tat, &limit, 0, now + 200, true).over_limit);
        // A hit that does not fit yet is taken too, and pushes the next one back.
        assert!(apply(&mut tat, &limit, 1, now + 299, true).over_limit);
        assert_eq!(u128::from(tat), u128::from(now + 800) * 1_000);
        assert!(!apply(&mut tat, &limit, 1, now + 400, true).over_limit);
        // A charge of 1 000 owes one window (a second) beyond empty, not 100 seconds.
        let mut tat = 0;
        assert!(apply(&mut tat, &limit, 1_000, now, true).over_limit);
        assert_eq!(u128::from(tat), u128::from(now + 1_500) * 1_000);
        assert!(apply(&mut tat, &limit, 0, now + 999, true).over_limit);
        assert!(!apply(&mut tat, &limit, 0, now + 1_000, true).over_limit);
        // Without count_rejected the same charge takes nothing.
        let mut tat = 0;
        assert!(apply(&mut tat, &limit, 1_000, now, false).over_limit);
        assert_eq!(tat, 0);
    }

    #[test]
    fn a_request_larger_than_the_burst_never_fits() {
        let limit = bucket(100, 3);
        let mut tat = 0;
        assert!(apply(&mut tat, &limit, 4, 0, false).over_limit);
    }

    #[test]
    fn a_zero_limit_admits_nothing() {
        let limit = bucket(0, 0);
        let mut tat = 0;
        assert!(apply(&mut tat, &limit, 1, 0, false).over_limit);
        assert!(!apply(&mut tat, &limit, 0, 0, false).over_limit);
    }
}
