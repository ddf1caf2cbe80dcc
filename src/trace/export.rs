//! The export task: batches queued spans and sends them to the collector, over gRPC or
//! HTTP, as OpenTelemetry's batch span processor does. It runs beside the service and never
//! holds up a request: a failed export drops its batch, counts it, and says so in the log
//! (at most once a minute, with how many were lost meanwhile).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use super::settings::{BatchSettings, Transport};
use super::{Message, TracingOptions, encode};
use crate::codec::wire::put_bytes;
use crate::codec::{Decode, Encode, SmallBufferCodec};
use crate::metrics::Metrics;
use crate::proto::opentelemetry::collector::trace::v1::ExportTraceServiceResponse;
use crate::tls::TlsConnect;

/// The collector's gRPC method.
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// An `ExportTraceServiceRequest`, already encoded (see `encode`).
struct EncodedRequest(Vec<u8>);

impl Encode for EncodedRequest {
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
}

impl Decode for ExportTraceServiceResponse {
    fn decode_bytes(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }
}

/// The most of a collector's HTTP answer that is read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How often a collector that keeps failing is named in the log.
const WARN_EVERY: Duration = Duration::from_secs(60);

enum Wire {
    Grpc {
        client: tonic::client::Grpc<Channel>,
        headers: MetadataMap,
    },
    Http {
        uri: http::Uri,
        headers: http::HeaderMap,
        /// For an https:// endpoint.
        tls: Option<tokio_rustls::TlsConnector>,
    },
}

pub(super) struct Exporter {
    wire: Wire,
    endpoint: String,
    timeout: Duration,
    /// The `Resource` and `InstrumentationScope` message bodies, the same in every export.
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Exporter {
    /// Checks the settings and prepares the connection, which is made at the first export.
    pub(super) fn new(options: &TracingOptions) -> Result<Self, String> {
        let bad_header = |name: &str| {
            format!(
                "OTEL_EXPORTER_OTLP_HEADERS: {name:?} cannot be sent as a header; header names \
                 are letters, digits and -, values printable ASCII"
            )
        };
        let wire = match options.transport {
            Transport::Grpc => {
                let headers = crate::tls::grpc_metadata(&options.headers)
                    .map_err(|name| bad_header(&name))?;
                let tls = tls_for(options, b"h2")?.map(|tls| TlsConnect {
                    tls,
                    server_name: None,
                });
                let timeout = options.timeout;
                let channel = crate::tls::grpc_channel(&options.endpoint, tls, |endpoint| {
                    endpoint.connect_timeout(timeout).timeout(timeout)
                })
                .map_err(|error| format!("OTLP endpoint {error}"))?;
                Wire::Grpc {
                    client: tonic::client::Grpc::new(channel),
                    headers,
                }
            }
            Transport::HttpProtobuf => {
                let mut headers = http::HeaderMap::new();
                for (name, value) in &options.headers {
                    let key = http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| bad_header(name))?;
                    let value = http::HeaderValue::from_str(value).map_err(|_| bad_header(name))?;
                    headers.insert(key, value);
                }
                let uri = options
                    .endpoint
                    .parse()
                    .map_err(|error| format!("OTLP endpoint {}: {error}", options.endpoint))?;
                Wire::Http {
                    uri,
                    headers,
                    tls: tls_for(options, b"http/1.1")?,
                }
            }
        };
        Ok(Self {
            wire,
            endpoint: options.endpoint.clone(),
            timeout: options.timeout,
            resource: {
                let mut resource = Vec::new();
                for (key, value) in &options.resource {
                    encode::text(&mut resource, 1, key, value);
                }
                resource
            },
            scope: {
                let mut scope = Vec::new();
                put_bytes(&mut scope, 1, b"meshlimit");
                put_bytes(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
                scope
            },
        })
    }

    /// Sends `spans` in one request; the spans the collector took, or why none were. A
    /// failure OTLP calls transient (the collector busy, restarting, unreachable) is tried
    /// again after a pause that doubles, for as long as the export timeout allows.
    async fn export(&mut self, spans: &[Vec<u8>]) -> Result<u64, String> {
        let count = spans.len() as u64;
        let request = encode::export_request(&self.resource, &self.scope, spans);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = FIRST_RETRY_PAUSE;
        let answer = loop {
            let attempt = tokio::time::timeout_at(deadline, self.send(request.clone())).await;
            let failed = match attempt {
                Ok(Ok(answer)) => break answer,
                Ok(Err(failed)) => failed,
                Err(_) => return Err(format!("no answer within {:?}", self.timeout)),
            };
            if !failed.transient || tokio::time::Instant::now() + pause >= deadline {
                return Err(failed.why);
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        };
        let rejected = answer.partial_success.map_or(0, |partial| {
            u64::try_from(partial.rejected_spans).unwrap_or(0)
        });
        Ok(count.saturating_sub(rejected))
    }

    async fn send(&mut self, request: Vec<u8>) -> Result<ExportTraceServiceResponse, Failed> {
        match &mut self.wire {
            Wire::Grpc { client, headers } => {
                let mut call = tonic::Request::new(EncodedRequest(request));
                *call.metadata_mut() = headers.clone();
                client
                    .ready()
                    .await
                    .map_err(|error| Failed::transient(format!("not connected: {error}")))?;
                client
                    .unary(
                        call,
                        PathAndQuery::from_static(EXPORT),
                        SmallBufferCodec::<EncodedRequest, ExportTraceServiceResponse>::default(),
                    )
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| {
                        use tonic::Code;
                        // OTLP's retryable gRPC codes.
                        let transient = matches!(
                            status.code(),
                            Code::Cancelled
                                | Code::DeadlineExceeded
                                | Code::ResourceExhausted
                                | Code::Aborted
                                | Code::OutOfRange
                                | Code::Unavailable
                                | Code::DataLoss
                        );
                        Failed {
                            why: format!("{:?}: {}", status.code(), status.message()),
                            transient,
                        }
                    })
            }
            Wire::Http { uri, headers, tls } => post(uri, headers, tls.as_ref(), request).await,
        }
    }
}

/// The first pause before an export is tried again.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Why an export failed, and whether trying again may help.
struct Failed {
    why: String,
    transient: bool,
}

impl Failed {
    fn transient(why: String) -> Self {
        Self {
            why,
            transient: true,
        }
    }
}

/// The TLS settings of an https:// endpoint, offering `alpn`; `None` for http://.
fn tls_for(
    options: &TracingOptions,
    alpn: &[u8],
) -> Result<Option<tokio_rustls::TlsConnector>, String> {
    if !options.endpoint.starts_with("https://") {
        return Ok(None);
    }
    let config = crate::tls::client_config(options.ca.as_deref(), alpn, options.identity.as_ref())
        .map_err(|error| format!("OTLP endpoint {}: {error}", options.endpoint))?;
    Ok(Some(tokio_rustls::TlsConnector::from(config)))
}

/// One POST on a fresh HTTP/1.1 connection (over TLS for https://): an export every few
/// seconds needs no pool.
async fn post(
    uri: &http::Uri,
    headers: &http::HeaderMap,
    tls: Option<&tokio_rustls::TlsConnector>,
    body: Vec<u8>,
) -> Result<ExportTraceServiceResponse, Failed> {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    // Origin form (`POST /v1/traces`), as to a server rather than a proxy.
    let path = uri.path_and_query().map_or("/", |path| path.as_str());
    let mut request = http::Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|error| Failed {
            why: error.to_string(),
            transient: false,
        })?;
    request.headers_mut().extend(headers.clone());
    let cannot_connect =
        |error: std::io::Error| Failed::transient(format!("cannot connect: {error}"));
    match tls {
        Some(tls) => {
            let stream = crate::tls::connect(tls, uri, None)
                .await
                .map_err(cannot_connect)?;
            exchange(TokioIo::new(stream), request).await
        }
        None => {
            let stream = tokio::net::TcpStream::connect(authority)
                .await
                .map_err(cannot_connect)?;
            exchange(TokioIo::new(stream), request).await
        }
    }
}

