//! The environment an envoyproxy/ratelimit deployment already sets (`RUNTIME_ROOT`,
//! `GRPC_PORT`, `USE_PROMETHEUS`, `BACKEND_TYPE`, `LOG_LEVEL`, …), read so that its
//! manifests — Istio's rate-limit sample among them — run meshlimit with only the image
//! changed.
//!
//! Every variable is either understood, refused with what to write instead (when ignoring
//! it would change decisions or security), or listed as ignored with the reason (when it
//! only tunes what meshlimit does another way). meshlimit's own flags and `MESHLIMIT_*`
//! variables always win; the Redis variables are read by `store::redis::settings`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::statsd::{Dialect, Mogrifier, StatsdFormat, StatsdOptions, Transport};
use crate::tls::{ClientIdentity, TlsFiles};
use crate::xds::XdsOptions;

/// envoyproxy/ratelimit's defaults for the variables below.
const DEFAULT_RUNTIME_ROOT: &str = "/srv/runtime_data/current";
const DEFAULT_APP_DIRECTORY: &str = "config";
const DEFAULT_PROMETHEUS_ADDR: &str = ":9090";
const DEFAULT_METRICS_PATH: &str = "/metrics";
const DEFAULT_ADMIN_PORT: u16 = 8080;
const DEFAULT_GRPC_PORT: u16 = 8081;
pub const DEFAULT_DEBUG_PORT: u16 = 6070;
const DEFAULT_STATSD_HOST: &str = "localhost";
const DEFAULT_STATSD_PORT: u16 = 8125;
const DEFAULT_STATS_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_XDS_SERVER: &str = "localhost:18000";

/// What the environment says, for the settings meshlimit also has flags for. `None` means
/// the environment is silent and meshlimit's own default applies.
#[derive(Debug, Default, PartialEq)]
pub struct EnvoyproxyEnv {
    /// `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY`: where envoyproxy/ratelimit
    /// reads its config files.
    pub config_dir: Option<PathBuf>,
    /// `GRPC_HOST:GRPC_PORT`.
    pub grpc_addr: Option<SocketAddr>,
    /// `GRPC_UDS`: gRPC on this Unix domain socket instead of `GRPC_HOST:GRPC_PORT`.
    pub grpc_uds: Option<PathBuf>,
    /// `HOST:PORT`, envoyproxy/ratelimit's HTTP port (`/healthcheck`, `/json`).
    pub admin_addr: Option<SocketAddr>,
    /// `DEBUG_HOST:DEBUG_PORT`, envoyproxy/ratelimit's debug port (`/rlconfig`, `/stats`).
    pub debug_addr: Option<SocketAddr>,
    /// `USE_PROMETHEUS=true`: a second listener for the metrics, at `PROMETHEUS_ADDR`.
    pub metrics: Option<MetricsListener>,
    /// `PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS=true`: `ratelimit_service_response_time_seconds`
    /// in milliseconds, as envoyproxy/ratelimit exported it before fixing the unit.
    pub response_time_in_milliseconds: bool,
    /// `PROMETHEUS_MAPPER_YAML`: a statsd_exporter mapping file naming the metrics
    /// envoyproxy/ratelimit also has.
    pub prometheus_mapper: Option<PathBuf>,
    /// `LOG_LEVEL`, as a tracing filter.
    pub log_filter: Option<&'static str>,
    /// `LOG_FORMAT=json`.
    pub json_logs: Option<bool>,
    /// `GRPC_SERVER_USE_TLS=true` with its files.
    pub tls: Option<TlsFiles>,
    /// `BACKEND_TYPE=redis`, or a `REDIS_URL`: counters in Redis, as envoyproxy/ratelimit
    /// always keeps them.
    pub redis: bool,
    /// `REDIS_TIMEOUT`.
    pub redis_timeout: Option<Duration>,
    /// `REDIS_PERSECOND_TIMEOUT`: the per-second Redis's own.
    pub redis_per_second_timeout: Option<Duration>,
    /// `REDIS_HEALTH_CHECK_ACTIVE_CONNECTION`: health fails while Redis cannot be reached.
    pub health_requires_redis: Option<bool>,
    /// `GRPC_MAX_CONNECTION_AGE`: how long a client connection lives before it is asked
    /// to go (GOAWAY) and reconnect, so new replicas get their share; zero: never.
    pub max_connection_age: Option<Duration>,
    /// `GRPC_MAX_CONNECTION_AGE_GRACE`: how long a connection asked to go may take to
    /// finish its requests before it is closed; zero: as long as they take.
    pub max_connection_age_grace: Option<Duration>,
    /// `USE_STATSD=true` (or a `STATSD_HOST`/`STATSD_PORT`): counters pushed to statsd at
    /// `STATSD_HOST:STATSD_PORT` every `STATS_FLUSH_INTERVAL`.
    pub statsd: Option<StatsdOptions>,
    /// `CONFIG_TYPE=GRPC_XDS_SOTW`: the config from an xDS management server, as Envoy
    /// Gateway hands it out, with the `CONFIG_GRPC_XDS_*` settings.
    pub xds: Option<XdsOptions>,
    /// Variables that are set, have no effect here, and why; logged once at start.
    pub ignored: Vec<String>,
}

/// Where and at which path the metrics are served besides the admin port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsListener {
    pub addr: SocketAddr,
    pub path: String,
}

