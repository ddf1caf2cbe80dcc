//! End to end through a real Envoy: client → Envoy's ratelimit filter → meshlimit, and on
//! OK onwards to an echo upstream. Asserts what an HTTP client of the protected service
//! sees: status codes, Envoy's `x-ratelimit-*` headers, and which requests got through.
//!
//! Routes and descriptors: tests/fixtures/envoy/ratelimit_http.yaml.
//! Limits: tests/fixtures/config/e2e.yaml and e2e_sliding.yaml.

mod common;

use common::envoy;
use common::http::Response;
use common::stack::Stack;
use common::{avoid_window_edge, fixture, secs_left_in_window};

const TEMPLATE: &str = "envoy/ratelimit_http.yaml";

/// meshlimit on tests/fixtures/config, and Envoy asking it about `domain`.
fn start_stack(domain: &str) -> Stack {
    Stack::start(fixture("config"), fixture(TEMPLATE), domain)
}

/// `x-ratelimit-reset` for a fixed one-minute window: the seconds left in the current
/// minute, give or take the second that may tick over between the two readings.
fn assert_reset_is_end_of_minute(response: &Response) {
    let reset = response.header_u64("x-ratelimit-reset");
    let expected = secs_left_in_window(60);
    assert!(
        (1..=60).contains(&reset) && reset.abs_diff(expected) <= 1,
        "x-ratelimit-reset {reset}, expected about {expected}: {response:?}"
    );
}

#[test]
fn bootstrap_template_and_deploy_example_pass_envoy_validation() {
    let dir = tempfile::tempdir().unwrap();
    let template = std::fs::read_to_string(fixture(TEMPLATE)).unwrap();
    envoy::assert_template_valid(
        dir.path(),
        "ratelimit_http.yaml",
        &template,
        &[("DOMAIN", "e2e".into())],
        TEMPLATE,
    );
    let deploy_example = common::repo_root().join("deploy/envoy/envoy.yaml");
    envoy::assert_valid(&deploy_example, "the deploy/ example");
}

/// deploy/envoy/envoy.yaml as shipped, with only its addresses moved to loopback ports
/// and its 100 ms check timeout lengthened for a busy test machine; `envoy.yaml` in the
/// returned directory.
fn deploy_example_as_template() -> tempfile::TempDir {
    let shipped = std::fs::read_to_string(common::repo_root().join("deploy/envoy/envoy.yaml"))
        .expect("read deploy/envoy/envoy.yaml");
    let mut text = shipped;
    for (from, to) in [
        (
            "address: 0.0.0.0, port_value: 10000",
            "address: 127.0.0.1, port_value: {{LISTENER_PORT}}",
        ),
        (
            "address: 127.0.0.1, port_value: 9901",
            "address: 127.0.0.1, port_value: {{ADMIN_PORT}}",
        ),
        (
            "address: app, port_value: 8080",
            "address: 127.0.0.1, port_value: {{UPSTREAM_PORT}}",
        ),
        (
            "address: meshlimit, port_value: 8081",
            "address: 127.0.0.1, port_value: {{RLS_PORT}}",
        ),
        ("timeout: 0.1s", "timeout: 2s"),
    ] {
        assert!(
            text.contains(from),
            "deploy/envoy/envoy.yaml no longer has `{from}`"
        );
        text = text.replace(from, to);
    }
    let dir = tempfile::tempdir().expect("create a dir for the rendered example");
    std::fs::write(dir.path().join("envoy.yaml"), text).expect("write the rendered example");
    dir
}

/// The shipped bootstrap limits each client by the address it connects from: a client
/// that sends its own X-Forwarded-For, different on every request, still lands in its
/// one per-address bucket, as README's "300/minute per client address" says.
#[test]
fn deploy_example_counts_the_connecting_address_not_a_forged_forwarded_for() {
    const EDGE: &str = "\
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: fixed_window}
";
    let config = common::config_dir::plain(&[("edge.yaml", EDGE)]);
    let bootstrap = deploy_example_as_template();
    let stack = Stack::start_around(
        common::meshlimit::Meshlimit::start(config.path()),
        bootstrap.path().join("envoy.yaml"),
        "edge",
        &[],
    );
    avoid_window_edge(60, 10);
    let statuses: Vec<u16> = (1..=5)
        .map(|n| {
            let forged = format!("198.51.100.{n}");
            stack.get("/", &[("x-forwarded-for", &forged)]).status
        })
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "a forged X-Forwarded-For chose the bucket\n{}",
        stack.logs()
    );
}

