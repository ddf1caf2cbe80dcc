//! envoyproxy/ratelimit's `PROMETHEUS_MAPPER_YAML`: a statsd_exporter mapping file that
//! names the Prometheus metrics after the statsd names of the stats
//! (`ratelimit.service.rate_limit.<domain>.<key>.over_limit`, …). Operators who wrote one
//! for envoyproxy/ratelimit have dashboards and alerts on the names it gives; meshlimit
//! reads the same file so that they keep working.
//!
//! As statsd_exporter maps: glob mappings (`*` stands for any run of characters without a
//! dot) are tried first, in the order written, then regular expressions, unanchored as Go
//! matches them, in the order written; `$1`, `${1}` and `${name}` in `name` and `labels`
//! are the captures; `action: drop` exports nothing; `match_metric_type` limits a mapping
//! to counters or to the response-time timer (an `observer`); `scale` multiplies the
//! timer's milliseconds; a stat that no mapping matches keeps its statsd name with every
//! character Prometheus does not allow made `_`. With `glob_disable_ordering: true` the
//! glob with literal parts where another has `*` wins, whatever their order.
//!
//! A histogram gets the mapping's `buckets` (or `histogram_options.buckets`, or those of
//! `defaults`), else meshlimit's own bounds; a summary its `quantiles` over `max_age` in
//! `age_buckets` parts (statsd_exporter's 0.5, 0.9 and 0.99 over 10 minutes in 5 unless
//! written), estimated to within 1.6 % (`sliding_quantiles`). What differs is said at start
//! (`warnings`): native histograms are not served, `buf_cap` keeps nothing, `ttl` drops no
//! series.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use regex::{Captures, Regex};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_saphyr::Spanned;

use crate::config::{ConfigError, MAX_FILE_BYTES, yaml_error, yaml_options};
use crate::metrics::RESPONSE_TIME_STAT;
use crate::sliding_quantiles::SummaryShape;

/// What a stat is, for `match_metric_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatKind {
    Counter,
    Gauge,
    /// A timer; statsd_exporter still reads the older name `timer`.
    #[serde(alias = "timer")]
    Observer,
}

/// How a timer is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObserverType {
    /// statsd_exporter's default.
    #[default]
    Summary,
    Histogram,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MatchType {
    #[default]
    Glob,
    Regex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    #[default]
    Map,
    Drop,
}

/// The file as written. Fields statsd_exporter reads but meshlimit cannot apply are read
/// so that a file written for it loads, and each is warned about; anything else is a typo.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    #[serde(default)]
    defaults: Option<Spanned<Defaults>>,
    #[serde(default)]
    mappings: Vec<Spanned<MappingEntry>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    match_type: Option<MatchType>,
    observer_type: Option<ObserverType>,
    /// The older name of `observer_type`.
    timer_type: Option<ObserverType>,
    #[serde(default)]
    glob_disable_ordering: bool,
    buckets: Option<Spanned<Vec<f64>>>,
    quantiles: Option<Spanned<Vec<Objective>>>,
    histogram_options: Option<Spanned<HistogramOptions>>,
    summary_options: Option<Spanned<SummaryOptions>>,
    ttl: Option<IgnoredAny>,
}

/// One quantile of a summary; its `error` (the rank error statsd_exporter allows) is read
/// and met more closely by meshlimit's buckets (`sliding_quantiles`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Objective {
    quantile: f64,
    #[serde(default)]
    #[allow(dead_code)]
    error: Option<IgnoredAny>,
}

/// statsd_exporter's `summary_options`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryOptions {
    quantiles: Option<Vec<Objective>>,
    max_age: Option<String>,
    age_buckets: Option<i64>,
    buf_cap: Option<IgnoredAny>,
}

/// statsd_exporter's `histogram_options`: its `buckets`, and the native-histogram settings
/// (which a classic histogram's scrape has no place for).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistogramOptions {
    buckets: Option<Vec<f64>>,
    native_histogram_bucket_factor: Option<IgnoredAny>,
    native_histogram_max_buckets: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingEntry {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    match_type: Option<MatchType>,
    observer_type: Option<ObserverType>,
    timer_type: Option<ObserverType>,
    action: Option<Action>,
    match_metric_type: Option<StatKind>,
    help: Option<String>,
    scale: Option<f64>,
    buckets: Option<Spanned<Vec<f64>>>,
    quantiles: Option<Spanned<Vec<Objective>>>,
    histogram_options: Option<Spanned<HistogramOptions>>,
    summary_options: Option<Spanned<SummaryOptions>>,
    ttl: Option<IgnoredAny>,
}

