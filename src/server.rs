//! Wiring for `meshlimit serve`: load the config, build the limiter, and run the gRPC and
//! admin listeners until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::admin::{self, AdminState, Health, StoreCheck};
use crate::clock::{Clock, SystemClock};
use crate::config::{ConfigErrors, LoadOptions};
use crate::connections;
use crate::envoyproxy_env::MetricsListener;
use crate::limiter::{LiveConfig, RateLimiter, RequestBounds};
use crate::metrics::{EnvoyproxyNames, Metrics, Scraped};
use crate::proto::rate_limit_service_server::RateLimitServiceServer;
use crate::reload::Reloader;
use crate::service::grpc::GrpcRateLimitService;
use crate::store::redis::{RedisOptions, RedisSetupError, StoreHealth};
use crate::store::split::SplitStore;
use crate::store::{CounterStore, MemoryStore, RedisStore};
use crate::tls::{self, ReloadingCert, TlsFiles, TlsIncoming};
use crate::trace::{Tracer, TracingOptions};
use crate::xds::{XdsClient, XdsOptions};

/// Everything `serve` needs, parsed from flags and environment by the binary.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the config comes from.
    pub config: ConfigSource,
    pub grpc_addr: SocketAddr,
    /// Serve gRPC on this Unix domain socket instead of `grpc_addr`.
    pub grpc_uds: Option<PathBuf>,
    pub admin_addr: SocketAddr,
    /// A second listener serving only the metrics.
    pub metrics_listener: Option<MetricsListener>,
    /// envoyproxy/ratelimit's debug port (`/rlconfig`, `/stats`).
    pub debug_listener: Option<DebugListener>,
    /// The names of the metrics envoyproxy/ratelimit also has: its built-in ones, or those
    /// of an operator's mapping (PROMETHEUS_MAPPER_YAML).
    pub envoyproxy_names: EnvoyproxyNames,
    /// The mapping file (PROMETHEUS_MAPPER_YAML), followed for changes while serving.
    pub prometheus_mapper: Option<PathBuf>,
    /// When gRPC connections are asked to reconnect (GOAWAY), and closed if they linger.
    pub connection_lifetime: connections::Lifetime,
    /// Push the counters to a statsd agent.
    pub statsd: Option<crate::statsd::StatsdOptions>,
    /// Send a span of each sampled call to an OTLP collector.
    pub tracing: Option<TracingOptions>,
    pub load: LoadOptions,
    pub cache_capacity: u64,
    /// Keep the memory store's counters in this file across restarts.
    pub memory_snapshot: Option<SnapshotOptions>,
    /// The secret `DELETE /v1/usage` must present; resets are off without it.
    pub admin_reset_token_file: Option<PathBuf>,
    pub bounds: RequestBounds,
    pub max_request_bytes: usize,
    /// How often the config directory is checked for changes; zero checks only on SIGHUP.
    pub watch_interval: std::time::Duration,
    /// What responses carry besides status codes.
    pub presentation: crate::response::ResponseSettings,
    /// Fraction of a limit past which hits count as near the limit (NEAR_LIMIT_RATIO).
    pub near_limit_ratio: f64,
    /// Service-wide shadow or quota mode (SHADOW_MODE, QUOTA_MODE).
    pub global_modes: crate::limiter::GlobalModes,
    /// TLS (and with a client CA, mTLS) on the gRPC port.
    pub tls: Option<TlsFiles>,
    /// Fail health checks while the Redis store cannot be reached (envoyproxy/ratelimit's
    /// REDIS_HEALTH_CHECK_ACTIVE_CONNECTION).
    pub health_requires_redis: bool,
    /// After a shutdown signal, how long to keep serving with failing health checks.
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish once listeners stop.
    pub shutdown_grace: Duration,
    /// Where counters live.
    pub store: StoreChoice,
}

