//! The HTTP admin port: health for probes, metrics for Prometheus, the loaded config, and
//! JSON access to decisions (`POST /json`) and current usage (`GET /v1/usage`).

mod debug;
mod json;

pub use debug::debug_router;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::clock::Clock;
use crate::explain::{parse_descriptor, render_config};
use crate::limiter::{DecisionError, LimitUsage, LiveConfig, RateLimiter};
use crate::metrics::Metrics;
use crate::proto::rate_limit_response::Code;
use crate::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use crate::store::CounterStore;

/// Whether the counter store can be reached, for health checks that ask it.
pub type StoreCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Whether this replica should receive traffic: a config is loaded (unless told to serve
/// before one), gRPC is serving and, when asked (`--health-requires-redis`), the store can
/// be reached. Serving is turned off first thing on shutdown, so probes fail before
/// connections close.
#[derive(Default)]
pub struct Health {
    serving: AtomicBool,
    store: Option<StoreCheck>,
    before_config: bool,
}

impl Health {
    /// Healthy only while `store` says the store can be reached, too.
    pub fn requiring_store(store: StoreCheck) -> Self {
        Self {
            serving: AtomicBool::new(false),
            store: Some(store),
            before_config: false,
        }
    }

    /// Healthy before the first config too (`--xds-serve-before-config`): decisions are
    /// UNAVAILABLE until it comes, and Envoy's `failure_mode_deny` decides them.
    pub fn before_config(self) -> Self {
        Self {
            before_config: true,
            ..self
        }
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// Serving, with `config` loaded, and the store reachable if that is required.
    pub fn is_healthy(&self, config: &LiveConfig) -> bool {
        self.is_serving()
            && (self.before_config || config.load().is_some())
            && self.store.as_ref().is_none_or(|reachable| reachable())
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The limiter as the admin port uses it, whatever its store.
pub trait Decisions: Send + Sync {
    fn decide(
        &self,
        request: RateLimitRequest,
    ) -> BoxFuture<'_, Result<RateLimitResponse, DecisionError>>;
    fn usage(
        &self,
        request: RateLimitRequest,
    ) -> BoxFuture<'_, Result<Vec<LimitUsage>, DecisionError>>;
    fn reset(
        &self,
        request: RateLimitRequest,
    ) -> BoxFuture<'_, Result<Vec<LimitUsage>, DecisionError>>;
}

impl<S: CounterStore, C: Clock> Decisions for RateLimiter<S, C> {
    fn decide(
        &self,
        request: RateLimitRequest,
    ) -> BoxFuture<'_, Result<RateLimitResponse, DecisionError>> {
        Box::pin(async move { self.should_rate_limit(&request).await })
    }

    fn usage(
        &self,
        request: RateLimitRequest,
    ) -> BoxFuture<'_, Result<Vec<LimitUsage>, DecisionError>> {
        Box::pin(async move { RateLimiter::usage(self, &request).await })
    }

    fn reset(
        &self,
        request: RateLimitRequest,
    ) -> BoxFuture<'_, Result<Vec<LimitUsage>, DecisionError>> {
        Box::pin(async move { RateLimiter::reset(self, &request).await })
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub health: Arc<Health>,
    pub config: LiveConfig,
    pub metrics: Arc<Metrics>,
    pub decisions: Arc<dyn Decisions>,
    /// `--admin-reset-token-file`: resets are off without it.
    pub reset_token_file: Option<PathBuf>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/ready", get(healthcheck))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .route("/rlconfig", get(rlconfig))
        .route("/json", post(decide_json))
        .route("/v1/usage", get(usage).delete(reset))
        .with_state(state)
}

/// The metrics alone at `path`, for a listener of their own (`--metrics-addr`, or
/// envoyproxy/ratelimit's `USE_PROMETHEUS` with `PROMETHEUS_ADDR` and `PROMETHEUS_PATH`).
pub fn metrics_router(metrics: Arc<Metrics>, path: &str) -> Router {
    Router::new()
        .route(
            path,
            get(|State(metrics): State<Arc<Metrics>>| async move { metrics.render() }),
        )
        .with_state(metrics)
}

/// envoyproxy/ratelimit's contract: 200 `OK` when healthy, 500 otherwise.
async fn healthcheck(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.health.is_healthy(&state.config) {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "NOT OK")
    }
}

/// For liveness probes: 200 whenever the process answers at all. Unlike `/healthcheck` it
/// ignores Redis, the config and shutdown, because restarting a replica brings none of
/// them back: a liveness probe on `/healthcheck` with `--health-requires-redis` would
/// restart every replica during a Redis outage.
async fn live() -> &'static str {
    "OK"
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

fn error_status(error: &DecisionError) -> StatusCode {
    match error {
        DecisionError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        DecisionError::NoConfig | DecisionError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn json_error(status: StatusCode, message: String) -> Response {
    json_response(status, serde_json::json!({ "error": message }))
}

/// envoyproxy/ratelimit's `/json`: a JSON `RateLimitRequest` in, the decision out; 200 when
/// OK, 429 when over the limit, 400 for a malformed request. This counts, like gRPC.
async fn decide_json(State(state): State<AdminState>, body: Bytes) -> Response {
    let request = match serde_json::from_slice::<json::JsonRequest>(&body)
        .map_err(|e| e.to_string())
        .and_then(json::JsonRequest::into_proto)
    {
        Ok(request) => request,
        Err(message) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("not a RateLimitRequest: {message}"),
            );
        }
    };
    match state.decisions.decide(request).await {
        Ok(response) => {
            let status = if response.overall_code == Code::OverLimit as i32 {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::OK
            };
            json_response(status, json::response(&response))
        }
        Err(error) => json_error(error_status(&error), error.to_string()),
    }
}

/// `GET /v1/usage?domain=edge&descriptor=user=alice,path=/x[&descriptor=…]`: the current use
/// and what is left of every limit the descriptors match, without consuming anything.
async fn usage(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let request = match usage_request(query.as_deref()) {
        Ok(request) => request,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, message),
    };
    let domain = request.domain.clone();
    match state.decisions.usage(request).await {
        Ok(limits) => json_response(StatusCode::OK, json::usage(&domain, &limits)),
        Err(error) => json_error(error_status(&error), error.to_string()),
    }
}

