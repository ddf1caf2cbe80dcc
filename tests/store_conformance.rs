//! The store-conformance suite: the same decision sequences, with injected `now_millis`,
//! against the in-memory store and a real Redis (standalone and a 3-master cluster); the
//! verdicts must be identical, check for check.
//!
//! Also here, at the library level: one EVALSHA per request on a standalone Redis, and a
//! cluster that loses one master keeps counting the other masters' keys in Redis.

mod common;

use std::time::Duration;

use common::redis::{RedisCluster, RedisSentinel, RedisServer};
use meshlimit::algorithm::Verdict;
use meshlimit::algorithm::penalty::Penalty;
use meshlimit::limit::{Algorithm, Limit, Unit};
use meshlimit::store::redis::settings::{MasterUrl, SentinelTarget};
use meshlimit::store::redis::{FailureMode, RedisOptions, RedisTarget, push_redis_key, slot};
use meshlimit::store::split::SplitStore;
use meshlimit::store::{Check, CounterStore, MemoryStore, RedisStore};

/// A Tuesday in 2023, on a day boundary: every window of the scenarios starts here.
const T0: u64 = 1_700_006_400_000;
const SECOND: u64 = 1_000;
const MINUTE: u64 = 60_000;

#[derive(Debug, Clone)]
struct Spec {
    key: String,
    limit: Limit,
    hits: u64,
    group: u32,
    count_rejected: bool,
    penalty: Option<Penalty>,
}

/// One `apply` call (or, with `forget`, one reset of the checks' counters): its checks and
/// its time.
#[derive(Debug, Clone)]
struct Step {
    now: u64,
    checks: Vec<Spec>,
    forget: bool,
}

fn spec(key: &str, limit: Limit, hits: u64, group: u32) -> Spec {
    Spec {
        key: key.to_owned(),
        limit,
        hits,
        group,
        count_rejected: false,
        penalty: None,
    }
}

fn limit(requests_per_unit: u32, window_millis: u64, algorithm: Algorithm) -> Limit {
    Limit {
        requests_per_unit,
        window_millis,
        algorithm,
        burst: None,
        hybrid: false,
        calendar: None,
    }
}

/// One hit on `key` under `limit`, in group `group`, without penalty box.
fn one_hit(key: &str, limit: Limit, group: u32) -> Check<'_> {
    Check {
        key,
        limit,
        hits: 1,
        group,
        count_rejected: false,
        penalty: None,
    }
}

fn step(now: u64, checks: Vec<Spec>) -> Step {
    Step {
        now,
        checks,
        forget: false,
    }
}

/// A reset of `checks`' counters and penalty boxes at `now`; it decides nothing.
fn reset(now: u64, checks: Vec<Spec>) -> Step {
    Step {
        now,
        checks,
        forget: true,
    }
}

/// Runs `steps` in order and returns every verdict.
async fn run(store: &impl CounterStore, steps: &[Step]) -> Vec<Vec<Verdict>> {
    let mut all = Vec::new();
    for step in steps {
        let checks: Vec<Check<'_>> = step
            .checks
            .iter()
            .map(|s| Check {
                key: &s.key,
                limit: s.limit,
                hits: s.hits,
                group: s.group,
                count_rejected: s.count_rejected,
                penalty: s.penalty,
            })
            .collect();
        let mut out = Vec::new();
        if step.forget {
            store
                .forget(&checks, step.now)
                .await
                .expect("the store resets");
        } else {
            store
                .apply(&checks, step.now, &mut out)
                .await
                .expect("the store decides");
        }
        all.push(out);
    }
    all
}

/// What was decided, without where from: the Redis store flags the answers of its local
/// over-limit cache (for the rule statistics), which decide exactly as Redis would.
fn decided(verdicts: &[Verdict]) -> Vec<Verdict> {
    verdicts
        .iter()
        .map(|v| Verdict {
            from_local_cache: false,
            ..*v
        })
        .collect()
}

fn scenarios() -> Vec<(&'static str, Vec<Step>)> {
    let sliding = limit(10, MINUTE, Algorithm::SlidingWindow);
    let fixed = limit(3, MINUTE, Algorithm::FixedWindow);
    let bucket = Limit {
        burst: Some(5),
        hybrid: false,
        ..limit(10, SECOND, Algorithm::TokenBucket)
    };
    let mut out = Vec::new();

    // Sliding window: fill a window, cross the boundary, watch the previous window decay;
    // a request larger than the limit; zero-hit checks.
    let mut steps = Vec::new();
    for i in 0..12 {
        steps.push(step(
            T0 + MINUTE - 1_000 + i,
            vec![spec("d|u=a|1m/s", sliding, 1, 0)],
        ));
    }
    for at in [
        1, 6_000, 15_000, 30_000, 30_001, 45_000, 59_999, 60_000, 125_000,
    ] {
        for hits in [0, 1, 2, 11] {
            steps.push(step(
                T0 + MINUTE + at,
                vec![spec("d|u=a|1m/s", sliding, hits, 0)],
            ));
        }
    }
    out.push(("sliding window", steps));

    // Fixed window, both ways of treating rejected hits.
    let mut steps = Vec::new();
    for (i, count_rejected) in [(0, true), (1, false)] {
        let key = format!("d|u=f{i}|1m/f");
        for n in 0..6 {
            let mut check = spec(&key, fixed, 1, 0);
            check.count_rejected = count_rejected;
            steps.push(step(T0 + 10_000 + n * 1_000, vec![check]));
        }
        steps.push(step(T0 + 20_000, vec![spec(&key, fixed, 0, 0)]));
        steps.push(step(T0 + MINUTE + 5, vec![spec(&key, fixed, 2, 0)]));
        steps.push(step(T0 + 3 * MINUTE, vec![spec(&key, fixed, 4, 0)]));
    }
    out.push(("fixed window", steps));

    // Token bucket: a burst, refill at the rate, rejected requests take nothing, a request
    // larger than the burst, and a zero limit.
    let mut steps = Vec::new();
    for i in 0..7 {
        steps.push(step(T0 + i, vec![spec("d|u=b|1s/t", bucket, 1, 0)]));
    }
    for at in [99, 100, 101, 250, 251, 900, 5_000] {
        for hits in [0, 1, 3, 6] {
            steps.push(step(T0 + at, vec![spec("d|u=b|1s/t", bucket, hits, 0)]));
        }
    }
    let zero = limit(0, SECOND, Algorithm::TokenBucket);
    steps.push(step(T0, vec![spec("d|u=z|1s/t", zero, 1, 0)]));
    steps.push(step(T0, vec![spec("d|u=z|1s/t", zero, 0, 0)]));
    let odd = limit(7, 3 * SECOND, Algorithm::TokenBucket);
    for i in 0..12 {
        steps.push(step(
            T0 + i * 137,
            vec![spec("d|u=o|3s/t", odd, 1 + i % 2, 0)],
        ));
    }
    out.push(("token bucket", steps));

    // Several limits of one descriptor are all or nothing; a key listed twice in a group is
    // counted twice; groups of one call apply in order and see each other's counts.
    let per_second = limit(2, SECOND, Algorithm::SlidingWindow);
    let per_minute = limit(5, MINUTE, Algorithm::FixedWindow);
    let mut steps = Vec::new();
    for i in 0..8 {
        steps.push(step(
            T0 + i * 300,
            vec![
                spec("d|u=m|1s/s", per_second, 1, 0),
                spec("d|u=m|1m/f", per_minute, 1, 0),
                spec("d|u=m|1s/t", bucket, 1, 1),
            ],
        ));
    }
    for i in 0..4 {
        steps.push(step(
            T0 + 5_000 + i,
            vec![
                spec("d|u=twice|1m/f", per_minute, 2, 3),
                spec("d|u=twice|1m/f", per_minute, 2, 3),
                spec("d|u=n|1m/f", per_minute, 1, 4),
                spec("d|u=n|1m/f", per_minute, 1, 5),
            ],
        ));
    }
    out.push(("groups", steps));

    // Penalty box: rejections within W block for D; a zero-hit check never earns one.
    let login = Penalty {
        after_rejections: 2,
        within_millis: MINUTE,
        block_millis: 10 * MINUTE,
    };
    let one_per_second = limit(1, SECOND, Algorithm::SlidingWindow);
    let mut steps = Vec::new();
    let mut penalized = |key: &str, hits: u64, now: u64| {
        let mut check = spec(key, one_per_second, hits, 0);
        check.penalty = Some(login);
        let mut second = spec(&key.replace("1s/s", "1m/f"), per_minute, hits, 0);
        second.penalty = Some(login);
        steps.push(step(now, vec![check, second]));
    };
    for (hits, at) in [
        (1, 0),
        (1, 10),
        (0, 20),
        (0, 30),
        (1, 40),
        (1, 5_000),
        (1, 600_039),
    ] {
        penalized("d|ip=1|1s/s", hits, T0 + at);
    }
    for at in [600_041, 601_000, 602_000, 602_001, 602_002] {
        penalized("d|ip=1|1s/s", 1, T0 + at);
    }
    penalized("d|ip=2|1s/s", 0, T0);
    penalized("d|ip=2|1s/s", 0, T0);
    out.push(("penalty box", steps));

    // A block shorter than the limit's own reset lasts until the limit lets the key in.
    let brief = Penalty {
        after_rejections: 1,
        within_millis: MINUTE,
        block_millis: 10 * SECOND,
    };
    let hourly = limit(2, 60 * MINUTE, Algorithm::FixedWindow);
    let steps = [0, 1, 2, 11 * SECOND, 20 * MINUTE, 60 * MINUTE + 1]
        .into_iter()
        .map(|at| {
            let mut check = spec("d|ip=3|1h/f", hourly, 1, 0);
            check.penalty = Some(brief);
            step(T0 + at, vec![check])
        })
        .collect();
    out.push(("a block shorter than the limit's reset", steps));

    out.push(("calendar windows", calendar_steps()));
    out.push(("random sequences", random_steps(0x5eed, 400, 3)));
    out.extend(log_and_leaky_scenarios());
    out.push((
        "random sequences, all five algorithms",
        random_steps(0x1ea4, 500, 5),
    ));
    out
}

