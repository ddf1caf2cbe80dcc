//! A config using the fields envoyproxy/ratelimit added in 2025–26 (wildcards anywhere in a
//! value, `share_threshold`, `value_to_metric`, `metadata`, `quota_mode`) and its
//! SHADOW_MODE, through a real Envoy.
//!
//! Routes: tests/fixtures/envoy/ratelimit_tiers.yaml ([plan=<x-plan>, user=<x-user-id>]),
//! ratelimit_metadata.yaml (the same, with an access log) and ratelimit_http.yaml ([user],
//! [user, path], [remote_address]). Limits: tests/fixtures/config_migrated/.

mod common;

use std::time::{Duration, Instant};

use common::fixture;
use common::meshlimit::Meshlimit;
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

    stack.expect_status(&get("trial", "carol"), 200, "carol's first trial request");
    stack.expect_status(&get("trial", "carol"), 429, "carol's second trial request");

    // value_to_metric: the trial rule's hits are counted under a key naming the plan and
    // the user, as envoyproxy/ratelimit's stats name them.
    // Selected as envoyproxy/ratelimit's Prometheus mapping labels them.
    let over = r#"ratelimit_service_rate_limit_over_limit{domain="migrated",key1="plan_trial",key2="user_carol"}"#;
    assert_eq!(stack.meshlimit.metric(over), 1);
}

#[test]
fn descriptor_metadata_reaches_envoys_dynamic_metadata_while_the_request_passes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = dir.path().join("access.log");
    let meshlimit =
        Meshlimit::start_with(fixture("config_migrated"), &["--dynamic-metadata", "true"]);
    let stack = Stack::start_around(
        meshlimit,
        fixture("envoy/ratelimit_metadata.yaml"),
        "migrated",
        &[("ACCESS_LOG", log.display().to_string())],
    );
    for sent in 1..=3 {
        let response = stack.get("/", &[("x-plan", "team-a-eu"), ("x-user-id", "erin")]);
        let expected = if sent <= 2 { 200 } else { 429 };
        stack.expect_status(&response, expected, &format!("erin's request {sent}"));
    }
    // Envoy writes its access log in the background (about once a second).
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(lines.len(), 3, "{lines:?}\n{}", stack.logs());
    for line in &lines[..2] {
        assert!(line.starts_with("200 erin "), "{line}");
        assert!(line.contains(r#""billing":{"#), "{line}");
        assert!(line.contains(r#""region":"eu""#), "{line}");
        assert!(line.contains(r#""plan_family":"team""#), "{line}");
    }
    // envoyproxy/ratelimit's layout, at the top where its access log formats look, and
    // meshlimit's summary under `meshlimit`.
    for (line, code) in lines.iter().zip(["OK", "OK", "OVER_LIMIT"]) {
        let tail = format!(r#" migrated [{{"entries":["plan=team-a-eu","user=erin"]}}] {code}"#);
        assert!(line.ends_with(&tail), "{line}");
    }
    // Over the limit, the rule did not let the request pass: no metadata of it.
    assert!(lines[2].starts_with("429 erin "), "{}", lines[2]);
    assert!(!lines[2].contains("billing"), "{}", lines[2]);
}

#[test]
fn shadow_mode_in_the_environment_lets_everything_pass_and_counts_it() {
    // A deployment configured the envoyproxy/ratelimit way, through its variables.
    let meshlimit =
        Meshlimit::start_with_env(fixture("config_migrated"), &[], &[("SHADOW_MODE", "true")]);
    let stack = Stack::start_around(
        meshlimit,
        fixture("envoy/ratelimit_tiers.yaml"),
        "migrated",
        &[],
    );
    for sent in 1..=4 {
        let response = stack.get("/", &[("x-plan", "trial"), ("x-user-id", "frank")]);
        stack.expect_status(
            &response,
            200,
            &format!("frank's request {sent} of a limit of 1"),
        );
    }
    // Three requests were over the limit: counted as such, and as passed by shadow mode.
    assert_eq!(
        stack
            .meshlimit
            .metric("ratelimit_service_global_shadow_mode"),
        3
    );
    let over =
        r#"ratelimit_service_rate_limit_over_limit{domain="migrated",key="plan_trial.user_frank"}"#;
    assert_eq!(stack.meshlimit.metric(over), 3);
}

#[test]
fn quota_mode_turns_a_request_away_only_when_every_quota_is_used_up() {
    let stack = Stack::start(
        fixture("config_migrated"),
        fixture("envoy/ratelimit_http.yaml"),
        "quota",
    );
    let get = || stack.get("/reports", &[("x-user-id", "grace")]);
    stack.expect_status(&get(), 200, "grace's first request, both quotas with room");
    // The per-user quota of 1 is used up, the per-path one of 2 is not: still admitted.
    stack.expect_status(&get(), 200, "grace's second request, one quota with room");
    stack.expect_status(&get(), 429, "grace's third request, both quotas used up");
}