/// Where envoyproxy/ratelimit's debug port listens, and whether it must.
#[derive(Debug, Clone, Copy)]
pub struct DebugListener {
    pub addr: SocketAddr,
    /// Asked for (`--debug-addr`, `DEBUG_HOST`/`DEBUG_PORT`): a port that cannot be bound
    /// stops the start. Otherwise (the default of `/bin/ratelimit`) it is only logged and
    /// serving goes on without it, as envoyproxy/ratelimit goes on.
    pub required: bool,
}

/// `--memory-snapshot`: where the memory store's counters are saved, and how often besides
/// at shutdown (zero: only then).
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub path: PathBuf,
    pub interval: Duration,
}

/// A directory of files (`--config`) or an xDS management server (`--xds-server`).
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Dir(PathBuf),
    Xds(Box<XdsOptions>),
}

impl ConfigSource {
    /// Where the config comes from, for the log.
    fn describe(&self) -> String {
        match self {
            Self::Dir(dir) => dir.display().to_string(),
            Self::Xds(xds) => format!("xDS {} as node {}", xds.server, xds.node_id),
        }
    }
}

/// `--store`: this process's memory, or Redis shared by every replica.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    Memory,
    // Boxed: the Redis settings are far larger than nothing.
    Redis(Box<RedisOptions>),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the config in {dir} has problems:\n{errors}")]
    Config { dir: String, errors: ConfigErrors },
    #[error("{0}")]
    Xds(String),
    #[error("cannot listen on {addr} ({what}): {source}; pick a free address with {flag}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("gRPC socket: {0}")]
    UnixSocket(#[from] crate::unix_socket::UnixSocketError),
    #[error(
        "TLS is served on a TCP port only, and gRPC is set to a Unix socket: drop the TLS \
         settings (the socket's directory decides who may connect) or serve on --grpc-addr"
    )]
    TlsOnUnixSocket,
    #[error("the {what} server failed: {message}")]
    Serve { what: &'static str, message: String },
    #[error("redis store: {0}")]
    Redis(#[from] RedisSetupError),
}

fn serving_status(healthy: bool) -> ServingStatus {
    if healthy {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// The gRPC service name Envoy's health checks and envoyproxy/ratelimit users probe.
pub const HEALTH_SERVICE_NAME: &str = "ratelimit";

/// The live config and what keeps it current.
enum ConfigFeed {
    Dir(Arc<Reloader>),
    // Boxed: the client holds its settings and channel, the reloader is one pointer.
    Xds(Box<XdsClient>),
}

impl ConfigFeed {
    /// Loads the directory (an invalid one is an error) or prepares the xDS client.
    fn start(options: &ServeOptions, metrics: &Arc<Metrics>) -> Result<Self, ServeError> {
        match &options.config {
            ConfigSource::Dir(dir) => {
                let reloader =
                    Reloader::start(dir, options.load, metrics.clone()).map_err(|errors| {
                        ServeError::Config {
                            dir: dir.display().to_string(),
                            errors,
                        }
                    })?;
                for path in crate::config::skipped_entries(dir) {
                    tracing::warn!(
                        path = %path.display(),
                        "not read: only *.yaml and *.yml files directly in the config directory are; \
                         rename the file, or move it up from its subdirectory"
                    );
                }
                if let Some(loaded) = reloader.live().load_full() {
                    for domain in loaded.domains() {
                        tracing::info!(domain = %domain.name, file = %domain.file, rules = domain.rules().len(), "loaded domain");
                    }
                }
                Ok(Self::Dir(Arc::new(reloader)))
            }
            ConfigSource::Xds(xds) => {
                let live: LiveConfig = Arc::new(arc_swap::ArcSwapOption::empty());
                let client =
                    XdsClient::new((**xds).clone(), options.load, live.clone(), metrics.clone())
                        .map_err(ServeError::Xds)?;
                Ok(Self::Xds(Box::new(client)))
            }
        }
    }

    fn live(&self) -> LiveConfig {
        match self {
            Self::Dir(reloader) => reloader.live().clone(),
            Self::Xds(client) => client.live().clone(),
        }
    }

    /// Keeps the config current until shutdown: the directory checked every
    /// `watch_interval` and on SIGHUP, or the xDS stream followed.
    async fn follow(self, watch_interval: Duration, mut hangup: tokio::sync::mpsc::Receiver<()>) {
        match self {
            Self::Dir(reloader) => {
                reloader
                    .watch(watch_interval, hangup, shutdown_signal())
                    .await
            }
            Self::Xds(client) => {
                let hangups = async move {
                    while hangup.recv().await.is_some() {
                        tracing::info!("SIGHUP: the config comes from xDS; nothing to reload");
                    }
                };
                tokio::select! {
                    () = client.run(shutdown_signal()) => {}
                    () = hangups => {}
                }
            }
        }
    }
}

pub async fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::with_names(options.envoyproxy_names.clone()));
    let feed = ConfigFeed::start(&options, &metrics)?;
    // Both stores serve through the same generic path below.
    match options.store.clone() {
        StoreChoice::Memory => {
            let store = match &options.memory_snapshot {
                Some(snapshot) => restore(options.cache_capacity, &snapshot.path),
                None => MemoryStore::new(options.cache_capacity),
            };
            let (entries, evictions) = (store.clone(), store.clone());
            metrics.scraped(
                Scraped::Gauge,
                "meshlimit_cache_entries",
                "Counters held in memory.",
                move || entries.len(),
            );
            metrics.scraped(
                Scraped::Counter,
                "meshlimit_cache_evictions_total",
                "Counters evicted to stay within --cache-capacity.",
                move || evictions.evictions(),
            );
            let Some(snapshot) = options.memory_snapshot.clone() else {
                return serve_with(options, metrics, feed, store, None).await;
            };
            let saves = Arc::new(Saves::default());
            saves.export(&metrics);
            let saver = tokio::spawn(save_every(store.clone(), snapshot.clone(), saves.clone()));
            let served = serve_with(options, metrics, feed, store.clone(), None).await;
            // The last save, once nothing decides any more: every hit counted is in it.
            saver.abort();
            save(store, snapshot.path, &saves).await;
            served
        }
        StoreChoice::Redis(mut redis) => {
            let per_second = redis.per_second.take();
            let main = RedisStore::connect(*redis).await?;
            match per_second {
                None => {
                    let check = redis_check(&options, vec![main.clone()]);
                    redis_gauges(&metrics, vec![main.clone()]);
                    serve_with(options, metrics, feed, main, check).await
                }
                Some(per_second) => {
                    let per_second = RedisStore::connect(*per_second).await?;
                    tracing::info!(
                        "per-second limits are counted in their own Redis (REDIS_PERSECOND)"
                    );
                    let both = vec![main.clone(), per_second.clone()];
                    let check = redis_check(&options, both.clone());
                    redis_gauges(&metrics, both);
                    let store = SplitStore::new(main, per_second);
                    serve_with(options, metrics, feed, store, check).await
                }
            }
        }
    }
}

/// The memory store, with the counters `path` saved if it holds any. A snapshot that cannot
/// be read is moved aside (kept for a look, not overwritten by the next save) and the
/// store starts empty: limits that start over beat a rate limiter that does not start.
fn restore(capacity: u64, path: &Path) -> MemoryStore {
    let now = SystemClock.now_millis();
    if !path.exists() {
        tracing::info!(path = %path.display(), "no counter snapshot yet; starting with none");
        return MemoryStore::new(capacity);
    }
    match MemoryStore::load_snapshot(capacity, path, now) {
        Ok((store, restored)) => {
            tracing::info!(
                path = %path.display(),
                counters = restored.counters,
                expired = restored.expired,
                over_capacity = restored.over_capacity,
                "counters restored from the snapshot"
            );
            store
        }
        Err(error) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".unreadable");
            let moved = std::fs::rename(path, &aside);
            tracing::error!(
                %error,
                moved_to = %Path::new(&aside).display(),
                moved = moved.is_ok(),
                "the counter snapshot cannot be read; starting with no counters"
            );
            MemoryStore::new(capacity)
        }
    }
}