#[test]
fn fixed_window_allows_the_limit_then_answers_429_with_ratelimit_headers() {
    let stack = start_stack("e2e");
    // Four requests must land in one minute-long window for the counts below to hold.
    avoid_window_edge(60, 10);

    // Envoy lists every limit that applied; only [user] has one on this path.
    let limit = r#"3, 3;w=60;name="per_user""#;
    for remaining in [2, 1, 0] {
        let response = stack.get_as("alice", "/");
        stack.expect_status(&response, 200, "alice within her 3 a minute");
        assert_eq!(
            response.header("x-ratelimit-limit"),
            Some(limit),
            "{response:?}"
        );
        assert_eq!(
            response.header_u64("x-ratelimit-remaining"),
            remaining,
            "{response:?}"
        );
        assert_reset_is_end_of_minute(&response);

        let echo = response.json();
        assert_eq!(echo["path"], "/", "upstream saw {echo}");
        assert_eq!(echo["headers"]["x-user-id"], "alice", "upstream saw {echo}");
    }

    let denied = stack.get_as("alice", "/");
    stack.expect_status(&denied, 429, "alice's 4th request in the minute");
    assert_eq!(
        denied.header("x-ratelimit-limit"),
        Some(limit),
        "{denied:?}"
    );
    assert_eq!(denied.header_u64("x-ratelimit-remaining"), 0, "{denied:?}");
    assert_reset_is_end_of_minute(&denied);

    // Limits are per user: bob starts with his own full allowance.
    let bob = stack.get_as("bob", "/");
    stack.expect_status(&bob, 200, "bob after alice ran out");
    assert_eq!(bob.header_u64("x-ratelimit-remaining"), 2, "{bob:?}");

    // The denied request never reached the service.
    let users: Vec<_> = stack
        .upstream
        .received()
        .iter()
        .map(|request| request.header("x-user-id").unwrap_or("-").to_owned())
        .collect();
    assert_eq!(users, ["alice", "alice", "alice", "bob"]);
}

#[test]
fn user_and_path_rule_limits_only_its_path() {
    let stack = start_stack("e2e");
    avoid_window_edge(60, 10);

    // [user=carol] has 3 a minute, [user=carol, path=/strict] has 1: the headers describe
    // the limit closest to running out, and list both.
    let first = stack.get_as("carol", "/strict");
    stack.expect_status(&first, 200, "carol's first /strict");
    assert_eq!(
        first.header("x-ratelimit-limit"),
        Some(r#"1, 3;w=60;name="per_user", 1;w=60"#),
        "{first:?}"
    );
    assert_eq!(first.header_u64("x-ratelimit-remaining"), 0, "{first:?}");

    let second = stack.get_as("carol", "/strict");
    stack.expect_status(&second, 429, "carol's second /strict in the minute");

    // Other paths only count against [user=carol], which has room left.
    let elsewhere = stack.get_as("carol", "/elsewhere");
    stack.expect_status(&elsewhere, 200, "carol on another path");
    assert_eq!(elsewhere.json()["path"], "/elsewhere");
}

#[test]
fn sliding_window_by_default_denies_after_the_limit() {
    let stack = start_stack("e2e_sliding");
    // Keeps the four requests in one minute, so the outcome does not depend on how the
    // sliding window weighs the previous one.
    avoid_window_edge(60, 10);

    for attempt in 1..=3 {
        let response = stack.get_as("dave", "/");
        stack.expect_status(&response, 200, &format!("dave's request {attempt} of 3"));
    }
    let denied = stack.get_as("dave", "/");
    stack.expect_status(&denied, 429, "dave's 4th request in the minute");
    assert_eq!(denied.header_u64("x-ratelimit-remaining"), 0, "{denied:?}");

    let erin = stack.get_as("erin", "/");
    stack.expect_status(&erin, 200, "erin after dave ran out");
    assert_eq!(stack.upstream.received().len(), 4);
}