/// Calendar windows, whose boundaries Redis is told rather than computes: a Berlin month
/// across its first (an hour before 1 March UTC), in a group with a per-second limit,
/// counting rejected hits, and a New York day of 25 hours.
fn calendar_steps() -> Vec<Step> {
    let at = |text: &str| text.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64;
    let calendar = |unit, zone| {
        Some(
            meshlimit::calendar::Calendar::new(
                unit,
                meshlimit::calendar::Zone::named(zone).unwrap(),
            )
            .unwrap(),
        )
    };
    let month = Limit {
        calendar: calendar(Unit::Month, "Europe/Berlin"),
        ..limit(3, 30 * 86_400_000, Algorithm::FixedWindow)
    };
    let day = Limit {
        calendar: calendar(Unit::Day, "America/New_York"),
        ..limit(2, 86_400_000, Algorithm::FixedWindow)
    };
    let per_second = limit(10, SECOND, Algorithm::SlidingWindow);
    let key = "d|u=c|month@Europe/Berlin/f";
    let mut steps = Vec::new();
    let end_of_february = at("2026-02-28T22:59:58Z");
    for i in 0..6 {
        steps.push(step(
            end_of_february + i * 400,
            vec![spec(key, month, 1, 0), spec("d|u=c|1s/s", per_second, 1, 0)],
        ));
    }
    for (i, hits) in [(0, 2), (1, 0), (2, 2), (3, 1)] {
        steps.push(step(
            at("2026-03-31T21:59:59Z") + i,
            vec![spec(key, month, hits, 0)],
        ));
    }
    for (n, when) in [
        "2026-03-31T22:00:00Z",
        "2026-03-31T22:00:01Z",
        "2026-04-15T00:00:00Z",
    ]
    .into_iter()
    .enumerate()
    {
        let mut counted = spec("d|u=r|month@Europe/Berlin/f", month, 2 + n as u64, 0);
        counted.count_rejected = true;
        steps.push(step(at(when), vec![counted]));
    }
    // Chicago's weeks from Sunday and from Monday, one hit each: Sunday 13 December starts
    // at 06:00 UTC, a new week for the one and not for the other.
    let sunday_week = Limit {
        calendar: calendar(Unit::Week, "America/Chicago")
            .map(|c| c.starting_weeks_on(jiff::civil::Weekday::Sunday).unwrap()),
        ..limit(1, 7 * 86_400_000, Algorithm::FixedWindow)
    };
    let monday_week = Limit {
        calendar: calendar(Unit::Week, "America/Chicago"),
        ..sunday_week
    };
    for when in ["2026-12-13T05:59:59Z", "2026-12-13T06:00:00Z"] {
        steps.push(step(
            at(when),
            vec![spec(
                "d|u=w|week-sunday@America/Chicago/f",
                sunday_week,
                1,
                0,
            )],
        ));
        steps.push(step(
            at(when),
            vec![spec("d|u=w|week@America/Chicago/f", monday_week, 1, 0)],
        ));
    }
    // 1 November 2026 in New York lasts from 04:00 UTC to 05:00 UTC the next day.
    for when in [
        "2026-11-01T03:59:59Z",
        "2026-11-01T04:00:00Z",
        "2026-11-02T04:30:00Z",
        "2026-11-02T04:59:59Z",
        "2026-11-02T05:00:00Z",
    ] {
        steps.push(step(
            at(when),
            vec![spec("d|u=ny|day@America/New_York/f", day, 1, 0)],
        ));
        steps.push(step(
            at(when),
            vec![spec("d|u=ny|day@America/New_York/f", day, 1, 0)],
        ));
    }
    steps
}

