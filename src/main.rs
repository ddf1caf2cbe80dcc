//! The `meshlimit` binary: parses flags and environment, sets up logging, and hands over to
//! the library (`server::serve`, `config::load_dir`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshlimit::clock::Clock;
use meshlimit::config::{self, LoadOptions};
use meshlimit::envoyproxy_env::{self, EnvoyproxyEnv, GoBool, MetricsListener};
use meshlimit::limit::Algorithm;
use meshlimit::limiter::{GlobalModes, RequestBounds};
use meshlimit::metrics::EnvoyproxyNames;
use meshlimit::prometheus_mapping::PrometheusMapping;
use meshlimit::response::{LegacyNames, ResponseSettings};
use meshlimit::rule::HeaderSet;
use meshlimit::server::{
    self, ConfigSource, DebugListener, ServeOptions, SnapshotOptions, StoreChoice,
};
use meshlimit::simulate::{Pattern, Scenario};
use meshlimit::statsd::{StatsdFormat, StatsdOptions, Transport};
use meshlimit::store::redis::settings::{self, RedisFlags};
use meshlimit::store::redis::{FailureMode, RedisOptions, RedisTls};
use meshlimit::xds::XdsOptions;

/// mimalloc instead of glibc's malloc: a decision's allocations (tonic's buffers, h2's frames,
/// the decoded request's strings) are a fifth of its instructions under glibc, and mimalloc's
/// per-thread free lists cost 17 % fewer instructions a request (BENCHMARKS.md section 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "meshlimit",
    version,
    about = "Envoy-compatible external rate-limit service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve envoy.service.ratelimit.v3.RateLimitService over gRPC.
    // Boxed: the serve flags are far larger than the other commands'.
    Serve(Box<ServeArgs>),
    /// Check a config directory: every problem with file:line:column, or a summary per domain.
    Validate {
        /// The directory holding the *.yaml config files.
        dir: PathBuf,
        #[command(flatten)]
        counting: CountingArgs,
    },
    /// Replay a traffic pattern through every algorithm on a virtual clock and compare
    /// each with the exact answer (a sliding log); optionally plot admitted rate as SVG.
    Simulate {
        #[arg(long, value_enum, default_value_t = Pattern::BoundaryBurst)]
        pattern: Pattern,
        /// Requests allowed per window.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// The window, e.g. 1m or 10s.
        #[arg(long, default_value = "1m", value_parser = parse_interval)]
        per: Duration,
        /// Offered load as a multiple of the limit's rate (steady and bursty patterns).
        #[arg(long, default_value_t = 2.0)]
        load: f64,
        /// Simulated time.
        #[arg(long, default_value = "20m", value_parser = parse_interval)]
        duration: Duration,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write an SVG plot of admitted requests over time here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Show how descriptors match: the nodes tried, the effective policy after inheritance
    /// with where each field came from, and the counter keys.
    Explain {
        /// The directory holding the *.yaml config files.
        #[arg(long, env = "MESHLIMIT_CONFIG")]
        config: PathBuf,
        /// The domain the descriptors are sent for.
        #[arg(long)]
        domain: String,
        /// One argument per descriptor, entries as key=value joined by commas,
        /// e.g. `plan=pro,user=alice`.
        #[arg(required = true)]
        descriptors: Vec<String>,
        /// The instant whose fixed windows are shown, as RFC 3339
        /// (`2027-01-31T23:30:00Z`, `2027-01-31T23:30:00+01:00`); now when left out.
        #[arg(long, value_parser = parse_instant)]
        at: Option<u64>,
        #[command(flatten)]
        counting: CountingArgs,
    },
}

#[derive(Args)]
struct CountingArgs {
    /// The algorithm of rules that do not set `algorithm`; `fixed_window` reproduces
    /// envoyproxy/ratelimit's decisions exactly.
    #[arg(long, env = "MESHLIMIT_DEFAULT_ALGORITHM", value_enum, default_value_t = Algorithm::SlidingWindow)]
    default_algorithm: Algorithm,
    /// The largest limit a `sliding_log` rule may have: it keeps one timestamp per hit.
    #[arg(long, env = "MESHLIMIT_MAX_SLIDING_LOG_LIMIT", default_value_t = LoadOptions::default().max_sliding_log_limit)]
    max_sliding_log_limit: u32,
    /// Let several files name the same domain and add their descriptors to it
    /// (envoyproxy/ratelimit: MERGE_DOMAIN_CONFIG).
    #[arg(long, env = "MERGE_DOMAIN_CONFIG", default_value_t = false, value_parser = GoBool, action = clap::ArgAction::Set)]
    merge_domain_config: bool,
}