/// `request` over a new HTTP/1.1 connection on `io`, and the collector's answer.
async fn exchange<IO>(
    io: IO,
    request: http::Request<Full<Bytes>>,
) -> Result<ExportTraceServiceResponse, Failed>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|error| Failed::transient(format!("HTTP handshake: {error}")))?;
    let connection = tokio::spawn(connection);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| Failed::transient(format!("HTTP request: {error}")))?;
        let status = response.status();
        // An answer is a few bytes; a collector sending more is not read past this.
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|error| Failed {
                why: format!("HTTP response: {error}"),
                transient: false,
            })?
            .to_bytes();
        if !status.is_success() {
            let start = body.get(..200).unwrap_or(&body);
            let text = String::from_utf8_lossy(start).into_owned();
            // OTLP/HTTP's retryable statuses.
            return Err(Failed {
                why: format!("HTTP {status}: {text}"),
                transient: matches!(status.as_u16(), 429 | 502 | 503 | 504),
            });
        }
        // A collector may answer with an empty body; that is full success.
        Ok(ExportTraceServiceResponse::decode(body).unwrap_or_default())
    }
    .await;
    connection.abort();
    result
}

/// Batches what `queue` brings until it closes: a batch goes when it is full, when its
/// first span has waited `batch.delay`, or when a flush asks.
pub(super) async fn run(
    mut queue: mpsc::Receiver<Message>,
    mut exporter: Exporter,
    batch: BatchSettings,
    metrics: Arc<Metrics>,
) {
    let mut failures = Failures::default();
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut open = true;
    while open {
        let Some(first) = queue.recv().await else {
            break;
        };
        let mut flushed = Vec::new();
        let take = |message, pending: &mut Vec<Vec<u8>>, flushed: &mut Vec<_>| match message {
            Message::Span(span) => pending.push(span),
            Message::Flush(done) => flushed.push(done),
        };
        take(first, &mut pending, &mut flushed);
        let deadline = tokio::time::Instant::now() + batch.delay;
        while pending.len() < batch.max_batch && flushed.is_empty() {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(message)) => take(message, &mut pending, &mut flushed),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        while !pending.is_empty() {
            let batch_len = pending.len().min(batch.max_batch);
            let spans = pending.get(..batch_len).unwrap_or_default();
            let count = spans.len() as u64;
            match exporter.export(spans).await {
                Ok(taken) => {
                    metrics.spans_exported.fetch_add(taken, Ordering::Relaxed);
                    metrics
                        .spans_dropped
                        .fetch_add(count - taken, Ordering::Relaxed);
                }
                Err(why) => {
                    metrics.spans_dropped.fetch_add(count, Ordering::Relaxed);
                    failures.record(count, &exporter.endpoint, &why);
                }
            }
            pending.drain(..batch_len);
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// Export failures, logged at most once every `WARN_EVERY`.
#[derive(Default)]
struct Failures {
    last_warned: Option<Instant>,
    lost_since: u64,
}

impl Failures {
    fn record(&mut self, spans: u64, endpoint: &str, why: &str) {
        self.lost_since += spans;
        if self.last_warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        tracing::warn!(
            endpoint,
            error = why,
            spans_dropped = self.lost_since,
            "cannot export spans to the OTLP collector; check that it listens there and takes \
             this protocol (--otlp-protocol). Decisions are not affected"
        );
        self.last_warned = Some(Instant::now());
        self.lost_since = 0;
    }
}
