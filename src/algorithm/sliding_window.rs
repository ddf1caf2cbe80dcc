//! Sliding window counter: the previous window's count, weighted by the share of it that the
//! sliding window still covers, plus the current window's count.
//!
//! Unlike the fixed window, a rejected hit is not counted: a client that keeps retrying while
//! over the limit gets back in as soon as its admitted traffic slides out, instead of being
//! locked out by its own rejected retries. (Penalising abuse is the penalty box's job.)
//!
//! Arithmetic is exact in integers: with `W` the window length and `e` the time elapsed in
//! the current window, the estimate is `previous × (W − e) / W + current`; comparisons are
//! made multiplied by `W` so no rounding can admit an extra hit.

use super::{Verdict, WindowState};
use crate::limit::Limit;

pub fn apply(state: &mut WindowState, limit: &Limit, hits: u64, now_millis: u64) -> Verdict {
    let window = u128::from(limit.window_millis());
    state.roll_to(now_millis / limit.window_millis());
    let elapsed = u128::from(now_millis % limit.window_millis());
    let limit_hits = u128::from(limit.requests_per_unit);
    let previous_weighted = u128::from(state.previous) * (window - elapsed);
    let used_scaled = previous_weighted + (u128::from(state.current) + u128::from(hits)) * window;
    if used_scaled > limit_hits * window {
        return Verdict {
            over_limit: true,
            remaining: 0,
            reset_after_millis: wait_until_admitted(state, limit_hits, hits, window, elapsed),
            from_local_cache: false,
        };
    }
    state.current = state.current.saturating_add(hits);
    let remaining = ((limit_hits * window - used_scaled) / window) as u64;
    // With nothing left, the reset is when the next hit fits: the end of this window is
    // too early while the previous window still weighs in, and a client that came back
    // then would be turned away.
    let reset_after_millis = if remaining == 0 {
        wait_until_admitted(state, limit_hits, 1, window, elapsed)
    } else {
        (window - elapsed) as u64
    };
    Verdict {
        over_limit: false,
        remaining,
        reset_after_millis,
        from_local_cache: false,
    }
}

/// As `apply`, but a rejected hit is counted too (a policy's `count_rejected: true`): for
/// costs charged after they were spent (an LLM response's tokens, sent by Envoy's
/// `apply_on_stream_done`), which the budget must see even past its limit. The overspend
/// then weighs on the window as any hit does, so nothing more is admitted until it has
/// slid out; the reset says when.
pub fn apply_counting_rejected(
    state: &mut WindowState,
    limit: &Limit,
    hits: u64,
    now_millis: u64,
) -> Verdict {
    let verdict = apply(state, limit, hits, now_millis);
    if !verdict.over_limit {
        return verdict;
    }
    state.current = state.current.saturating_add(hits);
    let window = u128::from(limit.window_millis());
    let elapsed = u128::from(now_millis % limit.window_millis());
    Verdict {
        reset_after_millis: wait_until_admitted(
            state,
            u128::from(limit.requests_per_unit),
            hits,
            window,
            elapsed,
        ),
        ..verdict
    }
}

