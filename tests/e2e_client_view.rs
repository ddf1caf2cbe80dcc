//! What a client and the protected service see through a real Envoy when meshlimit decides:
//! the IETF draft and legacy rate limit headers on admitted requests, `Retry-After` and a
//! JSON body on the 429, the soft-limit header the upstream gets (soft limits and
//! `mode: warn`), a login path that locks an address out and lets it back in, a request two
//! limits turn away told to come back when both have reset, Envoy's own
//! `x-ratelimit-*` headers next to ours, and envoyproxy/ratelimit's header switch.
//!
//! Routes and descriptors: tests/fixtures/envoy/client_view_http.yaml.
//! Policies: tests/fixtures/config_client_view/client_view.yaml.

mod common;

use std::time::{Duration, Instant};

use common::calendar::{midnight_of, next_sunday, tomorrow};
use common::envoy;
use common::http::Response;
use common::meshlimit::Meshlimit;
use common::stack::Stack;
use common::{avoid_window_edge, avoid_window_edge_precisely, fixture, secs_left_in_window};

const TEMPLATE: &str = "envoy/client_view_http.yaml";
const CONFIG: &str = "config_client_view";
const DOMAIN: &str = "client_view";

/// Envoy's `enable_x_ratelimit_headers`: whether Envoy adds its own `x-ratelimit-*`.
#[derive(Clone, Copy)]
enum EnvoyHeaders {
    Off,
    Draft03,
}

impl EnvoyHeaders {
    fn setting(self) -> String {
        match self {
            EnvoyHeaders::Off => "OFF".into(),
            EnvoyHeaders::Draft03 => "DRAFT_VERSION_03".into(),
        }
    }
}

/// meshlimit with `args` and `env`, the echo upstream, and Envoy in front of both.
fn start(envoy_headers: EnvoyHeaders, args: &[&str], env: &[(&str, &str)]) -> Stack {
    let meshlimit = Meshlimit::start_with_env(fixture(CONFIG), args, env);
    Stack::start_around(
        meshlimit,
        fixture(TEMPLATE),
        DOMAIN,
        &[("X_RATELIMIT_HEADERS", envoy_headers.setting())],
    )
}

/// The value of `name`, which must appear exactly once: two filters adding the same header
/// would give the client two answers.
fn single<'r>(response: &'r Response, name: &str) -> &'r str {
    match response.header_values(name)[..] {
        [value] => value,
        ref values => panic!("expected one {name} header, got {values:?} in {response:?}"),
    }
}

fn single_u64(response: &Response, name: &str) -> u64 {
    let value = single(response, name);
    value
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {value:?} in {response:?}"))
}

/// The IETF draft's `RateLimit: "name";r=R;t=T` as (name, R, T).
fn ietf_ratelimit(response: &Response) -> (String, u64, u64) {
    let value = single(response, "ratelimit");
    let parse = || -> Option<(String, u64, u64)> {
        let mut parts = value.split(';');
        let name = parts.next()?.strip_prefix('"')?.strip_suffix('"')?;
        let mut param = |key: &str| -> Option<u64> {
            parts
                .next()?
                .strip_prefix(key)?
                .strip_prefix('=')?
                .parse()
                .ok()
        };
        let (remaining, reset) = (param("r")?, param("t")?);
        parts
            .next()
            .is_none()
            .then(|| (name.to_owned(), remaining, reset))
    };
    parse()
        .unwrap_or_else(|| panic!("RateLimit is not `\"name\";r=R;t=T`: {value:?} in {response:?}"))
}

/// The reset of a fresh client's hits at 3 an hour, all in the current hour, give or take
/// the second that may tick over between the two readings: with some left, the seconds
/// left in the hour; with none, when the next hit fits, a third into the next hour (its
/// 3 hits then weigh 2 in the sliding window).
fn assert_reset_of_3_an_hour(reset: u64, remaining: u64, response: &Response) {
    let expected = secs_left_in_window(3600) + if remaining == 0 { 1_200 } else { 0 };
    assert!(
        reset.abs_diff(expected) <= 1,
        "reset {reset} with {remaining} left, expected about {expected}: {response:?}"
    );
}

