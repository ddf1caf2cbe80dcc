//! The Redis store's settings: meshlimit's flags plus the environment variables
//! envoyproxy/ratelimit users already set (`REDIS_TYPE`, `REDIS_URL`, `REDIS_AUTH`,
//! `REDIS_TLS`, `REDIS_TLS_CACERT`, `CACHE_KEY_PREFIX`, …), each understood or refused with
//! what to use.

use std::path::PathBuf;
use std::time::Duration;

use crate::limit::Limit;

/// What a request gets when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FailureMode {
    /// Fail open: every check is within its limit.
    #[default]
    Allow,
    /// Fail closed: every check is over its limit.
    Deny,
    /// Keep limiting with this replica's own in-memory counters, each limit divided by
    /// `--replicas`.
    Local,
}

/// Where the counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a proxy in front of several): `redis://` or `rediss://` URL, or
    /// `redis+unix:///path` for its Unix domain socket.
    Standalone(String),
    /// Seed nodes of a Redis Cluster, as URLs; the rest are discovered.
    Cluster(Vec<String>),
    /// A master found through Redis Sentinel, and found again after a failover.
    Sentinel(SentinelTarget),
}

/// envoyproxy/ratelimit's `REDIS_TYPE=sentinel` target: the name the sentinels monitor the
/// master under, and the sentinels to ask for its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// The name in the sentinels' `sentinel monitor <name> …` line.
    pub master_name: String,
    /// The sentinels, as URLs (their own credentials and TLS).
    pub sentinels: Vec<String>,
    /// How the master is reached once a sentinel has named it.
    pub master: MasterUrl,
}

/// The master's URL without its address: scheme, credentials and database, which the
/// sentinels do not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterUrl {
    /// `redis://` or `rediss://`, with `user:password@` when given.
    pub head: String,
    /// `/<db>`, or empty.
    pub path: String,
}

impl MasterUrl {
    /// The master's full URL at `host:port`.
    pub fn at(&self, host: &str, port: u16) -> String {
        format!("{}{host}:{port}{}", self.head, self.path)
    }

    pub fn is_tls(&self) -> bool {
        self.head.starts_with("rediss://")
    }
}

/// PEM files for TLS to Redis (`rediss://`): the CA that signed the server's certificate,
/// and a client certificate for servers that ask for one (`tls-auth-clients yes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// Trust only these CAs instead of the system's roots.
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RedisTls {
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client_cert.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub target: RedisTarget,
    /// CA and client certificate for `rediss://` targets.
    pub tls: RedisTls,
    /// Put before every key; see `keys`.
    pub prefix: String,
    /// The most one request waits on Redis.
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    /// How many replicas share the limits: the `local` failure mode's divisor.
    pub replicas: u32,
    /// Capacity of the `local` failure mode's in-memory counters.
    pub local_capacity: u64,
    /// Descriptors the local over-limit cache holds (`over_cache`); 0 turns it off.
    pub local_cache_entries: u64,
    /// How often `hybrid: true` counters send their hits to Redis.
    pub hybrid_flush: Duration,
    /// envoyproxy/ratelimit's `REDIS_PERSECOND`: descriptors whose limits are all per second
    /// are counted in this second Redis (`store::split`); its own `per_second` is unused.
    pub per_second: Option<Box<RedisOptions>>,
}

/// `--redis-hybrid-flush` when not given.
pub const DEFAULT_HYBRID_FLUSH: Duration = Duration::from_millis(5);

/// `--redis-local-cache-entries` when not given.
pub const DEFAULT_LOCAL_CACHE_ENTRIES: u64 = 100_000;

/// What one entry of the local over-limit cache takes, resident: 522–540 B measured for
/// 50 000 and 200 000 entries of one-descriptor requests (RSS before and after filling an
/// `OverCache`, release build). envoyproxy/ratelimit's LOCAL_CACHE_SIZE_IN_BYTES is turned
/// into entries with it, so the cache takes about the memory that was set aside.
const LOCAL_CACHE_ENTRY_BYTES: u64 = 512;

/// envoyproxy/ratelimit's `LOCAL_CACHE_SIZE_IN_BYTES` as entries. Its default, 0, turns
/// its cache off; meshlimit's stays on at its default, as decisions are the same either
/// way (`over_cache`) and it spares Redis the rejected requests.
fn local_cache_entries_in(size: &str) -> Result<u64, String> {
    let bytes: u64 = size.trim().parse().map_err(|_| {
        format!("LOCAL_CACHE_SIZE_IN_BYTES={size}: write a number of bytes, e.g. 1048576")
    })?;
    if bytes == 0 {
        return Ok(DEFAULT_LOCAL_CACHE_ENTRIES);
    }
    let entries = (bytes / LOCAL_CACHE_ENTRY_BYTES).max(1);
    tracing::info!(
        bytes,
        entries,
        "LOCAL_CACHE_SIZE_IN_BYTES: the local over-limit cache holds {entries} descriptors (about \
         {LOCAL_CACHE_ENTRY_BYTES} B each; --redis-local-cache-entries sets it directly)"
    );
    Ok(entries)
}

