//! Config from an xDS management server, as Envoy Gateway and other control planes built on
//! go-control-plane hand it to envoyproxy/ratelimit (`CONFIG_TYPE=GRPC_XDS_SOTW`).
//!
//! meshlimit opens one aggregated (ADS) stream, state of the world, and subscribes to the
//! `RateLimitConfig` type. Every response holds every domain's config; it is loaded whole,
//! exactly as a config directory is (`resource`), and swapped in at once, or refused as a
//! whole with the loader's errors in a NACK, the last good config serving on. A lost server
//! costs nothing but updates: the client reconnects with growing pauses and resubscribes
//! with the version it last applied, so a server that still has it need not resend.

pub mod resource;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::uri::PathAndQuery;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::config::LoadOptions;
use crate::limiter::LiveConfig;
use crate::metrics::Metrics;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use crate::proto::google::rpc::Status;
use crate::reload;
use crate::tls::{ClientIdentity, TlsConnect};

/// The aggregated discovery stream, called by path: meshlimit declares no discovery
/// service of its own (see proto/envoy/service/discovery/v3/discovery.proto).
const ADS: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// gRPC's INVALID_ARGUMENT, the code of a NACK's error_detail.
const INVALID_ARGUMENT: i32 = 3;

/// The longest pause between reconnection attempts.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// Where the config comes from and how meshlimit introduces itself.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsOptions {
    /// http://host:port, or https://host:port for TLS.
    pub server: String,
    /// The node id the server keeps this client's snapshot under.
    pub node_id: String,
    /// The node's metadata, key to value (envoyproxy/ratelimit's
    /// CONFIG_GRPC_XDS_NODE_METADATA).
    pub node_metadata: Vec<(String, String)>,
    /// Sent with the stream, e.g. a token the server checks.
    pub headers: Vec<(String, String)>,
    /// For https://: the CAs the server's certificate must come from; else the system's.
    pub ca: Option<std::path::PathBuf>,
    /// For https://: the client certificate, for a server that asks for one.
    pub identity: Option<ClientIdentity>,
    /// For https://: the name the server's certificate must hold, when not the host's.
    pub server_name: Option<String>,
    /// The first pause before reconnecting; it doubles on each failure, up to 30 s.
    pub retry_interval: Duration,
    /// The largest response taken.
    pub max_message_bytes: usize,
    /// How long a subscription may go unanswered before a warning says so (Envoy's
    /// `initial_fetch_timeout`). The stream stays open: a server may answer late.
    pub initial_fetch_timeout: Duration,
    /// Pass health checks before the first config arrives, still answering UNAVAILABLE
    /// so Envoy's `failure_mode_deny` decides, as envoyproxy/ratelimit does with
    /// FORCE_START_WITHOUT_INITIAL_CONFIG.
    pub serve_before_config: bool,
}

impl XdsOptions {
    /// The defaults of everything but the server's address.
    pub fn new(server: String) -> Self {
        Self {
            server,
            node_id: "default".to_owned(),
            node_metadata: Vec::new(),
            headers: Vec::new(),
            ca: None,
            identity: None,
            server_name: None,
            retry_interval: Duration::from_secs(3),
            max_message_bytes: 4 * 1024 * 1024,
            initial_fetch_timeout: Duration::from_secs(15),
            serve_before_config: false,
        }
    }
}

/// Keeps `live` up to date with what the management server says.
pub struct XdsClient {
    options: XdsOptions,
    load: LoadOptions,
    live: LiveConfig,
    metrics: Arc<Metrics>,
    channel: Channel,
    headers: tonic::metadata::MetadataMap,
    connected: Arc<AtomicBool>,
}

/// How a stream ended.
struct Ended {
    why: String,
    /// Whether the server had answered on it: the pause before the next attempt starts
    /// over only then.
    answered: bool,
}