/// Reads the environment through `env` (empty values count as unset). An error names the
/// variable and what to write instead.
pub fn read(env: impl Fn(&str) -> Option<String>) -> Result<EnvoyproxyEnv, String> {
    let env = |name: &str| {
        env(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    };
    let flag = |name: &str| -> Result<Option<bool>, String> {
        env(name).map(|value| parse_bool(name, &value)).transpose()
    };
    refuse_what_would_change_decisions(&env, &flag)?;

    let xds = xds(&env, &flag)?;
    let mut read = EnvoyproxyEnv {
        // With xDS, envoyproxy/ratelimit reads no files, whatever RUNTIME_ROOT says.
        config_dir: if xds.is_some() {
            None
        } else {
            runtime_dir(&env)
        },
        xds,
        ..EnvoyproxyEnv::default()
    };
    if env("HOST").is_some() || env("PORT").is_some() {
        read.admin_addr = Some(listen_addr(&env, "HOST", "PORT", DEFAULT_ADMIN_PORT)?);
    }
    if env("DEBUG_HOST").is_some() || env("DEBUG_PORT").is_some() {
        read.debug_addr = Some(listen_addr(
            &env,
            "DEBUG_HOST",
            "DEBUG_PORT",
            DEFAULT_DEBUG_PORT,
        )?);
    }
    if env("GRPC_HOST").is_some() || env("GRPC_PORT").is_some() {
        read.grpc_addr = Some(listen_addr(
            &env,
            "GRPC_HOST",
            "GRPC_PORT",
            DEFAULT_GRPC_PORT,
        )?);
    }
    read.grpc_uds = env("GRPC_UDS")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from);
    if flag("USE_PROMETHEUS")? == Some(true) {
        let addr = env("PROMETHEUS_ADDR").unwrap_or_else(|| DEFAULT_PROMETHEUS_ADDR.to_owned());
        let path = env("PROMETHEUS_PATH").unwrap_or_else(|| DEFAULT_METRICS_PATH.to_owned());
        if !path.starts_with('/') {
            return Err(format!(
                "PROMETHEUS_PATH={path}: write a path starting with /, e.g. /metrics"
            ));
        }
        read.metrics = Some(MetricsListener {
            addr: go_listen_addr("PROMETHEUS_ADDR", &addr)?,
            path,
        });
    }
    read.prometheus_mapper = env("PROMETHEUS_MAPPER_YAML").map(PathBuf::from);
    // As in envoyproxy/ratelimit, a mapping file says the response time's unit itself.
    read.response_time_in_milliseconds = read.prometheus_mapper.is_none()
        && flag("PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS")? == Some(true);
    if let Some(level) = env("LOG_LEVEL") {
        read.log_filter = Some(log_filter(&level)?);
    }
    read.json_logs = match env("LOG_FORMAT").map(|f| f.to_ascii_lowercase()).as_deref() {
        None => None,
        Some("json") => Some(true),
        Some("text") => Some(false),
        Some(other) => return Err(format!("LOG_FORMAT={other}: write text or json")),
    };
    if flag("GRPC_SERVER_USE_TLS")? == Some(true) {
        let file = |name: &str| {
            env(name).map(PathBuf::from).ok_or_else(|| {
                format!(
                    "GRPC_SERVER_USE_TLS=true needs {name}: the PEM file of the gRPC port's \
                     certificate chain (GRPC_SERVER_TLS_CERT) and key (GRPC_SERVER_TLS_KEY)"
                )
            })
        };
        let client_ca = env("GRPC_CLIENT_TLS_CACERT").map(PathBuf::from);
        let client_name = env("GRPC_CLIENT_TLS_SAN");
        if client_name.is_some() && client_ca.is_none() {
            return Err(
                "GRPC_CLIENT_TLS_SAN needs GRPC_CLIENT_TLS_CACERT: a client's name is checked \
                 only on certificates the client CA signed"
                    .to_owned(),
            );
        }
        read.tls = Some(TlsFiles {
            cert: file("GRPC_SERVER_TLS_CERT")?,
            key: file("GRPC_SERVER_TLS_KEY")?,
            client_ca,
            client_name,
        });
    }
    read.redis = match env("BACKEND_TYPE")
        .map(|b| b.to_ascii_lowercase())
        .as_deref()
    {
        Some("redis") => true,
        None => env("REDIS_URL").is_some(),
        Some(other) => {
            return Err(format!(
                "BACKEND_TYPE={other}: meshlimit keeps counters in memory (the default) or in \
                 Redis; unset BACKEND_TYPE, or write redis with REDIS_URL=host:port"
            ));
        }
    };
    // A duration, e.g. `example`; zero only where it means never (`zero_is_never`).
    let duration = |name: &str, example: &str, zero_is_never: bool| {
        env(name)
            .map(|text| {
                go_duration(&text)
                    .filter(|t| zero_is_never || !t.is_zero())
                    .ok_or_else(|| match zero_is_never {
                        true => format!(
                            "{name}={text}: write a duration, e.g. {example}, or 0 for never"
                        ),
                        false => {
                            format!("{name}={text}: write a duration above zero, e.g. {example}")
                        }
                    })
            })
            .transpose()
    };
    read.redis_timeout = duration("REDIS_TIMEOUT", "50ms or 1s", false)?;
    read.redis_per_second_timeout = duration("REDIS_PERSECOND_TIMEOUT", "50ms or 1s", false)?;
    read.health_requires_redis = flag("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION")?;
    // Zero turns them off, as grpc-go reads zero: never.
    read.max_connection_age = duration("GRPC_MAX_CONNECTION_AGE", "24h or 5m", true)?;
    read.max_connection_age_grace = duration("GRPC_MAX_CONNECTION_AGE_GRACE", "1h or 30s", true)?;
    read.statsd = statsd(&env, &flag)?;
    read.ignored = ignored(&env, &flag)?;
    Ok(read)
}

/// Settings whose silent absence would change what gets limited or who may connect.
fn refuse_what_would_change_decisions(
    env: &impl Fn(&str) -> Option<String>,
    flag: &impl Fn(&str) -> Result<Option<bool>, String>,
) -> Result<(), String> {
    if let Some(kind) = env("CONFIG_TYPE")
        && !kind.eq_ignore_ascii_case("file")
        && !kind.eq_ignore_ascii_case("grpc_xds_sotw")
    {
        return Err(format!(
            "CONFIG_TYPE={kind}: meshlimit reads its config from YAML files (FILE) or an xDS \
             server (GRPC_XDS_SOTW, with CONFIG_GRPC_XDS_SERVER_URL)"
        ));
    }
    if flag("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION")? == Some(true) {
        return Err(
            "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION=true: meshlimit always checks that the Redis \
             certificate names the server; put a name the certificate holds in REDIS_URL, \
             or sign one for the name you use"
                .to_owned(),
        );
    }
    Ok(())
}

