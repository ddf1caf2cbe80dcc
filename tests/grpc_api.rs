//! The gRPC surface of the real binary, as a client such as Envoy sees it: the
//! ShouldRateLimit answers, the errors for malformed requests, health and reflection.
//!
//! Limits: tests/fixtures/config/api.yaml.

mod common;

use common::fixture;
use common::meshlimit::Meshlimit;
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::{Code, DescriptorStatus, rate_limit::Unit};
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use tonic::Code as GrpcCode;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

// Startup blocks the test's thread for a moment; nothing else runs on that runtime yet.
fn start() -> Meshlimit {
    Meshlimit::start(fixture("config"))
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: (*key).to_owned(),
                value: (*value).to_owned(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors,
        hits_addend: 0,
    }
}

async fn should_rate_limit(server: &Meshlimit, request: RateLimitRequest) -> RateLimitResponse {
    let mut client = server.client().await;
    match client.should_rate_limit(request.clone()).await {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("{request:?} failed: {status}\n{}", server.logs()),
    }
}

/// What a status says, comparable in one `assert_eq!`: (code, `Some((requests_per_unit,
/// unit))` or `None` when no limit applies, limit_remaining).
type Summary = (Code, Option<(u32, Unit)>, u32);

fn summary(status: &DescriptorStatus) -> Summary {
    (
        status.code(),
        status
            .current_limit
            .as_ref()
            .map(|limit| (limit.requests_per_unit, limit.unit())),
        status.limit_remaining,
    )
}

fn summaries(response: &RateLimitResponse) -> Vec<Summary> {
    response.statuses.iter().map(summary).collect()
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let server = start();
    let mut client = server.client().await;
    let cases = [
        (
            "empty domain",
            request("", vec![descriptor(&[("user", "a")])]),
        ),
        ("no descriptors", request("api", vec![])),
        (
            "an entry with an empty key",
            request("api", vec![descriptor(&[("", "a")])]),
        ),
    ];
    for (what, request) in cases {
        match client.should_rate_limit(request).await {
            Err(status) => assert_eq!(status.code(), GrpcCode::InvalidArgument, "{what}: {status}"),
            Ok(response) => panic!("{what}: expected INVALID_ARGUMENT, got {response:?}"),
        }
    }
}

#[tokio::test]
async fn unknown_domain_is_ok_with_no_limit() {
    let server = start();
    let response = should_rate_limit(
        &server,
        request(
            "no-such-domain",
            vec![
                descriptor(&[("user", "a")]),
                descriptor(&[("plan", "free")]),
            ],
        ),
    )
    .await;
    assert_eq!(response.overall_code(), Code::Ok, "{response:?}");
    assert_eq!(
        summaries(&response),
        [(Code::Ok, None, 0), (Code::Ok, None, 0)],
        "{response:?}"
    );
}

#[tokio::test]
async fn statuses_line_up_with_descriptors() {
    let server = start();
    let descriptors = || {
        vec![
            descriptor(&[("plan", "free")]),
            descriptor(&[("unconfigured", "x")]),
            descriptor(&[("user", "u1")]),
        ]
    };

    let first = should_rate_limit(&server, request("api", descriptors())).await;
    assert_eq!(first.overall_code(), Code::Ok, "{first:?}");
    assert_eq!(
        summaries(&first),
        [
            (Code::Ok, Some((1, Unit::Hour)), 0),
            (Code::Ok, None, 0),
            (Code::Ok, Some((2, Unit::Minute)), 1),
        ],
        "{first:?}"
    );

    // One descriptor over its limit makes the whole answer OVER_LIMIT, and only its own
    // status says so.
    let second = should_rate_limit(&server, request("api", descriptors())).await;
    assert_eq!(second.overall_code(), Code::OverLimit, "{second:?}");
    assert_eq!(
        summaries(&second),
        [
            (Code::OverLimit, Some((1, Unit::Hour)), 0),
            (Code::Ok, None, 0),
            (Code::Ok, Some((2, Unit::Minute)), 0),
        ],
        "{second:?}"
    );
}

#[tokio::test]
async fn shadow_mode_and_unlimited_never_deny() {
    let server = start();
    for attempt in 1..=3 {
        let response = should_rate_limit(
            &server,
            request(
                "api",
                vec![
                    descriptor(&[("trial", "t1")]),
                    descriptor(&[("internal", "job")]),
                ],
            ),
        )
        .await;
        assert_eq!(
            response.overall_code(),
            Code::Ok,
            "attempt {attempt}: {response:?}"
        );
        assert_eq!(response.statuses.len(), 2, "{response:?}");
        assert!(
            response
                .statuses
                .iter()
                .all(|status| status.code() == Code::Ok),
            "attempt {attempt}: {response:?}"
        );
    }
}

#[tokio::test]
async fn health_is_serving_for_ratelimit_and_the_whole_server() {
    let server = start();
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "ratelimit"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|status| panic!("health check for {service:?}: {status}"))
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "health of {service:?}"
        );
    }
}

#[tokio::test]
async fn reflection_lists_the_rate_limit_service() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = start();
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap_or_else(|status| panic!("reflection (grpc.reflection.v1): {status}"))
        .into_inner();
    let reply = replies
        .next()
        .await
        .expect("one reply to ListServices")
        .expect("a ListServices reply, not an error");
    let Some(MessageResponse::ListServicesResponse(services)) = reply.message_response else {
        panic!("expected a ListServicesResponse, got {reply:?}");
    };
    let names: Vec<_> = services
        .service
        .iter()
        .map(|service| service.name.as_str())
        .collect();
    assert!(
        names.contains(&"envoy.service.ratelimit.v3.RateLimitService"),
        "reflection lists {names:?}"
    );
}
