//! The local over-limit cache: descriptors Redis has just answered over the limit are
//! answered here, without a round trip, until the moment Redis's answer could change.
//! Once a second (`REASK_MILLIS`) one request for the descriptor goes to Redis all the
//! same, while the others are still answered here, so a reset this replica did not hear
//! of, or a Redis that lost its keys, is seen within a second rather than when the window
//! or the block ends (a month, for a calendar month) — at one round trip a second, not a
//! round trip for every request in flight when an entry would expire.
//!
//! Like envoyproxy/ratelimit's local cache, but bounded by entries (moka) and only for the
//! cases where the cached answer is exactly what Redis would say — remaining 0 and the same
//! reset, counting down:
//! - every check of the descriptor was over, each with a reset that is the moment a request
//!   of the same size fits (fixed window: the window's end; sliding window: when the
//!   previous window has decayed enough; sliding log: when enough old hits have left;
//!   buckets: when enough has refilled or drained). Until the earliest of those, no
//!   traffic can make Redis admit it — other replicas only add hits — and each reset
//!   counts down exactly as Redis's would without other traffic. A request that can never
//!   fit (more hits than the limit or the bucket) gets a reset that does not count down,
//!   so it is not cached;
//! - a descriptor blocked by its penalty box, until the block ends. One that is over but
//!   not yet blocked goes to Redis: each rejection counts towards the block.
//!
//! An entry is found by the descriptor's keys and rules and answers only requests of the
//! hits it was decided for. A request of another size goes to Redis, and its answer
//! replaces the entry or, when it is not a safe case (a smaller request was admitted, which
//! moves the other resets later), removes it. So while every request for a key has the
//! same size — Envoy's `hits_addend` of 1 — the answers are Redis's, across replicas too:
//! nobody can be admitted before the cached reset, so nothing moves it. With mixed sizes
//! across replicas, another replica's admitted smaller request can move Redis's reset
//! later than the cached one; the request is still rejected, only its reset may be early.
//!
//! A sliding window or a bucket that counts rejected hits (`count_rejected: true`, for
//! costs charged after the fact) is never cached: its rejected hits weigh on the next
//! window, or are owed, so each must reach Redis.
//!
//! Cached requests are not counted in Redis: for a `count_rejected` fixed window (an
//! envoyproxy-style rule) the stored count stops at the first rejected hit of the window,
//! as with envoyproxy/ratelimit's local cache. Every decision stays the same (the window is
//! over until it ends either way); only the count `/v1/usage` reports is lower.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use super::REASK_MILLIS;
use crate::algorithm::Verdict;
use crate::limit::Algorithm;
use crate::store::Check;

/// One cached descriptor: when Redis decided, until when the answer holds (its earliest
/// reset), when a request is next let through to Redis, and each check's reset as an
/// instant.
struct Entry {
    decided_millis: u64,
    until_millis: u64,
    reask_millis: AtomicU64,
    hits: Box<[u64]>,
    resets: Box<[u64]>,
}

struct UntilReset;

impl UntilReset {
    fn lifetime(entry: &Entry) -> Option<Duration> {
        Some(Duration::from_millis(
            entry.until_millis.saturating_sub(entry.decided_millis),
        ))
    }
}

impl Expiry<u128, Arc<Entry>> for UntilReset {
    fn expire_after_create(&self, _: &u128, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Self::lifetime(entry)
    }

    /// A new answer for the descriptor lives as long as it holds. moka's default keeps the
    /// replaced entry's expiry: an answer that replaced one about to expire went with it,
    /// and the next request went to Redis too.
    fn expire_after_update(
        &self,
        _: &u128,
        entry: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Self::lifetime(entry)
    }
}

pub struct OverCache {
    entries: Cache<u128, Arc<Entry>>,
    hits: AtomicU64,
    /// Entries inserted and not yet removed (counted up before an insert, down by moka's
    /// removal listener): never below the true count, so at zero the cache is certainly
    /// empty. While nothing is over its limit, which is most of the time, every lookup and
    /// forget is skipped: they were a tenth of the Redis store's own work.
    live: Arc<AtomicU64>,
}

