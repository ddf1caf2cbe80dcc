//! Hybrid counting for hot fixed windows (`hybrid: true` on a policy): each replica decides
//! from what Redis last told it plus its own hits not yet sent, and adds those hits to Redis
//! in one pipeline per node every `--redis-hybrid-flush` (on a cluster, each master gets the
//! keys of its slots), reading the new totals back.
//!
//! Why only fixed windows: their state is one count per window that every replica can add
//! to (`INCRBY`) without reading the others' state first, so batching changes only *when* a
//! replica learns the others' hits, never the total. The cost is a bounded overshoot: a
//! replica does not see the hits the others admitted since their last flush and its own last
//! read, at most about two flush intervals plus a round trip of their traffic:
//! admitted ≤ limit + (replicas − 1) × rate per replica × (2 × flush + round trip), and
//! never more than `replicas × limit`. Below the limit decisions need no round trip, but
//! for a key this replica has not read for a second or ever (new to it, or back after a
//! pause): its total is read first (`decide_unless_stale`), as a total from long ago would break
//! the bound. A full window has nothing to send, so it reads its total back once a second
//! instead, to see a reset or a Redis that lost its keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use redis::Value;

use super::REASK_MILLIS;
use super::keys::push_redis_key;
use crate::algorithm::Verdict;
use crate::store::Check;

/// One window of one hybrid counter on this replica.
struct Counter {
    limit: u64,
    window: u64,
    /// When the window ends, in the limiter's milliseconds.
    window_end: u64,
    /// The total Redis returned at the last flush: every replica's flushed hits.
    seen: u64,
    /// Hits admitted here and not yet added to Redis.
    pending: u64,
    /// When its total was last asked of Redis (or the counter made), in the limiter's
    /// milliseconds.
    read_at: u64,
    /// The next flush reads its total back and believes it even if lower (`reread`).
    reread: bool,
}

impl Counter {
    /// Not read from Redis for `REASK_MILLIS`: what it saw may be long out of date.
    fn stale(&self, now_millis: u64) -> bool {
        now_millis.saturating_sub(self.read_at) >= REASK_MILLIS
    }
}

/// The hybrid counters of this replica, keyed by Redis key (one key per window).
#[derive(Default)]
pub struct Hybrid {
    // Held only to decide or to swap counts, never across an await.
    counters: Mutex<HashMap<String, Counter>>,
    /// The latest time a decision was taken at: the flush runs on the limiter's clock too.
    last_now: AtomicU64,
}

/// Hits to add to Redis: the key, how many, and how long the key must live.
pub struct Increment {
    pub key: String,
    pub hits: u64,
    pub ttl_millis: u64,
    /// Sent to read the total back (maybe with no hits): Redis's total replaces what this
    /// replica had seen, even a lower one.
    pub reread: bool,
}

