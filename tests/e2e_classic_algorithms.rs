//! Sliding log and leaky bucket end to end through a real Envoy: each admits exactly what
//! it should and reports it in Envoy's `x-ratelimit-*` headers.
//!
//! Route and descriptor [plan=<x-plan>, user=<x-user-id>]:
//! tests/fixtures/envoy/ratelimit_tiers.yaml. Limits: tests/fixtures/config_classic/.

mod common;

use common::fixture;
use common::http::Response;
use common::stack::Stack;

fn start_stack() -> Stack {
    Stack::start(
        fixture("config_classic"),
        fixture("envoy/ratelimit_tiers.yaml"),
        "classic",
    )
}

fn get(stack: &Stack, plan: &str, user: &str) -> Response {
    stack.get("/", &[("x-plan", plan), ("x-user-id", user)])
}

/// Sends `admitted` requests that must pass with one fewer left each time, then one that
/// must be rejected; returns the rejection.
fn admit_then_reject(stack: &Stack, plan: &str, user: &str, admitted: u64) -> Response {
    for sent in 1..=admitted {
        let response = get(stack, plan, user);
        let what = format!("{user} ({plan}) request {sent} of {admitted}");
        stack.expect_status(&response, 200, &what);
        assert_eq!(
            response.header_u64("x-ratelimit-remaining"),
            admitted - sent,
            "{what}: {response:?}"
        );
    }
    let rejected = get(stack, plan, user);
    stack.expect_status(&rejected, 429, &format!("{user} ({plan}) one over"));
    assert_eq!(
        rejected.header_u64("x-ratelimit-remaining"),
        0,
        "{rejected:?}"
    );
    rejected
}

#[test]
fn sliding_log_admits_exactly_the_limit_per_user() {
    let stack = start_stack();
    let rejected = admit_then_reject(&stack, "log", "alice", 3);
    assert_eq!(
        rejected.header("x-ratelimit-limit"),
        Some(r#"3, 3;w=3600;name="exact""#),
        "{rejected:?}"
    );
    // The oldest hit leaves the window in just under an hour.
    let reset = rejected.header_u64("x-ratelimit-reset");
    assert!(
        (3_590..=3_600).contains(&reset),
        "reset {reset}: {rejected:?}"
    );
    // Counted per user.
    admit_then_reject(&stack, "log", "bob", 3);
}

#[test]
fn leaky_bucket_admits_its_capacity_then_waits_for_the_drain() {
    let stack = start_stack();
    let rejected = admit_then_reject(&stack, "leaky", "carol", 2);
    // One hit drains per hour: room for the next one in (just under) an hour.
    let reset = rejected.header_u64("x-ratelimit-reset");
    assert!(
        (3_590..=3_600).contains(&reset),
        "reset {reset}: {rejected:?}"
    );
    admit_then_reject(&stack, "leaky", "dave", 2);
}
