//! Where spans go and which are kept: meshlimit's flags, envoyproxy/ratelimit's `TRACING_*`
//! variables, and OpenTelemetry's standard `OTEL_*` variables, in that order of precedence.
//! A pure function of the flags and an environment lookup, so every rule is unit-tested.

use std::time::Duration;

use super::Sampler;

/// OTLP's transports. envoyproxy/ratelimit and OpenTelemetry both default to HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `TraceService/Export` over gRPC, usually port 4317.
    Grpc,
    /// The same message POSTed as `application/x-protobuf`, usually to :4318/v1/traces.
    HttpProtobuf,
}

/// OpenTelemetry's batch span processor settings (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSettings {
    /// The longest a span waits in the queue before its batch is sent.
    pub delay: Duration,
    /// Spans waiting at most; past it new spans are dropped.
    pub max_queue: usize,
    /// Spans sent in one export at most.
    pub max_batch: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        // OpenTelemetry's defaults.
        Self {
            delay: Duration::from_millis(5_000),
            max_queue: 2_048,
            max_batch: 512,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TracingOptions {
    pub transport: Transport,
    /// http(s)://host:port for gRPC; the full URL to POST to for HTTP.
    pub endpoint: String,
    /// For an https:// endpoint: the CAs the collector's certificate must come from
    /// (`OTEL_EXPORTER_OTLP_CERTIFICATE`), else the system's.
    pub ca: Option<std::path::PathBuf>,
    /// The client certificate offered to a collector that asks for one
    /// (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `_CLIENT_KEY`).
    pub identity: Option<crate::tls::ClientIdentity>,
    /// Sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. a collector's API key.
    pub headers: Vec<(String, String)>,
    /// The most one export may take.
    pub timeout: Duration,
    pub sampler: Sampler,
    /// The resource's attributes: `service.name` first.
    pub resource: Vec<(String, String)>,
    pub batch: BatchSettings,
}

/// The command line's part.
#[derive(Debug, Clone, Default)]
pub struct TracingFlags {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub service_name: Option<String>,
    pub sampling_rate: Option<f64>,
}

/// The tracing settings, or `None` when tracing is off: it is on when `--otlp-endpoint` is
/// given or `TRACING_ENABLED=true`, unless `OTEL_SDK_DISABLED=true`.
pub fn resolve(
    flags: &TracingFlags,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<TracingOptions>, String> {
    let flag = |name: &str| -> Result<bool, String> {
        env(name)
            .map(|value| crate::envoyproxy_env::parse_bool(name, &value))
            .transpose()
            .map(|set| set == Some(true))
    };
    let envoyproxy = flag("TRACING_ENABLED")?;
    if flag("OTEL_SDK_DISABLED")? || (flags.endpoint.is_none() && !envoyproxy) {
        return Ok(None);
    }
    // The first of several names that is set.
    let first = |names: &[&'static str]| -> Option<(&'static str, String)> {
        names.iter().find_map(|name| Some((*name, env(name)?)))
    };

    let transport = match (flags.protocol.clone().map(|p| ("--otlp-protocol", p))).or_else(|| {
        first(&[
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "TRACING_EXPORTER_PROTOCOL",
        ])
    }) {
        None => Transport::HttpProtobuf,
        Some((name, value)) => transport(name, &value)?,
    };

    let endpoint = match flags.endpoint.clone() {
        Some(url) => endpoint_url("--otlp-endpoint", &url, transport, true)?,
        None => match first(&[
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]) {
            Some((name, url)) => {
                endpoint_url(name, &url, transport, name == "OTEL_EXPORTER_OTLP_ENDPOINT")?
            }
            None => match transport {
                Transport::Grpc => "http://localhost:4317".to_owned(),
                Transport::HttpProtobuf => "http://localhost:4318/v1/traces".to_owned(),
            },
        },
    };

    let headers = match first(&[
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_HEADERS",
    ]) {
        Some((name, list)) => pairs(name, &list)?,
        None => Vec::new(),
    };
    let timeout = match first(&[
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]) {
        Some((name, value)) => Duration::from_millis(whole(name, &value)?.max(1)),
        None => Duration::from_secs(10),
    };

    let mut resource = match env("OTEL_RESOURCE_ATTRIBUTES") {
        Some(list) => pairs("OTEL_RESOURCE_ATTRIBUTES", &list)?,
        None => Vec::new(),
    };
    let named = resource
        .iter()
        .position(|(key, _)| key == "service.name")
        .map(|at| resource.remove(at).1);
    let service_name = (flags.service_name.clone())
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .or_else(|| env("TRACING_SERVICE_NAME"))
        .or(named)
        // envoyproxy/ratelimit's name for itself, so its users' trace queries keep working.
        .unwrap_or_else(|| if envoyproxy { "RateLimit" } else { "meshlimit" }.to_owned());
    resource.insert(0, ("service.name".to_owned(), service_name));
    for (variable, key) in [
        ("TRACING_SERVICE_NAMESPACE", "service.namespace"),
        ("TRACING_SERVICE_INSTANCE_ID", "service.instance.id"),
    ] {
        if let Some(value) = env(variable).filter(|v| !v.is_empty()) {
            resource.retain(|(k, _)| k != key);
            resource.push((key.to_owned(), value));
        }
    }
    if !resource.iter().any(|(key, _)| key == "service.version") {
        resource.push((
            "service.version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ));
    }

    let ca = first(&[
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ])
    .map(|(_, path)| std::path::PathBuf::from(path));
    let identity = identity(&first)?;

    Ok(Some(TracingOptions {
        transport,
        endpoint,
        ca,
        identity,
        headers,
        timeout,
        sampler: sampler(flags, &env)?,
        resource,
        batch: batch(&env)?,
    }))
}

/// OpenTelemetry's client certificate variables: both files, or neither.
fn identity(
    first: &impl Fn(&[&'static str]) -> Option<(&'static str, String)>,
) -> Result<Option<crate::tls::ClientIdentity>, String> {
    let cert = first(&[
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    ]);
    let key = first(&[
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ]);
    match (cert, key) {
        (None, None) => Ok(None),
        (Some((_, cert)), Some((_, key))) => Ok(Some(crate::tls::ClientIdentity {
            cert: cert.into(),
            key: key.into(),
        })),
        (Some((name, _)), None) | (None, Some((name, _))) => Err(format!(
            "{name} is set alone: a client certificate needs both \
             OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY"
        )),
    }
}

/// A hint for an operator who set an OTLP endpoint and expected spans.
pub fn off_but_configured(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find(|name| env(name).is_some())
    .map(|name| {
        format!(
            "{name} is set but tracing is off; set TRACING_ENABLED=true or --otlp-endpoint \
                 to send spans there"
        )
    })
}

fn transport(name: &str, value: &str) -> Result<Transport, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "grpc" => Ok(Transport::Grpc),
        // envoyproxy/ratelimit's `http` is OpenTelemetry's `http/protobuf`.
        "http" | "http/protobuf" => Ok(Transport::HttpProtobuf),
        "http/json" => Err(format!(
            "{name}=http/json: meshlimit sends OTLP as protobuf; set http/protobuf or grpc \
             (every OTLP collector takes both)"
        )),
        other => Err(format!(
            "{name}={other:?} is not an OTLP protocol; use grpc or http/protobuf"
        )),
    }
}

/// `url` as the exporter calls it. A base URL (the generic variable, the flag) gets
/// `/v1/traces` appended for HTTP; a URL without a scheme (`host:port`, as
/// envoyproxy/ratelimit's gRPC exporter takes it) is plain-text HTTP.
fn endpoint_url(name: &str, url: &str, transport: Transport, base: bool) -> Result<String, String> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some(_) => {
            return Err(format!(
                "{name}={url}: use an http:// or https:// URL, or host:port"
            ));
        }
        None => ("http", url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() || authority.parse::<http::uri::Authority>().is_err() {
        return Err(format!(
            "{name}={url}: no host:port in it; e.g. http://otel-collector:4318"
        ));
    }
    Ok(match transport {
        Transport::Grpc => format!("{scheme}://{authority}"),
        Transport::HttpProtobuf if base && !path.ends_with("/v1/traces") => {
            format!(
                "{scheme}://{authority}{}/v1/traces",
                path.trim_end_matches('/')
            )
        }
        Transport::HttpProtobuf if path.is_empty() => format!("{scheme}://{authority}/"),
        Transport::HttpProtobuf => format!("{scheme}://{authority}{path}"),
    })
}

/// OpenTelemetry's `key=value,key=value` lists, values percent-encoded.
fn pairs(name: &str, list: &str) -> Result<Vec<(String, String)>, String> {
    list.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                format!("{name}: {item:?} is not key=value; write key1=value1,key2=value2")
            })?;
            Ok((key.trim().to_owned(), percent_decoded(name, value.trim())?))
        })
        .collect()
}