/// What the upstream was told in `x-meshlimit-soft-limit`, read from the echo body. The
/// echo joins repeated headers with ", ", so an exact value also shows it came once.
fn soft_signal(response: &Response) -> Option<String> {
    response.json()["headers"]
        .get("x-meshlimit-soft-limit")
        .map(|value| value.as_str().unwrap_or_default().to_owned())
}

/// The 429's JSON body, checked against the headers it came with: one content type, and
/// `retry_after_seconds` equal to `Retry-After`, which is returned.
fn assert_json_429(response: &Response, policy: &str, limit: u64, window_seconds: u64) -> u64 {
    assert_eq!(response.status, 429, "{response:?}");
    // Envoy's local reply starts with `content-type: text/plain` for a non-empty body; the
    // ratelimit filter drops it when the service sends its own.
    assert_eq!(
        response.header_values("content-type"),
        ["application/json"],
        "{response:?}"
    );
    let retry_after = single_u64(response, "retry-after");
    assert!(retry_after > 0, "Retry-After 0 in {response:?}");
    let body = response.json();
    assert_eq!(body["error"], "too_many_requests", "{response:?}");
    assert_eq!(body["policy"], policy, "{response:?}");
    assert_eq!(body["limit"], limit, "{response:?}");
    assert_eq!(body["window_seconds"], window_seconds, "{response:?}");
    assert_eq!(body["retry_after_seconds"], retry_after, "{response:?}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(policy), "{response:?}");
    retry_after
}

#[test]
fn bootstrap_template_passes_envoy_validation() {
    let dir = tempfile::tempdir().unwrap();
    let template = std::fs::read_to_string(fixture(TEMPLATE)).unwrap();
    for envoy_headers in [EnvoyHeaders::Off, EnvoyHeaders::Draft03] {
        envoy::assert_template_valid(
            dir.path(),
            "client_view_http.yaml",
            &template,
            &[
                ("DOMAIN", DOMAIN.into()),
                ("X_RATELIMIT_HEADERS", envoy_headers.setting()),
            ],
            &format!("{TEMPLATE} with {}", envoy_headers.setting()),
        );
    }
}

#[test]
fn ietf_and_legacy_headers_then_retry_after_and_a_json_body_on_the_429() {
    // Envoy's own x-ratelimit-* are off: the legacy set has the same names.
    let stack = start(
        EnvoyHeaders::Off,
        &["--response-headers", "ietf,legacy,retry-after"],
        &[],
    );
    // Four requests in one hour-long window keep the counts exact.
    avoid_window_edge(3600, 10);

    for remaining in [2, 1, 0] {
        let response = stack.get_as("alice", "/");
        stack.expect_status(&response, 200, "alice within her 3 an hour");
        assert_eq!(
            single(&response, "ratelimit-policy"),
            r#""per_user";q=3;w=3600"#,
            "{response:?}"
        );
        let (name, r, t) = ietf_ratelimit(&response);
        assert_eq!((name.as_str(), r), ("per_user", remaining), "{response:?}");
        assert_reset_of_3_an_hour(t, remaining, &response);

        assert_eq!(single(&response, "x-ratelimit-limit"), "3", "{response:?}");
        assert_eq!(
            single_u64(&response, "x-ratelimit-remaining"),
            remaining,
            "{response:?}"
        );
        assert_eq!(
            single_u64(&response, "x-ratelimit-reset"),
            t,
            "{response:?}"
        );
        assert_eq!(response.header("retry-after"), None, "{response:?}");
        assert_eq!(
            response.header_values("content-type"),
            ["application/json"],
            "the upstream's own content type, untouched: {response:?}"
        );
        assert_eq!(response.json()["headers"]["x-user-id"], "alice");
    }

    let denied = stack.get_as("alice", "/");
    stack.expect_status(&denied, 429, "alice's 4th request in the hour");
    let retry_after = assert_json_429(&denied, "per_user", 3, 3600);
    // Every header that says when to come back says the same.
    let (name, r, t) = ietf_ratelimit(&denied);
    assert_eq!(
        (name.as_str(), r, t),
        ("per_user", 0, retry_after),
        "{denied:?}"
    );
    assert_eq!(
        single_u64(&denied, "x-ratelimit-remaining"),
        0,
        "{denied:?}"
    );
    assert_eq!(
        single_u64(&denied, "x-ratelimit-reset"),
        retry_after,
        "{denied:?}"
    );

    assert_eq!(
        stack.upstream.received().len(),
        3,
        "the 429 never reached the upstream"
    );
}

/// A stack answering with IETF headers and Retry-After, and the seconds until the
/// calendar window of `zone` ends at the midnight `next` gives, at least 15 s away, so
/// the test's requests and its 429 land in one window.
fn calendar_stack(zone: &str, next: fn(jiff::civil::Date) -> jiff::civil::Date) -> (Stack, u64) {
    let stack = start(
        EnvoyHeaders::Off,
        &["--response-headers", "ietf,retry-after"],
        &[],
    );
    let secs_to_midnight = || midnight_of(zone, next).1.unsigned_abs();
    if secs_to_midnight() < 15 {
        std::thread::sleep(Duration::from_secs(16));
    }
    (stack, secs_to_midnight())
}

#[test]
fn a_daily_budget_with_a_calendar_resets_at_midnight_in_its_zone() {
    let (stack, expected) = calendar_stack("Asia/Kolkata", tomorrow);
    for remaining in [1, 0] {
        let response = stack.get_as("daily-priya", "/");
        stack.expect_status(&response, 200, "within 2 a day");
        let (name, r, t) = ietf_ratelimit(&response);
        assert_eq!(
            (name.as_str(), r),
            ("daily_in_india", remaining),
            "{response:?}"
        );
        assert!(
            t.abs_diff(expected) <= 2,
            "reset {t}, expected about {expected} (midnight in Kolkata): {response:?}"
        );
        // Envoy's day since the epoch ends at 00:00 UTC, 5.5 hours off Kolkata's.
        assert!(
            t.abs_diff(secs_left_in_window(86_400)) >= 3_600,
            "reset {t} is the UTC day's: {response:?}"
        );
    }
    let denied = stack.get_as("daily-priya", "/");
    let retry_after = assert_json_429(&denied, "daily_in_india", 2, 86_400);
    let message = denied.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("Rate limit of 2 requests per day (Asia/Kolkata) exceeded"),
        "{message}"
    );
    assert!(
        retry_after.abs_diff(expected) <= 2,
        "Retry-After {retry_after}, expected about {expected}: {denied:?}"
    );
    // Another user of the same pattern has a budget of their own.
    let other = stack.get_as("daily-arjun", "/");
    stack.expect_status(&other, 200, "another user's own daily budget");
}

