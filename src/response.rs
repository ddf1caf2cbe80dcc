//! What clients and upstreams see beyond the status codes: rate limit headers, the 429 body,
//! soft-limit request headers for the upstream, and dynamic metadata for access logs.
//!
//! Everything here reads the decision the limiter already made; nothing is counted.

use std::fmt::Write;

use prost_types::{ListValue, Struct, Value, value::Kind};

use crate::algorithm::Verdict;
use crate::limit::Limit;
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::rate_limit_response::Code;
use crate::proto::{RateLimitRequest, RateLimitResponse};
use crate::rule::{Body, HeaderSet, Rule};

/// Service-wide choices for what responses carry; policies may override headers and body.
#[derive(Debug, Clone)]
pub struct ResponseSettings {
    pub headers: HeaderSet,
    /// Names of the legacy headers (envoyproxy/ratelimit's LIMIT_*_HEADER settings).
    pub legacy_names: LegacyNames,
    /// Send a JSON body with 429s when the deciding policy sets none.
    pub json_body: bool,
    /// The request header that tells the upstream a client is near or (in warn mode) over
    /// its limit.
    pub soft_limit_header: String,
    pub dynamic_metadata: bool,
}

#[derive(Debug, Clone)]
pub struct LegacyNames {
    pub limit: String,
    pub remaining: String,
    pub reset: String,
}

impl Default for LegacyNames {
    fn default() -> Self {
        Self {
            limit: "X-RateLimit-Limit".into(),
            remaining: "X-RateLimit-Remaining".into(),
            reset: "X-RateLimit-Reset".into(),
        }
    }
}

impl Default for ResponseSettings {
    /// `Retry-After` and a JSON body on 429s; Envoy's own `x-ratelimit-*` headers cover the
    /// rest unless more are asked for.
    fn default() -> Self {
        Self {
            headers: HeaderSet {
                retry_after: true,
                ..HeaderSet::default()
            },
            legacy_names: LegacyNames::default(),
            json_body: true,
            soft_limit_header: "x-meshlimit-soft-limit".into(),
            dynamic_metadata: false,
        }
    }
}

/// The outcome of one counted descriptor, as the presentation needs it.
#[derive(Debug, Clone, Copy)]
pub struct Decided<'a> {
    pub descriptor: usize,
    pub rule: Option<&'a Rule>,
    /// The name clients see: the rule's, or what decided instead (`capacity`).
    pub name: &'a str,
    pub limit: Limit,
    pub verdict: Verdict,
    /// Over its limit, and neither in shadow nor in warn mode.
    pub over: bool,
    /// In envoyproxy/ratelimit's quota mode: being over only turns the request away when
    /// every quota-mode descriptor of the request is over.
    pub quota: bool,
    /// Whether this descriptor turned the request away.
    pub rejects: bool,
}

impl Decided<'_> {
    fn name(&self) -> &str {
        if self.name.is_empty() {
            "default"
        } else {
            self.name
        }
    }

    fn reset_seconds(&self) -> u64 {
        self.verdict.reset_after_millis.div_ceil(1_000)
    }
}

/// The descriptor whose numbers the headers report: of those that reject, the one that
/// resets last (the request is turned away until all have reset, so an earlier one would
/// tell the client to come back too early; the first of equals); else the one with the
/// least left.
pub fn deciding<'d, 'r>(decided: &'d [Decided<'r>]) -> Option<&'d Decided<'r>> {
    decided
        .iter()
        .filter(|d| d.rejects)
        .rev()
        .max_by_key(|d| d.verdict.reset_after_millis)
        .or_else(|| decided.iter().min_by_key(|d| d.verdict.remaining))
}