/// The fields written that statsd_exporter applies and meshlimit does not.
macro_rules! unapplied_fields {
    ($written:ident) => {
        impl $written {
            fn unapplied(&self) -> Vec<&'static str> {
                let native = self.histogram_options.as_ref().is_some_and(|options| {
                    options.value.native_histogram_bucket_factor.is_some()
                        || options.value.native_histogram_max_buckets.is_some()
                });
                let buf_cap = self
                    .summary_options
                    .as_ref()
                    .is_some_and(|options| options.value.buf_cap.is_some());
                [
                    ("histogram_options' native_histogram_*", native),
                    ("summary_options' buf_cap", buf_cap),
                    ("ttl", self.ttl.is_some()),
                ]
                .into_iter()
                .filter_map(|(field, written)| written.then_some(field))
                .collect()
            }
        }
    };
}
unapplied_fields!(Defaults);
unapplied_fields!(MappingEntry);

/// The summary shape written on a mapping or in `defaults` (`summary_options` over the
/// older `quantiles`), over `base` (statsd_exporter's defaults, or `defaults`'), checked.
fn written_summary(
    file: &str,
    quantiles: Option<&Spanned<Vec<Objective>>>,
    options: Option<&Spanned<SummaryOptions>>,
    base: &SummaryShape,
) -> Result<SummaryShape, ConfigError> {
    let mut shape = base.clone();
    let mut chosen = quantiles.map(|q| (q.value.as_slice(), &q.referenced));
    if let Some(options) = options {
        let here = |message: String| at(file, &options.referenced, message);
        if let Some(objectives) = &options.value.quantiles {
            chosen = Some((objectives.as_slice(), &options.referenced));
        }
        if let Some(max_age) = &options.value.max_age {
            shape.max_age = crate::envoyproxy_env::go_duration(max_age)
                .filter(|age| !age.is_zero())
                .ok_or_else(|| {
                    here(format!(
                        "max_age `{max_age}`: write how long samples count, e.g. 10m or 30s"
                    ))
                })?;
        }
        if let Some(parts) = options.value.age_buckets {
            shape.age_buckets = u32::try_from(parts)
                .ok()
                .filter(|parts| (1..=MAX_AGE_BUCKETS).contains(parts))
                .ok_or_else(|| {
                    here(format!(
                        "age_buckets {parts}: write how many parts max_age is kept in, from \
                         1 to {MAX_AGE_BUCKETS}"
                    ))
                })?;
        }
    }
    if let Some((objectives, location)) = chosen {
        let quantiles: Vec<f64> = objectives.iter().map(|o| o.quantile).collect();
        if quantiles.is_empty()
            || quantiles.len() > MAX_BUCKETS
            || quantiles.iter().any(|q| !(0.0..=1.0).contains(q))
        {
            return Err(at(
                file,
                location,
                format!(
                    "quantiles {quantiles:?}: write up to {MAX_BUCKETS} quantiles from 0 to 1, \
                     e.g. [{{quantile: 0.5}}, {{quantile: 0.99}}]"
                ),
            ));
        }
        shape.quantiles = quantiles;
    }
    Ok(shape)
}

/// The most parts a summary's window may be kept in.
const MAX_AGE_BUCKETS: u32 = 60;

/// The most bucket bounds a mapping may write.
const MAX_BUCKETS: usize = 64;

/// The bucket bounds written on a mapping or in `defaults` (`histogram_options.buckets`
/// over the older `buckets`), checked: finite and increasing, as Prometheus requires.
fn written_buckets(
    file: &str,
    buckets: Option<&Spanned<Vec<f64>>>,
    options: Option<&Spanned<HistogramOptions>>,
) -> Result<Option<Arc<[f64]>>, ConfigError> {
    let (bounds, location) = match (options, buckets) {
        (Some(options), _) if options.value.buckets.is_some() => (
            options.value.buckets.clone().unwrap_or_default(),
            &options.referenced,
        ),
        (_, Some(buckets)) => (buckets.value.clone(), &buckets.referenced),
        _ => return Ok(None),
    };
    let increasing = bounds
        .windows(2)
        .all(|pair| matches!(pair, [low, high] if low < high));
    if bounds.len() > MAX_BUCKETS {
        return Err(at(
            file,
            location,
            format!(
                "{} buckets: every decision is counted into them, so at most {MAX_BUCKETS} \
                 may be written; keep the bounds your dashboards and alerts read",
                bounds.len()
            ),
        ));
    }
    if bounds.is_empty() || !increasing || bounds.iter().any(|b| !b.is_finite()) {
        return Err(at(
            file,
            location,
            format!(
                "buckets {bounds:?}: write the histogram's upper bounds, finite and each \
                 larger than the one before, e.g. [0.5, 1, 2.5, 5, 10] (+Inf is always added)"
            ),
        ));
    }
    Ok(Some(bounds.into()))
}