/// The Redis flags as given (flag or `MESHLIMIT_*` variable), before envoyproxy/ratelimit's
/// variables fill the gaps.
#[derive(Debug, Clone, Default)]
pub struct RedisFlags {
    pub url: Option<String>,
    pub cluster_nodes: Option<String>,
    /// `master-name,host:port,host:port`: the master's name, then the sentinels.
    pub sentinel: Option<String>,
    pub prefix: Option<String>,
    pub tls: RedisTls,
    /// `--redis-local-cache-entries`.
    pub local_cache_entries: Option<u64>,
}

/// What the flags and the environment resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub target: RedisTarget,
    pub prefix: String,
    pub tls: RedisTls,
    /// The flag's, else LOCAL_CACHE_SIZE_IN_BYTES as entries, else the default.
    pub local_cache_entries: u64,
}

/// The variables envoyproxy/ratelimit reads again with `REDIS_PERSECOND_` for the
/// per-second Redis; the TLS files, the prefix and the rest are shared.
const PER_SECOND_VARIABLES: &[&str] = &[
    "REDIS_TYPE",
    "REDIS_URL",
    "REDIS_AUTH",
    "REDIS_TLS",
    "REDIS_SENTINEL_AUTH",
    "REDIS_SOCKET_TYPE",
];

