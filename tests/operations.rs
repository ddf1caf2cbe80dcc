//! Running meshlimit the way a platform team does, against the real binary: Prometheus
//! counters moving as a real Envoy sends traffic, the admin port's `GET /v1/usage` and
//! `POST /json`, TLS and mTLS on the gRPC port with a certificate rotated on disk, and
//! SIGTERM in the middle of a load.
//!
//! Limits: tests/fixtures/config_operations/operations.yaml.
//! Envoy routes and descriptors: tests/fixtures/envoy/ratelimit_http.yaml.

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::calendar::{first_of_next_month, midnight_of, next_sunday};
use common::meshlimit::Meshlimit;
use common::stack::Stack;
use common::tls::Ca;
use common::{avoid_window_edge, fixture, poll_until};
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use serde_json::{Value, json};
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const DOMAIN: &str = "operations";

/// Checks a calendar limit of `/v1/usage` resets at midnight in `zone` on the day `next`
/// gives: `resetAt` the instant in UTC, `resetAtLocal` the same with the zone's offset
/// then (`2027-03-01T00:00:00+13:00`), and `resetSeconds` within 2 s of the time to it.
fn assert_resets_at_midnight(
    limit: &Value,
    zone: &str,
    next: fn(jiff::civil::Date) -> jiff::civil::Date,
    response: &impl std::fmt::Debug,
) {
    let (midnight, expected) = midnight_of(zone, next);
    assert_eq!(
        limit["resetAt"],
        json!(midnight.to_string()),
        "{response:?}"
    );
    let local = midnight.to_zoned(jiff::tz::TimeZone::get(zone).unwrap());
    assert_eq!(local.time(), jiff::civil::Time::midnight(), "{local}");
    assert_eq!(
        limit["resetAtLocal"],
        json!(local.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()),
        "{response:?}"
    );
    let reset = limit["resetSeconds"].as_i64().unwrap();
    assert!(
        (reset - expected).abs() <= 2,
        "resetSeconds {reset}, expected {expected} (midnight in {zone}): {response:?}"
    );
}

fn config() -> PathBuf {
    fixture("config_operations")
}

/// The fixture's limits are fixed windows of an hour and a day: a test that counts hits
/// steps over the hour's edge (which is also the day's) when it is near, so its hits all
/// land in one window.
fn avoid_hour_edge() {
    avoid_window_edge(3_600, 20);
}

/// A `RateLimitRequest` for `DOMAIN` with one descriptor of `entries`.
fn request(entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: DOMAIN.to_owned(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(key, value)| Entry {
                    key: (*key).to_owned(),
                    value: (*value).to_owned(),
                })
                .collect(),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

async fn decide(
    channel: Channel,
    entries: &[(&str, &str)],
) -> Result<RateLimitResponse, tonic::Status> {
    let mut client = RateLimitServiceClient::new(channel);
    client
        .should_rate_limit(request(entries))
        .await
        .map(tonic::Response::into_inner)
}

/// (overall code, limit_remaining of the one status), comparable in one `assert_eq!`.
fn outcome(response: &RateLimitResponse) -> (Code, u32) {
    let remaining = response
        .statuses
        .first()
        .map_or(u32::MAX, |status| status.limit_remaining);
    (response.overall_code(), remaining)
}

// ---------------------------------------------------------------------------------------
// Logs

/// `LOG_LEVEL=debug`, as Istio's sample deployment sets it: one line per decision, saying
/// what was asked and what each descriptor got, and not the HTTP/2 library's frames
/// (which buried them: 700 lines for 100 calls).
#[tokio::test]
async fn debug_logs_show_each_decision_and_no_http2_frames() {
    avoid_hour_edge();
    let server = Meshlimit::start_with_env(config(), &[], &[("LOG_LEVEL", "debug")]);
    let channel = server.channel().await;
    for _ in 0..4 {
        decide(channel.clone(), &[("user", "debug-logs")])
            .await
            .unwrap_or_else(|status| panic!("{status}\n{}", server.logs()));
    }
    let logs = server.logs();
    let decided: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("decided") && line.contains("[user=debug-logs]"))
        .collect();
    assert_eq!(decided.len(), 4, "{logs}");
    assert!(decided[0].contains("Ok (3/Hour, 2 left)"), "{logs}");
    assert!(decided[3].contains("overall=OverLimit"), "{logs}");
    assert!(!logs.contains(" h2::"), "{logs}");
}

// ---------------------------------------------------------------------------------------
// /metrics

/// A typo in Envoy's `domain`: every request is let through with no limits, as
/// envoyproxy/ratelimit lets it through, but the operator can see it: a counter by domain
/// (which `MeshlimitUnknownDomain` alerts on) and one warning in the log, naming the
/// domains the config does define.
#[test]
fn requests_for_a_misspelt_domain_pass_and_are_counted_and_logged_once() {
    let stack = Stack::start(config(), fixture("envoy/ratelimit_http.yaml"), "opertions");
    let statuses: Vec<u16> = (0..5).map(|_| stack.get_as("alice", "/").status).collect();
    assert_eq!(statuses, [200; 5], "{}", stack.logs());
    let meshlimit = &stack.meshlimit;
    let counted = meshlimit.metric("meshlimit_unknown_domain_requests_total{domain=\"opertions\"}");
    // Envoy sends each request's descriptors in one call (more if its routes asked twice).
    assert!(counted >= 5, "{counted}\n{}", stack.logs());
    let logs = meshlimit.logs();
    let warnings = logs
        .lines()
        .filter(|line| line.contains("a request for a domain no config defines"))
        .collect::<Vec<_>>();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(
        warnings[0].contains("opertions") && warnings[0].contains(DOMAIN),
        "{logs}"
    );
}