/// A loaded mapping file.
#[derive(Debug, Clone)]
pub struct PrometheusMapping {
    /// Glob mappings in the order they are tried.
    globs: Vec<Mapping>,
    /// Regular-expression mappings, in the order written.
    regexes: Vec<Mapping>,
    /// How a timer no mapping matches is exported.
    default_observer: ObserverType,
    /// `defaults`' bucket bounds, for histograms whose mapping sets none.
    default_buckets: Option<Arc<[f64]>>,
    /// `defaults`' summary shape over statsd_exporter's, for summaries.
    default_summary: SummaryShape,
    /// What the file asks for that meshlimit does not do, each with its line; logged at start.
    pub warnings: Vec<String>,
    /// Where each stat went at an earlier scrape: the stats are the same from one scrape
    /// to the next, and matching them again cost ten times the rest of a scrape.
    cache: SeriesCache,
}

/// Stats already mapped, by kind and name.
#[derive(Debug, Default)]
struct SeriesCache(Mutex<[HashMap<String, Option<Arc<Series>>>; 3]>);

/// The most stats remembered of each kind; past it the cache starts again. Rules with
/// request values in their keys (`detailed_metric`) can have a thousand series each.
const CACHE_CAP: usize = 100_000;

impl Clone for SeriesCache {
    /// A copy of the mapping starts with nothing remembered.
    fn clone(&self) -> Self {
        Self::default()
    }
}

#[derive(Debug, Clone)]
struct Mapping {
    pattern: Regex,
    name: String,
    labels: Vec<(String, String)>,
    drop: bool,
    only: Option<StatKind>,
    observer: ObserverType,
    /// A histogram's upper bounds, in the unit `scale` gives; `None`: meshlimit's own.
    buckets: Option<Arc<[f64]>>,
    /// A summary's quantiles and window.
    summary: SummaryShape,
    scale: f64,
    help: Option<Arc<str>>,
    /// `file:line:column` of the mapping, for warnings.
    origin: String,
    /// Fields written on it that meshlimit does not apply.
    unapplied: Vec<&'static str>,
}

impl Mapping {
    /// One mapping of the file, checked, with the file's defaults applied.
    fn compile(
        file: &str,
        entry: &Spanned<MappingEntry>,
        default_match: MatchType,
        default_observer: ObserverType,
        default_buckets: Option<&Arc<[f64]>>,
        default_summary: &SummaryShape,
    ) -> Result<Self, ConfigError> {
        let here = |message: String| at(file, &entry.referenced, message);
        let written = &entry.value;
        let drop = written.action == Some(Action::Drop);
        if written.name.is_empty() && !drop {
            return Err(here(format!(
                "the mapping of `{}` has no `name`: write the Prometheus name its stats \
                 get (e.g. ratelimit_service_rate_limit_over_limit), or `action: drop`",
                written.pattern
            )));
        }
        if !drop {
            check_name_template(&written.name).map_err(here)?;
        }
        // Two families of one name would break the whole scrape.
        if written.name.starts_with("meshlimit_") {
            return Err(here(format!(
                "name `{}`: names starting with meshlimit_ are meshlimit's own metrics; \
                 pick another prefix",
                written.name
            )));
        }
        for label in written.labels.keys() {
            if !is_label_name(label) {
                return Err(here(format!(
                    "label `{label}` is not a Prometheus label name: write letters, \
                     digits and `_`, not starting with a digit or `__`"
                )));
            }
            if label == "le" || label == "quantile" {
                return Err(here(format!(
                    "label `{label}` is Prometheus' own for histogram buckets and summary \
                     quantiles; call it something else"
                )));
            }
        }
        let match_type = written.match_type.unwrap_or(default_match);
        let pattern = match match_type {
            MatchType::Glob => glob_regex(&written.pattern).map_err(here)?,
            MatchType::Regex => Regex::new(&written.pattern).map_err(|error| {
                here(format!(
                    "`{}` is not a regular expression: {error}",
                    written.pattern
                ))
            })?,
        };
        let observer = written.observer_type.or(written.timer_type);
        let buckets = written_buckets(
            file,
            written.buckets.as_ref(),
            written.histogram_options.as_ref(),
        )?
        .or_else(|| default_buckets.cloned());
        let summary = written_summary(
            file,
            written.quantiles.as_ref(),
            written.summary_options.as_ref(),
            default_summary,
        )?;
        let scale = written.scale.unwrap_or(1.0);
        if !(scale.is_finite() && scale > 0.0) {
            return Err(here(format!(
                "scale {scale}: write the positive number the timer's milliseconds are \
                 multiplied by, e.g. 0.001 for seconds"
            )));
        }
        Ok(Mapping {
            pattern,
            name: written.name.clone(),
            labels: written.labels.clone().into_iter().collect(),
            drop,
            only: written.match_metric_type,
            observer: observer.unwrap_or(default_observer),
            buckets,
            summary,
            scale,
            help: written.help.as_deref().map(Arc::from),
            origin: here(String::new()).to_string(),
            unapplied: written.unapplied(),
        })
    }
}