/// envoyproxy/ratelimit's `REDIS_PERSECOND=true`: where per-second limits are counted,
/// read from `REDIS_PERSECOND_TYPE`, `REDIS_PERSECOND_URL`, `REDIS_PERSECOND_AUTH`,
/// `REDIS_PERSECOND_TLS` and `REDIS_PERSECOND_SENTINEL_AUTH`. `None` when it is not set.
pub fn resolve_per_second(
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Resolved>, String> {
    let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
    match env("REDIS_PERSECOND").as_deref().map(str::trim) {
        None | Some("false" | "0" | "f" | "F" | "FALSE" | "False") => return Ok(None),
        Some("true" | "1" | "t" | "T" | "TRUE" | "True") => {}
        Some(other) => return Err(format!("REDIS_PERSECOND={other}: write true or false")),
    }
    if env("REDIS_PERSECOND_URL").is_none() {
        return Err(
            "REDIS_PERSECOND=true needs REDIS_PERSECOND_URL, the per-second Redis's host:port"
                .to_owned(),
        );
    }
    let renamed = |name: &str| {
        if PER_SECOND_VARIABLES.contains(&name) {
            env(&name.replacen("REDIS_", "REDIS_PERSECOND_", 1))
        } else {
            env(name)
        }
    };
    resolve(&RedisFlags::default(), renamed)
        .map(Some)
        .map_err(|error| format!("the per-second Redis (REDIS_PERSECOND_*): {error}"))
}

/// The prefix when neither `--redis-prefix` nor `CACHE_KEY_PREFIX` is set.
pub const DEFAULT_PREFIX: &str = "meshlimit:";

/// Resolves the target and prefix from `flags` and the environment (`env` looks a variable
/// up; empty values count as unset).
pub fn resolve(
    flags: &RedisFlags,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Resolved, String> {
    let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
    let local_cache_entries = match (flags.local_cache_entries, env("LOCAL_CACHE_SIZE_IN_BYTES")) {
        (Some(entries), _) => entries,
        (None, Some(size)) => local_cache_entries_in(&size)?,
        (None, None) => DEFAULT_LOCAL_CACHE_ENTRIES,
    };
    let tls = match env("REDIS_TLS")
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("false" | "0" | "no") => false,
        Some("true" | "1" | "yes") => true,
        Some(other) => {
            return Err(format!("REDIS_TLS={other}: write true or false"));
        }
    };
    let auth = env("REDIS_AUTH");
    // The sentinels' own password, apart from the master's (envoyproxy/ratelimit's meaning).
    let sentinel_auth = env("REDIS_SENTINEL_AUTH");
    let redis_type = env("REDIS_TYPE").map(|t| t.to_ascii_lowercase());
    let redis_type = match redis_type.as_deref() {
        None | Some("single") => RedisType::Single,
        Some("cluster") => RedisType::Cluster,
        Some("sentinel") => RedisType::Sentinel,
        Some(other) => {
            return Err(format!(
                "REDIS_TYPE={other}: write single, cluster or sentinel (or use --redis-url, \
                 --redis-cluster-nodes or --redis-sentinel)"
            ));
        }
    };

    let given = [
        flags.url.as_ref().map(|_| "--redis-url"),
        flags
            .cluster_nodes
            .as_ref()
            .map(|_| "--redis-cluster-nodes"),
        flags.sentinel.as_ref().map(|_| "--redis-sentinel"),
    ];
    let given: Vec<&str> = given.into_iter().flatten().collect();
    if given.len() > 1 {
        return Err(format!(
            "{} are all set (as flags or MESHLIMIT_REDIS_* variables); keep one",
            given.join(" and ")
        ));
    }
    let target = if let Some(nodes) = &flags.cluster_nodes {
        RedisTarget::Cluster(urls(nodes, tls, auth.as_deref())?)
    } else if let Some(list) = &flags.sentinel {
        RedisTarget::Sentinel(sentinel_of(
            list,
            tls,
            auth.as_deref(),
            sentinel_auth.as_deref(),
        )?)
    } else if let Some(url) = &flags.url {
        RedisTarget::Standalone(url_of(url, tls, auth.as_deref())?)
    } else if let Some(url) = env("REDIS_URL") {
        check_socket_type(env("REDIS_SOCKET_TYPE").as_deref(), &url, redis_type)?;
        // envoyproxy/ratelimit's REDIS_URL: `host:port`, or a socket's path; comma-separated
        // nodes for a cluster; the master's name, then the sentinels, for sentinel.
        match redis_type {
            RedisType::Single => RedisTarget::Standalone(url_of(&url, tls, auth.as_deref())?),
            RedisType::Cluster => RedisTarget::Cluster(urls(&url, tls, auth.as_deref())?),
            RedisType::Sentinel => RedisTarget::Sentinel(sentinel_of(
                &url,
                tls,
                auth.as_deref(),
                sentinel_auth.as_deref(),
            )?),
        }
    } else {
        return Err(
            "--store redis needs --redis-url redis://host:port (or MESHLIMIT_REDIS_URL / REDIS_URL), \
             --redis-cluster-nodes host:port,host:port for a Redis Cluster, or --redis-sentinel \
             mymaster,host:26379,host:26379 for Redis Sentinel"
                .to_owned(),
        );
    };
    let tls_files = RedisTls {
        ca: flags
            .tls
            .ca
            .clone()
            .or_else(|| env("REDIS_TLS_CACERT").map(PathBuf::from)),
        client_cert: flags
            .tls
            .client_cert
            .clone()
            .or_else(|| env("REDIS_TLS_CLIENT_CERT").map(PathBuf::from)),
        client_key: flags
            .tls
            .client_key
            .clone()
            .or_else(|| env("REDIS_TLS_CLIENT_KEY").map(PathBuf::from)),
    };
    if tls_files.client_cert.is_some() != tls_files.client_key.is_some() {
        return Err(
            "a client certificate for Redis needs both --redis-tls-cert and --redis-tls-key \
             (REDIS_TLS_CLIENT_CERT and REDIS_TLS_CLIENT_KEY)"
                .to_owned(),
        );
    }
    if tls_files.is_set() && !uses_tls(&target) {
        return Err(
            "--redis-tls-ca / --redis-tls-cert (REDIS_TLS_CACERT / REDIS_TLS_CLIENT_CERT) are set \
             but Redis is reached without TLS; write rediss:// URLs or set REDIS_TLS=true"
                .to_owned(),
        );
    }
    let prefix = flags
        .prefix
        .clone()
        .or_else(|| env("CACHE_KEY_PREFIX"))
        .unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    Ok(Resolved {
        target,
        prefix,
        tls: tls_files,
        local_cache_entries,
    })
}

/// envoyproxy/ratelimit's REDIS_TYPE.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RedisType {
    Single,
    Cluster,
    Sentinel,
}

fn uses_tls(target: &RedisTarget) -> bool {
    let tls = |url: &String| url.starts_with("rediss://");
    match target {
        RedisTarget::Standalone(url) => tls(url),
        RedisTarget::Cluster(urls) => urls.iter().any(tls),
        RedisTarget::Sentinel(sentinel) => {
            sentinel.master.is_tls() || sentinel.sentinels.iter().any(tls)
        }
    }
}