impl CountingArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            default_algorithm: self.default_algorithm,
            max_sliding_log_limit: self.max_sliding_log_limit,
            merge_domains: self.merge_domain_config,
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// The directory holding the *.yaml config files (one domain per file); unset,
    /// envoyproxy/ratelimit's RUNTIME_ROOT and RUNTIME_SUBDIRECTORY name it, else this
    /// default, when it exists (the container image's example config)
    /// [default: /etc/meshlimit/config]
    #[arg(long, env = "MESHLIMIT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the gRPC rate limit service listens; unset, envoyproxy/ratelimit's GRPC_HOST and
    /// GRPC_PORT apply [default: 0.0.0.0:8081]
    #[arg(long, env = "MESHLIMIT_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Serve gRPC on this Unix domain socket instead of a TCP port, for an Envoy in the same
    /// pod (a `pipe` address); the file is made connectable by any user who can reach its
    /// directory. Unset, envoyproxy/ratelimit's GRPC_UDS applies; neither, no socket
    #[arg(long, env = "MESHLIMIT_GRPC_UDS", conflicts_with = "grpc_addr")]
    grpc_uds: Option<PathBuf>,
    /// Where the HTTP admin port (/healthcheck, /metrics) listens; unset, envoyproxy/ratelimit's
    /// HOST and PORT apply [default: 0.0.0.0:8080]
    #[arg(long, env = "MESHLIMIT_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Serve /metrics here too, for scrapers that expect a port of their own
    /// [also USE_PROMETHEUS=true with PROMETHEUS_ADDR and PROMETHEUS_PATH].
    #[arg(long, env = "MESHLIMIT_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// envoyproxy/ratelimit's debug port: /rlconfig as its one-line-per-rule dump, /stats;
    /// unset, DEBUG_HOST and DEBUG_PORT apply, else, started as /bin/ratelimit,
    /// envoyproxy/ratelimit's 0.0.0.0:6070 when free [default: not opened]
    #[arg(long, env = "MESHLIMIT_DEBUG_ADDR")]
    debug_addr: Option<SocketAddr>,
    #[command(flatten)]
    counting: CountingArgs,
    /// The most counters the in-memory store holds; least useful ones are evicted first.
    #[arg(long, env = "MESHLIMIT_CACHE_CAPACITY", default_value_t = 1_000_000, value_parser = parse_cache_capacity)]
    cache_capacity: u64,
    /// Keep the in-memory store's counters in this file: read at start, written every
    /// --memory-snapshot-interval and at shutdown, so a restart does not hand every client
    /// a fresh quota.
    #[arg(long, env = "MESHLIMIT_MEMORY_SNAPSHOT")]
    memory_snapshot: Option<PathBuf>,
    /// A file holding the secret `DELETE /v1/usage` must send (`Authorization: Bearer
    /// <secret>`), e.g. a Kubernetes Secret's mount; without it, resets are off. Read at
    /// each reset, so a rotated secret applies at once.
    #[arg(long, env = "MESHLIMIT_ADMIN_RESET_TOKEN_FILE")]
    admin_reset_token_file: Option<PathBuf>,
    /// How often the counter snapshot is written besides at shutdown (what a crash can lose);
    /// 0s writes it only at shutdown.
    #[arg(long, env = "MESHLIMIT_MEMORY_SNAPSHOT_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    memory_snapshot_interval: Duration,
    /// The most descriptors one request may carry.
    #[arg(long, env = "MESHLIMIT_MAX_DESCRIPTORS", default_value_t = RequestBounds::default().max_descriptors, value_parser = parse_request_bound)]
    max_descriptors: usize,
    /// The most entries one descriptor may carry.
    #[arg(long, env = "MESHLIMIT_MAX_ENTRIES", default_value_t = RequestBounds::default().max_entries, value_parser = parse_request_bound)]
    max_entries: usize,
    /// The largest request accepted, in bytes. Envoy takes up to 60 KiB of headers by
    /// default, and one header may feed several descriptors: a request refused for its
    /// size is a request a fail-open Envoy lets through unlimited.
    #[arg(long, env = "MESHLIMIT_MAX_REQUEST_BYTES", default_value_t = 256 * 1024, value_parser = parse_request_bound)]
    max_request_bytes: usize,
    /// How often to check the config directory for changes (e.g. 1s, 500ms); 0s checks only
    /// on SIGHUP. A changed directory is validated whole before it replaces the old config.
    #[arg(long, env = "MESHLIMIT_WATCH_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    watch_interval: Duration,
    #[command(flatten)]
    presentation: PresentationArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Fraction of a limit past which hits are counted as `near_limit` in the metrics.
    #[arg(long, env = "NEAR_LIMIT_RATIO", default_value_t = 0.8, value_parser = parse_near_limit_ratio)]
    near_limit_ratio: f64,
    /// Count and report as usual, but answer every request OK: a dry run of a whole config
    /// (envoyproxy/ratelimit: SHADOW_MODE).
    #[arg(long, env = "SHADOW_MODE", default_value_t = false, value_parser = GoBool, action = clap::ArgAction::Set)]
    global_shadow_mode: bool,
    /// Put every descriptor in quota mode: a request is turned away only when all its
    /// descriptors are over their limits (envoyproxy/ratelimit: QUOTA_MODE).
    #[arg(long, env = "QUOTA_MODE", default_value_t = false, value_parser = GoBool, action = clap::ArgAction::Set)]
    global_quota_mode: bool,
    /// A request one descriptor turns away counts on none of its other descriptors
    /// (envoyproxy/ratelimit: STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT). Costs a second store
    /// call for requests with several limited descriptors.
    #[arg(
        long = "stop-counting-when-over-limit",
        env = "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
        default_value_t = false,
        value_parser = GoBool,
        action = clap::ArgAction::Set
    )]
    spare_when_turned_away: bool,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    tracing: TracingArgs,
    #[command(flatten)]
    xds: XdsArgs,
    /// After SIGTERM, how long to keep serving while health checks fail, so load balancers
    /// and Envoy stop sending first (e.g. 5s on Kubernetes).
    #[arg(long, env = "MESHLIMIT_DRAIN_DELAY", default_value = "0s", value_parser = parse_interval)]
    drain_delay: Duration,
    /// How long in-flight requests may take to finish once the listeners stop.
    #[arg(long, env = "MESHLIMIT_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_interval)]
    shutdown_grace: Duration,
    /// Ask a client to reconnect (HTTP/2 GOAWAY) once its connection is this old, give or
    /// take a tenth drawn for each connection, so that replicas added later get a share of
    /// long-lived Envoy connections; 0: never [default: 24h, as envoyproxy/ratelimit, or
    /// GRPC_MAX_CONNECTION_AGE].
    #[arg(long, env = "MESHLIMIT_MAX_CONNECTION_AGE", value_parser = parse_interval)]
    max_connection_age: Option<Duration>,
    /// Close a connection this long after asking it to reconnect if its requests have not
    /// finished; 0: wait for them [default: 1h, as envoyproxy/ratelimit, or
    /// GRPC_MAX_CONNECTION_AGE_GRACE].
    #[arg(long, env = "MESHLIMIT_MAX_CONNECTION_AGE_GRACE", value_parser = parse_interval)]
    max_connection_age_grace: Option<Duration>,
    /// Push the counters to this statsd agent (host:port) under envoyproxy/ratelimit's
    /// statsd names [also USE_STATSD=true with STATSD_HOST and STATSD_PORT].
    #[arg(long, env = "MESHLIMIT_STATSD_ADDR")]
    statsd_addr: Option<String>,
    /// How often to push to statsd [default: 10s, or STATS_FLUSH_INTERVAL].
    #[arg(long, env = "MESHLIMIT_STATSD_INTERVAL", value_parser = parse_interval)]
    statsd_interval: Option<Duration>,
    /// The statsd agent's dialect: plain statsd, or DogStatsD with tags after `|#`
    /// [default: plain, or dogstatsd with USE_DOG_STATSD=true].
    #[arg(long, env = "MESHLIMIT_STATSD_FORMAT", value_enum)]
    statsd_format: Option<StatsdDialect>,
    /// How lines reach the statsd agent: UDP datagrams, or one TCP connection [default: udp;
    /// with USE_STATSD, tcp unless STATSD_PROTOCOL=udp, as envoyproxy/ratelimit sends].
    #[arg(long, env = "MESHLIMIT_STATSD_PROTOCOL", value_enum)]
    statsd_protocol: Option<StatsdProtocol>,
    /// A tag every `ratelimit.*` statsd stat carries, as key:value; repeat it for more
    /// [default: EXTRA_TAGS]. Plain statsd writes it into the name (`.__key=value`).
    #[arg(long = "statsd-tag", env = "MESHLIMIT_STATSD_TAGS", value_delimiter = ',', value_parser = parse_tag)]
    statsd_tags: Vec<(String, String)>,
    /// Log lines as human-readable text or as JSON objects [default: text, or LOG_FORMAT].
    #[arg(long, env = "MESHLIMIT_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

