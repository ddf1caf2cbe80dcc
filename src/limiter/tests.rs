//! The decision path end to end in memory, with a manual clock.

use super::*;
use crate::clock::ManualClock;
use crate::config::{LoadOptions, compile_str};
use crate::limit::Algorithm;
use crate::proto::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::store::MemoryStore;
use std::collections::BTreeMap;

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

/// `--global-shadow-mode`.
const GLOBAL_SHADOW: GlobalModes = GlobalModes {
    shadow: true,
    quota: false,
    spare_when_turned_away: false,
};

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

/// What Envoy sends when a `rate_limits` entry's actions were all skipped (a header
/// action with `skip_if_absent` and no header): a descriptor with no entries. It has no
/// limit, and the others still count; an error would let the whole request through a
/// fail-open Envoy.
#[test]
fn a_descriptor_with_no_entries_has_no_limit_and_the_others_count() {
    let clock = ManualClock::at(START);
    let limiter = limiter(&clock);
    let req = request(vec![descriptor(&[]), descriptor(&[("user", "a")])]);
    let first = decide(&limiter, &req);
    assert_eq!(codes(&first), [Code::Ok, Code::Ok]);
    assert!(first.statuses[0].current_limit.is_none());
    let counted = first.statuses[1].limit_remaining;
    let second = decide(&limiter, &req);
    assert_eq!(second.statuses[1].limit_remaining, counted - 1);
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

/// Requests for a domain no config defines (a typo in Envoy's `domain`) are counted by
/// domain, under meshlimit's name and envoyproxy/ratelimit's statsd one.
#[test]
fn requests_for_an_unknown_domain_are_counted_by_domain() {
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let mut req = request(vec![descriptor(&[("user", "a")])]);
    req.domain = "egde".into();
    for _ in 0..3 {
        assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    }
    decide(&limiter, &request(vec![descriptor(&[("user", "a")])]));
    let text = metrics.render();
    assert!(
        text.contains("meshlimit_unknown_domain_requests_total{domain=\"egde\"} 3\n"),
        "{text}"
    );
    assert!(!text.contains("domain=\"edge\"} 1\n"), "{text}");
    let statsd = metrics.statsd_counters();
    assert!(
        statsd.contains(&(
            "ratelimit.service.rate_limit.egde.domain_not_found".to_owned(),
            3
        )),
        "{statsd:?}"
    );
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
    let many = request(vec![descriptor(&[("user", "a")]); 65]);
    assert!(rejection(&many).contains("at most 64"));
    let long = "x".repeat(5_000);
    assert!(
        rejection(&request(vec![descriptor(&[(&long, "a")])]))
            .contains("descriptor 0 entry 0 has a key longer than 4096 bytes")
    );
    let mut bad_unit = descriptor(&[("user", "a")]);
    bad_unit.limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 0,
    });
    assert!(rejection(&request(vec![bad_unit])).contains("unit 0"));
}