/// Sliding log and leaky bucket alone, in groups with the other algorithms, and behind a
/// penalty box.
fn log_and_leaky_scenarios() -> Vec<(&'static str, Vec<Step>)> {
    let log = limit(4, MINUTE, Algorithm::SlidingLog);
    let leaky = Limit {
        burst: Some(3),
        hybrid: false,
        ..limit(10, SECOND, Algorithm::LeakyBucket)
    };
    let mut out = Vec::new();

    // Resets: every algorithm, alone and grouped, over its limit and behind a penalty box,
    // starts afresh after a reset, and a reset of one descriptor leaves the others be.
    let fixed = limit(3, MINUTE, Algorithm::FixedWindow);
    let sliding = limit(3, MINUTE, Algorithm::SlidingWindow);
    let bucket = Limit {
        burst: Some(3),
        hybrid: false,
        ..limit(1, MINUTE, Algorithm::TokenBucket)
    };
    let blocked = Penalty {
        after_rejections: 1,
        within_millis: MINUTE,
        block_millis: 10 * MINUTE,
    };
    let counted = |key: &str, limit: Limit| {
        let mut check = spec(key, limit, 2, 0);
        check.count_rejected = limit.algorithm == Algorithm::FixedWindow;
        check
    };
    let alone = [
        counted("d|u=f|1m/f", fixed),
        counted("d|u=s|1m/s", sliding),
        counted("d|u=t|1m/t", bucket),
        counted("d|u=l|1m/l", log),
        counted("d|u=k|1s/k", leaky),
    ];
    let mut steps = Vec::new();
    for (i, check) in alone.iter().enumerate() {
        let other = spec(&format!("{}|other", check.key), check.limit, 2, 1);
        let both = vec![check.clone(), other.clone()];
        for at in [0, 10, 20] {
            steps.push(step(T0 + 70_000 + i as u64 * 1_000 + at, both.clone()));
        }
        steps.push(reset(
            T0 + 70_000 + i as u64 * 1_000 + 30,
            vec![check.clone()],
        ));
        for at in [40, 50] {
            steps.push(step(T0 + 70_000 + i as u64 * 1_000 + at, both.clone()));
        }
    }
    let mut group = vec![
        spec("d|g=1|1m/f", fixed, 2, 0),
        spec("d|g=1|1m/s", sliding, 2, 0),
    ];
    for check in &mut group {
        check.penalty = Some(blocked);
    }
    for at in [0, 1, 2, 3] {
        steps.push(step(T0 + 80_000 + at, group.clone()));
    }
    steps.push(reset(T0 + 80_010, group.clone()));
    for at in [20, 21, 22] {
        steps.push(step(T0 + 80_000 + at, group.clone()));
    }
    // A reset of what was never counted does nothing.
    steps.push(reset(
        T0 + 80_030,
        vec![spec("d|g=never|1m/f", fixed, 1, 0)],
    ));
    out.push(("resets", steps));

    // Costs charged after the fact (`count_rejected` on sliding windows and buckets): a charge over the
    // budget still counts, alone and across a group of two limits; zero-hit peeks see the
    // overspend in this window and, weighted, in the next.
    let budget = limit(1_000, MINUTE, Algorithm::SlidingWindow);
    let daily = limit(3_000, 10 * MINUTE, Algorithm::SlidingWindow);
    // A token bucket in debt: 600 × 3 against a burst of 1 000 owes 800, capped at a
    // window's refill beyond empty.
    let tokens_per_minute = limit(1_000, MINUTE, Algorithm::TokenBucket);
    let leaky = limit(1_000, MINUTE, Algorithm::LeakyBucket);
    let charge = |key: &str, limit: Limit, hits: u64, group: u32| {
        let mut check = spec(key, limit, hits, group);
        check.count_rejected = true;
        check
    };
    let mut steps = Vec::new();
    for (at, hits) in [
        (0, 600),
        (1, 0),
        (2, 600),
        (3, 0),
        (4, 600),
        (30_000, 0),
        (70_000, 0),
        (80_000, 0),
        (95_000, 1),
        (130_000, 0),
    ] {
        steps.push(step(
            T0 + 90_000 + at,
            vec![
                charge("d|team=a|1m/s", budget, hits, 0),
                charge("d|team=b|1m/s", budget, hits, 1),
                charge("d|team=b|10m/s", daily, hits, 1),
                charge("d|team=c|1m/t", tokens_per_minute, hits, 2),
                charge("d|team=d|1m/t", tokens_per_minute, hits * 3, 3),
                charge("d|team=e|1m/k", leaky, hits * 2, 4),
            ],
        ));
    }
    out.push(("charged after the fact", steps));

    // Sliding log: admitted hits of several sizes, rejections that record nothing, reset
    // naming the hit that frees room, the exact edge at now − W, a request larger than the
    // limit, zero-hit checks and a gap longer than the window.
    let mut steps = Vec::new();
    for (at, hits) in [
        (0, 1),
        (1_000, 2),
        (1_000, 0),
        (5_000, 1),
        (5_001, 1),
        (5_002, 3),
    ] {
        steps.push(step(T0 + at, vec![spec("d|u=l|1m/l", log, hits, 0)]));
    }
    for at in [
        59_999, 60_000, 60_001, 60_999, 61_000, 65_000, 65_001, 90_000,
    ] {
        for hits in [0, 1, 2, 5] {
            steps.push(step(T0 + at, vec![spec("d|u=l|1m/l", log, hits, 0)]));
        }
    }
    steps.push(step(T0 + 10 * MINUTE, vec![spec("d|u=l|1m/l", log, 4, 0)]));
    let one = limit(1, SECOND, Algorithm::SlidingLog);
    for i in 0..10 {
        steps.push(step(T0 + i * 333, vec![spec("d|u=l1|1s/l", one, 1, 0)]));
    }
    let zero = limit(0, SECOND, Algorithm::SlidingLog);
    steps.push(step(T0, vec![spec("d|u=l0|1s/l", zero, 1, 0)]));
    steps.push(step(T0, vec![spec("d|u=l0|1s/l", zero, 0, 0)]));
    out.push(("sliding log", steps));

    // Leaky bucket: fill to capacity, drain at the rate (100 ms a hit), partial drains, a
    // request larger than the capacity, an idle bucket that empties, a zero rate and a
    // window that does not divide evenly.
    let mut steps = Vec::new();
    for i in 0..5 {
        steps.push(step(T0 + i, vec![spec("d|u=k|1s/k", leaky, 1, 0)]));
    }
    for at in [50, 99, 100, 101, 199, 250, 251, 333, 900, 5_000] {
        for hits in [0, 1, 2, 4] {
            steps.push(step(T0 + at, vec![spec("d|u=k|1s/k", leaky, hits, 0)]));
        }
    }
    let dry = limit(0, SECOND, Algorithm::LeakyBucket);
    steps.push(step(T0, vec![spec("d|u=k0|1s/k", dry, 1, 0)]));
    steps.push(step(T0, vec![spec("d|u=k0|1s/k", dry, 0, 0)]));
    let odd = Limit {
        burst: Some(2),
        hybrid: false,
        ..limit(7, 3 * SECOND, Algorithm::LeakyBucket)
    };
    for i in 0..16 {
        steps.push(step(
            T0 + i * 211,
            vec![spec("d|u=ko|3s/k", odd, 1 + i % 2, 0)],
        ));
    }
    let daily = limit(1_000, 86_400 * SECOND, Algorithm::LeakyBucket);
    for i in 0..6 {
        steps.push(step(
            T0 + i * 40_000,
            vec![spec("d|u=kd|1d/k", daily, 300, 0)],
        ));
    }
    out.push(("leaky bucket", steps));

    // Both inside all-or-nothing groups, with each other and with the other algorithms: a
    // rejection by any limit leaves the log and the bucket untouched.
    let per_second = limit(3, SECOND, Algorithm::SlidingWindow);
    let per_minute = limit(6, MINUTE, Algorithm::FixedWindow);
    let mut steps = Vec::new();
    for i in 0..14 {
        steps.push(step(
            T0 + i * 150,
            vec![
                spec("d|u=g|1m/l", log, 1, 0),
                spec("d|u=g|1s/k", leaky, 1, 0),
                spec("d|u=g|1s/s", per_second, 1, 0),
                spec("d|u=h|1s/k", leaky, 1 + i % 2, 1),
                spec("d|u=h|1m/f", per_minute, 1, 1),
                spec("d|u=h|1m/l", log, 1, 1),
            ],
        ));
    }
    for i in 0..4 {
        steps.push(step(
            T0 + 70_000 + i,
            vec![
                spec("d|u=twice|1m/l", log, 2, 3),
                spec("d|u=twice|1m/l", log, 1, 3),
                spec("d|u=twice|1s/k", leaky, 1, 4),
                spec("d|u=twice|1s/k", leaky, 1, 4),
            ],
        ));
    }
    out.push(("sliding log and leaky bucket in groups", steps));

    // Behind a penalty box: the log and the bucket earn the rejections, the block answers
    // without counting, and both count again once it ends.
    let login = Penalty {
        after_rejections: 2,
        within_millis: MINUTE,
        block_millis: 5 * MINUTE,
    };
    let mut steps = Vec::new();
    let two_per_minute = limit(2, MINUTE, Algorithm::SlidingLog);
    let slow = Limit {
        burst: Some(2),
        hybrid: false,
        ..limit(1, SECOND, Algorithm::LeakyBucket)
    };
    let mut penalized = |descriptor: &str, hits: u64, now: u64| {
        let mut log_check = spec(&format!("d|{descriptor}|1m/l"), two_per_minute, hits, 0);
        log_check.penalty = Some(login);
        let mut leaky_check = spec(&format!("d|{descriptor}|1s/k"), slow, hits, 0);
        leaky_check.penalty = Some(login);
        steps.push(step(now, vec![log_check, leaky_check]));
        let mut alone = spec(&format!("d|{descriptor}-alone|1s/k"), slow, hits, 1);
        alone.penalty = Some(login);
        steps.push(step(now, vec![alone]));
    };
    for (hits, at) in [
        (1, 0),
        (1, 10),
        (1, 20),
        (0, 30),
        (1, 40),
        (1, 3_000),
        (2, 4_000),
        (1, 300_039),
        (1, 300_041),
        (1, 301_000),
        (1, 362_000),
        (1, 362_001),
        (1, 362_002),
    ] {
        penalized("ip=1", hits, T0 + at);
    }
    out.push(("sliding log and leaky bucket with the penalty box", steps));
    out
}

/// A deterministic mix of every algorithm, hits from 0 to 4, groups and penalties, with
/// time moving forward by irregular steps.
fn random_steps(seed: u64, count: usize, algorithms: usize) -> Vec<Step> {
    let mut state = seed;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound.max(1)
    };
    // A group is one descriptor's limits: its keys share the descriptor part (and so, on a
    // cluster, the hash slot). Each limit index always has the same algorithm and window.
    let limits: Vec<Limit> = (0..2 * algorithms)
        .map(|i| {
            let algorithm = Algorithm::ALL[i % algorithms];
            let window = [SECOND, 10 * SECOND, MINUTE][(i / 3 + i) % 3];
            let mut limit = limit(1 + (i as u32 * 3) % 7, window, algorithm);
            if matches!(algorithm, Algorithm::TokenBucket | Algorithm::LeakyBucket) && i % 2 == 0 {
                limit.burst = Some(2);
            }
            limit
        })
        .collect();
    let penalty = Penalty {
        after_rejections: 3,
        within_millis: 5 * SECOND,
        block_millis: 7 * SECOND,
    };
    let mut now = T0;
    let mut steps = Vec::new();
    for _ in 0..count {
        now += next(700);
        let mut checks = Vec::new();
        for group in 0..1 + next(3) as u32 {
            let with_penalty = next(4) == 0;
            let descriptor = next(4);
            // A key's rule says whether it counts rejected hits, as a config does: mixed on
            // one key, a local cache's reset could not count down as Redis's does.
            let count_rejected = descriptor % 2 == 0;
            for _ in 0..1 + next(2) {
                let index = next(limits.len() as u64) as usize;
                let key = format!("r|k={descriptor}|{index}");
                let mut check = spec(&key, limits[index], next(5), group);
                check.count_rejected = count_rejected;
                check.penalty = with_penalty.then_some(penalty);
                checks.push(check);
            }
        }
        steps.push(step(now, checks));
    }
    steps
}

/// A Redis store on `server` with the test options and `prefix`.
async fn standalone_store(server: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::connect(options(RedisTarget::Standalone(server.url()), prefix))
        .await
        .expect("the Redis store starts")
}

