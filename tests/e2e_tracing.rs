//! Distributed tracing as an operator sees it in their trace backend: meshlimit's span of
//! each decision sits under the span real Envoy made for its ratelimit call, in the same
//! trace, both received by an OTLP collector (tests/wire/otlp_collector.py, which decodes
//! with OpenTelemetry's own protos). Also: envoyproxy/ratelimit's `TRACING_*` variables
//! over OTLP/HTTP, the caller's sampling decision, a span of each Redis call under the
//! decision's (telling when Redis was away and the failure mode answered), https://
//! collectors checked against the operator's CA, a collector that never answers, which
//! must cost no decision, and one that answers megabytes, which must not be read whole.
//!
//! Envoy's tracer and listener: tests/fixtures/envoy/ratelimit_tracing.yaml.

mod common;

use std::net::TcpListener;

use common::collector::Collector;
use common::meshlimit::Meshlimit;
use common::redis::RedisServer;
use common::stack::Stack;
use common::tls::Ca;
use common::{avoid_window_edge, fixture, poll_until};
use meshlimit::proto::RateLimitRequest;
use meshlimit::proto::rate_limit_response::Code;
use serde_json::Value;

/// One request a minute per user.
const LIMITS: &str = "\
domain: traced
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1}
";

/// Spans are sent a tenth of a second after they end, not OpenTelemetry's 5 s.
const QUICK_BATCHES: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");

fn text<'a>(span: &'a Value, field: &str) -> &'a str {
    span[field].as_str().unwrap_or_default()
}

fn from_service<'a>(spans: &'a [Value], service: &str) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|span| span["resource"]["service.name"] == service)
        .collect()
}

