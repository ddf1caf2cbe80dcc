//! Config from an xDS management server, as Envoy Gateway hands it to envoyproxy/ratelimit
//! (`CONFIG_TYPE=GRPC_XDS_SOTW`): the server (tests/wire/xds_server.py, with Envoy's own
//! discovery protos and an independent definition of `RateLimitConfig`) publishes
//! snapshots; meshlimit subscribes, applies and acknowledges each, refuses a broken one with
//! a NACK while the last good config keeps deciding, survives the server's death, and
//! resubscribes with the version it holds when the server comes back. Decisions are checked
//! through a real Envoy where the operator would see them.

mod common;

use common::meshlimit::Meshlimit;
use common::stack::Stack;
use common::tls::Ca;
use common::xds::{ServerTls, XdsServer};
use common::{avoid_window_edge, fixture, poll_until};
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use prost_types::value::Kind;
use serde_json::{Value, json};
use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A RateLimitConfig resource: domain `gateway`, `per_user` requests a minute per user,
/// and `exempt` users unlimited.
fn gateway_config(per_user: u32, exempt: &[&str]) -> Value {
    let mut descriptors = vec![json!({
        "key": "user",
        "rate_limit": {"unit": "MINUTE", "requests_per_unit": per_user, "name": "per-user"},
    })];
    for user in exempt {
        descriptors.push(json!({
            "key": "user",
            "value": user,
            "rate_limit": {"unlimited": true},
        }));
    }
    json!([{ "name": "gateway/ratelimit", "domain": "gateway", "descriptors": descriptors }])
}

/// Envoy Gateway's environment for its rate limit Deployment, aimed at `server`.
fn gateway_env(server: &XdsServer) -> Vec<(&'static str, String)> {
    vec![
        ("CONFIG_TYPE", "GRPC_XDS_SOTW".to_owned()),
        ("CONFIG_GRPC_XDS_SERVER_URL", server.address()),
        ("CONFIG_GRPC_XDS_NODE_ID", "envoy-gateway".to_owned()),
        ("CONFIG_GRPC_XDS_NODE_METADATA", "zone:eu-1".to_owned()),
        (
            "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS",
            "x-tenant:blue".to_owned(),
        ),
        (
            "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL",
            "200ms".to_owned(),
        ),
        // Set by Envoy Gateway too; with xDS no file is read.
        ("RUNTIME_ROOT", "/nonexistent".to_owned()),
        ("USE_STATSD", "false".to_owned()),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect()
}

fn is_ack(request: &Value, version: &str) -> bool {
    request["version_info"] == version
        && request["response_nonce"] != ""
        && request["error"].is_null()
}

async fn decide(server: &Meshlimit, user: &str) -> Result<Code, tonic::Status> {
    let mut client = server.client().await;
    let request = RateLimitRequest {
        domain: "gateway".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "user".into(),
                value: user.into(),
            }],
            limit: None,
            hits_addend: None,
        }],
        hits_addend: 0,
    };
    let response = client.should_rate_limit(request).await?.into_inner();
    Ok(Code::try_from(response.overall_code).expect("a known code"))
}

/// What the gRPC health service says of `ratelimit`, as a Kubernetes gRPC probe asks.
async fn grpc_health(server: &Meshlimit) -> ServingStatus {
    let mut client = HealthClient::new(server.channel().await);
    let answer = client
        .check(HealthCheckRequest {
            service: "ratelimit".into(),
        })
        .await
        .expect("the health service answers")
        .into_inner();
    ServingStatus::try_from(answer.status).expect("a known status")
}

