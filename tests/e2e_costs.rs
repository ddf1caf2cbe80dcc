//! Requests that cost more than one hit, through a real Envoy: a route's fixed
//! `hits_addend`, and an LLM token budget charged after each response as Envoy AI Gateway
//! configures it — a peek of zero hits before the request, and the tokens the upstream
//! reports charged when the stream is done (`apply_on_stream_done`, `hits_addend` from
//! `%RESP(x-tokens-used)%`).
//!
//! Routes: tests/fixtures/envoy/ratelimit_costs.yaml. Limits: tests/fixtures/config_costs/.

mod common;

use std::time::Duration;

use common::stack::Stack;
use common::{avoid_window_edge, fixture, poll_until};

const DOMAIN: &str = "costs";

fn start() -> Stack {
    Stack::start(
        fixture("config_costs"),
        fixture("envoy/ratelimit_costs.yaml"),
        DOMAIN,
    )
}

/// The team's token budget as `/v1/usage` reports it: (used, over the limit).
fn budget(stack: &Stack, team: &str) -> (u64, bool) {
    let path = format!("/v1/usage?domain={DOMAIN}&descriptor=team={team}");
    let body = stack.meshlimit.admin_get(&path).json();
    let limit = &body["limits"][0];
    match (limit["used"].as_u64(), limit["overLimit"].as_bool()) {
        (Some(used), Some(over)) => (used, over),
        _ => panic!("no budget in {body}"),
    }
}

/// An LLM call by `team` whose response reports `tokens` used.
fn chat(stack: &Stack, team: &str, tokens: u64) -> u16 {
    let used = format!("x-tokens-used={tokens}");
    stack
        .get(
            "/v1/chat/completions",
            &[("x-team", team), ("x-respond-header", &used)],
        )
        .status
}

/// Waits for Envoy's charge after a response to reach the budget.
fn charged(stack: &Stack, team: &str, what: impl Fn((u64, bool)) -> bool, expected: &str) {
    let reached = poll_until(Duration::from_secs(10), || {
        what(budget(stack, team)).then_some(())
    });
    assert!(
        reached.is_some(),
        "{expected}: the budget is {:?}\n{}",
        budget(stack, team),
        stack.logs()
    );
}

#[test]
fn a_token_budget_charged_after_each_response_turns_the_team_away_once_spent() {
    avoid_window_edge(60, 15);
    let stack = start();

    // 1 000 tokens a minute. Two calls of 600: the first leaves 400; the second is let in
    // (the peek sees 600 spent) and its charge takes the team past the budget, which
    // counts (`count_rejected: true`).
    assert_eq!(chat(&stack, "a", 600), 200, "{}", stack.logs());
    charged(&stack, "a", |(used, _)| used == 600, "600 tokens charged");
    assert_eq!(chat(&stack, "a", 600), 200, "{}", stack.logs());
    charged(&stack, "a", |(_, over)| over, "1 200 tokens charged");

    // Spent: the peek before the next call turns it away, without charging anything.
    let turned_away = stack.get(
        "/v1/chat/completions",
        &[("x-team", "a"), ("x-respond-header", "x-tokens-used=600")],
    );
    stack.expect_status(&turned_away, 429, "the third call, over the budget");
    assert_eq!(turned_away.header("x-ratelimit-remaining"), Some("0"));
    // Another team's budget is its own.
    assert_eq!(chat(&stack, "b", 10), 200, "{}", stack.logs());
    charged(&stack, "b", |(used, _)| used == 10, "team b's 10 tokens");
    // The upstream saw the three calls let through, not the one turned away.
    assert_eq!(stack.upstream.received().len(), 3);
}

#[test]
fn a_token_bucket_charged_past_its_budget_owes_the_difference() {
    let stack = start();
    // 1 000 tokens a minute, refilled continuously. Two calls of 900: the second is let in
    // (900 of 1 000 used) and its charge puts the bucket 800 tokens in debt, about 48 s of
    // refill, during which every peek turns the team away.
    let wait = overspent_by_800(&stack, "bucket-a");
    assert!(
        (30..=50).contains(&wait),
        "the debt of 800 tokens takes about 48 s to refill, less the time since: {wait} s"
    );
}

#[test]
fn a_leaky_bucket_charged_past_its_capacity_overflows_until_it_drains() {
    let stack = start();
    // Holds 1 000 tokens, drains 1 000 a minute. Two calls of 900: the second is let in
    // (900 held) and its charge overfills the bucket to about 1 800, 800 over, which
    // takes about 48 s to drain, during which every call is turned away.
    let wait = overspent_by_800(&stack, "leaky-a");
    assert!(
        (30..=50).contains(&wait),
        "800 tokens over take about 48 s to drain, less the time since: {wait} s"
    );
}

/// Two calls of 900 tokens by `team`, each let in, the second's charge taking the team
/// 800 past a budget of 1 000; then a call turned away, and the seconds its
/// `x-ratelimit-reset` says to wait. The upstream saw only the two.
fn overspent_by_800(stack: &Stack, team: &str) -> u64 {
    assert_eq!(chat(stack, team, 900), 200, "{}", stack.logs());
    charged(stack, team, |(used, _)| used >= 850, "900 tokens charged");
    assert_eq!(chat(stack, team, 900), 200, "{}", stack.logs());
    charged(stack, team, |(_, over)| over, "1 800 tokens charged");
    let turned_away = stack.get(
        "/v1/chat/completions",
        &[("x-team", team), ("x-respond-header", "x-tokens-used=1")],
    );
    stack.expect_status(&turned_away, 429, "a call while the team is over");
    assert_eq!(stack.upstream.received().len(), 2);
    // /v1/usage says how far over: 800, less the ~17 a second refilled since.
    let path = format!("/v1/usage?domain={DOMAIN}&descriptor=team={team}");
    let body = stack.meshlimit.admin_get(&path).json();
    let owed = body["limits"][0]["owed"].as_u64();
    assert!(
        owed.is_some_and(|owed| (600..=800).contains(&owed)),
        "owed {owed:?} after charging 800 past the budget: {body}"
    );
    turned_away
        .header("x-ratelimit-reset")
        .and_then(|reset| reset.parse().ok())
        .unwrap_or_else(|| panic!("no reset on {turned_away:?}"))
}

#[test]
fn a_route_that_costs_five_hits_spends_a_limit_of_ten_in_two_requests() {
    avoid_window_edge(60, 5);
    let stack = start();
    let export = |team: &str| stack.get("/export", &[("x-team", team)]);
    let first = export("a");
    stack.expect_status(&first, 200, "the first export");
    assert_eq!(first.header("x-ratelimit-remaining"), Some("5"));
    stack.expect_status(&export("a"), 200, "the second export");
    stack.expect_status(&export("a"), 429, "the third export: 15 of 10");
    stack.expect_status(&export("b"), 200, "another team's export");
}