/// How the counter snapshot's saves went, on `/metrics`: a disk that filled up or a volume
/// that went away is an alert to raise before a restart finds an old snapshot.
#[derive(Default)]
struct Saves {
    last_saved_secs: AtomicU64,
    counters: AtomicU64,
    failed: AtomicU64,
}

impl Saves {
    fn export(self: &Arc<Self>, metrics: &Metrics) {
        let (last, counters, failed) = (self.clone(), self.clone(), self.clone());
        metrics.scraped(
        Scraped::Gauge,
            "meshlimit_snapshot_last_saved_timestamp_seconds",
            "When the counter snapshot (--memory-snapshot) was last written, in Unix seconds; 0 before the first save.",
            move || last.last_saved_secs.load(Relaxed),
        );
        metrics.scraped(
            Scraped::Gauge,
            "meshlimit_snapshot_counters",
            "Counters the last counter snapshot holds.",
            move || counters.counters.load(Relaxed),
        );
        metrics.scraped(
            Scraped::Counter,
            "meshlimit_snapshot_failed_saves_total",
            "Counter snapshot saves that failed (the previous file stays); the log says why.",
            move || failed.failed.load(Relaxed),
        );
    }
}

/// Saves the memory store every `snapshot.interval` (never, for zero).
async fn save_every(store: MemoryStore, snapshot: SnapshotOptions, saves: Arc<Saves>) {
    if snapshot.interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(snapshot.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        save(store.clone(), snapshot.path.clone(), &saves).await;
    }
}

