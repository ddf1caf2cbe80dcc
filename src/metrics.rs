//! Service metrics, exported on the admin port's `/metrics` in Prometheus text format.
//!
//! Per-rule names and labels follow envoyproxy/ratelimit's stats as its Prometheus
//! exporter spells them (`ratelimit_service_rate_limit_<stat>{domain, key1, key2}`), with
//! the whole key in `key` besides, so existing dashboards and alerts keep working. Labels
//! are per rule (bounded by the config), never per request value — except for rules with
//! `detailed_metric` or `value_to_metric` (request values in the key, as
//! envoyproxy/ratelimit writes them), each capped at `KEYS_WITH_VALUES_CAP` series a rule;
//! series idle for `IDLE_KEYED_SERIES_MILLIS` make room for new keys at the cap.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;

use crate::connections::ConnectionCounts;
use crate::matcher::RateLimitConfig;
use crate::prometheus_mapping::{ObserverType, PrometheusMapping, StatKind};
use crate::sliding_quantiles::SlidingQuantiles;

/// Distinct keys with request values tracked per `detailed_metric` or `value_to_metric`
/// rule; hits under further keys count in the rule's own series.
pub const KEYS_WITH_VALUES_CAP: usize = 1_000;

/// A key with request values not hit for this long gives up its series to a new key once
/// the rule is at `KEYS_WITH_VALUES_CAP`, so the series follow the values in use (the
/// users active now, not the first thousand since the start). Long enough that every
/// scrape and statsd push has taken the series' last hits before it goes.
pub const IDLE_KEYED_SERIES_MILLIS: u64 = 10 * 60_000;

/// Distinct unknown domains counted by name; requests for further ones count under
/// `UNKNOWN_DOMAINS_OTHER`. A domain is the client's to write, so it is not trusted to be
/// few.
pub const UNKNOWN_DOMAINS_CAP: usize = 100;
const UNKNOWN_DOMAINS_OTHER: &str = "(other)";

/// The last part of the path overrides' counters go under past the cap: not a key a
/// config's descriptor would have.
const OVERRIDES: &str = "(override)";

/// How often a rule at the cap looks for idle series: a look walks every series under the
/// rule's lock, so a flood of new values must not make one per request.
const IDLE_SWEEP_EVERY_MILLIS: u64 = 1_000;

/// envoyproxy/ratelimit's statsd name for every ShouldRateLimit call's time (a timer).
pub const RESPONSE_TIME_STAT: &str = "ratelimit_server.ShouldRateLimit.response_time";

/// The six envoyproxy/ratelimit counters of one rule (or one key with request values).
#[derive(Debug, Default)]
pub struct HitCounters {
    pub total_hits: AtomicU64,
    pub over_limit: AtomicU64,
    pub near_limit: AtomicU64,
    /// The part of `over_limit` the Redis store's local over-limit cache answered.
    pub over_limit_with_local_cache: AtomicU64,
    pub within_limit: AtomicU64,
    pub shadow_mode: AtomicU64,
}

/// What one descriptor's decision adds to its rule's counters.
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub hits: u64,
    pub over_limit: bool,
    pub near_limit: bool,
    pub shadow: bool,
    /// Answered by the local over-limit cache (over the limit, without asking Redis).
    pub local_cache: bool,
}

impl HitCounters {
    fn record(&self, hit: &Hit) {
        let add = |counter: &AtomicU64| counter.fetch_add(hit.hits, Ordering::Relaxed);
        add(&self.total_hits);
        if hit.over_limit {
            add(&self.over_limit);
            if hit.local_cache {
                add(&self.over_limit_with_local_cache);
            }
            if hit.shadow {
                add(&self.shadow_mode);
            }
        } else {
            add(&self.within_limit);
            if hit.near_limit {
                add(&self.near_limit);
            }
        }
    }

    /// The counter called `stat` (`total_hits`, …), 0 for an unknown name.
    fn get(&self, stat: &str) -> u64 {
        self.values()
            .iter()
            .find(|(name, _)| *name == stat)
            .map_or(0, |(_, value)| *value)
    }

    fn values(&self) -> [(&'static str, u64); 6] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("total_hits", load(&self.total_hits)),
            ("over_limit", load(&self.over_limit)),
            ("near_limit", load(&self.near_limit)),
            (
                "over_limit_with_local_cache",
                load(&self.over_limit_with_local_cache),
            ),
            ("within_limit", load(&self.within_limit)),
            ("shadow_mode", load(&self.shadow_mode)),
        ]
    }
}

/// A rule's counters; they outlive reloads as long as the rule keeps its path.
#[derive(Debug, Default)]
pub struct RuleStats {
    counters: HitCounters,
    /// `value_to_metric` and `detailed_metric`: counters by metric key with the request's
    /// values in it.
    by_key: Mutex<KeyedSeries>,
    /// Whether idle keyed series are dropped. Not under a statsd_exporter mapping: its
    /// series add up the stats mapped to them, and one that lost a part would go down,
    /// which Prometheus reads as a counter reset.
    keep_idle_series: AtomicBool,
}

/// A rule's series with request values in their keys.
#[derive(Debug, Default)]
struct KeyedSeries {
    series: HashMap<String, Keyed>,
    /// When the rule, at the cap, may next look for idle series.
    next_sweep_millis: u64,
}

#[derive(Debug)]
struct Keyed {
    counters: Arc<HitCounters>,
    last_hit_millis: u64,
}