impl Hybrid {
    /// Decides `group` (one descriptor's fixed-window limits) all or nothing, from the last
    /// totals read plus this replica's unsent hits; admitted hits become unsent hits. The
    /// store decides through `decide_unless_stale`; the unit tests here count with this.
    #[cfg(test)]
    pub fn decide(&self, prefix: &str, group: &[Check<'_>], now_millis: u64, out: &mut [Verdict]) {
        self.last_now.fetch_max(now_millis, Ordering::Relaxed);
        let mut counters = self.counters.lock();
        let keys = windows(&mut counters, prefix, group, now_millis, now_millis);
        decide_in(&mut counters, &keys, now_millis, out);
    }

    /// As `decide`, unless a window of `group` has not been read from Redis within
    /// `REASK_MILLIS` and has no unsent hits here (this replica is new to the key, or back
    /// after a pause): then nothing is decided, and the reads to make first are returned —
    /// increments of no hits whose totals are believed. A total from long ago would let
    /// this replica admit what the others have long used, past the documented bound. The
    /// windows are marked read now, so requests meanwhile do not all ask. A key in steady
    /// use is read by every flush and decided here at once.
    pub fn decide_unless_stale(
        &self,
        prefix: &str,
        group: &[Check<'_>],
        now_millis: u64,
        out: &mut [Verdict],
    ) -> Vec<Increment> {
        self.last_now.fetch_max(now_millis, Ordering::Relaxed);
        let mut counters = self.counters.lock();
        // A window never read counts as read long ago.
        let keys = windows(&mut counters, prefix, group, now_millis, 0);
        let reads: Vec<Increment> = keys
            .iter()
            .filter_map(|(key, _)| {
                let counter = counters.get_mut(key)?;
                if counter.pending > 0 || !counter.stale(now_millis) {
                    return None;
                }
                counter.read_at = now_millis;
                Some(Increment {
                    key: key.clone(),
                    hits: 0,
                    ttl_millis: counter.window_end.saturating_sub(now_millis) + counter.window,
                    reread: true,
                })
            })
            .collect();
        if reads.is_empty() {
            decide_in(&mut counters, &keys, now_millis, out);
        }
        reads
    }

    /// Forgets this replica's count of the window under `key` (see `window_key`), unsent
    /// hits included.
    pub fn forget(&self, key: &str) {
        self.counters.lock().remove(key);
    }

    /// Asks the next flush to read every window's total back and believe it even where it
    /// is lower than what this replica saw: after it may have missed a reset (its
    /// subscription was cut), a window it saw full is otherwise refused here until it ends,
    /// as a full window sends nothing, so learns nothing. Until that flush, at most one
    /// flush interval, it decides from what it saw.
    pub fn reread(&self) {
        for counter in self.counters.lock().values_mut() {
            counter.reread = true;
        }
    }

    /// The unsent hits, taken out for one flush; windows that ended with nothing unsent
    /// are forgotten.
    pub fn take_increments(&self) -> Vec<Increment> {
        self.take_increments_at(self.last_now.load(Ordering::Relaxed))
    }

    fn take_increments_at(&self, now_millis: u64) -> Vec<Increment> {
        let mut counters = self.counters.lock();
        counters.retain(|_, c| c.pending > 0 || c.window_end > now_millis);
        counters
            .iter_mut()
            .filter_map(|(key, c)| {
                let full = c.seen + c.pending >= c.limit;
                let reread = std::mem::take(&mut c.reread) || (full && c.stale(now_millis));
                if c.pending == 0 && !reread {
                    return None;
                }
                c.read_at = now_millis;
                let hits = std::mem::take(&mut c.pending);
                Some(Increment {
                    key: key.clone(),
                    hits,
                    // A window past its end, so a replica whose clock is behind still adds
                    // to the same key rather than to one that expired.
                    ttl_millis: c.window_end.saturating_sub(now_millis) + c.window,
                    reread,
                })
            })
            .collect()
    }

    /// Records the totals Redis answered for `increments`. Totals only grow within a
    /// window, so an older, lower one is ignored, unless it was asked for by `reread`.
    pub fn flushed(&self, increments: &[Increment], totals: &[Value]) {
        let mut counters = self.counters.lock();
        for (increment, total) in increments.iter().zip(totals.iter().step_by(2)) {
            if let (Some(counter), Value::Int(total)) = (counters.get_mut(&increment.key), total) {
                let total = u64::try_from(*total).unwrap_or(0);
                counter.seen = match increment.reread {
                    true => total,
                    false => counter.seen.max(total),
                };
            }
        }
    }

    /// Puts the hits of a failed flush back, to be sent with the next one (and a reread
    /// asked again).
    pub fn unsent(&self, increments: Vec<Increment>) {
        let mut counters = self.counters.lock();
        for increment in increments {
            if let Some(counter) = counters.get_mut(&increment.key) {
                counter.pending += increment.hits;
                counter.reread |= increment.reread;
            }
        }
    }
}

/// The Redis keys of `group`'s windows at `now_millis` with each check's hits, their
/// counters made where missing (as read at `read_at`).
fn windows(
    counters: &mut HashMap<String, Counter>,
    prefix: &str,
    group: &[Check<'_>],
    now_millis: u64,
    read_at: u64,
) -> Vec<(String, u64)> {
    let mut keys = Vec::with_capacity(group.len());
    for check in group {
        let (start, end) = check.limit.window_bounds(now_millis);
        let key = key_of_window(prefix, check, start);
        counters.entry(key.clone()).or_insert(Counter {
            limit: u64::from(check.limit.requests_per_unit),
            window: end - start,
            window_end: end,
            seen: 0,
            pending: 0,
            read_at,
            reread: false,
        });
        keys.push((key, check.hits));
    }
    keys
}

/// Decides the windows `keys` all or nothing; admitted hits become unsent hits.
fn decide_in(
    counters: &mut HashMap<String, Counter>,
    keys: &[(String, u64)],
    now_millis: u64,
    out: &mut [Verdict],
) {
    let fits = keys.iter().all(|(key, hits)| {
        counters
            .get(key)
            .is_some_and(|c| c.seen + c.pending + hits <= c.limit)
    });
    for ((key, hits), slot) in keys.iter().zip(out.iter_mut()) {
        let Some(counter) = counters.get_mut(key) else {
            continue;
        };
        let this_fits = counter.seen + counter.pending + hits <= counter.limit;
        if fits {
            counter.pending += hits;
        }
        *slot = Verdict {
            over_limit: !this_fits,
            remaining: counter.limit.saturating_sub(counter.seen + counter.pending),
            reset_after_millis: counter.window_end.saturating_sub(now_millis),
            from_local_cache: false,
        };
    }
}

/// The Redis key of `check`'s window at `now_millis`: its counter key's, with the
/// window's start after `|hybrid|`.
pub fn window_key(prefix: &str, check: &Check<'_>, now_millis: u64) -> String {
    key_of_window(prefix, check, check.limit.window_bounds(now_millis).0)
}

fn key_of_window(prefix: &str, check: &Check<'_>, start: u64) -> String {
    let mut key = String::with_capacity(96);
    push_redis_key(&mut key, prefix, check.key);
    key.push_str("|hybrid|");
    key.push_str(&start.to_string());
    key
}

/// One pipeline adding every increment: `INCRBY` (its reply is the new total) and `PEXPIRE`
/// per key.
pub fn pipeline(increments: &[Increment]) -> redis::Pipeline {
    let mut pipeline = redis::Pipeline::with_capacity(increments.len() * 2);
    // Error replies come back as values, so a cluster master's MOVED is seen as a
    // redirect (and the slot map re-read) rather than as a broken connection.
    pipeline.ignore_errors();
    for increment in increments {
        pipeline
            .cmd("INCRBY")
            .arg(&increment.key)
            .arg(increment.hits)
            .cmd("PEXPIRE")
            .arg(&increment.key)
            .arg(increment.ttl_millis);
    }
    pipeline
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Algorithm, Limit, Unit};

    fn check(key: &str, limit: u32) -> Check<'_> {
        Check {
            key,
            limit: Limit {
                hybrid: true,
                ..Limit::per_unit(limit, Unit::Minute, Algorithm::FixedWindow)
            },
            hits: 1,
            group: 0,
            count_rejected: true,
            penalty: None,
        }
    }

    fn verdict() -> Verdict {
        Verdict {
            over_limit: false,
            remaining: 0,
            reset_after_millis: 0,
            from_local_cache: false,
        }
    }

    #[test]
    fn counts_locally_and_learns_the_others_hits_from_the_flush() {
        let hybrid = Hybrid::default();
        let now = 120_000;
        let mut out = [verdict()];
        for _ in 0..3 {
            hybrid.decide("p:", &[check("d|u=a|1m/fixed_window", 5)], now, &mut out);
            assert!(!out[0].over_limit);
        }
        assert_eq!(out[0].remaining, 2);
        let increments = hybrid.take_increments_at(now);
        assert_eq!(increments.len(), 1);
        assert_eq!(increments[0].hits, 3);
        assert!(increments[0].key.ends_with("|hybrid|120000"));
        // Another replica had added 2: Redis answers 5, the limit.
        hybrid.flushed(&increments, &[Value::Int(5), Value::Int(1)]);
        hybrid.decide(
            "p:",
            &[check("d|u=a|1m/fixed_window", 5)],
            now + 1,
            &mut out,
        );
        assert!(out[0].over_limit);
        assert_eq!(out[0].reset_after_millis, 60_000 - 1);
        // The next window starts from nothing.
        hybrid.decide(
            "p:",
            &[check("d|u=a|1m/fixed_window", 5)],
            now + 60_000,
            &mut out,
        );
        assert!(!out[0].over_limit);
    }

    #[test]
    fn a_calendar_day_is_counted_under_its_start_until_midnight_in_its_zone() {
        use crate::calendar::{Calendar, Zone};
        let tokyo = Calendar::new(Unit::Day, Zone::named("Asia/Tokyo").unwrap()).unwrap();
        let mut day = check("d|u=t|day@Asia/Tokyo/fixed_window", 1);
        day.limit.window_millis = Unit::Day.millis();
        day.limit.calendar = Some(tokyo);
        // 2026-12-07T14:00:00Z is 23:00 in Tokyo; its day began at 15:00 UTC the day before.
        let now = 1_796_652_000_000;
        let started = now - 23 * 3_600_000;
        let hybrid = Hybrid::default();
        let mut out = [verdict()];
        hybrid.decide("p:", &[day], now, &mut out);
        assert!(!out[0].over_limit);
        assert_eq!(
            out[0].reset_after_millis, 3_600_000,
            "an hour to midnight in Tokyo"
        );
        hybrid.decide("p:", &[day], now + 3_599_999, &mut out);
        assert!(out[0].over_limit, "the same Tokyo day");
        let increments = hybrid.take_increments_at(now);
        assert!(increments[0].key.ends_with(&format!("|hybrid|{started}")));
        assert_eq!(window_key("p:", &day, now), increments[0].key);
        hybrid.decide("p:", &[day], now + 3_600_000, &mut out);
        assert!(!out[0].over_limit, "the next Tokyo day");
    }

    #[test]
    fn a_failed_flush_keeps_its_hits_for_the_next() {
        let hybrid = Hybrid::default();
        let mut out = [verdict()];
        hybrid.decide("p:", &[check("k|1m/fixed_window", 5)], 0, &mut out);
        let increments = hybrid.take_increments_at(0);
        hybrid.unsent(increments);
        assert_eq!(hybrid.take_increments_at(0)[0].hits, 1);
    }

    #[test]
    fn a_reread_believes_a_lower_total_so_a_missed_reset_lets_the_client_in() {
        let hybrid = Hybrid::default();
        let key = "d|u=r|1m/fixed_window";
        let now = 120_000;
        let mut out = [verdict()];
        hybrid.decide("p:", &[check(key, 2)], now, &mut out);
        let increments = hybrid.take_increments_at(now);
        // Another replica's hit too: the window is full.
        hybrid.flushed(&increments, &[Value::Int(2), Value::Int(1)]);
        hybrid.decide("p:", &[check(key, 2)], now + 1, &mut out);
        assert!(out[0].over_limit);
        assert!(
            hybrid.take_increments_at(now + 1).is_empty(),
            "a full window sends nothing"
        );

        // The window was reset in Redis (a reset this replica did not hear of).
        let older = hybrid_increment(key, now);
        hybrid.flushed(&[older], &[Value::Int(0), Value::Int(1)]);
        hybrid.decide("p:", &[check(key, 2)], now + 2, &mut out);
        assert!(
            out[0].over_limit,
            "a lower total is an older one unless asked for"
        );

        hybrid.reread();
        let reread = hybrid.take_increments_at(now + 2);
        assert_eq!(reread.len(), 1, "every window is read back, hits or not");
        assert_eq!((reread[0].hits, reread[0].reread), (0, true));
        // A failed reread is asked again.
        hybrid.unsent(reread);
        let reread = hybrid.take_increments_at(now + 2);
        assert!(reread[0].reread);
        assert!(!hybrid.take_increments_at(now + 2).iter().any(|i| i.reread));
        hybrid.flushed(&reread, &[Value::Int(0), Value::Int(1)]);
        hybrid.decide("p:", &[check(key, 2)], now + 3, &mut out);
        assert!(!out[0].over_limit, "Redis's total after the reset");
        assert_eq!(out[0].remaining, 1);
    }

    /// A full window asks Redis for its total once a second, with no hits to send, and
    /// believes it: a window Redis lost (or a reset not heard of) opens again.
    #[test]
    fn a_full_window_reads_its_total_back_every_second() {
        let hybrid = Hybrid::default();
        let key = "d|u=f|1m/fixed_window";
        let now = 120_000;
        let mut out = [verdict()];
        for _ in 0..2 {
            hybrid.decide("p:", &[check(key, 2)], now, &mut out);
        }
        let sent = hybrid.take_increments_at(now);
        assert_eq!((sent[0].hits, sent[0].reread), (2, false));
        hybrid.flushed(&sent, &[Value::Int(2), Value::Int(1)]);
        assert!(
            hybrid.take_increments_at(now + 999).is_empty(),
            "read a moment ago"
        );
        let reread = hybrid.take_increments_at(now + 1_000);
        assert_eq!(reread.len(), 1);
        assert_eq!((reread[0].hits, reread[0].reread), (0, true));
        assert!(
            hybrid.take_increments_at(now + 1_500).is_empty(),
            "once a second"
        );
        // Redis lost the key: the window opens.
        hybrid.flushed(&reread, &[Value::Int(0), Value::Int(1)]);
        hybrid.decide("p:", &[check(key, 2)], now + 1_500, &mut out);
        assert!(!out[0].over_limit);
        // A window with room left is not read back for nothing.
        hybrid.take_increments_at(now + 1_500);
        assert!(hybrid.take_increments_at(now + 5_000).is_empty());
    }

    fn hybrid_increment(key: &str, now: u64) -> Increment {
        Increment {
            key: window_key("p:", &check(key, 2), now),
            hits: 0,
            ttl_millis: 60_000,
            reread: false,
        }
    }
}
