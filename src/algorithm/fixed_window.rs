//! Fixed window: one counter per epoch-aligned window, exactly as envoyproxy/ratelimit counts.
//!
//! With `count_rejected` (envoyproxy/ratelimit's `rate_limit` rules, whose Redis `INCRBY`
//! runs before the comparison) every hit is counted, admitted or not, so a migrated config
//! rejects the same requests it did before; otherwise only admitted hits count.

use super::{Verdict, WindowState};
use crate::limit::Limit;

pub fn apply(
    state: &mut WindowState,
    limit: &Limit,
    hits: u64,
    now_millis: u64,
    count_rejected: bool,
) -> Verdict {
    let (window, reset_after_millis) = limit.window_at(now_millis);
    state.roll_to(window);
    let after = state.current.saturating_add(hits);
    let limit_hits = u64::from(limit.requests_per_unit);
    if after > limit_hits {
        if count_rejected {
            state.current = after;
        }
        Verdict {
            over_limit: true,
            remaining: 0,
            reset_after_millis,
            from_local_cache: false,
        }
    } else {
        state.current = after;
        Verdict {
            over_limit: false,
            remaining: limit_hits - after,
            reset_after_millis,
            from_local_cache: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Algorithm;

    const LIMIT: Limit = Limit {
        requests_per_unit: 3,
        window_millis: 60_000,
        algorithm: Algorithm::FixedWindow,
        burst: None,
        hybrid: false,
        calendar: None,
    };
    const MINUTE: u64 = 60_000;

    #[test]
    fn admits_up_to_the_limit_then_rejects_until_the_window_ends() {
        let mut state = WindowState::default();
        let start = 100 * MINUTE + 10_000;
        let remaining: Vec<_> = (0..3)
            .map(|_| apply(&mut state, &LIMIT, 1, start, true))
            .map(|verdict| (verdict.over_limit, verdict.remaining))
            .collect();
        assert_eq!(remaining, [(false, 2), (false, 1), (false, 0)]);
        let rejected = apply(&mut state, &LIMIT, 1, start + 1_000, true);
        assert!(rejected.over_limit);
        assert_eq!(rejected.reset_after_millis, 49_000);
        // The boundary resets the count: the classic fixed-window burst is allowed.
        let next = apply(&mut state, &LIMIT, 1, 101 * MINUTE, true);
        assert!(!next.over_limit);
        assert_eq!(next.remaining, 2);
        assert_eq!(next.reset_after_millis, MINUTE);
    }

    #[test]
    fn a_calendar_month_starts_over_on_the_first_where_its_zone_is() {
        use crate::calendar::{Calendar, Zone};
        let berlin = Zone::named("Europe/Berlin").unwrap();
        let month = Limit {
            requests_per_unit: 2,
            window_millis: 30 * 86_400_000,
            calendar: Some(Calendar::new(crate::limit::Unit::Month, berlin).unwrap()),
            ..LIMIT
        };
        let at = |text: &str| text.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64;
        let mut state = WindowState::default();
        // 28 February, 23:00 in Berlin: the last hour of February there.
        let late = at("2026-02-28T22:00:00Z");
        assert!(!apply(&mut state, &month, 2, late, false).over_limit);
        let over = apply(&mut state, &month, 1, late, false);
        assert!(over.over_limit);
        assert_eq!(
            over.reset_after_millis, 3_600_000,
            "until midnight in Berlin"
        );
        // Midnight in Berlin is 23:00 UTC: March has begun there, while a 30-day window
        // since the epoch would run on to 24 March.
        let march = apply(&mut state, &month, 1, at("2026-02-28T23:00:00Z"), false);
        assert!(!march.over_limit);
        assert_eq!(march.remaining, 1);
        assert_eq!(march.reset_after_millis, 31 * 86_400_000 - 3_600_000);
    }

    #[test]
    fn rejected_hits_still_count_like_envoyproxy_ratelimit() {
        let mut state = WindowState::default();
        for _ in 0..5 {
            apply(&mut state, &LIMIT, 1, 0, true);
        }
        assert_eq!(state.current, 5);
        let mut policy_state = WindowState::default();
        for _ in 0..5 {
            apply(&mut policy_state, &LIMIT, 1, 0, false);
        }
        assert_eq!(
            policy_state.current, 3,
            "without count_rejected only admitted hits count"
        );
    }

    #[test]
    fn a_check_with_zero_hits_reports_without_counting() {
        let mut state = WindowState::default();
        apply(&mut state, &LIMIT, 3, 0, true);
        let check = apply(&mut state, &LIMIT, 0, 0, true);
        assert!(!check.over_limit);
        assert_eq!(check.remaining, 0);
        assert_eq!(state.current, 3);
    }

    #[test]
    fn a_large_addend_is_over_when_it_crosses_the_limit() {
        let mut state = WindowState::default();
        assert!(!apply(&mut state, &LIMIT, 2, 0, true).over_limit);
        assert!(apply(&mut state, &LIMIT, 2, 0, true).over_limit);
    }
}