#[test]
fn envoy_gateways_configs_are_applied_acknowledged_and_a_broken_one_refused() {
    avoid_window_edge(60, 20);
    let xds = XdsServer::start();
    xds.publish("1", gateway_config(1, &[]));
    let mut env = gateway_env(&xds);
    // Envoy Gateway's Prometheus settings, with its statsd_exporter mapping.
    let metrics_addr = common::free_loopback_addr();
    let mapping = fixture("prometheus/envoy_gateway_mapping.yaml");
    env.extend([
        ("USE_PROMETHEUS", "true".to_owned()),
        ("PROMETHEUS_ADDR", metrics_addr.to_string()),
        ("PROMETHEUS_MAPPER_YAML", mapping.display().to_string()),
    ]);
    let meshlimit = Meshlimit::start_envoyproxy_style(&borrowed(&env));
    let stack = Stack::start_around(
        meshlimit,
        fixture("envoy/ratelimit_http.yaml"),
        "gateway",
        &[],
    );

    // The subscription introduces meshlimit as Envoy Gateway's node, then acknowledges.
    let subscription = xds.wait_for_request("a subscription", |r| r["response_nonce"] == "");
    assert_eq!(subscription["node_id"], "envoy-gateway", "{subscription:#}");
    assert_eq!(subscription["node_metadata"]["zone"], "eu-1");
    assert_eq!(subscription["user_agent_name"], "meshlimit");
    assert_eq!(
        subscription["headers"]["x-tenant"], "blue",
        "{subscription:#}"
    );
    assert_eq!(
        subscription["type_url"],
        "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig"
    );
    assert_eq!(subscription["version_info"], "", "nothing applied yet");
    xds.wait_for_request("the ACK of version 1", |r| is_ack(r, "1"));

    let first = stack.get_as("ann", "/a");
    stack.expect_status(&first, 200, "ann's first request under version 1");
    let second = stack.get_as("ann", "/b");
    stack.expect_status(
        &second,
        429,
        "ann's second request under version 1 (1 a minute)",
    );

    // Version 2 exempts ann: applied without a restart, and acknowledged.
    xds.publish("2", gateway_config(1, &["ann"]));
    xds.wait_for_request("the ACK of version 2", |r| is_ack(r, "2"));
    let exempt = stack.get_as("ann", "/c");
    stack.expect_status(&exempt, 200, "ann, exempt under version 2");

    // Version 3 has a limit without a unit: refused whole with the loader's words, and
    // version 2 keeps deciding.
    xds.publish(
        "3",
        json!([{
            "name": "gateway/broken",
            "domain": "gateway",
            "descriptors": [{"key": "user", "rate_limit": {"requests_per_unit": 5}}],
        }]),
    );
    let nack = xds.wait_for_request("a NACK of version 3", |r| !r["error"].is_null());
    assert_eq!(
        nack["version_info"], "2",
        "a NACK names the last good version: {nack:#}"
    );
    assert_eq!(nack["error_code"], 3, "INVALID_ARGUMENT: {nack:#}");
    let error = nack["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("xds:gateway/broken") && error.contains("unit"),
        "the NACK should name the resource and the problem: {error}"
    );
    let still_exempt = stack.get_as("ann", "/d");
    stack.expect_status(&still_exempt, 200, "ann, still exempt: version 2 serves on");
    let bob = stack.get_as("bob", "/a");
    stack.expect_status(&bob, 200, "bob's first request");
    let bob_again = stack.get_as("bob", "/b");
    stack.expect_status(&bob_again, 429, "bob's second: version 2's 1 a minute");
    assert_eq!(
        stack
            .meshlimit
            .metric("ratelimit_service_config_load_error"),
        1,
        "{}",
        stack.logs()
    );
    assert_eq!(
        stack
            .meshlimit
            .metric("ratelimit_service_config_load_success"),
        2
    );
    assert_eq!(stack.meshlimit.metric("meshlimit_xds_connected"), 1);

    // On PROMETHEUS_ADDR, the series Envoy Gateway's mapping gives: ann's and bob's second
    // requests over the limit, the response time in milliseconds as there (a 1 000 ms
    // bound), and what the mapping drops absent.
    let text = common::http::get(metrics_addr, "/metrics", &[])
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()))
        .text();
    let over = r#"ratelimit_service_rate_limit_over_limit{domain="gateway",key1="user"}"#;
    assert_eq!(common::meshlimit::sample(&text, over), Some(2), "{text}");
    let slowest = r#"ratelimit_service_response_time_seconds_bucket{grpc_method="ShouldRateLimit",le="1000"}"#;
    assert!(
        common::meshlimit::sample(&text, slowest) >= Some(6),
        "{text}"
    );
    for dropped in [
        "global_shadow_mode",
        "over_limit_with_local_cache",
        "ratelimit_server_",
    ] {
        assert!(!text.contains(dropped), "{dropped} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_server_costs_no_decision_and_is_rejoined_with_the_version_held() {
    avoid_window_edge(60, 20);
    let mut xds = XdsServer::start();
    xds.publish("7", gateway_config(2, &[]));
    let url = xds.url();
    let meshlimit = Meshlimit::start_without_dir(
        &[
            "--xds-server",
            &url,
            "--xds-node-id",
            "edge-rl",
            "--xds-retry-interval",
            "200ms",
        ],
        &[],
    );
    xds.wait_for_request("the ACK of version 7", |r| is_ack(r, "7"));

    xds.kill();
    // Decisions go on under version 7: two a minute.
    for expected in [Code::Ok, Code::Ok, Code::OverLimit] {
        let code = decide(&meshlimit, "cy").await.unwrap_or_else(|status| {
            panic!(
                "a decision failed with the server gone: {status}\n{}",
                meshlimit.logs()
            )
        });
        assert_eq!(code, expected, "{}", meshlimit.logs());
    }
    let disconnected = poll_until(Duration::from_secs(10), || {
        (meshlimit.metric("meshlimit_xds_connected") == 0).then_some(())
    });
    assert!(disconnected.is_some(), "{}", meshlimit.logs());

    // The server comes back with a new snapshot: meshlimit resubscribes holding 7.
    let before = xds.requests().len();
    xds.publish("8", gateway_config(2, &["cy"]));
    xds.restart();
    let resubscription = xds.wait_for_request_after(before, "a resubscription", |r| {
        r["response_nonce"] == "" && r["node_id"] == "edge-rl"
    });
    assert_eq!(
        resubscription["version_info"], "7",
        "the resubscription names the version applied: {resubscription:#}"
    );
    xds.wait_for_request("the ACK of version 8", |r| is_ack(r, "8"));
    assert_eq!(
        decide(&meshlimit, "cy").await.unwrap(),
        Code::Ok,
        "cy exempt under 8"
    );
    assert!(
        meshlimit.logs().contains("reconnecting in"),
        "the lost server should be in the log: {}",
        meshlimit.logs()
    );
}

/// A descriptor's `metadata` (envoyproxy/ratelimit's field 8, a `google.protobuf.Struct`),
/// served by the management server, reaches the response's dynamic metadata with
/// `--dynamic-metadata`, as a file's `metadata:` block does: nested values and numbers
/// intact, and only while the rule lets the request pass.
#[tokio::test(flavor = "multi_thread")]
async fn descriptor_metadata_from_the_server_reaches_the_response() {
    avoid_window_edge(60, 20);
    let xds = XdsServer::start();
    let mut config = gateway_config(1, &[]);
    config[0]["descriptors"][0]["metadata"] = json!({"billing": {"tier": "gold", "seats": 3}});
    xds.publish("1", config);
    let url = xds.url();
    let meshlimit =
        Meshlimit::start_without_dir(&["--xds-server", &url, "--dynamic-metadata", "true"], &[]);
    xds.wait_for_request("the ACK of version 1", |r| is_ack(r, "1"));

    let mut client = meshlimit.client().await;
    let mut billing = Vec::new();
    for _ in 0..2 {
        let request = common::meshlimit::one_entry_request("gateway", "user", "dee");
        let response = client
            .should_rate_limit(request)
            .await
            .unwrap_or_else(|status| panic!("{status}\n{}", meshlimit.logs()))
            .into_inner();
        let metadata = response.dynamic_metadata.unwrap_or_default();
        billing.push(field(&metadata, &["metadata", "billing"]).cloned());
    }
    let Some(Kind::StructValue(first)) = &billing[0] else {
        panic!("no billing metadata: {billing:?}\n{}", meshlimit.logs());
    };
    assert_eq!(
        field(first, &["tier"]),
        Some(&Kind::StringValue("gold".into()))
    );
    assert_eq!(field(first, &["seats"]), Some(&Kind::NumberValue(3.0)));
    // The second is over the limit of one a minute: the rule did not let it pass.
    assert_eq!(billing[1], None, "{billing:?}");
}

/// The value at `path` in `metadata`, each step a field of a nested struct.
fn field<'s>(metadata: &'s prost_types::Struct, path: &[&str]) -> Option<&'s Kind> {
    let (last, steps) = path.split_last()?;
    let mut at = metadata;
    for step in steps {
        match at.fields.get(*step)?.kind.as_ref()? {
            Kind::StructValue(inner) => at = inner,
            _ => return None,
        }
    }
    at.fields.get(*last)?.kind.as_ref()
}