#[test]
fn a_weekly_budget_from_sunday_resets_at_sunday_midnight_in_its_zone() {
    let (stack, expected) = calendar_stack("America/Chicago", next_sunday);
    let response = stack.get_as("weekly-dana", "/");
    stack.expect_status(&response, 200, "the week's one request");
    let (name, r, t) = ietf_ratelimit(&response);
    assert_eq!(
        (name.as_str(), r),
        ("weekly_from_sunday", 0),
        "{response:?}"
    );
    assert!(
        t.abs_diff(expected) <= 2,
        "reset {t}, expected about {expected} (Sunday's midnight in Chicago): {response:?}"
    );
    let denied = stack.get_as("weekly-dana", "/");
    let retry_after = assert_json_429(&denied, "weekly_from_sunday", 1, 604_800);
    assert!(
        retry_after.abs_diff(expected) <= 2,
        "Retry-After {retry_after}, expected about {expected}: {denied:?}"
    );
    let message = denied.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with(
            "Rate limit of 1 requests per week from Sunday (America/Chicago) exceeded"
        ),
        "{message}"
    );
}

#[test]
fn the_upstream_hears_of_a_soft_limit_and_of_warn_mode_overruns() {
    let stack = start(EnvoyHeaders::Off, &[], &[]);
    avoid_window_edge(3600, 10);

    // `reports`: 6 an hour, soft limit at half. The 3rd request uses half the limit.
    let signals: Vec<Option<String>> = (1..=6)
        .map(|sent| {
            let response = stack.get_as("sam", "/reports");
            stack.expect_status(&response, 200, &format!("sam's report {sent} of 6"));
            assert_eq!(
                response.header("x-meshlimit-soft-limit"),
                None,
                "a request header for the upstream, not the client: {response:?}"
            );
            soft_signal(&response)
        })
        .collect();
    let reports = Some("reports".to_owned());
    assert_eq!(
        signals,
        [
            None,
            None,
            reports.clone(),
            reports.clone(),
            reports.clone(),
            reports
        ]
    );
    let denied = stack.get_as("sam", "/reports");
    stack.expect_status(&denied, 429, "sam's 7th report: the hard limit still holds");
    let other = stack.get_as("tess", "/reports");
    stack.expect_status(&other, 200, "another user's first report");
    assert_eq!(soft_signal(&other), None, "{other:?}");

    // `beta`: 2 an hour in `mode: warn`: over the limit still 200, marked `beta;over`.
    let signals: Vec<Option<String>> = (1..=4)
        .map(|sent| {
            let response = stack.get_as("sam", "/beta");
            stack.expect_status(&response, 200, &format!("sam's beta request {sent}"));
            soft_signal(&response)
        })
        .collect();
    let over = Some("beta;over".to_owned());
    assert_eq!(signals, [None, None, over.clone(), over]);

    let paths: Vec<String> = stack
        .upstream
        .received()
        .into_iter()
        .map(|request| request.path)
        .collect();
    assert_eq!(
        paths,
        [
            vec!["/reports"; 7], // sam's 6, then tess's 1: sam's 429 never arrived
            vec!["/beta"; 4],
        ]
        .concat()
    );
}

