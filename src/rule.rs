//! What a matched descriptor node says: a limit (or explicitly none), and how to report it.

use std::fmt;
use std::sync::Arc;

use crate::algorithm::penalty::Penalty;
use crate::limit::Limit;

/// Where something was written: a config file, line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLocation {
    pub file: Arc<str>,
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The limits a rule applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleLimit {
    /// One or more limits, each with its own counter; over if any is over.
    Limited(Box<[Limit]>),
    /// `unlimited: true`: always OK, never counted, reported with u32::MAX remaining.
    Unlimited,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub limit: RuleLimit,
    /// Reported in `current_limit.name` and referenced by other rules' `replaces`.
    pub name: Option<Box<str>>,
    /// Names of rules this one switches off for the whole request when it matches.
    pub replaces: Box<[Box<str>]>,
    /// Counted and reported, but never turns a request away.
    pub shadow_mode: bool,
    pub detailed_metric: bool,
    /// `share_threshold`: `(entry index, wildcard as written)` for every sharing wildcard
    /// on the way to this rule. Counter keys carry the wildcard in place of those entries'
    /// values, so every value a wildcard matches counts on one counter (as
    /// envoyproxy/ratelimit keys them).
    pub shared_values: Box<[(usize, Box<str>)]>,
    /// `value_to_metric` or `detailed_metric`: this rule's metric key, one part per entry,
    /// when some entry puts the request's value in it; empty when none does (the metric
    /// key is then `path`).
    pub metric_key: Box<[MetricPart]>,
    /// `metadata`: added to Envoy's dynamic metadata when this rule lets a request pass.
    pub metadata: Option<prost_types::Struct>,
    /// envoyproxy/ratelimit's `quota_mode`: over the limit, the request is only turned
    /// away when all its quota-mode descriptors are over.
    pub quota_mode: bool,
    /// The rule's place in the tree, like envoyproxy/ratelimit's stat key:
    /// `domain.key_value.key` (value-less keys have no `_value`).
    pub path: Box<str>,
    pub source: SourceLocation,
    /// Keep rejected hits counted: envoyproxy/ratelimit's fixed window does, so a migrated
    /// `rate_limit` rule rejects exactly what it did before. Policies never do.
    pub count_rejected: bool,
    /// How the rule was put together, one line per field with where it came from; shown by
    /// `meshlimit explain` and `/rlconfig`.
    pub provenance: Box<[String]>,
    /// How clients and upstreams see this rule's decisions (policies only).
    pub treatment: Treatment,
    /// This rule's counters, attached after loading so they survive reloads.
    pub stats: std::sync::OnceLock<std::sync::Arc<crate::metrics::RuleStats>>,
}

/// One entry's part of a `value_to_metric` metric key, written as envoyproxy/ratelimit
/// writes its stat keys: `key`, or `key_value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricPart {
    /// From the config: `key`, or `key_value` for an exact value or a wildcard.
    Written(Box<str>),
    /// The key; the request's value follows it.
    RequestValue(Box<str>),
}

impl MetricPart {
    /// The metric key of one request: the parts joined by dots, request values filled in.
    pub fn key_of<'e>(parts: &[MetricPart], values: impl IntoIterator<Item = &'e str>) -> String {
        let mut key = String::new();
        for (part, value) in parts.iter().zip(values) {
            if !key.is_empty() {
                key.push('.');
            }
            match part {
                MetricPart::Written(written) => key.push_str(written),
                MetricPart::RequestValue(name) => {
                    key.push_str(name);
                    key.push('_');
                    key.push_str(value);
                }
            }
        }
        key
    }

    /// envoyproxy/ratelimit's key for a descriptor carrying its own `limit`: every entry
    /// with its value (`client_web.path_/api/x`), a value-less entry as its key alone.
    pub fn key_of_entries(entries: &[crate::proto::rate_limit_descriptor::Entry]) -> String {
        let mut key = String::new();
        for entry in entries {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(&entry.key);
            if !entry.value.is_empty() {
                key.push('_');
                key.push_str(&entry.value);
            }
        }
        key
    }
}

/// What a policy says beyond its limits: how decisions are presented and enforced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Treatment {
    /// `mode: warn`: over the limit, admit and mark the request for the upstream.
    pub warn_only: bool,
    /// Parts per million of the limit past which the upstream is told (soft limit).
    pub soft_limit: Option<u32>,
    pub penalty: Option<Penalty>,
    /// Overrides the service-wide header sets.
    pub headers: Option<HeaderSet>,
    /// Overrides the service-wide 429 body.
    pub body: Option<Body>,
    /// Under a domain capacity: higher is served first.
    pub priority: i64,
    /// Parts per million of the domain capacity lower priorities may not use.
    pub reserved: u32,
}

/// Which rate limit headers a response carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HeaderSet {
    /// `RateLimit-Policy` and `RateLimit` (IETF httpapi draft).
    pub ietf: bool,
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset` (names configurable).
    pub legacy: bool,
    /// `Retry-After` (seconds) on 429.
    pub retry_after: bool,
}

impl HeaderSet {
    pub const NAMES: &'static str = "ietf, legacy, retry-after, none";

    /// Turns on the set called `name`; false for an unknown name.
    pub fn enable(&mut self, name: &str) -> bool {
        match name {
            "ietf" => self.ietf = true,
            "legacy" => self.legacy = true,
            "retry-after" => self.retry_after = true,
            "none" => {}
            _ => return false,
        }
        true
    }
}

impl fmt::Display for HeaderSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.ietf, "ietf"),
            (self.legacy, "legacy"),
            (self.retry_after, "retry-after"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// A 429 body template and its content type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Body {
    pub template: String,
    pub content_type: String,
}