#[tokio::test(flavor = "multi_thread")]
async fn before_the_first_config_health_fails_unless_asked_to_serve() {
    let xds = XdsServer::start();
    let url = xds.url();
    let waiting = Meshlimit::start_unready(
        &[
            "--xds-server",
            &url,
            "--xds-node-id",
            "gateway-7",
            "--xds-initial-fetch-timeout",
            "300ms",
        ],
        &[],
    );
    let serving = Meshlimit::start_unready(
        &["--xds-server", &url, "--xds-serve-before-config", "true"],
        &[],
    );
    xds.wait_for_request("both subscriptions", |_| xds.requests().len() >= 2);

    let health = waiting.admin_get("/healthcheck");
    assert_eq!(health.status, 500, "no config yet: {}", waiting.logs());
    let status = decide(&waiting, "dee")
        .await
        .expect_err("no config to decide with");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert_eq!(grpc_health(&waiting).await, ServingStatus::NotServing);

    // Asked to serve before a config (FORCE_START_WITHOUT_INITIAL_CONFIG): healthy, but
    // still UNAVAILABLE, so Envoy's failure_mode_deny decides, as with envoyproxy/ratelimit.
    let health = serving.admin_get("/healthcheck");
    assert_eq!(health.status, 200, "{}", serving.logs());
    assert_eq!(grpc_health(&serving).await, ServingStatus::Serving);
    let status = decide(&serving, "dee")
        .await
        .expect_err("no config to decide with yet");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");

    // A subscription left unanswered is called out, with the node id a control plane
    // without a config for it would ignore.
    let warned = poll_until(Duration::from_secs(10), || {
        let logs = waiting.logs();
        logs.contains("has sent no config").then_some(logs)
    })
    .unwrap_or_else(|| panic!("no warning of the silence:\n{}", waiting.logs()));
    assert!(warned.contains("node \"gateway-7\""), "{warned}");
    // The stream is open, though the server has said nothing: it is not a lost server.
    assert_eq!(waiting.metric("meshlimit_xds_connected"), 1);

    // The first config arrives: both serve, and limit.
    xds.publish("1", gateway_config(1, &[]));
    for server in [&waiting, &serving] {
        let healthy = poll_until(Duration::from_secs(10), || {
            (server.admin_get("/healthcheck").status == 200).then_some(())
        });
        assert!(healthy.is_some(), "{}", server.logs());
    }
    let mut status = ServingStatus::NotServing;
    for _ in 0..100 {
        status = grpc_health(&waiting).await;
        if status == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::Serving, "{}", waiting.logs());
    avoid_window_edge(60, 5);
    assert_eq!(decide(&waiting, "eve").await.unwrap(), Code::Ok);
    assert_eq!(decide(&waiting, "eve").await.unwrap(), Code::OverLimit);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mtls_server_gives_its_config_only_to_a_client_it_signed() {
    let ca = Ca::new("xds test CA");
    let server_cert = ca.server_cert();
    let xds = XdsServer::start_with(Some(ServerTls {
        issued: &server_cert,
        client_ca: Some(&ca),
    }));
    xds.publish("1", gateway_config(1, &[]));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca_file) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
    );
    ca.client_cert("envoy-ratelimit").write(&cert, &key);
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    // Envoy Gateway's TLS settings: the server's name is the one its certificate holds.
    let mut env = vec![
        ("CONFIG_TYPE", "GRPC_XDS_SOTW".to_owned()),
        (
            "CONFIG_GRPC_XDS_SERVER_URL",
            format!("{}:{}", common::tls::SERVER_NAME, xds.port),
        ),
        ("CONFIG_GRPC_XDS_SERVER_USE_TLS", "true".to_owned()),
        ("CONFIG_GRPC_XDS_SERVER_TLS_CACERT", path(&ca_file)),
        ("CONFIG_GRPC_XDS_CLIENT_TLS_CERT", path(&cert)),
        ("CONFIG_GRPC_XDS_CLIENT_TLS_KEY", path(&key)),
    ];
    let trusted = Meshlimit::start_envoyproxy_style(&borrowed(&env));
    avoid_window_edge(60, 5);
    assert_eq!(decide(&trusted, "fay").await.unwrap(), Code::Ok);
    assert_eq!(decide(&trusted, "fay").await.unwrap(), Code::OverLimit);

    // Without a client certificate the server refuses the handshake: no config, ever.
    env.retain(|(name, _)| !name.starts_with("CONFIG_GRPC_XDS_CLIENT_TLS"));
    env.push((
        "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL",
        "200ms".to_owned(),
    ));
    let stranger = Meshlimit::start_envoyproxy_style_unready(&borrowed(&env));
    let complained = poll_until(Duration::from_secs(15), || {
        stranger.logs().contains("reconnecting in").then_some(())
    });
    assert!(complained.is_some(), "{}", stranger.logs());
    assert_eq!(stranger.admin_get("/healthcheck").status, 500);
}