impl KeyedSeries {
    /// The counters of `key`, made if there is room (after dropping idle series when
    /// `drop_idle`); `None` when the rule is full.
    fn counters(
        &mut self,
        key: &str,
        now_millis: u64,
        drop_idle: bool,
    ) -> Option<Arc<HitCounters>> {
        if let Some(keyed) = self.series.get_mut(key) {
            keyed.last_hit_millis = keyed.last_hit_millis.max(now_millis);
            return Some(keyed.counters.clone());
        }
        if self.series.len() >= KEYS_WITH_VALUES_CAP {
            if !drop_idle || now_millis < self.next_sweep_millis {
                return None;
            }
            self.next_sweep_millis = now_millis + IDLE_SWEEP_EVERY_MILLIS;
            self.series.retain(|_, keyed| {
                now_millis.saturating_sub(keyed.last_hit_millis) < IDLE_KEYED_SERIES_MILLIS
            });
            if self.series.len() >= KEYS_WITH_VALUES_CAP {
                return None;
            }
        }
        let counters = Arc::new(HitCounters::default());
        self.series.insert(
            key.to_owned(),
            Keyed {
                counters: counters.clone(),
                last_hit_millis: now_millis,
            },
        );
        Some(counters)
    }
}

impl RuleStats {
    pub fn record(&self, hit: &Hit) {
        self.counters.record(hit);
    }

    /// Records a `value_to_metric` or `detailed_metric` hit under `key` instead of the
    /// rule's own series, as envoyproxy/ratelimit does. Past the cap, new keys count in the
    /// rule's own series until idle ones make room.
    pub fn record_keyed(&self, hit: &Hit, key: &str, now_millis: u64) {
        let drop_idle = !self.keep_idle_series.load(Ordering::Relaxed);
        let counters = self.by_key.lock().counters(key, now_millis, drop_idle);
        counters.as_deref().unwrap_or(&self.counters).record(hit);
    }

    /// Calls `f` with each series of this rule whose path without its domain is `key`:
    /// its own, then each key with request values in it.
    fn each_series(&self, key: &str, mut f: impl FnMut(&str, &HitCounters)) {
        f(key, &self.counters);
        for (by_key, keyed) in self.by_key.lock().series.iter() {
            f(by_key, &keyed.counters);
        }
    }
}

/// A histogram with fixed buckets, lock-free to observe.
#[derive(Debug)]
pub struct Histogram {
    bounds: Box<[f64]>,
    /// One per bound, and one more for what took longer than the last.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self::with_bounds(LATENCY_BUCKETS.into())
    }
}

impl Histogram {
    /// A histogram with upper bounds `bounds`, in seconds, increasing.
    pub fn with_bounds(bounds: Box<[f64]>) -> Self {
        Self {
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let i =
            (self.bounds.iter().position(|bound| seconds <= *bound)).unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Each bucket as (its middle in milliseconds, the calls in it); the last, of calls
    /// slower than the last bound, at that bound: statsd's timers take values, not ranges.
    pub fn millis_buckets(&self) -> Vec<(f64, u64)> {
        let mut lower = 0.0;
        let middles = self.bounds.iter().map(|&upper| {
            let middle = (lower + upper) / 2.0;
            lower = upper;
            middle
        });
        let slowest = self.bounds.last().copied().unwrap_or(0.0);
        (middles.chain([slowest]).zip(&self.buckets))
            .map(|(seconds, calls)| (seconds * 1e3, calls.load(Ordering::Relaxed)))
            .collect()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        self.render_labeled(out, name, help, "");
    }

    /// `labels` (`key="value"`, or empty) go on every series.
    fn render_labeled(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        self.render_scaled(out, name, help, labels, 1.0);
    }

    /// As `render_labeled`, with bounds and sum in seconds times `scale`.
    fn render_scaled(&self, out: &mut String, name: &str, help: &str, labels: &str, scale: f64) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let (braces, comma) = braces(labels);
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            // Rounded: 0.000025 * 1000 is 0.025000000000000001 in binary.
            let bound = (bound * scale * 1e9).round() / 1e9;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{comma}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{comma}le=\"+Inf\"}} {count}");
        self.render_sum_and_count(out, name, &braces, scale);
    }

    /// As a summary: `quantiles`' values over their window, and the count and sum since the
    /// start, in seconds times `scale`. Quantiles with no sample in their window are NaN,
    /// as Prometheus' client libraries give them.
    fn render_summary(
        &self,
        out: &mut String,
        (name, help, labels): (&str, &str, &str),
        quantiles: Option<&SlidingQuantiles>,
        scale: f64,
    ) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
        let (braces, comma) = braces(labels);
        if let Some(quantiles) = quantiles {
            let values = quantiles.values_micros();
            for (i, quantile) in quantiles.quantiles().iter().enumerate() {
                let value = values
                    .as_ref()
                    .and_then(|values| values.get(i))
                    .map_or(f64::NAN, |micros| micros / 1e6 * scale);
                let _ = writeln!(
                    out,
                    "{name}{{{labels}{comma}quantile=\"{quantile}\"}} {value}"
                );
            }
        }
        self.render_sum_and_count(out, name, &braces, scale);
    }

    fn render_sum_and_count(&self, out: &mut String, name: &str, braces: &str, scale: f64) {
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9 * scale;
        let _ = writeln!(
            out,
            "{name}_sum{braces} {sum}\n{name}_count{braces} {count}"
        );
    }
}

/// `{labels}` and the comma that joins more labels to them; both empty without labels.
fn braces(labels: &str) -> (String, &'static str) {
    if labels.is_empty() {
        (String::new(), "")
    } else {
        (format!("{{{labels}}}"), ",")
    }
}

const MAPPED_HELP: &str = "envoyproxy/ratelimit stats, named by PROMETHEUS_MAPPER_YAML.";
const MAPPED_TIMER_HELP: &str =
    "Time to decide one ShouldRateLimit call, named by PROMETHEUS_MAPPER_YAML.";

/// `name="value",…` in the order given (empty without labels), for `braces`.
fn label_pairs(labels: &[(String, String)]) -> String {
    let pairs: Vec<String> = (labels.iter())
        .map(|(label, value)| format!("{label}=\"{}\"", escape(value)))
        .collect();
    pairs.join(",")
}