/// Where counters live. envoyproxy/ratelimit's REDIS_TYPE, REDIS_URL, REDIS_AUTH, REDIS_TLS,
/// REDIS_TLS_CACERT, REDIS_TLS_CLIENT_CERT, REDIS_TLS_CLIENT_KEY and CACHE_KEY_PREFIX are read
/// too (see `store::redis::settings`).
#[derive(Args)]
struct StoreArgs {
    /// memory: this process's counters; redis: counters shared by every replica
    /// [default: memory, or redis when envoyproxy/ratelimit's REDIS_URL or BACKEND_TYPE=redis
    /// is set].
    #[arg(long = "store", env = "MESHLIMIT_STORE", value_enum)]
    kind: Option<StoreKind>,
    /// The Redis or Valkey server: redis://[user:password@]host:port[/db], or rediss:// for TLS.
    #[arg(long, env = "MESHLIMIT_REDIS_URL")]
    redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster, comma-separated host:port (or URLs); the rest are discovered.
    #[arg(long, env = "MESHLIMIT_REDIS_CLUSTER_NODES")]
    redis_cluster_nodes: Option<String>,
    /// Redis Sentinel: the master's name, then the sentinels, comma-separated
    /// (mymaster,host:26379,host:26379), as envoyproxy/ratelimit's REDIS_URL with
    /// REDIS_TYPE=sentinel.
    #[arg(long, env = "MESHLIMIT_REDIS_SENTINEL")]
    redis_sentinel: Option<String>,
    /// PEM CA certificates that signed the Redis servers' certificates (rediss://), instead
    /// of the system's roots [also REDIS_TLS_CACERT].
    #[arg(long, env = "MESHLIMIT_REDIS_TLS_CA")]
    redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate for Redis servers that ask for one [also REDIS_TLS_CLIENT_CERT].
    #[arg(long, env = "MESHLIMIT_REDIS_TLS_CERT")]
    redis_tls_cert: Option<PathBuf>,
    /// PEM private key of --redis-tls-cert [also REDIS_TLS_CLIENT_KEY].
    #[arg(long, env = "MESHLIMIT_REDIS_TLS_KEY")]
    redis_tls_key: Option<PathBuf>,
    /// Put before every Redis key [default: meshlimit:, or CACHE_KEY_PREFIX].
    #[arg(long, env = "MESHLIMIT_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// The most a request waits on Redis; keep it well under Envoy's filter timeout
    /// [default: 50ms, or REDIS_TIMEOUT].
    #[arg(long, env = "MESHLIMIT_REDIS_TIMEOUT", value_parser = parse_interval)]
    redis_timeout: Option<Duration>,
    /// The answer when Redis does not answer in time: allow (fail open), deny (fail closed),
    /// or local (in-memory counters, each limit divided by --replicas).
    #[arg(long, env = "MESHLIMIT_REDIS_FAILURE_MODE", value_enum, default_value_t = FailureMode::Allow)]
    redis_failure_mode: FailureMode,
    /// Fail health checks (/healthcheck and gRPC health) while Redis cannot be reached, so
    /// Kubernetes and Envoy send to other replicas; with every replica cut off from Redis
    /// none is healthy [default: false, or REDIS_HEALTH_CHECK_ACTIVE_CONNECTION].
    #[arg(long, env = "MESHLIMIT_HEALTH_REQUIRES_REDIS", value_parser = GoBool, action = clap::ArgAction::Set)]
    health_requires_redis: Option<bool>,
    /// How many meshlimit replicas share the limits: each takes 1/replicas of every limit
    /// while Redis is away in the `local` failure mode.
    #[arg(long, env = "MESHLIMIT_REPLICAS", default_value_t = 1)]
    replicas: u32,
    /// Descriptors Redis answered over the limit are answered locally, without a round trip,
    /// until their reset; this many at most, 0 turning the cache off [default: 100000, or
    /// LOCAL_CACHE_SIZE_IN_BYTES / 512].
    #[arg(long, env = "MESHLIMIT_REDIS_LOCAL_CACHE_ENTRIES")]
    redis_local_cache_entries: Option<u64>,
    /// How often policies with `hybrid: true` send the hits each replica counted to Redis;
    /// the overshoot across replicas grows with it.
    #[arg(long, env = "MESHLIMIT_REDIS_HYBRID_FLUSH", default_value = "5ms", value_parser = parse_interval)]
    redis_hybrid_flush: Duration,
}

/// The config directory when nothing names one: where the container image puts its
/// example config and the Kubernetes manifests mount theirs.
const DEFAULT_CONFIG_DIR: &str = "/etc/meshlimit/config";

/// Long enough for a loaded Redis, short enough that a dead one is answered by the failure
/// mode before Envoy's filter gives up (deploy/envoy/envoy.yaml gives it 100 ms).
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// envoyproxy/ratelimit's (and grpc-go's when set): a day, so replicas added since get
/// their share of Envoy's connections within one, with an hour for requests to finish.
const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    Memory,
    Redis,
}

impl StoreArgs {
    fn choice(self, cache_capacity: u64, compat: &EnvoyproxyEnv) -> Result<StoreChoice, String> {
        let kind = match self.kind {
            Some(kind) => kind,
            None if compat.redis => {
                tracing::info!(
                    "counters in Redis, as envoyproxy/ratelimit keeps them: REDIS_URL or \
                     BACKEND_TYPE=redis is set (--store memory keeps them in this process)"
                );
                StoreKind::Redis
            }
            None => StoreKind::Memory,
        };
        if kind == StoreKind::Memory {
            return Ok(StoreChoice::Memory);
        }
        let redis_timeout = self
            .redis_timeout
            .or(compat.redis_timeout)
            .unwrap_or(DEFAULT_REDIS_TIMEOUT);
        if redis_timeout.is_zero() {
            return Err("--redis-timeout must be above zero, e.g. 50ms".into());
        }
        if self.redis_hybrid_flush.is_zero() {
            return Err("--redis-hybrid-flush must be above zero, e.g. 5ms".into());
        }
        let flags = RedisFlags {
            url: self.redis_url,
            cluster_nodes: self.redis_cluster_nodes,
            sentinel: self.redis_sentinel,
            prefix: self.redis_prefix,
            tls: RedisTls {
                ca: self.redis_tls_ca,
                client_cert: self.redis_tls_cert,
                client_key: self.redis_tls_key,
            },
            local_cache_entries: self.redis_local_cache_entries,
        };
        let resolved = settings::resolve(&flags, |name| std::env::var(name).ok())?;
        let per_second = settings::resolve_per_second(|name| std::env::var(name).ok())?;
        let options = |target, tls, prefix: &str, timeout, per_second| RedisOptions {
            target,
            tls,
            prefix: prefix.to_owned(),
            timeout,
            failure_mode: self.redis_failure_mode,
            replicas: self.replicas.max(1),
            local_capacity: cache_capacity,
            local_cache_entries: resolved.local_cache_entries,
            hybrid_flush: self.redis_hybrid_flush,
            per_second,
        };
        // The per-second Redis shares the prefix, whether from --redis-prefix or not.
        // Its own REDIS_PERSECOND_TIMEOUT, else the main one's.
        let second_timeout = compat.redis_per_second_timeout.unwrap_or(redis_timeout);
        let per_second = per_second.map(|second| {
            let prefix = &resolved.prefix;
            Box::new(options(
                second.target,
                second.tls,
                prefix,
                second_timeout,
                None,
            ))
        });
        Ok(StoreChoice::Redis(Box::new(options(
            resolved.target,
            resolved.tls,
            &resolved.prefix,
            redis_timeout,
            per_second,
        ))))
    }
}

