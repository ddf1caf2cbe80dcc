//! The HTTP admin port: health for probes, metrics for Prometheus, and the loaded config.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::explain::render_config;
use crate::limiter::LiveConfig;
use crate::metrics::Metrics;

/// Whether this replica should receive traffic: a config is loaded and gRPC is serving.
#[derive(Debug, Default)]
pub struct Health {
    serving: AtomicBool,
}

impl Health {
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub health: Arc<Health>,
    pub config: LiveConfig,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/metrics", get(metrics))
        .route("/rlconfig", get(rlconfig))
        .with_state(state)
}

/// envoyproxy/ratelimit's contract: 200 `OK` when healthy, 500 otherwise.
async fn healthcheck(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.health.is_serving() && state.config.load().is_some() {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "NOT OK")
    }
}

async fn metrics(State(state): State<AdminState>) -> String {
    state.metrics.render()
}

/// The effective, resolved config: every rule after inheritance, with where it came from.
async fn rlconfig(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.config.load_full() {
        Some(config) => (StatusCode::OK, render_config(&config)),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no config is loaded\n".into(),
        ),
    }
}