/// A HELP line's text may not hold a line break or a lone backslash.
fn help_text(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A rule's identity across reloads: its domain and path.
type RuleId = (Box<str>, Box<str>);

/// A value read at each scrape: its name, help, Prometheus type and reader.
type Gauge = (
    &'static str,
    &'static str,
    Scraped,
    Box<dyn Fn() -> u64 + Send + Sync>,
);

/// The Prometheus type of a value read at each scrape: a running total is a `counter`, so
/// that `rate()` over it is what its type says.
#[derive(Debug, Clone, Copy)]
pub enum Scraped {
    Gauge,
    Counter,
}

impl std::fmt::Display for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scraped::Gauge => "gauge",
            Scraped::Counter => "counter",
        })
    }
}

#[derive(Default)]
pub struct Metrics {
    pub config_load_success: AtomicU64,
    pub config_load_error: AtomicU64,
    /// A hash of the loaded files' bytes: replicas serving the same config show the same value.
    pub config_hash: AtomicU64,
    pub decision_latency: Histogram,
    pub store_latency: Histogram,
    pub store_errors: AtomicU64,
    /// Requests answered over the limit from a store's local cache without a round trip.
    pub local_cache_hits: AtomicU64,
    /// Requests turned away by a domain's shared capacity.
    pub shed: AtomicU64,
    /// Resets of a descriptor's limits through the admin port (`DELETE /v1/usage`).
    pub resets: AtomicU64,
    /// Over-limit answers turned to OK by global shadow mode.
    pub global_shadow_mode: AtomicU64,
    /// Spans the OTLP collector took, and spans lost to a full queue or a failed export.
    pub spans_exported: AtomicU64,
    pub spans_dropped: AtomicU64,
    /// The gRPC port's client connections.
    pub connections: Arc<ConnectionCounts>,
    rules: Mutex<HashMap<RuleId, Arc<RuleStats>>>,
    /// Requests for a domain no config defines, by domain: answered OK with no limits
    /// (as envoyproxy/ratelimit answers them), which is what a typo in Envoy's `domain`
    /// looks like.
    unknown_domains: Mutex<BTreeMap<String, u64>>,
    gauges: Mutex<Vec<Gauge>>,
    /// How the metrics envoyproxy/ratelimit also has are named; a mapping file that
    /// changes is swapped in while serving.
    names: ArcSwap<EnvoyproxyNames>,
    /// The decision latency again, in the bucket bounds a statsd_exporter mapping gives the
    /// response time (`buckets`); none without such a mapping. A mapping that changes
    /// starts a new one, as the series it names are new.
    mapped_latency: ArcSwapOption<Histogram>,
    /// The decision latency's quantiles over a sliding window, when a statsd_exporter
    /// mapping exports the response time as a summary.
    mapped_quantiles: ArcSwapOption<SlidingQuantiles>,
    /// Whether either of the two above is kept: without a mapping, a decision looks at this
    /// flag rather than load both.
    mapped_timer: AtomicBool,
}

/// The names under which the metrics envoyproxy/ratelimit also exports are served.
#[derive(Debug, Clone, Default)]
pub enum EnvoyproxyNames {
    /// Those of its built-in Prometheus mapping.
    #[default]
    Builtin,
    /// Those, with `ratelimit_service_response_time_seconds` in milliseconds, as before it
    /// fixed the unit (PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS).
    BuiltinInMilliseconds,
    /// Those an operator's statsd_exporter mapping gives (PROMETHEUS_MAPPER_YAML).
    Mapped(Box<PrometheusMapping>),
}

impl Metrics {
    /// Metrics whose envoyproxy/ratelimit metrics are named as `names` says.
    pub fn with_names(names: EnvoyproxyNames) -> Self {
        let metrics = Self::default();
        metrics.set_names(names);
        metrics
    }

    /// Names the metrics envoyproxy/ratelimit also has as `names` says from the next scrape.
    pub fn set_names(&self, names: EnvoyproxyNames) {
        let timer = match &names {
            EnvoyproxyNames::Mapped(mapping) => mapping.map(RESPONSE_TIME_STAT, StatKind::Observer),
            _ => None,
        };
        let bounds: Option<Box<[f64]>> = timer
            .as_ref()
            .filter(|timer| timer.observer == ObserverType::Histogram)
            .and_then(|timer| {
                // Bounds in the mapping's unit (milliseconds times `scale`) as seconds, the
                // unit observations are compared in.
                let per_second = 1e3 * timer.scale;
                Some(
                    timer
                        .buckets
                        .as_ref()?
                        .iter()
                        .map(|b| b / per_second)
                        .collect(),
                )
            });
        let summary = timer.filter(|timer| timer.observer == ObserverType::Summary);
        self.mapped_timer
            .store(bounds.is_some() || summary.is_some(), Ordering::Release);
        self.mapped_latency
            .store(bounds.map(|bounds| Arc::new(Histogram::with_bounds(bounds))));
        self.mapped_quantiles
            .store(summary.map(|timer| Arc::new(SlidingQuantiles::new(timer.summary))));
        self.names.store(Arc::new(names));
        let mapped = self.mapped();
        for stats in self.rules.lock().values() {
            stats.keep_idle_series.store(mapped, Ordering::Relaxed);
        }
    }

    /// Whether a statsd_exporter mapping names the metrics.
    fn mapped(&self) -> bool {
        matches!(**self.names.load(), EnvoyproxyNames::Mapped(_))
    }

    /// Records how long a decision took.
    pub fn observe_decision(&self, elapsed: Duration) {
        self.decision_latency.observe(elapsed);
        if !self.mapped_timer.load(Ordering::Acquire) {
            return;
        }
        if let Some(mapped) = &*self.mapped_latency.load() {
            mapped.observe(elapsed);
        }
        if let Some(quantiles) = &*self.mapped_quantiles.load() {
            quantiles.observe(elapsed);
        }
    }

