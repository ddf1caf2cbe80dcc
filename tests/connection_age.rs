//! How long a client connection to the gRPC port lives: `--max-connection-age` asks each one
//! to go (GOAWAY) at its own age, give or take a tenth, and `--max-connection-age-grace`
//! closes one whose requests are still running that long after.

mod common;

use std::time::{Duration, Instant};

use common::fixture;
use common::meshlimit::{Meshlimit, one_entry_request};
use common::redis::RedisServer;

const AGE_SECS: f64 = 2.0;

/// Connections opened in the same instant — every Envoy reconnecting after a rollout — are
/// asked to go at different moments, each within a tenth of the age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_opened_together_are_rotated_apart() {
    let meshlimit = Meshlimit::start_with(
        fixture("config_operations"),
        &["--max-connection-age", "2s"],
    );
    let addr = meshlimit.grpc_addr;
    let connections: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let opened = Instant::now();
                let (_requests, connection) =
                    h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
                // Resolves when the server has sent its GOAWAY and closed the idle connection.
                let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
                opened.elapsed().as_secs_f64()
            })
        })
        .collect();
    let mut lived = Vec::new();
    for connection in connections {
        lived.push(connection.await.expect("a connection task"));
    }
    lived.sort_by(f64::total_cmp);
    let (first, last) = (lived[0], lived[lived.len() - 1]);
    // Never before 0.9 × the age; the upper bound leaves a second for a loaded machine.
    assert!(
        first >= 0.9 * AGE_SECS - 0.05,
        "{lived:?}\n{}",
        meshlimit.logs()
    );
    assert!(
        last <= 1.1 * AGE_SECS + 1.0,
        "{lived:?}\n{}",
        meshlimit.logs()
    );
    // Twenty draws over 0.4 s: all within 0.1 s of each other has a chance below 1e-9.
    assert!(
        last - first >= 0.1,
        "all connections rotated at once: {lived:?}"
    );
    // /metrics says the same: twenty opened, twenty rotated, none cut, none left open.
    let closed = common::poll_until(Duration::from_secs(5), || {
        (meshlimit.metric("meshlimit_grpc_connections") == 0).then_some(())
    });
    assert!(closed.is_some(), "{}", meshlimit.logs());
    for (counter, expected) in [
        ("meshlimit_grpc_connections_opened_total", 20),
        ("meshlimit_grpc_connections_rotated_total", 20),
        ("meshlimit_grpc_connections_cut_total", 0),
    ] {
        assert_eq!(meshlimit.metric(counter), expected, "{counter}");
    }
}

/// A request still running when its connection reaches its age holds the connection only
/// for the grace; then the connection is closed and the client told at once, rather than
/// when the request would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_bounds_how_long_a_connection_asked_to_go_may_linger() {
    let redis = RedisServer::start();
    let meshlimit = Meshlimit::start_with(
        fixture("config_operations"),
        &[
            "--store",
            "redis",
            "--redis-url",
            &redis.url(),
            "--redis-timeout",
            "20s",
            "--max-connection-age",
            "1s",
            "--max-connection-age-grace",
            "1s",
        ],
    );
    let mut client = meshlimit.client().await;
    let request = |user: &str| one_entry_request("operations", "user", user);
    // Connected, and Redis answering.
    client
        .should_rate_limit(request("grace-warmup"))
        .await
        .expect("a first answer");
    // Redis holds every command for 15 s from here: the next request waits on it.
    let _: () = redis.query(redis::cmd("CLIENT").arg("PAUSE").arg(15_000).arg("ALL"));
    let sent = Instant::now();
    let answer = client.should_rate_limit(request("grace-held")).await;
    let waited = sent.elapsed();
    let status = answer.expect_err("the connection closed under the request");
    // Asked to go at 0.9–1.1 s of age, closed a second later: well before Redis's pause
    // (15 s) or --redis-timeout (20 s) would have ended the request.
    assert!(
        waited < Duration::from_secs(8),
        "the request held its connection for {waited:?} ({status:?})\n{}",
        meshlimit.logs()
    );
    assert!(
        waited >= Duration::from_millis(900),
        "closed before the grace: {waited:?} ({status:?})"
    );
    assert_eq!(meshlimit.metric("meshlimit_grpc_connections_cut_total"), 1);
}

/// By default connections are rotated daily with an hour's grace, as envoyproxy/ratelimit
/// rotates them; zero, as a flag or in its variables, turns rotation off.
#[test]
fn connections_are_rotated_daily_unless_told_never() {
    let config = fixture("config_operations");
    let started = |args: &[&str], env: &[(&str, &str)]| {
        let server = Meshlimit::start_with_env(&config, args, env);
        let logs = server.logs();
        logs.lines()
            .find(|line| line.contains("meshlimit listening"))
            .unwrap_or_else(|| panic!("no start line in\n{logs}"))
            .to_owned()
    };
    let default = started(&[], &[]);
    assert!(
        default.contains("rotated at 86400s ±10%, cut 3600s later"),
        "{default}"
    );
    let never = started(&["--max-connection-age", "0"], &[]);
    assert!(never.contains("never rotated"), "{never}");
    let by_env = started(&[], &[("GRPC_MAX_CONNECTION_AGE", "0")]);
    assert!(by_env.contains("never rotated"), "{by_env}");
    let waited_for = started(&[], &[("GRPC_MAX_CONNECTION_AGE_GRACE", "0")]);
    assert!(waited_for.contains("never cut"), "{waited_for}");
}