#[test]
fn a_value_over_the_entry_bound_is_counted_under_its_digest_and_matched_whole() {
    let clock = ManualClock::at(START);
    let tree = compile_str(
        "edge.yaml",
        "domain: edge\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 2}\n  - key: path\n    value: \"*.iso\"\n    rate_limit: {unit: minute, requests_per_unit: 1}\n",
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let live = Arc::new(ArcSwapOption::from_pointee(RateLimitConfig::new(
        [tree],
        Algorithm::SlidingWindow,
    )));
    let limiter = RateLimiter::new(
        live,
        MemoryStore::new(10_000),
        clock.clone(),
        RequestBounds::default(),
    );
    let long = "x".repeat(5_000);
    let user = |value: &str| request(vec![descriptor(&[("user", value)])]);
    let decided: Vec<Code> = (0..3)
        .map(|_| decide(&limiter, &user(&long)).overall_code())
        .collect();
    assert_eq!(decided, [Code::Ok, Code::Ok, Code::OverLimit]);
    // The same first bytes and another end: another client.
    assert_eq!(
        decide(&limiter, &user(&format!("{long}y"))).overall_code(),
        Code::Ok
    );
    // A wildcard sees the whole value, its end included.
    let iso = request(vec![descriptor(&[("path", &format!("{long}.iso"))])]);
    assert_eq!(decide(&limiter, &iso).overall_code(), Code::Ok);
    assert_eq!(decide(&limiter, &iso).overall_code(), Code::OverLimit);
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

/// What clients and upstreams see: headers, bodies, soft limits, penalties, shedding.
mod presentation {
    use super::*;
    use crate::config::load_dir;
    use crate::response::ResponseSettings;
    use crate::rule::HeaderSet;

    const TIERS: &str = "\
domain: tiers
capacity: {requests_per_unit: 10, unit: second}
policies:
  free:
    limits: [{requests_per_unit: 100, unit: minute}]
    priority: 0
  enterprise:
    limits: [{requests_per_unit: 100, unit: minute}]
    priority: 10
    reserved: 0.4
  tokens:
    limits: [{requests_per_unit: 100, unit: minute}]
    count_rejected: true
descriptors:
  - key: plan
    value: free
    policy: free
    descriptors: [{key: user}]
  - key: plan
    value: enterprise
    policy: enterprise
    descriptors: [{key: user}]
  - key: plan
    value: tiny
    limits: [{requests_per_unit: 1, unit: minute}]
    descriptors: [{key: user}]
  - key: plan
    value: internal
    unlimited: true
  - key: team
    policy: tokens
";

    const POLICIES: &str = "\
domain: api
policies:
  plain:
    limits: [{requests_per_unit: 1, unit: minute}]
  reports:
    name: reports
    limits: [{requests_per_unit: 10, unit: minute}]
    soft_limit: 0.8
    headers: [ietf, legacy, retry-after]
  beta:
    limits: [{requests_per_unit: 1, unit: minute}]
    mode: warn
  login:
    name: login
    limits: [{requests_per_unit: 2, unit: minute}]
    penalty: {after: 2, within: 1m, block_for: 15m}
    body: 'too many logins, retry in {retry_after_seconds}s'
    body_content_type: text/plain
  export:
    limits: [{requests_per_unit: 2, unit: minute}]
    penalty: {after: 1, within: 1m, block_for: 10s}
descriptors:
  - key: plain
    policy: plain
  - key: report
    policy: reports
  - key: beta
    policy: beta
  - key: login
    policy: login
  - key: export
    policy: export
";

    fn api_limiter(
        clock: &ManualClock,
        settings: ResponseSettings,
    ) -> RateLimiter<MemoryStore, ManualClock> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api.yaml"), POLICIES).unwrap();
        std::fs::write(dir.path().join("tiers.yaml"), TIERS).unwrap();
        let config =
            load_dir(dir.path(), &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        let live = Arc::new(ArcSwapOption::from_pointee(config));
        RateLimiter::new(
            live,
            MemoryStore::new(10_000),
            clock.clone(),
            RequestBounds::default(),
        )
        .with_presentation(settings)
    }

    fn api(pairs: &[(&str, &str)]) -> RateLimitRequest {
        RateLimitRequest {
            domain: "api".into(),
            descriptors: vec![descriptor(pairs)],
            hits_addend: 0,
        }
    }

    fn headers(response: &RateLimitResponse) -> Vec<(String, String)> {
        response
            .response_headers_to_add
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect()
    }

    fn upstream_headers(response: &RateLimitResponse) -> Vec<(String, String)> {
        response
            .request_headers_to_add
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect()
    }

    fn h(key: &str, value: &str) -> (String, String) {
        (key.to_owned(), value.to_owned())
    }

    #[test]
    fn ietf_and_legacy_headers_report_the_deciding_limit() {
        let clock = ManualClock::at(START);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let response = decide(&limiter, &api(&[("report", "r1")]));
        assert_eq!(
            headers(&response),
            [
                h("RateLimit-Policy", "\"reports\";q=10;w=60"),
                h("RateLimit", "\"reports\";r=9;t=55"),
                h("X-RateLimit-Limit", "10"),
                h("X-RateLimit-Remaining", "9"),
                h("X-RateLimit-Reset", "55"),
            ]
        );
    }

    #[test]
    fn a_rejection_gets_retry_after_and_a_json_body() {
        let clock = ManualClock::at(START);
        let settings = ResponseSettings {
            headers: HeaderSet {
                retry_after: true,
                ..HeaderSet::default()
            },
            ..ResponseSettings::default()
        };
        let limiter = api_limiter(&clock, settings);
        let req = api(&[("plain", "u")]);
        decide(&limiter, &req);
        let over = decide(&limiter, &req);
        assert_eq!(over.overall_code(), Code::OverLimit);
        let headers = headers(&over);
        assert!(
            headers.contains(&h("content-type", "application/json")),
            "{headers:?}"
        );
        let retry = headers
            .iter()
            .find(|(k, _)| k == "Retry-After")
            .map(|(_, v)| v.clone())
            .expect("Retry-After");
        let body = String::from_utf8(over.raw_body.clone()).unwrap();
        assert!(
            body.starts_with("{\"error\":\"too_many_requests\""),
            "{body}"
        );
        assert!(
            body.contains(&format!("\"retry_after_seconds\":{retry}")),
            "{body}"
        );
        assert!(
            body.contains("\"policy\":\"plain\",\"limit\":1,\"window_seconds\":60"),
            "{body}"
        );
    }

    /// Two descriptors over their limits: the request is turned away until both reset,
    /// so Retry-After and the body name the later, not the first in the request.
    #[test]
    fn retry_after_is_the_latest_reset_of_the_descriptors_that_turn_a_request_away() {
        let clock = ManualClock::at(START);
        let settings = ResponseSettings {
            headers: HeaderSet {
                retry_after: true,
                ..HeaderSet::default()
            },
            ..ResponseSettings::default()
        };
        let limiter = api_limiter(&clock, settings);
        let req = RateLimitRequest {
            descriptors: vec![descriptor(&[("plain", "u")]), descriptor(&[("login", "u")])],
            ..api(&[])
        };
        // The first passes; then `plain` (1 a minute) is over, and from the fourth `login`
        // too, rejected twice within a minute: blocked for 15 minutes.
        let mut last = None;
        for _ in 0..5 {
            last = Some(decide(&limiter, &req));
        }
        let over = last.unwrap();
        assert_eq!(over.overall_code(), Code::OverLimit);
        assert!(over.statuses.iter().all(|s| s.code() == Code::OverLimit));
        let retry: u64 = headers(&over)
            .iter()
            .find(|(k, _)| k == "Retry-After")
            .and_then(|(_, v)| v.parse().ok())
            .expect("Retry-After");
        assert!((14 * 60..=15 * 60).contains(&retry), "{retry}");
        let body = String::from_utf8(over.raw_body.clone()).unwrap();
        assert_eq!(body, format!("too many logins, retry in {retry}s"));
    }

    #[test]
    fn an_admitted_request_carries_no_body_and_no_retry_after() {
        let clock = ManualClock::at(START);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let ok = decide(&limiter, &api(&[("plain", "u")]));
        assert!(ok.raw_body.is_empty());
        assert!(headers(&ok).is_empty(), "{:?}", headers(&ok));
    }

    #[test]
    fn soft_limit_tells_the_upstream_before_the_hard_limit() {
        let clock = ManualClock::at(START);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let req = api(&[("report", "r")]);
        let signals: Vec<bool> = (0..10)
            .map(|_| !upstream_headers(&decide(&limiter, &req)).is_empty())
            .collect();
        // 8 of 10 used is 80%: the 8th, 9th and 10th requests are flagged, all admitted.
        assert_eq!(
            signals,
            [
                false, false, false, false, false, false, false, true, true, true
            ]
        );
        assert_eq!(
            upstream_headers(&decide(&limiter, &api(&[("report", "s")]))),
            []
        );
        let fresh = api_limiter(&clock, ResponseSettings::default());
        (0..7).for_each(|_| {
            decide(&fresh, &req);
        });
        let eighth = decide(&fresh, &req);
        assert_eq!(eighth.overall_code(), Code::Ok);
        assert_eq!(
            upstream_headers(&eighth),
            [h("x-meshlimit-soft-limit", "reports")]
        );
    }

    #[test]
    fn warn_mode_admits_over_the_limit_and_marks_the_request() {
        let clock = ManualClock::at(START);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let req = api(&[("beta", "b")]);
        decide(&limiter, &req);
        let over = decide(&limiter, &req);
        assert_eq!(over.overall_code(), Code::Ok);
        assert_eq!(
            upstream_headers(&over),
            [h("x-meshlimit-soft-limit", "beta;over")]
        );
    }

    #[test]
    fn the_penalty_box_locks_out_and_lets_back_in_with_a_custom_body() {
        let clock = ManualClock::at(START);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let req = api(&[("login", "10.0.0.1")]);
        let codes: Vec<Code> = (0..4)
            .map(|_| decide(&limiter, &req).overall_code())
            .collect();
        assert_eq!(
            codes,
            [Code::Ok, Code::Ok, Code::OverLimit, Code::OverLimit]
        );
        // Two minutes later the per-minute limit would admit again, but the block holds.
        clock.advance(120_000);
        let blocked = decide(&limiter, &req);
        assert_eq!(blocked.overall_code(), Code::OverLimit);
        assert_eq!(
            blocked.statuses[0].duration_until_reset.map(|d| d.seconds),
            Some(15 * 60 - 120)
        );
        assert_eq!(
            String::from_utf8(blocked.raw_body.clone()).unwrap(),
            "too many logins, retry in 780s"
        );
        assert!(headers(&blocked).contains(&h("content-type", "text/plain")));
        // Another address is unaffected; after the block the address is let back in.
        assert_eq!(
            decide(&limiter, &api(&[("login", "10.0.0.2")])).overall_code(),
            Code::Ok
        );
        clock.advance(15 * 60_000);
        assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    }

    #[test]
    fn a_client_that_waits_out_a_short_block_is_let_in_not_blocked_again() {
        // 2 a minute, a 10 s block after one rejection: the block holds until the minute's
        // limit lets the client in, so coming back when told never meets the limit again.
        let clock = ManualClock::at(START - START % 60_000 + 5_000);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let req = api(&[("export", "u")]);
        assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
        assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
        let rejected = decide(&limiter, &req);
        assert_eq!(rejected.overall_code(), Code::OverLimit);
        let wait = rejected.statuses[0].duration_until_reset.unwrap().seconds as u64;
        assert!(
            wait > 10,
            "the limit's own wait, past the 10 s block: {wait}"
        );
        clock.advance(11_000);
        let blocked = decide(&limiter, &req);
        assert_eq!(blocked.overall_code(), Code::OverLimit);
        assert_eq!(
            blocked.statuses[0]
                .duration_until_reset
                .map(|d| d.seconds as u64),
            Some(wait - 11)
        );
        clock.advance((wait - 11) * 1_000);
        assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    }

    #[test]
    fn a_low_priority_flood_leaves_the_reserved_share_to_enterprise() {
        // Capacity 10/s; enterprise reserves 40%: free may fill at most 6.
        let clock = ManualClock::at(START - START % 1_000);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let api = |pairs: &[(&str, &str)]| RateLimitRequest {
            domain: "tiers".into(),
            ..api(pairs)
        };
        let free_admitted = (0..50)
            .filter(|i| {
                decide(
                    &limiter,
                    &api(&[("plan", "free"), ("user", &format!("f{i}"))]),
                )
                .overall_code()
                    == Code::Ok
            })
            .count();
        assert_eq!(free_admitted, 6);
        let enterprise_admitted = (0..10)
            .filter(|i| {
                decide(
                    &limiter,
                    &api(&[("plan", "enterprise"), ("user", &format!("e{i}"))]),
                )
                .overall_code()
                    == Code::Ok
            })
            .count();
        assert_eq!(
            enterprise_admitted, 4,
            "enterprise gets the reserved share the flood could not take"
        );
        let shed = decide(&limiter, &api(&[("plan", "free"), ("user", "late")]));
        assert_eq!(
            shed.statuses[0]
                .current_limit
                .as_ref()
                .map(|l| l.name.as_str()),
            Some("capacity")
        );
    }

    /// A tiers request: `plan` and `user`.
    fn tiers(plan: &str, user: &str) -> RateLimitRequest {
        RateLimitRequest {
            domain: "tiers".into(),
            ..api(&[("plan", plan), ("user", user)])
        }
    }

    fn admitted(limiter: &RateLimiter<MemoryStore, ManualClock>, requests: usize) -> usize {
        (0..requests)
            .filter(|i| {
                decide(limiter, &tiers("free", &format!("f{i}"))).overall_code() == Code::Ok
            })
            .count()
    }

    #[test]
    fn requests_their_own_limit_turns_away_take_no_capacity() {
        let clock = ManualClock::at(START - START % 1_000);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        // One client at 1 a minute, retrying 20 times within the second: 19 rejections of
        // its own, none of them load on the upstream.
        let tiny: Vec<Code> = (0..20)
            .map(|_| decide(&limiter, &tiers("tiny", "t")).overall_code())
            .collect();
        assert_eq!(tiny.iter().filter(|c| **c == Code::Ok).count(), 1);
        // Free may still fill 6 of 10, less the one tiny request admitted.
        assert_eq!(admitted(&limiter, 20), 5);
    }

    #[test]
    fn requests_no_limit_applies_to_are_neither_shed_nor_counted() {
        let clock = ManualClock::at(START - START % 1_000);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        assert_eq!(admitted(&limiter, 20), 6, "the free share is full");
        assert_eq!(
            decide(&limiter, &tiers("internal", "ops")).overall_code(),
            Code::Ok,
            "`unlimited: true`: never counted"
        );
        let unmatched = RateLimitRequest {
            domain: "tiers".into(),
            ..api(&[("route", "/health")])
        };
        assert_eq!(decide(&limiter, &unmatched).overall_code(), Code::Ok);
        // Neither took any of the enterprise share.
        let enterprise = (0..10)
            .filter(|i| {
                decide(&limiter, &tiers("enterprise", &format!("e{i}"))).overall_code() == Code::Ok
            })
            .count();
        assert_eq!(enterprise, 4);
    }

    #[test]
    fn a_cost_charged_while_shed_still_reaches_a_budget_that_counts_every_hit() {
        let clock = ManualClock::at(START - START % 1_000);
        let limiter = api_limiter(&clock, ResponseSettings::default());
        let team = |hits: u64| {
            let mut request = RateLimitRequest {
                domain: "tiers".into(),
                ..api(&[("team", "a")])
            };
            request.descriptors[0].hits_addend = Some(hits);
            request
        };
        assert_eq!(admitted(&limiter, 20), 6);
        // Four charges of 30 tokens after their responses (Envoy's apply_on_stream_done),
        // each shed: the tokens were spent all the same.
        for _ in 0..4 {
            assert_eq!(decide(&limiter, &team(30)).overall_code(), Code::OverLimit);
        }
        // Once the capacity has room again, the team's peek finds 120 of 100 spent.
        clock.advance(3_000);
        let peek = decide(&limiter, &team(0));
        assert_eq!(peek.overall_code(), Code::OverLimit, "{peek:?}");
        assert_ne!(
            peek.statuses[0]
                .current_limit
                .as_ref()
                .map(|l| l.name.as_str()),
            Some("capacity")
        );
    }

    #[test]
    fn global_shadow_mode_lets_a_shed_request_pass() {
        let clock = ManualClock::at(START - START % 1_000);
        let limiter =
            api_limiter(&clock, ResponseSettings::default()).with_global_modes(GLOBAL_SHADOW);
        let free = |i: usize| RateLimitRequest {
            domain: "tiers".into(),
            ..api(&[("plan", "free"), ("user", &format!("f{i}"))])
        };
        // Free may fill 6 of the capacity of 10; the rest would be shed.
        let answers: Vec<_> = (0..8).map(|i| decide(&limiter, &free(i))).collect();
        assert!(answers.iter().all(|a| a.overall_code() == Code::Ok));
        let shed = &answers[7];
        assert_eq!(shed.statuses[0].code(), Code::OverLimit, "{shed:?}");
        assert!(
            shed.raw_body.is_empty(),
            "no 429 body for a request that passes"
        );
        assert_eq!(
            limiter.metrics().global_shadow_mode.load(Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn dynamic_metadata_summarises_the_decision() {
        let clock = ManualClock::at(START);
        let settings = ResponseSettings {
            dynamic_metadata: true,
            ..ResponseSettings::default()
        };
        let limiter = api_limiter(&clock, settings);
        let mut req = api(&[("report", "r")]);
        req.hits_addend = 2;
        let response = decide(&limiter, &req);
        let metadata = response.dynamic_metadata.expect("metadata");
        let text = format!("{metadata:?}");
        assert!(text.contains("\"meshlimit\""), "{text}");
        assert!(text.contains("StringValue(\"reports\")"), "{text}");
        assert!(text.contains("StringValue(\"OK\")"), "{text}");
        // envoyproxy/ratelimit's own layout at the top: entries as key=value strings.
        let top: Vec<&str> = metadata.fields.keys().map(String::as_str).collect();
        assert_eq!(
            top,
            ["descriptors", "domain", "hitsAddend", "meshlimit"],
            "{text}"
        );
        assert!(text.contains("StringValue(\"report=r\")"), "{text}");
    }
}

#[test]
fn decisions_move_the_rule_counters_named_like_envoyproxy_ratelimit() {
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(CONFIG, &clock, 0.5);
    let req = request(vec![descriptor(&[("user", "alice")])]);
    for _ in 0..3 {
        decide(&limiter, &req);
    }
    decide(&limiter, &request(vec![descriptor(&[("trial", "t")])]));
    decide(&limiter, &request(vec![descriptor(&[("trial", "t")])]));
    let text = metrics.render();
    for line in [
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"user\",key1=\"user\"} 3",
        "ratelimit_service_rate_limit_within_limit{domain=\"edge\",key=\"user\",key1=\"user\"} 2",
        "ratelimit_service_rate_limit_over_limit{domain=\"edge\",key=\"user\",key1=\"user\"} 1",
        // The second hit of a limit of 2 passes half of it.
        "ratelimit_service_rate_limit_near_limit{domain=\"edge\",key=\"user\",key1=\"user\"} 1",
        "ratelimit_service_rate_limit_shadow_mode{domain=\"edge\",key=\"trial\",key1=\"trial\"} 1",
        "meshlimit_decision_duration_seconds_count 5",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
}

/// The fields envoyproxy/ratelimit added in 2025–26, so configs using them migrate whole.
const COMPAT_FIELDS: &str = "\
domain: edge
descriptors:
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: files_no_share
    value: files/*
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: route
    value: api/*
    share_threshold: true
    descriptors:
      - key: method
        value_to_metric: true
        rate_limit: {unit: minute, requests_per_unit: 60}
  - key: user
    value_to_metric: true
    descriptors:
      - key: action
        value: read*
        value_to_metric: true
        descriptors:
          - key: resource
            rate_limit: {unit: minute, requests_per_unit: 60}
  - key: soft
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: soft_big
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: tenant
    metadata: {owner: {team: payments, oncall: pay-oncall}, tier: gold}
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: zone
    metadata: {owner: {team: platform, site: eu-1}, zone_limited: true}
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: region
    metadata: {region_limited: true}
    rate_limit: {unlimited: true}
  - key: client
    descriptors:
      - key: path
        value: /api/*
        detailed_metric: true
        value_to_metric: true
        rate_limit: {unit: minute, requests_per_unit: 60}
  - key: bucket
    value: b*
    share_threshold: true
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 60}
";

/// A limiter on `config`, recording into the returned metrics; hits past
/// `near_limit_ratio` of a limit count as near it.
fn limiter_with_metrics(
    config: &str,
    clock: &ManualClock,
    near_limit_ratio: f64,
) -> (
    RateLimiter<MemoryStore, ManualClock>,
    Arc<crate::metrics::Metrics>,
) {
    let tree = compile_str("edge.yaml", config, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e:?}"));
    let config = RateLimitConfig::new([tree], Algorithm::SlidingWindow);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    metrics.attach(&config);
    let live = Arc::new(ArcSwapOption::from_pointee(config));
    let limiter = RateLimiter::new(
        live,
        MemoryStore::new(100),
        clock.clone(),
        RequestBounds::default(),
    )
    .with_metrics(metrics.clone(), near_limit_ratio);
    (limiter, metrics)
}

#[test]
fn share_threshold_counts_every_value_of_its_wildcard_on_one_counter() {
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let one =
        |key: &str, value: &str| decide(&limiter, &request(vec![descriptor(&[(key, value)])]));
    assert_eq!(one("files", "files/a.pdf").overall_code(), Code::Ok);
    assert_eq!(one("files", "files/b.csv").overall_code(), Code::Ok);
    // A third file, never seen before, finds the shared threshold used up.
    let third = one("files", "files/c.txt");
    assert_eq!(third.overall_code(), Code::OverLimit);
    assert_eq!(third.statuses[0].limit_remaining, 0);
    // Without share_threshold each value has its own threshold.
    for value in ["files/a.pdf", "files/b.csv", "files/c.txt"] {
        assert_eq!(
            one("files_no_share", value).overall_code(),
            Code::Ok,
            "{value}"
        );
    }
    // Sharing also holds when the limit sits on a node below the wildcard: every api/*
    // route's GETs count together, other methods apart.
    let route = |path: &str, method: &str| {
        let req = request(vec![descriptor(&[("route", path), ("method", method)])]);
        decide(&limiter, &req).statuses[0].limit_remaining
    };
    assert_eq!(route("api/v1", "GET"), 59);
    assert_eq!(route("api/v2", "GET"), 58);
    assert_eq!(route("api/v2", "POST"), 59);
}

/// A descriptor over two of its limits reports the one that resets last: a client told
/// the earlier reset would come back to another rejection.
#[test]
fn of_a_descriptors_limits_over_at_once_the_one_resetting_last_decides() {
    let config = "\
domain: edge
descriptors:
  - key: burst
    algorithm: fixed_window
    limits: [{requests_per_unit: 1, per: 2s}, {requests_per_unit: 2, unit: hour}]
";
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(config, &clock, 0.8);
    let req = request(vec![descriptor(&[("burst", "b")])]);
    assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    clock.advance(2_200);
    assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    // Over both: one per 2 s, and two an hour.
    let over = decide(&limiter, &req);
    let status = &over.statuses[0];
    assert_eq!(status.code(), Code::OverLimit);
    let limit = status.current_limit.as_ref().expect("current_limit");
    assert_eq!(
        (limit.requests_per_unit, limit.unit()),
        (2, crate::proto::rate_limit_response::rate_limit::Unit::Hour)
    );
    let reset = status.duration_until_reset.expect("duration_until_reset");
    let hour_left = 3_600 - (START + 2_200) / 1_000 % 3_600;
    assert_eq!(reset.seconds as u64, hour_left, "{reset:?}");
}

#[test]
fn detailed_metric_counts_each_request_under_all_its_values() {
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let call = |client: &str, path: &str| {
        decide(
            &limiter,
            &request(vec![descriptor(&[("client", client), ("path", path)])]),
        )
    };
    call("web", "/api/a");
    call("web", "/api/a");
    call("web", "/api/b");
    call("ios", "/api/a");
    for bucket in ["b1", "b2"] {
        decide(&limiter, &request(vec![descriptor(&[("bucket", bucket)])]));
    }
    let text = metrics.render();
    for line in [
        // Every entry with the request's value, `value_to_metric` or not (envoyproxy/
        // ratelimit's detailed key); key1 and key2 as its Prometheus mapping labels them.
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client_web.path_/api/a\",key1=\"client_web\",key2=\"path_/api/a\"} 2",
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client_web.path_/api/b\",key1=\"client_web\",key2=\"path_/api/b\"} 1",
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client_ios.path_/api/a\",key1=\"client_ios\",key2=\"path_/api/a\"} 1",
        // In place of the rule's own series, so a sum over the domain counts each hit once.
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client.path_/api/*\",key1=\"client\",key2=\"path_/api/*\"} 0",
        // Values sharing one counter share one series.
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"bucket_b*\",key1=\"bucket_b*\"} 2",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    let sum: u64 = text
        .lines()
        .filter(|line| {
            line.starts_with("ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(sum, 4, "{text}");
    // statsd gets the same keys.
    let statsd = metrics.statsd_counters();
    assert!(
        statsd.contains(&(
            "ratelimit.service.rate_limit.edge.client_web.path_/api/a.total_hits".to_owned(),
            2
        )),
        "{statsd:?}"
    );
}

/// A request from `client` on `/api/a`, which the detailed `client`/`path` rule counts.
fn call_api_a(limiter: &RateLimiter<MemoryStore, ManualClock>, client: &str) {
    decide(
        limiter,
        &request(vec![descriptor(&[("client", client), ("path", "/api/a")])]),
    );
}

/// The `total_hits` series of the detailed `client`/`path` rule, by key.
fn client_series(metrics: &crate::metrics::Metrics) -> BTreeMap<String, u64> {
    let prefix = "ratelimit.service.rate_limit.edge.client";
    metrics
        .statsd_counters()
        .into_iter()
        .filter_map(|(name, value)| {
            let key = name.strip_prefix(prefix)?.strip_suffix(".total_hits")?;
            Some((format!("client{key}"), value))
        })
        .collect()
}

#[test]
fn idle_detailed_series_make_room_for_new_values_at_the_cap() {
    use crate::metrics::{IDLE_KEYED_SERIES_MILLIS, KEYS_WITH_VALUES_CAP};
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let call = |client: &str| call_api_a(&limiter, client);
    for i in 0..KEYS_WITH_VALUES_CAP {
        call(&format!("c{i}"));
    }
    // Half the idle time later c0 is still in use; the rule is full, so a new client
    // counts in the rule's own series.
    clock.advance(IDLE_KEYED_SERIES_MILLIS / 2);
    call("c0");
    call("early");
    let series = client_series(&metrics);
    assert_eq!(series.len(), KEYS_WITH_VALUES_CAP + 1);
    assert_eq!(series.get("client.path_/api/*"), Some(&1));
    assert_eq!(series.get("client_early.path_/api/a"), None);
    // Once the others have been idle for the idle time, a new client takes a series of
    // its own, and theirs are gone; c0's, hit since, stays with both its hits.
    clock.advance(IDLE_KEYED_SERIES_MILLIS / 2);
    call("late");
    let series = client_series(&metrics);
    assert_eq!(
        series,
        BTreeMap::from([
            ("client.path_/api/*".to_owned(), 1),
            ("client_c0.path_/api/a".to_owned(), 2),
            ("client_late.path_/api/a".to_owned(), 1),
        ])
    );
    let text = metrics.render();
    assert!(!text.contains("client_c1.path"), "{text}");
    assert!(
        text.contains("ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client_late.path_/api/a\",key1=\"client_late\",key2=\"path_/api/a\"} 1"),
        "{text}"
    );
}

/// Under a statsd_exporter mapping, series add up what maps to them: one losing a part
/// would go down, so keyed series stay (capped) as statsd_exporter keeps them.
#[test]
fn detailed_series_stay_under_a_statsd_exporter_mapping() {
    use crate::metrics::{EnvoyproxyNames, IDLE_KEYED_SERIES_MILLIS, KEYS_WITH_VALUES_CAP};
    use crate::prometheus_mapping::PrometheusMapping;
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let mapping = PrometheusMapping::parse(
        "mapper.yaml",
        "mappings:\n  - match: ratelimit.service.rate_limit.*.*.*.total_hits\n    name: rl_hits\n    labels: {domain: $1}\n",
    )
    .unwrap();
    metrics.set_names(EnvoyproxyNames::Mapped(Box::new(mapping)));
    let call = |client: &str| call_api_a(&limiter, client);
    for i in 0..KEYS_WITH_VALUES_CAP {
        call(&format!("c{i}"));
    }
    clock.advance(2 * IDLE_KEYED_SERIES_MILLIS);
    call("late");
    let series = client_series(&metrics);
    assert_eq!(series.len(), KEYS_WITH_VALUES_CAP + 1);
    assert_eq!(series.get("client.path_/api/*"), Some(&1));
    assert_eq!(series.get("client_c1.path_/api/a"), Some(&1));
    // Every hit is still in the domain's sum.
    let hits = KEYS_WITH_VALUES_CAP + 1;
    let text = metrics.render();
    assert!(
        text.contains(&format!("rl_hits{{domain=\"edge\"}} {hits}\n")),
        "{text}"
    );
}

/// A descriptor carrying its own `limit` (Envoy's override) counts under its entries with
/// their values, where envoyproxy/ratelimit counts it, so its dashboards see the hits.
#[test]
fn hits_under_a_limit_override_count_under_the_descriptors_entries() {
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let mut d = descriptor(&[("client", "web"), ("path", "/api/x")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: crate::proto::envoy::r#type::v3::RateLimitUnit::Minute as i32,
    });
    let req = request(vec![d]);
    let codes: Vec<Code> = (0..3)
        .map(|_| decide(&limiter, &req).overall_code())
        .collect();
    assert_eq!(codes, [Code::Ok, Code::OverLimit, Code::OverLimit]);
    let statsd = metrics.statsd_counters();
    for (stat, value) in [("total_hits", 3), ("within_limit", 1), ("over_limit", 2)] {
        let name = format!("ratelimit.service.rate_limit.edge.client_web.path_/api/x.{stat}");
        assert!(
            statsd.contains(&(name.clone(), value)),
            "no {name} = {value} in {statsd:?}"
        );
    }
    let text = metrics.render();
    let line = "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client_web.path_/api/x\",key1=\"client_web\",key2=\"path_/api/x\"} 3";
    assert!(text.contains(line), "no {line} in\n{text}");
    // The rule the entries would match without the override counted nothing.
    assert!(
        text.contains("ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"client.path_/api/*\",key1=\"client\",key2=\"path_/api/*\"} 0"),
        "{text}"
    );
}

#[test]
fn value_to_metric_puts_request_values_in_the_metric_key() {
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let req = request(vec![descriptor(&[
        ("user", "alice"),
        ("action", "readfile"),
        ("resource", "r1"),
    ])]);
    decide(&limiter, &req);
    decide(&limiter, &req);
    let req = request(vec![descriptor(&[("route", "api/v1"), ("method", "GET")])]);
    decide(&limiter, &req);
    let text = metrics.render();
    for line in [
        // Value-less `user` and wildcard `read*` put the request's values in; `resource`
        // has no `value_to_metric`, so it stays a bare key, as in envoyproxy/ratelimit.
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"user_alice.action_readfile.resource\",key1=\"user_alice\",key2=\"action_readfile\"} 2",
        // A shared wildcard stays written as the wildcard: its values share one counter.
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"route_api/*.method_GET\",key1=\"route_api/*\",key2=\"method_GET\"} 1",
        // The hits are counted under the keys with values instead of the rule's own.
        "ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"user.action_read*.resource\",key1=\"user\",key2=\"action_read*\"} 0",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
}

#[test]
fn quota_mode_turns_a_request_away_only_when_all_its_quota_descriptors_are_over() {
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let req = request(vec![
        descriptor(&[("soft", "x")]),
        descriptor(&[("soft_big", "x")]),
    ]);
    assert_eq!(codes(&decide(&limiter, &req)), [Code::Ok, Code::Ok]);
    // `soft` (limit 1) is over, `soft_big` (limit 2) is not: the request passes, and the
    // status still says which one is over.
    let one_over = decide(&limiter, &req);
    assert_eq!(one_over.overall_code(), Code::Ok);
    assert_eq!(codes(&one_over), [Code::OverLimit, Code::Ok]);
    // Both over: turned away.
    let both_over = decide(&limiter, &req);
    assert_eq!(both_over.overall_code(), Code::OverLimit);
    assert_eq!(codes(&both_over), [Code::OverLimit, Code::OverLimit]);
    let text = metrics.render();
    let line =
        "ratelimit_service_rate_limit_over_limit{domain=\"edge\",key=\"soft\",key1=\"soft\"} 2";
    assert!(text.contains(line), "missing `{line}` in:\n{text}");
}

#[test]
fn global_quota_mode_counts_every_limited_descriptor_as_a_quota() {
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(CONFIG, &clock, 0.8);
    let limiter = limiter.with_global_modes(GlobalModes {
        quota: true,
        ..GlobalModes::default()
    });
    // `ip` allows 1, `user` 2; a descriptor no rule matches is a quota that always passes,
    // so with it in the request nothing is ever turned away.
    let with_unmatched = request(vec![
        descriptor(&[("ip", "1.2.3.4")]),
        descriptor(&[("nolimit", "x")]),
    ]);
    decide(&limiter, &with_unmatched);
    assert_eq!(decide(&limiter, &with_unmatched).overall_code(), Code::Ok);
    let req = request(vec![
        descriptor(&[("ip", "5.6.7.8")]),
        descriptor(&[("user", "u")]),
    ]);
    assert_eq!(decide(&limiter, &req).overall_code(), Code::Ok);
    assert_eq!(
        decide(&limiter, &req).overall_code(),
        Code::Ok,
        "ip over, user not"
    );
    assert_eq!(
        decide(&limiter, &req).overall_code(),
        Code::OverLimit,
        "both over"
    );
}

/// STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT: `ip` (1 a minute) turns the second request
/// away; with the mode, that request did not count on `user` (2 a minute), so a third
/// request for the user alone still passes.
#[test]
fn a_request_turned_away_counts_on_none_of_its_other_descriptors() {
    let both = request(vec![
        descriptor(&[("user", "u")]),
        descriptor(&[("ip", "1.2.3.4")]),
    ]);
    let user_alone = request(vec![descriptor(&[("user", "u")])]);
    for (spare, third) in [(true, Code::Ok), (false, Code::OverLimit)] {
        let clock = ManualClock::at(START);
        let (limiter, metrics) = limiter_with_metrics(CONFIG, &clock, 0.8);
        let limiter = limiter.with_global_modes(GlobalModes {
            spare_when_turned_away: spare,
            ..GlobalModes::default()
        });
        assert_eq!(decide(&limiter, &both).overall_code(), Code::Ok);
        let turned_away = decide(&limiter, &both);
        assert_eq!(turned_away.overall_code(), Code::OverLimit, "spare={spare}");
        assert_eq!(codes(&turned_away), [Code::Ok, Code::OverLimit]);
        let remaining = turned_away.statuses[0].limit_remaining;
        assert_eq!(remaining, if spare { 1 } else { 0 }, "spare={spare}");
        assert_eq!(
            decide(&limiter, &user_alone).overall_code(),
            third,
            "spare={spare}"
        );
        // The rejecting descriptor is counted as usual: its hits, and its over-limit.
        let text = metrics.render();
        let line =
            "ratelimit_service_rate_limit_over_limit{domain=\"edge\",key=\"ip\",key1=\"ip\"} 1";
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }

    // A shadow-mode descriptor over its limit turns nothing away, so spares nothing.
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(CONFIG, &clock, 0.8);
    let limiter = limiter.with_global_modes(GlobalModes {
        spare_when_turned_away: true,
        ..GlobalModes::default()
    });
    let with_trial = request(vec![
        descriptor(&[("user", "v")]),
        descriptor(&[("trial", "t")]),
    ]);
    for _ in 0..2 {
        assert_eq!(decide(&limiter, &with_trial).overall_code(), Code::Ok);
    }
    let user_v = request(vec![descriptor(&[("user", "v")])]);
    assert_eq!(
        decide(&limiter, &user_v).overall_code(),
        Code::OverLimit,
        "both requests counted on user v"
    );
}

#[test]
fn global_shadow_mode_answers_ok_and_counts_what_it_let_through() {
    let clock = ManualClock::at(START);
    let (limiter, metrics) = limiter_with_metrics(CONFIG, &clock, 0.8);
    let limiter = limiter.with_global_modes(GLOBAL_SHADOW);
    let req = request(vec![descriptor(&[("ip", "1.2.3.4")])]);
    decide(&limiter, &req);
    let over = decide(&limiter, &req);
    assert_eq!(over.overall_code(), Code::Ok);
    // The descriptor still reports being over, as envoyproxy/ratelimit's does, but no
    // 429 body or Retry-After is prepared.
    assert_eq!(codes(&over), [Code::OverLimit]);
    assert!(over.raw_body.is_empty());
    assert_eq!(metrics.global_shadow_mode.load(Ordering::Relaxed), 1);
}

#[test]
fn metadata_of_the_rules_a_request_passed_reaches_dynamic_metadata() {
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(COMPAT_FIELDS, &clock, 0.8);
    let limiter = limiter.with_presentation(ResponseSettings {
        dynamic_metadata: true,
        ..ResponseSettings::default()
    });
    let req = request(vec![
        descriptor(&[("tenant", "acme")]),
        descriptor(&[("zone", "z1")]),
        descriptor(&[("region", "eu")]),
    ]);
    // The `metadata` merged at the top of the dynamic metadata, where envoyproxy/ratelimit
    // puts it, as JSON-ish text.
    let passed = |response: &RateLimitResponse| -> Option<String> {
        let metadata = response.dynamic_metadata.as_ref()?.fields.get("metadata")?;
        let mut text = format!("{metadata:?}");
        text.retain(|c| !c.is_whitespace());
        Some(text)
    };
    let first = passed(&decide(&limiter, &req)).expect("metadata of both limited rules");
    // Both limited rules passed: their mappings merge, nested ones field by field, and
    // where both name a plain value the first descriptor's stays.
    for part in [
        "\"team\":Value{kind:Some(StringValue(\"payments\"))}",
        "\"oncall\"",
        "\"site\"",
        "\"tier\"",
        "\"zone_limited\":Value{kind:Some(BoolValue(true))}",
    ] {
        assert!(first.contains(part), "missing {part} in {first}");
    }
    assert!(!first.contains("platform"), "{first}");
    // The region's rule is unlimited: it counts nothing, and envoyproxy/ratelimit leaves
    // such descriptors out of those that passed.
    assert!(!first.contains("region_limited"), "{first}");
    // Over its limit of 1, the tenant rule no longer passes: only the zone's metadata.
    let second = passed(&decide(&limiter, &req)).expect("metadata of the zone rule");
    assert!(
        second.contains("platform") && !second.contains("payments"),
        "{second}"
    );
}

/// A bucket charged after the fact with the most hits a descriptor can carry owes more
/// time than protobuf's Duration holds: the answer says the longest one, which clients
/// can read, rather than a value they refuse.
#[test]
fn a_reset_past_protobufs_longest_duration_is_the_longest() {
    let config = "domain: edge\npolicies:\n  llm:\n    algorithm: token_bucket\n    count_rejected: true\n    limits: [{requests_per_unit: 1000, unit: minute}]\ndescriptors:\n  - key: tokens\n    policy: llm\n";
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(config, &clock, 0.8);
    let mut d = descriptor(&[("tokens", "t")]);
    d.hits_addend = Some(u64::MAX);
    let response = decide(&limiter, &request(vec![d]));
    let reset = response.statuses[0]
        .duration_until_reset
        .expect("duration_until_reset");
    assert_eq!(reset.seconds, 315_576_000_000);
    // It encodes, and a client decodes it.
    let bytes = prost::Message::encode_to_vec(&response);
    let back = <RateLimitResponse as prost::Message>::decode(bytes.as_slice()).unwrap();
    assert_eq!(back.statuses[0].duration_until_reset, Some(reset));
}

/// `/v1/usage` on a window whose limit is used up says it is over: the next request is
/// turned away, though a look of no hits is not past the limit.
#[test]
fn usage_of_a_window_used_up_is_over_the_limit() {
    let config = "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 2}\n";
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(config, &clock, 0.8);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let req = request(vec![descriptor(&[("k", "v")])]);
    let usage = || {
        let used = runtime
            .block_on(limiter.usage(&req))
            .unwrap_or_else(|e| panic!("{e}"));
        (used[0].used, used[0].remaining, used[0].over_limit)
    };
    decide(&limiter, &req);
    assert_eq!(usage(), (1, 1, false));
    decide(&limiter, &req);
    assert_eq!(usage(), (2, 0, true));
    assert_eq!(decide(&limiter, &req).overall_code(), Code::OverLimit);
}

#[test]
fn usage_of_a_bucket_is_out_of_what_it_holds_and_says_what_it_owes() {
    const BUCKETS: &str = "\
domain: edge
policies:
  llm:
    algorithm: token_bucket
    count_rejected: true
    limits: [{requests_per_unit: 1000, unit: minute}]
descriptors:
  - key: meter
    algorithm: leaky_bucket
    capacity: 50
    limits: [{requests_per_unit: 10, unit: minute}]
  - key: tokens
    policy: llm
";
    let clock = ManualClock::at(START);
    let (limiter, _) = limiter_with_metrics(BUCKETS, &clock, 0.8);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let usage = |pairs: &[(&str, &str)]| {
        let mut used = runtime
            .block_on(limiter.usage(&request(vec![descriptor(pairs)])))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(used.len(), 1, "{used:?}");
        used.remove(0)
    };
    let charge = |pairs: &[(&str, &str)], hits: u32| {
        decide(
            &limiter,
            &RateLimitRequest {
                hits_addend: hits,
                ..request(vec![descriptor(pairs)])
            },
        )
    };

    // 20 of the meter's 50: used 20, not 10 − 30.
    charge(&[("meter", "m")], 20);
    let meter = usage(&[("meter", "m")]);
    assert_eq!((meter.used, meter.remaining, meter.owed), (20, 30, None));

    // 900 tokens, then 900 more charged after the fact: 800 past the bucket of 1 000,
    // which refills 1 000 a minute, so owed 800 and 48 s until it is out of debt; 12 s
    // later, 600.
    charge(&[("tokens", "t")], 900);
    charge(&[("tokens", "t")], 900);
    let tokens = usage(&[("tokens", "t")]);
    assert_eq!(
        (tokens.used, tokens.owed, tokens.reset_after_millis),
        (1_000, Some(800), 48_000),
        "{tokens:?}"
    );
    clock.advance(12_000);
    assert_eq!(usage(&[("tokens", "t")]).owed, Some(600));
    clock.advance(48_000);
    let paid = usage(&[("tokens", "t")]);
    assert_eq!((paid.owed, paid.over_limit), (None, false), "{paid:?}");
}