/// `CONFIG_TYPE=GRPC_XDS_SOTW` and its settings; `None` for files.
fn xds(
    env: &impl Fn(&str) -> Option<String>,
    flag: &impl Fn(&str) -> Result<Option<bool>, String>,
) -> Result<Option<XdsOptions>, String> {
    if !env("CONFIG_TYPE").is_some_and(|kind| kind.eq_ignore_ascii_case("grpc_xds_sotw")) {
        return Ok(None);
    }
    let tls = flag("CONFIG_GRPC_XDS_SERVER_USE_TLS")? == Some(true);
    let address =
        env("CONFIG_GRPC_XDS_SERVER_URL").unwrap_or_else(|| DEFAULT_XDS_SERVER.to_owned());
    // envoyproxy/ratelimit dials host:port with grpc-go, which also takes a resolver's
    // `dns:///host:port`; a URL written with its http(s) scheme is taken as is.
    let address = address
        .strip_prefix("dns:///")
        .map(str::to_owned)
        .unwrap_or(address);
    let server = if address.contains("://") {
        address
    } else {
        format!("{}://{address}", if tls { "https" } else { "http" })
    };
    let mut options = XdsOptions::new(server);
    if let Some(id) = env("CONFIG_GRPC_XDS_NODE_ID") {
        options.node_id = id;
    }
    if let Some(text) = env("CONFIG_GRPC_XDS_NODE_METADATA") {
        options.node_metadata = pairs("CONFIG_GRPC_XDS_NODE_METADATA", &text)?;
    }
    if let Some(text) = env("CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS") {
        options.headers = pairs("CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS", &text)?;
    }
    if tls {
        options.ca = env("CONFIG_GRPC_XDS_SERVER_TLS_CACERT").map(PathBuf::from);
        options.server_name = env("CONFIG_GRPC_XDS_SERVER_TLS_SAN");
        options.identity = match (
            env("CONFIG_GRPC_XDS_CLIENT_TLS_CERT"),
            env("CONFIG_GRPC_XDS_CLIENT_TLS_KEY"),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert: cert.into(),
                key: key.into(),
            }),
            _ => {
                return Err(
                    "CONFIG_GRPC_XDS_CLIENT_TLS_CERT and CONFIG_GRPC_XDS_CLIENT_TLS_KEY go \
                     together: set both (the client certificate for the xDS server) or neither"
                        .to_owned(),
                );
            }
        };
    }
    if let Some(text) = env("CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL") {
        options.retry_interval = go_duration(&text).filter(|d| !d.is_zero()).ok_or_else(|| {
            format!("CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL={text}: write a duration above zero, e.g. 3s")
        })?;
    }
    if let Some(text) = env("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES") {
        options.max_message_bytes = text.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            format!(
                "XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES={text}: write a number of bytes, e.g. 16777216"
            )
        })?;
    }
    // Healthy before the first config, as envoyproxy/ratelimit is with a forced start,
    // unless its health is also told to wait for one.
    options.serve_before_config = flag("FORCE_START_WITHOUT_INITIAL_CONFIG")? == Some(true)
        && flag("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED")? != Some(true);
    Ok(Some(options))
}

/// `key1:value1,key2:value2` (`=` is taken too), as envoyproxy/ratelimit's map settings.
fn pairs(name: &str, text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            key_value(pair)
                .ok_or_else(|| format!("{name}: {pair:?} has no value; write key:value,key:value"))
        })
        .collect()
}

/// One `key:value` (or `key=value`), trimmed; `None` without a separator.
pub fn key_value(pair: &str) -> Option<(String, String)> {
    let (key, value) = pair.split_once(':').or_else(|| pair.split_once('='))?;
    Some((key.trim().to_owned(), value.trim().to_owned()))
}

/// envoyproxy/ratelimit sends statsd unless `USE_STATSD=false`; meshlimit, whose metrics
/// are on `/metrics` anyway, only when asked: `USE_STATSD=true`, `USE_DOG_STATSD=true`, or a
/// statsd address set.
fn statsd(
    env: &impl Fn(&str) -> Option<String>,
    flag: &impl Fn(&str) -> Result<Option<bool>, String>,
) -> Result<Option<StatsdOptions>, String> {
    let dog = flag("USE_DOG_STATSD")? == Some(true);
    let plain = flag("USE_STATSD")?;
    if dog && plain == Some(true) {
        // envoyproxy/ratelimit refuses both at once too.
        return Err(
            "USE_DOG_STATSD=true and USE_STATSD=true: one statsd agent is sent to, \
                    in one dialect; set USE_STATSD=false to send DogStatsD"
                .to_owned(),
        );
    }
    let asked =
        dog || plain.unwrap_or(env("STATSD_HOST").is_some() || env("STATSD_PORT").is_some());
    if !asked || flag("DISABLE_STATS")? == Some(true) {
        return Ok(None);
    }
    let host = env("STATSD_HOST").unwrap_or_else(|| DEFAULT_STATSD_HOST.to_owned());
    let port = match env("STATSD_PORT") {
        None => DEFAULT_STATSD_PORT,
        Some(port) => port
            .parse()
            .map_err(|_| format!("STATSD_PORT={port}: write a port number, e.g. 8125"))?,
    };
    let interval = match env("STATS_FLUSH_INTERVAL") {
        None => DEFAULT_STATS_FLUSH_INTERVAL,
        Some(text) => go_duration(&text).filter(|d| !d.is_zero()).ok_or_else(|| {
            format!("STATS_FLUSH_INTERVAL={text}: write a duration above zero, e.g. 10s")
        })?,
    };
    // An IPv6 literal needs brackets before its port.
    let target = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let tags = match env("EXTRA_TAGS") {
        Some(text) => pairs("EXTRA_TAGS", &text)?,
        None => Vec::new(),
    };
    let (format, mogrifiers) = if dog {
        (StatsdFormat::DogStatsd, mogrifiers(env)?)
    } else {
        (StatsdFormat::Plain, Vec::new())
    };
    // envoyproxy/ratelimit's stats library sends plain statsd over TCP unless its
    // STATSD_PROTOCOL says udp; its DogStatsD client speaks UDP, as Datadog's agent does.
    let transport = match env("STATSD_PROTOCOL")
        .as_deref()
        .map(str::to_ascii_lowercase)
    {
        None if dog => Transport::Udp,
        None => Transport::Tcp,
        Some(p) if p == "tcp" => Transport::Tcp,
        Some(p) if p == "udp" => Transport::Udp,
        Some(other) => return Err(format!("STATSD_PROTOCOL={other}: write tcp or udp")),
    };
    Ok(Some(StatsdOptions {
        target,
        interval,
        dialect: Dialect::new(format, tags, mogrifiers),
        transport,
    }))
}