/// Adds headers, body and metadata to `response` for the decisions in `decided`.
pub fn present(
    response: &mut RateLimitResponse,
    request: &RateLimitRequest,
    decided: &[Decided<'_>],
    passed: &[&Rule],
    settings: &ResponseSettings,
) {
    let over = response.overall_code == Code::OverLimit as i32;
    if let Some(d) = deciding(decided) {
        let treatment = d.rule.map(|rule| &rule.treatment);
        let headers = treatment
            .and_then(|t| t.headers)
            .unwrap_or(settings.headers);
        let add = &mut response.response_headers_to_add;
        let limit = u64::from(d.limit.requests_per_unit);
        let window = d.limit.window_millis.div_ceil(1_000);
        if headers.ietf {
            add.push(header(
                "RateLimit-Policy",
                format!("\"{}\";q={limit};w={window}", d.name()),
            ));
            add.push(header(
                "RateLimit",
                format!(
                    "\"{}\";r={};t={}",
                    d.name(),
                    d.verdict.remaining,
                    d.reset_seconds()
                ),
            ));
        }
        if headers.legacy {
            let names = &settings.legacy_names;
            add.push(header(&names.limit, limit.to_string()));
            add.push(header(&names.remaining, d.verdict.remaining.to_string()));
            add.push(header(&names.reset, d.reset_seconds().to_string()));
        }
        if over && d.rejects {
            if headers.retry_after {
                add.push(header("Retry-After", d.reset_seconds().to_string()));
            }
            let custom = treatment.and_then(|t| t.body.as_ref());
            if let Some(Body {
                template,
                content_type,
            }) = custom
            {
                response.raw_body = fill(template, d).into_bytes();
                add.push(header("content-type", content_type.clone()));
            } else if settings.json_body {
                response.raw_body = json_body(d).into_bytes();
                add.push(header("content-type", "application/json".into()));
            }
        }
    }
    for d in decided {
        if let Some(value) = soft_limit_signal(d) {
            response
                .request_headers_to_add
                .push(header(&settings.soft_limit_header, value));
        }
    }
    if settings.dynamic_metadata {
        response.dynamic_metadata = Some(metadata(request, response, deciding(decided), passed));
    }
}

/// The upstream hint for one descriptor: `name;over` when a warn-mode policy is over its
/// limit, `name` when a soft limit is passed.
fn soft_limit_signal(d: &Decided<'_>) -> Option<String> {
    let treatment = &d.rule?.treatment;
    if d.verdict.over_limit && treatment.warn_only {
        return Some(format!("{};over", d.name()));
    }
    let soft = u128::from(treatment.soft_limit?);
    let limit = u128::from(d.limit.requests_per_unit);
    let used = limit.saturating_sub(u128::from(d.verdict.remaining));
    // used / limit ≥ soft / 1e6, in integers.
    (!d.verdict.over_limit && used * 1_000_000 >= soft * limit).then(|| d.name().to_owned())
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value,
        raw_value: Vec::new(),
    }
}

/// Fills `{policy}`, `{limit}`, `{window_seconds}` and `{retry_after_seconds}`.
fn fill(template: &str, d: &Decided<'_>) -> String {
    template
        .replace("{policy}", d.name())
        .replace("{limit}", &d.limit.requests_per_unit.to_string())
        .replace(
            "{window_seconds}",
            &d.limit.window_millis.div_ceil(1_000).to_string(),
        )
        .replace("{retry_after_seconds}", &d.reset_seconds().to_string())
}

fn json_body(d: &Decided<'_>) -> String {
    let mut name = String::new();
    for c in d.name().chars() {
        match c {
            '"' => name.push_str("\\\""),
            '\\' => name.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(name, "\\u{:04x}", c as u32);
            }
            c => name.push(c),
        }
    }
    let window = d.limit.window_millis.div_ceil(1_000);
    let retry = d.reset_seconds();
    // A calendar window is named as such: its length is not the nominal one.
    let per = match d.limit.calendar {
        Some(calendar) => format!("{calendar} ({})", calendar.zone.name()),
        None => format!("{window}s"),
    };
    format!(
        "{{\"error\":\"too_many_requests\",\"message\":\"Rate limit of {} requests per {per} exceeded ({name}); retry after {retry}s.\",\"policy\":\"{name}\",\"limit\":{},\"window_seconds\":{window},\"retry_after_seconds\":{retry}}}",
        d.limit.requests_per_unit, d.limit.requests_per_unit
    )
}

fn string(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

fn number(value: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(value)),
    }
}

fn object(fields: Vec<(&str, Value)>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct {
            fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        })),
    }
}