/// envoyproxy/ratelimit's sentinel list: `master-name,host:port,host:port…`, the name the
/// sentinels monitor first. The name may be written as a URL, `rediss://user:password@name/db`,
/// to give the master's scheme, credentials and database; otherwise `REDIS_TLS` and
/// `REDIS_AUTH` apply to the master. Sentinels are `host:port` (plain TCP, or TLS with
/// `REDIS_TLS`, without credentials, as sentinels usually run) or URLs of their own.
fn sentinel_of(
    list: &str,
    tls: bool,
    auth: Option<&str>,
    sentinel_auth: Option<&str>,
) -> Result<SentinelTarget, String> {
    const FORMAT: &str =
        "write the master's name, then the sentinels: mymaster,host:26379,host:26379";
    let mut items = list
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty());
    let Some(first) = items.next() else {
        return Err(format!("the Redis Sentinel list is empty; {FORMAT}"));
    };
    let (name, master) = match first.split_once("://") {
        Some((scheme, rest)) => {
            if scheme != "redis" && scheme != "rediss" {
                return Err(format!(
                    "`{}`: the master is reached with redis:// or rediss:// (TLS)",
                    redact(first)
                ));
            }
            let (userinfo, rest) = match rest.rsplit_once('@') {
                Some((userinfo, rest)) => (format!("{userinfo}@"), rest),
                None => (String::new(), rest),
            };
            let (name, path) = match rest.split_once('/') {
                Some((name, db)) => (name, format!("/{db}")),
                None => (rest, String::new()),
            };
            let head = format!("{scheme}://{userinfo}");
            (name, MasterUrl { head, path })
        }
        None => (
            first,
            MasterUrl {
                head: head_of(tls, auth),
                path: String::new(),
            },
        ),
    };
    if name.is_empty() || name.contains([':', ' ']) {
        return Err(format!(
            "`{}` is not a master name: {FORMAT} (REDIS_TYPE=sentinel's REDIS_URL has the same format)",
            redact(first)
        ));
    }
    let sentinels: Vec<String> = items
        .map(|item| url_of(item, tls, sentinel_auth))
        .collect::<Result<_, _>>()?;
    if sentinels.is_empty() {
        return Err(format!(
            "no sentinel after the master name `{name}`; {FORMAT}"
        ));
    }
    Ok(SentinelTarget {
        master_name: name.to_owned(),
        sentinels,
        master,
    })
}

/// envoyproxy/ratelimit's `REDIS_SOCKET_TYPE` (`tcp` or `unix`) must say what `REDIS_URL`
/// is, as there it decides how the URL is dialled: a path for `unix`, a `host:port` for
/// `tcp`. Only a single server is reached over a socket.
fn check_socket_type(
    socket_type: Option<&str>,
    url: &str,
    redis_type: RedisType,
) -> Result<(), String> {
    let name = "REDIS_SOCKET_TYPE";
    let is_path = is_socket_path(url);
    match socket_type
        .map(|t| t.trim().to_ascii_lowercase())
        .as_deref()
    {
        None => Ok(()),
        Some("unix") if redis_type != RedisType::Single => Err(format!(
            "{name}=unix: a Redis Cluster's or Sentinel's nodes are reached over TCP; write \
             {name}=tcp and their host:port"
        )),
        Some("unix") if !is_path => Err(format!(
            "{name}=unix: REDIS_URL={url} is not a socket's path; write the path Redis's \
             `unixsocket` names, e.g. /var/run/redis/redis.sock"
        )),
        Some("tcp") if is_path => Err(format!(
            "{name}=tcp: REDIS_URL={url} is a path; write {name}=unix to reach Redis on that \
             socket, or host:port"
        )),
        Some("tcp" | "unix") => Ok(()),
        Some(other) => Err(format!("{name}={other}: write tcp or unix")),
    }
}

/// A Unix domain socket's path, rather than `host:port` or a URL.
fn is_socket_path(text: &str) -> bool {
    text.trim().starts_with('/')
}

/// A Unix domain socket, as a path or a `unix://`-style URL.
fn is_socket(text: &str) -> bool {
    is_socket_path(text) || is_unix_url(text)
}

fn urls(list: &str, tls: bool, auth: Option<&str>) -> Result<Vec<String>, String> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(|node| {
            if is_socket(node) {
                return Err(format!(
                    "`{node}`: a Redis Cluster's nodes are reached over TCP; write host:port"
                ));
            }
            url_of(node, tls, auth)
        })
        .collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err("no Redis Cluster seed nodes given; write host:port,host:port".into());
    }
    Ok(urls)
}

