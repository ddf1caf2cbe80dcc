//! The decision path end to end in memory, with a manual clock.

use super::*;
use crate::clock::ManualClock;
use crate::config::{LoadOptions, compile_str};
use crate::limit::Algorithm;
use crate::proto::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::store::MemoryStore;

const CONFIG: &str = "\
domain: edge
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2, name: per-user}
  - key: ip
    rate_limit: {unit: minute, requests_per_unit: 1, algorithm: fixed_window}
  - key: vip
    rate_limit: {unit: minute, requests_per_unit: 100, replaces: [{name: per-user}]}
  - key: internal
    rate_limit: {unlimited: true}
  - key: trial
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
";

const START: u64 = 1_000 * 60_000 + 5_000;

fn limiter(clock: &ManualClock) -> RateLimiter<MemoryStore, ManualClock> {
    let tree = compile_str("edge.yaml", CONFIG, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e:?}"));
    let config = RateLimitConfig::new([tree], Algorithm::SlidingWindow);
    let live = Arc::new(ArcSwapOption::from_pointee(config));
    RateLimiter::new(
        live,
        MemoryStore::new(10_000),
        clock.clone(),
        RequestBounds::default(),
    )
}

fn descriptor(pairs: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: pairs
            .iter()
            .map(|(key, value)| Entry {
                key: key.to_string(),
                value: value.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "edge".into(),
        descriptors,
        hits_addend: 0,
    }
}

fn decide(
    limiter: &RateLimiter<MemoryStore, ManualClock>,
    request: &RateLimitRequest,
) -> RateLimitResponse {
    // The memory store never waits, so a current-thread runtime is all the test needs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime
        .block_on(limiter.should_rate_limit(request))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn codes(response: &RateLimitResponse) -> Vec<Code> {
    response.statuses.iter().map(|s| s.code()).collect()
}

#[test]
fn statuses_line_up_with_descriptors_and_over_limit_wins_overall() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let req = request(vec![
        descriptor(&[("nolimit", "x")]),
        descriptor(&[("ip", "1.2.3.4")]),
    ]);
    let first = decide(&limiter, &req);
    assert_eq!(first.overall_code(), Code::Ok);
    assert_eq!(codes(&first), [Code::Ok, Code::Ok]);
    assert_eq!(first.statuses[0].current_limit, None, "no rule matched");
    let second = decide(&limiter, &req);
    assert_eq!(second.overall_code(), Code::OverLimit);
    assert_eq!(codes(&second), [Code::Ok, Code::OverLimit]);
}

#[test]
fn a_limited_status_reports_the_limit_remaining_and_reset() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let response = decide(&limiter, &request(vec![descriptor(&[("user", "alice")])]));
    let status = &response.statuses[0];
    let limit = status.current_limit.as_ref().expect("a limit");
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit()),
        (
            "per-user",
            2,
            crate::proto::rate_limit_response::rate_limit::Unit::Minute
        )
    );
    assert_eq!(status.limit_remaining, 1);
    assert_eq!(status.duration_until_reset.map(|d| d.seconds), Some(55));
}

#[test]
fn the_sliding_window_rejects_at_the_limit_and_recovers_as_time_slides() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let req = request(vec![descriptor(&[("user", "alice")])]);
    assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    let rejected = decide(&limiter, &req);
    assert_eq!(rejected.overall_code(), Code::OverLimit);
    // Two hits at 5 s into the window: one hit fits once half of them have slid out,
    // 30 s into the next window: 55 + 30 = 85 s.
    assert_eq!(
        rejected.statuses[0].duration_until_reset.map(|d| d.seconds),
        Some(85)
    );
    clock.advance(85_000);
    assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    // Other users are unaffected throughout.
    assert_eq!(
        decide(&limiter, &request(vec![descriptor(&[("user", "bob")])])).overall_code(),
        Code::Ok
    );
}

#[test]
fn unlimited_is_ok_with_max_remaining_and_never_counted() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    for _ in 0..10 {
        let response = decide(&limiter, &request(vec![descriptor(&[("internal", "x")])]));
        assert_eq!(response.overall_code(), Code::Ok);
        assert_eq!(response.statuses[0].limit_remaining, u32::MAX);
    }
    assert!(limiter.store().is_empty());
}