/// The Prometheus series a stat goes to.
#[derive(Debug, PartialEq)]
pub struct Series {
    pub name: String,
    /// Sorted by name.
    pub labels: Vec<(String, String)>,
    /// The mapping's `help`, if it has one.
    pub help: Option<Arc<str>>,
    pub observer: ObserverType,
    /// A histogram's upper bounds, in the unit `scale` gives; `None`: meshlimit's own.
    pub buckets: Option<Arc<[f64]>>,
    /// A summary's quantiles and window.
    pub summary: SummaryShape,
    /// What the timer's milliseconds are multiplied by.
    pub scale: f64,
}

impl PrometheusMapping {
    /// Reads and checks the mapping file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let unreadable = |problem: String| ConfigError::whole_file(path, problem);
        let size = std::fs::metadata(path)
            .map_err(|error| unreadable(format!("cannot read the mapping file: {error}")))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(unreadable(format!(
                "the mapping file is {size} bytes, more than the {MAX_FILE_BYTES} a file may be"
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|error| unreadable(format!("cannot read the mapping file: {error}")))?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Checks `text`, named `file` in errors and warnings.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let parsed: MappingFile = serde_saphyr::from_str_with_options(text, yaml_options())
            .map_err(|error| yaml_error(file, &error))?;
        let mut warnings = Vec::new();
        let defaults = match &parsed.defaults {
            Some(defaults) => {
                let origin = at(file, &defaults.referenced, String::new()).to_string();
                warnings.extend(unapplied(&origin, &defaults.value.unapplied()));
                &defaults.value
            }
            None => &Defaults::default(),
        };
        let default_observer = defaults
            .observer_type
            .or(defaults.timer_type)
            .unwrap_or_default();
        let default_match = defaults.match_type.unwrap_or_default();
        let default_buckets = written_buckets(
            file,
            defaults.buckets.as_ref(),
            defaults.histogram_options.as_ref(),
        )?;
        let default_summary = written_summary(
            file,
            defaults.quantiles.as_ref(),
            defaults.summary_options.as_ref(),
            &SummaryShape::default(),
        )?;

        let mut globs = Vec::new();
        let mut regexes = Vec::new();
        for entry in &parsed.mappings {
            let mapping = Mapping::compile(
                file,
                entry,
                default_match,
                default_observer,
                default_buckets.as_ref(),
                &default_summary,
            )?;
            match entry.value.match_type.unwrap_or(default_match) {
                MatchType::Glob => globs.push((literal_parts(&entry.value.pattern), mapping)),
                MatchType::Regex => regexes.push(mapping),
            }
        }
        if defaults.glob_disable_ordering {
            // statsd_exporter's unordered matcher prefers a literal part to `*`, part by
            // part from the left; a stable sort keeps the written order among equals.
            globs.sort_by(|(a, _), (b, _)| b.cmp(a));
        }
        let mut mapping = Self {
            globs: globs.into_iter().map(|(_, mapping)| mapping).collect(),
            regexes,
            default_observer,
            default_buckets,
            default_summary,
            warnings,
            cache: SeriesCache::default(),
        };
        mapping.warn_about_the_timer();
        Ok(mapping)
    }

    /// What the mapping the response time goes to asks for and does not get. Only that
    /// one: another mapping's `buckets` never meet a timer.
    fn warn_about_the_timer(&mut self) {
        let mut warnings = match self.find(RESPONSE_TIME_STAT, StatKind::Observer) {
            Some((mapping, _)) if mapping.drop => Vec::new(),
            Some((mapping, _)) => {
                let mut asked = mapping.unapplied.clone();
                asked.retain(|field| *field != "ttl");
                unapplied(&mapping.origin, &asked)
            }
            None => Vec::new(),
        };
        let ttls = (self.globs.iter().chain(&self.regexes))
            .filter(|mapping| mapping.unapplied.contains(&"ttl"))
            .flat_map(|mapping| unapplied(&mapping.origin, &["ttl"]));
        warnings.extend(ttls);
        self.warnings.extend(warnings);
    }

    /// The first mapping for `kind` whose pattern matches `stat`, with its captures.
    fn find<'s>(&self, stat: &'s str, kind: StatKind) -> Option<(&Mapping, Captures<'s>)> {
        let applies = |mapping: &&Mapping| mapping.only.is_none_or(|only| only == kind);
        (self.globs.iter().chain(&self.regexes))
            .filter(applies)
            .find_map(|mapping| Some((mapping, mapping.pattern.captures(stat)?)))
    }

