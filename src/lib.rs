//! meshlimit: an Envoy-compatible external rate-limit service.
//!
//! A request travels, in order, through:
//! - [`service`]: the gRPC adapter for `envoy.service.ratelimit.v3.RateLimitService`;
//! - [`limiter`]: the decision path — validate, match, apply `replaces`, count, answer;
//! - [`matcher`]: each domain's compiled descriptor tree and its envoyproxy-exact lookup;
//! - [`rule`] / [`limit`]: what a matched node says and how it is counted ([`calendar`]:
//!   the day, week, month or year of a time zone, for a limit that names one);
//! - [`key`]: the counter key of a matched descriptor;
//! - [`store`]: where counters live (`memory`, or `redis` shared by replicas), behind one trait;
//! - [`algorithm`]: sliding and fixed window arithmetic, pure and clock-free.
//!
//! Around it: [`config`] loads and checks YAML directories, [`clock`] is the injectable
//! time source, [`admin`] is the HTTP admin port, [`server`] wires `meshlimit serve`,
//! [`envoyproxy_env`] reads the environment an envoyproxy/ratelimit deployment sets,
//! [`statsd`] pushes the counters to a statsd agent, [`prometheus_mapping`] names the
//! metrics after a statsd_exporter mapping file (PROMETHEUS_MAPPER_YAML), [`trace`] sends a span of each call
//! to an OTLP collector, [`unix_socket`] serves gRPC on a Unix domain socket,
//! [`connections`] serves each client connection and decides when it is rotated,
//! [`deadline`] ends a call at the client's `grpc-timeout`, [`jitter`]
//! spreads timers that would fire together, and [`proto`] holds the generated protobuf code.

// Request and reload paths must answer with an error, never a panic.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod admin;
pub mod algorithm;
pub mod allocator;
pub mod calendar;
pub mod clock;
pub mod codec;
pub mod config;
pub mod connections;
pub mod deadline;
pub mod envoyproxy_env;
pub mod explain;
pub mod jitter;
pub mod key;
pub mod limit;
pub mod limiter;
pub mod matcher;
pub mod metrics;
pub mod prometheus_mapping;
pub mod proto;
pub mod reload;
pub mod response;
pub mod rule;
pub mod server;
pub mod service;
pub mod simulate;
pub mod sliding_quantiles;
pub mod statsd;
pub mod store;
pub mod tls;
pub mod trace;
pub mod unix_socket;
pub mod xds;