fn options(target: RedisTarget, prefix: &str) -> RedisOptions {
    RedisOptions {
        target,
        tls: Default::default(),
        prefix: prefix.to_owned(),
        // No faults here: a generous deadline keeps a busy CI machine from failing over.
        timeout: Duration::from_secs(5),
        failure_mode: FailureMode::Deny,
        replicas: 1,
        local_capacity: 1_000,
        // On, so every scenario also checks that cached answers are Redis's answers.
        local_cache_entries: 10_000,
        hybrid_flush: Duration::from_millis(5),
        per_second: None,
    }
}

async fn conform(target: RedisTarget, label: &str) {
    for (name, steps) in scenarios() {
        let memory = MemoryStore::new(10_000);
        let expected = run(&memory, &steps).await;
        let prefix = format!("conformance:{label}:{name}:{}:", std::process::id());
        let redis = RedisStore::connect(options(target.clone(), &prefix))
            .await
            .expect("the Redis store starts");
        let actual = run(&redis, &steps).await;
        assert_eq!(
            redis.fallback_decisions(),
            0,
            "{label} {name}: Redis did not answer every call"
        );
        for (i, ((step, expected), actual)) in steps.iter().zip(&expected).zip(&actual).enumerate()
        {
            assert_eq!(
                decided(expected),
                decided(actual),
                "{label} {name}, step {i} at T0+{} with {:#?}:\nmemory: {expected:?}\nredis:  {actual:?}",
                step.now - T0,
                step.checks
            );
        }
    }
}

/// What the calendar scenario shows of every store: February in Berlin ends at 23:00 UTC
/// and the New York day the clocks go back lasts 25 hours.
#[tokio::test]
async fn calendar_windows_start_over_where_their_zone_starts_a_month_or_a_day() {
    let steps = calendar_steps();
    let verdicts = run(&MemoryStore::new(10_000), &steps).await;
    let over: Vec<bool> = verdicts.iter().map(|v| v[0].over_limit).collect();
    assert_eq!(
        over[..6],
        [false, false, false, true, true, false],
        "three a month; the sixth request is in March"
    );
    assert_eq!(
        verdicts[5][0].reset_after_millis,
        (31 * 24 - 1) * 3_600_000,
        "March in Berlin lasts 31 days less the hour the clocks skip"
    );
    assert_eq!(
        over[over.len() - 10..],
        [
            false, false, false, false, true, true, true, true, false, false
        ],
        "two a day: 31 October, then 1 November for 25 hours, then 2 November"
    );
    let weeks: Vec<(bool, u64)> = (steps.iter().zip(&verdicts))
        .filter(|(step, _)| step.checks[0].key.starts_with("d|u=w|"))
        .map(|(_, v)| (v[0].over_limit, v[0].reset_after_millis))
        .collect();
    assert_eq!(
        weeks,
        [
            (false, 1_000),
            (false, 86_400_000 + 1_000),
            (false, 7 * 86_400_000),
            (true, 86_400_000)
        ],
        "Sunday starts a week from Sunday in Chicago, and not a week from Monday"
    );
}

/// What the reset scenario shows of every store (they all decide as memory does): a reset
/// descriptor over its limit, or blocked by its penalty box, is let in at once, while the
/// request's other descriptor stays over.
#[tokio::test]
async fn a_reset_lets_the_reset_descriptor_in_again_and_no_other() {
    let (_, steps) = scenarios()
        .into_iter()
        .find(|(name, _)| *name == "resets")
        .expect("the reset scenario");
    let verdicts = run(&MemoryStore::new(10_000), &steps).await;
    let mut resets = 0;
    for (i, step) in steps.iter().enumerate() {
        if !step.forget || step.checks[0].key.contains("never") {
            continue;
        }
        resets += 1;
        let (before, after) = (&verdicts[i - 1], &verdicts[i + 1]);
        let key = &step.checks[0].key;
        assert!(before[0].over_limit, "{key} was not over before its reset");
        assert!(!after[0].over_limit, "{key} is still over after its reset");
        if let Some(other) = steps[i + 1]
            .checks
            .iter()
            .find(|c| c.key.ends_with("|other"))
        {
            assert!(after[1].over_limit, "{} was reset too", other.key);
        }
    }
    assert_eq!(resets, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_redis_decides_exactly_like_memory() {
    let server = RedisServer::start();
    conform(RedisTarget::Standalone(server.url()), "standalone").await;
}

/// envoyproxy/ratelimit's REDIS_PERSECOND: the scenarios mix per-second and longer limits,
/// in one request too; split over two Redis servers they decide as one memory store does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_second_redis_beside_the_main_one_decides_exactly_like_memory() {
    let (main, fast) = (RedisServer::start(), RedisServer::start());
    for (name, mut steps) in scenarios() {
        // A rule's descriptor always has the same limits, so each of its keys lives in one
        // store. The random sequences put one key in groups of different limits; tagging
        // each key with its group's store keeps that true here (and in memory alike).
        for step in &mut steps {
            let mut start = 0;
            while start < step.checks.len() {
                let group = step.checks[start].group;
                let end = (start..step.checks.len())
                    .find(|&i| step.checks[i].group != group)
                    .unwrap_or(step.checks.len());
                let fast = step.checks[start..end]
                    .iter()
                    .all(|c| c.limit.window_millis <= SECOND);
                for check in &mut step.checks[start..end] {
                    check.key.push_str(if fast { "|s" } else { "|m" });
                }
                start = end;
            }
        }
        let expected = run(&MemoryStore::new(10_000), &steps).await;
        let prefix = format!("split:{name}:{}:", std::process::id());
        let store = SplitStore::new(
            standalone_store(&main, &prefix).await,
            standalone_store(&fast, &prefix).await,
        );
        let actual = run(&store, &steps).await;
        assert_eq!(
            store.main().fallback_decisions() + store.per_second().fallback_decisions(),
            0,
            "{name}: Redis did not answer every call"
        );
        if let Some(i) = (0..steps.len()).find(|&i| decided(&expected[i]) != decided(&actual[i])) {
            panic!(
                "{name}, step {i} with {:#?}:\nmemory: {:?}\nsplit:  {:?}",
                steps[i].checks, expected[i], actual[i]
            );
        }
    }
    let keys = |server: &RedisServer| -> u64 { server.query(&redis::cmd("DBSIZE")) };
    assert!(
        keys(&main) > 0 && keys(&fast) > 0,
        "both servers hold counters: main {}, per-second {}",
        keys(&main),
        keys(&fast)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_decides_exactly_like_memory() {
    let master = RedisServer::start();
    let sentinel = RedisSentinel::start("conformance", &master, 5_000);
    let target = SentinelTarget {
        master_name: "conformance".into(),
        sentinels: vec![format!("redis://{}", sentinel.addr)],
        master: MasterUrl {
            head: "redis://".into(),
            path: String::new(),
        },
    };
    conform(RedisTarget::Sentinel(target), "sentinel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_decides_exactly_like_memory_and_survives_a_dead_master() {
    let mut cluster = RedisCluster::start();
    conform(RedisTarget::Cluster(cluster.seed_urls()), "cluster").await;

    let prefix = "survive:";
    let keys = one_key_per_master(&cluster, prefix);
    let store = RedisStore::connect(RedisOptions {
        timeout: Duration::from_millis(200),
        failure_mode: FailureMode::Allow,
        ..options(RedisTarget::Cluster(cluster.seed_urls()), prefix)
    })
    .await
    .expect("the Redis store starts");
    let fixed = limit(1_000, MINUTE, Algorithm::FixedWindow);
    let checks: Vec<Check<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Check {
            key,
            limit: fixed,
            hits: 1,
            group: i as u32,
            count_rejected: true,
            penalty: None,
        })
        .collect();
    let mut out = Vec::new();
    let now = T0;
    store.apply(&checks, now, &mut out).await.unwrap();
    assert_eq!(
        out.iter().map(|v| v.remaining).collect::<Vec<_>>(),
        [999; 3]
    );

    cluster.masters[0].kill();
    let mut last = Vec::new();
    for _ in 0..10 {
        let started = std::time::Instant::now();
        store.apply(&checks, now, &mut out).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a dead master must not hold a request up: {:?}",
            started.elapsed()
        );
        last = out.clone();
    }
    // The live masters counted all eleven hits in Redis; the dead one's key failed open.
    assert_eq!(last[1].remaining, 989, "{last:?}");
    assert_eq!(last[2].remaining, 989, "{last:?}");
    assert_eq!(
        last[0].remaining, 1_000,
        "allowed by the failure policy: {last:?}"
    );
    for (master, key) in cluster.masters[1..].iter().zip(&keys[1..]) {
        let mut redis_key = String::new();
        push_redis_key(&mut redis_key, prefix, key);
        let value: Vec<u8> = master.query(redis::cmd("GET").arg(&redis_key));
        assert_eq!(
            window_counts(&value),
            Some((11, 0)),
            "{redis_key} = {value:?}"
        );
    }
}

/// Resharding: a slot moved from one master to another while meshlimit's slot map still
/// names the first. The first master answers ASK while the slot is being moved and MOVED
/// after; the call goes to the new master at once and counts on from the migrated count,
/// rather than being answered by the failure
/// policy (here `allow`: admitted and not counted) until the map is re-read. The old
/// master's breaker stays closed: it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_is_counted_there_at_once() {
    let cluster = RedisCluster::start();
    let prefix = "moved:";
    let key = one_key_per_master(&cluster, prefix).swap_remove(0);
    let store = RedisStore::connect(RedisOptions {
        timeout: Duration::from_millis(500),
        failure_mode: FailureMode::Allow,
        ..options(RedisTarget::Cluster(cluster.seed_urls()), prefix)
    })
    .await
    .expect("the Redis store starts");
    let check = [Check {
        key: &key,
        limit: limit(1_000, MINUTE, Algorithm::FixedWindow),
        hits: 1,
        group: 0,
        count_rejected: true,
        penalty: None,
    }];
    let mut out = Vec::new();
    store.apply(&check, T0, &mut out).await.unwrap();
    assert_eq!(out[0].remaining, 999);

    // Move the key's slot from master 0 to master 1, keys and all, as `redis-cli --cluster
    // reshard` does.
    let mut redis_key = String::new();
    push_redis_key(&mut redis_key, prefix, &key);
    let slot = slot(&redis_key);
    let (from, to) = (&cluster.masters[0], &cluster.masters[1]);
    let id = |master: &RedisServer| -> String { master.query(redis::cmd("CLUSTER").arg("MYID")) };
    let (from_id, to_id) = (id(from), id(to));
    let setslot = |master: &RedisServer, state: &str, node: &str| {
        let _: String = master.query(
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(node),
        );
    };
    setslot(to, "IMPORTING", &from_id);
    setslot(from, "MIGRATING", &to_id);
    let keys: Vec<String> = from.query(
        redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100),
    );
    assert!(keys.contains(&redis_key), "{keys:?}");
    let _: String = from.query(
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to.addr.port())
            .arg("")
            .arg(0)
            .arg(5_000)
            .arg("KEYS")
            .arg(&keys),
    );
    // Mid-move the old master sends what it no longer holds on with ASK.
    store.apply(&check, T0, &mut out).await.unwrap();
    assert_eq!(out[0].remaining, 998, "counted on the importing master");
    for master in &cluster.masters {
        setslot(master, "NODE", &to_id);
    }

    for expected in [997, 996] {
        store.apply(&check, T0, &mut out).await.unwrap();
        assert_eq!(out[0].remaining, expected, "counted on the new master");
    }
    assert_eq!(
        store.fallback_decisions(),
        0,
        "no answer from the failure policy"
    );
    let value: Vec<u8> = to.query(redis::cmd("GET").arg(&redis_key));
    assert_eq!(window_counts(&value), Some((4, 0)), "{value:?}");
    assert_eq!(
        store.health(),
        meshlimit::store::redis::StoreHealth::Healthy,
        "a redirect is not a failure"
    );
}