    /// Logs what the file asks for and meshlimit does not do, each with its line.
    pub fn log_warnings(&self) {
        for warning in &self.warnings {
            tracing::warn!("PROMETHEUS_MAPPER_YAML {warning}");
        }
    }

    /// As `map`, remembering the answer for the next scrape.
    pub fn map_remembered(&self, stat: &str, kind: StatKind) -> Option<Arc<Series>> {
        let slot = kind as usize;
        if let Some(known) = self
            .cache
            .0
            .lock()
            .get(slot)
            .and_then(|seen| seen.get(stat))
        {
            return known.clone();
        }
        let series = self.map(stat, kind).map(Arc::new);
        if let Some(seen) = self.cache.0.lock().get_mut(slot) {
            if seen.len() >= CACHE_CAP {
                seen.clear();
            }
            seen.insert(stat.to_owned(), series.clone());
        }
        series
    }

    /// Where `stat`, of `kind`, is exported; `None` when a mapping drops it.
    pub fn map(&self, stat: &str, kind: StatKind) -> Option<Series> {
        let unmapped = || Series {
            name: escape_name(stat),
            labels: Vec::new(),
            help: None,
            observer: self.default_observer,
            buckets: self.default_buckets.clone(),
            summary: self.default_summary.clone(),
            scale: 1.0,
        };
        let Some((mapping, captures)) = self.find(stat, kind) else {
            return Some(unmapped());
        };
        if mapping.drop {
            return None;
        }
        let expand = |template: &str| {
            let mut out = String::new();
            captures.expand(template, &mut out);
            out
        };
        let name = escape_name(&expand(&mapping.name));
        // A name made of captures that matched nothing: no series can be called that.
        if name.is_empty() {
            return Some(unmapped());
        }
        Some(Series {
            name,
            labels: (mapping.labels.iter())
                .map(|(label, value)| (label.clone(), expand(value)))
                .collect(),
            help: mapping.help.clone(),
            observer: mapping.observer,
            buckets: mapping.buckets.clone(),
            summary: mapping.summary.clone(),
            scale: mapping.scale,
        })
    }
}

/// Follows the mapping file at `path` while meshlimit serves, as its config directory is
/// followed: every `interval`, a file whose bytes differ from `seen` (what was loaded, or
/// `None` when there was no file) is loaded and handed to `apply`; one that does not load
/// is logged and the names in use stay. A file that is not there changes nothing. So a
/// ConfigMap mounted after the pod started, or edited, takes effect without a restart,
/// which envoyproxy/ratelimit needs. Runs until aborted.
pub async fn follow(
    path: PathBuf,
    interval: Duration,
    mut seen: Option<Vec<u8>>,
    apply: impl Fn(PrometheusMapping),
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let small = (tokio::fs::metadata(&path).await).is_ok_and(|m| m.len() <= MAX_FILE_BYTES);
        let Some(bytes) = (if small {
            tokio::fs::read(&path).await.ok()
        } else {
            None
        }) else {
            continue;
        };
        if seen.as_deref() == Some(&bytes[..]) {
            continue;
        }
        let loaded = match std::str::from_utf8(&bytes) {
            Ok(text) => PrometheusMapping::parse(&path.display().to_string(), text),
            Err(_) => Err(ConfigError::whole_file(
                &path,
                "the mapping file is not UTF-8",
            )),
        };
        seen = Some(bytes);
        match loaded {
            Ok(mapping) => {
                mapping.log_warnings();
                tracing::info!(
                    "PROMETHEUS_MAPPER_YAML {}: loaded; the metrics are named by it from the next scrape",
                    path.display()
                );
                apply(mapping);
            }
            Err(error) => {
                tracing::warn!(
                    "PROMETHEUS_MAPPER_YAML {error}; the metrics keep the names they had"
                );
            }
        }
    }
}