/// Spans of ShouldRateLimit calls, sent to an OpenTelemetry (OTLP) collector. Also on with
/// envoyproxy/ratelimit's TRACING_ENABLED=true; OpenTelemetry's OTEL_EXPORTER_OTLP_* and
/// OTEL_BSP_* variables are read.
#[derive(Args)]
struct TracingArgs {
    /// Send spans to this OTLP collector, e.g. http://otel-collector:4318 (http/protobuf,
    /// /v1/traces is added) or http://otel-collector:4317 with --otlp-protocol grpc
    /// [default: off, or OTEL_EXPORTER_OTLP_ENDPOINT with TRACING_ENABLED=true].
    #[arg(long, env = "MESHLIMIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// grpc or http/protobuf [default: http/protobuf, or OTEL_EXPORTER_OTLP_PROTOCOL, or
    /// TRACING_EXPORTER_PROTOCOL].
    #[arg(long, env = "MESHLIMIT_OTLP_PROTOCOL")]
    otlp_protocol: Option<String>,
    /// The service.name of the spans [default: meshlimit, or OTEL_SERVICE_NAME, or
    /// TRACING_SERVICE_NAME].
    #[arg(long, env = "MESHLIMIT_TRACE_SERVICE_NAME")]
    trace_service_name: Option<String>,
    /// The share of new traces to keep, 0 to 1; a caller's own decision is always followed
    /// [default: 1, or TRACING_SAMPLING_RATE].
    #[arg(long, env = "MESHLIMIT_TRACE_SAMPLING_RATE")]
    trace_sampling_rate: Option<f64>,
}

impl TracingArgs {
    fn options(self) -> Result<Option<meshlimit::trace::TracingOptions>, String> {
        let flags = meshlimit::trace::settings::TracingFlags {
            endpoint: self.otlp_endpoint,
            protocol: self.otlp_protocol,
            service_name: self.trace_service_name,
            sampling_rate: self.trace_sampling_rate,
        };
        let env = |name: &str| std::env::var(name).ok();
        let options = meshlimit::trace::settings::resolve(&flags, env)?;
        if options.is_none()
            && let Some(hint) = meshlimit::trace::settings::off_but_configured(env)
        {
            tracing::info!("{hint}");
        }
        Ok(options)
    }
}

/// The config from an xDS management server instead of files, as Envoy Gateway hands it to
/// envoyproxy/ratelimit (also CONFIG_TYPE=GRPC_XDS_SOTW with its CONFIG_GRPC_XDS_*).
#[derive(Args)]
struct XdsArgs {
    /// Take the config from this xDS server: http://host:port, or https://host:port for TLS
    /// [default: files, or CONFIG_GRPC_XDS_SERVER_URL with CONFIG_TYPE=GRPC_XDS_SOTW].
    #[arg(long, env = "MESHLIMIT_XDS_SERVER", conflicts_with = "config")]
    xds_server: Option<String>,
    /// The node id the server knows this service by [default: default, or
    /// CONFIG_GRPC_XDS_NODE_ID].
    #[arg(long, env = "MESHLIMIT_XDS_NODE_ID")]
    xds_node_id: Option<String>,
    /// PEM CA certificates of an https:// xDS server, instead of the system's [also
    /// CONFIG_GRPC_XDS_SERVER_TLS_CACERT].
    #[arg(long, env = "MESHLIMIT_XDS_CA")]
    xds_ca: Option<PathBuf>,
    /// PEM client certificate for an xDS server that asks for one [also
    /// CONFIG_GRPC_XDS_CLIENT_TLS_CERT].
    #[arg(long, env = "MESHLIMIT_XDS_CLIENT_CERT", requires = "xds_client_key")]
    xds_client_cert: Option<PathBuf>,
    /// PEM private key of --xds-client-cert [also CONFIG_GRPC_XDS_CLIENT_TLS_KEY].
    #[arg(long, env = "MESHLIMIT_XDS_CLIENT_KEY", requires = "xds_client_cert")]
    xds_client_key: Option<PathBuf>,
    /// The name the xDS server's certificate must hold, when not its address's host [also
    /// CONFIG_GRPC_XDS_SERVER_TLS_SAN].
    #[arg(long, env = "MESHLIMIT_XDS_SERVER_NAME")]
    xds_server_name: Option<String>,
    /// The first pause before reconnecting to a lost xDS server; it doubles up to 30s
    /// [default: 3s, or CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL].
    #[arg(long, env = "MESHLIMIT_XDS_RETRY_INTERVAL", value_parser = parse_interval)]
    xds_retry_interval: Option<Duration>,
    /// Warn when a subscription has gone this long without an answer, as a server does that
    /// has no config for this node id [default: 15s].
    #[arg(long, env = "MESHLIMIT_XDS_INITIAL_FETCH_TIMEOUT", value_parser = parse_interval)]
    xds_initial_fetch_timeout: Option<Duration>,
    /// Pass health checks before the first config arrives; requests are still answered
    /// UNAVAILABLE until it does, so Envoy's failure_mode_deny decides them [default:
    /// false, or FORCE_START_WITHOUT_INITIAL_CONFIG unless HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED]
    #[arg(long, env = "MESHLIMIT_XDS_SERVE_BEFORE_CONFIG", value_parser = GoBool, action = clap::ArgAction::Set)]
    xds_serve_before_config: Option<bool>,
}