#[test]
fn a_login_brute_force_locks_the_address_out_then_lets_it_back_in() {
    let stack = start(EnvoyHeaders::Off, &[], &[]);
    // Envoy takes the client's address from X-Forwarded-For (see the bootstrap).
    let attacker: &[(&str, &str)] = &[("x-forwarded-for", "203.0.113.7")];
    let bystander: &[(&str, &str)] = &[("x-forwarded-for", "203.0.113.8")];

    // The limit is 2 a second and windows slide, so the two rejections below are certain
    // if the four requests start early in a second; both must also fall in one minute of
    // the penalty's `within: 1m` (a minute's edge is also a second's).
    avoid_window_edge_precisely(Duration::from_secs(60), Duration::from_secs(2));
    avoid_window_edge_precisely(Duration::from_secs(1), Duration::from_millis(800));

    for attempt in 1..=2 {
        let response = stack.get("/login", attacker);
        stack.expect_status(&response, 200, &format!("login attempt {attempt} of 2"));
    }
    let first = stack.get("/login", attacker);
    stack.expect_status(&first, 429, "login attempt 3: over 2 a second");
    let limit_says = assert_json_429(&first, "login", 2, 1);
    assert!(
        limit_says <= 2,
        "the first rejection is the limit's (back within 2 s), not yet the block's: {first:?}"
    );

    let second = stack.get("/login", attacker);
    let blocked_at = Instant::now();
    stack.expect_status(&second, 429, "login attempt 4: the second rejection");
    assert_eq!(
        assert_json_429(&second, "login", 2, 1),
        3,
        "the second rejection within a minute starts a 3 s block: {second:?}\n{}",
        stack.logs()
    );

    let other = stack.get("/login", bystander);
    stack.expect_status(&other, 200, "another address during the block");

    // Two seconds on, the per-second limit has forgotten every hit, but the block holds
    // (for about one more second).
    std::thread::sleep(Duration::from_secs(2).saturating_sub(blocked_at.elapsed()));
    let still = stack.get("/login", attacker);
    stack.expect_status(&still, 429, "2 s into the 3 s block");
    let left = assert_json_429(&still, "login", 2, 1);
    assert!(
        (1..=2).contains(&left),
        "Retry-After is the time left in the block: {still:?}"
    );

    // The block began before `blocked_at`, so it is over half a second before this.
    std::thread::sleep(Duration::from_millis(3_500).saturating_sub(blocked_at.elapsed()));
    let back = stack.get("/login", attacker);
    stack.expect_status(&back, 200, "after the 3 s block");

    let clients: Vec<String> = stack
        .upstream
        .received()
        .iter()
        .map(|request| request.header("x-forwarded-for").unwrap_or("-").to_owned())
        .collect();
    assert_eq!(
        clients,
        ["203.0.113.7", "203.0.113.7", "203.0.113.8", "203.0.113.7"]
    );
}