/// A warning for each of `fields`, which statsd_exporter reads and meshlimit does not
/// apply, prefixed by where they were written.
fn unapplied(origin: &str, fields: &[&'static str]) -> Vec<String> {
    let origin = origin.trim_end_matches(": ");
    (fields.iter())
        .map(|&field| match field {
            "histogram_options' native_histogram_*" => format!(
                "{origin}: {field} has no effect: the response time is a classic histogram, \
                 with the buckets written (or meshlimit's, 0.01 ms to 1 s)"
            ),
            "ttl" => format!(
                "{origin}: `ttl` has no effect: meshlimit's series stay until it restarts, \
                 as each rule's counters do"
            ),
            "summary_options' buf_cap" => format!(
                "{origin}: {field} has no effect: meshlimit counts samples in buckets and \
                 keeps none"
            ),
            _ => format!("{origin}: `{field}` has no effect"),
        })
        .collect()
}

fn at(file: &str, location: &serde_saphyr::Location, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line: location.line(),
        column: location.column(),
        message,
    }
}

/// The glob as an anchored regular expression, each `*` a capture of characters other
/// than `.`.
fn glob_regex(glob: &str) -> Result<Regex, String> {
    let mut pattern = String::from("^");
    for (i, part) in glob.split('.').enumerate() {
        if part.is_empty() {
            return Err(format!(
                "`{glob}` has an empty part: write the statsd name's parts between dots, \
                 `*` for any one part (e.g. ratelimit.service.rate_limit.*.*.over_limit)"
            ));
        }
        if i > 0 {
            pattern.push_str(r"\.");
        }
        for (j, literal) in part.split('*').enumerate() {
            if j > 0 {
                pattern.push_str("([^.]*)");
            }
            pattern.push_str(&regex::escape(literal));
        }
    }
    pattern.push('$');
    Regex::new(&pattern).map_err(|error| format!("`{glob}` cannot be matched: {error}"))
}

/// Which parts of a glob are literal, left to right, to rank globs by.
fn literal_parts(glob: &str) -> Vec<bool> {
    glob.split('.').map(|part| !part.contains('*')).collect()
}