#[test]
fn meshlimits_span_is_the_child_of_envoys_ratelimit_call() {
    avoid_window_edge(60, 15);
    let collector = Collector::start();
    let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
    let otlp = format!("http://{}", collector.grpc_addr);
    let meshlimit = Meshlimit::start_with_env(
        config.path(),
        &["--otlp-endpoint", &otlp, "--otlp-protocol", "grpc"],
        &[QUICK_BATCHES],
    );
    let stack = Stack::start_around(
        meshlimit,
        fixture("envoy/ratelimit_tracing.yaml"),
        "traced",
        &[("OTLP_PORT", collector.grpc_addr.port().to_string())],
    );
    let allowed = stack.get_as("ann", "/first");
    stack.expect_status(&allowed, 200, "ann's first request in the minute");
    let refused = stack.get_as("ann", "/second");
    stack.expect_status(&refused, 429, "ann's second request in the minute");

    // Both traces whole: meshlimit's span, and the Envoy span it hangs under.
    let spans = collector.wait_for(
        "both of meshlimit's spans and their Envoy parents",
        |spans| {
            let ours = from_service(spans, "meshlimit");
            ours.len() == 2
                && ours.iter().all(|span| {
                    spans
                        .iter()
                        .any(|other| other["span_id"] == span["parent_span_id"])
                })
        },
    );
    let mut codes = Vec::new();
    for span in from_service(&spans, "meshlimit") {
        let parent = spans
            .iter()
            .find(|other| other["span_id"] == span["parent_span_id"])
            .expect("waited for above");
        assert_eq!(
            parent["resource"]["service.name"], "front-envoy",
            "{parent:#}"
        );
        assert_eq!(
            parent["trace_id"], span["trace_id"],
            "one trace: {span:#}\n{parent:#}"
        );
        // Envoy names its side of the call after the RPC; ours is the server side.
        assert!(
            text(parent, "name").contains("ShouldRateLimit"),
            "the parent should be Envoy's ratelimit call: {parent:#}"
        );
        assert_eq!(
            text(span, "name"),
            "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
        );
        assert_eq!(span["kind"], 2, "SPAN_KIND_SERVER: {span:#}");
        assert_eq!(span["via"], "grpc");
        assert_eq!(span["attributes"]["ratelimit.domain"], "traced");
        assert_eq!(span["attributes"]["ratelimit.descriptors"], 1);
        assert!(span["end"].as_u64() >= span["start"].as_u64());
        // And Envoy's request span is the root of the same trace.
        assert!(
            spans
                .iter()
                .any(|other| other["trace_id"] == span["trace_id"]
                    && text(other, "parent_span_id").is_empty()),
            "no root span in trace {}",
            span["trace_id"]
        );
        codes.push(
            span["attributes"]["ratelimit.overall_code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    codes.sort();
    assert_eq!(codes, ["OK", "OVER_LIMIT"]);
    assert_eq!(
        stack
            .meshlimit
            .metric("meshlimit_trace_spans_exported_total"),
        2
    );
}

fn call(user: &str) -> RateLimitRequest {
    common::meshlimit::one_entry_request("traced", "user", user)
}

/// ShouldRateLimit with `traceparent` set, as Envoy's OpenTelemetry tracer sets it.
/// One call from `user` to each of `servers`, each in a sampled trace of its own (ids from
/// `first_id` up), each expected OK.
async fn one_sampled_call_each(servers: &[&Meshlimit], user: &str, first_id: usize) {
    for (n, server) in servers.iter().enumerate() {
        let id = first_id + n;
        let traceparent = format!("00-{id:032x}-{id:016x}-01");
        assert_eq!(call_traced(server, user, &traceparent).await, Code::Ok);
    }
}

async fn call_traced(server: &Meshlimit, user: &str, traceparent: &str) -> Code {
    let mut client = server.client().await;
    let mut request = tonic::Request::new(call(user));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ASCII"));
    match client.should_rate_limit(request).await {
        Ok(answer) => answer.into_inner().overall_code(),
        Err(status) => panic!("{user}: {status}\n{}", server.logs()),
    }
}

/// Waits (up to 30 s) until `server` has counted `spans` dropped spans, and no more.
fn expect_dropped(server: &Meshlimit, spans: u64) {
    let dropped = poll_until(std::time::Duration::from_secs(30), || {
        let dropped = server.metric("meshlimit_trace_spans_dropped_total");
        (dropped == spans).then_some(dropped)
    });
    assert_eq!(dropped, Some(spans), "{}", server.logs());
}

#[tokio::test]
async fn envoyproxys_tracing_variables_export_over_http_following_the_callers_sampling() {
    let collector = Collector::start();
    let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
    let endpoint = format!("http://{}", collector.http_addr);
    let server = Meshlimit::start_with_env(
        config.path(),
        &[],
        &[
            ("TRACING_ENABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("TRACING_SERVICE_NAME", "edge-ratelimit"),
            ("TRACING_SERVICE_NAMESPACE", "edge"),
            // Nothing new is sampled here: only what a caller sampled is traced.
            ("TRACING_SAMPLING_RATE", "0"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=tr%40ce"),
            QUICK_BATCHES,
        ],
    );
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let untraced = call_traced(&server, "bob", unsampled).await;
    assert_eq!(untraced, Code::Ok);
    let mut client = server.client().await;
    let no_context = client.should_rate_limit(call("carol")).await;
    assert!(no_context.is_ok());
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert_eq!(call_traced(&server, "dave", sampled).await, Code::Ok);

    let spans = collector.wait_for("the sampled call's span", |spans| !spans.is_empty());
    // Spans leave in the order they end, so the two untraced calls would have come first.
    assert_eq!(
        spans.len(),
        1,
        "only the sampled call is traced: {spans:#?}"
    );
    let span = &spans[0];
    assert_eq!(span["via"], "http");
    assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(span["resource"]["service.name"], "edge-ratelimit");
    assert_eq!(span["resource"]["service.namespace"], "edge");
    assert_eq!(span["scope"], "meshlimit");
    assert_eq!(span["headers"]["x-api-key"], "tr@ce");
    assert_eq!(span["headers"]["content-type"], "application/x-protobuf");
    assert_eq!(span["attributes"]["ratelimit.overall_code"], "OK");
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_no_decision() {
    // Takes connections into its backlog and never reads them.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind a silent collector");
    let endpoint = format!("http://{}", silent.local_addr().expect("its address"));
    let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
    let server = Meshlimit::start_with_env(
        config.path(),
        &["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"],
        &[QUICK_BATCHES, ("OTEL_EXPORTER_OTLP_TIMEOUT", "300")],
    );
    let sampled = |n: usize| format!("00-{:032x}-{:016x}-01", n + 1, n + 1);
    for n in 0..20 {
        let code = call_traced(&server, &format!("user-{n}"), &sampled(n)).await;
        assert_eq!(code, Code::Ok, "call {n}");
    }
    // A user over the limit is still refused: decisions go on as without tracing.
    assert_eq!(
        call_traced(&server, "user-0", &sampled(99)).await,
        Code::OverLimit
    );
    expect_dropped(&server, 21);
    assert_eq!(server.metric("meshlimit_trace_spans_exported_total"), 0);
    assert!(
        server
            .logs()
            .contains("cannot export spans to the OTLP collector"),
        "{}",
        server.logs()
    );
}

#[tokio::test]
async fn each_redis_call_is_a_child_span_that_tells_when_redis_was_away() {
    let collector = Collector::start();
    let mut redis = RedisServer::start();
    let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
    let otlp = format!("http://{}", collector.grpc_addr);
    let server = Meshlimit::start_with_env(
        config.path(),
        &[
            "--otlp-endpoint",
            &otlp,
            "--otlp-protocol",
            "grpc",
            "--store",
            "redis",
            "--redis-url",
            &redis.url(),
            "--redis-failure-mode",
            "deny",
        ],
        &[QUICK_BATCHES],
    );
    let counted = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-00000000000000a1-01";
    assert_eq!(call_traced(&server, "erin", counted).await, Code::Ok);
    redis.kill();
    let denied = "00-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-00000000000000b1-01";
    assert_eq!(call_traced(&server, "frank", denied).await, Code::OverLimit);

    let spans = collector.wait_for("two decisions with a Redis call each", |spans| {
        spans.iter().filter(|span| span["name"] == "redis").count() == 2
    });
    for (trace, failed) in [("aaaaaaaa", false), ("bbbbbbbb", true)] {
        let in_trace: Vec<&Value> = spans
            .iter()
            .filter(|span| text(span, "trace_id").starts_with(trace))
            .collect();
        assert_eq!(in_trace.len(), 2, "trace {trace}: {in_trace:#?}");
        let decision = in_trace
            .iter()
            .find(|span| text(span, "name").ends_with("/ShouldRateLimit"))
            .expect("the decision's span");
        let call = in_trace
            .iter()
            .find(|span| span["name"] == "redis")
            .expect("the Redis call's span");
        assert_eq!(call["parent_span_id"], decision["span_id"], "{call:#}");
        assert_eq!(call["kind"], 3, "SPAN_KIND_CLIENT: {call:#}");
        assert_eq!(call["attributes"]["db.system.name"], "redis");
        assert_eq!(call["attributes"]["ratelimit.checks"], 1);
        assert!(call["start"].as_u64() >= decision["start"].as_u64());
        assert!(call["end"].as_u64() <= decision["end"].as_u64());
        if failed {
            assert_eq!(call["status_code"], 2, "STATUS_CODE_ERROR: {call:#}");
            assert_eq!(
                call["status_message"],
                "Redis did not answer; decided by --redis-failure-mode deny"
            );
            assert_eq!(
                decision["attributes"]["ratelimit.overall_code"],
                "OVER_LIMIT"
            );
        } else {
            assert_eq!(call["status_code"], 0, "{call:#}");
        }
    }
}

#[tokio::test]
async fn https_collectors_are_reached_when_their_ca_is_trusted() {
    let ca = Ca::new("otlp test CA");
    let collector = Collector::start_tls(&ca.server_cert());
    let dir = tempfile::tempdir().expect("a temp dir");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write the CA");
    let ca_path = ca_path.to_str().expect("a UTF-8 path");
    let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
    let grpc = format!("https://{}", collector.grpc_addr);
    let http = format!("https://{}", collector.http_addr);
    let trusted = [QUICK_BATCHES, ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_path)];
    let over_grpc = Meshlimit::start_with_env(
        config.path(),
        &["--otlp-endpoint", &grpc, "--otlp-protocol", "grpc"],
        &trusted,
    );
    let over_http = Meshlimit::start_with_env(config.path(), &["--otlp-endpoint", &http], &trusted);
    // Without the CA, the collector's certificate is not trusted (the system's roots do not
    // hold the test CA): spans are dropped, decisions go on.
    let untrusting =
        Meshlimit::start_with_env(config.path(), &["--otlp-endpoint", &http], &[QUICK_BATCHES]);
    one_sampled_call_each(&[&over_grpc, &over_http, &untrusting], "gina", 0xca00).await;
    let spans = collector.wait_for("a span over each TLS transport", |spans| spans.len() >= 2);
    let mut via: Vec<&str> = spans.iter().map(|span| text(span, "via")).collect();
    via.sort_unstable();
    assert_eq!(via, ["grpc", "http"], "{spans:#?}");
    expect_dropped(&untrusting, 1);
    assert!(
        untrusting.logs().contains("cannot export spans"),
        "{}",
        untrusting.logs()
    );
    assert_eq!(
        collector.spans().len(),
        2,
        "nothing arrived from the untrusting one"
    );
}

#[tokio::test]
async fn a_collector_asking_for_a_client_certificate_gets_the_one_configured() {
    let ca = Ca::new("otlp mTLS CA");
    let collector = Collector::start_mtls(&ca.server_cert(), &ca);
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = |name: &str| dir.path().join(name).to_str().expect("UTF-8").to_owned();
    std::fs::write(file("ca.pem"), ca.pem()).expect("write the CA");
    let (cert, key) = (file("client.pem"), file("client-key.pem"));
    ca.client_cert("meshlimit")
        .write(cert.as_ref(), key.as_ref());
    let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
    let grpc = format!("https://{}", collector.grpc_addr);
    let http = format!("https://{}", collector.http_addr);
    let ca_file = file("ca.pem");
    let trusted = [
        QUICK_BATCHES,
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_file.as_str()),
    ];
    let identified = [
        trusted[0],
        trusted[1],
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert.as_str()),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key.as_str()),
    ];
    let over_grpc = Meshlimit::start_with_env(
        config.path(),
        &["--otlp-endpoint", &grpc, "--otlp-protocol", "grpc"],
        &identified,
    );
    let over_http =
        Meshlimit::start_with_env(config.path(), &["--otlp-endpoint", &http], &identified);
    // It trusts the collector but has no certificate to show: refused, spans dropped.
    let anonymous = Meshlimit::start_with_env(config.path(), &["--otlp-endpoint", &http], &trusted);
    one_sampled_call_each(&[&over_grpc, &over_http, &anonymous], "hal", 0xc1e0).await;
    let spans = collector.wait_for("a span over each mTLS transport", |spans| spans.len() >= 2);
    let mut via: Vec<&str> = spans.iter().map(|span| text(span, "via")).collect();
    via.sort_unstable();
    assert_eq!(via, ["grpc", "http"], "{spans:#?}");
    expect_dropped(&anonymous, 1);
    assert_eq!(collector.spans().len(), 2, "nothing from the anonymous one");
}

#[tokio::test]
async fn a_busy_collector_is_tried_again_and_gets_the_spans() {
    // Two refusals each: one transport's first export is refused twice and taken on the
    // third try, within the export timeout.
    for (protocol, refusals) in [("http/protobuf", 2), ("grpc", 2)] {
        let collector = Collector::start_refusing(refusals);
        let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
        let endpoint = match protocol {
            "grpc" => format!("http://{}", collector.grpc_addr),
            _ => format!("http://{}", collector.http_addr),
        };
        let server = Meshlimit::start_with_env(
            config.path(),
            &["--otlp-endpoint", &endpoint, "--otlp-protocol", protocol],
            &[QUICK_BATCHES],
        );
        let traceparent = format!("00-{:032x}-{:016x}-01", 0xb05e, 0xb05e);
        assert_eq!(call_traced(&server, "ivy", &traceparent).await, Code::Ok);
        collector.wait_for("the span, after the refusals", |spans| spans.len() == 1);
        let exported = poll_until(std::time::Duration::from_secs(10), || {
            (server.metric("meshlimit_trace_spans_exported_total") == 1).then_some(())
        });
        assert!(exported.is_some(), "{protocol}: {}", server.logs());
        assert_eq!(
            server.metric("meshlimit_trace_spans_dropped_total"),
            0,
            "{protocol}: {}",
            server.logs()
        );
    }
}

#[tokio::test]
async fn a_collector_answering_megabytes_is_not_read_past_a_limit() {
    // Answers every export 200 with a 64 MiB body, streamed until the exporter hangs up.
    let flood = TcpListener::bind("127.0.0.1:0").expect("bind a flooding collector");
    let endpoint = format!("http://{}", flood.local_addr().expect("its address"));
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for connection in flood.incoming().take(4) {
            let Ok(mut connection) = connection else {
                continue;
            };
            let mut request = [0u8; 4096];
            let _ = connection.read(&mut request);
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n\
                        Content-Length: 67108864\r\n\r\n";
            if connection.write_all(head.as_bytes()).is_err() {
                continue;
            }
            let chunk = [0u8; 65_536];
            for _ in 0..1_024 {
                if connection.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    let config = common::config_dir::plain(&[("traced.yaml", LIMITS)]);
    let server = Meshlimit::start_with_env(
        config.path(),
        &["--otlp-endpoint", &endpoint],
        &[QUICK_BATCHES],
    );
    let traceparent = "00-dddddddddddddddddddddddddddddddd-00000000000000d1-01";
    assert_eq!(call_traced(&server, "hank", traceparent).await, Code::Ok);
    expect_dropped(&server, 1);
    assert!(
        server.logs().contains("length limit exceeded"),
        "{}",
        server.logs()
    );
}