    /// Gives every rule of a freshly loaded config its counters, reusing those of rules with
    /// the same domain and path so counts continue across reloads.
    pub fn attach(&self, config: &RateLimitConfig) {
        let mut rules = self.rules.lock();
        for domain in config.domains() {
            for rule in domain.rules() {
                let stats = self.stats_in(&mut rules, &domain.name, &rule.path);
                let _ = rule.stats.set(stats);
            }
        }
    }

    /// Counts a request for `domain`, which no config defines. True the first time the
    /// domain is seen, so the caller can say so once in the log.
    pub fn record_unknown_domain(&self, domain: &str) -> bool {
        let mut unknown = self.unknown_domains.lock();
        if let Some(count) = unknown.get_mut(domain) {
            *count += 1;
            return false;
        }
        let name = if unknown.len() < UNKNOWN_DOMAINS_CAP {
            domain
        } else {
            UNKNOWN_DOMAINS_OTHER
        };
        let count = unknown.entry(name.to_owned()).or_default();
        *count += 1;
        *count == 1
    }

    /// The counters of the requests in `domain` that carried their own `limit` (Envoy's
    /// override): each under its descriptor's entries with their values, as
    /// envoyproxy/ratelimit names them (`<domain>.<key>_<value>…`); past the cap of such
    /// keys, under `<domain>.(override)`.
    pub fn override_stats(&self, domain: &str) -> Arc<RuleStats> {
        let path = format!("{domain}.{OVERRIDES}");
        self.stats_in(&mut self.rules.lock(), domain, &path)
    }

    fn stats_in(
        &self,
        rules: &mut HashMap<RuleId, Arc<RuleStats>>,
        domain: &str,
        path: &str,
    ) -> Arc<RuleStats> {
        rules
            .entry((domain.into(), path.into()))
            .or_insert_with(|| {
                let stats = RuleStats::default();
                stats
                    .keep_idle_series
                    .store(self.mapped(), Ordering::Relaxed);
                Arc::new(stats)
            })
            .clone()
    }

