//! The counting algorithms as pure functions over a small state and an explicit "now".
//!
//! Stores own the state and the atomicity (a lock in memory, a script in Redis); the
//! arithmetic lives here once, so every store makes the same decisions.

pub mod fixed_window;
pub mod sliding_window;

use crate::limit::{Algorithm, Limit};

/// What one check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub over_limit: bool,
    /// Hits still allowed after this one (0 when over the limit).
    pub remaining: u64,
    /// Over the limit: how long until a request of the same size would be admitted.
    /// Within the limit: how long until the current window ends.
    pub reset_after_millis: u64,
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

/// Applies `hits` to `state` under `limit` at time `now_millis`.
pub fn apply(state: &mut WindowState, limit: &Limit, hits: u64, now_millis: u64) -> Verdict {
    match limit.algorithm {
        Algorithm::SlidingWindow => sliding_window::apply(state, limit, hits, now_millis),
        Algorithm::FixedWindow => fixed_window::apply(state, limit, hits, now_millis),
    }
}

/// How long a key's state can still influence a decision after its last update: counts of
/// the previous window still weigh in, so window algorithms keep state for two windows.
pub fn state_lifetime_millis(limit: &Limit) -> u64 {
    match limit.algorithm {
        Algorithm::SlidingWindow => 2 * limit.window_millis(),
        Algorithm::FixedWindow => limit.window_millis(),
    }
}