fn percent_decoded(name: &str, text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let pair = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    format!("{name}: {text:?} has a % not followed by two hex digits")
                })?;
            out.push(pair);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{name}: {text:?} decodes to invalid UTF-8"))
}

fn whole(name: &str, value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{name}={value:?}: give whole milliseconds, e.g. 5000"))
}

fn ratio(name: &str, value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!(
            "{name}={value:?}: give the share of traces to keep, from 0 to 1 (0.1 keeps one \
             in ten)"
        )),
    }
}

/// `--trace-sampling-rate`, `TRACING_SAMPLING_RATE`, then OpenTelemetry's `OTEL_TRACES_SAMPLER`
/// and its argument. Every default follows the caller's decision (ParentBased).
fn sampler(flags: &TracingFlags, env: &impl Fn(&str) -> Option<String>) -> Result<Sampler, String> {
    if let Some(rate) = flags.sampling_rate {
        return Ok(Sampler::new(
            ratio("--trace-sampling-rate", &rate.to_string())?,
            true,
        ));
    }
    if let Some(rate) = env("TRACING_SAMPLING_RATE") {
        return Ok(Sampler::new(ratio("TRACING_SAMPLING_RATE", &rate)?, true));
    }
    let argument = || match env("OTEL_TRACES_SAMPLER_ARG") {
        Some(value) => ratio("OTEL_TRACES_SAMPLER_ARG", &value),
        None => Ok(1.0),
    };
    let Some(kind) = env("OTEL_TRACES_SAMPLER") else {
        return Ok(Sampler::new(1.0, true));
    };
    Ok(match kind.trim() {
        "always_on" => Sampler::new(1.0, false),
        "always_off" => Sampler::new(0.0, false),
        "traceidratio" => Sampler::new(argument()?, false),
        "parentbased_always_on" => Sampler::new(1.0, true),
        "parentbased_always_off" => Sampler::new(0.0, true),
        "parentbased_traceidratio" => Sampler::new(argument()?, true),
        other => {
            return Err(format!(
                "OTEL_TRACES_SAMPLER={other:?} is not one meshlimit has; use \
                 parentbased_traceidratio (with OTEL_TRACES_SAMPLER_ARG), traceidratio, \
                 always_on or always_off, or their parentbased_ forms"
            ));
        }
    })
}

