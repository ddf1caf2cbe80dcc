//! Plans end to end through a real Envoy: named policies with `extends` give each plan its
//! own limit per user, and a shared file's `defaults` limit a domain that sets nothing.
//!
//! Route and descriptor [plan=<x-plan>, user=<x-user-id>]:
//! tests/fixtures/envoy/ratelimit_tiers.yaml. Limits: tests/fixtures/config_tiers/.

mod common;

use common::envoy;
use common::fixture;
use common::http::Response;
use common::stack::Stack;

const TEMPLATE: &str = "envoy/ratelimit_tiers.yaml";

fn start_stack(domain: &str) -> Stack {
    Stack::start(fixture("config_tiers"), fixture(TEMPLATE), domain)
}

fn get(stack: &Stack, plan: &str, user: &str) -> Response {
    stack.get("/", &[("x-plan", plan), ("x-user-id", user)])
}

/// Envoy's `x-ratelimit-limit` for a limit of `limit` an hour reported under `name`.
fn hourly_limit_header(limit: u32, name: &str) -> String {
    format!(r#"{limit}, {limit};w=3600;name="{name}""#)
}

/// Sends `limit` requests as `user` on `plan`, each let through with one fewer left, then
/// one more, which must be rejected.
fn use_up(stack: &Stack, plan: &str, user: &str, limit: u32, name: &str) {
    let header = hourly_limit_header(limit, name);
    for sent in 1..=limit {
        let response = get(stack, plan, user);
        let what = format!("{user} ({plan}) request {sent} of {limit}");
        stack.expect_status(&response, 200, &what);
        assert_eq!(
            response.header("x-ratelimit-limit"),
            Some(header.as_str()),
            "{what}: {response:?}"
        );
        assert_eq!(
            response.header_u64("x-ratelimit-remaining"),
            u64::from(limit - sent),
            "{what}: {response:?}"
        );
    }
    let denied = get(stack, plan, user);
    let what = format!("{user} ({plan}) request {} of {limit}", limit + 1);
    stack.expect_status(&denied, 429, &what);
    assert_eq!(
        denied.header_u64("x-ratelimit-remaining"),
        0,
        "{what}: {denied:?}"
    );
}

/// (x-plan, x-user-id) of every request that reached the upstream, in order.
fn passed(stack: &Stack) -> Vec<(String, String)> {
    stack
        .upstream
        .received()
        .iter()
        .map(|request| {
            let header = |name| request.header(name).unwrap_or("-").to_owned();
            (header("x-plan"), header("x-user-id"))
        })
        .collect()
}

fn times(count: usize, plan: &str, user: &str) -> Vec<(String, String)> {
    vec![(plan.to_owned(), user.to_owned()); count]
}

#[test]
fn tiers_bootstrap_passes_envoy_validation() {
    let dir = tempfile::tempdir().unwrap();
    let template = std::fs::read_to_string(fixture(TEMPLATE)).unwrap();
    envoy::assert_template_valid(
        dir.path(),
        "ratelimit_tiers.yaml",
        &template,
        &[("DOMAIN", "tiers".into())],
        TEMPLATE,
    );
}

#[test]
fn each_plan_is_rejected_after_its_own_limit_and_each_user_is_counted_alone() {
    let stack = start_stack("tiers");

    // free 2, pro 4 and enterprise 6 an hour, each policy extending the one before.
    use_up(&stack, "free", "fay", 2, "free");
    // The same plan, another user: a counter of its own.
    use_up(&stack, "free", "finn", 2, "free");
    use_up(&stack, "pro", "paula", 4, "pro");
    use_up(&stack, "enterprise", "erik", 6, "enterprise");
    // Counters are keyed by the whole descriptor: fay on pro is not fay on free.
    let upgraded = get(&stack, "pro", "fay");
    stack.expect_status(&upgraded, 200, "fay on the pro plan");
    assert_eq!(
        upgraded.header_u64("x-ratelimit-remaining"),
        3,
        "{upgraded:?}"
    );
    // Nothing refilled meanwhile: the hourly buckets are minutes away from a new token.
    stack.expect_status(&get(&stack, "free", "fay"), 429, "fay on free, again");

    let expected: Vec<_> = [
        times(2, "free", "fay"),
        times(2, "free", "finn"),
        times(4, "pro", "paula"),
        times(6, "enterprise", "erik"),
        times(1, "pro", "fay"),
    ]
    .concat();
    assert_eq!(passed(&stack), expected, "requests the upstream received");
}

#[test]
fn a_shared_files_defaults_limit_a_domain_that_sets_nothing() {
    let stack = start_stack("shared_defaults");

    // shared_defaults.yaml has no limit for `plan: basic`; shared.yaml's `defaults` apply.
    use_up(&stack, "basic", "sam", 3, "baseline");
    use_up(&stack, "basic", "tom", 3, "baseline");
    // A node's own setting beats the shared defaults: internal users are never limited.
    for sent in 1..=5 {
        let response = get(&stack, "internal", "sam");
        stack.expect_status(&response, 200, &format!("sam (internal) request {sent}"));
        assert_eq!(response.header("x-ratelimit-limit"), None, "{response:?}");
    }

    let expected: Vec<_> = [
        times(3, "basic", "sam"),
        times(3, "basic", "tom"),
        times(5, "internal", "sam"),
    ]
    .concat();
    assert_eq!(passed(&stack), expected, "requests the upstream received");
}