    /// Adds a value read when `/metrics` is scraped: a gauge (e.g. the memory store's
    /// entry count) or a running total kept elsewhere (e.g. its evictions).
    pub fn scraped(
        &self,
        kind: Scraped,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.gauges.lock().push((name, help, kind, Box::new(read)));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let envoyproxy_counters = [
            (
                "ratelimit_service_config_load_success",
                "Config loads that succeeded.",
                &self.config_load_success,
            ),
            (
                "ratelimit_service_config_load_error",
                "Config loads that failed; the previous config kept serving.",
                &self.config_load_error,
            ),
            (
                "ratelimit_service_global_shadow_mode",
                "Requests answered OK only because of global shadow mode (--global-shadow-mode).",
                &self.global_shadow_mode,
            ),
        ];
        let names = self.names.load();
        let mapping = match &**names {
            EnvoyproxyNames::Mapped(mapping) => Some(mapping),
            _ => None,
        };
        // A mapping names these from their statsd names, with the rule counters, below.
        let envoyproxy_counters = match mapping {
            Some(_) => &envoyproxy_counters[..0],
            None => &envoyproxy_counters[..],
        };
        let counters = [
            (
                "meshlimit_store_errors_total",
                "Counter store calls that failed.",
                &self.store_errors,
            ),
            (
                "meshlimit_local_cache_hits_total",
                "Over-limit answers served from the local cache without a store round trip.",
                &self.local_cache_hits,
            ),
            (
                "meshlimit_shed_total",
                "Requests turned away by a domain's shared capacity.",
                &self.shed,
            ),
            (
                "meshlimit_limit_resets_total",
                "Resets of a descriptor's limits through the admin port (DELETE /v1/usage).",
                &self.resets,
            ),
            (
                "meshlimit_trace_spans_exported_total",
                "Spans the OTLP collector took.",
                &self.spans_exported,
            ),
            (
                "meshlimit_trace_spans_dropped_total",
                "Spans lost to a full export queue or a failed export; decisions are not affected.",
                &self.spans_dropped,
            ),
            (
                "meshlimit_grpc_connections_opened_total",
                "gRPC client connections accepted.",
                &self.connections.opened,
            ),
            (
                "meshlimit_grpc_connections_rotated_total",
                "gRPC connections asked to reconnect at their age (--max-connection-age).",
                &self.connections.rotated,
            ),
            (
                "meshlimit_grpc_connections_cut_total",
                "gRPC connections closed with requests running at the end of --max-connection-age-grace.",
                &self.connections.cut,
            ),
        ];
        for &(name, help, value) in envoyproxy_counters.iter().chain(&counters) {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshlimit_grpc_connections gRPC client connections open.\n# TYPE meshlimit_grpc_connections gauge\nmeshlimit_grpc_connections {}",
            self.connections.open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshlimit_config_hash Hash of the loaded config files.\n# TYPE meshlimit_config_hash gauge\nmeshlimit_config_hash {}",
            self.config_hash.load(Ordering::Relaxed)
        );
        for (name, help, kind, read) in self.gauges.lock().iter() {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                read()
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshlimit_unknown_domain_requests_total Requests for a domain no config defines, answered OK with no limits (envoyproxy/ratelimit's domain_not_found).\n# TYPE meshlimit_unknown_domain_requests_total counter"
        );
        for (domain, count) in self.unknown_domains.lock().iter() {
            let _ = writeln!(
                out,
                "meshlimit_unknown_domain_requests_total{{domain=\"{}\"}} {count}",
                escape(domain)
            );
        }
        self.decision_latency.render(
            &mut out,
            "meshlimit_decision_duration_seconds",
            "Time to decide one ShouldRateLimit call.",
        );
        if mapping.is_none() {
            self.render_envoyproxy_service(&mut out);
        }
        self.store_latency.render(
            &mut out,
            "meshlimit_store_duration_seconds",
            "Time of one counter store call.",
        );
        match mapping {
            Some(mapping) => self.render_mapped(&mut out, mapping),
            None => self.render_rules(&mut out),
        }
        out
    }

    /// envoyproxy/ratelimit's stats under the names and labels `mapping` gives their
    /// statsd names, as its Prometheus exporter serves them with PROMETHEUS_MAPPER_YAML.
    /// Stats mapped to the same series add up, as they would in statsd_exporter.
    fn render_mapped(&self, out: &mut String, mapping: &PrometheusMapping) {
        let mut families: BTreeMap<String, (String, BTreeMap<String, u64>)> = BTreeMap::new();
        for (stat, value) in self.statsd_counters() {
            let Some(series) = mapping.map_remembered(&stat, StatKind::Counter) else {
                continue;
            };
            let (_, family) = families.entry(series.name.clone()).or_insert_with(|| {
                let help = series.help.as_deref().unwrap_or(MAPPED_HELP);
                (help_text(help), BTreeMap::new())
            });
            let labels = braces(&label_pairs(&series.labels)).0;
            *family.entry(labels).or_default() += value;
        }
        for (name, (help, family)) in &families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in family {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }
        let Some(timer) = mapping.map(RESPONSE_TIME_STAT, StatKind::Observer) else {
            return;
        };
        // One name, one type: a timer mapped onto a counter's name is left out rather than
        // break the scrape.
        if families.contains_key(&timer.name) {
            return;
        }
        let help = help_text(timer.help.as_deref().unwrap_or(MAPPED_TIMER_HELP));
        let labels = label_pairs(&timer.labels);
        // statsd timers are in milliseconds; the mapping's `scale` multiplies those.
        let scale = 1e3 * timer.scale;
        match timer.observer {
            ObserverType::Histogram => {
                let mapped = self.mapped_latency.load();
                let histogram = match &*mapped {
                    Some(mapped) if timer.buckets.is_some() => mapped,
                    _ => &self.decision_latency,
                };
                histogram.render_scaled(out, &timer.name, &help, &labels, scale);
            }
            ObserverType::Summary => {
                let quantiles = self.mapped_quantiles.load();
                (self.decision_latency).render_summary(
                    out,
                    (&timer.name, &help, &labels),
                    quantiles.as_deref(),
                    scale,
                );
            }
        }
    }

    /// The call counts, times and errors again under the names envoyproxy/ratelimit's
    /// Prometheus mapping gives them, so dashboards and alerts written for it keep working.
    fn render_envoyproxy_service(&self, out: &mut String) {
        const METHOD: &str = "grpc_method=\"ShouldRateLimit\"";
        let calls = self.decision_latency.count.load(Ordering::Relaxed);
        let errors = self.store_errors.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ratelimit_service_total_requests ShouldRateLimit calls (meshlimit_decision_duration_seconds_count).\n\
             # TYPE ratelimit_service_total_requests counter\n\
             ratelimit_service_total_requests{{{METHOD}}} {calls}\n\
             # HELP ratelimit_service_should_rate_limit_error Counter store calls that failed (meshlimit_store_errors_total).\n\
             # TYPE ratelimit_service_should_rate_limit_error counter\n\
             ratelimit_service_should_rate_limit_error{{err_type=\"redis_error\"}} {errors}"
        );
        let in_milliseconds = matches!(**self.names.load(), EnvoyproxyNames::BuiltinInMilliseconds);
        let (scale, help) = if in_milliseconds {
            (
                1e3,
                "Time to decide one ShouldRateLimit call, in milliseconds (PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS).",
            )
        } else {
            (
                1.0,
                "Time to decide one ShouldRateLimit call (meshlimit_decision_duration_seconds).",
            )
        };
        self.decision_latency.render_scaled(
            out,
            "ratelimit_service_response_time_seconds",
            help,
            METHOD,
            scale,
        );
    }

    /// Every counter under envoyproxy/ratelimit's statsd name, with its value: the service's
    /// (`ratelimit.service.config_load_success`, …) and each rule's
    /// (`ratelimit.service.rate_limit.<domain>.<key>.<stat>`, the key with the request's
    /// values for `detailed_metric` and `value_to_metric`). For `statsd`, which sends what
    /// changed.
    pub fn statsd_counters(&self) -> Vec<(String, u64)> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = vec![
            (
                "ratelimit.service.config_load_success".to_owned(),
                load(&self.config_load_success),
            ),
            (
                "ratelimit.service.config_load_error".to_owned(),
                load(&self.config_load_error),
            ),
            (
                "ratelimit.service.global_shadow_mode".to_owned(),
                load(&self.global_shadow_mode),
            ),
            // envoyproxy/ratelimit's only store is Redis: its name for a failed store call.
            (
                "ratelimit.service.call.should_rate_limit.redis_error".to_owned(),
                load(&self.store_errors),
            ),
            (
                "ratelimit_server.ShouldRateLimit.total_requests".to_owned(),
                load(&self.decision_latency.count),
            ),
        ];
        let rules = self.rules.lock();
        for ((domain, path), stats) in rules.iter() {
            stats.each_series(rule_key(domain, path), |key, counters| {
                for (stat, value) in counters.values() {
                    out.push((
                        format!("ratelimit.service.rate_limit.{domain}.{key}.{stat}"),
                        value,
                    ));
                }
            });
        }
        for (domain, count) in self.unknown_domains.lock().iter() {
            out.push((
                format!("ratelimit.service.rate_limit.{domain}.domain_not_found"),
                *count,
            ));
        }
        out
    }

    fn render_rules(&self, out: &mut String) {
        let rules = self.rules.lock();
        let mut sorted: Vec<_> = rules.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        for (stat, help) in [
            ("total_hits", "Hits counted against the rule."),
            ("over_limit", "Hits over the rule's limit."),
            (
                "near_limit",
                "Hits past NEAR_LIMIT_RATIO of the rule's limit.",
            ),
            (
                "over_limit_with_local_cache",
                "Hits over the limit answered by the local over-limit cache, without Redis.",
            ),
            ("within_limit", "Hits within the rule's limit."),
            (
                "shadow_mode",
                "Hits over the limit let through by the rule's shadow mode.",
            ),
        ] {
            let name = format!("ratelimit_service_rate_limit_{stat}");
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((domain, path), stats) in &sorted {
                stats.each_series(rule_key(domain, path), |key, counters| {
                    let _ = writeln!(
                        out,
                        "{name}{{domain=\"{}\",{}}} {}",
                        escape(domain),
                        key_labels(key),
                        counters.get(stat)
                    );
                });
            }
        }
    }
}

/// `key="…"`, then `key1` and `key2`: the first two parts of the key, as
/// envoyproxy/ratelimit's Prometheus mapping labels its rule counters (from their statsd
/// names, `ratelimit.service.rate_limit.<domain>.<key1>.<key2>[.<more>].<stat>`), so
/// dashboards selecting on `key1`/`key2` find the same series here.
fn key_labels(key: &str) -> String {
    let mut labels = format!("key=\"{}\"", escape(key));
    let mut parts = key.split('.');
    if let Some(key1) = parts.next() {
        let _ = write!(labels, ",key1=\"{}\"", escape(key1));
    }
    if let Some(key2) = parts.next() {
        let _ = write!(labels, ",key2=\"{}\"", escape(key2));
    }
    labels
}

/// The rule path without its domain, as envoyproxy/ratelimit names its stats:
/// `user.path_/admin`.
fn rule_key<'p>(domain: &str, path: &'p str) -> &'p str {
    path.strip_prefix(domain)
        .map_or(path, |k| k.trim_start_matches('.'))
}