#[test]
fn shadow_mode_counts_but_reports_ok() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let req = request(vec![descriptor(&[("trial", "t")])]);
    decide(&limiter, &req);
    let over = decide(&limiter, &req);
    assert_eq!(over.overall_code(), Code::Ok);
    assert_eq!(
        over.statuses[0].limit_remaining, 0,
        "the counter is exhausted"
    );
}

#[test]
fn replaces_switches_off_the_named_limit_for_the_whole_request() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let req = request(vec![
        descriptor(&[("user", "alice")]),
        descriptor(&[("vip", "yes")]),
    ]);
    for _ in 0..5 {
        let response = decide(&limiter, &req);
        assert_eq!(response.overall_code(), Code::Ok);
        assert_eq!(
            response.statuses[0].current_limit, None,
            "per-user is replaced"
        );
    }
}

#[test]
fn hits_addend_request_zero_means_one_and_descriptor_zero_only_checks() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let mut req = request(vec![descriptor(&[("user", "carol")])]);
    req.hits_addend = 2;
    assert_eq!(decide(&limiter, &req).statuses[0].limit_remaining, 0);
    // A descriptor-level addend of 0 checks without counting, even over the request's 2.
    req.descriptors[0].hits_addend = Some(0);
    let check = decide(&limiter, &req);
    assert_eq!(check.overall_code(), Code::Ok);
    assert_eq!(check.statuses[0].limit_remaining, 0);
    // And a request-level 0 counts one hit.
    req.descriptors[0].hits_addend = None;
    req.hits_addend = 0;
    assert_eq!(decide(&limiter, &req).overall_code(), Code::OverLimit);
}

#[test]
fn a_request_limit_override_replaces_the_configured_limit() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let mut d = descriptor(&[("anything", "x")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 3,
        unit: crate::proto::envoy::r#type::v3::RateLimitUnit::Hour as i32,
    });
    let response = decide(&limiter, &request(vec![d]));
    let limit = response.statuses[0]
        .current_limit
        .as_ref()
        .expect("override limit");
    assert_eq!(limit.requests_per_unit, 3);
    assert_eq!(response.statuses[0].limit_remaining, 2);
}

#[test]
fn an_unknown_domain_is_ok_with_no_limit() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let mut req = request(vec![
        descriptor(&[("user", "a")]),
        descriptor(&[("ip", "b")]),
    ]);
    req.domain = "elsewhere".into();
    let response = decide(&limiter, &req);
    assert_eq!(codes(&response), [Code::Ok, Code::Ok]);
    assert!(response.statuses.iter().all(|s| s.current_limit.is_none()));
}

fn rejection(request: &RateLimitRequest) -> String {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    match runtime.block_on(limiter.should_rate_limit(request)) {
        Err(DecisionError::InvalidRequest(message)) => message,
        other => panic!("expected an invalid request, got {other:?}"),
    }
}

#[test]
fn malformed_requests_are_rejected_with_a_reason() {
    let mut empty_domain = request(vec![descriptor(&[("user", "a")])]);
    empty_domain.domain.clear();
    assert!(rejection(&empty_domain).contains("domain is empty"));
    assert!(rejection(&request(vec![])).contains("no descriptors"));
    assert!(
        rejection(&request(vec![descriptor(&[("", "a")])]))
            .contains("descriptor 0 entry 0 has an empty key")
    );
    assert!(rejection(&request(vec![descriptor(&[])])).contains("descriptor 0 has no entries"));
    let many = request(vec![descriptor(&[("user", "a")]); 65]);
    assert!(rejection(&many).contains("at most 64"));
    let long = "x".repeat(5_000);
    assert!(
        rejection(&request(vec![descriptor(&[("user", &long)])]))
            .contains("longer than 4096 bytes")
    );
    let mut bad_unit = descriptor(&[("user", "a")]);
    bad_unit.limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 0,
    });
    assert!(rejection(&request(vec![bad_unit])).contains("unit 0"));
}

#[test]
fn without_a_config_the_answer_is_a_clear_error() {
    let live: LiveConfig = Arc::new(ArcSwapOption::empty());
    let limiter = RateLimiter::new(
        live,
        MemoryStore::new(10),
        ManualClock::at(0),
        RequestBounds::default(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let result =
        runtime.block_on(limiter.should_rate_limit(&request(vec![descriptor(&[("user", "a")])])));
    assert!(matches!(result, Err(DecisionError::NoConfig)));
}