/// One save, off the async threads (it writes and syncs a file); a failure is logged and
/// counted, and the next save tries again.
async fn save(store: MemoryStore, path: PathBuf, saves: &Saves) {
    let started = std::time::Instant::now();
    let shown = path.display().to_string();
    let saved =
        tokio::task::spawn_blocking(move || store.save_snapshot(&path, SystemClock.now_millis()))
            .await;
    match saved {
        Ok(Ok(counters)) => {
            saves.counters.store(counters, Relaxed);
            (saves.last_saved_secs).store(SystemClock.now_millis() / 1_000, Relaxed);
            tracing::debug!(path = %shown, counters, took = ?started.elapsed(), "counters saved")
        }
        Ok(Err(error)) => {
            saves.failed.fetch_add(1, Relaxed);
            tracing::warn!(%error, "cannot save the counter snapshot; the previous one stays")
        }
        Err(error) => {
            saves.failed.fetch_add(1, Relaxed);
            tracing::warn!(%error, "the counter snapshot's save stopped")
        }
    }
}

/// With `--health-requires-redis` (REDIS_HEALTH_CHECK_ACTIVE_CONNECTION): reachable while no
/// Redis of `stores` is degraded. Each Redis is also pinged every breaker probe interval:
/// a replica whose health fails gets no requests, and without them it would never see
/// Redis come back.
fn redis_check(options: &ServeOptions, stores: Vec<RedisStore>) -> Option<StoreCheck> {
    if !options.health_requires_redis {
        return None;
    }
    let probed = stores.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(crate::store::redis::PROBE_INTERVAL).await;
            for store in &probed {
                store.probe().await;
            }
        }
    });
    tracing::info!("health checks fail while Redis cannot be reached (--health-requires-redis)");
    Some(Arc::new(move || {
        (stores.iter()).all(|store| store.health() == StoreHealth::Healthy)
    }))
}