/// `USE_DOG_STATSD_MOGRIFIERS=A,B` with `DOG_STATSD_MOGRIFIER_A_PATTERN`, `_NAME` and
/// `_TAGS` for each, in the order named (the first match wins).
fn mogrifiers(env: &impl Fn(&str) -> Option<String>) -> Result<Vec<Mogrifier>, String> {
    let Some(labels) = env("USE_DOG_STATSD_MOGRIFIERS") else {
        return Ok(Vec::new());
    };
    let labels = labels.split(',').map(str::trim).filter(|l| !l.is_empty());
    labels
        .map(|label| {
            let var = |part: &str| format!("DOG_STATSD_MOGRIFIER_{label}_{part}");
            let tags = match env(&var("TAGS")) {
                Some(text) => pairs(&var("TAGS"), &text)?,
                None => Vec::new(),
            };
            let pattern = env(&var("PATTERN")).unwrap_or_default();
            let name = env(&var("NAME")).unwrap_or_default();
            Mogrifier::new(label, &pattern, &name, tags).map_err(|error| {
                format!(
                    "{error} (set by {}, {} and {})",
                    var("PATTERN"),
                    var("NAME"),
                    var("TAGS")
                )
            })
        })
        .collect()
}

/// Variables that are set and do nothing here, each with why.
fn ignored(
    env: &impl Fn(&str) -> Option<String>,
    flag: &impl Fn(&str) -> Result<Option<bool>, String>,
) -> Result<Vec<String>, String> {
    let mut ignored = Vec::new();
    let mut note = |names: &[&str], why: &str| {
        let set: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| env(name).is_some())
            .collect();
        if !set.is_empty() {
            ignored.push(format!("{} ignored: {why}", set.join(", ")));
        }
    };
    note(
        &[
            "REDIS_POOL_SIZE",
            "REDIS_PIPELINE_WINDOW",
            "REDIS_PIPELINE_LIMIT",
            "REDIS_CLUSTER_PIPELINE_PARALLELISM",
            "REDIS_PERSECOND_CLUSTER_PIPELINE_PARALLELISM",
            "REDIS_POOL_ON_EMPTY_BEHAVIOR",
            "REDIS_USE_EXPLICIT_PIPELINE",
            "REDIS_PERSECOND_POOL_SIZE",
            "REDIS_PERSECOND_PIPELINE_WINDOW",
            "REDIS_PERSECOND_PIPELINE_LIMIT",
            "REDIS_PERSECOND_USE_EXPLICIT_PIPELINE",
            "REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR",
        ],
        "meshlimit keeps one multiplexed connection per Redis node and sends each request's \
         counters in one script call",
    );
    note(
        &[
            "REDIS_STARTUP_INITIAL_INTERVAL",
            "REDIS_STARTUP_MAX_INTERVAL",
            "REDIS_STARTUP_MAX_ELAPSED_TIME",
        ],
        "meshlimit starts without waiting for Redis: until Redis answers, requests are \
         answered by --redis-failure-mode, and Redis is used from its first answer on",
    );
    note(
        &["HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED"],
        "with a config directory health always needs the loaded config (with xDS it holds \
         FORCE_START_WITHOUT_INITIAL_CONFIG's health checks back until the first config)",
    );
    note(
        &["EXPIRATION_JITTER_MAX_SECONDS"],
        "meshlimit's Redis keys expire with their window",
    );
    note(
        &[
            "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL",
            "XDS_CLIENT_BACKOFF_MAX_INTERVAL",
            "XDS_CLIENT_BACKOFF_RANDOM_FACTOR",
            "XDS_CLIENT_BACKOFF_JITTER",
        ],
        "a lost xDS stream is retried after CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL \
         (3s), doubling up to 30s, each pause give or take a quarter",
    );
    if env("PROMETHEUS_MAPPER_YAML").is_some() {
        note(
            &["PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS"],
            "PROMETHEUS_MAPPER_YAML names the response time, and its `scale` sets the unit",
        );
    }
    if flag("USE_DOG_STATSD")? != Some(true) {
        note(
            &["USE_DOG_STATSD_MOGRIFIERS"],
            "mogrifiers rewrite DogStatsD lines, sent with USE_DOG_STATSD=true",
        );
    }
    Ok(ignored)
}

/// envoyproxy/ratelimit reads `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY`;
/// used only when one of the first two is set, so a missing `--config` still says so.
fn runtime_dir(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let root = env("RUNTIME_ROOT");
    let subdirectory = env("RUNTIME_SUBDIRECTORY");
    if root.is_none() && subdirectory.is_none() {
        return None;
    }
    let mut dir = PathBuf::from(root.unwrap_or_else(|| DEFAULT_RUNTIME_ROOT.to_owned()));
    if let Some(subdirectory) = subdirectory {
        dir.push(subdirectory);
    }
    dir.push(env("RUNTIME_APPDIRECTORY").unwrap_or_else(|| DEFAULT_APP_DIRECTORY.to_owned()));
    Some(dir)
}

fn listen_addr(
    env: &impl Fn(&str) -> Option<String>,
    host_name: &str,
    port_name: &str,
    default_port: u16,
) -> Result<SocketAddr, String> {
    let port = match env(port_name) {
        None => default_port,
        Some(port) => port
            .parse()
            .map_err(|_| format!("{port_name}={port}: write a port number, e.g. {default_port}"))?,
    };
    let host = match env(host_name) {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(host) => match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => ip,
            Err(_) => resolve_listen_host(host_name, &host, port)?,
        },
    };
    Ok(SocketAddr::new(host, port))
}