#[test]
fn metrics_count_the_decisions_a_real_envoy_asks_for() {
    let stack = Stack::start(config(), fixture("envoy/ratelimit_http.yaml"), DOMAIN);
    let meshlimit = &stack.meshlimit;
    avoid_hour_edge();

    assert_eq!(
        meshlimit.metric("ratelimit_service_config_load_success"),
        1,
        "the config loaded once at startup"
    );
    assert_eq!(meshlimit.metric("ratelimit_service_config_load_error"), 0);
    let decisions = || meshlimit.metric("meshlimit_decision_duration_seconds_count");
    let decisions_before = decisions();

    // alice has 3 an hour: 3 pass, 2 are turned away; bob's one request passes.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(stack.get_as("alice", "/").status);
    }
    statuses.push(stack.get_as("bob", "/").status);
    assert_eq!(statuses, [200, 200, 200, 429, 429, 200], "{}", stack.logs());

    // envoyproxy/ratelimit's names and labels: one series per rule, alice and bob together.
    let rule = |key: &str, stat: &str| {
        meshlimit.metric(&format!(
            "ratelimit_service_rate_limit_{stat}{{domain=\"{DOMAIN}\",key=\"{key}\"}}"
        ))
    };
    let counters: Vec<_> = ["total_hits", "over_limit", "within_limit", "shadow_mode"]
        .into_iter()
        .map(|stat| (stat, rule("user", stat)))
        .collect();
    assert_eq!(
        counters,
        [
            ("total_hits", 6),
            ("over_limit", 2),
            ("within_limit", 4),
            ("shadow_mode", 0)
        ],
        "the per_user rule's counters after 6 requests, 2 of them over the limit"
    );
    // [user, path] and [remote_address] match no rule; other rules saw nothing.
    assert_eq!(rule("json", "total_hits"), 0);
    // Without `detailed_metric`, request values never become labels.
    let text = meshlimit.admin_get("/metrics").text();
    assert!(
        !text.contains("alice") && !text.contains("bob"),
        "a user id became a label:\n{text}"
    );

    // Each request through Envoy is one timed ShouldRateLimit call.
    let decisions_after = decisions();
    assert!(
        decisions_after >= decisions_before + 6,
        "meshlimit_decision_duration_seconds_count went from {decisions_before} to \
         {decisions_after} over 6 requests"
    );
}

// ---------------------------------------------------------------------------------------
// GET /v1/usage