/// One counter key per master of `cluster` (in master order), found by its hash slot.
fn one_key_per_master(cluster: &RedisCluster, prefix: &str) -> Vec<String> {
    let mut per_master: Vec<Option<String>> = vec![None; cluster.masters.len()];
    for i in 0.. {
        let key = format!("d|user=u{i}|1m/fixed_window");
        let mut redis_key = String::new();
        push_redis_key(&mut redis_key, prefix, &key);
        let master = cluster.master_of(slot(&redis_key));
        per_master[master].get_or_insert(key);
        if per_master.iter().all(Option::is_some) {
            break;
        }
    }
    per_master.into_iter().flatten().collect()
}

/// `hybrid: true` on a cluster: two replicas decide locally, every flush sends each master
/// the hits of the keys in its slots, so Redis holds every admitted hit on the right
/// master, each replica reads a key's total before deciding on it first and learns the
/// other's hits, and no decision waited for a script call;
/// a dead master takes only its own keys to the failure policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_counters_on_a_cluster_reach_the_master_of_each_key() {
    let mut cluster = RedisCluster::start();
    let prefix = "hybrid:";
    let keys = one_key_per_master(&cluster, prefix);
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(
            RedisStore::connect(options(RedisTarget::Cluster(cluster.seed_urls()), prefix))
                .await
                .expect("the Redis store starts"),
        );
    }
    let hybrid = Limit {
        hybrid: true,
        ..limit(1_000, MINUTE, Algorithm::FixedWindow)
    };
    let checks = |hits: u64| -> Vec<Check<'_>> {
        (keys.iter().enumerate())
            .map(|(i, key)| Check {
                hits,
                count_rejected: true,
                ..one_hit(key, hybrid, i as u32)
            })
            .collect()
    };
    // Waits until every master holds `total` for its key; then what each replica sees,
    // asked until it is `expected` or 5 s have passed (a flush's reply is read a moment
    // after Redis applied it).
    let settled = async |total: u64, expected: [[u64; 3]; 2]| {
        let stored = hybrid_totals(&cluster.masters, &keys, prefix, total).await;
        assert!(
            stored.iter().all(|&t| t == Some(total)),
            "every master holds {total} for its key within 5 s: {stored:?}"
        );
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen.clear();
            for replica in &replicas {
                // Zero hits: only looks.
                replica.apply(&checks(0), T0, &mut out).await.unwrap();
                seen.push(out.iter().map(|v| 1_000 - v.remaining).collect::<Vec<_>>());
            }
            if seen == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        seen
    };
    let admit = async |replica: &RedisStore, hits: usize| {
        let mut out = Vec::new();
        for _ in 0..hits {
            replica.apply(&checks(1), T0, &mut out).await.unwrap();
            assert!(out.iter().all(|v| !v.over_limit), "{out:?}");
        }
    };

    // A replica reads a key's total before its first decision on it (it would otherwise
    // start from nothing), then learns the others' hits from the totals its own flushes
    // read back.
    admit(&replicas[0], 3).await;
    assert_eq!(settled(3, [[3; 3], [3; 3]]).await, [[3; 3], [3; 3]]);
    admit(&replicas[1], 4).await;
    assert_eq!(settled(7, [[3; 3], [7; 3]]).await, [[3; 3], [7; 3]]);
    admit(&replicas[0], 1).await;
    assert_eq!(settled(8, [[8; 3], [7; 3]]).await, [[8; 3], [7; 3]]);
    for master in &cluster.masters {
        assert_eq!(
            master.command_calls("evalsha"),
            0,
            "no script call per decision"
        );
    }
    for replica in &replicas {
        assert_eq!(replica.fallback_decisions(), 0);
    }

    // A dead master: once its breaker opens, its key is answered by the failure policy
    // (deny, in these options), and the other masters' flushes go on.
    cluster.masters[0].kill();
    let mut out = Vec::new();
    let mut sent = 0;
    while sent < 200 {
        replicas[0].apply(&checks(1), T0, &mut out).await.unwrap();
        sent += 1;
        if out[0].over_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("the dead master's key went to the failure policy after {sent} requests");
    assert!(
        out[0].over_limit,
        "the dead master's key is still counted locally"
    );
    assert!(replicas[0].fallback_decisions() > 0);
    let stored = hybrid_totals(&cluster.masters[1..], &keys[1..], prefix, 8 + sent).await;
    assert_eq!(
        stored,
        [Some(8 + sent); 2],
        "the live masters' totals after {sent} more hits"
    );
}

/// Hybrid replicas read a key's total before deciding on it when they have not read it
/// for a second (or ever): a replica new to a key, or back after a pause, would otherwise
/// decide from nothing or from a total the others have long moved past, and admit up to
/// the whole limit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_replica_reads_a_key_it_has_not_seen_lately_before_deciding() {
    let server = RedisServer::start();
    let prefix = "idle:";
    let (a, b) = (
        standalone_store(&server, prefix).await,
        standalone_store(&server, prefix).await,
    );
    let key = "d|user=u|1m/fixed_window";
    let hybrid = Limit {
        hybrid: true,
        ..limit(30, MINUTE, Algorithm::FixedWindow)
    };
    let charge = async |store: &RedisStore, hits: u64, now: u64| {
        let check = [Check {
            hits,
            count_rejected: true,
            ..one_hit(key, hybrid, 0)
        }];
        let mut out = Vec::new();
        store.apply(&check, now, &mut out).await.unwrap();
        out[0]
    };
    let servers = std::slice::from_ref(&server);
    let keys = [key.to_owned()];
    assert!(!charge(&a, 20, T0).await.over_limit);
    assert_eq!(hybrid_totals(servers, &keys, prefix, 20).await, [Some(20)]);
    // New to the key, b reads the 20 first: 20 more would be 40 of 30.
    assert!(
        charge(&b, 20, T0 + 100).await.over_limit,
        "b decided from nothing"
    );
    assert!(!charge(&b, 5, T0 + 100).await.over_limit);
    assert_eq!(hybrid_totals(servers, &keys, prefix, 25).await, [Some(25)]);
    // a, idle for two seconds, last saw 20: it reads the 25 before deciding on 6 more.
    let back = charge(&a, 6, T0 + 2_000).await;
    assert!(back.over_limit, "a decided from its old total: {back:?}");
    assert_eq!(back.remaining, 5);
    assert!(!charge(&a, 5, T0 + 2_000).await.over_limit);
}