/// A host name to listen on, as Go's listener takes it in envoyproxy/ratelimit
/// (`HOST=localhost`): its first IPv4 address, else its first.
fn resolve_listen_host(host_name: &str, host: &str, port: u16) -> Result<IpAddr, String> {
    let cannot = |why: String| {
        format!(
            "{host_name}={host}: {why}; write an IP address or a name to listen on, e.g. 0.0.0.0"
        )
    };
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|error| cannot(format!("cannot be resolved ({error})")))?
        .collect();
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .map(SocketAddr::ip)
        .ok_or_else(|| cannot("resolves to no address".to_owned()))
}

/// Go's listen address: `:9090` means every interface.
fn go_listen_addr(name: &str, text: &str) -> Result<SocketAddr, String> {
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_owned(),
    };
    full.parse()
        .map_err(|_| format!("{name}={text}: write :port or ip:port, e.g. :9090 or 127.0.0.1:9090"))
}

/// logrus's level names, as tracing filters.
fn log_filter(level: &str) -> Result<&'static str, String> {
    match level.to_ascii_lowercase().as_str() {
        "trace" => Ok("trace"),
        "debug" => Ok("debug"),
        "info" => Ok("info"),
        "warn" | "warning" => Ok("warn"),
        "error" | "fatal" | "panic" => Ok("error"),
        _ => Err(format!(
            "LOG_LEVEL={level}: write trace, debug, info, warn or error"
        )),
    }
}

/// Go's `strconv.ParseBool`, which envoyproxy/ratelimit's settings go through.
pub(crate) fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{name}={value}: write true or false")),
    }
}

/// The value parser of meshlimit's on/off flags. Several of them are also
/// envoyproxy/ratelimit's variables (`SHADOW_MODE`, `QUOTA_MODE`, …), which it reads with
/// Go's `strconv.ParseBool`: a Deployment with `SHADOW_MODE=1` must start here too, where
/// clap's own parser takes only true and false. An invalid value's error names the
/// variable as well as the flag, since clap would name only the flag, which an operator
/// who set the variable never wrote.
#[derive(Clone, Copy, Debug)]
pub struct GoBool;

impl clap::builder::TypedValueParser for GoBool {
    type Value = bool;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<bool, clap::Error> {
        let text = value.to_string_lossy();
        let long = arg.and_then(clap::Arg::get_long);
        let env = arg.and_then(clap::Arg::get_env);
        parse_bool("", text.trim()).map_err(|_| {
            // clap does not say whether the value came from the flag or the variable.
            let given = match (env, long) {
                (Some(env), Some(long)) => {
                    format!("{}={text} (or --{long} {text})", env.to_string_lossy())
                }
                (Some(env), None) => format!("{}={text}", env.to_string_lossy()),
                (None, Some(long)) => format!("--{long} {text}"),
                (None, None) => format!("`{text}`"),
            };
            let message = format!(
                "{given}: write true or false (or, as envoyproxy/ratelimit reads it, 1, t, T, \
                 TRUE, True, 0, f, F, FALSE or False)\n"
            );
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, message).with_cmd(cmd)
        })
    }
}