impl XdsArgs {
    /// The flags over envoyproxy/ratelimit's variables; `None` when neither asks for xDS.
    fn options(self, compat: Option<XdsOptions>) -> Result<Option<XdsOptions>, String> {
        let mut options = match (self.xds_server, compat) {
            (Some(server), Some(compat)) => XdsOptions { server, ..compat },
            (Some(server), None) => XdsOptions::new(server),
            (None, Some(compat)) => compat,
            (None, None) => {
                let set = [
                    ("--xds-node-id", self.xds_node_id.is_some()),
                    ("--xds-ca", self.xds_ca.is_some()),
                    ("--xds-client-cert", self.xds_client_cert.is_some()),
                    ("--xds-server-name", self.xds_server_name.is_some()),
                    ("--xds-retry-interval", self.xds_retry_interval.is_some()),
                    (
                        "--xds-initial-fetch-timeout",
                        self.xds_initial_fetch_timeout.is_some(),
                    ),
                    (
                        "--xds-serve-before-config",
                        self.xds_serve_before_config.is_some(),
                    ),
                ];
                return match set.iter().find(|(_, set)| *set) {
                    Some((flag, _)) => Err(format!(
                        "{flag} needs --xds-server, the xDS server to take the config from"
                    )),
                    None => Ok(None),
                };
            }
        };
        if let Some(id) = self.xds_node_id {
            options.node_id = id;
        }
        if let Some(ca) = self.xds_ca {
            options.ca = Some(ca);
        }
        if let (Some(cert), Some(key)) = (self.xds_client_cert, self.xds_client_key) {
            options.identity = Some(meshlimit::tls::ClientIdentity { cert, key });
        }
        if let Some(name) = self.xds_server_name {
            options.server_name = Some(name);
        }
        if let Some(interval) = self.xds_retry_interval {
            if interval.is_zero() {
                return Err("--xds-retry-interval must be above zero, e.g. 3s".into());
            }
            options.retry_interval = interval;
        }
        if let Some(timeout) = self.xds_initial_fetch_timeout {
            if timeout.is_zero() {
                return Err("--xds-initial-fetch-timeout must be above zero, e.g. 15s".into());
            }
            options.initial_fetch_timeout = timeout;
        }
        if let Some(serve) = self.xds_serve_before_config {
            options.serve_before_config = serve;
        }
        Ok(Some(options))
    }
}

/// TLS on the gRPC port.
#[derive(Args)]
struct TlsArgs {
    /// PEM certificate chain for the gRPC port; with --tls-key, the port speaks TLS only.
    /// Reloaded when the file changes.
    #[arg(long, env = "MESHLIMIT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MESHLIMIT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates; when set, clients must present a certificate they signed (mTLS).
    #[arg(long, env = "MESHLIMIT_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: the client certificate must also hold this name (a DNS name or
    /// IP address among its subject alternative names).
    #[arg(long, env = "MESHLIMIT_TLS_CLIENT_SAN", requires = "tls_client_ca")]
    tls_client_san: Option<String>,
}

impl TlsArgs {
    /// The flags' files, else envoyproxy/ratelimit's GRPC_SERVER_USE_TLS set.
    fn files(self, compat: Option<meshlimit::tls::TlsFiles>) -> Option<meshlimit::tls::TlsFiles> {
        match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(meshlimit::tls::TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
                client_name: self.tls_client_san,
            }),
            _ => compat,
        }
    }
}

/// What responses carry besides status codes.
#[derive(Args)]
struct PresentationArgs {
    /// Header sets added to responses, comma-separated: ietf (RateLimit-Policy and
    /// RateLimit), legacy (X-RateLimit-Limit/Remaining/Reset), retry-after (on 429), none.
    /// A policy's `headers:` overrides this.
    #[arg(long, env = "MESHLIMIT_RESPONSE_HEADERS", default_value = "retry-after", value_parser = parse_header_sets)]
    response_headers: HeaderSet,
    /// envoyproxy/ratelimit's switch: true adds the legacy header set, named by
    /// LIMIT_LIMIT_HEADER, LIMIT_REMAINING_HEADER and LIMIT_RESET_HEADER.
    #[arg(long, env = "LIMIT_RESPONSE_HEADERS_ENABLED", default_value_t = false, value_parser = GoBool, action = clap::ArgAction::Set)]
    limit_response_headers_enabled: bool,
    /// Name of the legacy limit header [default: X-RateLimit-Limit, or RateLimit-Limit with
    /// LIMIT_RESPONSE_HEADERS_ENABLED as envoyproxy/ratelimit names it].
    #[arg(long, env = "LIMIT_LIMIT_HEADER")]
    limit_header: Option<String>,
    /// Name of the legacy remaining header [default: X-RateLimit-Remaining or RateLimit-Remaining].
    #[arg(long, env = "LIMIT_REMAINING_HEADER")]
    remaining_header: Option<String>,
    /// Name of the legacy reset header [default: X-RateLimit-Reset or RateLimit-Reset].
    #[arg(long, env = "LIMIT_RESET_HEADER")]
    reset_header: Option<String>,
    /// The 429 body when the deciding policy sets none: json or none.
    #[arg(long, env = "MESHLIMIT_OVER_LIMIT_BODY", value_enum, default_value_t = OverLimitBody::Json)]
    over_limit_body: OverLimitBody,
    /// The request header that tells the upstream a client passed a soft limit (or, in
    /// `mode: warn`, its limit).
    #[arg(
        long,
        env = "MESHLIMIT_SOFT_LIMIT_HEADER",
        default_value = "x-meshlimit-soft-limit"
    )]
    soft_limit_header: String,
    /// Add the decision to Envoy's dynamic metadata for access logs
    /// (envoyproxy/ratelimit: RESPONSE_DYNAMIC_METADATA).
    #[arg(long, env = "RESPONSE_DYNAMIC_METADATA", default_value_t = false, value_parser = GoBool, action = clap::ArgAction::Set)]
    dynamic_metadata: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum OverLimitBody {
    Json,
    None,
}

fn parse_header_sets(text: &str) -> Result<HeaderSet, String> {
    let mut set = HeaderSet::default();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !set.enable(name) {
            return Err(format!(
                "unknown header set `{name}`; write any of {}",
                HeaderSet::NAMES
            ));
        }
    }
    Ok(set)
}