/// What each of `masters` holds for its key's hybrid counter of the window T0 starts,
/// polled every 25 ms until each holds `total` or 5 s have passed.
async fn hybrid_totals(
    masters: &[RedisServer],
    keys: &[String],
    prefix: &str,
    total: u64,
) -> Vec<Option<u64>> {
    let mut stored = Vec::new();
    for _ in 0..200 {
        stored = (masters.iter().zip(keys))
            .map(|(master, key)| {
                let mut redis_key = String::new();
                push_redis_key(&mut redis_key, prefix, key);
                master.query(redis::cmd("GET").arg(format!("{redis_key}|hybrid|{T0}")))
            })
            .collect();
        if stored.iter().all(|&t| t == Some(total)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stored
}

/// The current and previous counts of a window state as counter.lua stores it: `w`, then
/// window, current and previous as unsigned 64-bit big-endian integers.
fn window_counts(value: &[u8]) -> Option<(u64, u64)> {
    let (kind, numbers) = value.split_first()?;
    let numbers: Vec<u64> = numbers
        .chunks_exact(8)
        .map(|n| u64::from_be_bytes(n.try_into().unwrap()))
        .collect();
    match (kind, numbers.as_slice()) {
        (b'w', [_window, current, previous]) => Some((*current, *previous)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_evalsha_per_request_on_a_standalone_redis() {
    let server = RedisServer::start();
    let store = standalone_store(&server, "trips:").await;
    let window = limit(100, MINUTE, Algorithm::SlidingWindow);
    let keys: Vec<String> = (0..4).map(|i| format!("d|k={i}|1m/s")).collect();
    let checks: Vec<Check<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| one_hit(key, window, i as u32 / 2))
        .collect();
    let before = server.command_calls("evalsha");
    let mut out = Vec::new();
    for _ in 0..25 {
        store.apply(&checks, T0, &mut out).await.unwrap();
    }
    assert_eq!(server.command_calls("evalsha") - before, 25);
    assert_eq!(out[3].remaining, 75);
}

/// A request far past the default descriptor bound (an operator may raise it): its
/// numbers no longer fit one unpack in the script, which takes them in chunks. Every check
/// is counted on its own key, as the memory store counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_a_thousand_checks_is_decided_like_memory() {
    let server = RedisServer::start();
    let store = standalone_store(&server, "many:").await;
    let memory = MemoryStore::new(10_000);
    let keys: Vec<String> = (0..1_000).map(|i| format!("d|k={i}|1m/f")).collect();
    let checks: Vec<Check<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Check {
            hits: 1 + (i % 2) as u64,
            // Limits differ per key, so an answer read from the wrong place shows.
            ..one_hit(
                key,
                limit(2 + (i % 7) as u32, MINUTE, Algorithm::FixedWindow),
                i as u32,
            )
        })
        .collect();
    let (mut from_redis, mut from_memory) = (Vec::new(), Vec::new());
    for at in [0, 1, 2] {
        store
            .apply(&checks, T0 + at, &mut from_redis)
            .await
            .unwrap();
        memory
            .apply(&checks, T0 + at, &mut from_memory)
            .await
            .unwrap();
        assert_eq!(decided(&from_redis), decided(&from_memory), "at T0+{at}");
    }
    assert!(from_redis.iter().any(|v| v.over_limit));
    assert!(from_redis.iter().any(|v| !v.over_limit));
}

/// A window counter's TTL is set by the first write of each window and kept by the
/// window's later writes (KEEPTTL), and it outlasts the window's relevance plus a margin
/// for clock skew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_counter_keeps_its_ttl_within_a_window_and_renews_it_in_the_next() {
    let server = RedisServer::start();
    let prefix = "ttl:";
    let store = standalone_store(&server, prefix).await;
    let key = "d|k=ttl|1m/s".to_owned();
    let checks = [one_hit(
        &key,
        limit(100, MINUTE, Algorithm::SlidingWindow),
        0,
    )];
    let mut redis_key = String::new();
    push_redis_key(&mut redis_key, prefix, &key);
    let pttl = || -> i64 { server.query(redis::cmd("PTTL").arg(&redis_key)) };
    let mut out = Vec::new();

    store.apply(&checks, T0, &mut out).await.unwrap();
    // Two windows for a sliding window, and the one-second margin.
    let first = pttl();
    assert!(
        first > 2 * MINUTE as i64 && first <= 2 * MINUTE as i64 + 1_000,
        "{first}"
    );
    // As if most of that life had passed: a later write in the same window keeps it.
    let _: () = server.query(redis::cmd("PEXPIRE").arg(&redis_key).arg(5_000));
    store
        .apply(&checks, T0 + 30 * SECOND, &mut out)
        .await
        .unwrap();
    assert_eq!(out[0].remaining, 98, "{out:?}");
    let kept = pttl();
    assert!(kept > 0 && kept <= 5_000, "{kept}");
    // The next window's first write sets a new one.
    store.apply(&checks, T0 + MINUTE, &mut out).await.unwrap();
    let renewed = pttl();
    assert!(renewed > 2 * MINUTE as i64, "{renewed}");
}

/// Requests arriving together share script calls (src/store/redis/coalesce.rs), and each
/// is still counted exactly once: 300 concurrent hits on one counter see 300 distinct
/// counts, in fewer calls than requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_script_calls_and_each_counts_once() {
    let server = RedisServer::start();
    let store = std::sync::Arc::new(standalone_store(&server, "share:").await);
    let before = server.command_calls("evalsha");
    let requests: Vec<_> = (0..300u64)
        .map(|i| {
            let store = std::sync::Arc::clone(&store);
            tokio::spawn(async move {
                let key = "d|k=shared|1m/f".to_owned();
                let checks = [one_hit(
                    &key,
                    limit(1_000, MINUTE, Algorithm::FixedWindow),
                    0,
                )];
                let mut out = Vec::new();
                store.apply(&checks, T0 + i % 10, &mut out).await.unwrap();
                out[0]
            })
        })
        .collect();
    let mut remaining = Vec::new();
    for request in requests {
        let verdict = request.await.unwrap();
        assert!(!verdict.over_limit, "{verdict:?}");
        remaining.push(verdict.remaining);
    }
    remaining.sort_unstable();
    assert_eq!(remaining, (700..1_000).collect::<Vec<u64>>());
    let calls = server.command_calls("evalsha") - before;
    assert!(
        calls < 300,
        "{calls} script calls for 300 concurrent requests"
    );
    eprintln!("{calls} script calls for 300 concurrent requests");
}

/// Requests sharing a call read a key once and write it once (the script keeps the call's
/// states), and a rejected group's changes still stay out of what later requests see:
/// 200 concurrent requests of two limits each, the second of 50, admit 50, and the first
/// key counts exactly those 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_groups_in_shared_calls_leave_no_count_behind() {
    let server = RedisServer::start();
    let store = std::sync::Arc::new(standalone_store(&server, "group:").await);
    let wide = limit(1_000, MINUTE, Algorithm::FixedWindow);
    let narrow = limit(50, MINUTE, Algorithm::FixedWindow);
    let (a, b) = ("d|k=a|1m/f".to_owned(), "d|k=b|1m/f".to_owned());
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let (store, a, b) = (std::sync::Arc::clone(&store), a.clone(), b.clone());
            tokio::spawn(async move {
                let checks = [one_hit(&a, wide, 0), one_hit(&b, narrow, 0)];
                let mut out = Vec::new();
                store.apply(&checks, T0, &mut out).await.unwrap();
                !out.iter().any(|v| v.over_limit)
            })
        })
        .collect();
    let mut admitted = 0;
    for request in requests {
        admitted += usize::from(request.await.unwrap());
    }
    assert_eq!(admitted, 50);
    let mut out = Vec::new();
    store
        .apply(&[one_hit(&a, wide, 0)], T0 + 1, &mut out)
        .await
        .unwrap();
    assert_eq!(out[0].remaining, 1_000 - 50 - 1, "{out:?}");
}