/// Escapes a Prometheus label value.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_domains_past_the_cap_count_together_and_each_is_new_once() {
        let metrics = Metrics::default();
        assert!(metrics.record_unknown_domain("d0"));
        assert!(!metrics.record_unknown_domain("d0"));
        for i in 1..UNKNOWN_DOMAINS_CAP + 50 {
            metrics.record_unknown_domain(&format!("d{i}"));
        }
        let text = metrics.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("meshlimit_unknown_domain_requests_total{"))
            .count();
        assert_eq!(series, UNKNOWN_DOMAINS_CAP + 1, "{text}");
        assert!(text.contains("meshlimit_unknown_domain_requests_total{domain=\"d0\"} 2\n"));
        assert!(
            text.contains("meshlimit_unknown_domain_requests_total{domain=\"(other)\"} 50\n"),
            "{text}"
        );
    }

    #[test]
    fn latency_buckets_read_as_their_middles_and_the_slowest_as_the_last_bound() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(30));
        histogram.observe(Duration::from_micros(40));
        histogram.observe(Duration::from_secs(2));
        let buckets = histogram.millis_buckets();
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
        let filled: Vec<(f64, u64)> = buckets.into_iter().filter(|b| b.1 > 0).collect();
        // 30 and 40 µs fall in (25 µs, 50 µs]; 2 s is past the last bound, 1 s.
        assert_eq!(filled.len(), 2, "{filled:?}");
        assert!(
            (filled[0].0 - 0.0375).abs() < 1e-9 && filled[0].1 == 2,
            "{filled:?}"
        );
        assert_eq!(filled[1], (1000.0, 1));
        // The Prometheus rendering still counts the slow call only in +Inf.
        let mut out = String::new();
        histogram.render(&mut out, "t", "help");
        assert!(out.contains("t_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"+Inf\"} 3\n"), "{out}");
    }

    #[test]
    fn calls_times_and_errors_are_also_under_envoyproxys_prometheus_names() {
        let metrics = Metrics::default();
        for micros in [30, 40, 2_000] {
            metrics
                .decision_latency
                .observe(Duration::from_micros(micros));
        }
        metrics.store_errors.fetch_add(2, Ordering::Relaxed);
        let text = metrics.render();
        for line in [
            "ratelimit_service_total_requests{grpc_method=\"ShouldRateLimit\"} 3\n",
            "ratelimit_service_should_rate_limit_error{err_type=\"redis_error\"} 2\n",
            "ratelimit_service_response_time_seconds_bucket{grpc_method=\"ShouldRateLimit\",le=\"0.00005\"} 2\n",
            "ratelimit_service_response_time_seconds_bucket{grpc_method=\"ShouldRateLimit\",le=\"+Inf\"} 3\n",
            "ratelimit_service_response_time_seconds_count{grpc_method=\"ShouldRateLimit\"} 3\n",
            "meshlimit_decision_duration_seconds_count 3\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn response_time_in_milliseconds_scales_bounds_and_sum_of_envoyproxys_histogram_only() {
        let metrics = Metrics::with_names(EnvoyproxyNames::BuiltinInMilliseconds);
        metrics.decision_latency.observe(Duration::from_micros(40));
        let text = metrics.render();
        for line in [
            // 40 µs is 0.04 ms: counted at the 0.05 ms bound, summed as 0.04.
            "ratelimit_service_response_time_seconds_bucket{grpc_method=\"ShouldRateLimit\",le=\"0.025\"} 0\n",
            "ratelimit_service_response_time_seconds_bucket{grpc_method=\"ShouldRateLimit\",le=\"0.05\"} 1\n",
            "ratelimit_service_response_time_seconds_bucket{grpc_method=\"ShouldRateLimit\",le=\"1000\"} 1\n",
            "ratelimit_service_response_time_seconds_sum{grpc_method=\"ShouldRateLimit\"} 0.04\n",
            // meshlimit's own stays in seconds.
            "meshlimit_decision_duration_seconds_bucket{le=\"0.00005\"} 1\n",
            "meshlimit_decision_duration_seconds_sum 0.00004\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }

    /// envoyproxy/ratelimit's statsd mapping for rule counters, with a capture per part.
    const MAPPER: &str = r#"
mappings:
  - match: ratelimit.service.rate_limit.*.*.*
    name: rl_$3
    labels: {domain: $1, descriptor: $2}
  - match: 'ratelimit\.service\.rate_limit\.([^.]+)\.(.+)\.([a-z_]+)$'
    match_type: regex
    name: rl_$3
    labels: {domain: $1, descriptor: long}
  - match: ratelimit.service.config_load_*
    action: drop
  - match: ratelimit_server.*.response_time
    name: rl_response_time_seconds
    observer_type: histogram
    scale: 0.001
    labels: {method: $1}
    help: "Time of a call\nin seconds."
"#;

    fn mapped_metrics() -> Metrics {
        let mapping = PrometheusMapping::parse("mapper.yaml", MAPPER).unwrap();
        let metrics = Metrics::with_names(EnvoyproxyNames::Mapped(Box::new(mapping)));
        let over = Hit {
            hits: 1,
            over_limit: true,
            near_limit: false,
            shadow: false,
            local_cache: false,
        };
        let within = Hit {
            over_limit: false,
            ..over
        };
        let mut rules = metrics.rules.lock();
        for (path, hits) in [
            ("web.user", [over, within, within]),
            ("web.user.path", [over; 3]),
        ] {
            let stats = Arc::new(RuleStats::default());
            hits.iter().for_each(|hit| stats.record(hit));
            rules.insert(("web".into(), path.into()), stats);
        }
        drop(rules);
        metrics.decision_latency.observe(Duration::from_micros(40));
        metrics.config_load_success.fetch_add(1, Ordering::Relaxed);
        metrics.global_shadow_mode.fetch_add(2, Ordering::Relaxed);
        metrics
    }

    #[test]
    fn a_mapping_file_names_envoyproxys_metrics_in_place_of_the_builtin_names() {
        let text = mapped_metrics().render();
        for line in [
            "# TYPE rl_over_limit counter\n",
            "rl_over_limit{descriptor=\"user\",domain=\"web\"} 1\n",
            "rl_within_limit{descriptor=\"user\",domain=\"web\"} 2\n",
            // Two parts of key: the glob (one part) passes it to the regex.
            "rl_over_limit{descriptor=\"long\",domain=\"web\"} 3\n",
            // No mapping: the statsd name, made a valid Prometheus name.
            "ratelimit_service_global_shadow_mode 2\n",
            "ratelimit_server_ShouldRateLimit_total_requests 1\n",
            // The timer's milliseconds times `scale`: seconds, with the mapping's help.
            "# HELP rl_response_time_seconds Time of a call\\nin seconds.\n",
            "# TYPE rl_response_time_seconds histogram\n",
            "rl_response_time_seconds_bucket{method=\"ShouldRateLimit\",le=\"0.00005\"} 1\n",
            "rl_response_time_seconds_sum{method=\"ShouldRateLimit\"} 0.00004\n",
            "rl_response_time_seconds_count{method=\"ShouldRateLimit\"} 1\n",
            // meshlimit's own metrics are not the mapping's to name.
            "meshlimit_decision_duration_seconds_count 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        for builtin in [
            "ratelimit_service_rate_limit_over_limit",
            "ratelimit_service_response_time_seconds",
            "ratelimit_service_total_requests",
            // Dropped by the mapping.
            "config_load_success",
        ] {
            assert!(!text.contains(builtin), "{builtin} in\n{text}");
        }
    }

    #[test]
    fn stats_mapped_to_one_series_add_up_and_a_summary_has_its_quantiles() {
        let mapping = PrometheusMapping::parse(
            "mapper.yaml",
            "mappings:\n  - match: ratelimit.service.rate_limit.*.*.*.*\n    name: rl_hits\n",
        )
        .unwrap();
        let metrics = Metrics::with_names(EnvoyproxyNames::Mapped(Box::new(mapping)));
        // No decision yet: statsd_exporter's quantiles, without a value.
        let text = metrics.render();
        assert!(
            text.contains(
                "ratelimit_server_ShouldRateLimit_response_time{quantile=\"0.99\"} NaN\n"
            ),
            "{text}"
        );
        let hit = Hit {
            hits: 2,
            over_limit: false,
            near_limit: false,
            shadow: false,
            local_cache: false,
        };
        let stats = Arc::new(RuleStats::default());
        stats.record(&hit);
        metrics
            .rules
            .lock()
            .insert(("web".into(), "web.a.b".into()), stats);
        for millis in [1, 2, 3, 3, 40] {
            metrics.observe_decision(Duration::from_millis(millis));
        }
        let text = metrics.render();
        // total_hits and within_limit of web.a.b land on one series: 2 + 2.
        assert!(text.contains("\nrl_hits 4\n"), "{text}");
        for line in [
            "# TYPE ratelimit_server_ShouldRateLimit_response_time summary\n",
            "ratelimit_server_ShouldRateLimit_response_time_sum 49\n",
            "ratelimit_server_ShouldRateLimit_response_time_count 5\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        // The quantiles of the five, in milliseconds, each within 1.6 %.
        for (quantile, expected) in [("0.5", 3.0), ("0.9", 40.0), ("0.99", 40.0)] {
            let series = format!(
                "ratelimit_server_ShouldRateLimit_response_time{{quantile=\"{quantile}\"}} "
            );
            let value: f64 = text
                .lines()
                .find_map(|line| line.strip_prefix(&series))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{text}"));
            assert!(
                (value - expected).abs() / expected < 0.016,
                "{quantile}: {value}"
            );
        }
        assert!(!text.contains("response_time_bucket"), "{text}");
    }

    /// envoyproxy/ratelimit's built-in Prometheus mapping, as facts.
    const ENVOYPROXY_MAPPING: &str =
        include_str!("../tests/fixtures/prometheus/envoyproxy_mapping.yaml");

    /// Every sample of `text` as (name, labels, value).
    fn samples(text: &str) -> Vec<(String, Vec<String>, String)> {
        (text.lines())
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .map(|l| l.trim_end_matches('"').to_owned());
                let labels = labels.filter(|l| !l.is_empty()).collect();
                Some((name.to_owned(), labels, value.to_owned()))
            })
            .collect()
    }

    /// A histogram mapping's `buckets` are the bounds served, in its unit (milliseconds
    /// times `scale`), counted from the decisions observed while it applies; without them
    /// meshlimit's own bounds stay, and a new mapping starts its counts afresh.
    #[test]
    fn a_histogram_mapping_s_buckets_are_the_bounds_served() {
        let with_buckets = |text: &str| {
            let mapping = PrometheusMapping::parse("mapper.yaml", text).unwrap();
            EnvoyproxyNames::Mapped(Box::new(mapping))
        };
        let metrics = Metrics::with_names(with_buckets(
            "mappings:\n  - match: ratelimit_server.*.response_time\n    name: rt_ms\n    observer_type: histogram\n    buckets: [0.05, 0.5, 5]\n",
        ));
        for micros in [40, 1_000, 20_000] {
            metrics.observe_decision(Duration::from_micros(micros));
        }
        let text = metrics.render();
        for line in [
            "rt_ms_bucket{le=\"0.05\"} 1\n",
            "rt_ms_bucket{le=\"0.5\"} 1\n",
            "rt_ms_bucket{le=\"5\"} 2\n",
            "rt_ms_bucket{le=\"+Inf\"} 3\n",
            "rt_ms_sum 21.04\n",
            "rt_ms_count 3\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert_eq!(text.matches("rt_ms_bucket").count(), 4, "{text}");

        // In seconds with `scale`, from `defaults`' histogram_options; a new mapping counts
        // from its start.
        metrics.set_names(with_buckets(
            "defaults:\n  observer_type: histogram\n  histogram_options: {buckets: [0.001, 0.01]}\nmappings:\n  - match: ratelimit_server.*.response_time\n    name: rt_seconds\n    scale: 0.001\n",
        ));
        metrics.observe_decision(Duration::from_micros(2_000));
        let text = metrics.render();
        for line in [
            "rt_seconds_bucket{le=\"0.001\"} 0\n",
            "rt_seconds_bucket{le=\"0.01\"} 1\n",
            "rt_seconds_bucket{le=\"+Inf\"} 1\n",
            "rt_seconds_count 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        // meshlimit's own histogram has every decision, in its own bounds.
        assert!(
            text.contains("meshlimit_decision_duration_seconds_count 4\n"),
            "{text}"
        );

        // No buckets written: meshlimit's bounds.
        metrics.set_names(with_buckets(
            "mappings:\n  - match: ratelimit_server.*.response_time\n    name: rt_plain\n    observer_type: histogram\n",
        ));
        let text = metrics.render();
        assert!(text.contains("rt_plain_bucket{le=\"0.01\"}"), "{text}");
        assert_eq!(
            text.matches("rt_plain_bucket").count(),
            LATENCY_BUCKETS.len() + 1
        );
    }

    /// The built-in names are those envoyproxy/ratelimit's own mapping gives: mapped by it
    /// through `prometheus_mapping`, every series of a rule's counters (keys of one, two
    /// and three parts), the calls, their time and the errors is among the built-in series
    /// with the same labels (the built-in ones add `key`) and value.
    #[test]
    fn the_builtin_names_are_what_envoyproxys_own_mapping_gives() {
        let fill = |metrics: &Metrics| {
            let hit = Hit {
                hits: 1,
                over_limit: true,
                near_limit: false,
                shadow: true,
                local_cache: false,
            };
            for (path, times) in [("web.user", 1), ("web.user.path_/a", 2), ("web.a.b.c", 3)] {
                let stats = Arc::new(RuleStats::default());
                (0..times).for_each(|_| stats.record(&hit));
                metrics
                    .rules
                    .lock()
                    .insert(("web".into(), path.into()), stats);
            }
            metrics.decision_latency.observe(Duration::from_micros(40));
            metrics.decision_latency.observe(Duration::from_millis(3));
            metrics.store_errors.fetch_add(2, Ordering::Relaxed);
            metrics.config_load_success.fetch_add(1, Ordering::Relaxed);
        };
        let builtin = Metrics::default();
        fill(&builtin);
        let mapping = PrometheusMapping::parse("default_mapper.yaml", ENVOYPROXY_MAPPING).unwrap();
        let mapped = Metrics::with_names(EnvoyproxyNames::Mapped(Box::new(mapping)));
        fill(&mapped);
        let builtin = samples(&builtin.render());
        let mapped: Vec<_> = (samples(&mapped.render()).into_iter())
            .filter(|(name, _, _)| name.starts_with("ratelimit_service_"))
            .collect();
        assert!(mapped.len() > 30, "{mapped:#?}");
        for (name, labels, value) in &mapped {
            let same = builtin.iter().any(|(n, l, v)| {
                n == name && v == value && labels.iter().all(|label| l.contains(label))
            });
            assert!(same, "{name}{labels:?} {value} is not among\n{builtin:#?}");
        }
        let over = |key2: &str| {
            let key2 = format!("key2=\"{key2}");
            (mapped.iter()).find(|(n, l, _)| {
                n == "ratelimit_service_rate_limit_over_limit" && l.contains(&key2)
            })
        };
        assert_eq!(over("path_/a").map(|s| s.2.as_str()), Some("2"));
        assert_eq!(over("b").map(|s| s.2.as_str()), Some("3"));
    }
}
