//! The real binary with `--store redis` against a real Redis: replicas share one limit, and
//! a Redis that dies mid-traffic costs no request more than the deadline under each failure
//! policy, and is used again soon after it is back. Behind Redis Sentinel, counting follows
//! the master through a failover; over TLS (`rediss://`), a private CA is trusted with
//! `--redis-tls-ca` and an untrusted one stops start-up with a message.
//!
//! Limits: tests/fixtures/config_redis/shared.yaml (10 per hour, fixed window, per user).

mod common;

use std::time::{Duration, Instant};

use common::fixture;
use common::http;
use common::meshlimit::Meshlimit;
use common::redis::{RedisSentinel, RedisServer};
use common::tls::Ca;
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const LIMIT: usize = 10;
/// The deadline the fault tests give Redis, and what a request may take on top of it on a
/// busy 2-core CI machine (debug build, other tests running).
const REDIS_TIMEOUT: &str = "50ms";
const ANSWER_BOUND: Duration = Duration::from_millis(1_000);

fn start(redis: &RedisServer, extra: &[&str]) -> Meshlimit {
    start_config("config_redis", redis, extra)
}

/// meshlimit counting `fixture`'s limits in `redis`, named `e2e:` keys.
fn start_config(fixture_name: &str, redis: &RedisServer, extra: &[&str]) -> Meshlimit {
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
    Meshlimit::start_with(fixture(fixture_name), &args)
}