/// A request two descriptors turn away is let in only once both have reset, so the 429
/// names the later: the user's hour-long budget, not the login limit's second, though the
/// login descriptor comes first.
#[test]
fn a_request_over_two_limits_is_told_to_come_back_when_both_have_reset() {
    let stack = start(EnvoyHeaders::Off, &[], &[]);
    let client: &[(&str, &str)] = &[("x-forwarded-for", "203.0.113.9"), ("x-user-id", "carol")];
    // Carol spends her 3 an hour.
    for n in 1..=3 {
        let response = stack.get("/", &client[1..]);
        stack.expect_status(&response, 200, &format!("carol's request {n} of 3 an hour"));
    }
    // Three checkouts in one second: the third is also over the login limit (2 a second).
    avoid_window_edge_precisely(Duration::from_secs(1), Duration::from_millis(800));
    let mut last = None;
    for n in 1..=3 {
        let response = stack.get("/checkout", client);
        stack.expect_status(
            &response,
            429,
            &format!("checkout {n}: carol is over her hour"),
        );
        last = Some(response);
    }
    let both = last.unwrap();
    // Her 3 hits weigh on the next hour's window for its first third at least: 20 minutes.
    let retry_after = assert_json_429(&both, "per_user", 3, 3_600);
    assert!(
        retry_after > 60,
        "the hour's reset, not the login limit's second: {both:?}\n{}",
        stack.logs()
    );
    assert_eq!(
        stack.upstream.received().len(),
        3,
        "only carol's first three got through"
    );
}

/// A header action with `skip_if_absent` and no header: Envoy sends that descriptor with
/// no entries. It has no limit, and the address's login limit still counts (an error
/// would fail the whole call, and Envoy's failure mode would decide every request).
#[test]
fn a_descriptor_envoy_sends_empty_leaves_the_other_limits_counting() {
    let stack = start(EnvoyHeaders::Off, &[], &[]);
    let client: &[(&str, &str)] = &[("x-forwarded-for", "203.0.113.11")];
    // Three in one second: the third is over the login limit (2 a second).
    avoid_window_edge_precisely(Duration::from_secs(1), Duration::from_millis(800));
    let statuses: Vec<u16> = (0..3)
        .map(|_| stack.get("/optional", client).status)
        .collect();
    assert_eq!(statuses, [200, 200, 429], "{}", stack.logs());
}

/// A user id header with a byte that is not UTF-8 (latin-1 `ü`), which Envoy passes on as
/// it came: the request is still limited, under a key of its own, and does not fail (a
/// failed call would let it through a fail-open Envoy, and through a fail-closed one turn
/// it away with a 500).
#[test]
fn a_header_value_that_is_not_utf8_is_limited_like_any_other() {
    let stack = start(EnvoyHeaders::Off, &[], &[]);
    let addr = stack.envoy.listener_addr;
    let send = |value: &[u8]| {
        common::http::get_with_raw_header(addr, "/", "x-user-id", value)
            .unwrap_or_else(|err| panic!("GET through Envoy: {err}"))
            .status
    };
    avoid_window_edge(3_600, 10);
    let statuses: Vec<u16> = (0..4).map(|_| send(b"m\xfcller")).collect();
    // per_user: 3 an hour.
    assert_eq!(statuses, [200, 200, 200, 429], "{}", stack.logs());
    // Another stray byte is another user.
    assert_eq!(send(b"m\xfdller"), 200, "{}", stack.logs());
}

