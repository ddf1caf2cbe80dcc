//! Faults under load: while client tasks keep asking, Redis is killed and restarted, a
//! flood of distinct keys arrives, and the config is replaced with valid and invalid
//! versions, through files and over xDS, whose server is killed and restarted too. Every
//! request must still get a decision within the deadline, no server may panic, and the
//! in-memory counters must stay within `--cache-capacity`.
//!
//! Two servers take the same flood: one on Redis with `--redis-failure-mode local` (the
//! one Redis faults hit), reading a config directory, and one on the memory store, whose
//! `meshlimit_cache_entries` shows the bound holding (the Redis store does not export the
//! size of its local fallback counters), taking its config from an xDS server as Envoy
//! Gateway hands it out.
//!
//! CI runs it at a small size. `bench/faults.sh` runs it longer, in release, with the
//! sizes below raised through the environment:
//!   FAULTS_SECONDS      how long the load runs (default 10)
//!   FAULTS_FLOOD_USERS  distinct users in the flood (default 60 000)
//!   FAULTS_CLIENTS      steady client tasks per server (default 2)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::config_dir;
use common::meshlimit::Meshlimit;
use common::redis::RedisServer;
use common::xds::{Publisher, XdsServer};
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// An answer slower than this counts against the run. Generous: a debug build on a
/// 2-core machine running two servers, Redis and the clients at once.
const DEADLINE: Duration = Duration::from_secs(1);
/// Counters each server may keep in memory; the flood is far larger.
const CACHE_CAPACITY: u64 = 2_000;
/// Users per flood request (the most descriptors a request may carry).
const FLOOD_BATCH: usize = 64;
/// The limits the config versions set, so an answer can be checked against them.
const LIMITS: [u32; 2] = [100_000, 200_000];

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Domain `faults`, `user` limited per second at `limit`.
fn valid_config(limit: u32) -> String {
    format!(
        "domain: faults\ndescriptors:\n  - key: user\n    rate_limit: {{unit: second, requests_per_unit: {limit}}}\n"
    )
}

/// Versions the rewriter cycles through: both valid limits, a file that does not parse,
/// one that parses but has no limit, and one that is not UTF-8.
fn config_versions() -> Vec<Vec<u8>> {
    vec![
        valid_config(LIMITS[0]).into_bytes(),
        b"domain: faults\ndescriptors:\n  - key: user\n    rate_limit: {unit: second\n".to_vec(),
        valid_config(LIMITS[1]).into_bytes(),
        b"domain: faults\ndescriptors:\n  - key: user\n    rate_limit: {unit: second}\n".to_vec(),
        b"domain: faults\n\xff\xfe\n".to_vec(),
    ]
}

/// The same versions as RateLimitConfig resources for the xDS server: both valid limits,
/// one without a unit, and one whose descriptor has no key.
fn xds_versions() -> Vec<Value> {
    let config = |rate_limit: Value, key: &str| {
        json!([{
            "name": "faults/limits",
            "domain": "faults",
            "descriptors": [{"key": key, "rate_limit": rate_limit}],
        }])
    };
    let valid = |limit: u32| json!({"unit": "SECOND", "requests_per_unit": limit});
    vec![
        config(valid(LIMITS[0]), "user"),
        config(json!({"requests_per_unit": 5}), "user"),
        config(valid(LIMITS[1]), "user"),
        config(valid(LIMITS[0]), ""),
    ]
}