impl PresentationArgs {
    fn settings(self) -> ResponseSettings {
        let compat = self.limit_response_headers_enabled;
        let default_name = |ours: &str, theirs: &str| {
            if compat {
                theirs.to_owned()
            } else {
                ours.to_owned()
            }
        };
        let mut headers = self.response_headers;
        headers.legacy |= compat;
        ResponseSettings {
            headers,
            legacy_names: LegacyNames {
                limit: self
                    .limit_header
                    .unwrap_or_else(|| default_name("X-RateLimit-Limit", "RateLimit-Limit")),
                remaining: self.remaining_header.unwrap_or_else(|| {
                    default_name("X-RateLimit-Remaining", "RateLimit-Remaining")
                }),
                reset: self
                    .reset_header
                    .unwrap_or_else(|| default_name("X-RateLimit-Reset", "RateLimit-Reset")),
            },
            json_body: matches!(self.over_limit_body, OverLimitBody::Json),
            soft_limit_header: self.soft_limit_header,
            dynamic_metadata: self.dynamic_metadata,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum StatsdDialect {
    Plain,
    Dogstatsd,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatsdProtocol {
    Udp,
    Tcp,
}

/// `key:value` (or `key=value`), both parts needed.
fn parse_tag(text: &str) -> Result<(String, String), String> {
    match meshlimit::envoyproxy_env::key_value(text) {
        Some((key, value)) if !key.is_empty() && !value.is_empty() => Ok((key, value)),
        _ => Err(format!("{text:?}: write key:value, e.g. env:prod")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Started under envoyproxy/ratelimit's binary name (`/bin/ratelimit`, which the image
/// links to meshlimit and Deployments written for it run), meshlimit serves.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if called_as_ratelimit() && args.len() == 1 {
        args.push("serve".into());
    }
    args
}

fn called_as_ratelimit() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|first| std::path::Path::new(&first).file_name() == Some("ratelimit".as_ref()))
}

/// The flag, else DEBUG_HOST/DEBUG_PORT, else — started as `/bin/ratelimit`, by a
/// Deployment written for envoyproxy/ratelimit, whose runbooks reach its debug port with
/// `kubectl port-forward … 6070` — envoyproxy/ratelimit's default, when it is free.
fn debug_listener(
    flag: Option<SocketAddr>,
    env: Option<SocketAddr>,
    called_as_ratelimit: bool,
) -> Option<DebugListener> {
    match flag.or(env) {
        Some(addr) => Some(DebugListener {
            addr,
            required: true,
        }),
        None => called_as_ratelimit.then(|| DebugListener {
            addr: SocketAddr::from(([0, 0, 0, 0], envoyproxy_env::DEFAULT_DEBUG_PORT)),
            required: false,
        }),
    }
}

fn main() -> ExitCode {
    match Cli::parse_from(arguments()).command {
        Command::Serve(args) => serve(*args),
        Command::Validate { dir, counting } => validate(&dir, counting),
        Command::Simulate {
            pattern,
            limit,
            per,
            load,
            duration,
            seed,
            svg,
        } => {
            let scenario = Scenario {
                pattern,
                requests_per_unit: limit,
                window_millis: per.as_millis().max(1) as u64,
                load,
                duration_millis: duration.as_millis().max(1) as u64,
                seed,
            };
            simulate(&scenario, svg.as_deref())
        }
        Command::Explain {
            config,
            domain,
            descriptors,
            at,
            counting,
        } => {
            let now = at.unwrap_or_else(|| meshlimit::clock::SystemClock.now_millis());
            explain(&config, &domain, &descriptors, now, counting)
        }
    }
}

fn simulate(scenario: &Scenario, svg: Option<&std::path::Path>) -> ExitCode {
    let reports = meshlimit::simulate::run(scenario, &Algorithm::ALL);
    print!("{}", meshlimit::simulate::table(scenario, &reports));
    if let Some(path) = svg {
        if let Err(error) = std::fs::write(path, meshlimit::simulate::svg(scenario, &reports)) {
            eprintln!(
                "meshlimit simulate: cannot write {}: {error}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
        println!("plot written to {}", path.display());
    }
    ExitCode::SUCCESS
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" || text.trim() == "0s" {
        return Ok(Duration::ZERO);
    }
    meshlimit::limit::parse_duration(text)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is not a duration; write e.g. 1s, 500ms or 0s"))
}

/// A bound on requests (`--max-descriptors`, `--max-entries`, `--max-request-bytes`): 0
/// would refuse every call, and an Envoy failing open would then let every request
/// through unlimited, failing closed turn every one away.
fn parse_request_bound(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err(
            "0 would refuse every request; write 1 or more, or leave it unset for \
                      the default"
                .to_owned(),
        ),
        Ok(bound) => Ok(bound),
        Err(_) => Err(format!("`{text}` is not a whole number; write 1 or more")),
    }
}

/// `--cache-capacity`: 0 would leave room for no counters at all.
fn parse_cache_capacity(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err(
            "0 leaves no room for counters; write how many to hold, e.g. 1000000 \
                      (about 200 MB)"
                .to_owned(),
        ),
        Ok(capacity) => Ok(capacity),
        Err(_) => Err(format!(
            "`{text}` is not a whole number; write how many counters to hold, e.g. 1000000"
        )),
    }
}

/// `--near-limit-ratio`: a fraction of the limit, as envoyproxy/ratelimit's
/// NEAR_LIMIT_RATIO. Above 1 no hit would ever be near the limit, and at 0 or below every
/// hit would be.
fn parse_near_limit_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if ratio > 0.0 && ratio <= 1.0 => Ok(ratio),
        _ => Err(format!(
            "`{text}` is not a fraction of the limit; write one above 0 and at most 1, e.g. 0.8"
        )),
    }
}

/// An RFC 3339 instant, in milliseconds since the Unix epoch.
fn parse_instant(text: &str) -> Result<u64, String> {
    let at: jiff::Timestamp = text.trim().parse().map_err(|error| {
        format!("`{text}` is not an instant ({error}); write RFC 3339 with an offset, e.g. 2027-01-31T23:30:00Z")
    })?;
    u64::try_from(at.as_millisecond())
        .map_err(|_| format!("`{text}` is before 1970; meshlimit counts from the Unix epoch"))
}