/// A client's own header value over 4 096 bytes: it was refused with INVALID_ARGUMENT,
/// which a fail-open Envoy turns into a request past every limit. It is counted under a
/// digest of itself, and values sharing their first bytes stay apart.
#[test]
fn a_header_value_over_four_kilobytes_is_limited_like_any_other() {
    let stack = start(EnvoyHeaders::Off, &[], &[]);
    let long = "a".repeat(5_000);
    let send = |value: &str| stack.get("/", &[("x-user-id", value)]).status;
    avoid_window_edge(3_600, 10);
    let statuses: Vec<u16> = (0..4).map(|_| send(&long)).collect();
    // per_user: 3 an hour.
    assert_eq!(statuses, [200, 200, 200, 429], "{}", stack.logs());
    assert_eq!(send(&format!("{long}b")), 200, "{}", stack.logs());
}

/// The support desk's way out of a lockout: `DELETE /v1/usage` on the admin port for the
/// address's login descriptor lifts its block and its count at once, where it would
/// otherwise wait out the block; another address's count is left as it was. It takes the
/// secret of `--admin-reset-token-file`: anything that reaches the admin port without it
/// (the locked-out client included) is refused and resets nothing.
#[test]
fn an_operator_lets_a_locked_out_address_back_in_at_once() {
    let token = common::meshlimit::reset_token_file();
    let stack = start(
        EnvoyHeaders::Off,
        &["--admin-reset-token-file", &token],
        &[],
    );
    let attacker: &[(&str, &str)] = &[("x-forwarded-for", "203.0.113.7")];
    let bystander: &[(&str, &str)] = &[("x-forwarded-for", "203.0.113.8")];
    avoid_window_edge_precisely(Duration::from_secs(60), Duration::from_secs(2));
    avoid_window_edge_precisely(Duration::from_secs(1), Duration::from_millis(800));

    let bystanders = stack.get("/login", bystander);
    stack.expect_status(&bystanders, 200, "the bystander's one login");
    let statuses: Vec<u16> = (0..4)
        .map(|_| stack.get("/login", attacker).status)
        .collect();
    assert_eq!(statuses, [200, 200, 429, 429], "{}", stack.logs());
    let locked = stack.get("/login", attacker);
    stack.expect_status(&locked, 429, "locked out");
    assert_eq!(assert_json_429(&locked, "login", 2, 1), 3, "{locked:?}");

    let usage = |address: &str| {
        format!("/v1/usage?domain={DOMAIN}&descriptor=generic_key=login,remote_address={address}")
    };
    for refused in [None, Some("Bearer guess"), Some("test-reset-secret")] {
        let answer = stack
            .meshlimit
            .admin_delete_as(&usage("203.0.113.7"), refused);
        assert_eq!(answer.status, 401, "{refused:?}: {answer:?}");
    }
    stack.expect_status(
        &stack.get("/login", attacker),
        429,
        "still locked out after the refused resets",
    );
    let reset = stack.meshlimit.admin_delete(&usage("203.0.113.7"));
    assert_eq!(reset.status, 200, "{reset:?}");
    let limit = &reset.json()["limits"][0];
    assert_eq!(
        (limit["used"].as_u64(), limit["remaining"].as_u64()),
        (Some(0), Some(2)),
        "{reset:?}"
    );
    let back = stack.get("/login", attacker);
    stack.expect_status(&back, 200, "right after the reset, inside the 3 s block");

    assert_eq!(stack.meshlimit.metric("meshlimit_limit_resets_total"), 1);
    let untouched = stack.meshlimit.admin_get(&usage("203.0.113.8"));
    assert_eq!(
        untouched.json()["limits"][0]["used"].as_u64(),
        Some(1),
        "{untouched:?}"
    );
    assert!(
        stack
            .meshlimit
            .logs()
            .contains("limits reset through the admin port"),
        "a reset lets a client past its limits, so it is logged:\n{}",
        stack.meshlimit.logs()
    );
    let unknown = stack
        .meshlimit
        .admin_delete("/v1/usage?descriptor=generic_key=login");
    assert_eq!(unknown.status, 400, "{unknown:?}");
}

