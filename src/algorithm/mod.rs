//! The counting algorithms as pure functions over a small state and an explicit "now".
//!
//! Stores own the state and the atomicity (a lock in memory, a script in Redis); the
//! arithmetic lives here once, so every store makes the same decisions. Each function
//! updates a copy of the state; the store decides whether to keep it (a request rejected
//! by one of a descriptor's limits consumes from none of them).

pub mod fixed_window;
pub mod leaky_bucket;
pub mod penalty;
pub mod sliding_log;
pub mod sliding_window;
pub mod token_bucket;

#[cfg(test)]
mod properties;

use crate::limit::{Algorithm, Limit};

/// What one check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub over_limit: bool,
    /// Hits still allowed after this one (0 when over the limit).
    pub remaining: u64,
    /// Over the limit: how long until a request of the same size would be admitted.
    /// Within the limit: how long until the current window ends (token bucket: until the
    /// bucket is full again).
    pub reset_after_millis: u64,
    /// Answered by the Redis store's local over-limit cache, without asking Redis: rule
    /// statistics count it apart, as envoyproxy/ratelimit's `over_limit_with_local_cache`.
    pub from_local_cache: bool,
}

/// The per-key state of the window algorithms: the current window's index since the epoch
/// and the counts of that window and the one before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowState {
    pub window: u64,
    pub current: u64,
    pub previous: u64,
}

impl WindowState {
    /// Moves the state to the window that contains `now`, carrying the current count into
    /// `previous` only when the windows are adjacent.
    fn roll_to(&mut self, window: u64) {
        if self.window == window {
            return;
        }
        self.previous = if window == self.window + 1 {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.window = window;
    }
}

/// The state behind one counter key, whichever algorithm counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CounterState {
    #[default]
    Empty,
    Window(WindowState),
    /// GCRA's theoretical arrival time, in microseconds since the epoch.
    Bucket {
        tat_micros: u64,
    },
    /// A descriptor's penalty box (see `penalty`).
    Penalty(penalty::PenaltyState),
    Log(sliding_log::Log),
    Leaky(leaky_bucket::Bucket),
}

/// Applies `hits` to `state` under `limit` at time `now_millis`. Only an admitted request
/// changes the counts — except with `count_rejected` (envoyproxy/ratelimit's fixed window,
/// and windows and buckets of policies that charge costs after the fact), which counts
/// every hit; the sliding log ignores it. A state left by another algorithm (the rule changed on reload)
/// starts over.
pub fn apply(
    state: &mut CounterState,
    limit: &Limit,
    hits: u64,
    now_millis: u64,
    count_rejected: bool,
) -> Verdict {
    match limit.algorithm {
        Algorithm::SlidingWindow | Algorithm::FixedWindow => {
            let mut window = match *state {
                CounterState::Window(window) => window,
                _ => WindowState::default(),
            };
            let verdict = if limit.algorithm == Algorithm::SlidingWindow {
                if count_rejected {
                    sliding_window::apply_counting_rejected(&mut window, limit, hits, now_millis)
                } else {
                    sliding_window::apply(&mut window, limit, hits, now_millis)
                }
            } else {
                fixed_window::apply(&mut window, limit, hits, now_millis, count_rejected)
            };
            *state = CounterState::Window(window);
            verdict
        }
        Algorithm::SlidingLog => {
            if !matches!(state, CounterState::Log(_)) {
                *state = CounterState::Log(sliding_log::Log::default());
            }
            match state {
                CounterState::Log(log) => sliding_log::apply(log, limit, hits, now_millis),
                _ => unreachable_state(),
            }
        }
        Algorithm::LeakyBucket => {
            let mut bucket = match *state {
                CounterState::Leaky(bucket) => bucket,
                _ => leaky_bucket::Bucket::default(),
            };
            let verdict = leaky_bucket::apply(&mut bucket, limit, hits, now_millis, count_rejected);
            *state = CounterState::Leaky(bucket);
            verdict
        }
        Algorithm::TokenBucket => {
            let mut tat_micros = match *state {
                CounterState::Bucket { tat_micros } => tat_micros,
                _ => 0,
            };
            let verdict =
                token_bucket::apply(&mut tat_micros, limit, hits, now_millis, count_rejected);
            *state = CounterState::Bucket { tat_micros };
            verdict
        }
    }
}

/// How long a key's state can still influence a decision after its last update: counts of
/// the previous window still weigh in, so window algorithms keep state for two windows; a
/// bucket refills completely within one window (scaled by its burst), and a bucket that
/// takes rejected charges may owe one window more.
pub fn state_lifetime_millis(limit: &Limit, count_rejected: bool) -> u64 {
    match limit.algorithm {
        Algorithm::SlidingWindow => limit.window_millis().saturating_mul(2),
        Algorithm::FixedWindow => match limit.calendar {
            Some(calendar) => calendar.longest_millis(),
            None => limit.window_millis(),
        },
        Algorithm::SlidingLog => limit.window_millis(),
        Algorithm::TokenBucket | Algorithm::LeakyBucket => {
            let per_hit = limit.window_millis() / u64::from(limit.requests_per_unit.max(1));
            let refill = (per_hit.saturating_mul(u64::from(limit.burst())) + 1_000)
                .max(limit.window_millis());
            if count_rejected {
                refill.saturating_add(limit.window_millis())
            } else {
                refill
            }
        }
    }
}

/// A state that was just set to the right variant; answered as "over" so that, should the
/// impossible happen, nothing is admitted by mistake.
fn unreachable_state() -> Verdict {
    Verdict {
        over_limit: true,
        remaining: 0,
        reset_after_millis: 1,
        from_local_cache: false,
    }
}