fn request(users: impl Iterator<Item = String>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "faults".into(),
        descriptors: users
            .map(|user| RateLimitDescriptor {
                entries: vec![Entry {
                    key: "user".into(),
                    value: user,
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    slow: AtomicU64,
    errors: AtomicU64,
    /// Answers with the wrong number of statuses or a limit no config version set.
    wrong: AtomicU64,
    latencies_micros: Mutex<Vec<u64>>,
    /// The first few problems, for the failure message.
    problems: Mutex<Vec<String>>,
}

impl Tally {
    async fn ask(&self, client: &mut RateLimitServiceClient<Channel>, request: RateLimitRequest) {
        let descriptors = request.descriptors.len();
        self.sent.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = client.should_rate_limit(request).await;
        let took = started.elapsed();
        self.latencies_micros.lock().push(took.as_micros() as u64);
        if took > DEADLINE {
            self.slow.fetch_add(1, Ordering::Relaxed);
            self.problem(format!("an answer took {took:?}"));
        }
        let response = match result {
            Ok(response) => response.into_inner(),
            Err(status) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.problem(format!("{status:?}"));
                return;
            }
        };
        self.answered.fetch_add(1, Ordering::Relaxed);
        let limits_known = response.statuses.iter().all(|status| {
            status
                .current_limit
                .as_ref()
                .is_some_and(|limit| LIMITS.contains(&limit.requests_per_unit))
        });
        if response.statuses.len() != descriptors || !limits_known {
            self.wrong.fetch_add(1, Ordering::Relaxed);
            self.problem(format!(
                "{descriptors} descriptors answered with {response:?}"
            ));
        }
    }

    fn problem(&self, what: String) {
        let mut problems = self.problems.lock();
        if problems.len() < 10 {
            problems.push(what);
        }
    }

    fn percentile_millis(&self, fraction: f64) -> f64 {
        let mut latencies = self.latencies_micros.lock().clone();
        latencies.sort_unstable();
        let index =
            ((latencies.len() as f64 * fraction) as usize).min(latencies.len().saturating_sub(1));
        latencies
            .get(index)
            .map_or(0.0, |&micros| micros as f64 / 1_000.0)
    }
}

/// One client asking in a closed loop for one of 50 users of its own until `stop`.
async fn steady_client(channel: Channel, id: usize, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut client = RateLimitServiceClient::new(channel);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let user = format!("steady-{id}-{}", n % 50);
        tally.ask(&mut client, request(std::iter::once(user))).await;
        n += 1;
    }
}

/// Asks for every user in `users`, FLOOD_BATCH to a request.
async fn flood(channel: Channel, users: std::ops::Range<u64>, tally: Arc<Tally>) {
    let mut client = RateLimitServiceClient::new(channel);
    let mut next = users.start;
    while next < users.end {
        let end = (next + FLOOD_BATCH as u64).min(users.end);
        tally
            .ask(
                &mut client,
                request((next..end).map(|u| format!("flood-{u}"))),
            )
            .await;
        next = end;
    }
}

/// Rewrites the config file, and publishes a new xDS version, every 150 ms, cycling
/// through valid and invalid versions, until `stop`; then leaves the first version in
/// place in both. Returns how many writes it made.
async fn rewrite_config(dir: std::path::PathBuf, xds: Publisher, stop: Arc<AtomicBool>) -> u64 {
    let (versions, xds_versions) = (config_versions(), xds_versions());
    let mut writes = 0;
    while !stop.load(Ordering::Relaxed) {
        let version = &versions[writes as usize % versions.len()];
        write_atomically(&dir, "faults.yaml", version);
        let configs = xds_versions[writes as usize % xds_versions.len()].clone();
        xds.publish(&writes.to_string(), configs);
        writes += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    write_atomically(&dir, "faults.yaml", &versions[0]);
    xds.publish("last", xds_versions[0].clone());
    writes
}

/// Like `config_dir::write_atomically`, for bytes that need not be UTF-8.
fn write_atomically(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temp, bytes).expect("write the new config");
    std::fs::rename(&temp, dir.join(name)).expect("move the new config into place");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn metric(server: &Meshlimit, name: &str) -> u64 {
    server.metric(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_survive_redis_restarts_key_floods_and_config_rewrites() {
    let seconds = setting("FAULTS_SECONDS", 10).max(4);
    let flood_users = setting("FAULTS_FLOOD_USERS", 60_000);
    let clients = setting("FAULTS_CLIENTS", 2) as usize;

    let dir = config_dir::plain(&[("faults.yaml", &valid_config(LIMITS[0]))]);
    let mut xds = XdsServer::start();
    xds.publish("first", xds_versions()[0].clone());
    let mut redis = RedisServer::start();
    let capacity = CACHE_CAPACITY.to_string();
    let url = redis.url();
    let common_args = ["--watch-interval", "50ms", "--cache-capacity", &capacity];
    let on_redis = Meshlimit::start_with(
        dir.path(),
        &[
            &common_args[..],
            &[
                "--store",
                "redis",
                "--redis-url",
                &url,
                "--redis-failure-mode",
                "local",
                "--redis-timeout",
                "50ms",
            ],
        ]
        .concat(),
    );
    let xds_url = xds.url();
    let in_memory = Meshlimit::start_without_dir(
        &[
            &common_args[..],
            &["--xds-server", &xds_url, "--xds-retry-interval", "100ms"],
        ]
        .concat(),
        &[],
    );
    let servers = [&on_redis, &in_memory];
    let loads_before: Vec<(u64, u64)> = servers
        .iter()
        .map(|s| {
            (
                metric(s, "ratelimit_service_config_load_success"),
                metric(s, "ratelimit_service_config_load_error"),
            )
        })
        .collect();
    let rss_before = rss_kib(on_redis.pid());

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let channels = [on_redis.channel().await, in_memory.channel().await];
    let mut load = tokio::task::JoinSet::new();
    for (s, channel) in channels.iter().enumerate() {
        for c in 0..clients {
            load.spawn(steady_client(
                channel.clone(),
                s * 100 + c,
                stop.clone(),
                tally.clone(),
            ));
        }
    }
    let rewriter = tokio::spawn(rewrite_config(
        dir.path().to_owned(),
        xds.publisher(),
        stop.clone(),
    ));

    // The faults, spread over the run: a flood with Redis up (to both servers), Redis
    // killed and a second flood while it is down (the Redis server's local counters take
    // it), Redis back, killed and back once more; the xDS server is down while Redis is
    // the second time.
    let started = Instant::now();
    let step = Duration::from_secs(seconds) / 8;
    let half = flood_users / 2;
    let mut floods = tokio::task::JoinSet::new();
    for channel in &channels {
        floods.spawn(flood(channel.clone(), 0..half, tally.clone()));
    }
    tokio::time::sleep(step * 2).await;
    tokio::task::block_in_place(|| redis.kill());
    let mut redis_kills = 1;
    floods.spawn(flood(channels[0].clone(), half..flood_users, tally.clone()));
    floods.spawn(flood(channels[1].clone(), half..flood_users, tally.clone()));
    tokio::time::sleep(step * 2).await;
    tokio::task::block_in_place(|| redis.restart());
    tokio::time::sleep(step).await;
    tokio::task::block_in_place(|| {
        redis.kill();
        xds.kill();
    });
    redis_kills += 1;
    tokio::time::sleep(step).await;
    tokio::task::block_in_place(|| {
        redis.restart();
        xds.restart();
    });
    let until_end =
        (started + Duration::from_secs(seconds)).saturating_duration_since(Instant::now());
    tokio::time::sleep(until_end).await;
    let cache_during = metric(&in_memory, "meshlimit_cache_entries");

    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    // A flood still running is part of the run: wait for it, so every request it sent
    // is counted.
    while floods.join_next().await.is_some() {}
    let writes = rewriter.await.expect("the config rewriter");
    let elapsed = started.elapsed();

    // After the faults: both servers serve the last config, counting through Redis again,
    // the memory one connected to the xDS server again.
    let mut recovered = false;
    for _ in 0..100 {
        let degraded = metric(&on_redis, "meshlimit_redis_degraded")
            + (1 - metric(&in_memory, "meshlimit_xds_connected"));
        let mut answers = Vec::new();
        for channel in &channels {
            let mut client = RateLimitServiceClient::new(channel.clone());
            let response = client
                .should_rate_limit(request(std::iter::once("after".to_owned())))
                .await
                .map(|r| r.into_inner());
            answers.push(response.ok().and_then(|r| {
                r.statuses
                    .first()?
                    .current_limit
                    .as_ref()
                    .map(|l| l.requests_per_unit)
            }));
        }
        if degraded == 0 && answers.iter().all(|a| *a == Some(LIMITS[0])) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let cache_entries = metric(&in_memory, "meshlimit_cache_entries");
    let evictions = metric(&in_memory, "meshlimit_cache_evictions_total");
    let fallbacks = metric(&on_redis, "meshlimit_redis_fallback_decisions_total");
    let reloads: Vec<(u64, u64)> = servers
        .iter()
        .zip(&loads_before)
        .map(|(s, (ok, failed))| {
            (
                metric(s, "ratelimit_service_config_load_success") - ok,
                metric(s, "ratelimit_service_config_load_error") - failed,
            )
        })
        .collect();
    let rss_after = rss_kib(on_redis.pid());
    let panicked = servers
        .iter()
        .filter(|s| s.logs().contains("panicked"))
        .count();

    let sent = tally.sent.load(Ordering::Relaxed);
    let answered = tally.answered.load(Ordering::Relaxed);
    let slow = tally.slow.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let wrong = tally.wrong.load(Ordering::Relaxed);
    println!(
        "faults summary: {elapsed:.1?} of load, {sent} requests, {answered} answered \
         ({:.0}/s), {slow} slower than {DEADLINE:?}, {errors} errors, {} lost decisions, \
         {wrong} wrong answers, {panicked} panics; latency p50 {:.1} ms, p99 {:.1} ms, \
         p99.9 {:.1} ms, max {:.1} ms; Redis killed {redis_kills}x ({fallbacks} checks \
         answered locally), the xDS server once; {flood_users} flooded users; memory store {cache_during} / \
         {cache_entries} counters held (during / after, capacity {CACHE_CAPACITY}, \
         {evictions} evicted); meshlimit on Redis: RSS {rss_before} -> {rss_after} KiB; \
         {writes} config writes, reloads ok/failed: redis (files) {:?}, memory (xDS) {:?}",
        answered as f64 / elapsed.as_secs_f64(),
        sent - answered,
        tally.percentile_millis(0.5),
        tally.percentile_millis(0.99),
        tally.percentile_millis(0.999),
        tally.percentile_millis(1.0),
        reloads[0],
        reloads[1],
    );

    let logs = || format!("{}\n{}", on_redis.logs(), in_memory.logs());
    let problems = tally.problems.lock().join("\n");
    assert_eq!(
        (slow, errors, wrong),
        (0, 0, 0),
        "problems:\n{problems}\n{}",
        logs()
    );
    assert_eq!(sent, answered, "lost decisions");
    assert_eq!(panicked, 0, "{}", logs());
    assert!(
        answered > 500,
        "too little load to mean anything: {answered}"
    );
    assert!(
        recovered,
        "not back on Redis and xDS with the last config:\n{}",
        logs()
    );
    assert!(cache_entries <= CACHE_CAPACITY && cache_during <= CACHE_CAPACITY);
    assert!(evictions > 0, "the flood did not reach the capacity");
    assert!(
        fallbacks > 0,
        "nothing was answered locally while Redis was down"
    );
    for (ok, failed) in &reloads {
        assert!(
            *ok >= 2 && *failed >= 1,
            "reloads ok/failed: {reloads:?}\n{}",
            logs()
        );
    }
    // The local counters are bounded too; 64 MiB is far above what they may take.
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
}
