//! A config using the fields envoyproxy/ratelimit added in 2025–26 (wildcards anywhere in a
//! value, `share_threshold`, `quota_mode`, `value_to_metric`), through a real Envoy.
//!
//! Route and descriptor [plan=<x-plan>, user=<x-user-id>]:
//! tests/fixtures/envoy/ratelimit_tiers.yaml. Limits: tests/fixtures/config_migrated/.

mod common;

use common::fixture;
use common::stack::Stack;

#[test]
fn a_migrated_config_with_the_newer_fields_limits_as_envoyproxy_ratelimit_does() {
    let stack = Stack::start(
        fixture("config_migrated"),
        fixture("envoy/ratelimit_tiers.yaml"),
        "migrated",
    );
    let get = |plan: &str, user: &str| stack.get("/", &[("x-plan", plan), ("x-user-id", user)]);

    // `team-*-eu` matches both teams, and share_threshold gives alice one counter of 2
    // across them: her third request, from a third team, is the one over.
    let first = get("team-a-eu", "alice");
    stack.expect_status(&first, 200, "alice via team-a-eu");
    assert_eq!(first.header_u64("x-ratelimit-remaining"), 1, "{first:?}");
    let second = get("team-b-eu", "alice");
    stack.expect_status(&second, 200, "alice via team-b-eu");
    assert_eq!(second.header_u64("x-ratelimit-remaining"), 0, "{second:?}");
    stack.expect_status(&get("team-c-eu", "alice"), 429, "alice via team-c-eu");
    // Users keep counters of their own.
    stack.expect_status(&get("team-a-eu", "bob"), 200, "bob via team-a-eu");
    // The wildcard's closing `-eu` must end the value: no node matches, no limit.
    let us = get("team-a-us", "alice");
    stack.expect_status(&us, 200, "alice via team-a-us");
    assert_eq!(us.header("x-ratelimit-limit"), None, "{us:?}");

    // quota_mode: the second request is over the limit of 1 and still passes.
    stack.expect_status(&get("trial", "carol"), 200, "carol's first trial request");
    let over = get("trial", "carol");
    stack.expect_status(
        &over,
        200,
        "carol's second trial request, over in quota mode",
    );
    assert_eq!(over.header_u64("x-ratelimit-remaining"), 0, "{over:?}");

    // value_to_metric: the trial rule's hits are counted under a key naming the plan and
    // the user, as envoyproxy/ratelimit's stats name them.
    let metrics = stack.meshlimit.admin_get("/metrics").text();
    let line = r#"ratelimit_service_rate_limit_over_limit{domain="migrated",key="plan_trial.user_carol"} 1"#;
    assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
}