impl XdsClient {
    /// Checks the settings and prepares the channel; nothing is connected yet.
    pub fn new(
        options: XdsOptions,
        load: LoadOptions,
        live: LiveConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let tls = if options.server.starts_with("https://") {
            let config =
                crate::tls::client_config(options.ca.as_deref(), b"h2", options.identity.as_ref())
                    .map_err(|error| format!("xDS server {}: {error}", options.server))?;
            Some(tokio_rustls::TlsConnector::from(config))
        } else if options.server.starts_with("http://") {
            None
        } else {
            return Err(format!(
                "xDS server {}: write http://host:port, or https://host:port for TLS",
                options.server
            ));
        };
        let tls = tls.map(|tls| TlsConnect {
            tls,
            server_name: options.server_name.clone(),
        });
        let channel = crate::tls::grpc_channel(&options.server, tls, |endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
        })
        .map_err(|error| format!("xDS server {error}"))?;
        let headers = crate::tls::grpc_metadata(&options.headers).map_err(|name| {
            format!(
                "xDS header {name:?} cannot be sent: header names are letters, digits and -, \
                 values printable ASCII"
            )
        })?;
        let connected = Arc::new(AtomicBool::new(false));
        let gauge = connected.clone();
        metrics.scraped(
            crate::metrics::Scraped::Gauge,
            "meshlimit_xds_connected",
            "1 while the stream to the xDS management server is open.",
            move || u64::from(gauge.load(Ordering::Relaxed)),
        );
        Ok(Self {
            options,
            load,
            live,
            metrics,
            channel,
            headers,
            connected,
        })
    }

    /// The config this client keeps current.
    pub fn live(&self) -> &LiveConfig {
        &self.live
    }

    /// Follows the server until `shutdown` resolves, reconnecting whenever the stream ends.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut applied: Option<String> = None;
        let mut pause = self.options.retry_interval;
        loop {
            let ended = tokio::select! {
                () = &mut shutdown => return,
                ended = self.follow(&mut applied) => ended,
            };
            self.connected.store(false, Ordering::Relaxed);
            if ended.answered {
                pause = self.options.retry_interval;
            }
            let wait = jittered(pause);
            tracing::warn!(
                server = %self.options.server,
                "xDS: {}; {}; reconnecting in {wait:?}",
                ended.why,
                self.meanwhile()
            );
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
            }
            pause = (pause * 2).min(MAX_RETRY_INTERVAL);
        }
    }

    /// One stream: subscribe, then apply and acknowledge each response until it ends.
    /// `applied` is the version last put live, carried from stream to stream.
    async fn follow(&self, applied: &mut Option<String>) -> Ended {
        let (requests, outbound) = mpsc::channel::<DiscoveryRequest>(4);
        let subscribe = self.request(applied.clone().unwrap_or_default(), String::new(), None);
        let _ = requests.try_send(subscribe);
        let mut call = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
        *call.metadata_mut() = self.headers.clone();
        let mut client = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(self.options.max_message_bytes);
        let not_answered = |why: String| Ended {
            why,
            answered: false,
        };
        if let Err(error) = client.ready().await {
            return not_answered(format!("cannot connect: {error}"));
        }
        let codec = tonic_prost::ProstCodec::<DiscoveryRequest, DiscoveryResponse>::default();
        // Until the first response: a server may hold back even its response headers (a
        // Python gRPC server does until it has a message), so the wait covers both.
        let mut silent_until =
            Some(tokio::time::Instant::now() + self.options.initial_fetch_timeout);
        let opened = client.streaming(call, PathAndQuery::from_static(ADS), codec);
        // Open from here on, answered or not: a server built on a gRPC library sends its
        // response headers with its first message, and one with no config for this node
        // sends none (the silence warning says so); `run` clears this when the stream ends.
        self.connected.store(true, Ordering::Relaxed);
        let mut inbound = match self.warn_if_silent(opened, &mut silent_until).await {
            Ok(response) => response.into_inner(),
            Err(status) => return not_answered(describe(&status)),
        };
        tracing::info!(server = %self.options.server, node = %self.options.node_id, "xDS: subscribed to rate limit configs");
        let mut answered = false;
        loop {
            let received = self
                .warn_if_silent(inbound.message(), &mut silent_until)
                .await;
            let response = match received {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return Ended {
                        why: "the server ended the stream".to_owned(),
                        answered,
                    };
                }
                Err(status) => {
                    return Ended {
                        why: describe(&status),
                        answered,
                    };
                }
            };
            answered = true;
            silent_until = None;
            if response.type_url != resource::TYPE_URL {
                // An aggregated stream may carry types this client never asked for.
                tracing::debug!(type_url = %response.type_url, "xDS: skipped a response of another type");
                continue;
            }
            let reply = match self.apply(&response).await {
                Ok(()) => {
                    *applied = Some(response.version_info.clone());
                    self.request(response.version_info, response.nonce, None)
                }
                Err(why) => self.request(
                    applied.clone().unwrap_or_default(),
                    response.nonce,
                    Some(why),
                ),
            };
            if requests.send(reply).await.is_err() {
                return Ended {
                    why: "the stream closed".to_owned(),
                    answered,
                };
            }
        }
    }

    /// What serves while the server is away or silent, for the warnings that say so.
    fn meanwhile(&self) -> &'static str {
        if self.live.load().is_some() {
            "the current config keeps serving"
        } else if self.options.serve_before_config {
            "no config yet: requests are answered UNAVAILABLE and Envoy's failure_mode_deny decides them"
        } else {
            "no config yet, so health checks fail"
        }
    }

    /// Awaits `step`; if `silent_until` passes first, warns (once: it is then cleared)
    /// and goes on waiting. The most common reason a control plane says nothing is a node
    /// id it has no config for: go-control-plane's snapshot cache, Envoy Gateway's among
    /// them, holds such a subscription open and silent rather than refusing it.
    async fn warn_if_silent<T>(
        &self,
        step: impl Future<Output = T>,
        silent_until: &mut Option<tokio::time::Instant>,
    ) -> T {
        let Some(deadline) = *silent_until else {
            return step.await;
        };
        tokio::pin!(step);
        if let Ok(done) = tokio::time::timeout_at(deadline, &mut step).await {
            return done;
        }
        *silent_until = None;
        let meanwhile = self.meanwhile();
        tracing::warn!(
            server = %self.options.server,
            node = %self.options.node_id,
            "xDS: the server took the subscription {:?} ago and has sent no config; a control \
             plane answers only the node ids it has a config for: check that it knows node {:?} \
             (--xds-node-id, CONFIG_GRPC_XDS_NODE_ID); {meanwhile}; still waiting",
            self.options.initial_fetch_timeout,
            self.options.node_id,
        );
        step.await
    }

    /// Loads every resource of `response` as one config and puts it live, or says why not.
    async fn apply(&self, response: &DiscoveryResponse) -> Result<(), String> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for resource in &response.resources {
            hasher.update(&resource.value);
        }
        let (resources, load) = (response.resources.clone(), self.load);
        // Decoding and compiling recurse once per level of a tree: on the reload stack, off
        // the request threads (whose 2 MiB a deep resource overflowed in a debug build).
        let loaded = tokio::task::spawn_blocking(move || {
            reload::on_loader_stack(|| resource::load_snapshot(&resources, &load))
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| "the config could not be compiled: no thread to compile it on".to_owned())?;
        let source = format!(
            "xDS {} version {}",
            self.options.server, response.version_info
        );
        match loaded {
            Ok(loaded) => {
                reload::install(&self.live, &self.metrics, loaded, hasher.digest(), &source);
                Ok(())
            }
            Err(errors) => {
                reload::refuse(&self.metrics, &source, &errors);
                Err(errors.to_string())
            }
        }
    }

    /// A subscription (no nonce), an ACK (the version just applied), or a NACK (the last
    /// version applied, with why the response of `nonce` was refused).
    fn request(&self, version: String, nonce: String, refused: Option<String>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version,
            node: Some(self.node()),
            resource_names: Vec::new(),
            type_url: resource::TYPE_URL.to_owned(),
            response_nonce: nonce,
            error_detail: refused.map(|message| Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }),
        }
    }

    fn node(&self) -> Node {
        let metadata = (!self.options.node_metadata.is_empty()).then(|| prost_types::Struct {
            fields: self
                .options
                .node_metadata
                .iter()
                .map(|(key, value)| {
                    let value = prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(value.clone())),
                    };
                    (key.clone(), value)
                })
                .collect(),
        });
        Node {
            id: self.options.node_id.clone(),
            cluster: String::new(),
            metadata,
            user_agent_name: "meshlimit".to_owned(),
            user_agent_version_type: Some(
                crate::proto::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                    env!("CARGO_PKG_VERSION").to_owned(),
                ),
            ),
        }
    }
}