/// A full URL from `redis://…`, `rediss://…`, `redis+unix://…`, envoyproxy/ratelimit's
/// bare `host:port` or a socket's path, with `REDIS_AUTH` (`password` or `user:password`)
/// and `REDIS_TLS` applied to bare ones.
fn url_of(text: &str, tls: bool, auth: Option<&str>) -> Result<String, String> {
    let text = text.trim();
    let unix = is_socket(text);
    if unix && tls {
        return Err(format!(
            "`{}`: TLS is not spoken on a Unix socket; set REDIS_TLS=false (the socket's \
             permissions decide who reaches it) or reach Redis at host:port",
            redact(text)
        ));
    }
    if unix && !text.contains("://") {
        return Ok(unix_url(text, auth));
    }
    if text.contains("://") {
        if !(unix || text.starts_with("redis://") || text.starts_with("rediss://")) {
            return Err(format!(
                "`{}`: only redis://, rediss:// (TLS) and redis+unix:// (a socket) URLs are \
                 supported",
                redact(text)
            ));
        }
        return Ok(text.to_owned());
    }
    Ok(format!("{}{text}", head_of(tls, auth)))
}

/// `unix://` and `redis+unix://` (redis-rs's names for a socket; `valkey+unix://` too).
fn is_unix_url(text: &str) -> bool {
    ["unix://", "redis+unix://", "valkey+unix://"]
        .iter()
        .any(|scheme| text.trim().starts_with(scheme))
}

/// `redis+unix:///path`, with `REDIS_AUTH`'s credentials as the `user` and `pass` query
/// parameters, where redis-rs reads them for a socket.
fn unix_url(path: &str, auth: Option<&str>) -> String {
    let mut url = format!("redis+unix://{}", escape_path(path));
    let credentials = match auth.map(|auth| auth.split_once(':').unwrap_or(("", auth))) {
        Some(("", password)) => vec![("pass", password)],
        Some((user, password)) => vec![("user", user), ("pass", password)],
        None => Vec::new(),
    };
    for (i, (name, value)) in credentials.into_iter().enumerate() {
        let separator = if i == 0 { '?' } else { '&' };
        url.push_str(&format!("{separator}{name}={}", escape(value)));
    }
    url
}

/// Percent-escapes what a URL's path cannot hold as such (`?`, `#`, `%`, spaces, …).
fn escape_path(path: &str) -> String {
    path.split('/').map(escape).collect::<Vec<_>>().join("/")
}

/// `redis://` or `rediss://`, with `REDIS_AUTH`'s credentials (`password` or
/// `user:password`) escaped into the userinfo.
fn head_of(tls: bool, auth: Option<&str>) -> String {
    let scheme = if tls { "rediss" } else { "redis" };
    let credentials = match auth {
        Some(auth) => match auth.split_once(':') {
            Some((user, password)) => format!("{}:{}@", escape(user), escape(password)),
            None => format!(":{}@", escape(auth)),
        },
        None => String::new(),
    };
    format!("{scheme}://{credentials}")
}