/// (windowSeconds, requestsPerUnit, used, remaining) of each limit `/v1/usage` reports for
/// one descriptor, shortest window first.
fn usage(server: &Meshlimit, descriptor: &str) -> Vec<(u64, u64, u64, u64)> {
    let path = format!("/v1/usage?domain={DOMAIN}&descriptor={descriptor}");
    let response = server.admin_get(&path);
    assert_eq!(response.status, 200, "GET {path}: {response:?}");
    let body = response.json();
    assert_eq!(body["domain"], DOMAIN, "{body}");
    let number = |limit: &Value, field: &str| {
        limit[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no number `{field}` in {limit} of {body}"))
    };
    let mut limits: Vec<_> = body["limits"]
        .as_array()
        .unwrap_or_else(|| panic!("no `limits` list in {body}"))
        .iter()
        .map(|limit| {
            (
                number(limit, "windowSeconds"),
                number(limit, "requestsPerUnit"),
                number(limit, "used"),
                number(limit, "remaining"),
            )
        })
        .collect();
    limits.sort_unstable();
    limits
}

#[tokio::test]
async fn usage_reports_every_matching_limit_without_consuming() {
    let server = Meshlimit::start(config());
    avoid_hour_edge();
    let channel = server.channel().await;
    let quota = [("quota", "q1")];

    assert_eq!(
        usage(&server, "quota=q1"),
        [(3_600, 4, 0, 4), (86_400, 10, 0, 10)],
        "both limits of `quota` before any request"
    );
    for expected in [(Code::Ok, 3), (Code::Ok, 2)] {
        let response = decide(channel.clone(), &quota).await.expect("a decision");
        assert_eq!(outcome(&response), expected, "{response:?}");
    }

    // More usage queries than the hourly limit: had they counted, the hour would be over.
    for _ in 0..6 {
        assert_eq!(
            usage(&server, "quota=q1"),
            [(3_600, 4, 2, 2), (86_400, 10, 2, 8)],
            "after two decisions"
        );
    }

    // A real decision still sees the two left this hour.
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let response = decide(channel.clone(), &quota).await.expect("a decision");
        outcomes.push(outcome(&response));
    }
    assert_eq!(
        outcomes,
        [(Code::Ok, 1), (Code::Ok, 0), (Code::OverLimit, 0)],
        "{}",
        server.logs()
    );
    // The rejected request consumed from neither limit.
    assert_eq!(
        usage(&server, "quota=q1"),
        [(3_600, 4, 4, 0), (86_400, 10, 4, 6)]
    );
    // Counters are per value.
    assert_eq!(
        usage(&server, "quota=q2"),
        [(3_600, 4, 0, 4), (86_400, 10, 0, 10)]
    );

    // Several descriptors in one query: each limit names the descriptor it belongs to.
    let both = server.admin_get(&format!(
        "/v1/usage?domain={DOMAIN}&descriptor=quota=q1&descriptor=json=j1"
    ));
    assert_eq!(both.status, 200, "{both:?}");
    let body = both.json();
    let owners: Vec<_> = body["limits"]
        .as_array()
        .map(|limits| limits.iter().map(|l| l["descriptor"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(owners, [json!(0), json!(0), json!(1)], "{body}");

    // A calendar month says whose calendar, and resets on the 1st at midnight there.
    let decision = decide(channel.clone(), &[("plan_month", "p1")]).await;
    assert_eq!(outcome(&decision.expect("a decision")), (Code::Ok, 999));
    let month = server.admin_get(&format!(
        "/v1/usage?domain={DOMAIN}&descriptor=plan_month=p1"
    ));
    let limit = &month.json()["limits"][0];
    assert_eq!(limit["calendar"], "Pacific/Auckland", "{month:?}");
    assert_eq!(
        (&limit["used"], &limit["remaining"]),
        (&json!(1), &json!(999))
    );
    assert_resets_at_midnight(limit, "Pacific/Auckland", first_of_next_month, &month);
    assert_eq!(
        body["limits"][0].get("calendar"),
        None,
        "only a calendar limit names one"
    );

    // A week from Sunday resets at the coming Sunday's midnight in New York.
    decide(channel.clone(), &[("plan_week", "p1")])
        .await
        .expect("a decision");
    let week = server.admin_get(&format!(
        "/v1/usage?domain={DOMAIN}&descriptor=plan_week=p1"
    ));
    let limit = &week.json()["limits"][0];
    assert_eq!(
        (&limit["calendar"], &limit["weekStarts"], &limit["used"]),
        (&json!("America/New_York"), &json!("sunday"), &json!(1)),
        "{week:?}"
    );
    assert_resets_at_midnight(limit, "America/New_York", next_sunday, &week);

    // A bucket's use is out of what it holds (a leaky bucket's capacity, a token bucket's
    // burst), named as its rule names it; a window has neither.
    for (key, size, holds) in [("meter", "capacity", 50), ("tokens", "burst", 40)] {
        for _ in 0..3 {
            decide(channel.clone(), &[(key, "b1")])
                .await
                .expect("a decision");
        }
        let bucket = server.admin_get(&format!("/v1/usage?domain={DOMAIN}&descriptor={key}=b1"));
        let limit = &bucket.json()["limits"][0];
        assert_eq!(
            (&limit["used"], &limit["remaining"], &limit[size]),
            (&json!(3), &json!(holds - 3), &json!(holds)),
            "{bucket:?}"
        );
        assert_eq!(limit["requestsPerUnit"], 10, "{bucket:?}");
    }
    assert_eq!(body["limits"][0].get("burst"), None);

    for bad in [
        "/v1/usage?descriptor=quota=q1".to_owned(),
        format!("/v1/usage?domain={DOMAIN}&descriptor=quota=q1&limit=5"),
    ] {
        let response = server.admin_get(&bad);
        assert_eq!(response.status, 400, "GET {bad}: {response:?}");
        assert!(
            response.json()["error"].is_string(),
            "GET {bad}: {response:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// POST /json

#[test]
fn json_decisions_answer_200_then_429_and_400_for_malformed_bodies() {
    let server = Meshlimit::start(config());
    avoid_hour_edge();
    let body = json!({
        "domain": DOMAIN,
        "descriptors": [{ "entries": [{ "key": "json", "value": "j1" }] }],
    })
    .to_string();

    // `json` allows 2 an hour.
    for (expected_status, code, remaining) in
        [(200, "OK", 1), (200, "OK", 0), (429, "OVER_LIMIT", 0)]
    {
        let response = server.admin_post_json("/json", &body);
        assert_eq!(response.status, expected_status, "{response:?}");
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{response:?}"
        );
        // Protobuf's JSON mapping of RateLimitResponse: camelCase names, enums by name,
        // a Duration as seconds with an `s`.
        let answer = response.json();
        assert_eq!(answer["overallCode"], code, "{answer}");
        let status = &answer["statuses"][0];
        assert_eq!(status["code"], code, "{answer}");
        assert_eq!(status["limitRemaining"], remaining, "{answer}");
        assert_eq!(status["currentLimit"]["requestsPerUnit"], 2, "{answer}");
        assert_eq!(status["currentLimit"]["unit"], "HOUR", "{answer}");
        let reset = status["durationUntilReset"].as_str().unwrap_or_default();
        let seconds = reset.strip_suffix('s').and_then(|s| s.parse::<u64>().ok());
        assert!(
            seconds.is_some_and(|s| (1..=3_600).contains(&s)),
            "durationUntilReset {reset:?} is not a Duration within the hour: {answer}"
        );
    }

    // Both spellings protobuf's JSON parsers accept: a request for 2 hits fills the
    // window, a request for 1 more is over.
    for (body, expected_status, remaining) in [
        (
            r#"{"domain":"operations","descriptors":[{"entries":[{"key":"json","value":"j2"}]}],"hits_addend":2}"#,
            200,
            0,
        ),
        (
            r#"{"domain":"operations","descriptors":[{"entries":[{"key":"json","value":"j2"}]}],"hitsAddend":1}"#,
            429,
            0,
        ),
    ] {
        let response = server.admin_post_json("/json", body);
        assert_eq!(response.status, expected_status, "{body}: {response:?}");
        assert_eq!(
            response.json()["statuses"][0]["limitRemaining"],
            remaining,
            "{body}: {response:?}"
        );
    }

    // A descriptor with no limit is OK and carries no currentLimit.
    let free = server.admin_post_json(
        "/json",
        r#"{"domain":"operations","descriptors":[{"entries":[{"key":"unlisted","value":"x"}]}]}"#,
    );
    assert_eq!(free.status, 200, "{free:?}");
    let answer = free.json();
    assert_eq!(answer["overallCode"], "OK", "{answer}");
    assert!(
        answer["statuses"][0].get("currentLimit").is_none(),
        "{answer}"
    );

    for (what, body) in [
        ("not JSON", "domain=operations"),
        ("an empty body", ""),
        (
            "no domain",
            r#"{"descriptors":[{"entries":[{"key":"json","value":"j3"}]}]}"#,
        ),
        (
            "a domain that is not a string",
            r#"{"domain":5,"descriptors":[{"entries":[{"key":"json","value":"j3"}]}]}"#,
        ),
        (
            "an unknown field",
            r#"{"domain":"operations","descriptors":[{"entries":[{"key":"json","value":"j3"}]}],"limits":1}"#,
        ),
        (
            "an empty domain",
            r#"{"domain":"","descriptors":[{"entries":[{"key":"json","value":"j3"}]}]}"#,
        ),
        (
            "no descriptors",
            r#"{"domain":"operations","descriptors":[]}"#,
        ),
        (
            "an unknown unit",
            r#"{"domain":"operations","descriptors":[{"entries":[{"key":"json","value":"j3"}],"limit":{"requestsPerUnit":1,"unit":"FORTNIGHT"}}]}"#,
        ),
    ] {
        let response = server.admin_post_json("/json", body);
        assert_eq!(response.status, 400, "{what} ({body}): {response:?}");
        let error = response.json();
        assert!(error["error"].is_string(), "{what}: {error}");
    }

    // None of the refused bodies counted: j3 still has its 2.
    let response = server.admin_post_json(
        "/json",
        r#"{"domain":"operations","descriptors":[{"entries":[{"key":"json","value":"j3"}]}]}"#,
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["statuses"][0]["limitRemaining"], 1);
}

// ---------------------------------------------------------------------------------------
// TLS and mTLS

/// The PEM files meshlimit reads, in a directory of their own.
struct TlsDir {
    dir: tempfile::TempDir,
}

impl TlsDir {
    fn new() -> TlsDir {
        TlsDir {
            dir: tempfile::tempdir().expect("create a temp dir for certificates"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A decision over a new TLS connection, or why there was none.
async fn decide_over_tls(server: &Meshlimit, tls: ClientTlsConfig) -> Result<Code, String> {
    let channel = server
        .tls_channel(tls)
        .await
        .map_err(|err| format!("connect: {err:?}"))?;
    decide(channel, &[("client", "tls")])
        .await
        .map(|response| response.overall_code())
        .map_err(|status| format!("call: {status}"))
}

/// A decision over a new plain-text connection, or why there was none.
async fn decide_in_plain_text(server: &Meshlimit) -> Result<Code, String> {
    let channel = Channel::from_shared(server.grpc_url())
        .expect("valid gRPC URI")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|err| format!("connect: {err:?}"))?;
    decide(channel, &[("client", "plain")])
        .await
        .map(|response| response.overall_code())
        .map_err(|status| format!("call: {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_serves_only_clients_with_a_certificate_and_picks_up_a_rotated_one() {
    let ca = Ca::new("meshlimit test CA");
    let files = TlsDir::new();
    let first = ca.server_cert();
    first.write(&files.path("tls.crt"), &files.path("tls.key"));
    std::fs::write(files.path("ca.crt"), ca.pem()).expect("write the client CA");
    let server = Meshlimit::start_with(
        config(),
        &[
            "--tls-cert",
            &files.arg("tls.crt"),
            "--tls-key",
            &files.arg("tls.key"),
            "--tls-client-ca",
            &files.arg("ca.crt"),
        ],
    );
    let envoy = ca.client_cert("envoy");

    // A client with a certificate the CA signed gets decisions; keep its connection.
    let kept = server
        .tls_channel(ca.client_config(Some(&envoy)))
        .await
        .unwrap_or_else(|err| {
            panic!(
                "connect with a client certificate: {err:?}\n{}",
                server.logs()
            )
        });
    let response = decide(kept.clone(), &[("client", "envoy")])
        .await
        .unwrap_or_else(|status| {
            panic!(
                "decision with a client certificate: {status}\n{}",
                server.logs()
            )
        });
    assert_eq!(response.overall_code(), Code::Ok, "{response:?}");

    // Everyone else gets no decision.
    let stranger = Ca::new("another CA").client_cert("stranger");
    let refused = [
        (
            "no client certificate",
            decide_over_tls(&server, ca.client_config(None)).await,
        ),
        (
            "a certificate another CA signed",
            decide_over_tls(&server, ca.client_config(Some(&stranger))).await,
        ),
        ("plain text", decide_in_plain_text(&server).await),
    ];
    for (what, outcome) in refused {
        assert!(
            outcome.is_err(),
            "a client with {what} got a decision: {outcome:?}"
        );
    }

    // Rotation: new files on disk are served to new connections once the watcher (every
    // 5 s) has read them; no restart.
    let presented = ca.presented_certificate(server.grpc_addr, &envoy).await;
    assert_eq!(
        presented.as_ref(),
        Ok(&first.der),
        "the first certificate is served"
    );
    let second = ca.server_cert();
    second.write(&files.path("tls.crt"), &files.path("tls.key"));
    let rotated = Instant::now();
    let mut seen = Err(String::new());
    while rotated.elapsed() < Duration::from_secs(15) {
        seen = ca.presented_certificate(server.grpc_addr, &envoy).await;
        if seen.as_ref() == Ok(&second.der) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let waited = rotated.elapsed();
    assert_eq!(
        seen.as_ref(),
        Ok(&second.der),
        "the rotated certificate was not served within {waited:?}\n{}",
        server.logs()
    );
    assert!(
        waited < Duration::from_secs(12),
        "the rotated certificate took {waited:?} to be served; the watcher checks every 5 s"
    );

    // New connections get decisions under the new certificate; the old connection lives on.
    assert_eq!(
        decide_over_tls(&server, ca.client_config(Some(&envoy))).await,
        Ok(Code::Ok),
        "{}",
        server.logs()
    );
    let response = decide(kept, &[("client", "envoy")])
        .await
        .unwrap_or_else(|status| panic!("the connection opened before rotation: {status}"));
    assert_eq!(response.overall_code(), Code::Ok);
}

/// envoyproxy/ratelimit's GRPC_* TLS variables, GRPC_CLIENT_TLS_SAN among them: of the
/// clients the CA signed, only the one whose certificate holds that name gets decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_name_admits_only_the_certificate_that_holds_it() {
    let ca = Ca::new("meshlimit test CA");
    let files = TlsDir::new();
    ca.server_cert()
        .write(&files.path("tls.crt"), &files.path("tls.key"));
    std::fs::write(files.path("ca.crt"), ca.pem()).expect("write the client CA");
    let (cert, key, client_ca) = (
        files.arg("tls.crt"),
        files.arg("tls.key"),
        files.arg("ca.crt"),
    );
    let server = Meshlimit::start_with_env(
        config(),
        &[],
        &[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_CERT", &cert),
            ("GRPC_SERVER_TLS_KEY", &key),
            ("GRPC_CLIENT_TLS_CACERT", &client_ca),
            ("GRPC_CLIENT_TLS_SAN", "envoy.istio-system.svc"),
        ],
    );

    let envoy = ca.client_cert_for("envoy.istio-system.svc");
    assert_eq!(
        decide_over_tls(&server, ca.client_config(Some(&envoy))).await,
        Ok(Code::Ok),
        "{}",
        server.logs()
    );
    let other_workload = ca.client_cert_for("reports.default.svc");
    let common_name_only = ca.client_cert("envoy.istio-system.svc");
    for (what, issued) in [
        ("another name", &other_workload),
        ("the name only as its common name", &common_name_only),
    ] {
        let outcome = decide_over_tls(&server, ca.client_config(Some(issued))).await;
        assert!(
            outcome.is_err(),
            "a certificate with {what} got a decision: {outcome:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_a_client_ca_serves_clients_without_a_certificate() {
    let ca = Ca::new("meshlimit test CA");
    let files = TlsDir::new();
    let cert = ca.server_cert();
    cert.write(&files.path("tls.crt"), &files.path("tls.key"));
    let server = Meshlimit::start_with(
        config(),
        &[
            "--tls-cert",
            &files.arg("tls.crt"),
            "--tls-key",
            &files.arg("tls.key"),
        ],
    );

    assert_eq!(
        decide_over_tls(&server, ca.client_config(None)).await,
        Ok(Code::Ok),
        "{}",
        server.logs()
    );
    let client = ca.client_cert("envoy");
    assert_eq!(
        ca.presented_certificate(server.grpc_addr, &client).await,
        Ok(cert.der.clone())
    );
    // The client checks the server: a client trusting another CA does not go on.
    let other = Ca::new("another CA");
    let outcome = decide_over_tls(&server, other.client_config(None)).await;
    assert!(
        outcome.is_err(),
        "a client trusting another CA got {outcome:?}"
    );
    // The port speaks TLS only.
    let outcome = decide_in_plain_text(&server).await;
    assert!(outcome.is_err(), "a plain-text client got {outcome:?}");
}

// ---------------------------------------------------------------------------------------
// SIGTERM under load

const DRAIN: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(5);
/// Concurrent clients, each on its own HTTP/2 connection sending one request after another.
const CLIENTS: usize = 4;

/// One request of the load: when it was sent and answered, and how.
struct Record {
    sent: Instant,
    answered: Instant,
    outcome: Result<Code, String>,
}

/// Clients sending ShouldRateLimit back to back until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicU64>,
    clients: Vec<tokio::task::JoinHandle<Vec<Record>>>,
}

impl Load {
    fn start(runtime: &tokio::runtime::Runtime, server: &Meshlimit) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicU64::new(0));
        let clients = (0..CLIENTS)
            .map(|i| {
                let channel = runtime.block_on(server.channel());
                let (stop, answers) = (stop.clone(), answers.clone());
                runtime.spawn(async move {
                    let name = format!("load-{i}");
                    let mut records = Vec::new();
                    // Bounded even if nobody says stop.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        let sent = Instant::now();
                        let outcome = decide(channel.clone(), &[("client", &name)])
                            .await
                            .map(|response| response.overall_code())
                            .map_err(|status| status.to_string());
                        let failed = outcome.is_err();
                        if !failed {
                            answers.fetch_add(1, Ordering::SeqCst);
                        }
                        records.push(Record {
                            sent,
                            answered: Instant::now(),
                            outcome,
                        });
                        if failed {
                            // Once the port is closed every call fails at once.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    records
                })
            })
            .collect();
        Load {
            stop,
            answers,
            clients,
        }
    }

    fn answers(&self) -> u64 {
        self.answers.load(Ordering::SeqCst)
    }

    fn finish(self, runtime: &tokio::runtime::Runtime) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        let mut records = Vec::new();
        for client in self.clients {
            records.extend(runtime.block_on(client).expect("a load client panicked"));
        }
        records
    }
}

async fn serving_status(
    health: &mut HealthClient<Channel>,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    health
        .check(request)
        .await
        .map(|response| response.into_inner().status())
}

fn port_closed(server: &Meshlimit) -> bool {
    TcpStream::connect_timeout(&server.grpc_addr, Duration::from_millis(500)).is_err()
}

fn millis(duration: Duration) -> u128 {
    duration.as_millis()
}

#[test]
fn sigterm_fails_health_first_answers_through_the_drain_and_exits_cleanly() {
    let mut server =
        Meshlimit::start_with(config(), &["--drain-delay", "1s", "--shutdown-grace", "5s"]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the clients");
    let mut health = runtime.block_on(async { HealthClient::new(server.channel().await) });
    assert_eq!(
        runtime
            .block_on(serving_status(&mut health, "ratelimit"))
            .ok(),
        Some(ServingStatus::Serving)
    );

    let load = Load::start(&runtime, &server);
    let warm = poll_until(Duration::from_secs(10), || {
        (load.answers() >= 200).then_some(())
    });
    assert!(
        warm.is_some(),
        "the load got {} answers\n{}",
        load.answers(),
        server.logs()
    );

    let signalled = Instant::now();
    server.terminate();

    // Health fails at once, on the admin port and in grpc.health.v1.
    let unhealthy = poll_until(Duration::from_secs(2), || {
        (server.admin_get("/healthcheck").status == 500).then(Instant::now)
    })
    .unwrap_or_else(|| {
        panic!(
            "/healthcheck still answers 200 after SIGTERM\n{}",
            server.logs()
        )
    });
    assert!(
        unhealthy - signalled < Duration::from_millis(500),
        "/healthcheck turned 500 only {} ms after SIGTERM",
        millis(unhealthy - signalled)
    );
    assert_eq!(server.admin_get("/ready").status, 500);
    let grpc_health = poll_until(Duration::from_millis(500), || {
        let statuses = ["ratelimit", ""].map(|service| {
            runtime
                .block_on(serving_status(&mut health, service))
                .map_err(|status| status.to_string())
        });
        statuses
            .iter()
            .all(|status| *status == Ok(ServingStatus::NotServing))
            .then_some(statuses)
    });
    assert!(
        grpc_health.is_some(),
        "grpc.health.v1 did not report NOT_SERVING for `ratelimit` and ``\n{}",
        server.logs()
    );
    let checked = signalled.elapsed();
    assert!(
        checked < DRAIN,
        "the health checks took {} ms, past the drain: they show nothing about it",
        millis(checked)
    );

    // The gRPC port keeps accepting through the drain, then closes.
    let closed = poll_until(DRAIN + Duration::from_secs(3), || {
        port_closed(&server).then(Instant::now)
    })
    .unwrap_or_else(|| {
        panic!(
            "the gRPC port still accepts after the drain\n{}",
            server.logs()
        )
    });
    assert!(
        closed - signalled >= DRAIN - Duration::from_millis(100),
        "the gRPC port closed {} ms after SIGTERM, inside the {} ms drain",
        millis(closed - signalled),
        millis(DRAIN)
    );

    // ...and the process exits 0 within drain + grace.
    let limit = signalled + DRAIN + GRACE + Duration::from_secs(1);
    let status = server.wait_for_exit(limit.saturating_duration_since(Instant::now()));
    let exited = signalled.elapsed();
    assert!(
        status.is_some_and(|status| status.success()),
        "meshlimit did not exit 0 within {} ms of SIGTERM (exit: {status:?})\n{}",
        millis(DRAIN + GRACE),
        server.logs()
    );

    let records = load.finish(&runtime);
    // Requests sent while the port was still open were all answered: none failed in
    // flight. The probe that saw it closed runs every 50 ms; a request sent in the last
    // moments may meet the closing connection and be refused unprocessed, which HTTP/2
    // allows and Envoy retries.
    let open_until = closed - Duration::from_millis(100);
    let failed: Vec<String> = records
        .iter()
        .filter(|record| record.sent < open_until)
        .filter_map(|record| {
            let error = record.outcome.as_ref().err()?;
            Some(format!(
                "sent {} ms after SIGTERM: {error}",
                record.sent.saturating_duration_since(signalled).as_millis()
            ))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests sent before the port closed ({} ms after SIGTERM) failed:\n{}\n{}",
        failed.len(),
        records.len(),
        millis(closed - signalled),
        failed.join("\n"),
        server.logs()
    );
    // Decisions went on through the drain, after health had failed.
    let during_drain = records
        .iter()
        .filter(|r| r.sent >= unhealthy && r.answered < closed && r.outcome == Ok(Code::Ok))
        .count();
    let last_answer = records
        .iter()
        .filter(|r| r.outcome.is_ok())
        .map(|r| r.answered.saturating_duration_since(signalled))
        .max()
        .unwrap_or_default();
    assert!(
        during_drain >= 10 && last_answer >= DRAIN - Duration::from_millis(200),
        "{during_drain} answers to requests sent during the drain, the last {} ms after \
         SIGTERM\n{}",
        millis(last_answer),
        server.logs()
    );
    eprintln!(
        "SIGTERM: /healthcheck 500 after {} ms, port closed after {} ms, exit 0 after {} ms; \
         {} requests, {during_drain} answered during the drain",
        millis(unhealthy - signalled),
        millis(closed - signalled),
        millis(exited),
        records.len()
    );
}

// ---------------------------------------------------------------------------------------
// --memory-snapshot

/// The memory store's counters outlive a restart: after SIGTERM (the save at shutdown),
/// and after a SIGKILL (the periodic save), a client who had used up the hour is still
/// turned away. A snapshot that cannot be read is set aside and the replica starts anyway.
#[tokio::test]
async fn counters_outlive_a_restart_through_the_snapshot() {
    avoid_hour_edge();
    let dir = tempfile::tempdir().expect("a directory for the snapshot");
    let snapshot = dir.path().join("counters");
    let path = snapshot.display().to_string();
    let args = [
        "--memory-snapshot",
        path.as_str(),
        "--memory-snapshot-interval",
        "200ms",
    ];
    let code = |response: Result<RateLimitResponse, tonic::Status>| {
        response
            .map(|r| r.overall_code())
            .map_err(|s| s.to_string())
    };
    let ann = [("user", "snapshot-ann")];
    let bob = [("user", "snapshot-bob")];

    // The limit is 3 an hour. Saved only at shutdown, the first time.
    let at_shutdown = [args[0], args[1], args[2], "0s"];
    let mut first = Meshlimit::start_with(config(), &at_shutdown);
    for _ in 0..3 {
        assert_eq!(
            code(decide(first.channel().await, &ann).await),
            Ok(Code::Ok)
        );
    }
    assert_eq!(
        code(decide(first.channel().await, &ann).await),
        Ok(Code::OverLimit)
    );
    first.terminate();
    let exited = first.wait_for_exit(Duration::from_secs(30));
    assert_eq!(exited.and_then(|s| s.code()), Some(0), "{}", first.logs());

    let second = Meshlimit::start_with(config(), &args);
    assert!(
        second.logs().contains("counters restored"),
        "{}",
        second.logs()
    );
    assert_eq!(
        code(decide(second.channel().await, &ann).await),
        Ok(Code::OverLimit),
        "ann's hour carried over a SIGTERM\n{}",
        second.logs()
    );
    for _ in 0..3 {
        assert_eq!(
            code(decide(second.channel().await, &bob).await),
            Ok(Code::Ok)
        );
    }
    // Past a periodic save, then killed outright (SIGKILL, no save at shutdown).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        second.metric("meshlimit_snapshot_counters"),
        2,
        "ann's and bob's"
    );
    let saved_at = second.metric("meshlimit_snapshot_last_saved_timestamp_seconds");
    assert!(saved_at > 1_700_000_000, "a Unix time: {saved_at}");
    assert_eq!(second.metric("meshlimit_snapshot_failed_saves_total"), 0);
    drop(second);

    let third = Meshlimit::start_with(config(), &args);
    for (who, entries) in [("ann", &ann), ("bob", &bob)] {
        assert_eq!(
            code(decide(third.channel().await, entries).await),
            Ok(Code::OverLimit),
            "{who}'s hour carried over a SIGKILL\n{}",
            third.logs()
        );
    }
    drop(third);

    // One bit flipped, as a bad disk or a partial copy would.
    let mut bytes = std::fs::read(&snapshot).expect("read the snapshot");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&snapshot, bytes).expect("damage the snapshot");
    let fourth = Meshlimit::start_with(config(), &args);
    let logs = fourth.logs();
    assert!(
        logs.contains("cannot be read") && logs.contains("checksum"),
        "{logs}"
    );
    assert!(
        dir.path().join("counters.unreadable").exists(),
        "kept aside"
    );
    assert_eq!(
        code(decide(fourth.channel().await, &ann).await),
        Ok(Code::Ok),
        "started over, with no counters"
    );
    drop(fourth);

    // The volume goes away under a running replica: saves fail and say so on /metrics,
    // and decisions go on.
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume).expect("a directory to remove");
    let on_volume = volume.join("counters").display().to_string();
    let fifth = Meshlimit::start_with(
        config(),
        &[
            "--memory-snapshot",
            on_volume.as_str(),
            "--memory-snapshot-interval",
            "200ms",
        ],
    );
    std::fs::remove_dir_all(&volume).expect("remove the directory");
    let failed = poll_until(Duration::from_secs(10), || {
        (fifth.metric("meshlimit_snapshot_failed_saves_total") > 0).then_some(())
    });
    assert!(failed.is_some(), "{}", fifth.logs());
    assert!(fifth.logs().contains("cannot save the counter snapshot"));
    assert_eq!(
        code(decide(fifth.channel().await, &bob).await),
        Ok(Code::Ok)
    );

    // A directory that is not there at start is a setting to fix: refused, named.
    let missing = dir.path().join("no-such-dir/counters");
    let refused = meshlimit_refuses(&[
        "--config",
        &config().display().to_string(),
        "--memory-snapshot",
        &missing.display().to_string(),
    ]);
    assert!(refused.contains("no-such-dir does not exist"), "{refused}");
}

/// `meshlimit serve ARGS` (on free ports), which must stop at once with exit code 2; what
/// it wrote to stderr.
fn meshlimit_refuses(args: &[&str]) -> String {
    meshlimit_refuses_with(args, &[])
}

/// `meshlimit_refuses` with `env` set too.
fn meshlimit_refuses_with(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut serve = common::meshlimit::command();
    serve
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .args(["--grpc-addr", &common::free_loopback_addr().to_string()])
        .args(["--admin-addr", &common::free_loopback_addr().to_string()]);
    let (code, stderr) = common::meshlimit::exit_of(serve);
    assert_eq!(code, Some(2), "{stderr}");
    stderr
}

/// A typo in MESHLIMIT_LOG stops the start with what to write: tracing would read the
/// word as a module's name and log nothing else, so a config that fails to load would
/// go unreported.
#[test]
fn a_typo_in_meshlimit_log_stops_the_start() {
    let config = config().display().to_string();
    for typo in ["debugg", "verbose"] {
        let refused = meshlimit_refuses_with(&["--config", &config], &[("MESHLIMIT_LOG", typo)]);
        assert!(
            refused.contains(&format!("MESHLIMIT_LOG={typo}")) && refused.contains("write a level"),
            "{refused}"
        );
    }
}

/// Settings that would refuse every call, hold no counter or never (or always) count a hit
/// as near its limit stop the start, saying what to write.
#[test]
fn zero_and_out_of_range_settings_stop_the_start() {
    let config = config().display().to_string();
    for (flag, value, expected) in [
        ("--max-request-bytes", "0", "write 1 or more"),
        ("--max-descriptors", "0", "write 1 or more"),
        ("--max-entries", "0", "write 1 or more"),
        ("--cache-capacity", "0", "write how many to hold"),
        ("--near-limit-ratio", "2", "above 0 and at most 1"),
        ("--near-limit-ratio", "0", "above 0 and at most 1"),
    ] {
        let refused = meshlimit_refuses(&["--config", &config, flag, value]);
        assert!(
            refused.contains(flag) && refused.contains(expected),
            "{flag} {value}: {refused}"
        );
    }
    // Through envoyproxy/ratelimit's variable too.
    let refused = meshlimit_refuses_with(&["--config", &config], &[("NEAR_LIMIT_RATIO", "1.5")]);
    assert!(refused.contains("above 0 and at most 1"), "{refused}");
}

/// An empty config directory (a wrong mount path, an empty ConfigMap) starts and limits
/// nothing, as envoyproxy/ratelimit does, but says so at each load that finds it empty.
#[test]
fn an_empty_config_directory_is_warned_about_at_each_load() {
    const WARNING: &str = "no domain was loaded from";
    let dir = common::config_dir::plain(&[]);
    let server = Meshlimit::start_with(dir.path(), &["--watch-interval", "100ms"]);
    let logs = server.logs();
    assert!(
        logs.contains(WARNING) && logs.contains(&dir.path().display().to_string()),
        "{logs}"
    );
    let warnings = || server.logs().matches(WARNING).count();
    assert_eq!(warnings(), 1, "{}", server.logs());

    // A file arrives, then goes again: the reload that empties the directory warns too.
    common::config_dir::write_atomically(dir.path(), "d.yaml", "domain: d\ndescriptors: []\n");
    let reloaded = || server.metric("ratelimit_service_config_load_success");
    assert!(
        poll_until(Duration::from_secs(10), || (reloaded() >= 2).then_some(())).is_some(),
        "{}",
        server.logs()
    );
    assert_eq!(warnings(), 1, "{}", server.logs());
    std::fs::remove_file(dir.path().join("d.yaml")).expect("remove the file");
    assert!(
        poll_until(Duration::from_secs(10), || (warnings() == 2).then_some(())).is_some(),
        "{}",
        server.logs()
    );
}
