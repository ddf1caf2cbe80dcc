//! Sliding log: the timestamps of admitted hits inside the window, so the count over any
//! window of length W ending now is exact. Memory grows with the limit, so the config
//! refuses it above `--max-sliding-log-limit`.

use std::collections::VecDeque;

use super::Verdict;
use crate::limit::Limit;

/// Admitted hits as `(time in ms, hits)`, oldest first, with their total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Log {
    entries: VecDeque<(u64, u64)>,
    total: u64,
}

impl Log {
    /// A log of `entries` (time in ms, hits), oldest first: one read back from a snapshot.
    pub fn from_entries(entries: Vec<(u64, u64)>) -> Self {
        let total = entries.iter().map(|&(_, hits)| hits).sum();
        Self {
            entries: entries.into(),
            total,
        }
    }

    /// The admitted hits, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries.iter().copied()
    }
}

pub fn apply(log: &mut Log, limit: &Limit, hits: u64, now_millis: u64) -> Verdict {
    let window = limit.window_millis();
    // Hits at or before now − W have left the window.
    while let Some(&(at, n)) = log.entries.front() {
        if at.saturating_add(window) > now_millis {
            break;
        }
        log.entries.pop_front();
        log.total -= n;
    }
    let limit_hits = u64::from(limit.requests_per_unit);
    if log.total + hits > limit_hits {
        return Verdict {
            over_limit: true,
            remaining: 0,
            reset_after_millis: wait_until_room(log, limit_hits, hits, window, now_millis),
            from_local_cache: false,
        };
    }
    if hits > 0 {
        log.entries.push_back((now_millis, hits));
        log.total += hits;
    }
    Verdict {
        over_limit: false,
        remaining: limit_hits - log.total,
        // When the oldest admitted hit leaves the window and frees room.
        reset_after_millis: log
            .entries
            .front()
            .map_or(window, |&(at, _)| (at + window).saturating_sub(now_millis)),
        from_local_cache: false,
    }
}

/// The time until enough of the oldest hits have left for `hits` more to fit; a request
/// larger than the limit never fits and is told to wait a whole window.
fn wait_until_room(log: &Log, limit_hits: u64, hits: u64, window: u64, now: u64) -> u64 {
    if hits > limit_hits {
        return window;
    }
    let mut to_free = log.total + hits - limit_hits;
    for &(at, n) in &log.entries {
        if n >= to_free {
            return (at + window).saturating_sub(now).max(1);
        }
        to_free -= n;
    }
    window
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Algorithm, Unit};

    fn limit(requests_per_unit: u32) -> Limit {
        Limit::per_unit(requests_per_unit, Unit::Minute, Algorithm::SlidingLog)
    }

    #[test]
    fn counts_exactly_over_the_last_window() {
        let mut log = Log::default();
        for t in [0, 10_000, 20_000] {
            assert!(!apply(&mut log, &limit(3), 1, t).over_limit);
        }
        let rejected = apply(&mut log, &limit(3), 1, 59_999);
        assert!(rejected.over_limit);
        // The hit at 0 leaves at 60 s.
        assert_eq!(rejected.reset_after_millis, 1);
        assert!(!apply(&mut log, &limit(3), 1, 60_000).over_limit);
        assert!(apply(&mut log, &limit(3), 1, 60_000).over_limit);
    }

    #[test]
    fn no_boundary_burst_at_window_edges() {
        let mut log = Log::default();
        for _ in 0..5 {
            assert!(!apply(&mut log, &limit(5), 1, 59_000).over_limit);
        }
        assert!(
            apply(&mut log, &limit(5), 1, 61_000).over_limit,
            "unlike a fixed window"
        );
    }

    #[test]
    fn a_rejection_records_nothing_and_reset_names_the_hit_that_frees_room() {
        let mut log = Log::default();
        apply(&mut log, &limit(4), 2, 1_000);
        apply(&mut log, &limit(4), 2, 5_000);
        let before = log.clone();
        let verdict = apply(&mut log, &limit(4), 3, 10_000);
        assert!(verdict.over_limit);
        assert_eq!(log, before);
        // Three more need both earlier pairs gone: the second leaves at 65 s.
        assert_eq!(verdict.reset_after_millis, 55_000);
    }
}