/// Percent-escapes the characters that would end the userinfo part of a URL.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // A socket's password rides in the query (`?pass=…`).
    if let Some((path, query)) = rest.split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some(("pass", _)) => "pass=***".to_owned(),
                _ => pair.to_owned(),
            })
            .collect();
        return format!("{scheme}://{path}?{}", query.join("&"));
    }
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(user, _)| user);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// The share of `limit` one of `replicas` enforces on its own while Redis is away:
/// `requests_per_unit` and `burst` divided by the replica count, rounded up so that a
/// limit smaller than the replica count still admits one request per replica.
pub fn replica_share(limit: &Limit, replicas: u32) -> Limit {
    let replicas = replicas.max(1);
    let share = |n: u32| if n == 0 { 0 } else { n.div_ceil(replicas) };
    Limit {
        requests_per_unit: share(limit.requests_per_unit),
        burst: limit.burst.map(share),
        ..*limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Algorithm, Unit};

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn envoyproxy_variables_are_understood() {
        let resolved = resolve(
            &RedisFlags::default(),
            env_of(&[
                ("REDIS_URL", "redis-1:6379"),
                ("REDIS_AUTH", "s3cr/t"),
                ("REDIS_TLS", "true"),
                ("CACHE_KEY_PREFIX", "rl_"),
            ]),
        )
        .unwrap();
        assert_eq!(
            resolved.target,
            RedisTarget::Standalone("rediss://:s3cr%2Ft@redis-1:6379".into())
        );
        assert_eq!(resolved.prefix, "rl_");
        let cluster = resolve(
            &RedisFlags::default(),
            env_of(&[("REDIS_TYPE", "cluster"), ("REDIS_URL", "a:7000, b:7001")]),
        )
        .unwrap();
        assert_eq!(
            cluster.target,
            RedisTarget::Cluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(cluster.prefix, DEFAULT_PREFIX);
    }

    #[test]
    fn flags_win_over_envoyproxy_variables() {
        let flags = RedisFlags {
            url: Some("redis://flag:1".into()),
            prefix: Some("p:".into()),
            ..Default::default()
        };
        let resolved = resolve(
            &flags,
            env_of(&[("REDIS_URL", "env:2"), ("CACHE_KEY_PREFIX", "x")]),
        )
        .unwrap();
        assert_eq!(
            resolved.target,
            RedisTarget::Standalone("redis://flag:1".into())
        );
        assert_eq!(resolved.prefix, "p:");
    }

    #[test]
    fn the_per_second_redis_reads_envoyproxys_persecond_variables() {
        assert_eq!(
            resolve_per_second(env_of(&[("REDIS_URL", "a:1")])),
            Ok(None)
        );
        let resolved = resolve_per_second(env_of(&[
            ("REDIS_PERSECOND", "true"),
            ("REDIS_URL", "main:6379"),
            ("REDIS_AUTH", "main-password"),
            ("REDIS_PERSECOND_URL", "fast:6380"),
            ("REDIS_PERSECOND_AUTH", "fast-password"),
            ("CACHE_KEY_PREFIX", "rl_"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            resolved.target,
            RedisTarget::Standalone("redis://:fast-password@fast:6380".into())
        );
        assert_eq!(resolved.prefix, "rl_", "the prefix is shared");
        let cluster = resolve_per_second(env_of(&[
            ("REDIS_PERSECOND", "1"),
            ("REDIS_PERSECOND_TYPE", "cluster"),
            ("REDIS_PERSECOND_URL", "c1:7000,c2:7001"),
        ]))
        .unwrap()
        .unwrap();
        assert!(matches!(cluster.target, RedisTarget::Cluster(nodes) if nodes.len() == 2));
        for (vars, expected) in [
            (
                &[("REDIS_PERSECOND", "true")][..],
                "needs REDIS_PERSECOND_URL",
            ),
            (
                &[
                    ("REDIS_PERSECOND", "true"),
                    ("REDIS_PERSECOND_URL", "/run/fast.sock"),
                    ("REDIS_PERSECOND_SOCKET_TYPE", "tcp"),
                ][..],
                "per-second Redis (REDIS_PERSECOND_*): REDIS_SOCKET_TYPE=tcp: REDIS_URL=/run/fast.sock is a path",
            ),
            (&[("REDIS_PERSECOND", "yes")][..], "REDIS_PERSECOND=yes"),
        ] {
            let error = resolve_per_second(env_of(vars)).unwrap_err();
            assert!(error.contains(expected), "{vars:?}: {error}");
        }
    }

    #[test]
    fn envoyproxy_sentinel_list_is_the_master_name_then_the_sentinels() {
        let resolved = resolve(
            &RedisFlags::default(),
            env_of(&[
                ("REDIS_TYPE", "sentinel"),
                ("REDIS_URL", "mymaster, s1:26379,s2:26380"),
                ("REDIS_AUTH", "user:pw"),
            ]),
        )
        .unwrap();
        let RedisTarget::Sentinel(target) = resolved.target else {
            panic!("not a sentinel target: {:?}", resolved.target);
        };
        assert_eq!(target.master_name, "mymaster");
        // REDIS_AUTH is the master's password; sentinels usually run without one.
        assert_eq!(target.sentinels, ["redis://s1:26379", "redis://s2:26380"]);
        assert_eq!(
            target.master.at("10.0.0.1", 6379),
            "redis://user:pw@10.0.0.1:6379"
        );

        // REDIS_SENTINEL_AUTH is the sentinels' password, apart from the master's.
        let resolved = resolve(
            &RedisFlags::default(),
            env_of(&[
                ("REDIS_TYPE", "sentinel"),
                ("REDIS_URL", "mymaster,s1:26379,redis://s2:26380"),
                ("REDIS_AUTH", "pw"),
                ("REDIS_SENTINEL_AUTH", "s/pw"),
            ]),
        )
        .unwrap();
        let RedisTarget::Sentinel(target) = resolved.target else {
            panic!("not a sentinel target: {:?}", resolved.target);
        };
        assert_eq!(
            target.sentinels,
            ["redis://:s%2Fpw@s1:26379", "redis://s2:26380"]
        );
        assert_eq!(target.master.at("h", 1), "redis://:pw@h:1");
    }

    #[test]
    fn sentinel_flag_takes_the_master_as_a_url() {
        let flags = RedisFlags {
            sentinel: Some("rediss://:pw@cache/2,redis://:spw@s1:26379".into()),
            ..Default::default()
        };
        let RedisTarget::Sentinel(target) = resolve(&flags, env_of(&[])).unwrap().target else {
            panic!("not a sentinel target");
        };
        assert_eq!(target.master_name, "cache");
        assert_eq!(target.sentinels, ["redis://:spw@s1:26379"]);
        assert_eq!(target.master.at("h", 1), "rediss://:pw@h:1/2");
        assert!(target.master.is_tls());

        let no_name = RedisFlags {
            sentinel: Some("s1:26379,s2:26379".into()),
            ..Default::default()
        };
        assert!(
            resolve(&no_name, env_of(&[]))
                .unwrap_err()
                .contains("mymaster,host:26379")
        );
        let no_sentinel = RedisFlags {
            sentinel: Some("mymaster".into()),
            ..Default::default()
        };
        assert!(
            resolve(&no_sentinel, env_of(&[]))
                .unwrap_err()
                .contains("no sentinel")
        );
    }

    #[test]
    fn one_target_at_a_time() {
        let flags = RedisFlags {
            url: Some("redis://a:1".into()),
            sentinel: Some("m,s:1".into()),
            ..Default::default()
        };
        let error = resolve(&flags, env_of(&[])).unwrap_err();
        assert!(
            error.contains("--redis-url and --redis-sentinel"),
            "{error}"
        );
    }

    #[test]
    fn tls_files_come_from_flags_or_envoyproxy_variables() {
        let resolved = resolve(
            &RedisFlags::default(),
            env_of(&[
                ("REDIS_URL", "r:6379"),
                ("REDIS_TLS", "true"),
                ("REDIS_TLS_CACERT", "/ca.pem"),
                ("REDIS_TLS_CLIENT_CERT", "/c.pem"),
                ("REDIS_TLS_CLIENT_KEY", "/k.pem"),
            ]),
        )
        .unwrap();
        assert_eq!(resolved.tls.ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(resolved.tls.client_key, Some(PathBuf::from("/k.pem")));
        let flags = RedisFlags {
            url: Some("rediss://r:6379".into()),
            tls: RedisTls {
                ca: Some("/mine.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let resolved = resolve(&flags, env_of(&[("REDIS_TLS_CACERT", "/theirs.pem")])).unwrap();
        assert_eq!(resolved.tls.ca, Some(PathBuf::from("/mine.pem")));

        let plain = RedisFlags {
            url: Some("redis://r:6379".into()),
            ..flags.clone()
        };
        assert!(
            resolve(&plain, env_of(&[]))
                .unwrap_err()
                .contains("rediss://")
        );
        let half = resolve(
            &RedisFlags::default(),
            env_of(&[
                ("REDIS_URL", "r:6379"),
                ("REDIS_TLS", "true"),
                ("REDIS_TLS_CLIENT_CERT", "/c.pem"),
            ]),
        );
        assert!(half.unwrap_err().contains("--redis-tls-key"));
    }

    #[test]
    fn unsupported_settings_say_what_to_use() {
        let redis_type = resolve(
            &RedisFlags::default(),
            env_of(&[("REDIS_TYPE", "memcache"), ("REDIS_URL", "a:1")]),
        );
        assert!(redis_type.unwrap_err().contains("sentinel"));
        let cache = resolve(
            &RedisFlags::default(),
            env_of(&[("REDIS_URL", "a:1"), ("LOCAL_CACHE_SIZE_IN_BYTES", "1MB")]),
        );
        assert!(cache.unwrap_err().contains("LOCAL_CACHE_SIZE_IN_BYTES=1MB"));
        let nothing = resolve(&RedisFlags::default(), env_of(&[]));
        assert!(nothing.unwrap_err().contains("--redis-url"));
        let http = resolve(
            &RedisFlags {
                url: Some("http://a:1".into()),
                ..Default::default()
            },
            env_of(&[]),
        );
        assert!(http.unwrap_err().contains("rediss://"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://user:pw@h:1/0"), "redis://user:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact("redis+unix:///run/r.sock?user=u&pass=pw"),
            "redis+unix:///run/r.sock?user=u&pass=***"
        );
    }

    #[test]
    fn a_socket_path_is_reached_as_a_unix_socket_with_its_credentials() {
        let standalone = |vars: &'static [(&'static str, &'static str)]| {
            resolve(&RedisFlags::default(), env_of(vars)).map(|r| r.target)
        };
        assert_eq!(
            standalone(&[
                ("REDIS_SOCKET_TYPE", "unix"),
                ("REDIS_URL", "/run/redis/redis.sock"),
                ("REDIS_AUTH", "meshlimit:s3cr/t"),
            ]),
            Ok(RedisTarget::Standalone(
                "redis+unix:///run/redis/redis.sock?user=meshlimit&pass=s3cr%2Ft".into()
            ))
        );
        assert_eq!(
            standalone(&[("REDIS_URL", "/run/my redis.sock"), ("REDIS_AUTH", "pw")]),
            Ok(RedisTarget::Standalone(
                "redis+unix:///run/my%20redis.sock?pass=pw".into()
            ))
        );
        let flag = resolve(
            &RedisFlags {
                url: Some("unix:///run/r.sock".into()),
                ..Default::default()
            },
            env_of(&[]),
        );
        assert_eq!(
            flag.map(|r| r.target),
            Ok(RedisTarget::Standalone("unix:///run/r.sock".into()))
        );
        // The URL it makes is one redis-rs reads as that socket, with those credentials.
        let info = redis::IntoConnectionInfo::into_connection_info(
            "redis+unix:///run/my%20redis.sock?user=u&pass=s3cr%2Ft",
        )
        .unwrap();
        assert_eq!(
            info.addr(),
            &redis::ConnectionAddr::Unix("/run/my redis.sock".into())
        );
        assert_eq!(info.redis_settings().password(), Some("s3cr/t"));
        assert_eq!(info.redis_settings().username(), Some("u"));

        for (vars, expected) in [
            (
                &[("REDIS_SOCKET_TYPE", "unix"), ("REDIS_URL", "redis:6379")][..],
                "is not a socket's path",
            ),
            (
                &[("REDIS_SOCKET_TYPE", "tcp"), ("REDIS_URL", "/run/r.sock")][..],
                "write REDIS_SOCKET_TYPE=unix",
            ),
            (
                &[("REDIS_SOCKET_TYPE", "udp"), ("REDIS_URL", "r:1")][..],
                "REDIS_SOCKET_TYPE=udp: write tcp or unix",
            ),
            (
                &[
                    ("REDIS_SOCKET_TYPE", "unix"),
                    ("REDIS_TYPE", "cluster"),
                    ("REDIS_URL", "/run/r.sock"),
                ][..],
                "reached over TCP",
            ),
            (
                &[("REDIS_TYPE", "cluster"), ("REDIS_URL", "a:1,/run/r.sock")][..],
                "`/run/r.sock`: a Redis Cluster's nodes are reached over TCP",
            ),
            (
                &[("REDIS_URL", "/run/r.sock"), ("REDIS_TLS", "true")][..],
                "TLS is not spoken on a Unix socket",
            ),
        ] {
            let error = resolve(&RedisFlags::default(), env_of(vars)).unwrap_err();
            assert!(error.contains(expected), "{vars:?}: {error}");
        }
    }

    #[test]
    fn each_replica_takes_its_share_rounded_up() {
        let limit = Limit::per_unit(10, Unit::Minute, Algorithm::FixedWindow);
        assert_eq!(replica_share(&limit, 3).requests_per_unit, 4);
        assert_eq!(replica_share(&limit, 1).requests_per_unit, 10);
        assert_eq!(replica_share(&limit, 20).requests_per_unit, 1);
        let bucket = Limit {
            burst: Some(7),
            ..Limit::per_unit(100, Unit::Second, Algorithm::TokenBucket)
        };
        assert_eq!(replica_share(&bucket, 2).burst, Some(4));
    }

    #[test]
    fn envoyproxys_local_cache_size_becomes_entries_unless_the_flag_says() {
        let entries = |flag: Option<u64>, size: Option<&'static str>| {
            let env: &'static [(&str, &str)] = match size {
                Some(size) => Vec::leak(vec![
                    ("REDIS_URL", "a:1"),
                    ("LOCAL_CACHE_SIZE_IN_BYTES", size),
                ]),
                None => &[("REDIS_URL", "a:1")],
            };
            let flags = RedisFlags {
                local_cache_entries: flag,
                ..Default::default()
            };
            resolve(&flags, env_of(env)).unwrap().local_cache_entries
        };
        assert_eq!(entries(None, None), DEFAULT_LOCAL_CACHE_ENTRIES);
        // envoyproxy/ratelimit's default, 0, leaves meshlimit's cache at its default.
        assert_eq!(entries(None, Some("0")), DEFAULT_LOCAL_CACHE_ENTRIES);
        assert_eq!(entries(None, Some("1048576")), 2_048);
        assert_eq!(entries(None, Some("100")), 1);
        assert_eq!(entries(Some(0), Some("1048576")), 0, "the flag wins");
    }
}