/// Runs `steps` (one check each) against memory and Redis, asserting identical verdicts,
/// and returns for each step whether it reached Redis (an EVALSHA ran).
async fn reached_redis(server: &RedisServer, store: &RedisStore, steps: &[Step]) -> Vec<bool> {
    let memory = MemoryStore::new(1_000);
    let expected = run(&memory, steps).await;
    let mut reached = Vec::new();
    for (step, expected) in steps.iter().zip(&expected) {
        let before = server.command_calls("evalsha");
        let actual = run(store, std::slice::from_ref(step)).await;
        assert_eq!(
            decided(&actual[0]),
            decided(expected),
            "at T0+{}: {:?}",
            step.now - T0,
            step.checks
        );
        let asked = server.command_calls("evalsha") > before;
        let cached = actual[0].iter().any(|v| v.from_local_cache);
        assert!(
            !(asked && cached),
            "an answer from Redis flagged as the cache's"
        );
        reached.push(asked);
    }
    reached
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_over_their_limit_are_answered_locally_until_their_reset() {
    let server = RedisServer::start();
    let store = standalone_store(&server, "cache:").await;

    // Fixed window, envoyproxy-style: three admitted, the fourth goes over in Redis (at
    // T0+3), the rest of the window is answered locally with the reset counting down —
    // asking Redis again once a second (at T0+1003 and after) — and the next window asks
    // Redis again.
    let fixed = limit(3, MINUTE, Algorithm::FixedWindow);
    let fixed_check = || {
        let mut check = spec("d|u=c|1m/f", fixed, 1, 0);
        check.count_rejected = true;
        vec![check]
    };
    let mut steps: Vec<Step> = (0..4).map(|i| step(T0 + i, fixed_check())).collect();
    for at in [10, 1_002, 1_003, 1_500, 30_000, 59_999] {
        steps.push(step(T0 + at, fixed_check()));
    }
    steps.push(step(T0 + MINUTE, fixed_check()));
    let reached = reached_redis(&server, &store, &steps).await;
    assert_eq!(
        reached,
        [
            true, true, true, true, false, false, true, false, true, true, true
        ]
    );
    assert_eq!(store.local_cache_hits(), 3);

    // Sliding window: over until the previous window has decayed enough, which the reset
    // names; the request after it goes to Redis and is admitted.
    let sliding = limit(4, MINUTE, Algorithm::SlidingWindow);
    let mut steps: Vec<Step> = (0..5)
        .map(|i| step(T0 + 50_000 + i, vec![spec("d|u=c|1m/s", sliding, 1, 0)]))
        .collect();
    let memory = MemoryStore::new(10);
    let verdicts = run(&memory, &steps).await;
    let reset = verdicts[4][0].reset_after_millis;
    assert!(verdicts[4][0].over_limit && reset > 10_000, "{verdicts:?}");
    let over_at = T0 + 50_004;
    for at in [1, 999, reset / 2, reset / 2 + 999, reset - 1, reset] {
        steps.push(step(over_at + at, vec![spec("d|u=c|1m/s", sliding, 1, 0)]));
    }
    let reached = reached_redis(&server, &store, &steps).await;
    assert_eq!(
        reached,
        [
            true, true, true, true, true, false, false, true, false, true, true
        ]
    );

    // Penalty box: rejections go to Redis (each one counts towards the block); once
    // blocked, the block is answered locally until it ends.
    let login = Penalty {
        after_rejections: 2,
        within_millis: MINUTE,
        block_millis: 10 * MINUTE,
    };
    let one_per_second = limit(1, SECOND, Algorithm::SlidingWindow);
    let login_check = || {
        let mut check = spec("d|ip=9|1s/s", one_per_second, 1, 0);
        check.penalty = Some(login);
        vec![check]
    };
    let steps: Vec<Step> = [0, 10, 20, 30, 500, 1_030, 1_500, 600_019, 600_020]
        .into_iter()
        .map(|at| step(T0 + 2 * MINUTE + at, login_check()))
        .collect();
    let reached = reached_redis(&server, &store, &steps).await;
    // admitted, rejected, rejected (the block starts), blocked (Redis says so, cached),
    // cached, Redis again a second later (blocked, cached), 1 ms before the end (Redis:
    // blocked), then Redis again, let in.
    assert_eq!(
        reached,
        [true, true, true, true, false, true, false, true, true]
    );

    // Off with 0 entries: every request goes to Redis.
    let uncached = RedisStore::connect(RedisOptions {
        local_cache_entries: 0,
        ..options(RedisTarget::Standalone(server.url()), "uncached:")
    })
    .await
    .expect("the Redis store starts");
    let steps: Vec<Step> = (0..6).map(|i| step(T0 + i, fixed_check())).collect();
    let reached = reached_redis(&server, &uncached, &steps).await;
    assert!(reached.iter().all(|r| *r), "{reached:?}");
    assert_eq!(uncached.local_cache_hits(), 0);
}

/// What a replica's over-limit cache answers is asked of Redis again within a second, so a
/// Redis that lost its keys (flushed, or restarted without persistence while the
/// subscription for resets stayed up elsewhere) — or a reset this replica did not hear
/// of — lets the client in within a second, not when the hour's window or the ten-minute
/// block ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_over_limit_answers_are_asked_of_redis_again_within_a_second() {
    let server = RedisServer::start();
    let store = standalone_store(&server, "cache-reask:").await;
    let blocked = blocked_after_one_rejection("d|ip=reask|1m/f");
    block_in_the_cache_of(&store, &blocked).await;
    let hourly = vec![spec(
        "d|u=reask|1h/f",
        limit(1, 60 * MINUTE, Algorithm::FixedWindow),
        1,
        0,
    )];
    for at in 0..2 {
        decided_at(&store, &hourly, T0 + at).await;
    }
    assert!(decided_at(&store, &hourly, T0 + 10).await.from_local_cache);

    let _: String = server.query(&redis::cmd("FLUSHALL"));
    for checks in [&blocked, &hourly] {
        let believed = decided_at(&store, checks, T0 + 900).await;
        assert!(
            believed.over_limit && believed.from_local_cache,
            "{checks:?}: within the second the cache answers: {believed:?}"
        );
        let asked = decided_at(&store, checks, T0 + 1_010).await;
        assert!(
            !asked.over_limit && !asked.from_local_cache,
            "{checks:?}: a second after the cached answer, Redis (which lost its count) \
             lets the client in: {asked:?}"
        );
    }
}

/// The request let through to Redis to ask again about a cached block, when Redis is
/// dead, is answered with the block still held rather than by the failure policy: with
/// `allow`, a blocked client would otherwise get one request a second in for as long as
/// Redis is away. A descriptor with nothing cached gets the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_block_holds_while_redis_is_away() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(RedisOptions {
        failure_mode: FailureMode::Allow,
        ..options(RedisTarget::Standalone(server.url()), "cache-held:")
    })
    .await
    .expect("the Redis store starts");
    let blocked = blocked_after_one_rejection("d|ip=held|1m/f");
    block_in_the_cache_of(&store, &blocked).await;

    server.kill();
    for at in [1_010, 2_020, 5_000] {
        let held = decided_at(&store, &blocked, T0 + at).await;
        assert!(
            held.over_limit && held.from_local_cache,
            "at T0+{at}, with Redis dead, the block is not held: {held:?}"
        );
    }
    let other = blocked_after_one_rejection("d|ip=uncached|1m/f");
    let policy = decided_at(&store, &other, T0 + 5_000).await;
    assert!(!policy.over_limit, "{policy:?}");
    assert!(store.fallback_decisions() >= 1);
}

