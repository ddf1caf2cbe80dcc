//! The Redis store's settings: meshlimit's flags plus the environment variables
//! envoyproxy/ratelimit users already set (`REDIS_TYPE`, `REDIS_URL`, `REDIS_AUTH`,
//! `REDIS_TLS`, `CACHE_KEY_PREFIX`, …), each understood or refused with what to use.

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
    /// One server (or a proxy in front of several): `redis://` or `rediss://` URL.
    Standalone(String),
    /// Seed nodes of a Redis Cluster, as URLs; the rest are discovered.
    Cluster(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub target: RedisTarget,
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
}

/// `--redis-local-cache-entries` when not given.
pub const DEFAULT_LOCAL_CACHE_ENTRIES: u64 = 100_000;

/// The Redis flags as given (flag or `MESHLIMIT_*` variable), before envoyproxy/ratelimit's
/// variables fill the gaps.
#[derive(Debug, Clone, Default)]
pub struct RedisFlags {
    pub url: Option<String>,
    pub cluster_nodes: Option<String>,
    pub prefix: Option<String>,
}

/// What the flags and the environment resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub target: RedisTarget,
    pub prefix: String,
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
    if let Some(size) = env("LOCAL_CACHE_SIZE_IN_BYTES")
        && size.trim() != "0"
    {
        return Err(format!(
            "LOCAL_CACHE_SIZE_IN_BYTES={size}: meshlimit's local over-limit cache is on by \
             default and bounded by entries, not bytes; unset it and use \
             --redis-local-cache-entries N (default {DEFAULT_LOCAL_CACHE_ENTRIES}, a few hundred \
             bytes each; 0 turns the cache off)"
        ));
    }
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
    let redis_type = env("REDIS_TYPE").map(|t| t.to_ascii_lowercase());
    let cluster = match redis_type.as_deref() {
        None | Some("single") => false,
        Some("cluster") => true,
        Some("sentinel") => {
            return Err(
                "REDIS_TYPE=sentinel: meshlimit does not speak Redis Sentinel; point --redis-url at \
                 the master (e.g. through a proxy that follows failovers) or use a Redis Cluster \
                 with --redis-cluster-nodes"
                    .to_owned(),
            );
        }
        Some(other) => {
            return Err(format!(
                "REDIS_TYPE={other}: write single or cluster (or use --redis-url / --redis-cluster-nodes)"
            ));
        }
    };

    let target = if let Some(nodes) = &flags.cluster_nodes {
        RedisTarget::Cluster(urls(nodes, tls, auth.as_deref())?)
    } else if let Some(url) = &flags.url {
        RedisTarget::Standalone(url_of(url, tls, auth.as_deref())?)
    } else if let Some(url) = env("REDIS_URL") {
        // envoyproxy/ratelimit's REDIS_URL: `host:port`, comma-separated for a cluster.
        if cluster {
            RedisTarget::Cluster(urls(&url, tls, auth.as_deref())?)
        } else {
            RedisTarget::Standalone(url_of(&url, tls, auth.as_deref())?)
        }
    } else {
        return Err(
            "--store redis needs --redis-url redis://host:port (or MESHLIMIT_REDIS_URL / REDIS_URL), \
             or --redis-cluster-nodes host:port,host:port for a Redis Cluster"
                .to_owned(),
        );
    };
    let prefix = flags
        .prefix
        .clone()
        .or_else(|| env("CACHE_KEY_PREFIX"))
        .unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    Ok(Resolved { target, prefix })
}

fn urls(list: &str, tls: bool, auth: Option<&str>) -> Result<Vec<String>, String> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(|node| url_of(node, tls, auth))
        .collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err("no Redis Cluster seed nodes given; write host:port,host:port".into());
    }
    Ok(urls)
}

/// A full URL from `redis://…`, `rediss://…` or envoyproxy/ratelimit's bare `host:port`,
/// with `REDIS_AUTH` (`password` or `user:password`) and `REDIS_TLS` applied to bare ones.
fn url_of(text: &str, tls: bool, auth: Option<&str>) -> Result<String, String> {
    let text = text.trim();
    if text.contains("://") {
        if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
            return Err(format!(
                "`{}`: only redis:// and rediss:// (TLS) URLs are supported",
                redact(text)
            ));
        }
        return Ok(text.to_owned());
    }
    if text.starts_with('/') {
        return Err(format!(
            "`{text}`: unix sockets are not supported; write host:port"
        ));
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let credentials = match auth {
        Some(auth) => match auth.split_once(':') {
            Some((user, password)) => format!("{}:{}@", escape(user), escape(password)),
            None => format!(":{}@", escape(auth)),
        },
        None => String::new(),
    };
    Ok(format!("{scheme}://{credentials}{text}"))
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
    fn unsupported_settings_say_what_to_use() {
        let sentinel = resolve(
            &RedisFlags::default(),
            env_of(&[("REDIS_TYPE", "sentinel")]),
        );
        assert!(sentinel.unwrap_err().contains("--redis-cluster-nodes"));
        let cache = resolve(
            &RedisFlags::default(),
            env_of(&[("REDIS_URL", "a:1"), ("LOCAL_CACHE_SIZE_IN_BYTES", "1000")]),
        );
        assert!(cache.unwrap_err().contains("--redis-local-cache-entries"));
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
}