fn explain(
    dir: &std::path::Path,
    domain: &str,
    descriptors: &[String],
    now_millis: u64,
    counting: CountingArgs,
) -> ExitCode {
    let options = counting.load_options();
    let loaded = match config::load_dir(dir, &options) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{} problem(s) in {}; fix them to explain",
                errors.0.len(),
                dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let parsed: Result<Vec<_>, String> = descriptors
        .iter()
        .map(|d| meshlimit::explain::parse_descriptor(d))
        .collect();
    match parsed {
        Ok(parsed) => {
            print!(
                "{}",
                meshlimit::explain::explain(&loaded, domain, &parsed, now_millis)
            );
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("meshlimit explain: {message}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let compat = match envoyproxy_env::read(|name| std::env::var(name).ok()) {
        Ok(compat) => compat,
        Err(message) => {
            eprintln!("meshlimit: {message}");
            return ExitCode::from(2);
        }
    };
    let json_logs = match args.log_format {
        Some(format) => matches!(format, LogFormat::Json),
        None => compat.json_logs.unwrap_or(false),
    };
    let log_filter = match log_filter(std::env::var("MESHLIMIT_LOG").ok(), compat.log_filter) {
        Ok(filter) => filter,
        Err(message) => {
            eprintln!("meshlimit: {message}");
            return ExitCode::from(2);
        }
    };
    init_logging(json_logs, log_filter);
    for line in &compat.ignored {
        tracing::warn!("{line}");
    }
    let xds = match args.xds.options(compat.xds.clone()) {
        Ok(xds) => xds,
        Err(message) => {
            eprintln!("meshlimit: {message}");
            return ExitCode::from(2);
        }
    };
    let config = match (args.config, xds) {
        (None, Some(xds)) => ConfigSource::Xds(Box::new(xds)),
        (Some(dir), Some(_)) => {
            // Only envoyproxy/ratelimit's CONFIG_TYPE can get here: the flags conflict.
            tracing::info!(
                "CONFIG_TYPE=GRPC_XDS_SOTW ignored: --config names the config directory"
            );
            ConfigSource::Dir(dir)
        }
        (dir, None) => {
            // An image-wide default must not beat a deployment's RUNTIME_ROOT, so it is not
            // an environment variable of the image but the last resort here.
            let image_default = PathBuf::from(DEFAULT_CONFIG_DIR);
            let Some(dir) = dir
                .or(compat.config_dir.clone())
                .or_else(|| image_default.is_dir().then_some(image_default))
            else {
                eprintln!(
                    "meshlimit: serve needs --config DIR (or MESHLIMIT_CONFIG), the directory \
                     holding the *.yaml files, or --xds-server URL; envoyproxy/ratelimit's \
                     RUNTIME_ROOT and RUNTIME_SUBDIRECTORY name the directory too \
                     ({DEFAULT_CONFIG_DIR}, the default, does not exist)"
                );
                return ExitCode::from(2);
            };
            ConfigSource::Dir(dir)
        }
    };
    let health_flag = args.store.health_requires_redis;
    let store = match args.store.choice(args.cache_capacity, &compat) {
        Ok(store) => store,
        Err(message) => {
            eprintln!("meshlimit: {message}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &args.admin_reset_token_file
        && let Err(problem) = meshlimit::admin::reset_token(path)
    {
        eprintln!("meshlimit: --admin-reset-token-file: {problem}");
        return ExitCode::from(2);
    }
    let memory_snapshot = match (&store, args.memory_snapshot) {
        (_, None) => None,
        (StoreChoice::Memory, Some(path)) => {
            // A missing directory is a setting to fix now, not a save failing every 10 s.
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => std::path::Path::new("."),
            };
            if !dir.is_dir() {
                eprintln!(
                    "meshlimit: --memory-snapshot {}: the directory {} does not exist; create \
                     it (on Kubernetes, mount a volume there) or pick another path",
                    path.display(),
                    dir.display()
                );
                return ExitCode::from(2);
            }
            Some(SnapshotOptions {
                path,
                interval: args.memory_snapshot_interval,
            })
        }
        (StoreChoice::Redis(_), Some(path)) => {
            eprintln!(
                "meshlimit: --memory-snapshot {}: with --store redis the counters live in \
                 Redis and outlast a restart already; drop the flag, or use --store memory",
                path.display()
            );
            return ExitCode::from(2);
        }
    };
    let tracing = match args.tracing.options() {
        Ok(tracing) => tracing,
        Err(message) => {
            eprintln!("meshlimit: {message}");
            return ExitCode::from(2);
        }
    };
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(MetricsListener {
            addr,
            path: "/metrics".to_owned(),
        }),
        None => compat.metrics.clone(),
    };
    let Some(envoyproxy_names) = envoyproxy_names(&compat) else {
        return ExitCode::from(2);
    };
    // Before the runtime's threads start (src/allocator.rs says why only this store).
    if matches!(store, StoreChoice::Memory) && meshlimit::allocator::purge_freed_memory_at_once() {
        tracing::debug!("mimalloc gives freed memory back at once (memory store)");
    }
    let options = ServeOptions {
        config,
        grpc_addr: args
            .grpc_addr
            .or(compat.grpc_addr)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8081))),
        // A --grpc-addr given on the command line wins over the environment's GRPC_UDS.
        grpc_uds: args
            .grpc_uds
            .or(compat.grpc_uds.filter(|_| args.grpc_addr.is_none())),
        admin_addr: args
            .admin_addr
            .or(compat.admin_addr)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
        metrics_listener,
        debug_listener: debug_listener(args.debug_addr, compat.debug_addr, called_as_ratelimit()),
        envoyproxy_names,
        prometheus_mapper: compat.prometheus_mapper.clone(),
        // Zero, written in either place, turns each off.
        connection_lifetime: meshlimit::connections::Lifetime {
            max_age: args
                .max_connection_age
                .or(compat.max_connection_age)
                .or(Some(DEFAULT_MAX_CONNECTION_AGE))
                .filter(|age| !age.is_zero()),
            grace: args
                .max_connection_age_grace
                .or(compat.max_connection_age_grace)
                .or(Some(DEFAULT_MAX_CONNECTION_AGE_GRACE))
                .filter(|grace| !grace.is_zero()),
        },
        statsd: statsd_options(
            StatsdFlags {
                addr: args.statsd_addr,
                interval: args.statsd_interval,
                format: args.statsd_format,
                protocol: args.statsd_protocol,
                tags: args.statsd_tags,
            },
            compat.statsd,
        ),
        tracing,
        load: args.counting.load_options(),
        cache_capacity: args.cache_capacity,
        memory_snapshot,
        admin_reset_token_file: args.admin_reset_token_file,
        bounds: RequestBounds {
            max_descriptors: args.max_descriptors,
            max_entries: args.max_entries,
            ..RequestBounds::default()
        },
        max_request_bytes: args.max_request_bytes,
        watch_interval: args.watch_interval,
        presentation: args.presentation.settings(),
        near_limit_ratio: args.near_limit_ratio,
        global_modes: GlobalModes {
            shadow: args.global_shadow_mode,
            quota: args.global_quota_mode,
            spare_when_turned_away: args.spare_when_turned_away,
        },
        health_requires_redis: health_requires_redis(
            &store,
            health_flag,
            compat.health_requires_redis,
        ),
        store,
        tls: args.tls.files(compat.tls),
        drain_delay: args.drain_delay,
        shutdown_grace: args.shutdown_grace,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("meshlimit: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::serve(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshlimit: {error}");
            ExitCode::FAILURE
        }
    }
}

