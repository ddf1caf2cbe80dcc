//! Distributed tracing: one OpenTelemetry span per ShouldRateLimit call, the child of the
//! span Envoy made for the call, exported to an OTLP collector (envoyproxy/ratelimit's
//! `TRACING_ENABLED`).
//!
//! Off unless asked for, and then off the request's path as far as it can be: a call that
//! is not sampled costs a header look-up; a sampled one builds its span and hands it to a
//! bounded queue without waiting. A background task batches and exports; when the queue is
//! full or the collector is away, spans are dropped and counted
//! (`meshlimit_trace_spans_dropped_total`), never the answer delayed.

pub mod context;
mod encode;
mod export;
pub mod settings;

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use self::context::Parent;
pub use self::settings::TracingOptions;
use crate::metrics::Metrics;
use crate::proto::RateLimitResponse;

/// The RPC meshlimit traces, named as OpenTelemetry's RPC conventions name a span.
const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
const METHOD: &str = "ShouldRateLimit";
const SPAN_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// `Span.kind` values and the attributes' field number, from OTLP's trace.proto.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const ATTRIBUTES: u64 = 9;

/// Whether a call is traced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Trace ids whose low 63 bits fall below this are sampled (OpenTelemetry's
    /// TraceIdRatioBased, so every service with the same ratio keeps the same traces).
    bound: u64,
    /// Follow the caller's decision when it made one (ParentBased).
    follow_parent: bool,
}

impl Sampler {
    /// Samples `ratio` (0 to 1) of the traces that start here, and every trace the caller
    /// sampled when `follow_parent`.
    pub fn new(ratio: f64, follow_parent: bool) -> Self {
        let ratio = ratio.clamp(0.0, 1.0);
        let bound = if ratio >= 1.0 {
            u64::MAX
        } else {
            (ratio * (1u64 << 63) as f64) as u64
        };
        Self {
            bound,
            follow_parent,
        }
    }

    fn samples(&self, parent: Option<&Parent>, trace_id: &[u8; 16]) -> bool {
        if self.follow_parent
            && let Some(decided) = parent.and_then(|p| p.sampled)
        {
            return decided;
        }
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        (u64::from_be_bytes(low) >> 1) < self.bound
    }
}

/// Random-looking ids without a random number generator on the request path: a counter
/// hashed with a per-process random seed.
struct Ids {
    seed: u64,
    next: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), "trace ids");
        Self {
            seed,
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> u128 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        xxhash_rust::xxh3::xxh3_128_with_seed(&n.to_le_bytes(), self.seed)
    }

    fn trace_id(&self) -> [u8; 16] {
        // All zeros is not a valid id; a hash of a distinct counter is that once in 2^128.
        self.next().max(1).to_be_bytes()
    }

    fn span_id(&self) -> [u8; 8] {
        (self.next() as u64).max(1).to_be_bytes()
    }
}

/// A traced call in flight.
#[derive(Debug)]
pub struct CallSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    trace_state: String,
    start_unix_nanos: u64,
    started: Instant,
}

/// How a call ended, for its span.
enum Outcome<'a> {
    /// Answered, with the response's overall code.
    Answered { overall_code: i32 },
    /// Refused with this gRPC status.
    Failed(&'a tonic::Status),
}

/// A counter store call made while deciding a traced call: a child span of its own, so a
/// trace shows how much of the decision was the wait on Redis.
#[derive(Debug)]
struct StoreCall {
    store: &'static str,
    started: Instant,
    elapsed: Duration,
    checks: usize,
    error: Option<String>,
}

/// What a traced call's decision did in the store, gathered while it runs.
#[derive(Default)]
struct StoreTrace {
    calls: Vec<StoreCall>,
    /// Set by the store when it answered the call in progress without Redis.
    fallback: Option<&'static str>,
}

tokio::task_local! {
    /// The store calls of the traced call this task is deciding.
    static STORE_TRACE: RefCell<StoreTrace>;
}

/// Notes a store call for the span of the call this task is deciding, when it is traced.
/// Only stores that wait on I/O are timed, so the memory store never comes here.
pub fn note_store_call(
    store: &'static str,
    started: Instant,
    elapsed: Duration,
    checks: usize,
    error: Option<&crate::store::StoreError>,
) {
    let _ = STORE_TRACE.try_with(|trace| {
        let mut trace = trace.borrow_mut();
        let error = match (error, trace.fallback.take()) {
            (Some(error), _) => Some(error.to_string()),
            (None, Some(mode)) => Some(format!(
                "Redis did not answer; decided by --redis-failure-mode {mode}"
            )),
            (None, None) => None,
        };
        trace.calls.push(StoreCall {
            store,
            started,
            elapsed,
            checks,
            error,
        });
    });
}

/// Notes that the store call in progress was answered by the failure mode `mode`, when the
/// call is traced.
pub fn note_fallback(mode: &'static str) {
    let _ = STORE_TRACE.try_with(|trace| trace.borrow_mut().fallback = Some(mode));
}