/// A strict gRPC server checks that a stream over TLS says `:scheme https`: meshlimit dials
/// through its own TLS, and must still name the https:// origin. The server here is a raw
/// HTTP/2 one, to see the pseudo-headers grpcio hides.
#[tokio::test(flavor = "multi_thread")]
async fn over_tls_the_stream_says_https_and_the_servers_name() {
    let ca = Ca::new("xds scheme CA");
    let acceptor = common::tls::h2_acceptor(&ca.server_cert());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = format!("https://{}:{port}", common::tls::SERVER_NAME);
    let meshlimit = Meshlimit::start_unready(
        &[
            "--xds-server",
            &server,
            "--xds-ca",
            ca_file.to_str().unwrap(),
        ],
        &[],
    );
    let first_request = async {
        let (tcp, _) = listener.accept().await.expect("meshlimit connects");
        let tls = acceptor.accept(tcp).await.expect("the TLS handshake");
        let mut connection = h2::server::handshake(tls)
            .await
            .expect("the HTTP/2 handshake");
        let (request, _respond) = connection
            .accept()
            .await
            .expect("a stream")
            .expect("a valid stream");
        request.uri().clone()
    };
    let uri = tokio::time::timeout(Duration::from_secs(30), first_request)
        .await
        .unwrap_or_else(|_| panic!("no stream within 30 s\n{}", meshlimit.logs()));
    assert_eq!(uri.scheme_str(), Some("https"), "{uri}");
    assert_eq!(
        uri.authority().map(|a| a.as_str().to_owned()),
        Some(format!("{}:{port}", common::tls::SERVER_NAME))
    );
    assert_eq!(
        uri.path(),
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    );
}