/// The status with what caused it: tonic's own message for a failed connection is only
/// "transport error", the reason (a refused handshake, a reset) is further down.
fn describe(status: &tonic::Status) -> String {
    let mut why = format!("{:?}", status.code());
    if !status.message().is_empty() {
        why.push_str(": ");
        why.push_str(status.message());
    }
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        why.push_str(": ");
        why.push_str(&cause.to_string());
        source = cause.source();
    }
    format!("the stream failed ({why})")
}

/// `pause` give or take a quarter, so replicas that lost the same server do not all come
/// back in the same instant.
fn jittered(pause: Duration) -> Duration {
    crate::jitter::give_or_take(pause, 250)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_stays_within_a_quarter_of_its_value() {
        for _ in 0..200 {
            let wait = jittered(Duration::from_secs(4));
            assert!(
                wait >= Duration::from_secs(3) && wait <= Duration::from_secs(5),
                "{wait:?}"
            );
        }
    }

    #[test]
    fn addresses_without_a_scheme_are_refused_with_what_to_write() {
        let live: LiveConfig = Arc::new(arc_swap::ArcSwapOption::empty());
        let result = XdsClient::new(
            XdsOptions::new("envoy-gateway:18001".into()),
            LoadOptions::default(),
            live,
            Arc::new(Metrics::default()),
        );
        let Err(error) = result else {
            panic!("an address without a scheme was taken")
        };
        assert!(error.contains("http://host:port"), "{error}");
    }
}