/// Without `--admin-reset-token-file`, resets are off: a 403 that says how to turn them on.
#[test]
fn resets_are_off_without_a_token_file() {
    let meshlimit = Meshlimit::start_with_env(fixture(CONFIG), &[], &[]);
    let answer = meshlimit.admin_delete(&format!(
        "/v1/usage?domain={DOMAIN}&descriptor=generic_key=login,remote_address=203.0.113.7"
    ));
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(
        answer.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("--admin-reset-token-file")),
        "{answer:?}"
    );
}

#[test]
fn envoys_own_x_ratelimit_headers_agree_with_meshlimits() {
    let stack = start(
        EnvoyHeaders::Draft03,
        &["--response-headers", "ietf,retry-after"],
        &[],
    );
    avoid_window_edge(3600, 10);

    for remaining in [2, 1, 0] {
        let response = stack.get_as("erin", "/");
        stack.expect_status(&response, 200, "erin within her 3 an hour");
        assert_eq!(
            single(&response, "x-ratelimit-limit"),
            r#"3, 3;w=3600;name="per_user""#,
            "{response:?}"
        );
        let (_, r, t) = ietf_ratelimit(&response);
        assert_eq!(r, remaining, "{response:?}");
        assert_reset_of_3_an_hour(t, remaining, &response);
        assert_eq!(
            single_u64(&response, "x-ratelimit-remaining"),
            remaining,
            "{response:?}"
        );
        assert_eq!(
            single_u64(&response, "x-ratelimit-reset"),
            t,
            "{response:?}"
        );
    }

    let denied = stack.get_as("erin", "/");
    stack.expect_status(&denied, 429, "erin's 4th request in the hour");
    let retry_after = assert_json_429(&denied, "per_user", 3, 3600);
    assert_eq!(
        single(&denied, "x-ratelimit-limit"),
        r#"3, 3;w=3600;name="per_user""#,
        "{denied:?}"
    );
    assert_eq!(
        single_u64(&denied, "x-ratelimit-remaining"),
        0,
        "{denied:?}"
    );
    assert_eq!(
        single_u64(&denied, "x-ratelimit-reset"),
        retry_after,
        "{denied:?}"
    );
    assert_eq!(ietf_ratelimit(&denied).2, retry_after, "{denied:?}");
}

#[test]
fn envoyproxy_switch_names_the_headers_ratelimit_limit_remaining_reset() {
    // As an envoyproxy/ratelimit deployment configures it, next to Envoy's own headers.
    let stack = start(
        EnvoyHeaders::Draft03,
        &[],
        &[("LIMIT_RESPONSE_HEADERS_ENABLED", "true")],
    );
    avoid_window_edge(3600, 10);

    for remaining in [2, 1, 0] {
        let response = stack.get_as("finn", "/");
        stack.expect_status(&response, 200, "finn within his 3 an hour");
        assert_eq!(single(&response, "ratelimit-limit"), "3", "{response:?}");
        assert_eq!(
            single_u64(&response, "ratelimit-remaining"),
            remaining,
            "{response:?}"
        );
        let reset = single_u64(&response, "ratelimit-reset");
        assert_reset_of_3_an_hour(reset, remaining, &response);
        // Envoy's set is still there once, and agrees.
        assert_eq!(
            single_u64(&response, "x-ratelimit-remaining"),
            remaining,
            "{response:?}"
        );
        assert_eq!(
            single_u64(&response, "x-ratelimit-reset"),
            reset,
            "{response:?}"
        );
        // The switch adds the legacy set only.
        assert_eq!(response.header("ratelimit"), None, "{response:?}");
        assert_eq!(response.header("ratelimit-policy"), None, "{response:?}");
    }

    let denied = stack.get_as("finn", "/");
    stack.expect_status(&denied, 429, "finn's 4th request in the hour");
    let retry_after = assert_json_429(&denied, "per_user", 3, 3600);
    assert_eq!(single(&denied, "ratelimit-limit"), "3", "{denied:?}");
    assert_eq!(single_u64(&denied, "ratelimit-remaining"), 0, "{denied:?}");
    assert_eq!(
        single_u64(&denied, "ratelimit-reset"),
        retry_after,
        "{denied:?}"
    );
}