/// A name template must make a Prometheus name: letters, digits, `_` and `$` captures.
fn check_name_template(template: &str) -> Result<(), String> {
    let without_captures = Regex::new(r"\$\{?[A-Za-z0-9_]+\}?")
        .map(|captures| captures.replace_all(template, "x").into_owned())
        .unwrap_or_default();
    let valid = without_captures
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !without_captures.starts_with(|c: char| c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "name `{template}` is not a Prometheus name: write letters, digits and `_`, not \
             starting with a digit, and $1, $2, … for the captures"
        ))
    }
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// `name` with every character a Prometheus name may not hold made `_` (`_` in front of a
/// leading digit), as statsd_exporter names what no mapping matches; a run of `-` is one `_`.
pub fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    let mut previous = '\0';
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else if !(c == '-' && previous == '-') {
            out.push('_');
        }
        previous = c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVER: &str = "ratelimit.service.rate_limit.web.user.path_/a.over_limit";

    fn mapping(text: &str) -> PrometheusMapping {
        PrometheusMapping::parse("mapper.yaml", text).unwrap_or_else(|error| panic!("{error}"))
    }

    fn refused(text: &str) -> String {
        match PrometheusMapping::parse("mapper.yaml", text) {
            Ok(_) => panic!("{text} was accepted"),
            Err(error) => error.to_string(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let own = |(k, v): &(&str, &str)| ((*k).to_owned(), (*v).to_owned());
        pairs.iter().map(own).collect()
    }

    #[test]
    fn a_glob_names_the_series_and_labels_it_with_its_captures() {
        let mapped = mapping(
            "mappings:
  - match: ratelimit.service.rate_limit.*.*.*.over_limit
    name: rl_over_limit
    labels: {domain: $1, descriptor: \"${2}_${3}\"}
    help: Hits over a limit.
",
        );
        let series = mapped.map(OVER, StatKind::Counter).unwrap();
        assert_eq!(series.name, "rl_over_limit");
        assert_eq!(
            series.labels,
            labels(&[("descriptor", "user_path_/a"), ("domain", "web")])
        );
        assert_eq!(series.help.as_deref(), Some("Hits over a limit."));
        // A `*` is one part: a key of two parts does not match a glob for three.
        let shorter = "ratelimit.service.rate_limit.web.user.over_limit";
        assert_eq!(
            mapped.map(shorter, StatKind::Counter).unwrap().name,
            "ratelimit_service_rate_limit_web_user_over_limit"
        );
    }

    #[test]
    fn globs_win_over_regexes_and_the_first_written_wins_among_each() {
        let text = "mappings:
  - match: 'ratelimit\\.service\\.rate_limit\\.([^.]+)\\..*\\.over_limit'
    match_type: regex
    name: by_regex
    labels: {domain: $1}
  - match: ratelimit.service.rate_limit.*.*.*.over_limit
    name: first_glob
  - match: ratelimit.service.rate_limit.web.*.*.over_limit
    name: second_glob
";
        assert_eq!(
            mapping(text).map(OVER, StatKind::Counter).unwrap().name,
            "first_glob"
        );
        // Unordered, the glob with a literal where the other has `*` wins.
        let unordered = format!("defaults: {{glob_disable_ordering: true}}\n{text}");
        assert_eq!(
            mapping(&unordered)
                .map(OVER, StatKind::Counter)
                .unwrap()
                .name,
            "second_glob"
        );
        // Where no glob matches, the regex does, unanchored as Go's.
        let other = "x.ratelimit.service.rate_limit.api.k.over_limit";
        let ordered = mapping(text);
        let series = ordered.map(other, StatKind::Counter).unwrap();
        assert_eq!(series.name, "by_regex");
        assert_eq!(series.labels, labels(&[("domain", "api")]));
    }

    #[test]
    fn dropped_and_typed_mappings_apply_only_where_they_say() {
        let mapped = mapping(
            "mappings:
  - match: ratelimit.service.rate_limit.*.*.*.over_limit
    action: drop
  - match: ratelimit_server.*.*
    match_metric_type: counter
    name: server_$2
    labels: {method: $1}
  - match: ratelimit_server.*.response_time
    name: rl_response_time_seconds
    observer_type: histogram
    scale: 0.001
",
        );
        assert_eq!(mapped.map(OVER, StatKind::Counter), None);
        let total = "ratelimit_server.ShouldRateLimit.total_requests";
        let series = mapped.map(total, StatKind::Counter).unwrap();
        assert_eq!(series.name, "server_total_requests");
        assert_eq!(series.labels, labels(&[("method", "ShouldRateLimit")]));
        // The timer passes the counters' mapping by and takes its own.
        let timer = mapped.map(RESPONSE_TIME_STAT, StatKind::Observer).unwrap();
        assert_eq!(timer.name, "rl_response_time_seconds");
        assert_eq!(timer.observer, ObserverType::Histogram);
        assert_eq!(timer.scale, 0.001);
        assert!(mapped.warnings.is_empty(), "{:?}", mapped.warnings);
    }

    #[test]
    fn a_remembered_answer_is_the_one_mapping_gives_dropped_ones_too() {
        let mapped = mapping(
            "mappings:
  - match: ratelimit.service.rate_limit.*.*.*.over_limit
    action: drop
  - match: ratelimit.service.rate_limit.*.*.*.*
    name: rl_$4
    labels: {domain: $1}
",
        );
        let hits = "ratelimit.service.rate_limit.web.user.path_/a.total_hits";
        for stat in [hits, OVER, "other.stat"] {
            let first = mapped.map_remembered(stat, StatKind::Counter);
            assert_eq!(
                first.as_deref(),
                mapped.map(stat, StatKind::Counter).as_ref()
            );
            let again = mapped.map_remembered(stat, StatKind::Counter);
            assert_eq!(first, again);
            if let (Some(first), Some(again)) = (&first, &again) {
                assert!(Arc::ptr_eq(first, again), "{stat} mapped twice");
            }
        }
        assert_eq!(mapped.map_remembered(OVER, StatKind::Counter), None);
        // Remembered by kind: the timer is not the counter.
        let timer = mapped.map_remembered(hits, StatKind::Observer).unwrap();
        assert_eq!(timer.name, "rl_total_hits");
        assert_eq!(timer.observer, ObserverType::Summary);
    }

    #[test]
    fn a_stat_no_mapping_matches_keeps_its_name_made_valid() {
        let mapped = mapping("mappings: []\n");
        let series = mapped.map(OVER, StatKind::Counter).unwrap();
        assert_eq!(
            series.name,
            "ratelimit_service_rate_limit_web_user_path__a_over_limit"
        );
        assert!(series.labels.is_empty());
        // statsd_exporter's default for a timer is a summary.
        let timer = mapped.map(RESPONSE_TIME_STAT, StatKind::Observer).unwrap();
        assert_eq!(timer.observer, ObserverType::Summary);
        assert_eq!(escape_name("9lives--a-b"), "_9lives_a_b");
    }

    #[test]
    fn mistakes_are_refused_with_their_line_and_what_to_write() {
        let cases = [
            (
                "mappings:\n  - match: a.*\n    labels: {x: $1}\n",
                "mapper.yaml:2:5: the mapping of `a.*` has no `name`",
            ),
            (
                "mappings:\n  - match: a.*\n    name: ok\n  - match: b..c\n    name: b\n",
                "mapper.yaml:4:5: `b..c` has an empty part",
            ),
            (
                "mappings:\n  - match: '(a'\n    match_type: regex\n    name: a\n",
                "mapper.yaml:2:5: `(a` is not a regular expression",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a-$1\n",
                "name `a-$1` is not a Prometheus name",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    labels: {1x: $1}\n",
                "label `1x` is not a Prometheus label name",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    labels: {le: $1}\n",
                "label `le` is Prometheus' own",
            ),
            (
                "mappings:\n  - match: a.*\n    name: meshlimit_shed_total\n",
                "names starting with meshlimit_ are meshlimit's own metrics",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    lables: {x: $1}\n",
                "mapper.yaml:4:5: unknown field `lables`",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    action: keep\n",
                "mapper.yaml:4:13: unknown variant `keep`",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    buckets: [1, 0.5]\n",
                "mapper.yaml:4:14: buckets [1.0, 0.5]: write the histogram's upper bounds",
            ),
            (
                "defaults:\n  histogram_options: {buckets: []}\nmappings: []\n",
                "mapper.yaml:2:22: buckets []: write the histogram's upper bounds",
            ),
            (
                &format!(
                    "mappings:\n  - match: a.*\n    name: a\n    buckets: {:?}\n",
                    (1..=65).collect::<Vec<u32>>()
                ),
                "mapper.yaml:4:14: 65 buckets: every decision is counted into them, so at most 64",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    summary_options: {max_age: soon}\n",
                "mapper.yaml:4:22: max_age `soon`: write how long samples count",
            ),
            (
                "defaults:\n  summary_options: {age_buckets: 0}\nmappings: []\n",
                "mapper.yaml:2:20: age_buckets 0: write how many parts",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    quantiles: [{quantile: 1.5}]\n",
                "mapper.yaml:4:16: quantiles [1.5]: write up to 64 quantiles from 0 to 1",
            ),
            (
                "mappings:\n  - match: a.*\n    name: a\n    scale: 0\n",
                "mapper.yaml:2:5: scale 0: write the positive number",
            ),
        ];
        for (text, expected) in cases {
            let error = refused(text);
            assert!(error.contains(expected), "{text}\n{error}");
        }
    }

    #[test]
    fn what_meshlimit_does_not_do_is_warned_about_with_its_line() {
        let mapped = mapping(
            "defaults:
  ttl: 1m
mappings:
  - match: ratelimit_server.*.*
    match_metric_type: counter
    name: other
    buckets: [1]
  - match: ratelimit_server.*.response_time
    name: rt
    histogram_options: {buckets: [0.1, 1], native_histogram_bucket_factor: 1.1}
    observer_type: histogram
",
        );
        let warnings = mapped.warnings.join("\n");
        assert!(
            warnings.contains("mapper.yaml:2:3: `ttl` has no effect"),
            "{warnings}"
        );
        // Only the mapping the timer goes to; its buckets apply, its native settings not.
        assert!(
            warnings
                .contains("mapper.yaml:8:5: histogram_options' native_histogram_* has no effect"),
            "{warnings}"
        );
        assert_eq!(mapped.warnings.len(), 2, "{warnings}");
        let timer = mapped
            .map(
                "ratelimit_server.ShouldRateLimit.response_time",
                StatKind::Observer,
            )
            .unwrap();
        assert_eq!(timer.buckets.as_deref(), Some(&[0.1, 1.0][..]));

        // A summary gets statsd_exporter's quantiles and window unless written: on the
        // mapping (summary_options over the older quantiles) or in defaults.
        let summary = mapping("mappings:\n  - match: ratelimit_server.*.*\n    name: rt_$2\n");
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
        let shape = |mapped: &PrometheusMapping| {
            mapped
                .map(
                    "ratelimit_server.ShouldRateLimit.response_time",
                    StatKind::Observer,
                )
                .unwrap()
                .summary
        };
        assert_eq!(shape(&summary), SummaryShape::default());
        let written = mapping(
            "defaults:\n  summary_options: {max_age: 1m}\nmappings:\n  - match: ratelimit_server.*.*\n    name: rt\n    quantiles: [{quantile: 0.5, error: 0.05}]\n    summary_options: {quantiles: [{quantile: 0.99, error: 0.001}], age_buckets: 3, buf_cap: 500}\n",
        );
        assert_eq!(
            shape(&written),
            SummaryShape {
                quantiles: vec![0.99],
                max_age: Duration::from_secs(60),
                age_buckets: 3,
            }
        );
        let warnings = written.warnings.join("\n");
        assert!(
            warnings.contains("mapper.yaml:4:5: summary_options' buf_cap has no effect"),
            "{warnings}"
        );
        let histogram = "defaults: {observer_type: histogram}\nmappings: []\n";
        assert!(mapping(histogram).warnings.is_empty());
    }
}