/// The Redis store's metrics, summed over `stores` (two with a per-second Redis).
fn redis_gauges(metrics: &Arc<Metrics>, stores: Vec<RedisStore>) {
    for store in &stores {
        let counted = metrics.clone();
        store.on_local_cache_hits(move |descriptors| {
            counted
                .local_cache_hits
                .fetch_add(descriptors, std::sync::atomic::Ordering::Relaxed);
        });
        let failed = metrics.clone();
        store.on_failed_calls(move |calls| {
            failed
                .store_errors
                .fetch_add(calls, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let stores = Arc::new(stores);
    let (health, fallbacks, entries) = (stores.clone(), stores.clone(), stores);
    metrics.scraped(
        Scraped::Gauge,
        "meshlimit_cache_entries",
        "Counters held in memory: with --store redis, those --redis-failure-mode local kept while Redis was away.",
        move || entries.iter().map(RedisStore::fallback_counters).sum(),
    );
    metrics.scraped(
        Scraped::Gauge,
        "meshlimit_redis_degraded",
        "1 while a Redis node's circuit breaker is open and the failure policy answers for it.",
        move || {
            u64::from(
                health
                    .iter()
                    .any(|store| store.health() == StoreHealth::Degraded),
            )
        },
    );
    metrics.scraped(
        Scraped::Counter,
        "meshlimit_redis_fallback_decisions_total",
        "Checks decided by --redis-failure-mode because Redis did not answer in time.",
        move || fallbacks.iter().map(RedisStore::fallback_decisions).sum(),
    );
}

async fn serve_with<S: CounterStore>(
    options: ServeOptions,
    metrics: Arc<Metrics>,
    feed: ConfigFeed,
    store: S,
    store_check: Option<StoreCheck>,
) -> Result<(), ServeError> {
    let live = feed.live();
    // SIGHUP's default action ends the process: handle it before anything reports healthy.
    let hangup = crate::reload::hangup_signal();
    let limiter = Arc::new(
        RateLimiter::new(live.clone(), store, SystemClock, options.bounds)
            .with_presentation(options.presentation.clone())
            .with_metrics(metrics.clone(), options.near_limit_ratio)
            .with_global_modes(options.global_modes),
    );

    let grpc_listener = match &options.grpc_uds {
        Some(_) if options.tls.is_some() => return Err(ServeError::TlsOnUnixSocket),
        Some(path) => GrpcListener::Unix(crate::unix_socket::bind(path)?),
        None => GrpcListener::Tcp(bind(options.grpc_addr, "gRPC", "--grpc-addr").await?),
    };
    let admin_listener = bind(options.admin_addr, "admin", "--admin-addr").await?;
    let metrics_listener = match &options.metrics_listener {
        Some(listener) => Some((
            bind(
                listener.addr,
                "metrics",
                "--metrics-addr (or PROMETHEUS_ADDR)",
            )
            .await?,
            listener.path.as_str(),
        )),
        None => None,
    };
    let debug_listener = match options.debug_listener {
        Some(asked) if asked.required => Some(
            bind(
                asked.addr,
                "debug",
                "--debug-addr (or DEBUG_HOST/DEBUG_PORT)",
            )
            .await?,
        ),
        Some(asked) => match TcpListener::bind(asked.addr).await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(addr = %asked.addr, %error, "envoyproxy/ratelimit's debug port (/rlconfig, /stats) is not served: set DEBUG_PORT to a free port to have it");
                None
            }
        },
        None => None,
    };
    tracing::info!(
        grpc = %grpc_listener.describe(),
        connections = %options.connection_lifetime,
        admin = %local(&admin_listener),
        metrics = metrics_listener.as_ref().map(|(listener, path)| format!("{}{path}", local(listener))),
        debug = debug_listener.as_ref().map(local),
        config = %options.config.describe(),
        "meshlimit listening"
    );

    let mut tls_watcher = None;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health = match store_check {
        Some(check) => Health::requiring_store(check),
        None => Health::default(),
    };
    let health = Arc::new(match &options.config {
        ConfigSource::Xds(xds) if xds.serve_before_config => health.before_config(),
        _ => health,
    });
    health.set_serving(true);
    // The gRPC health service says what /healthcheck says: serving once there is a config
    // (at once from a directory, at the first xDS response) and, when required, while the
    // store can be reached. Set before the port opens, then followed.
    let mut reported = health.is_healthy(&live);
    for service in [HEALTH_SERVICE_NAME, ""] {
        health_reporter
            .set_service_status(service, serving_status(reported))
            .await;
    }
    let health_follower = {
        let (reporter, live, health) = (health_reporter.clone(), live.clone(), health.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let now = health.is_healthy(&live);
                if now != reported {
                    reported = now;
                    for service in [HEALTH_SERVICE_NAME, ""] {
                        reporter
                            .set_service_status(service, serving_status(now))
                            .await;
                    }
                }
            }
        })
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| ServeError::Serve {
            what: "reflection",
            message: error.to_string(),
        })?;
    let tracer = match options.tracing.clone() {
        Some(tracing) => {
            tracing::info!(endpoint = %tracing.endpoint, transport = ?tracing.transport, "exporting spans over OTLP");
            let (tracer, export) =
                Tracer::new(tracing, metrics.clone()).map_err(|message| ServeError::Serve {
                    what: "tracing",
                    message,
                })?;
            tokio::spawn(export);
            Some(Arc::new(tracer))
        }
        None => None,
    };
    let rate_limit = RateLimitServiceServer::new(
        GrpcRateLimitService::new(limiter.clone(), options.max_request_bytes)
            .with_tracer(tracer.clone()),
    )
    // Far larger bodies are refused by the transport before they are decoded.
    .max_decoding_message_size(options.max_request_bytes.saturating_mul(4));

    let metrics_app = metrics_listener
        .map(|(listener, path)| (listener, admin::metrics_router(metrics.clone(), path)));
    let debug_app = debug_listener
        .map(|listener| (listener, admin::debug_router(live.clone(), metrics.clone())));
    let statsd = options.statsd.clone().map(|statsd| {
        tracing::info!(target = %statsd.target, every = ?statsd.interval, "pushing counters to statsd");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let pushing = tokio::spawn(crate::statsd::push_loop(metrics.clone(), statsd, stopped));
        (stop, pushing)
    });
    let mapping_follower = options.prometheus_mapper.clone().map(|path| {
        // What main loaded, or nothing when the file was not there.
        let seen = std::fs::read(&path).ok();
        let metrics = metrics.clone();
        let apply = move |mapping| metrics.set_names(EnvoyproxyNames::Mapped(Box::new(mapping)));
        let follow = crate::prometheus_mapping::follow(path, options.watch_interval, seen, apply);
        tokio::spawn(follow)
    });
    let admin_app = admin::router(AdminState {
        health: health.clone(),
        config: live,
        metrics: metrics.clone(),
        decisions: limiter.clone(),
        reset_token_file: options.admin_reset_token_file.clone(),
    });
    let watcher = tokio::spawn(feed.follow(options.watch_interval, hangup));

    // Shutdown in three steps: a signal fails health at once (admin and gRPC health), so
    // load balancers and Envoy stop sending; after --drain-delay the listeners stop
    // accepting and in-flight requests finish; after --shutdown-grace the process exits
    // whatever is left.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let when_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let grpc_server = connections::Server {
        routes: tonic::service::Routes::new(rate_limit)
            .add_service(health_service)
            .add_service(reflection)
            .prepare(),
        lifetime: options.connection_lifetime,
        counts: metrics.connections.clone(),
    };
    // Removes the socket file once the server has stopped, when serving on one.
    let mut _socket_file = None;
    let grpc: Pin<Box<dyn Future<Output = ()> + Send>> = match (&options.tls, grpc_listener) {
        (_, GrpcListener::Unix(socket)) => {
            let (listener, file) = socket.into_parts();
            _socket_file = Some(file);
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            Box::pin(grpc_server.serve(incoming, when_stopped()))
        }
        (Some(files), GrpcListener::Tcp(grpc_listener)) => {
            let cert = Arc::new(ReloadingCert::load(files.clone())?);
            let config = tls::server_config(cert.clone())?;
            tls_watcher = Some(cert.watch(Duration::from_secs(5)));
            tracing::info!(
                client_certificates = files.client_ca.is_some(),
                "gRPC port serves TLS"
            );
            let incoming = TlsIncoming::new(grpc_listener, config, when_stopped());
            Box::pin(grpc_server.serve(incoming, when_stopped()))
        }
        (None, GrpcListener::Tcp(grpc_listener)) => {
            let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            Box::pin(grpc_server.serve(incoming, when_stopped()))
        }
    };
    let admin = axum::serve(admin_listener, admin_app).with_graceful_shutdown(when_stopped());
    let metrics_only = optional_server(metrics_app, when_stopped());
    let debug = optional_server(debug_app, when_stopped());
    let mut servers = tokio::spawn(async move {
        // The gRPC connections end without an error of the server's: each one's is its own.
        let ((), admin, metrics, debug) = tokio::join!(grpc, admin, metrics_only, debug);
        admin.and(metrics).and(debug)
    });

    let admin = tokio::select! {
        finished = &mut servers => finished.map_err(|e| ServeError::Serve { what: "server", message: e.to_string() })?,
        () = shutdown_signal() => {
            health.set_serving(false);
            health_follower.abort();
            for service in [HEALTH_SERVICE_NAME, ""] {
                health_reporter.set_service_status(service, ServingStatus::NotServing).await;
            }
            tracing::info!(drain = ?options.drain_delay, grace = ?options.shutdown_grace, "shutting down: health now fails; draining");
            tokio::time::sleep(options.drain_delay).await;
            let _ = stop.send(true);
            match tokio::time::timeout(options.shutdown_grace, &mut servers).await {
                Ok(finished) => finished.map_err(|e| ServeError::Serve { what: "server", message: e.to_string() })?,
                Err(_) => {
                    tracing::warn!("the shutdown grace period ended with connections still open (requests in flight, or idle clients that did not close); exiting");
                    Ok(())
                }
            }
        }
    };
    health.set_serving(false);
    health_follower.abort();
    watcher.abort();
    // The last calls' spans, while the process still can.
    if let Some(tracer) = tracer {
        tracer.flush(Duration::from_secs(2)).await;
    }
    if let Some(follower) = mapping_follower {
        follower.abort();
    }
    // The last interval's counts, once every call has been answered; an agent that does
    // not take them within a second is not waited for.
    if let Some((stop, mut pushing)) = statsd {
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_secs(1), &mut pushing)
            .await
            .is_err()
        {
            pushing.abort();
        }
    }
    if let Some(tls_watcher) = tls_watcher {
        tls_watcher.abort();
    }
    admin.map_err(|error| ServeError::Serve {
        what: "admin",
        message: error.to_string(),
    })?;
    tracing::info!("meshlimit stopped");
    Ok(())
}

/// An HTTP listener of its own (metrics, debug) when there is one, until `stopped`.
async fn optional_server(
    app: Option<(TcpListener, axum::Router)>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match app {
        Some((listener, app)) => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
        None => Ok(()),
    }
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr,
            what,
            flag,
            source,
        })
}

/// Where gRPC is served: a TCP port, or a Unix domain socket (`--grpc-uds`).
enum GrpcListener {
    Tcp(TcpListener),
    Unix(crate::unix_socket::BoundSocket),
}

impl GrpcListener {
    fn describe(&self) -> String {
        match self {
            Self::Tcp(listener) => local(listener),
            Self::Unix(socket) => format!("unix:{}", socket.path().display()),
        }
    }
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|addr| addr.to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