/// Go's `time.ParseDuration` for the units a timeout uses: a sequence of decimal numbers,
/// each with a unit (`h`, `m`, `s`, `ms`, `us`, `µs`, `ns`), e.g. `1m30s` or `0.5s`.
pub(crate) fn go_duration(text: &str) -> Option<Duration> {
    match text {
        "" => return None,
        "0" => return Some(Duration::ZERO),
        _ => {}
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|end| *end > 0)?;
        let (number, after) = rest.split_at(number_end);
        let number: f64 = number.parse().ok()?;
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * seconds;
        rest = after;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_of(vars: &[(&str, &str)]) -> Result<EnvoyproxyEnv, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        read(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn an_empty_environment_leaves_every_default_to_meshlimit() {
        assert_eq!(read_of(&[]).unwrap(), EnvoyproxyEnv::default());
    }

    /// The variables of Istio's rate-limit sample (samples/ratelimit/rate-limit-service.yaml).
    #[test]
    fn istios_sample_environment_is_understood() {
        let read = read_of(&[
            ("LOG_LEVEL", "debug"),
            ("REDIS_SOCKET_TYPE", "tcp"),
            ("REDIS_URL", "redis:6379"),
            ("USE_STATSD", "false"),
            ("RUNTIME_ROOT", "/data"),
            ("RUNTIME_SUBDIRECTORY", "ratelimit"),
            ("RUNTIME_WATCH_ROOT", "false"),
            ("RUNTIME_IGNOREDOTFILES", "true"),
        ])
        .unwrap();
        assert_eq!(
            read.config_dir,
            Some(PathBuf::from("/data/ratelimit/config"))
        );
        assert_eq!(read.log_filter, Some("debug"));
        assert!(read.redis, "a REDIS_URL means counters in Redis");
        assert!(read.ignored.is_empty(), "{:?}", read.ignored);
    }

    #[test]
    fn runtime_directories_follow_envoyproxys_defaults() {
        let dir = |vars: &[(&str, &str)]| read_of(vars).unwrap().config_dir;
        assert_eq!(
            dir(&[("RUNTIME_SUBDIRECTORY", "ratelimit")]),
            Some(PathBuf::from("/srv/runtime_data/current/ratelimit/config"))
        );
        assert_eq!(
            dir(&[("RUNTIME_ROOT", "/d"), ("RUNTIME_APPDIRECTORY", "limits")]),
            Some(PathBuf::from("/d/limits"))
        );
        assert_eq!(dir(&[("RUNTIME_APPDIRECTORY", "limits")]), None);
    }

    #[test]
    fn ports_and_hosts_give_listen_addresses() {
        let read = read_of(&[
            ("PORT", "9080"),
            ("GRPC_HOST", "127.0.0.1"),
            ("GRPC_PORT", "9081"),
        ])
        .unwrap();
        assert_eq!(read.admin_addr, Some("0.0.0.0:9080".parse().unwrap()));
        assert_eq!(read.grpc_addr, Some("127.0.0.1:9081".parse().unwrap()));
        assert_eq!(read.grpc_uds, None);
        let uds = read_of(&[("GRPC_UDS", "/run/rl/grpc.sock")]).unwrap();
        assert_eq!(uds.grpc_uds, Some(PathBuf::from("/run/rl/grpc.sock")));
        assert_eq!(read.debug_addr, None);
        let debug = read_of(&[("DEBUG_HOST", "127.0.0.1")]).unwrap();
        assert_eq!(debug.debug_addr, Some("127.0.0.1:6070".parse().unwrap()));
        let v6 = read_of(&[("HOST", "::1")]).unwrap();
        assert_eq!(v6.admin_addr, Some("[::1]:8080".parse().unwrap()));
        let bad = read_of(&[("GRPC_PORT", "tcp://10.0.0.7:8081")]).unwrap_err();
        assert!(bad.contains("GRPC_PORT=tcp://10.0.0.7:8081") && bad.contains("port number"));
        // A name, as Go's listener takes it: its address (from /etc/hosts here).
        let named = read_of(&[("HOST", "localhost")]).unwrap();
        let addr = named.admin_addr.expect("an admin address");
        assert!(addr.ip().is_loopback() && addr.port() == 8080, "{addr}");
    }

    #[test]
    fn on_off_flags_take_gos_spellings_and_name_the_variable_when_wrong() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[arg(long, env = "MESHLIMIT_TEST_GO_BOOL", default_value_t = false, value_parser = GoBool, action = clap::ArgAction::Set)]
            shadow: bool,
        }
        let parse = |value: &str| Flags::try_parse_from(["x", "--shadow", value]);
        for yes in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(parse(yes).unwrap().shadow, "{yes}");
        }
        for no in ["0", "f", "F", "FALSE", "false", "False"] {
            assert!(!parse(no).unwrap().shadow, "{no}");
        }
        let wrong = parse("yes").err().unwrap().to_string();
        assert!(
            wrong.contains("MESHLIMIT_TEST_GO_BOOL=yes (or --shadow yes): write true or false"),
            "{wrong}"
        );
    }

    #[test]
    fn prometheus_gets_a_listener_of_its_own_only_when_asked() {
        assert_eq!(
            read_of(&[("PROMETHEUS_ADDR", ":9"),]).unwrap().metrics,
            None
        );
        let read = read_of(&[("USE_PROMETHEUS", "true")]).unwrap();
        assert_eq!(
            read.metrics,
            Some(MetricsListener {
                addr: "0.0.0.0:9090".parse().unwrap(),
                path: "/metrics".into()
            })
        );
        let read = read_of(&[
            ("USE_PROMETHEUS", "1"),
            ("PROMETHEUS_ADDR", "127.0.0.1:9102"),
            ("PROMETHEUS_PATH", "/stats/prometheus"),
        ])
        .unwrap();
        let metrics = read.metrics.unwrap();
        assert_eq!(metrics.addr, "127.0.0.1:9102".parse().unwrap());
        assert_eq!(metrics.path, "/stats/prometheus");
        assert!(
            read_of(&[("USE_PROMETHEUS", "yes")])
                .unwrap_err()
                .contains("USE_PROMETHEUS=yes: write true or false")
        );
        assert!(!read.response_time_in_milliseconds);
        let legacy = read_of(&[("PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS", "true")]).unwrap();
        assert!(legacy.response_time_in_milliseconds);
        assert_eq!(legacy.prometheus_mapper, None);
        // A mapping file names the response time: the old unit is not applied over it.
        let mapped = read_of(&[
            ("PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS", "true"),
            ("PROMETHEUS_MAPPER_YAML", "/etc/ratelimit/mapper.yaml"),
        ])
        .unwrap();
        assert_eq!(
            mapped.prometheus_mapper.as_deref(),
            Some(std::path::Path::new("/etc/ratelimit/mapper.yaml"))
        );
        assert!(!mapped.response_time_in_milliseconds);
        assert!(
            mapped.ignored.iter().any(|line| line.starts_with(
                "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS ignored: PROMETHEUS_MAPPER_YAML"
            )),
            "{:?}",
            mapped.ignored
        );
    }

    #[test]
    fn tls_needs_both_files_and_takes_the_client_ca() {
        let read = read_of(&[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_CERT", "/tls/tls.crt"),
            ("GRPC_SERVER_TLS_KEY", "/tls/tls.key"),
            ("GRPC_CLIENT_TLS_CACERT", "/tls/ca.crt"),
            ("GRPC_CLIENT_TLS_SAN", "envoy.mesh"),
        ])
        .unwrap();
        let tls = read.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/tls/tls.crt"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/tls/ca.crt")));
        assert_eq!(tls.client_name.as_deref(), Some("envoy.mesh"));
        let no_ca = read_of(&[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_CERT", "/c"),
            ("GRPC_SERVER_TLS_KEY", "/k"),
            ("GRPC_CLIENT_TLS_SAN", "envoy.mesh"),
        ])
        .unwrap_err();
        assert!(no_ca.contains("needs GRPC_CLIENT_TLS_CACERT"), "{no_ca}");
        let missing = read_of(&[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_CERT", "/tls/tls.crt"),
        ])
        .unwrap_err();
        assert!(missing.contains("needs GRPC_SERVER_TLS_KEY"), "{missing}");
        // Files without the switch are off, as in envoyproxy/ratelimit.
        assert!(
            read_of(&[("GRPC_SERVER_TLS_CERT", "/c")])
                .unwrap()
                .tls
                .is_none()
        );
    }

    #[test]
    fn the_backend_is_redis_when_envoyproxy_would_use_it() {
        assert!(read_of(&[("BACKEND_TYPE", "redis")]).unwrap().redis);
        assert!(!read_of(&[("REDIS_AUTH", "x")]).unwrap().redis);
        let memcache = read_of(&[("BACKEND_TYPE", "memcache")]).unwrap_err();
        assert!(memcache.contains("BACKEND_TYPE=memcache"), "{memcache}");
    }

    #[test]
    fn logging_and_timeouts_parse_as_envoyproxy_writes_them() {
        let read = read_of(&[
            ("LOG_LEVEL", "WARN"),
            ("LOG_FORMAT", "json"),
            ("REDIS_TIMEOUT", "1m30s"),
            ("REDIS_PERSECOND_TIMEOUT", "20ms"),
            ("GRPC_MAX_CONNECTION_AGE", "5m"),
            ("GRPC_MAX_CONNECTION_AGE_GRACE", "30s"),
        ])
        .unwrap();
        assert_eq!(read.max_connection_age, Some(Duration::from_secs(300)));
        assert_eq!(read.max_connection_age_grace, Some(Duration::from_secs(30)));
        let never = read_of(&[("GRPC_MAX_CONNECTION_AGE", "0")]).unwrap();
        assert_eq!(never.max_connection_age, Some(Duration::ZERO));
        assert!(
            read_of(&[("GRPC_MAX_CONNECTION_AGE", "soon")])
                .unwrap_err()
                .contains("GRPC_MAX_CONNECTION_AGE=soon: write a duration")
        );
        assert_eq!(read.log_filter, Some("warn"));
        assert_eq!(read.json_logs, Some(true));
        assert_eq!(read.redis_timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            read.redis_per_second_timeout,
            Some(Duration::from_millis(20))
        );
        assert_eq!(go_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["10", "s", "1x", "1.2.3s", ""] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
        assert!(read_of(&[("REDIS_TIMEOUT", "0s")]).is_err());
        assert!(
            read_of(&[("LOG_LEVEL", "loud")])
                .unwrap_err()
                .contains("LOG_LEVEL=loud")
        );
    }

    #[test]
    fn settings_that_would_change_decisions_are_refused_with_what_to_do() {
        for (vars, expected) in [
            (&[("CONFIG_TYPE", "GRPC_XDS_DELTA")][..], "GRPC_XDS_SOTW"),
            (
                &[
                    ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
                    ("CONFIG_GRPC_XDS_SERVER_USE_TLS", "true"),
                    ("CONFIG_GRPC_XDS_CLIENT_TLS_CERT", "/certs/tls.crt"),
                ][..],
                "set both",
            ),
            (
                &[
                    ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
                    ("CONFIG_GRPC_XDS_NODE_METADATA", "team"),
                ][..],
                "key:value",
            ),
            (
                &[("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", "true")][..],
                "names the server",
            ),
        ] {
            let error = read_of(vars).unwrap_err();
            assert!(error.contains(expected), "{vars:?}: {error}");
        }
        // Their off values are what meshlimit does anyway.
        for vars in [
            &[("CONFIG_TYPE", "FILE")][..],
            &[("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", "false")][..],
        ] {
            assert!(read_of(vars).is_ok(), "{vars:?}");
        }
    }

    #[test]
    fn envoy_gateways_xds_settings_are_read() {
        // As Envoy Gateway's rate limit Deployment sets them.
        let read = read_of(&[
            ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
            (
                "CONFIG_GRPC_XDS_SERVER_URL",
                "envoy-gateway.envoy-gateway-system.svc.cluster.local:18001",
            ),
            ("CONFIG_GRPC_XDS_NODE_ID", "envoy-gateway"),
            ("CONFIG_GRPC_XDS_SERVER_USE_TLS", "true"),
            ("CONFIG_GRPC_XDS_CLIENT_TLS_CERT", "/certs/tls.crt"),
            ("CONFIG_GRPC_XDS_CLIENT_TLS_KEY", "/certs/tls.key"),
            ("CONFIG_GRPC_XDS_SERVER_TLS_CACERT", "/certs/ca.crt"),
            ("FORCE_START_WITHOUT_INITIAL_CONFIG", "true"),
            ("RUNTIME_ROOT", "/data"),
            ("RUNTIME_SUBDIRECTORY", "ratelimit"),
            ("CONFIG_GRPC_XDS_NODE_METADATA", "zone:eu-1,team=edge"),
            ("CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL", "500ms"),
        ])
        .unwrap();
        assert_eq!(read.config_dir, None, "no files are read under xDS");
        let xds = read.xds.expect("xDS is on");
        assert_eq!(
            xds.server,
            "https://envoy-gateway.envoy-gateway-system.svc.cluster.local:18001"
        );
        assert_eq!(xds.node_id, "envoy-gateway");
        assert_eq!(xds.ca, Some("/certs/ca.crt".into()));
        assert_eq!(
            xds.identity,
            Some(ClientIdentity {
                cert: "/certs/tls.crt".into(),
                key: "/certs/tls.key".into()
            })
        );
        assert!(xds.serve_before_config);
        assert_eq!(xds.retry_interval, Duration::from_millis(500));
        assert_eq!(
            xds.node_metadata,
            vec![
                ("zone".to_owned(), "eu-1".to_owned()),
                ("team".to_owned(), "edge".to_owned())
            ]
        );

        let resolver = read_of(&[
            ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
            ("CONFIG_GRPC_XDS_SERVER_URL", "dns:///xds.example:18000"),
        ])
        .unwrap();
        assert_eq!(resolver.xds.unwrap().server, "http://xds.example:18000");

        let plain = read_of(&[("CONFIG_TYPE", "grpc_xds_sotw")]).unwrap();
        let xds = plain.xds.expect("xDS is on");
        assert_eq!(xds.server, "http://localhost:18000");
        assert_eq!(xds.node_id, "default");
        assert!(!xds.serve_before_config);
        assert!(read_of(&[("CONFIG_TYPE", "FILE")]).unwrap().xds.is_none());

        // A forced start whose health must still wait for a config is no different from
        // an unforced one here: both answer UNAVAILABLE until it comes.
        let waits = read_of(&[
            ("CONFIG_TYPE", "GRPC_XDS_SOTW"),
            ("FORCE_START_WITHOUT_INITIAL_CONFIG", "true"),
            ("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "true"),
        ])
        .unwrap();
        assert!(!waits.xds.expect("xDS is on").serve_before_config);
    }

    #[test]
    fn tuning_without_an_equivalent_is_listed_as_ignored() {
        let read = read_of(&[
            ("REDIS_POOL_SIZE", "20"),
            ("REDIS_PIPELINE_WINDOW", "150us"),
            ("USE_DOG_STATSD_MOGRIFIERS", "HITS"),
            ("EXPIRATION_JITTER_MAX_SECONDS", "300"),
            ("REDIS_STARTUP_MAX_ELAPSED_TIME", "1m"),
        ])
        .unwrap();
        assert_eq!(read.ignored.len(), 4, "{:?}", read.ignored);
        assert!(read.ignored[0].starts_with("REDIS_POOL_SIZE, REDIS_PIPELINE_WINDOW ignored"));
        assert!(
            read.ignored
                .iter()
                .any(|line| line.starts_with("USE_DOG_STATSD_MOGRIFIERS ignored"))
        );
        assert!(read.ignored.iter().any(|line| line.starts_with(
            "REDIS_STARTUP_MAX_ELAPSED_TIME ignored: meshlimit starts without waiting for Redis"
        )));
        assert!(
            read_of(&[("USE_STATSD", "false")])
                .unwrap()
                .ignored
                .is_empty()
        );
    }

    #[test]
    fn statsd_is_sent_when_asked_for_to_envoyproxys_defaults() {
        assert_eq!(read_of(&[]).unwrap().statsd, None);
        assert_eq!(read_of(&[("USE_STATSD", "false")]).unwrap().statsd, None);
        // Over TCP, as envoyproxy/ratelimit's stats library sends plain statsd.
        assert_eq!(
            read_of(&[("USE_STATSD", "true")]).unwrap().statsd,
            Some(StatsdOptions {
                transport: Transport::Tcp,
                ..StatsdOptions::new("localhost:8125".into())
            })
        );
        // An address alone asks for it; USE_STATSD=false or DISABLE_STATS still win.
        let read = read_of(&[
            ("STATSD_HOST", "::1"),
            ("STATSD_PORT", "9125"),
            ("STATS_FLUSH_INTERVAL", "500ms"),
            ("STATSD_PROTOCOL", "UDP"),
        ])
        .unwrap();
        assert_eq!(
            read.statsd,
            Some(StatsdOptions {
                target: "[::1]:9125".into(),
                interval: Duration::from_millis(500),
                dialect: Dialect::default(),
                transport: Transport::Udp,
            })
        );
        for off in [("USE_STATSD", "false"), ("DISABLE_STATS", "true")] {
            assert_eq!(
                read_of(&[("STATSD_HOST", "agent"), off]).unwrap().statsd,
                None,
                "{off:?}"
            );
        }
        assert!(
            read_of(&[("USE_STATSD", "1"), ("STATSD_PORT", "x")])
                .unwrap_err()
                .contains("STATSD_PORT=x")
        );
        let protocol = read_of(&[("USE_STATSD", "1"), ("STATSD_PROTOCOL", "sctp")]).unwrap_err();
        assert!(
            protocol.contains("STATSD_PROTOCOL=sctp: write tcp or udp"),
            "{protocol}"
        );
    }

    #[test]
    fn dogstatsd_with_extra_tags_and_mogrifiers_reads_as_envoyproxy_writes_it() {
        let hits = "ratelimit.service.rate_limit.edge.user.over_limit";
        let read = read_of(&[
            ("USE_STATSD", "false"),
            ("USE_DOG_STATSD", "true"),
            ("EXTRA_TAGS", "env:prod,zone:eu-1"),
            ("USE_DOG_STATSD_MOGRIFIERS", "HITS"),
            (
                "DOG_STATSD_MOGRIFIER_HITS_PATTERN",
                r"^ratelimit\.service\.rate_limit\.([^.]+)\.(.+)\.([^.]+)$",
            ),
            (
                "DOG_STATSD_MOGRIFIER_HITS_NAME",
                "ratelimit.service.rate_limit.$3",
            ),
            ("DOG_STATSD_MOGRIFIER_HITS_TAGS", "domain:$1,descriptor:$2"),
        ])
        .unwrap();
        assert!(read.ignored.is_empty(), "{:?}", read.ignored);
        let statsd = read.statsd.expect("USE_DOG_STATSD=true sends");
        assert_eq!(statsd.target, "localhost:8125");
        assert_eq!(
            statsd.transport,
            Transport::Udp,
            "Datadog's agent listens on UDP"
        );
        assert_eq!(
            statsd.dialect.line(hits, crate::statsd::Value::Count(1)),
            "ratelimit.service.rate_limit.over_limit:1|c|#env:prod,zone:eu-1,domain:edge,descriptor:user"
        );

        // Plain statsd keeps EXTRA_TAGS in the name, as envoyproxy/ratelimit's TCP sink.
        let plain = read_of(&[("USE_STATSD", "true"), ("EXTRA_TAGS", "env:prod")]).unwrap();
        let line = plain
            .statsd
            .unwrap()
            .dialect
            .line(hits, crate::statsd::Value::Count(1));
        assert_eq!(line, format!("{hits}.__env=prod:1|c"));
    }

    #[test]
    fn dogstatsd_settings_that_cannot_work_are_refused_by_name() {
        let both = read_of(&[("USE_DOG_STATSD", "true"), ("USE_STATSD", "true")]).unwrap_err();
        assert!(both.contains("set USE_STATSD=false"), "{both}");
        let dog = [
            ("USE_DOG_STATSD", "true"),
            ("USE_DOG_STATSD_MOGRIFIERS", "HITS"),
        ];
        let unset = read_of(&dog).unwrap_err();
        assert!(unset.contains("mogrifier HITS has no pattern"), "{unset}");
        assert!(
            unset.contains("DOG_STATSD_MOGRIFIER_HITS_PATTERN"),
            "{unset}"
        );
        let mut bad = dog.to_vec();
        bad.push(("DOG_STATSD_MOGRIFIER_HITS_PATTERN", "(unclosed"));
        bad.push(("DOG_STATSD_MOGRIFIER_HITS_NAME", "n"));
        let bad = read_of(&bad).unwrap_err();
        assert!(bad.contains("the pattern does not compile"), "{bad}");
        let tags = read_of(&[("USE_STATSD", "true"), ("EXTRA_TAGS", "env")]).unwrap_err();
        assert!(tags.contains("EXTRA_TAGS"), "{tags}");
    }

    #[test]
    fn health_may_be_asked_to_follow_redis() {
        assert_eq!(read_of(&[]).unwrap().health_requires_redis, None);
        let asked = read_of(&[("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "true")]).unwrap();
        assert_eq!(asked.health_requires_redis, Some(true));
        let wrong = read_of(&[("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "yes please")]);
        assert!(
            wrong
                .unwrap_err()
                .contains("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION")
        );
    }
}