/// A reset on one replica reaches what the others hold for the descriptor: another
/// replica's over-limit cache answering a penalty block for ten minutes, and its hybrid
/// window at the limit, both let the client in within seconds — on a standalone Redis and
/// on a cluster, whose PUBLISH reaches every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_one_replica_reaches_the_others_cached_answers() {
    let server = RedisServer::start();
    let cluster = RedisCluster::start();
    let servers: Vec<&RedisServer> = std::iter::once(&server)
        .chain(cluster.masters.iter())
        .collect();
    for (label, target, nodes) in [
        (
            "standalone",
            RedisTarget::Standalone(server.url()),
            &servers[..1],
        ),
        (
            "cluster",
            RedisTarget::Cluster(cluster.seed_urls()),
            &servers[1..],
        ),
    ] {
        let prefix = format!("reset:{label}:");
        let connect = || async {
            RedisStore::connect(options(target.clone(), &prefix))
                .await
                .expect("the Redis store starts")
        };
        let (resetting, other) = (connect().await, connect().await);
        // Both replicas listen before the reset is told.
        let channel = format!("{prefix}meshlimit|resets");
        let listening = common::poll_until(Duration::from_secs(10), || {
            let subscribers: u64 = nodes
                .iter()
                .map(|node| {
                    let (_, count): (String, u64) =
                        node.query(redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel));
                    count
                })
                .sum();
            (subscribers >= 2).then_some(())
        });
        assert!(
            listening.is_some(),
            "{label}: the replicas never subscribed"
        );

        let blocked = blocked_after_one_rejection("d|ip=9|1m/f");
        let hybrid = spec(
            "d|tenant=9|1m/f",
            Limit {
                hybrid: true,
                ..limit(2, MINUTE, Algorithm::FixedWindow)
            },
            1,
            0,
        );
        let hybrid = vec![hybrid];
        let decide = |store: &RedisStore, checks: &[Spec], now: u64| {
            let store = store.clone();
            let steps = [step(now, checks.to_vec())];
            async move { run(&store, &steps).await.remove(0).remove(0) }
        };
        for at in 0..3 {
            decide(&other, &blocked, T0 + at).await;
            decide(&other, &hybrid, T0 + at).await;
        }
        let cached = decide(&other, &blocked, T0 + 10).await;
        assert!(
            cached.over_limit && cached.from_local_cache,
            "{label}: the block is not answered from the other replica's cache: {cached:?}"
        );
        // A hybrid replica sees its own flushed hits only once Redis has answered the
        // flush: asked until it does, then left to send the rest.
        let mut hybrid_over = false;
        for _ in 0..100 {
            if decide(&other, &hybrid, T0 + 10).await.over_limit {
                hybrid_over = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            hybrid_over,
            "{label}: the hybrid window never reached its limit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;

        run(&resetting, &[reset(T0 + 20, blocked.clone())]).await;
        run(&resetting, &[reset(T0 + 20, hybrid.clone())]).await;
        let mut now = T0 + 30;
        let mut let_in = None;
        let mut last = None;
        for _ in 0..50 {
            now += 1;
            let (penalty, counted) = (
                decide(&other, &blocked, now).await,
                decide(&other, &hybrid, now).await,
            );
            if !penalty.over_limit && !counted.over_limit {
                let_in = Some(now);
                break;
            }
            last = Some((penalty, counted));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            let_in.is_some(),
            "{label}: the other replica still turns the client away 5 s after the reset \
             (the penalty's answer, then the hybrid window's: {last:?}); the servers said:\n{}",
            nodes
                .iter()
                .map(|node| node.logs())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// One hit a minute on `key`, and a ten-minute block from the first rejection.
fn blocked_after_one_rejection(key: &str) -> Vec<Spec> {
    let mut check = spec(key, limit(1, MINUTE, Algorithm::FixedWindow), 1, 0);
    check.penalty = Some(Penalty {
        after_rejections: 1,
        within_millis: MINUTE,
        block_millis: 10 * MINUTE,
    });
    vec![check]
}

/// `checks` decided by `store` at `now`: the first verdict.
async fn decided_at(store: &RedisStore, checks: &[Spec], now: u64) -> Verdict {
    run(store, &[step(now, checks.to_vec())])
        .await
        .remove(0)
        .remove(0)
}

/// Blocks `blocked` on `store` (from T0) and checks the block is then answered from its
/// over-limit cache.
async fn block_in_the_cache_of(store: &RedisStore, blocked: &[Spec]) {
    for at in 0..3 {
        decided_at(store, blocked, T0 + at).await;
    }
    assert!(
        decided_at(store, blocked, T0 + 10).await.from_local_cache,
        "the block is not cached"
    );
}

/// A hybrid limit of 2 a minute on `key`, made full on `store` at T0 and flushed: Redis
/// (`server`, keys under `prefix`) holds the 2 hits.
async fn full_hybrid_window(
    server: &RedisServer,
    store: &RedisStore,
    prefix: &str,
    key: &str,
) -> Vec<Spec> {
    let hybrid = vec![spec(
        key,
        Limit {
            hybrid: true,
            ..limit(2, MINUTE, Algorithm::FixedWindow)
        },
        1,
        0,
    )];
    for _ in 0..2 {
        decided_at(store, &hybrid, T0).await;
    }
    assert!(decided_at(store, &hybrid, T0).await.over_limit);
    let stored = || -> Vec<u64> {
        let keys: Vec<String> = server.query(redis::cmd("KEYS").arg(format!("{prefix}*hybrid*")));
        keys.iter()
            .map(|key| server.query(redis::cmd("GET").arg(key)))
            .collect()
    };
    let flushed = common::poll_until(Duration::from_secs(10), || (stored() == [2]).then_some(()));
    assert!(
        flushed.is_some(),
        "the hybrid hits never reached Redis: {:?}",
        stored()
    );
    hybrid
}

/// Whether `store` lets `blocked` in within five seconds of asking every 100 ms (from
/// T0 + 30 ms of its clock).
async fn lets_in_within_5s(store: &RedisStore, blocked: &[Spec]) -> bool {
    for i in 0..50 {
        if !decided_at(store, blocked, T0 + 30 + i).await.over_limit {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A hybrid window full on a replica opens again once Redis has lost its count (a
/// restarted or flushed Redis, as every other decision there sees): a full window reads
/// its total back once a second of the limiter's clock, though it has nothing to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hybrid_window_opens_again_when_redis_lost_its_count() {
    let server = RedisServer::start();
    let store = standalone_store(&server, "hybrid-lost:").await;
    let hybrid = full_hybrid_window(&server, &store, "hybrid-lost:", "d|tenant=lost|1m/f").await;

    let _: String = server.query(&redis::cmd("FLUSHALL"));
    // Still within the window's minute, seconds later on the limiter's clock.
    let mut let_in = false;
    for i in 0..50 {
        if !decided_at(&store, &hybrid, T0 + 2_000 + i).await.over_limit {
            let_in = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        let_in,
        "the window stays full 5 s after Redis lost its count"
    );
}

/// The cluster node a replica listens for resets on dies: the replicas subscribe again on
/// another node, and a reset of a key on a live master still lifts the other replica's
/// cached block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_are_heard_again_after_the_node_listened_on_dies() {
    let mut cluster = RedisCluster::start();
    let prefix = "reset-failover:";
    let channel = format!("{prefix}meshlimit|resets");
    let connect = || async {
        RedisStore::connect(options(RedisTarget::Cluster(cluster.seed_urls()), prefix))
            .await
            .expect("the Redis store starts")
    };
    let (resetting, other) = (connect().await, connect().await);
    let listeners = |cluster: &RedisCluster, alive: &[bool]| -> Vec<u64> {
        cluster
            .masters
            .iter()
            .zip(alive)
            .map(|(master, alive)| match alive {
                true => {
                    let (_, count): (String, u64) =
                        master.query(redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel));
                    count
                }
                false => 0,
            })
            .collect()
    };
    let mut alive = vec![true; cluster.masters.len()];
    let before = common::poll_until(Duration::from_secs(10), || {
        let counts = listeners(&cluster, &alive);
        (counts.iter().sum::<u64>() >= 2).then_some(counts)
    })
    .expect("the replicas subscribe");
    // Kill every master someone listens on.
    for (i, count) in before.iter().enumerate() {
        if *count > 0 {
            cluster.masters[i].kill();
            alive[i] = false;
        }
    }
    let again = common::poll_until(Duration::from_secs(15), || {
        (listeners(&cluster, &alive).iter().sum::<u64>() >= 2).then_some(())
    });
    assert!(again.is_some(), "the replicas never subscribed again");

    let live = alive.iter().position(|a| *a).expect("a live master");
    let key = one_key_per_master(&cluster, prefix).remove(live);
    let blocked = blocked_after_one_rejection(&key);
    block_in_the_cache_of(&other, &blocked).await;
    run(&resetting, &[reset(T0 + 20, blocked.clone())]).await;
    assert!(
        lets_in_within_5s(&other, &blocked).await,
        "the other replica still turns the client away 5 s after the reset"
    );
}

/// A reset published while a replica was not listening (its subscription cut) still
/// reaches it: a replica that subscribes again drops what it cached, so the block the
/// reset lifted is asked of Redis again, and reads its hybrid windows' totals back, so a
/// window it saw full lets the client in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_missed_while_not_listening_is_caught_up_on_subscribing_again() {
    let server = RedisServer::start();
    let prefix = "reset-missed:";
    let channel = format!("{prefix}meshlimit|resets");
    let (resetting, other) = (
        standalone_store(&server, prefix).await,
        standalone_store(&server, prefix).await,
    );
    let listeners = || {
        let (_, count): (String, u64) =
            server.query(redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel));
        count
    };
    let subscribed =
        common::poll_until(Duration::from_secs(10), || (listeners() >= 2).then_some(()));
    assert!(subscribed.is_some(), "the replicas never subscribed");
    let blocked = blocked_after_one_rejection("d|ip=7|1m/f");
    block_in_the_cache_of(&other, &blocked).await;
    // Flushed to Redis before the reset, or the flush would put the hits back after it.
    let hybrid = full_hybrid_window(&server, &other, prefix, "d|tenant=7|1m/f").await;

    // Every subscription cut; the reset is published to nobody.
    let _: redis::Value = server.query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
    run(&resetting, &[reset(T0 + 20, blocked.clone())]).await;
    run(&resetting, &[reset(T0 + 20, hybrid.clone())]).await;
    assert!(
        lets_in_within_5s(&other, &blocked).await,
        "the other replica still turns the client away 5 s after a reset it missed"
    );
    assert!(
        lets_in_within_5s(&other, &hybrid).await,
        "the other replica's hybrid window stays full 5 s after a reset it missed"
    );
}
