//! envoyproxy/ratelimit's debug port (`DEBUG_HOST:DEBUG_PORT`, 0.0.0.0:6070 there): the
//! loaded config as its one-line-per-rule dump at `/rlconfig` and the counters at `/stats`,
//! where the runbooks written for it (`kubectl port-forward … 6070`, `curl
//! localhost:6070/rlconfig`) look. Any other path lists the endpoints, as there.

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::explain::render_envoyproxy_dump;
use crate::limiter::LiveConfig;
use crate::metrics::Metrics;

/// Each endpoint and what it shows, as the index lists them.
const ENDPOINTS: [(&str, &str); 2] = [
    (
        "/rlconfig",
        "print out the currently loaded configuration for debugging",
    ),
    ("/stats", "print out stats"),
];

#[derive(Clone)]
struct DebugState {
    config: LiveConfig,
    metrics: Arc<Metrics>,
}

pub fn debug_router(config: LiveConfig, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/rlconfig", get(rlconfig))
        .route("/stats", get(stats))
        .route("/debug/pprof", get(pprof))
        // The wildcard below does not match an empty rest, and the index with its
        // slash is the path Go runbooks use.
        .route("/debug/pprof/", get(pprof))
        .route("/debug/pprof/{*rest}", get(pprof))
        .fallback(index)
        .with_state(DebugState { config, metrics })
}

/// Empty before a config is loaded (as envoyproxy/ratelimit's); the admin port's
/// `/rlconfig` says where each rule came from.
async fn rlconfig(State(state): State<DebugState>) -> String {
    state
        .config
        .load_full()
        .map(|config| render_envoyproxy_dump(&config))
        .unwrap_or_default()
}

/// Every counter under its statsd name, `name: value`, sorted.
async fn stats(State(state): State<DebugState>) -> String {
    let mut counters = state.metrics.statsd_counters();
    counters.sort();
    let mut out = String::new();
    for (name, value) in counters {
        let _ = writeln!(out, "{name}: {value}");
    }
    out
}

/// envoyproxy/ratelimit serves Go's profiler here; a Rust process has none to serve.
async fn pprof() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "meshlimit is not a Go program, so there is no pprof: profile it with \
         `perf record -g -p <pid>` on the node, and read its decision latency at the admin \
         port's /metrics (meshlimit_decision_duration_seconds)\n",
    )
}

async fn index() -> String {
    let mut out = String::new();
    for (path, help) in ENDPOINTS {
        let _ = writeln!(out, "{path}: {help}");
    }
    out
}