fn request(user: &str) -> RateLimitRequest {
    common::meshlimit::one_entry_request("shared", "user", user)
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

fn metric(server: &Meshlimit, selector: &str) -> Option<u64> {
    let response = http::get(server.admin_addr, "/metrics", &[]).ok()?;
    common::meshlimit::sample(&response.text(), selector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_fixed_window() {
    common::avoid_window_edge(3_600, 10);
    let redis = RedisServer::start();
    let replicas = [start(&redis, &[]), start(&redis, &[])];
    let mut clients = [replicas[0].client().await, replicas[1].client().await];
    let mut admitted = 0;
    let started = Instant::now();
    for i in 0..3 * LIMIT {
        let (code, _) = decide(&mut clients[i % 2], &replicas[i % 2], "shared-user").await;
        if code == Code::Ok {
            admitted += 1;
        }
    }
    let seconds = started.elapsed().as_secs();
    assert_eq!(
        admitted, LIMIT,
        "across both replicas, exactly the limit is admitted"
    );
    // Each replica asked Redis once after the limit was reached (and once more a second,
    // should the requests have taken that long); its other rejections came from its local
    // over-limit cache.
    let cached: u64 = replicas
        .iter()
        .map(|r| metric(r, "meshlimit_local_cache_hits_total").unwrap_or(0))
        .sum();
    let from_cache = (2 * LIMIT as u64 - 2 * (1 + seconds))..=(2 * LIMIT as u64 - 2);
    assert!(
        from_cache.contains(&cached),
        "{cached} answers from the cache in {seconds} s, not {from_cache:?}"
    );
    // The rule's own statistics say the same, under envoyproxy/ratelimit's names: every
    // rejection is over the limit, and those not asked of Redis came from the cache.
    let rule_stat = |stat: &str| -> u64 {
        let name = format!("ratelimit_service_rate_limit_{stat}{{domain=\"shared\",key=\"user\"}}");
        replicas.iter().map(|r| metric(r, &name).unwrap_or(0)).sum()
    };
    assert_eq!(rule_stat("over_limit"), (2 * LIMIT) as u64);
    assert_eq!(rule_stat("over_limit_with_local_cache"), cached);
}

/// An operator's `DELETE /v1/usage` on one replica lets a user over the shared limit in
/// again on both, though the other replica was answering them from its local over-limit
/// cache; with Redis dead, the reset is refused with why, within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_one_replica_lets_the_user_in_on_both() {
    common::avoid_window_edge(3_600, 10);
    let mut redis = RedisServer::start();
    let token = common::meshlimit::reset_token_file();
    let resets = ["--admin-reset-token-file", token.as_str()];
    let replicas = [start(&redis, &resets), start(&redis, &resets)];
    let mut clients = [replicas[0].client().await, replicas[1].client().await];
    for i in 0..LIMIT + 4 {
        decide(&mut clients[i % 2], &replicas[i % 2], "reset-user").await;
    }
    let (code, _) = decide(&mut clients[1], &replicas[1], "reset-user").await;
    assert_eq!(code, Code::OverLimit);
    let cached_before = metric(&replicas[1], "meshlimit_local_cache_hits_total").unwrap_or(0);
    assert!(cached_before > 0, "replica 1 should answer from its cache");

    let path = "/v1/usage?domain=shared&descriptor=user=reset-user";
    let reset = replicas[0].admin_delete(path);
    assert_eq!(reset.status, 200, "{reset:?}");
    assert_eq!(reset.json()["limits"][0]["used"], 0, "{reset:?}");
    // Replica 1 hears of it through Redis and drops its cached answer (it would ask Redis
    // again within a second anyway; the store conformance tests hold the limiter's clock
    // within that second to show the reset is heard).
    let mut admitted = false;
    for _ in 0..50 {
        let (code, _) = decide(&mut clients[1], &replicas[1], "reset-user").await;
        if code == Code::Ok {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        admitted,
        "replica 1 still turns the user away after the reset:\n{}",
        replicas[1].logs()
    );

    redis.kill();
    let started = Instant::now();
    let refused = replicas[0].admin_delete(path);
    assert!(started.elapsed() < ANSWER_BOUND, "{:?}", started.elapsed());
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("the reset did not reach Redis")),
        "{refused:?}"
    );
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
    // Each of those calls failed, though the failure policy answered it: dashboards and
    // alerts (`MeshlimitStoreErrors`, envoyproxy/ratelimit's `redis_error`) see the outage.
    assert_eq!(metric(&server, "meshlimit_store_errors_total"), Some(40));
    assert_eq!(
        metric(
            &server,
            "ratelimit_service_should_rate_limit_error{err_type=\"redis_error\"}"
        ),
        Some(40)
    );
    // Only `local` keeps counters of its own while Redis is away, and says so.
    let kept = metric(&server, "meshlimit_cache_entries");
    match mode {
        "local" => assert!(kept.is_some_and(|n| n > 0), "local counters: {kept:?}"),
        _ => assert_eq!(kept, Some(0), "{mode} keeps no counters"),
    }

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

/// A caller's `grpc-timeout` shorter than `--redis-timeout`: while Redis holds the call,
/// the caller is answered DEADLINE_EXCEEDED at its deadline, not when Redis lets go. Sent
/// over raw HTTP/2, so no client library gives up first and answers in the server's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_held_by_redis_ends_at_the_callers_deadline() {
    let redis = RedisServer::start();
    let server = start(&redis, &["--redis-timeout", "20s"]);
    let mut client = server.client().await;
    decide(&mut client, &server, "deadline-warmup").await;
    // Redis holds every command for 10 s from here.
    let _: () = redis.query(redis::cmd("CLIENT").arg("PAUSE").arg(10_000).arg("ALL"));
    let tcp = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut send = send.ready().await.expect("a stream");
    let call = ::http::Request::post(
        "http://127.0.0.1/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "500m")
    .body(())
    .expect("a request");
    let message = prost::Message::encode_to_vec(&request("deadline-held"));
    let frame = common::grpc_frame(0, message.len() as u32, &message);
    let sent = Instant::now();
    let (response, mut body) = send.send_request(call, false).expect("send the headers");
    body.send_data(frame.into(), true)
        .expect("send the message");
    let response = tokio::time::timeout(Duration::from_secs(15), response)
        .await
        .expect("an answer within 15 s")
        .expect("a response");
    let waited = sent.elapsed();
    // No message: the status is in the response's headers (a trailers-only answer).
    let status = response.headers().get("grpc-status").cloned();
    assert_eq!(
        status.as_ref().and_then(|s| s.to_str().ok()),
        Some("4"),
        "DEADLINE_EXCEEDED expected: {response:?}"
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(4),
        "answered after {waited:?}\n{}",
        server.logs()
    );
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

/// meshlimit with `--store redis` and `args` (no `--redis-url`), named `e2e:` keys.
/// What `/healthcheck` and the gRPC health service say of `server`.
async fn health(server: &Meshlimit) -> (u16, ServingStatus) {
    let http = server.admin_get("/healthcheck").status;
    let mut client = HealthClient::new(server.channel().await);
    let grpc = client
        .check(HealthCheckRequest {
            service: "ratelimit".into(),
        })
        .await
        .map(|answer| ServingStatus::try_from(answer.into_inner().status))
        .unwrap_or_else(|status| panic!("gRPC health: {status}\n{}", server.logs()))
        .expect("a known status");
    (http, grpc)
}

/// Polls `server`'s health until it is `wanted` (up to 15 s).
async fn health_becomes(server: &Meshlimit, wanted: (u16, ServingStatus), why: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut now = health(server).await;
    while now != wanted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = health(server).await;
    }
    assert_eq!(now, wanted, "{why}\n{}", server.logs());
}

/// REDIS_HEALTH_CHECK_ACTIVE_CONNECTION (`--health-requires-redis`): health fails while
/// Redis is away and comes back with it, with no request sent to notice either; without
/// it, a replica answering from its failure policy stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_redis_when_asked_to() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    // Asked for by envoyproxy/ratelimit's variable, as its Deployments set it.
    let requiring = Meshlimit::start_with_env(
        fixture("config_redis"),
        &[
            "--store",
            "redis",
            "--redis-url",
            &url,
            "--redis-timeout",
            REDIS_TIMEOUT,
        ],
        &[("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "true")],
    );
    let tolerant = start(&redis, &["--redis-timeout", REDIS_TIMEOUT]);
    let healthy = (200, ServingStatus::Serving);
    let unhealthy = (500, ServingStatus::NotServing);
    assert_eq!(health(&requiring).await, healthy, "{}", requiring.logs());

    redis.kill();
    health_becomes(&requiring, unhealthy, "Redis is down: health should fail").await;
    // What the liveness probe asks stays up: a restart would not bring Redis back.
    let live = requiring.admin_get("/live");
    assert_eq!(live.status, 200, "{live:?}\n{}", requiring.logs());
    assert_eq!(health(&tolerant).await, healthy, "{}", tolerant.logs());

    redis.restart();
    health_becomes(&requiring, healthy, "Redis is back: health should pass").await;
    let mut client = requiring.client().await;
    assert_eq!(decide(&mut client, &requiring, "after").await.0, Code::Ok);
    assert!(dbsize(&redis) > 0, "counted in Redis again");
}

fn start_with_target(args: &[&str], env: &[(&str, &str)]) -> Meshlimit {
    let mut all = vec!["--store", "redis", "--redis-prefix", "e2e:"];
    all.extend_from_slice(args);
    Meshlimit::start_with_env(fixture("config_redis"), &all, env)
}

/// Whether `redis` holds the counter of `user` (the fixed window's key, `e2e:{shared|user=…}`).
fn counted_in(redis: &RedisServer, user: &str) -> bool {
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg(counter_pattern(user)));
    !keys.is_empty()
}

/// The KEYS pattern of `user`'s counters.
fn counter_pattern(user: &str) -> String {
    format!("e2e:{{shared|user={user}}}*")
}

/// The stored counter of `user` (its state, as the counter script encodes it), when there
/// is one.
fn counter_value(redis: &RedisServer, user: &str) -> Option<Vec<u8>> {
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg(counter_pattern(user)));
    redis.query(redis::cmd("GET").arg(keys.first()?))
}

/// `user`'s requests alternate between `replicas` until `3 * LIMIT` were sent; returns how
/// many were admitted, checking that none took longer than `ANSWER_BOUND`.
async fn admitted_across(
    replicas: &[Meshlimit],
    clients: &mut [RateLimitServiceClient<Channel>],
    user: &str,
) -> usize {
    let mut admitted = 0;
    for i in 0..3 * LIMIT {
        let at = i % replicas.len();
        let (code, took) = decide(&mut clients[at], &replicas[at], user).await;
        assert!(took < ANSWER_BOUND, "{user}: a request took {took:?}");
        if code == Code::Ok {
            admitted += 1;
        }
    }
    admitted
}

const MASTER_NAME: &str = "mymaster";

/// A master, its replica and two sentinels watching them, and two meshlimit replicas that
/// find the master through the sentinels — the first sentinel they are given is down.
struct SentinelSetup {
    master: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisSentinel>,
    meshlimits: Vec<Meshlimit>,
}

impl SentinelSetup {
    fn start() -> SentinelSetup {
        let master = RedisServer::start();
        let replica = RedisServer::start_replica_of(&master);
        let sentinels: Vec<RedisSentinel> = (0..2)
            .map(|_| RedisSentinel::start(MASTER_NAME, &master, 1_000))
            .collect();
        for sentinel in &sentinels {
            sentinel.wait_for_replicas(MASTER_NAME, 1);
        }
        // envoyproxy/ratelimit's format: the master's name, then the sentinels.
        let dead = common::free_loopback_addr();
        let list = format!(
            "{MASTER_NAME},{dead},{},{}",
            sentinels[0].addr, sentinels[1].addr
        );
        let flags = [
            "--redis-timeout",
            REDIS_TIMEOUT,
            // Every decision goes to Redis, so what Redis holds is what the test reads.
            "--redis-local-cache-entries",
            "0",
        ];
        let by_flag = {
            let mut args = vec!["--redis-sentinel", list.as_str()];
            args.extend_from_slice(&flags);
            start_with_target(&args, &[])
        };
        let by_env = start_with_target(
            &flags,
            &[("REDIS_TYPE", "sentinel"), ("REDIS_URL", list.as_str())],
        );
        SentinelSetup {
            master,
            replica,
            sentinels,
            meshlimits: vec![by_flag, by_env],
        }
    }

    async fn clients(&self) -> Vec<RateLimitServiceClient<Channel>> {
        let mut clients = Vec::new();
        for meshlimit in &self.meshlimits {
            clients.push(meshlimit.client().await);
        }
        clients
    }

    fn logs(&self) -> String {
        let mut logs: Vec<String> = self.meshlimits.iter().map(Meshlimit::logs).collect();
        logs.extend(self.sentinels.iter().map(RedisSentinel::logs));
        logs.join("\n")
    }

    /// Sends requests for fresh users through each meshlimit until each has been counted in
    /// the replica (promoted by now); returns how long after `since` the last one got
    /// there. Every request must be answered within `ANSWER_BOUND`.
    async fn until_counted_in_replica(
        &self,
        clients: &mut [RateLimitServiceClient<Channel>],
        since: Instant,
    ) -> Duration {
        let mut followed: Vec<Option<Duration>> = vec![None; self.meshlimits.len()];
        let mut probe = 0;
        while since.elapsed() < Duration::from_secs(25) {
            probe += 1;
            for (at, (meshlimit, client)) in
                self.meshlimits.iter().zip(clients.iter_mut()).enumerate()
            {
                if followed[at].is_some() {
                    continue;
                }
                let user = format!("probe-{at}-{probe}");
                let (_, took) = decide(client, meshlimit, &user).await;
                assert!(
                    took < ANSWER_BOUND,
                    "a request took {took:?} during the failover\n{}",
                    self.logs()
                );
                // Sentinel drops client connections while it reconfigures the servers: a
                // failed look is "not yet", and the next probe looks again.
                let keys: Vec<String> = self
                    .replica
                    .try_query(redis::cmd("KEYS").arg(counter_pattern(&user)))
                    .unwrap_or_default();
                if !keys.is_empty() {
                    followed[at] = Some(since.elapsed());
                }
            }
            if let Some(last) = followed.iter().copied().collect::<Option<Vec<_>>>() {
                return last.into_iter().max().unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "not every meshlimit counted in the promoted replica within 25 s ({followed:?})\n{}",
            self.logs()
        );
    }

    /// Polls until a sentinel names the replica as master; how long after `since`.
    fn until_sentinel_names_replica(&self, since: Instant) -> Duration {
        let promoted = common::poll_until(Duration::from_secs(25), || {
            (self.sentinels[0].master(MASTER_NAME) == Some(self.replica.addr)).then_some(())
        });
        assert!(
            promoted.is_some(),
            "sentinel did not promote the replica\n{}",
            self.logs()
        );
        since.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_is_shared_and_followed_after_it_dies() {
    common::avoid_window_edge(3_600, 40);
    let mut setup = SentinelSetup::start();
    let mut clients = setup.clients().await;
    assert_eq!(
        admitted_across(&setup.meshlimits, &mut clients, "before").await,
        LIMIT,
        "both meshlimits count in the master Sentinel names\n{}",
        setup.logs()
    );
    let on_master = counter_value(&setup.master, "before");
    assert!(on_master.is_some(), "counted in the master");
    // The replica has the count before the master dies, so the limit outlives the failover.
    let replicated = common::poll_until(Duration::from_secs(10), || {
        (counter_value(&setup.replica, "before") == on_master).then_some(())
    });
    assert!(
        replicated.is_some(),
        "the replica did not get the count: {:?} on the master, {:?} on the replica",
        on_master,
        counter_value(&setup.replica, "before")
    );

    setup.master.kill();
    let killed = Instant::now();
    // Force the promotion rather than wait for the sentinels' vote: what is under test is
    // how meshlimit follows, not how fast Sentinel decides.
    let forced = common::poll_until(Duration::from_secs(10), || {
        setup.sentinels[0].failover(MASTER_NAME).ok()
    });
    assert!(
        forced.is_some(),
        "SENTINEL FAILOVER was refused\n{}",
        setup.logs()
    );
    let resumed = setup.until_counted_in_replica(&mut clients, killed).await;
    let promoted = setup.until_sentinel_names_replica(killed);
    eprintln!(
        "master killed: sentinel named the replica after {promoted:?}, meshlimit counted there \
         after {resumed:?}"
    );
    // Sentinel's own switch is its business; meshlimit follows within about its 100 ms
    // look-up interval (generous margin for a busy CI machine).
    assert!(
        resumed < promoted + Duration::from_secs(3),
        "meshlimit followed the failover {resumed:?} after the kill, the sentinel {promoted:?}"
    );

    for (meshlimit, client) in setup.meshlimits.iter().zip(clients.iter_mut()) {
        // Just after the switch one call may still fail and be answered by the failure
        // policy (allow); a lost count would instead admit every one of these, as Redis
        // would count "before" again from zero up to its limit of 10.
        let mut codes = Vec::new();
        for _ in 0..5 {
            let (code, _) = decide(client, meshlimit, "before").await;
            codes.push(code);
            if code == Code::OverLimit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            codes.last(),
            Some(&Code::OverLimit),
            "the count survived the failover: {codes:?}\n{}",
            setup.logs()
        );
    }
    assert_eq!(
        admitted_across(&setup.meshlimits, &mut clients, "after").await,
        LIMIT,
        "the new master is shared by both meshlimits"
    );
    for meshlimit in &setup.meshlimits {
        let degraded = common::poll_until(Duration::from_secs(3), || {
            (metric(meshlimit, "meshlimit_redis_degraded") == Some(0)).then_some(())
        });
        assert!(degraded.is_some(), "still degraded\n{}", meshlimit.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_demoted_master_answers_readonly_and_is_left_for_the_new_one() {
    common::avoid_window_edge(3_600, 40);
    let setup = SentinelSetup::start();
    let mut clients = setup.clients().await;
    assert_eq!(
        admitted_across(&setup.meshlimits, &mut clients, "first").await,
        LIMIT
    );
    // A planned switch: the old master stays up and becomes a replica, so meshlimit's
    // connection to it still works but writes are refused with READONLY.
    let started = Instant::now();
    setup.sentinels[0]
        .failover(MASTER_NAME)
        .unwrap_or_else(|error| panic!("SENTINEL FAILOVER: {error}\n{}", setup.logs()));
    let resumed = setup.until_counted_in_replica(&mut clients, started).await;
    let promoted = setup.until_sentinel_names_replica(started);
    eprintln!(
        "planned failover: sentinel switched after {promoted:?}, meshlimit after {resumed:?}"
    );
    assert!(resumed < promoted + Duration::from_secs(3));
    assert_eq!(
        admitted_across(&setup.meshlimits, &mut clients, "second").await,
        LIMIT,
        "the promoted server is shared by both meshlimits"
    );
}

#[test]
fn sentinel_list_without_a_master_name_is_refused_with_the_format() {
    let output = common::meshlimit::command()
        .args(["serve", "--config"])
        .arg(fixture("config_redis"))
        .args(["--store", "redis"])
        .env("REDIS_TYPE", "sentinel")
        .env("REDIS_URL", "127.0.0.1:26379,127.0.0.1:26380")
        .output()
        .expect("run meshlimit");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("mymaster,host:26379"), "{stderr}");
}

/// A TLS-only Redis with a certificate from a private CA, or `None` (with the reason
/// printed) when this machine's server binary has no TLS.
fn tls_redis(ca: &Ca, extra: &[&str]) -> Option<RedisServer> {
    match RedisServer::start_tls(ca, extra) {
        Ok(server) => Some(server),
        Err(reason) => {
            eprintln!(
                "SKIPPED: {reason}; install redis-server (Debian's has TLS) to run this test"
            );
            None
        }
    }
}

/// A Redis in the same pod, reached on its Unix socket: one replica set up with
/// envoyproxy/ratelimit's variables (`REDIS_SOCKET_TYPE=unix`, the path in `REDIS_URL`, an
/// ACL user's `user:password` in `REDIS_AUTH`), one with `--redis-url redis+unix://`; they
/// share one limit, and Redis sees them as that user on its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_redis_on_its_unix_socket() {
    common::avoid_window_edge(3_600, 10);
    let sockets = tempfile::tempdir().expect("a directory for the socket");
    let socket = sockets.path().join("redis.sock").display().to_string();
    let redis = RedisServer::start_with(&["--unixsocket", &socket, "--unixsocketperm", "700"]);
    redis.query::<()>(
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("meshlimit")
            .arg("on")
            .arg(">s3cr/t pw")
            .arg("~*")
            .arg("+@all"),
    );
    let by_env = start_with_target(
        &[],
        &[
            ("REDIS_SOCKET_TYPE", "unix"),
            ("REDIS_URL", socket.as_str()),
            ("REDIS_AUTH", "meshlimit:s3cr/t pw"),
        ],
    );
    let url = format!("redis+unix://{socket}?user=meshlimit&pass=s3cr%2Ft%20pw");
    let by_flag = start_with_target(&["--redis-url", &url], &[]);
    // Kept to the end: their connections are what CLIENT LIST shows.
    let replicas = [by_env, by_flag];
    shared_in(&redis, &replicas, "socket-user").await;
    // `U`: a client on the Unix socket.
    let clients: String = redis.query(redis::cmd("CLIENT").arg("LIST"));
    let on_socket = clients
        .lines()
        .filter(|line| line.contains(" user=meshlimit "))
        .filter(|line| {
            line.split(' ')
                .any(|field| field.starts_with("flags=") && field.contains('U'))
        })
        .count();
    assert!(on_socket >= 2, "one connection a replica:\n{clients}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_counts_through_a_tls_redis_whose_ca_is_given() {
    common::avoid_window_edge(3_600, 10);
    let ca = Ca::new("meshlimit redis test CA");
    let Some(redis) = tls_redis(&ca, &["--tls-auth-clients", "no"]) else {
        return;
    };
    let files = tempfile::tempdir().expect("temp dir");
    let ca_file = files.path().join("redis-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write the CA");
    let ca_path = ca_file.display().to_string();
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    // One replica set up with meshlimit's flags, one with envoyproxy/ratelimit's variables.
    let by_flag = start_with_target(&["--redis-url", &url, "--redis-tls-ca", &ca_path], &[]);
    let port = redis.addr.port().to_string();
    let host_port = format!("127.0.0.1:{port}");
    let by_env = start_with_target(
        &[],
        &[
            ("REDIS_URL", host_port.as_str()),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CACERT", ca_path.as_str()),
        ],
    );
    shared_in(&redis, &[by_flag, by_env], "tls-user").await;
}

/// Both `replicas` count `user` in `redis`: exactly the limit is admitted across them, the
/// counter is there, and no decision came from the failure policy.
async fn shared_in(redis: &RedisServer, replicas: &[Meshlimit; 2], user: &str) {
    let mut clients = vec![replicas[0].client().await, replicas[1].client().await];
    assert_eq!(
        admitted_across(replicas, &mut clients, user).await,
        LIMIT,
        "both replicas count in the one Redis\n{}\n{}",
        replicas[0].logs(),
        replicas[1].logs()
    );
    assert!(counted_in(redis, user));
    for replica in replicas {
        assert_eq!(
            metric(replica, "meshlimit_redis_fallback_decisions_total"),
            Some(0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_client_certificate_counts_when_the_server_requires_one() {
    common::avoid_window_edge(3_600, 10);
    let ca = Ca::new("meshlimit redis mTLS CA");
    let Some(redis) = tls_redis(&ca, &["--tls-auth-clients", "yes"]) else {
        return;
    };
    let files = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| files.path().join(name).display().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).expect("write the CA");
    ca.client_cert("meshlimit").write(
        files.path().join("client.pem").as_path(),
        files.path().join("client.key").as_path(),
    );
    let url = redis.url();
    let server = start_with_target(
        &[
            "--redis-url",
            &url,
            "--redis-tls-ca",
            &path("ca.pem"),
            "--redis-tls-cert",
            &path("client.pem"),
            "--redis-tls-key",
            &path("client.key"),
        ],
        &[],
    );
    let mut client = server.client().await;
    let mut admitted = 0;
    for _ in 0..LIMIT + 2 {
        if decide(&mut client, &server, "mtls-user").await.0 == Code::Ok {
            admitted += 1;
        }
    }
    assert_eq!(admitted, LIMIT, "{}", server.logs());
    assert!(counted_in(&redis, "mtls-user"));

    // Without a client certificate the server refuses the handshake: a start-up error.
    let refused = start_failure(&["--redis-url", &url, "--redis-tls-ca", &path("ca.pem")]);
    assert!(refused.contains("--redis-tls-cert"), "{refused}");
}

/// Runs `meshlimit serve --store redis` with `args`, which must fail at start-up within a
/// few seconds (never hang); returns what it printed.
fn start_failure(args: &[&str]) -> String {
    let admin = common::free_loopback_addr().to_string();
    let grpc = common::free_loopback_addr().to_string();
    let mut serve = common::meshlimit::command();
    serve
        .args(["serve", "--config"])
        .arg(fixture("config_redis"))
        .args([
            "--store",
            "redis",
            "--grpc-addr",
            &grpc,
            "--admin-addr",
            &admin,
        ])
        .args(args);
    let (code, text) = common::meshlimit::exit_of(serve);
    // Killed after 10 s (no code) if it kept running instead of failing.
    assert_eq!(code, Some(1), "{text}");
    eprintln!("meshlimit refused to start, as it should:\n{text}");
    text
}

#[test]
fn rediss_with_an_untrusted_ca_stops_start_up_with_what_to_do() {
    let ca = Ca::new("meshlimit redis test CA");
    let Some(redis) = tls_redis(&ca, &["--tls-auth-clients", "no"]) else {
        return;
    };
    let files = tempfile::tempdir().expect("temp dir");
    let other = files.path().join("other-ca.pem");
    std::fs::write(&other, Ca::new("some other CA").pem()).expect("write the CA");
    let url = redis.url();
    let started = Instant::now();
    let message = start_failure(&[
        "--redis-url",
        &url,
        "--redis-tls-ca",
        &other.display().to_string(),
    ]);
    assert!(message.contains("invalid peer certificate"), "{message}");
    assert!(message.contains("--redis-tls-ca"), "{message}");
    // The system's roots do not know the test CA either.
    let message = start_failure(&["--redis-url", &url]);
    assert!(message.contains("--redis-tls-ca"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn hybrid_is_refused_on_a_sliding_window_with_the_line() {
    let output = common::meshlimit::command()
        .arg("validate")
        .arg(fixture("config_hybrid_invalid"))
        .output()
        .expect("run meshlimit validate");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("hot.yaml:6:"), "{stderr}");
    assert!(stderr.contains("fixed windows only"), "{stderr}");
}

fn hot_request() -> RateLimitRequest {
    RateLimitRequest {
        domain: "hot".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "api".into(),
                value: "search".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// Two replicas hammer one `hybrid: true` key (300 a minute) as fast as one connection each
/// allows: together they admit at least the limit and at most the documented overshoot,
/// every admitted hit reaches Redis, and Redis sees a batch per flush instead of a round
/// trip per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_replicas_overshoot_at_most_the_documented_bound() {
    const HOT_LIMIT: usize = 300;
    const PER_REPLICA: usize = 450;
    const FLUSH_MS: u64 = 20;
    common::avoid_window_edge(60, 8);
    let redis = RedisServer::start();
    let flush = format!("{FLUSH_MS}ms");
    let start = || start_config("config_hybrid", &redis, &["--redis-hybrid-flush", &flush]);
    let replicas = [start(), start()];
    let started = Instant::now();
    let mut runs = Vec::new();
    for replica in &replicas {
        let mut client = replica.client().await;
        runs.push(tokio::spawn(async move {
            let mut admitted = 0;
            let mut slowest = Duration::ZERO;
            for _ in 0..PER_REPLICA {
                let sent = Instant::now();
                let response = client
                    .should_rate_limit(hot_request())
                    .await
                    .expect("a decision");
                slowest = slowest.max(sent.elapsed());
                if response.into_inner().overall_code() == Code::Ok {
                    admitted += 1;
                }
            }
            (admitted, slowest)
        }));
    }
    let mut admitted = 0;
    for run in runs {
        let (count, slowest) = run.await.expect("the request loop");
        assert!(slowest < ANSWER_BOUND, "a request took {slowest:?}");
        admitted += count;
    }
    let elapsed = started.elapsed();
    // Each replica's request rate, an upper bound on the rate it admitted at.
    let rate_per_replica = PER_REPLICA as f64 / elapsed.as_secs_f64();
    // README: admitted ≤ limit + (replicas − 1) × rate × (2 × flush + round trip); the
    // round trip is bounded by --redis-timeout (50 ms).
    let bound =
        HOT_LIMIT + (rate_per_replica * (2.0 * FLUSH_MS as f64 + 50.0) / 1_000.0).ceil() as usize;
    eprintln!(
        "hybrid: {admitted} admitted of {} at {rate_per_replica:.0}/s per replica, limit \
         {HOT_LIMIT}, bound {bound}",
        2 * PER_REPLICA
    );
    assert!(admitted >= HOT_LIMIT, "admitted {admitted}");
    assert!(
        admitted <= bound,
        "admitted {admitted} > bound {bound}\n{}\n{}",
        replicas[0].logs(),
        replicas[1].logs()
    );

    // Every admitted hit reaches Redis within a few flushes.
    let stored = common::poll_until(Duration::from_secs(5), || {
        let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("e2e:{hot|api=search}*"));
        let value: Option<u64> = redis.query(redis::cmd("GET").arg(keys.first()?));
        (value == Some(admitted as u64)).then_some(())
    });
    assert!(
        stored.is_some(),
        "Redis does not hold the {admitted} admitted hits"
    );
    let batches = redis.command_calls("incrby");
    eprintln!("hybrid: {batches} INCRBY batches for {admitted} admitted hits");
    assert_eq!(redis.command_calls("evalsha"), 0, "no per-request script");
    assert!(
        batches * 4 <= admitted as u64,
        "{batches} batches for {admitted} hits: not batched"
    );
}