impl OverCache {
    /// A cache of at most `capacity` descriptors; `None` when 0 turns it off.
    pub fn new(capacity: u64) -> Option<Self> {
        let live = Arc::new(AtomicU64::new(0));
        let removed = live.clone();
        (capacity > 0).then(|| Self {
            entries: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilReset)
                // Every cause: expired, invalidated, evicted, and replaced by a new insert.
                .eviction_listener(move |_, _, _| {
                    removed.fetch_sub(1, Ordering::AcqRel);
                })
                .build(),
            hits: AtomicU64::new(0),
            live,
        })
    }

    fn is_empty(&self) -> bool {
        self.live.load(Ordering::Acquire) == 0
    }

    /// Descriptors answered from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Answers `group` into `out` if it is cached and its answer still holds at `now`,
    /// unless this request is the one let through to Redis this second.
    pub fn answer(&self, group: &[Check<'_>], now_millis: u64, out: &mut [Verdict]) -> bool {
        self.answer_from(group, now_millis, out, true)
    }

    /// Answers `group` into `out` if it is cached and its answer still holds at `now`: for
    /// a request let through to Redis that got no answer, since the cached one is still
    /// what Redis would say, barring a reset.
    pub fn held(&self, group: &[Check<'_>], now_millis: u64, out: &mut [Verdict]) -> bool {
        self.answer_from(group, now_millis, out, false)
    }

    fn answer_from(
        &self,
        group: &[Check<'_>],
        now_millis: u64,
        out: &mut [Verdict],
        may_reask: bool,
    ) -> bool {
        if self.is_empty() {
            return false;
        }
        let Some(entry) = self.entries.get(&identity(group)) else {
            return false;
        };
        // A clock that went back (another replica's request, a test) asks Redis.
        if now_millis < entry.decided_millis
            || now_millis >= entry.until_millis
            || entry.resets.len() != out.len()
            || !entry.hits.iter().eq(group.iter().map(|c| &c.hits))
        {
            return false;
        }
        // The first request past the re-ask time goes to Redis (its answer replaces or
        // removes the entry); should no answer come, the next one a second later does.
        let reask = entry.reask_millis.load(Ordering::Relaxed);
        if may_reask
            && now_millis >= reask
            && entry
                .reask_millis
                .compare_exchange(
                    reask,
                    now_millis.saturating_add(REASK_MILLIS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return false;
        }
        for (slot, reset) in out.iter_mut().zip(entry.resets.iter()) {
            *slot = Verdict {
                over_limit: true,
                remaining: 0,
                reset_after_millis: reset - now_millis,
                from_local_cache: true,
            };
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drops the answer cached for the descriptor of `identity` (see `identity`), if any.
    pub fn forget(&self, identity: u128) {
        if !self.is_empty() {
            self.entries.invalidate(&identity);
        }
    }

    /// Drops every answer: after resets may have been missed.
    pub fn clear(&self) {
        if !self.is_empty() {
            self.entries.invalidate_all();
        }
    }

    /// Remembers Redis's answer to `group` if it is one of the safe cases (module docs).
    /// `blocked` says which checks the penalty box answered.
    pub fn remember(
        &self,
        group: &[Check<'_>],
        verdicts: &[Verdict],
        blocked: &[bool],
        now_millis: u64,
    ) {
        // Most answers are not over the limit and nothing is cached for them: a lookup is
        // far cheaper than an invalidation (which moka queues as a write).
        let forget = || {
            if self.is_empty() {
                return;
            }
            let id = identity(group);
            if self.entries.contains_key(&id) {
                self.entries.invalidate(&id);
            }
        };
        if group.is_empty() || group.len() != verdicts.len() || group.len() != blocked.len() {
            forget();
            return;
        }
        let penalty = group.first().is_some_and(|c| c.penalty.is_some());
        // Each condition only when the ones before hold: most answers are not over at all.
        let cacheable = verdicts
            .iter()
            .all(|v| v.over_limit && v.reset_after_millis > 0)
            && group.iter().all(|c| c.hits > 0)
            // A sliding window or a bucket that counts rejected hits carries them past the
            // reset (into the next window, or as debt): answered here, they would never
            // reach Redis and the limit would recover early.
            && !group.iter().any(|c| {
                c.count_rejected
                    && matches!(
                        c.limit.algorithm,
                        Algorithm::SlidingWindow
                            | Algorithm::TokenBucket
                            | Algorithm::LeakyBucket
                    )
            })
            && if penalty {
                blocked.iter().all(|b| *b)
            } else {
                group.iter().all(fits_some_day)
            };
        if !cacheable {
            forget();
            return;
        }
        let resets: Box<[u64]> = verdicts
            .iter()
            .map(|v| now_millis.saturating_add(v.reset_after_millis))
            .collect();
        let Some(until_millis) = resets.iter().copied().min() else {
            return;
        };
        self.live.fetch_add(1, Ordering::AcqRel);
        self.entries.insert(
            identity(group),
            Arc::new(Entry {
                decided_millis: now_millis,
                until_millis,
                reask_millis: AtomicU64::new(now_millis.saturating_add(REASK_MILLIS)),
                hits: group.iter().map(|c| c.hits).collect(),
                resets,
            }),
        );
    }
}

/// Whether a request of this size is ever admitted; only then does its reset count down.
fn fits_some_day(check: &Check<'_>) -> bool {
    let limit = &check.limit;
    check.hits <= u64::from(limit.requests_per_unit)
        && match limit.algorithm {
            Algorithm::TokenBucket | Algorithm::LeakyBucket => {
                check.hits <= u64::from(limit.burst())
            }
            _ => true,
        }
}

/// A group's keys and rules (a reload that changes a limit makes a new entry); not its
/// hits, so a request of another size replaces or removes the entry. One-shot hashes of
/// each key, seeded with its rule: a streaming hasher over the same bytes cost several
/// times as much, twice per descriptor per request.
pub fn identity(group: &[Check<'_>]) -> u128 {
    group.iter().fold(0, |identity: u128, check| {
        let limit = &check.limit;
        let penalty = check.penalty.map_or([0; 3], |p| {
            [
                u64::from(p.after_rejections),
                p.within_millis,
                p.block_millis,
            ]
        });
        let rule = [
            u64::from(limit.requests_per_unit)
                | (limit.algorithm as u64) << 32
                | u64::from(check.count_rejected) << 40
                | u64::from(check.penalty.is_some()) << 41,
            limit.window_millis(),
            u64::from(limit.burst()),
            penalty[0],
            penalty[1],
            penalty[2],
        ];
        let seed = rule.iter().fold(0u64, |seed, word| {
            (seed.rotate_left(23) ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        // Rotated before each check so the order of a group's checks matters.
        identity.rotate_left(29) ^ xxhash_rust::xxh3::xxh3_128_with_seed(check.key.as_bytes(), seed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Limit, Unit};

    fn check(key: &str, algorithm: Algorithm, hits: u64) -> Check<'_> {
        Check {
            key,
            limit: Limit::per_unit(3, Unit::Minute, algorithm),
            hits,
            group: 0,
            count_rejected: false,
            penalty: None,
        }
    }

    fn over(reset_after_millis: u64) -> Verdict {
        Verdict {
            over_limit: true,
            remaining: 0,
            reset_after_millis,
            from_local_cache: false,
        }
    }

    /// `over(reset)` as the cache answers it.
    fn cached(reset_after_millis: u64) -> Verdict {
        Verdict {
            from_local_cache: true,
            ..over(reset_after_millis)
        }
    }

    #[test]
    fn answers_until_the_earliest_reset_counting_each_down() {
        let cache = OverCache::new(10).unwrap();
        let group = [
            check("a", Algorithm::FixedWindow, 1),
            check("b", Algorithm::SlidingLog, 1),
        ];
        cache.remember(&group, &[over(500), over(300)], &[false; 2], 1_000);
        let mut out = [over(0); 2];
        assert!(cache.answer(&group, 1_100, &mut out));
        assert_eq!(out, [cached(400), cached(200)]);
        assert!(!cache.answer(&group, 1_300, &mut out), "b may fit again");
        assert!(!cache.answer(&group, 999, &mut out), "the clock went back");
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn lets_one_request_a_second_through_to_redis_though_the_reset_is_later() {
        let cache = OverCache::new(10).unwrap();
        let group = [check("a", Algorithm::FixedWindow, 1)];
        cache.remember(&group, &[over(3_600_000)], &[false], 1_000);
        let mut out = [over(0)];
        assert!(cache.answer(&group, 1_999, &mut out));
        assert_eq!(out, [cached(3_599_001)], "the reset is still Redis's");
        assert!(
            !cache.answer(&group, 2_000, &mut out),
            "a second on, Redis is asked"
        );
        assert!(
            cache.answer(&group, 2_001, &mut out),
            "the others are answered here while it is"
        );
        assert!(
            !cache.answer(&group, 3_000, &mut out),
            "no answer came back: asked again a second later"
        );
        assert!(
            cache.held(&group, 3_000, &mut out),
            "and what it holds answers that request if Redis does not"
        );
        cache.remember(&group, &[over(3_597_000)], &[false], 3_001);
        assert!(cache.answer(&group, 3_999, &mut out), "Redis's new answer");
        assert!(!cache.answer(&group, 4_001, &mut out));
    }

    /// moka expires entries on the real clock, so this test waits (60 ms) for the first
    /// answer's lifetime to pass: the answer that replaced it must outlive it.
    #[test]
    fn a_replacing_answer_lives_as_long_as_it_holds() {
        let cache = OverCache::new(10).unwrap();
        let group = [check("a", Algorithm::SlidingLog, 1)];
        cache.remember(&group, &[over(30)], &[false], 1_000);
        cache.remember(&group, &[over(600)], &[false], 1_001);
        std::thread::sleep(Duration::from_millis(60));
        let mut out = [over(0)];
        assert!(
            cache.answer(&group, 1_002, &mut out),
            "the second answer expired with the first"
        );
        assert_eq!(out, [cached(599)]);
    }

    #[test]
    fn counts_its_entries_so_an_empty_cache_skips_lookups() {
        let cache = OverCache::new(10).unwrap();
        let group = [check("a", Algorithm::FixedWindow, 1)];
        let within = Verdict {
            over_limit: false,
            remaining: 1,
            reset_after_millis: 100,
            from_local_cache: false,
        };
        let mut out = [over(0)];
        assert!(cache.is_empty());
        cache.remember(&group, &[over(500)], &[false], 1_000);
        assert!(!cache.is_empty());
        assert!(cache.answer(&group, 1_100, &mut out));
        cache.remember(&group, &[within], &[false], 1_200);
        cache.entries.run_pending_tasks();
        assert!(cache.is_empty(), "the invalidation was counted");
        assert!(!cache.answer(&group, 1_300, &mut out));
        cache.remember(&group, &[over(500)], &[false], 1_400);
        cache.remember(&group, &[over(400)], &[false], 1_500);
        cache.entries.run_pending_tasks();
        assert_eq!(cache.live.load(Ordering::Acquire), 1, "replaced, not added");
        assert!(cache.answer(&group, 1_600, &mut out));
        assert_eq!(out, [cached(300)]);
    }

    #[test]
    fn only_safe_answers_are_kept() {
        let cache = OverCache::new(10).unwrap();
        let mut out = [over(0)];
        let within = Verdict {
            over_limit: false,
            remaining: 1,
            reset_after_millis: 100,
            from_local_cache: false,
        };
        let cases: [(Check<'_>, Verdict, bool); 4] = [
            (check("admitted", Algorithm::FixedWindow, 1), within, false),
            (
                check("too big", Algorithm::SlidingWindow, 4),
                over(100),
                false,
            ),
            (check("usage", Algorithm::FixedWindow, 0), over(100), false),
            (
                Check {
                    penalty: Some(crate::algorithm::penalty::Penalty {
                        after_rejections: 2,
                        within_millis: 1_000,
                        block_millis: 5_000,
                    }),
                    ..check("not blocked yet", Algorithm::FixedWindow, 1)
                },
                over(100),
                false,
            ),
        ];
        for (check, verdict, blocked) in cases {
            cache.remember(&[check], &[verdict], &[blocked], 0);
            assert!(!cache.answer(&[check], 1, &mut out), "{}", check.key);
        }
        let small = check("fits", Algorithm::SlidingWindow, 3);
        cache.remember(&[small], &[over(100)], &[false], 0);
        assert!(cache.answer(&[small], 1, &mut out));
        let other_limit = Check {
            limit: Limit::per_unit(4, Unit::Minute, Algorithm::SlidingWindow),
            ..small
        };
        assert!(
            !cache.answer(&[other_limit], 1, &mut out),
            "a reloaded limit"
        );
        let smaller = check("fits", Algorithm::SlidingWindow, 1);
        assert!(!cache.answer(&[smaller], 1, &mut out), "another size");
        cache.remember(&[smaller], &[within], &[false], 1);
        assert!(
            !cache.answer(&[small], 2, &mut out),
            "an admitted request moves the reset: the entry is gone"
        );
    }
}