/// `DELETE /v1/usage?…` (the same query): every limit the descriptors match starts afresh,
/// its counters and penalty box dropped; answers the use afterwards. Logged, since it lets
/// a client past its limits.
async fn reset(
    State(state): State<AdminState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(refused) = authorize_reset(state.reset_token_file.as_deref(), &headers) {
        return refused;
    }
    let request = match usage_request(query.as_deref()) {
        Ok(request) => request,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, message),
    };
    let domain = request.domain.clone();
    let descriptors = query.as_deref().unwrap_or_default().to_owned();
    match state.decisions.reset(request).await {
        Ok(limits) => {
            tracing::warn!(%domain, query = %descriptors, limits = limits.len(), "limits reset through the admin port");
            json_response(StatusCode::OK, json::usage(&domain, &limits))
        }
        Err(error) => json_error(error_status(&error), error.to_string()),
    }
}

/// The secret in `path`: its text without surrounding whitespace (a Secret's file often
/// ends in a newline); an error that says what to fix when it cannot be one.
pub fn reset_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        format!(
            "cannot read {}: {error}; mount the secret there, or drop the flag to keep resets off",
            path.display()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "{} is empty; put the secret DELETE /v1/usage must send in it",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// A reset lets a client past its limits, and the admin port is reachable by whatever can
/// reach the pod (its Service publishes it for scrapes): it takes the operator's secret.
// An `Err` the size of a response: built once per refused reset, on the admin port.
#[allow(clippy::result_large_err)]
fn authorize_reset(token_file: Option<&Path>, headers: &HeaderMap) -> Result<(), Response> {
    let Some(path) = token_file else {
        return Err(json_error(
            StatusCode::FORBIDDEN,
            "resets are off: start meshlimit with --admin-reset-token-file (a file holding a \
             secret, e.g. a Kubernetes Secret's mount) and send `Authorization: Bearer <secret>`"
                .into(),
        ));
    };
    let expected = reset_token(path).map_err(|problem| {
        tracing::error!(%problem, "a reset was refused: the token file cannot be read");
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("resets are unavailable: {problem}"),
        )
    })?;
    let sent = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match sent {
        Some(sent) if same_secret(sent.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => {
            tracing::warn!("a reset was refused: the bearer token does not match");
            Err(json_error(
                StatusCode::UNAUTHORIZED,
                "the bearer token does not match --admin-reset-token-file".into(),
            ))
        }
        None => Err(json_error(
            StatusCode::UNAUTHORIZED,
            "send the secret in --admin-reset-token-file as `Authorization: Bearer <secret>`"
                .into(),
        )),
    }
}

/// Compares every byte whatever the first difference, so the time taken does not tell how
/// much of a guess was right.
fn same_secret(sent: &[u8], expected: &[u8]) -> bool {
    sent.len() == expected.len()
        && sent
            .iter()
            .zip(expected)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

/// The request a usage query names: `domain=` and one `descriptor=key=value,…` each.
fn usage_request(query: Option<&str>) -> Result<RateLimitRequest, String> {
    let mut domain = None;
    let mut descriptors = Vec::new();
    for (key, value) in parse_query(query.unwrap_or_default()) {
        match key.as_str() {
            "domain" => domain = Some(value),
            "descriptor" => descriptors.push(RateLimitDescriptor {
                entries: parse_descriptor(&value)?,
                ..Default::default()
            }),
            other => {
                return Err(format!(
                    "unknown parameter `{other}`; use domain= and descriptor=key=value,key=value"
                ));
            }
        }
    }
    let Some(domain) = domain else {
        return Err("add `domain=NAME` and one `descriptor=key=value,…` per descriptor".into());
    };
    Ok(RateLimitRequest {
        domain,
        descriptors,
        hits_addend: 0,
    })
}

/// `a=1&b=x%2Fy` into decoded pairs, in order; `+` is a space as in HTML forms.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match byte {
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_percent_escapes_and_keep_repeated_keys() {
        let pairs =
            parse_query("domain=edge&descriptor=user%3Dalice%2Cpath%3D%2Fa+b&descriptor=ip=1");
        assert_eq!(
            pairs,
            [
                ("domain".to_owned(), "edge".to_owned()),
                ("descriptor".to_owned(), "user=alice,path=/a b".to_owned()),
                ("descriptor".to_owned(), "ip=1".to_owned()),
            ]
        );
        assert_eq!(decode("100%"), "100%");
    }

    #[test]
    fn a_reset_takes_the_secret_in_the_token_file_and_is_off_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        let status = |file: Option<&Path>, headers: &HeaderMap| {
            authorize_reset(file, headers).err().map(|r| r.status())
        };
        assert_eq!(status(Some(&file), &with("Bearer s3cret")), None);
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
            assert_eq!(
                status(Some(&file), &with(wrong)),
                Some(StatusCode::UNAUTHORIZED),
                "{wrong}"
            );
        }
        assert_eq!(
            status(Some(&file), &HeaderMap::new()),
            Some(StatusCode::UNAUTHORIZED)
        );
        // Off by default, whatever is sent.
        assert_eq!(
            status(None, &with("Bearer s3cret")),
            Some(StatusCode::FORBIDDEN)
        );
        // A rotated secret applies at once; an emptied file refuses every reset.
        std::fs::write(&file, "rotated").unwrap();
        assert_eq!(
            status(Some(&file), &with("Bearer s3cret")),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status(Some(&file), &with("Bearer rotated")), None);
        std::fs::write(&file, "\n").unwrap();
        assert_eq!(
            status(Some(&file), &with("Bearer ")),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
    }
}