fn validate(dir: &std::path::Path, counting: CountingArgs) -> ExitCode {
    let options = counting.load_options();
    match config::load_dir(dir, &options) {
        Ok(loaded) => {
            let domains = loaded.domains();
            if domains.is_empty() {
                println!(
                    "{}: no *.yaml files with a domain; nothing would be limited",
                    dir.display()
                );
            }
            for domain in domains {
                println!(
                    "domain {} ({}): {} rules",
                    domain.name,
                    domain.file,
                    domain.rules().len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            eprintln!("{} problem(s) in {}", errors.0.len(), dir.display());
            ExitCode::FAILURE
        }
    }
}

/// The flag, else envoyproxy/ratelimit's variable; meaningless (and said so) on the memory
/// store, which is always reachable.
fn health_requires_redis(store: &StoreChoice, flag: Option<bool>, compat: Option<bool>) -> bool {
    let asked = flag.or(compat).unwrap_or(false);
    if asked && matches!(store, StoreChoice::Memory) {
        tracing::warn!(
            "--health-requires-redis (REDIS_HEALTH_CHECK_ACTIVE_CONNECTION) ignored: the counters are in memory"
        );
        return false;
    }
    asked
}

/// The statsd flags, each `None` (or empty) when not given.
struct StatsdFlags {
    addr: Option<String>,
    interval: Option<Duration>,
    format: Option<StatsdDialect>,
    protocol: Option<StatsdProtocol>,
    tags: Vec<(String, String)>,
}

/// envoyproxy/ratelimit's statsd settings with the flags laid over them: a flag's address,
/// interval, dialect, transport or tags win; its mogrifiers come only from the environment.
fn statsd_options(flags: StatsdFlags, compat: Option<StatsdOptions>) -> Option<StatsdOptions> {
    let mut options = match (flags.addr, compat) {
        (Some(target), Some(compat)) => StatsdOptions { target, ..compat },
        (Some(target), None) => StatsdOptions::new(target),
        (None, compat) => compat?,
    };
    if let Some(interval) = flags.interval.filter(|i| !i.is_zero()) {
        options.interval = interval;
    }
    if flags.format.is_some() || !flags.tags.is_empty() {
        let format = match flags.format {
            Some(StatsdDialect::Plain) => StatsdFormat::Plain,
            Some(StatsdDialect::Dogstatsd) => StatsdFormat::DogStatsd,
            None => options.dialect.format,
        };
        options.dialect = options.dialect.with(format, flags.tags);
    }
    match flags.protocol {
        Some(StatsdProtocol::Udp) => options.transport = Transport::Udp,
        Some(StatsdProtocol::Tcp) => options.transport = Transport::Tcp,
        None => {}
    }
    Some(options)
}

/// The names of the metrics envoyproxy/ratelimit also has: its built-in ones, or those of
/// the `PROMETHEUS_MAPPER_YAML` file. `None` (said on stderr) when the file is broken.
fn envoyproxy_names(compat: &EnvoyproxyEnv) -> Option<EnvoyproxyNames> {
    let builtin_names = if compat.response_time_in_milliseconds {
        EnvoyproxyNames::BuiltinInMilliseconds
    } else {
        EnvoyproxyNames::Builtin
    };
    let Some(path) = &compat.prometheus_mapper else {
        return Some(builtin_names);
    };
    // Envoy Gateway mounts its mapping from a ConfigMap marked optional: a pod may start
    // before it is there. Not a reason to crash-loop a rate limiter.
    if !path.exists() {
        tracing::warn!(
            "PROMETHEUS_MAPPER_YAML={}: no such file (yet), so the metrics keep their \
             built-in names (envoyproxy/ratelimit's default mapping) until it is there",
            path.display()
        );
        return Some(builtin_names);
    }
    match PrometheusMapping::load(path) {
        Ok(mapping) => {
            mapping.log_warnings();
            Some(EnvoyproxyNames::Mapped(Box::new(mapping)))
        }
        Err(error) => {
            eprintln!("meshlimit: PROMETHEUS_MAPPER_YAML {error}");
            None
        }
    }
}

/// `MESHLIMIT_LOG` (a tracing filter) wins over envoyproxy/ratelimit's `LOG_LEVEL`
/// (`level`), else `info`. A word that is not a level is refused: tracing would read
/// `debugg` as the name of a module to log at every level, and so log nothing else,
/// errors included, with no sign of why.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The filter for one bare level (`LOG_LEVEL=debug`, `MESHLIMIT_LOG=debug`): meshlimit's
/// own lines at that level, the libraries' at `info` at most. At `debug` the HTTP/2 and
/// gRPC libraries log every frame, which buried meshlimit's lines (a hundred calls wrote
/// 700 lines of frames); `MESHLIMIT_LOG=debug,h2=debug` still asks for them.
fn ours_at(level: &str) -> String {
    match level.to_ascii_lowercase().as_str() {
        fine @ ("debug" | "trace") => format!("info,meshlimit={fine}"),
        other => other.to_owned(),
    }
}

fn log_filter(
    env: Option<String>,
    level: Option<&str>,
) -> Result<tracing_subscriber::EnvFilter, String> {
    let Some(text) = env.filter(|text| !text.trim().is_empty()) else {
        return Ok(tracing_subscriber::EnvFilter::new(ours_at(
            level.unwrap_or("info"),
        )));
    };
    if !text.contains([',', '=', '[', '{'])
        && let Some(level) = LEVELS.iter().find(|l| l.eq_ignore_ascii_case(text.trim()))
    {
        return Ok(tracing_subscriber::EnvFilter::new(ours_at(level)));
    }
    let how = "write a level (trace, debug, info, warn, error or off), or target=level \
               pairs separated by commas, e.g. info,meshlimit=debug";
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare_word = !directive.contains(['=', '[', '{']);
        if bare_word && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) {
            return Err(format!(
                "MESHLIMIT_LOG={text}: `{directive}` is not a level; {how} (a module at \
                 every level is `{directive}=trace`)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&text)
        .map_err(|error| format!("MESHLIMIT_LOG={text}: {error}; {how}"))
}

fn init_logging(json: bool, filter: tracing_subscriber::EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads a terminal, never in collected logs.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filter_that_would_silence_everything_is_refused() {
        let filter = |text: &str| log_filter(Some(text.to_owned()), Some("warn"));
        for fine in [
            "debug",
            "INFO",
            "info,meshlimit=debug",
            "meshlimit::admin=trace",
            "off",
        ] {
            assert!(filter(fine).is_ok(), "{fine}");
        }
        for typo in ["debugg", "verbose", "info,verbos"] {
            let message = filter(typo).unwrap_err();
            assert!(
                message.contains(&format!("MESHLIMIT_LOG={typo}"))
                    && message.contains("is not a level"),
                "{message}"
            );
        }
        let message = filter("meshlimit=loud").unwrap_err();
        assert!(
            message.contains("MESHLIMIT_LOG=meshlimit=loud"),
            "{message}"
        );
        // Unset or empty: LOG_LEVEL's level.
        assert_eq!(log_filter(None, Some("warn")).unwrap().to_string(), "warn");
        assert_eq!(
            log_filter(Some(" ".into()), None).unwrap().to_string(),
            "info"
        );
    }

    #[test]
    fn a_bare_debug_level_is_meshlimits_own_and_directives_are_taken_as_written() {
        let filter = |env: Option<&str>, level: Option<&str>| {
            log_filter(env.map(str::to_owned), level)
                .unwrap()
                .to_string()
        };
        // Not every HTTP/2 frame the libraries log at debug.
        assert_eq!(filter(None, Some("debug")), "meshlimit=debug,info");
        assert_eq!(filter(Some("DEBUG"), None), "meshlimit=debug,info");
        assert_eq!(filter(Some("trace"), None), "meshlimit=trace,info");
        assert_eq!(filter(Some("warn"), None), "warn");
        assert_eq!(filter(Some("debug,h2=debug"), None), "h2=debug,debug");
    }

    #[test]
    fn the_debug_port_opens_where_asked_else_as_envoyproxy_ratelimit_would() {
        let flag: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let env: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let at = |listener: Option<DebugListener>| listener.map(|l| (l.addr, l.required));
        assert_eq!(
            at(debug_listener(Some(flag), Some(env), true)),
            Some((flag, true))
        );
        assert_eq!(
            at(debug_listener(None, Some(env), false)),
            Some((env, true))
        );
        assert_eq!(
            at(debug_listener(None, None, true)),
            Some(("0.0.0.0:6070".parse().unwrap(), false))
        );
        assert_eq!(at(debug_listener(None, None, false)), None);
    }
}