/// The decision for access logs. At the top, envoyproxy/ratelimit's layout, so access log
/// formats written for it keep working: `domain`, `descriptors` (each `entries` as
/// `key=value` strings, its `limit` override and `hitsAddend` when sent), the request's
/// `hitsAddend` when not zero, and `metadata` merged from the rules that let the request
/// pass. Under `meshlimit`, what decided.
fn metadata(
    request: &RateLimitRequest,
    response: &RateLimitResponse,
    deciding: Option<&Decided<'_>>,
    passed: &[&Rule],
) -> Struct {
    let mut top = vec![
        ("domain", string(&request.domain)),
        (
            "descriptors",
            list(
                request
                    .descriptors
                    .iter()
                    .map(envoyproxy_descriptor)
                    .collect(),
            ),
        ),
    ];
    if request.hits_addend != 0 {
        top.push(("hitsAddend", number(f64::from(request.hits_addend))));
    }
    // The `metadata` of every rule that let the request pass, merged as envoyproxy/
    // ratelimit merges it: nested mappings combine, otherwise the first rule's value stays.
    let mut merged = Struct::default();
    for rule in passed {
        if let Some(metadata) = &rule.metadata {
            merge(&mut merged, metadata);
        }
    }
    if !merged.fields.is_empty() {
        top.push((
            "metadata",
            Value {
                kind: Some(Kind::StructValue(merged)),
            },
        ));
    }
    top.push(("meshlimit", decision(request, response, deciding)));
    match object(top).kind {
        Some(Kind::StructValue(fields)) => fields,
        _ => Struct::default(),
    }
}

/// One descriptor as envoyproxy/ratelimit writes it into dynamic metadata.
fn envoyproxy_descriptor(descriptor: &crate::proto::RateLimitDescriptor) -> Value {
    let entries = descriptor
        .entries
        .iter()
        .map(|e| string(&format!("{}={}", e.key, e.value)))
        .collect();
    let mut fields = vec![("entries", list(entries))];
    if let Some(limit) = &descriptor.limit {
        let unit = crate::proto::envoy::r#type::v3::RateLimitUnit::try_from(limit.unit)
            .map_or("UNKNOWN", |unit| unit.as_str_name());
        fields.push((
            "limit",
            string(&format!(
                "requests_per_unit:{} unit:{unit}",
                limit.requests_per_unit
            )),
        ));
    }
    if let Some(hits) = descriptor.hits_addend {
        fields.push(("hitsAddend", number(hits as f64)));
    }
    object(fields)
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

/// meshlimit's own summary: the descriptors as mappings, the overall code, and the policy,
/// descriptor and limit that decided.
fn decision(
    request: &RateLimitRequest,
    response: &RateLimitResponse,
    deciding: Option<&Decided<'_>>,
) -> Value {
    let descriptors = request
        .descriptors
        .iter()
        .map(|d| {
            object(
                d.entries
                    .iter()
                    .map(|e| (e.key.as_str(), string(&e.value)))
                    .collect(),
            )
        })
        .collect();
    let overall = if response.overall_code == Code::OverLimit as i32 {
        "OVER_LIMIT"
    } else {
        "OK"
    };
    let mut fields = vec![
        ("domain", string(&request.domain)),
        ("descriptors", list(descriptors)),
        ("overall_code", string(overall)),
    ];
    if let Some(d) = deciding {
        fields.push(("policy", string(d.name())));
        fields.push(("descriptor_index", number(d.descriptor as f64)));
        fields.push(("limit", number(f64::from(d.limit.requests_per_unit))));
        fields.push(("remaining", number(d.verdict.remaining as f64)));
    }
    object(fields)
}

/// Adds `from`'s fields to `into`: a mapping in both is merged field by field; any other
/// field `into` already has is kept.
fn merge(into: &mut Struct, from: &Struct) {
    for (name, value) in &from.fields {
        match (into.fields.get_mut(name), &value.kind) {
            (None, _) => {
                into.fields.insert(name.clone(), value.clone());
            }
            (
                Some(Value {
                    kind: Some(Kind::StructValue(existing)),
                }),
                Some(Kind::StructValue(more)),
            ) => merge(existing, more),
            (Some(_), _) => {}
        }
    }
}
