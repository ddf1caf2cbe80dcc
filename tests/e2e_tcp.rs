//! Envoy's network (L4) ratelimit filter against meshlimit: one ShouldRateLimit call per
//! new TCP connection, with the listener's fixed descriptor. Connections within the limit
//! reach the upstream through tcp_proxy; the one over it is closed by Envoy before a byte
//! is passed on.
//!
//! Listener and descriptor: tests/fixtures/envoy/ratelimit_tcp.yaml.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::stack::Stack;
use common::{avoid_window_edge, fixture};

/// Two connections a minute on the listener's descriptor.
const LIMITS: &str = "\
domain: tcp
descriptors:
  - key: listener
    value: tcp_ingress
    rate_limit: {unit: minute, requests_per_unit: 2}
";

/// Opens a connection through Envoy, sends one HTTP request over it (the upstream speaks
/// HTTP; Envoy only passes bytes) and returns what came back: the response's head, or
/// nothing when Envoy closed the connection.
fn exchange(stack: &Stack) -> String {
    let mut connection =
        TcpStream::connect(stack.envoy.listener_addr).expect("connect to Envoy's TCP listener");
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    // Envoy may already have closed a refused connection; the read below tells.
    let _ =
        connection.write_all(b"GET /tcp HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n");
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    // Until the response's head is in, or the connection ends (a refused one is closed or
    // reset by Envoy).
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        match connection.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[test]
fn connections_over_the_limit_are_closed_before_reaching_the_upstream() {
    avoid_window_edge(60, 15);
    let config = common::config_dir::plain(&[("tcp.yaml", LIMITS)]);
    let stack = Stack::start(config.path(), fixture("envoy/ratelimit_tcp.yaml"), "tcp");
    for n in 1..=2 {
        let answer = exchange(&stack);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "connection {n} should reach the upstream, got {answer:?}\n{}",
            stack.logs()
        );
    }
    let refused = exchange(&stack);
    assert!(
        refused.is_empty(),
        "the third connection in the minute should be closed with nothing passed on, got \
         {refused:?}\n{}",
        stack.logs()
    );
    // Envoy's own count of what its filter did, and meshlimit's.
    let stats = common::http::get(
        stack.envoy.admin_addr,
        "/stats?filter=ratelimit.tcp_ingress",
        &[],
    )
    .expect("Envoy's /stats")
    .text();
    for line in [
        "ratelimit.tcp_ingress.ok: 2",
        "ratelimit.tcp_ingress.over_limit: 1",
        "ratelimit.tcp_ingress.cx_closed: 1",
    ] {
        assert!(
            stats.contains(line),
            "missing `{line}` in Envoy's stats:\n{stats}"
        );
    }
    let over = stack.meshlimit.metric(
        "ratelimit_service_rate_limit_over_limit{domain=\"tcp\",key=\"listener_tcp_ingress\"}",
    );
    assert_eq!(over, 1);
}