fn batch(env: &impl Fn(&str) -> Option<String>) -> Result<BatchSettings, String> {
    let mut batch = BatchSettings::default();
    if let Some(value) = env("OTEL_BSP_SCHEDULE_DELAY") {
        batch.delay = Duration::from_millis(whole("OTEL_BSP_SCHEDULE_DELAY", &value)?.max(1));
    }
    for (name, field) in [
        ("OTEL_BSP_MAX_QUEUE_SIZE", &mut batch.max_queue),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &mut batch.max_batch),
    ] {
        if let Some(value) = env(name) {
            *field = usize::try_from(whole(name, &value)?.max(1)).unwrap_or(usize::MAX);
        }
    }
    batch.max_batch = batch.max_batch.min(batch.max_queue);
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_with(
        flags: &TracingFlags,
        vars: &[(&str, &str)],
    ) -> Result<Option<TracingOptions>, String> {
        resolve(flags, |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    fn on(vars: &[(&str, &str)]) -> TracingOptions {
        let mut all = vec![("TRACING_ENABLED", "true")];
        all.extend_from_slice(vars);
        resolve_with(&TracingFlags::default(), &all)
            .unwrap()
            .unwrap()
    }

    fn flag_endpoint(url: &str) -> TracingFlags {
        TracingFlags {
            endpoint: Some(url.to_owned()),
            ..TracingFlags::default()
        }
    }

    #[test]
    fn off_unless_asked_for() {
        assert_eq!(resolve_with(&TracingFlags::default(), &[]), Ok(None));
        // An endpoint alone, as an operator injects for every pod, does not turn it on...
        let injected = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        assert_eq!(resolve_with(&TracingFlags::default(), &injected), Ok(None));
        // ...but is named in a hint.
        assert!(
            off_but_configured(|n| (n == "OTEL_EXPORTER_OTLP_ENDPOINT").then(String::new))
                .unwrap()
                .contains("TRACING_ENABLED=true")
        );
        let disabled = [("TRACING_ENABLED", "true"), ("OTEL_SDK_DISABLED", "true")];
        assert_eq!(resolve_with(&TracingFlags::default(), &disabled), Ok(None));
    }

    #[test]
    fn envoyproxys_defaults_http_to_the_local_collector_as_ratelimit() {
        let options = on(&[]);
        assert_eq!(options.transport, Transport::HttpProtobuf);
        assert_eq!(options.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(
            options.resource[0],
            ("service.name".to_owned(), "RateLimit".to_owned())
        );
        assert_eq!(options.sampler, Sampler::new(1.0, true));
        assert_eq!(options.batch, BatchSettings::default());
        assert_eq!(options.timeout, Duration::from_secs(10));
    }

    #[test]
    fn envoyproxys_variables_as_its_deployments_set_them() {
        let options = on(&[
            ("TRACING_EXPORTER_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:26000"),
            ("TRACING_SERVICE_NAME", "controlplane-ratelimit"),
            ("TRACING_SERVICE_NAMESPACE", "edge"),
            ("TRACING_SERVICE_INSTANCE_ID", "pod-7"),
            ("TRACING_SAMPLING_RATE", "0.25"),
        ]);
        assert_eq!(options.transport, Transport::Grpc);
        assert_eq!(options.endpoint, "http://127.0.0.1:26000");
        assert_eq!(options.sampler, Sampler::new(0.25, true));
        let resource: Vec<(&str, &str)> = options
            .resource
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            resource,
            [
                ("service.name", "controlplane-ratelimit"),
                ("service.namespace", "edge"),
                ("service.instance.id", "pod-7"),
                ("service.version", env!("CARGO_PKG_VERSION")),
            ]
        );
    }

    #[test]
    fn the_generic_endpoint_gets_the_traces_path_and_the_traces_one_is_kept() {
        let base = on(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]);
        assert_eq!(base.endpoint, "http://collector:4318/v1/traces");
        let prefixed = on(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://gw:80/otlp")]);
        assert_eq!(prefixed.endpoint, "http://gw:80/otlp/v1/traces");
        let exact = on(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:1"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://collector:4318/custom",
            ),
        ]);
        assert_eq!(exact.endpoint, "http://collector:4318/custom");
        // The flag is a base URL too, and a path already ending in /v1/traces stays.
        let flagged = resolve_with(&flag_endpoint("http://c:4318/v1/traces"), &[])
            .unwrap()
            .unwrap();
        assert_eq!(flagged.endpoint, "http://c:4318/v1/traces");
        assert_eq!(flagged.resource[0].1, "meshlimit");
    }

    #[test]
    fn https_endpoints_keep_their_scheme_and_take_a_ca_file() {
        let options = on(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://api.honeycomb.io"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/otel/ca.pem"),
        ]);
        assert_eq!(options.endpoint, "https://api.honeycomb.io/v1/traces");
        assert_eq!(options.ca, Some("/etc/otel/ca.pem".into()));
        let grpc = on(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://collector:4317",
            ),
        ]);
        assert_eq!(grpc.endpoint, "https://collector:4317");
        assert_eq!(grpc.ca, None);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let options = on(&[
            (
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                "/etc/otel/client.pem",
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                "/etc/otel/client-key.pem",
            ),
        ]);
        assert_eq!(
            options.identity,
            Some(crate::tls::ClientIdentity {
                cert: "/etc/otel/client.pem".into(),
                key: "/etc/otel/client-key.pem".into(),
            })
        );
        let alone = resolve_with(
            &TracingFlags::default(),
            &[
                ("TRACING_ENABLED", "true"),
                (
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    "/etc/otel/client.pem",
                ),
            ],
        )
        .unwrap_err();
        assert!(alone.contains("OTEL_EXPORTER_OTLP_CLIENT_KEY"), "{alone}");
        assert_eq!(on(&[]).identity, None);
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        let flags = TracingFlags {
            endpoint: Some("http://flag:4317".to_owned()),
            protocol: Some("grpc".to_owned()),
            service_name: Some("edge-limits".to_owned()),
            sampling_rate: Some(0.5),
        };
        let options = resolve_with(
            &flags,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_SERVICE_NAME", "env-name"),
                ("TRACING_SAMPLING_RATE", "0.1"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(options.endpoint, "http://flag:4317");
        assert_eq!(options.transport, Transport::Grpc);
        assert_eq!(options.resource[0].1, "edge-limits");
        assert_eq!(options.sampler, Sampler::new(0.5, true));
    }

    #[test]
    fn opentelemetrys_standard_variables() {
        let options = on(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret, tenant=a"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attrs,deployment.environment=prod",
            ),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.2"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
        ]);
        assert_eq!(
            options.headers,
            [
                ("api-key".to_owned(), "s=cret".to_owned()),
                ("tenant".to_owned(), "a".to_owned())
            ]
        );
        assert_eq!(options.timeout, Duration::from_millis(2_500));
        assert_eq!(options.resource[0].1, "from-attrs");
        assert!(
            options
                .resource
                .contains(&("deployment.environment".to_owned(), "prod".to_owned()))
        );
        assert_eq!(options.sampler, Sampler::new(0.2, false));
        assert_eq!(
            options.batch,
            BatchSettings {
                delay: Duration::from_millis(100),
                max_queue: 64,
                // Never more than the queue holds.
                max_batch: 64,
            }
        );
    }

    #[test]
    fn what_cannot_work_is_refused_with_what_to_write() {
        for (vars, expected) in [
            (
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")][..],
                "set http/protobuf or grpc",
            ),
            (
                &[("TRACING_EXPORTER_PROTOCOL", "thrift")],
                "use grpc or http/protobuf",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c:4318")],
                "http:// or https://",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http:///v1/traces")],
                "no host:port",
            ),
            (&[("TRACING_SAMPLING_RATE", "10")], "from 0 to 1"),
            (
                &[("OTEL_TRACES_SAMPLER", "jaeger_remote")],
                "parentbased_traceidratio",
            ),
            (&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")], "key1=value1"),
            (&[("OTEL_EXPORTER_OTLP_HEADERS", "k=%zz")], "two hex digits"),
            (&[("OTEL_BSP_SCHEDULE_DELAY", "5s")], "whole milliseconds"),
            (&[("TRACING_ENABLED", "yes please")], "TRACING_ENABLED"),
        ] {
            let mut all = vec![("TRACING_ENABLED", "true")];
            all.extend_from_slice(vars);
            if vars[0].0 == "TRACING_ENABLED" {
                all.remove(0);
            }
            let error = resolve_with(&TracingFlags::default(), &all).unwrap_err();
            assert!(error.contains(expected), "{vars:?}: {error}");
        }
    }
}