/// The time until `hits` more would fit, assuming no other traffic: first while the previous
/// window's weight decays in the current window, else in the next window while the current
/// count decays. A request larger than the limit never fits; it is told to wait two windows.
fn wait_until_admitted(
    state: &WindowState,
    limit_hits: u128,
    hits: u64,
    window: u128,
    elapsed: u128,
) -> u64 {
    let hits = u128::from(hits);
    let current = u128::from(state.current);
    let wait = if current + hits <= limit_hits {
        // previous × (W − e − t) ≤ (limit − current − hits) × W
        let free_scaled = (limit_hits - current - hits) * window;
        let allowed_weight = free_scaled / u128::from(state.previous.max(1));
        (window - elapsed).saturating_sub(allowed_weight)
    } else if hits <= limit_hits {
        // In the next window: current × (W − s) ≤ (limit − hits) × W
        let allowed_weight = (limit_hits - hits) * window / current;
        (window - elapsed) + window.saturating_sub(allowed_weight)
    } else {
        (window - elapsed) + window
    };
    wait.max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Algorithm, Unit};

    const MINUTE: u64 = 60_000;

    fn limit(requests_per_unit: u32) -> Limit {
        Limit::per_unit(requests_per_unit, Unit::Minute, Algorithm::SlidingWindow)
    }

    #[test]
    fn counts_within_one_window_like_a_plain_counter() {
        let mut state = WindowState::default();
        let verdicts: Vec<_> = (0..4)
            .map(|i| apply(&mut state, &limit(3), 1, 10 * MINUTE + i))
            .map(|v| (v.over_limit, v.remaining))
            .collect();
        assert_eq!(verdicts, [(false, 2), (false, 1), (false, 0), (true, 0)]);
        assert_eq!(state.current, 3, "the rejected hit is not counted");
    }

    #[test]
    fn weights_the_previous_window_by_its_remaining_overlap() {
        // The seed example: 84 in the previous window, 36 in the current one, 25% in:
        // 84 × 0.75 + 36 = 99, so one more fits under 100 and a second does not.
        let mut state = WindowState {
            window: 11,
            current: 36,
            previous: 84,
        };
        let now = 11 * MINUTE + MINUTE / 4;
        let first = apply(&mut state, &limit(100), 1, now);
        assert!(!first.over_limit);
        assert_eq!(first.remaining, 0);
        assert!(apply(&mut state, &limit(100), 1, now).over_limit);
    }

    #[test]
    fn the_hit_that_takes_the_last_unit_is_told_when_the_next_one_fits() {
        // 10 a minute, all 40 s into a window; the last leaves nothing. The end of the
        // window (20 s away) is too early: all 10 still weigh in just after it. The reset
        // is exactly when one more fits, 6 s into the next window.
        let mut state = WindowState::default();
        let now = 11 * MINUTE + 40_000;
        for _ in 0..9 {
            assert!(!apply(&mut state, &limit(10), 1, now).over_limit);
        }
        let last = apply(&mut state, &limit(10), 1, now);
        assert_eq!((last.over_limit, last.remaining), (false, 0));
        assert_eq!(last.reset_after_millis, 26_000);
        let mut early = state;
        let back = now + last.reset_after_millis;
        assert!(apply(&mut early, &limit(10), 1, back - 1).over_limit);
        assert!(!apply(&mut state, &limit(10), 1, back).over_limit);
    }

    #[test]
    fn no_boundary_burst_the_previous_window_still_counts_after_the_boundary() {
        let mut state = WindowState::default();
        for _ in 0..10 {
            assert!(!apply(&mut state, &limit(10), 1, MINUTE - 1).over_limit);
        }
        // Just after the boundary nearly the whole previous window still weighs in.
        assert!(apply(&mut state, &limit(10), 1, MINUTE + 1).over_limit);
        // Half way through, half of the previous hits have slid out.
        let half = MINUTE + MINUTE / 2;
        let admitted = (0..10)
            .filter(|_| !apply(&mut state, &limit(10), 1, half).over_limit)
            .count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn counting_rejected_hits_carries_the_overspend_into_the_next_window() {
        // A budget of 1 000 a minute charged 600 twice: the second charge is over, and
        // counted. A check of nothing is then over for the rest of the window, and in the
        // next one until 1 200 × (1 − s) ≤ 1 000, a sixth of the way in.
        let mut state = WindowState::default();
        let budget = limit(1_000);
        assert!(!apply_counting_rejected(&mut state, &budget, 600, 10 * MINUTE).over_limit);
        let over = apply_counting_rejected(&mut state, &budget, 600, 10 * MINUTE + 1);
        assert!(over.over_limit);
        assert_eq!(state.current, 1_200);
        let peek = apply_counting_rejected(&mut state, &budget, 0, 10 * MINUTE + 2);
        assert!(peek.over_limit);
        assert_eq!(peek.reset_after_millis, MINUTE - 2 + MINUTE / 6);
        assert!(apply(&mut state, &budget, 0, 11 * MINUTE + MINUTE / 6 - 1).over_limit);
        assert!(!apply(&mut state, &budget, 0, 11 * MINUTE + MINUTE / 6).over_limit);
        // Without counting them, the second charge would have been lost.
        let mut uncounted = WindowState::default();
        apply(&mut uncounted, &budget, 600, 10 * MINUTE);
        apply(&mut uncounted, &budget, 600, 10 * MINUTE + 1);
        assert!(!apply(&mut uncounted, &budget, 0, 10 * MINUTE + 2).over_limit);
    }

    #[test]
    fn a_gap_of_more_than_one_window_forgets_everything() {
        let mut state = WindowState::default();
        for _ in 0..3 {
            apply(&mut state, &limit(3), 1, 0);
        }
        let later = apply(&mut state, &limit(3), 1, 2 * MINUTE + 5);
        assert!(!later.over_limit);
        assert_eq!(later.remaining, 2);
        assert_eq!(state.previous, 0);
    }

    #[test]
    fn reset_when_over_is_the_moment_the_next_hit_fits() {
        let mut state = WindowState::default();
        for _ in 0..10 {
            apply(&mut state, &limit(10), 1, MINUTE - 1);
        }
        let now = MINUTE + 6_000; // 10% into the window: estimate 10 × 0.9 = 9
        let verdict = apply(&mut state, &limit(10), 2, now);
        assert!(verdict.over_limit);
        // Two hits fit once the estimate is 8, at 20% of the window: 6 s from now.
        assert_eq!(verdict.reset_after_millis, 6_000);
        let fits = apply(&mut state, &limit(10), 2, now + verdict.reset_after_millis);
        assert!(!fits.over_limit);
    }

    #[test]
    fn reset_when_the_current_window_is_full_waits_into_the_next_window() {
        let mut state = WindowState::default();
        for _ in 0..4 {
            apply(&mut state, &limit(4), 1, 30_000);
        }
        let verdict = apply(&mut state, &limit(4), 1, 30_000);
        assert!(verdict.over_limit);
        // 30 s to the boundary, then 25% of the next window for 4 × 0.75 + 1 ≤ 4.
        assert_eq!(verdict.reset_after_millis, 30_000 + 15_000);
        assert!(apply(&mut state, &limit(4), 1, 30_000 + 44_999).over_limit);
        assert!(!apply(&mut state, &limit(4), 1, 30_000 + 45_000).over_limit);
    }

    #[test]
    fn reset_when_within_the_limit_is_the_end_of_the_current_window() {
        let mut state = WindowState::default();
        let verdict = apply(&mut state, &limit(4), 1, 42_000);
        assert_eq!(verdict.reset_after_millis, 18_000);
    }

    #[test]
    fn a_request_larger_than_the_limit_is_never_admitted() {
        let mut state = WindowState::default();
        let verdict = apply(&mut state, &limit(4), 5, 0);
        assert!(verdict.over_limit);
        assert_eq!(state.current, 0);
    }
}
