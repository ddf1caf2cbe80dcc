//! The real binary with `--store redis` against a real Redis: replicas share one limit, and
//! a Redis that dies mid-traffic costs no request more than the deadline under each failure
//! policy, and is used again soon after it is back.
//!
//! Limits: tests/fixtures/config_redis/shared.yaml (10 per hour, fixed window, per user).

mod common;

use std::time::{Duration, Instant};

use common::fixture;
use common::http;
use common::meshlimit::Meshlimit;
use common::redis::RedisServer;
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use tonic::transport::Channel;

const LIMIT: usize = 10;
/// The deadline the fault tests give Redis, and what a request may take on top of it on a
/// busy 2-core CI machine (debug build, other tests running).
const REDIS_TIMEOUT: &str = "50ms";
const ANSWER_BOUND: Duration = Duration::from_millis(1_000);

fn start(redis: &RedisServer, extra: &[&str]) -> Meshlimit {
    let url = redis.url();
    let mut args = vec![
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--redis-prefix",
        "e2e:",
    ];
    args.extend_from_slice(extra);
    Meshlimit::start_with(fixture("config_redis"), &args)
}

fn request(user: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "shared".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "user".into(),
                value: user.into(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// One decision and how long it took; panics on a gRPC error.
async fn decide(
    client: &mut RateLimitServiceClient<Channel>,
    server: &Meshlimit,
    user: &str,
) -> (Code, Duration) {
    let started = Instant::now();
    match client.should_rate_limit(request(user)).await {
        Ok(response) => (response.into_inner().overall_code(), started.elapsed()),
        Err(status) => panic!("request for {user} failed: {status}\n{}", server.logs()),
    }
}

fn dbsize(redis: &RedisServer) -> u64 {
    redis.query(&redis::cmd("DBSIZE"))
}

fn metric(server: &Meshlimit, name: &str) -> Option<u64> {
    let response = http::get(server.admin_addr, "/metrics", &[]).ok()?;
    response.text().lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_fixed_window() {
    common::avoid_window_edge(3_600, 10);
    let redis = RedisServer::start();
    let replicas = [start(&redis, &[]), start(&redis, &[])];
    let mut clients = [replicas[0].client().await, replicas[1].client().await];
    let mut admitted = 0;
    for i in 0..3 * LIMIT {
        let (code, _) = decide(&mut clients[i % 2], &replicas[i % 2], "shared-user").await;
        if code == Code::Ok {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, LIMIT,
        "across both replicas, exactly the limit is admitted"
    );
    // Each replica asked Redis once after the limit was reached; its other rejections came
    // from its local over-limit cache.
    let cached: u64 = replicas
        .iter()
        .map(|r| metric(r, "meshlimit_local_cache_hits_total").unwrap_or(0))
        .sum();
    assert_eq!(cached, (2 * LIMIT - 2) as u64);
}

/// Kills Redis under traffic, checks the answers and their latency against `mode`, then
/// restarts Redis and measures how soon counting goes through it again.
async fn redis_dies_and_comes_back(mode: &str) {
    common::avoid_window_edge(3_600, 10);
    let mut redis = RedisServer::start();
    let server = start(
        &redis,
        &[
            "--redis-failure-mode",
            mode,
            "--redis-timeout",
            REDIS_TIMEOUT,
            "--replicas",
            "2",
        ],
    );
    let mut client = server.client().await;
    for _ in 0..3 {
        assert_eq!(decide(&mut client, &server, "before").await.0, Code::Ok);
    }
    assert!(dbsize(&redis) > 0, "counted in Redis while it was up");

    redis.kill();
    let mut codes = Vec::new();
    for _ in 0..40 {
        let (code, took) = decide(&mut client, &server, "during").await;
        assert!(
            took < ANSWER_BOUND,
            "{mode}: a request took {took:?} with Redis down\n{}",
            server.logs()
        );
        codes.push(code);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admitted = codes.iter().filter(|c| **c == Code::Ok).count();
    match mode {
        "allow" => assert_eq!(admitted, 40, "fail open: {codes:?}"),
        "deny" => assert_eq!(admitted, 0, "fail closed: {codes:?}"),
        // 10 per hour shared by 2 replicas: this one admits its 5 on its own.
        _ => assert_eq!(admitted, LIMIT / 2, "local share: {codes:?}"),
    }
    let health = http::get(server.admin_addr, "/healthcheck", &[]).expect("GET /healthcheck");
    assert_eq!(health.status, 200, "a degraded replica still serves");
    assert_eq!(metric(&server, "meshlimit_redis_degraded"), Some(1));

    redis.restart();
    let restarted = Instant::now();
    let mut recovered = None;
    for _ in 0..100 {
        let (code, took) = decide(&mut client, &server, "after").await;
        assert!(
            took < ANSWER_BOUND,
            "{mode}: a request took {took:?} during recovery"
        );
        if dbsize(&redis) > 0 {
            recovered = Some((restarted.elapsed(), code));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (after, code) = recovered.unwrap_or_else(|| {
        panic!(
            "{mode}: counting did not resume through Redis\n{}",
            server.logs()
        )
    });
    // The breaker probes every 500 ms; a second is the promise, 3 s leaves CI room.
    assert!(
        after < Duration::from_secs(3),
        "{mode}: recovered after {after:?}"
    );
    assert_eq!(
        code,
        Code::Ok,
        "{mode}: a fresh key is within its limit again"
    );
    assert_eq!(metric(&server, "meshlimit_redis_degraded"), Some(0));
    eprintln!("{mode}: Redis used again {after:?} after its restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failure_fails_open_with_allow() {
    redis_dies_and_comes_back("allow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failure_fails_closed_with_deny() {
    redis_dies_and_comes_back("deny").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failure_limits_locally_with_local() {
    redis_dies_and_comes_back("local").await;
}

#[test]
fn sentinel_is_refused_with_what_to_use() {
    let output = common::meshlimit::command()
        .args(["serve", "--config"])
        .arg(fixture("config_redis"))
        .args(["--store", "redis"])
        .env("REDIS_TYPE", "sentinel")
        .env("REDIS_URL", "127.0.0.1:1")
        .output()
        .expect("run meshlimit");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Sentinel"), "{stderr}");
    assert!(stderr.contains("--redis-cluster-nodes"), "{stderr}");
}
