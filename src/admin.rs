//! The HTTP admin port: health for probes (more endpoints come with operations work).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

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

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .with_state(health)
}

/// envoyproxy/ratelimit's contract: 200 `OK` when healthy, 500 otherwise.
async fn healthcheck(State(health): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if health.is_serving() {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "NOT OK")
    }
}