/// Runs `decision`, keeping the store calls it makes for the call's span.
async fn with_store_calls<T>(decision: impl Future<Output = T>) -> (T, Vec<StoreCall>) {
    STORE_TRACE
        .scope(RefCell::new(StoreTrace::default()), async move {
            let answer = decision.await;
            (answer, STORE_TRACE.with(|trace| trace.take().calls))
        })
        .await
}

/// What the export task is sent.
enum Message {
    /// An encoded `Span` message.
    Span(Vec<u8>),
    /// Export what is queued, then say so.
    Flush(oneshot::Sender<()>),
}

pub struct Tracer {
    sampler: Sampler,
    ids: Ids,
    queue: mpsc::Sender<Message>,
    metrics: Arc<Metrics>,
}

impl Tracer {
    /// A tracer and the task that exports its spans, which the caller spawns.
    pub fn new(
        options: TracingOptions,
        metrics: Arc<Metrics>,
    ) -> Result<(Tracer, impl Future<Output = ()> + Send + 'static), String> {
        let (queue, receiver) = mpsc::channel(options.batch.max_queue.max(1));
        let exporter = export::Exporter::new(&options)?;
        let task = export::run(receiver, exporter, options.batch, metrics.clone());
        let tracer = Tracer {
            sampler: options.sampler,
            ids: Ids::new(),
            queue,
            metrics,
        };
        Ok((tracer, task))
    }

    /// Starts the span of a call with these headers (looked up by lower-case name), or
    /// `None` when the call is not sampled.
    pub fn start<'h>(&self, header: impl Fn(&str) -> Option<&'h str>) -> Option<CallSpan> {
        let parent = Parent::from_headers(header);
        let trace_id = parent
            .as_ref()
            .map_or_else(|| self.ids.trace_id(), |p| p.trace_id);
        if !self.sampler.samples(parent.as_ref(), &trace_id) {
            return None;
        }
        let (parent_span_id, trace_state) = match parent {
            Some(parent) => (Some(parent.span_id), parent.trace_state),
            None => (None, String::new()),
        };
        Some(CallSpan {
            trace_id,
            span_id: self.ids.span_id(),
            parent_span_id,
            trace_state,
            start_unix_nanos: unix_nanos(SystemTime::now()),
            started: Instant::now(),
        })
    }

    /// Runs `decision` for `call`, a request to `domain` with `descriptors` descriptors,
    /// then queues the call's span and one span for each store call the decision made.
    pub async fn trace(
        &self,
        call: CallSpan,
        domain: &str,
        descriptors: usize,
        decision: impl Future<Output = Result<RateLimitResponse, tonic::Status>>,
    ) -> Result<RateLimitResponse, tonic::Status> {
        let (answer, store_calls) = with_store_calls(decision).await;
        let outcome = match &answer {
            Ok(response) => Outcome::Answered {
                overall_code: response.overall_code,
            },
            Err(status) => Outcome::Failed(status),
        };
        let span = call_span(&call, domain, descriptors, &outcome);
        let children = store_calls
            .into_iter()
            .map(|store| store_span(&call, self.ids.span_id(), store));
        for span in std::iter::once(span).chain(children) {
            if self.queue.try_send(Message::Span(span)).is_err() {
                self.metrics.spans_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        answer
    }

    /// Exports every span queued so far, waiting at most `timeout`; for shutdown.
    pub async fn flush(&self, timeout: Duration) {
        let (done, exported) = oneshot::channel();
        if self.queue.send(Message::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(timeout, exported).await;
        }
    }
}

/// The call's span, encoded.
fn call_span(call: &CallSpan, domain: &str, descriptors: usize, outcome: &Outcome<'_>) -> Vec<u8> {
    let elapsed = u64::try_from(call.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let (grpc_code, overall, error) = match outcome {
        Outcome::Answered { overall_code } => {
            let code = crate::proto::rate_limit_response::Code::try_from(*overall_code)
                .map_or("UNKNOWN", |code| code.as_str_name());
            (0, Some(code), None)
        }
        Outcome::Failed(failure) => (failure.code() as i64, None, Some(failure.message())),
    };
    let fields = encode::SpanFields {
        trace_id: &call.trace_id,
        span_id: &call.span_id,
        parent_span_id: call.parent_span_id.as_ref(),
        trace_state: &call.trace_state,
        name: SPAN_NAME,
        kind: SERVER,
        start_unix_nanos: call.start_unix_nanos,
        end_unix_nanos: call.start_unix_nanos.saturating_add(elapsed),
        error,
    };
    encode::span(&fields, |out| {
        encode::text(out, ATTRIBUTES, "rpc.system", "grpc");
        encode::text(out, ATTRIBUTES, "rpc.service", SERVICE);
        encode::text(out, ATTRIBUTES, "rpc.method", METHOD);
        encode::int(out, ATTRIBUTES, "rpc.grpc.status_code", grpc_code);
        encode::text(out, ATTRIBUTES, "ratelimit.domain", domain);
        let descriptors = i64::try_from(descriptors).unwrap_or(i64::MAX);
        encode::int(out, ATTRIBUTES, "ratelimit.descriptors", descriptors);
        if let Some(overall) = overall {
            encode::text(out, ATTRIBUTES, "ratelimit.overall_code", overall);
        }
    })
}

/// A store call as a client span under the call's span, placed in time by its offset from
/// the call's start.
fn store_span(call: &CallSpan, span_id: [u8; 8], store: StoreCall) -> Vec<u8> {
    let offset = store.started.saturating_duration_since(call.started);
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let start = call.start_unix_nanos.saturating_add(nanos(offset));
    let fields = encode::SpanFields {
        trace_id: &call.trace_id,
        span_id: &span_id,
        parent_span_id: Some(&call.span_id),
        trace_state: &call.trace_state,
        name: store.store,
        kind: CLIENT,
        start_unix_nanos: start,
        end_unix_nanos: start.saturating_add(nanos(store.elapsed)),
        error: store.error.as_deref(),
    };
    encode::span(&fields, |out| {
        encode::text(out, ATTRIBUTES, "db.system.name", store.store);
        let checks = i64::try_from(store.checks).unwrap_or(i64::MAX);
        encode::int(out, ATTRIBUTES, "ratelimit.checks", checks);
    })
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::opentelemetry::common::v1::{AnyValue, KeyValue, any_value};
    use crate::proto::opentelemetry::trace::v1::{Span, status};

    fn text(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
        }
    }

    fn number(key: &str, value: i64) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(value)),
            }),
        }
    }

    fn decoded(span: Vec<u8>) -> Span {
        Span::decode(span.as_slice()).expect("prost reads the span")
    }

    fn trace_id_with_low(low: u64) -> [u8; 16] {
        let mut id = [0xabu8; 16];
        id[8..].copy_from_slice(&low.to_be_bytes());
        id
    }

    fn parent(sampled: Option<bool>) -> Parent {
        Parent {
            trace_id: trace_id_with_low(u64::MAX),
            span_id: [1; 8],
            sampled,
            trace_state: String::new(),
        }
    }

    #[test]
    fn the_ratio_is_taken_from_the_trace_ids_low_bits() {
        let quarter = Sampler::new(0.25, true);
        // The last 8 bytes, less their lowest bit, below a quarter of 2^63 are kept.
        assert!(quarter.samples(None, &trace_id_with_low((1u64 << 62) - 1)));
        assert!(!quarter.samples(None, &trace_id_with_low(1u64 << 62)));
        assert!(Sampler::new(1.0, true).samples(None, &trace_id_with_low(u64::MAX)));
        assert!(!Sampler::new(0.0, true).samples(None, &trace_id_with_low(0)));
    }

    #[test]
    fn the_callers_decision_is_followed_when_it_made_one() {
        let none = Sampler::new(0.0, true);
        assert!(none.samples(Some(&parent(Some(true))), &trace_id_with_low(u64::MAX)));
        let all = Sampler::new(1.0, true);
        assert!(!all.samples(Some(&parent(Some(false))), &trace_id_with_low(0)));
        // A deferred decision falls back on the ratio.
        assert!(all.samples(Some(&parent(None)), &trace_id_with_low(0)));
        // Without ParentBased, only the ratio counts.
        assert!(!Sampler::new(0.0, false).samples(Some(&parent(Some(true))), &[1; 16]));
    }

    #[test]
    fn about_the_ratio_of_new_traces_is_sampled() {
        let ids = Ids::new();
        let sampler = Sampler::new(0.1, true);
        let kept = (0..20_000)
            .filter(|_| sampler.samples(None, &ids.trace_id()))
            .count();
        assert!((1_600..=2_400).contains(&kept), "{kept} of 20 000 at 0.1");
    }

    #[test]
    fn a_span_names_the_call_and_its_answer() {
        let call = CallSpan {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: Some([9; 8]),
            trace_state: "a=b".to_owned(),
            start_unix_nanos: 1_000,
            started: Instant::now(),
        };
        let span = decoded(call_span(
            &call,
            "edge",
            3,
            &Outcome::Answered { overall_code: 2 },
        ));
        assert_eq!(span.name, format!("{SERVICE}/{METHOD}"));
        assert_eq!(span.parent_span_id, vec![9; 8]);
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert!(
            span.attributes
                .contains(&text("ratelimit.overall_code", "OVER_LIMIT"))
        );
        assert!(span.attributes.contains(&text("ratelimit.domain", "edge")));
        assert!(
            span.attributes
                .contains(&number("ratelimit.descriptors", 3))
        );

        let refused = tonic::Status::invalid_argument("too many descriptors");
        let call = CallSpan {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: None,
            trace_state: String::new(),
            start_unix_nanos: 1_000,
            started: Instant::now(),
        };
        let span = decoded(call_span(&call, "edge", 99, &Outcome::Failed(&refused)));
        let status = span.status.unwrap();
        assert_eq!(status.code, status::StatusCode::Error as i32);
        assert_eq!(status.message, "too many descriptors");
        assert!(span.attributes.contains(&number("rpc.grpc.status_code", 3)));
        assert!(span.parent_span_id.is_empty());
    }
}
