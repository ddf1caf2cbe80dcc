//! Named policies and how they combine: `extends` chains, inline overrides, and what a
//! descriptor node ends up with after inheritance.
//!
//! Every field of a resolved policy remembers where it was written, so `explain` can show
//! an operator which block decided what.

use std::collections::HashMap;
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::file::{LimitBlock, PolicyBlock};
use crate::algorithm::penalty::Penalty;
use crate::calendar::{Calendar, Zone, parse_weekday};
use crate::limit::{Algorithm, Limit, Unit, format_duration, parse_duration};
use crate::rule::SourceLocation;
use crate::rule::{Body, HeaderSet};

/// Where a field's value was written, and by what ("policy `pro`", "descriptor `plan: pro`").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub what: String,
    pub at: SourceLocation,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.what, self.at)
    }
}

/// One limit of a policy before an algorithm is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSpec {
    pub requests_per_unit: u32,
    pub window_millis: u64,
    pub calendar: Option<Calendar>,
}

/// A policy with every field resolved through `extends` and overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedPolicy {
    pub limits: Option<(Vec<LimitSpec>, Origin)>,
    pub algorithm: Option<(Algorithm, Origin)>,
    pub burst: Option<(u32, Origin)>,
    pub capacity: Option<(u32, Origin)>,
    pub shadow_mode: Option<(bool, Origin)>,
    pub name: Option<(String, Origin)>,
    pub warn_only: Option<(bool, Origin)>,
    pub soft_limit: Option<(Ratio, Origin)>,
    pub penalty: Option<(Penalty, Origin)>,
    pub headers: Option<(HeaderSet, Origin)>,
    pub body: Option<(Body, Origin)>,
    pub priority: Option<(i64, Origin)>,
    pub reserved: Option<(Ratio, Origin)>,
    pub hybrid: Option<(bool, Origin)>,
    pub count_rejected: Option<(bool, Origin)>,
}

/// A fraction in (0, 1], kept as parts per million so policies stay `Eq` and hashable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ratio(pub u32);

impl Ratio {
    pub const SCALE: u32 = 1_000_000;

    pub fn from_f64(value: f64) -> Option<Ratio> {
        (value > 0.0 && value <= 1.0)
            .then(|| Ratio((value * f64::from(Self::SCALE)).round() as u32))
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(Self::SCALE)
    }

    /// `self × n`, rounded down.
    pub fn of(self, n: u64) -> u64 {
        (u128::from(n) * u128::from(self.0) / u128::from(Self::SCALE)) as u64
    }
}

/// Inline policy fields written on a descriptor, in `defaults:`, or in a policy block.
pub struct Overrides<'a> {
    pub limits: Option<&'a Spanned<Vec<Spanned<LimitBlock>>>>,
    pub algorithm: Option<&'a Spanned<String>>,
    pub burst: Option<&'a Spanned<i64>>,
    pub capacity: Option<&'a Spanned<i64>>,
    pub shadow_mode: Option<&'a Spanned<bool>>,
    pub name: Option<&'a Spanned<String>>,
    /// A policy block's fields that only policies have (mode, soft limit, penalty, …).
    pub policy_only: Option<&'a PolicyBlock>,
}

impl<'a> Overrides<'a> {
    pub fn is_empty(&self) -> bool {
        self.limits.is_none()
            && self.algorithm.is_none()
            && self.burst.is_none()
            && self.capacity.is_none()
            && self.shadow_mode.is_none()
            && self.name.is_none()
            && self.policy_only.is_none()
    }
}

/// A `policies:` entry and the file it lives in.
#[derive(Debug, Clone)]
pub struct PolicyDefinition {
    pub block: Spanned<PolicyBlock>,
    pub file: Arc<str>,
}

/// Which policies a name can refer to: a domain's own first, then the shared ones.
/// Shared policies see only shared policies, so a domain cannot change what a shared
/// policy's `extends` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope<'d> {
    Shared,
    Domain(&'d str),
}

pub struct PolicyTable<'d> {
    pub shared: &'d HashMap<String, PolicyDefinition>,
    pub local: HashMap<String, PolicyDefinition>,
    pub domain: &'d str,
    resolved: HashMap<(bool, String), Result<Arc<ResolvedPolicy>, ()>>,
}

/// Reports problems found while resolving; the compiler collects them.
pub trait Problems {
    fn problem(&mut self, at: &SourceLocation, message: String);
}

pub fn location(file: &Arc<str>, location: &serde_saphyr::Location) -> SourceLocation {
    SourceLocation {
        file: file.clone(),
        line: location.line(),
        column: location.column(),
    }
}

impl<'d> PolicyTable<'d> {
    pub fn new(
        shared: &'d HashMap<String, PolicyDefinition>,
        local: HashMap<String, PolicyDefinition>,
        domain: &'d str,
    ) -> Self {
        Self {
            shared,
            local,
            domain,
            resolved: HashMap::new(),
        }
    }

    fn find(&self, name: &str, scope: Scope<'_>) -> Option<(&PolicyDefinition, Scope<'d>)> {
        if matches!(scope, Scope::Domain(_))
            && let Some(definition) = self.local.get(name)
        {
            return Some((definition, Scope::Domain(self.domain)));
        }
        self.shared.get(name).map(|d| (d, Scope::Shared))
    }

    /// Resolves policy `name` as seen from `scope`; `used_at` is where it is referenced.
    pub fn resolve(
        &mut self,
        name: &str,
        scope: Scope<'_>,
        used_at: &SourceLocation,
        problems: &mut dyn Problems,
    ) -> Option<Arc<ResolvedPolicy>> {
        let mut chain = Vec::new();
        self.resolve_in_chain(name, scope, used_at, problems, &mut chain)
    }

    fn resolve_in_chain(
        &mut self,
        name: &str,
        scope: Scope<'_>,
        used_at: &SourceLocation,
        problems: &mut dyn Problems,
        chain: &mut Vec<((bool, String), SourceLocation)>,
    ) -> Option<Arc<ResolvedPolicy>> {
        let Some((definition, found_in)) = self.find(name, scope) else {
            let mut known: Vec<&str> = self
                .local
                .keys()
                .chain(self.shared.keys())
                .map(String::as_str)
                .collect();
            known.sort_unstable();
            known.dedup();
            let known = if known.is_empty() {
                "no policies are defined; add a `policies:` block".to_owned()
            } else {
                format!("known policies: {}", known.join(", "))
            };
            problems.problem(used_at, format!("unknown policy `{name}`; {known}"));
            return None;
        };
        let definition = definition.clone();
        let cache_key = (found_in == Scope::Shared, name.to_owned());
        if let Some(done) = self.resolved.get(&cache_key) {
            return done.clone().ok();
        }
        let here = location(&definition.file, &definition.block.referenced);
        if let Some(start) = chain.iter().position(|(key, _)| *key == cache_key) {
            let cycle: Vec<String> = chain
                .iter()
                .skip(start)
                .map(|((_, n), at)| format!("`{n}` ({at})"))
                .collect();
            problems.problem(
                &here,
                format!(
                    "policy `extends` chain is a cycle: {} extends `{name}` again; remove one of the `extends`",
                    cycle.join(" extends ")
                ),
            );
            return None;
        }
        if chain.len() + 1 >= super::MAX_EXTENDS_DEPTH {
            let first = chain.first().map_or(name, |((_, n), _)| n.as_str());
            problems.problem(
                &here,
                format!(
                    "policy `extends` chains may be at most {} policies long, and the one from `{first}` goes on at `{name}`; let the policies extend a common base instead",
                    super::MAX_EXTENDS_DEPTH
                ),
            );
            return None;
        }
        chain.push((cache_key.clone(), here.clone()));
        let block = &definition.block.value;
        let base = match &block.extends {
            Some(parent) => {
                let parent_at = location(&definition.file, &parent.referenced);
                // A domain's policy extending its own name adjusts the shared policy it
                // shadows, rather than naming itself.
                let parent_scope = if found_in != Scope::Shared && parent.value == name {
                    Scope::Shared
                } else {
                    found_in
                };
                match self.resolve_in_chain(
                    &parent.value,
                    parent_scope,
                    &parent_at,
                    problems,
                    chain,
                ) {
                    Some(base) => (*base).clone(),
                    None => {
                        chain.pop();
                        self.resolved.insert(cache_key, Err(()));
                        return None;
                    }
                }
            }
            None => ResolvedPolicy::default(),
        };
        chain.pop();
        let what = format!("policy `{name}`");
        let overrides = Overrides {
            limits: block.limits.as_ref(),
            algorithm: block.algorithm.as_ref(),
            burst: block.burst.as_ref(),
            capacity: block.capacity.as_ref(),
            shadow_mode: block.shadow_mode.as_ref(),
            name: block.name.as_ref(),
            policy_only: Some(block),
        };
        let mut resolved = apply_overrides(base, &overrides, &what, &definition.file, problems);
        if block.name.is_none() {
            resolved.name = Some((name.to_owned(), Origin { what, at: here }));
        }
        let resolved = Arc::new(resolved);
        self.resolved.insert(cache_key, Ok(resolved.clone()));
        Some(resolved)
    }
}

/// `base` with every field set in `overrides` replaced; `what` names the block they come from.
pub fn apply_overrides(
    mut base: ResolvedPolicy,
    overrides: &Overrides<'_>,
    what: &str,
    file: &Arc<str>,
    problems: &mut dyn Problems,
) -> ResolvedPolicy {
    let origin = |at: &serde_saphyr::Location| Origin {
        what: what.to_owned(),
        at: location(file, at),
    };
    if let Some(limits) = overrides.limits {
        let at = origin(&limits.referenced);
        // Limits that were written but refused are reported where they are; an empty
        // list stands for them, so no one also hears that the policy has none.
        let specs = limit_specs(&limits.value, file, &at.at, problems).unwrap_or_default();
        base.limits = Some((specs, at));
    }
    if let Some(algorithm) = overrides.algorithm {
        match algorithm.value.parse::<Algorithm>() {
            Ok(parsed) => {
                // A burst is the token bucket's and a capacity the leaky bucket's: a block
                // that moves to another algorithm leaves the inherited one behind, as it
                // has no way to unset it.
                if parsed != Algorithm::TokenBucket {
                    base.burst = None;
                }
                if parsed != Algorithm::LeakyBucket {
                    base.capacity = None;
                }
                base.algorithm = Some((parsed, origin(&algorithm.referenced)));
            }
            Err(()) => problems.problem(
                &location(file, &algorithm.referenced),
                format!(
                    "unknown algorithm `{}`; write one of {}",
                    algorithm.value,
                    algorithm_names()
                ),
            ),
        }
    }
    if let Some(burst) = overrides.burst {
        match u32::try_from(burst.value) {
            Ok(value) if value > 0 => base.burst = Some((value, origin(&burst.referenced))),
            _ => problems.problem(
                &location(file, &burst.referenced),
                format!("`burst` is {}; write the most requests a token bucket admits at once, a whole number from 1 to {}", burst.value, u32::MAX),
            ),
        }
    }
    if let Some(capacity) = overrides.capacity {
        match u32::try_from(capacity.value) {
            Ok(value) if value > 0 => base.capacity = Some((value, origin(&capacity.referenced))),
            _ => problems.problem(
                &location(file, &capacity.referenced),
                format!("`capacity` is {}; write how many requests a leaky bucket holds, a whole number from 1 to {}", capacity.value, u32::MAX),
            ),
        }
    }
    if let Some(shadow) = overrides.shadow_mode {
        base.shadow_mode = Some((shadow.value, origin(&shadow.referenced)));
    }
    if let Some(name) = overrides.name {
        base.name = Some((name.value.clone(), origin(&name.referenced)));
    }
    if let Some(block) = overrides.policy_only {
        apply_policy_only(&mut base, block, &origin, file, problems);
    }
    base
}

/// The fields only a `policies:` entry can set: how clients and upstreams see its decisions.
fn apply_policy_only(
    base: &mut ResolvedPolicy,
    block: &PolicyBlock,
    origin: &dyn Fn(&serde_saphyr::Location) -> Origin,
    file: &Arc<str>,
    problems: &mut dyn Problems,
) {
    let at = |l: &serde_saphyr::Location| location(file, l);
    if let Some(mode) = &block.mode {
        match mode.value.as_str() {
            "enforce" => base.warn_only = Some((false, origin(&mode.referenced))),
            "warn" => base.warn_only = Some((true, origin(&mode.referenced))),
            other => problems.problem(&at(&mode.referenced), format!("unknown mode `{other}`; write `enforce` (reject over the limit) or `warn` (admit, and tell the upstream with a header)")),
        }
    }
    let ratio =
        |field: &str, value: &Spanned<f64>, problems: &mut dyn Problems| match Ratio::from_f64(
            value.value,
        ) {
            Some(ratio) => Some((ratio, origin(&value.referenced))),
            None => {
                problems.problem(
                    &at(&value.referenced),
                    format!(
                        "`{field}` is {}; write a fraction above 0 and at most 1, e.g. 0.8",
                        value.value
                    ),
                );
                None
            }
        };
    if let Some(soft) = &block.soft_limit
        && let Some(value) = ratio("soft_limit", soft, problems)
    {
        base.soft_limit = Some(value);
    }
    if let Some(reserved) = &block.reserved
        && let Some(value) = ratio("reserved", reserved, problems)
    {
        base.reserved = Some(value);
    }
    if let Some(priority) = &block.priority {
        base.priority = Some((priority.value, origin(&priority.referenced)));
    }
    if let Some(hybrid) = &block.hybrid {
        base.hybrid = Some((hybrid.value, origin(&hybrid.referenced)));
    }
    if let Some(count) = &block.count_rejected {
        base.count_rejected = Some((count.value, origin(&count.referenced)));
    }
    if let Some(penalty) = &block.penalty {
        let p = &penalty.value;
        let after = u32::try_from(p.after.value).ok().filter(|n| *n > 0);
        if after.is_none() {
            problems.problem(
                &at(&p.after.referenced),
                format!(
                    "`after` is {}; write how many rejections start a block, at least 1",
                    p.after.value
                ),
            );
        }
        let duration = |field: &str, value: &Spanned<String>, problems: &mut dyn Problems| {
            let parsed = parse_duration(&value.value);
            if parsed.is_none() {
                problems.problem(&at(&value.referenced), format!("`{field}: {}` is not a duration; write a whole number and ms, s, m, h or d, e.g. `15m`", value.value));
            }
            parsed
        };
        let within = duration("within", &p.within, problems);
        let block_for = duration("block_for", &p.block_for, problems);
        if let (Some(after_rejections), Some(within_millis), Some(block_millis)) =
            (after, within, block_for)
        {
            base.penalty = Some((
                Penalty {
                    after_rejections,
                    within_millis,
                    block_millis,
                },
                origin(&penalty.referenced),
            ));
        }
    }
    if let Some(headers) = &block.headers {
        let mut set = HeaderSet::default();
        for name in &headers.value {
            if !set.enable(&name.value) {
                problems.problem(
                    &at(&name.referenced),
                    format!(
                        "unknown header set `{}`; write any of {}",
                        name.value,
                        HeaderSet::NAMES
                    ),
                );
            }
        }
        base.headers = Some((set, origin(&headers.referenced)));
    }
    if let Some(body) = &block.body {
        let content_type = block
            .body_content_type
            .as_ref()
            .map_or_else(|| "application/json".to_owned(), |c| c.value.clone());
        base.body = Some((
            Body {
                template: body.value.clone(),
                content_type,
            },
            origin(&body.referenced),
        ));
    }
}

pub fn algorithm_names() -> String {
    let names: Vec<_> = Algorithm::ALL.iter().map(|a| a.name()).collect();
    names.join(", ")
}

const UNITS: &str = "second, minute, hour, day, week, month or year";

fn limit_specs(
    blocks: &[Spanned<LimitBlock>],
    file: &Arc<str>,
    list_at: &SourceLocation,
    problems: &mut dyn Problems,
) -> Option<Vec<LimitSpec>> {
    if blocks.is_empty() {
        problems.problem(list_at, "`limits` is empty; write at least one `{requests_per_unit: N, unit: minute}`, or `unlimited: true`".into());
        return None;
    }
    let mut specs: Vec<LimitSpec> = Vec::with_capacity(blocks.len());
    let mut ok = true;
    for block in blocks {
        let at = location(file, &block.referenced);
        match limit_spec(&block.value, file, &at, problems) {
            Some(spec) => {
                if specs
                    .iter()
                    .any(|s| (s.window_millis, s.calendar) == (spec.window_millis, spec.calendar))
                {
                    problems.problem(&at, format!("two limits share the window {}; each limit needs its own window, keep the stricter one", match spec.calendar {
                        Some(_) => describe_window(&spec),
                        None => format_duration(spec.window_millis),
                    }));
                    ok = false;
                } else {
                    specs.push(spec);
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(specs)
}

fn limit_spec(
    block: &LimitBlock,
    file: &Arc<str>,
    at: &SourceLocation,
    problems: &mut dyn Problems,
) -> Option<LimitSpec> {
    let requests_per_unit = match &block.requests_per_unit {
        None => {
            problems.problem(at, "a limit has no `requests_per_unit`; write a number, e.g. `{requests_per_unit: 100, unit: minute}`".into());
            None
        }
        Some(rpu) => match u32::try_from(rpu.value) {
            Ok(value) => Some(value),
            Err(_) => {
                problems.problem(
                    &location(file, &rpu.referenced),
                    format!(
                        "`requests_per_unit` is {}; write a whole number from 0 to {}",
                        rpu.value,
                        u32::MAX
                    ),
                );
                None
            }
        },
    };
    let window_millis = match (&block.unit, &block.per) {
        (Some(_), Some(per)) => {
            problems.problem(
                &location(file, &per.referenced),
                "a limit has both `unit` and `per`; keep one".into(),
            );
            None
        }
        (None, None) => {
            problems.problem(at, format!("a limit has no window; write `unit:` ({UNITS}) or `per:` with a duration such as `10s`"));
            None
        }
        (Some(unit), None) => match unit.value.parse::<Unit>() {
            Ok(unit) => Some(unit.millis()),
            Err(()) => {
                problems.problem(
                    &location(file, &unit.referenced),
                    format!("unknown unit `{}`; write one of {UNITS}", unit.value),
                );
                None
            }
        },
        (None, Some(per)) => match parse_duration(&per.value) {
            Some(millis) => Some(millis),
            None => {
                problems.problem(&location(file, &per.referenced), format!("`per: {}` is not a duration; write a whole number and ms, s, m, h or d, e.g. `per: 10s`", per.value));
                None
            }
        },
    };
    let calendar = match &block.calendar {
        None => no_calendar(block.week_starts.as_ref(), file, problems),
        Some(zone) if block.per.is_some() => {
            problems.problem(&location(file, &zone.referenced), "`calendar` needs `unit:` (day, week, month or year); a `per:` duration has no calendar to start on — write `unit:` instead of `per:`".into());
            None
        }
        Some(zone) => calendar_of(
            zone,
            block.unit.as_ref(),
            block.week_starts.as_ref(),
            file,
            problems,
        ),
    };
    Some(LimitSpec {
        requests_per_unit: requests_per_unit?,
        window_millis: window_millis?,
        calendar: calendar?,
    })
}

/// A limit's `calendar: <zone>` over its `unit:` (and `week_starts:`): `Some(None)` when
/// the unit is missing or unknown (reported where the unit is read), `None` when the
/// calendar is refused, which is reported here.
pub fn calendar_of(
    zone: &Spanned<String>,
    unit: Option<&Spanned<String>>,
    week_starts: Option<&Spanned<String>>,
    file: &Arc<str>,
    problems: &mut dyn Problems,
) -> Option<Option<Calendar>> {
    let (at, refused) = match Zone::named(&zone.value) {
        Err(problem) => (&zone.referenced, problem),
        Ok(zone) => {
            let Some((written, Ok(unit))) = unit.map(|u| (u, u.value.parse::<Unit>())) else {
                return Some(None);
            };
            let calendar = Calendar::new(unit, zone).map_err(|p| (&written.referenced, p));
            match (calendar, week_starts) {
                (Ok(calendar), None) => return Some(Some(calendar)),
                (Ok(calendar), Some(day)) => {
                    match parse_weekday(&day.value).and_then(|d| calendar.starting_weeks_on(d)) {
                        Ok(calendar) => return Some(Some(calendar)),
                        Err(problem) => (&day.referenced, problem),
                    }
                }
                (Err(refused), _) => refused,
            }
        }
    };
    problems.problem(&location(file, at), refused);
    None
}

/// A limit without `calendar`: `week_starts` alone is refused, as it would change nothing.
pub fn no_calendar(
    week_starts: Option<&Spanned<String>>,
    file: &Arc<str>,
    problems: &mut dyn Problems,
) -> Option<Option<Calendar>> {
    let Some(day) = week_starts else {
        return Some(None);
    };
    problems.problem(
        &location(file, &day.referenced),
        "`week_starts` needs `calendar: <zone>` and `unit: week`: an epoch-aligned week of 7 days has no first weekday to choose".into(),
    );
    None
}

/// Why a calendar limit cannot be counted by `algorithm`, if it cannot. A calendar window
/// starts over at its boundary, as a fixed window does, and is counted as one whichever
/// window algorithm applies: a sliding window's weighting needs windows of one length,
/// and a bucket or a log has no windows at all.
pub fn calendar_refuses(algorithm: Algorithm) -> Option<String> {
    (!matches!(algorithm, Algorithm::SlidingWindow | Algorithm::FixedWindow)).then(|| format!("a `calendar` limit is counted in fixed windows that start over at each calendar boundary, but {algorithm} applies here; put the calendar limit in a policy of its own, or set `algorithm: fixed_window`"))
}

/// `1m`, `month`, or `month in Europe/Berlin`: how a problem names a limit's window.
fn describe_window(spec: &LimitSpec) -> String {
    match (spec.calendar, Unit::from_millis(spec.window_millis)) {
        (Some(calendar), _) => format!(
            "{calendar} in {} (calendar, fixed_window)",
            calendar.zone.name()
        ),
        (None, Some(unit)) => unit.to_string(),
        (None, None) => format_duration(spec.window_millis),
    }
}

/// Turns a resolved policy into concrete limits, or reports why it cannot apply.
pub fn limits_of(
    policy: &ResolvedPolicy,
    default_algorithm: Algorithm,
    max_sliding_log: u32,
    used_at: &SourceLocation,
    problems: &mut dyn Problems,
) -> Option<Vec<Limit>> {
    let Some((specs, _)) = &policy.limits else {
        problems.problem(
            used_at,
            "the policy that applies here has no `limits`; add `limits:` to it or to this block"
                .into(),
        );
        return None;
    };
    if specs.is_empty() {
        // Refused limits, already reported (a written `limits: []` is refused too).
        return None;
    }
    let algorithm = policy
        .algorithm
        .as_ref()
        .map_or(default_algorithm, |(a, _)| *a);
    let burst = match (&policy.burst, &policy.capacity, algorithm) {
        (Some((burst, _)), _, Algorithm::TokenBucket) => Some(*burst),
        (_, Some((capacity, _)), Algorithm::LeakyBucket) => Some(*capacity),
        (Some((_, origin)), _, other) => {
            problems.problem(&origin.at, format!("`burst` only applies to `algorithm: token_bucket`, but {other} applies here; remove `burst` or set the algorithm"));
            return None;
        }
        (_, Some((_, origin)), other) => {
            problems.problem(&origin.at, format!("`capacity` only applies to `algorithm: leaky_bucket`, but {other} applies here; remove `capacity` or set the algorithm"));
            return None;
        }
        (None, None, _) => None,
    };
    let hybrid = match &policy.hybrid {
        Some((true, _)) if algorithm == Algorithm::FixedWindow => true,
        Some((true, origin)) => {
            // Only a fixed window's state is a count that several replicas can each add
            // to without reading the others' state first; the others are decided exactly.
            problems.problem(&origin.at, format!("`hybrid: true` counts fixed windows only (a per-window count each replica can add its hits to), but {algorithm} applies here; remove `hybrid` or set `algorithm: fixed_window`"));
            return None;
        }
        _ => false,
    };
    if let Some((true, origin)) = &policy.count_rejected {
        if algorithm == Algorithm::SlidingLog {
            // A log would keep a timestamp for every rejected hit, without bound.
            problems.problem(&origin.at, format!("`count_rejected: true` counts into windows and buckets, not a sliding log (it would keep a timestamp for every rejected hit), but {algorithm} applies here; remove `count_rejected` or set the algorithm"));
            return None;
        }
        if hybrid {
            problems.problem(&origin.at, "`count_rejected: true` and `hybrid: true` do not go together: hybrid counting adds only admitted hits to Redis; remove one".into());
            return None;
        }
    }
    if specs.iter().any(|s| s.calendar.is_some()) {
        let at = policy
            .limits
            .as_ref()
            .map_or(used_at, |(_, origin)| &origin.at);
        if let Some(problem) = calendar_refuses(algorithm) {
            problems.problem(at, problem);
            return None;
        }
    }
    if algorithm == Algorithm::SlidingLog
        && let Some(too_big) = specs.iter().find(|s| s.requests_per_unit > max_sliding_log)
    {
        let at = policy
            .limits
            .as_ref()
            .map_or(used_at, |(_, origin)| &origin.at);
        problems.problem(
            at,
            sliding_log_too_big(too_big.requests_per_unit, max_sliding_log),
        );
        return None;
    }
    Some(
        specs
            .iter()
            .map(|spec| Limit {
                requests_per_unit: spec.requests_per_unit,
                window_millis: spec.window_millis,
                algorithm: match spec.calendar {
                    Some(_) => Algorithm::FixedWindow,
                    None => algorithm,
                },
                burst,
                hybrid,
                calendar: spec.calendar,
            })
            .collect(),
    )
}

/// The sliding log keeps one timestamp per admitted hit, so large limits cost memory.
pub fn sliding_log_too_big(requests_per_unit: u32, max: u32) -> String {
    format!(
        "`sliding_log` keeps every admitted hit's timestamp, and {requests_per_unit} per window is above the maximum of {max} (--max-sliding-log-limit); use `sliding_window`, which is close for large limits at a fixed cost"
    )
}

/// One line per field of a resolved policy and where it came from, for `explain`.
pub fn describe(policy: &ResolvedPolicy, default_algorithm: Algorithm) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some((limits, origin)) = &policy.limits {
        let limits: Vec<String> = limits
            .iter()
            .map(|l| format!("{}/{}", l.requests_per_unit, describe_window(l)))
            .collect();
        lines.push(format!("limits: {} — from {origin}", limits.join(", ")));
    }
    // A calendar limit is counted in fixed windows whatever the policy's algorithm says.
    let calendar = policy
        .limits
        .as_ref()
        .is_some_and(|(limits, _)| limits.iter().any(|l| l.calendar.is_some()));
    let algorithm = policy
        .algorithm
        .as_ref()
        .map_or(default_algorithm, |(a, _)| *a);
    let except = if calendar && algorithm != Algorithm::FixedWindow {
        " (its calendar limits: fixed_window)"
    } else {
        ""
    };
    match &policy.algorithm {
        Some((algorithm, origin)) => {
            lines.push(format!("algorithm: {algorithm}{except} — from {origin}"));
        }
        None => lines.push(format!(
            "algorithm: {default_algorithm}{except} — the service default"
        )),
    }
    if let Some((burst, origin)) = &policy.burst {
        lines.push(format!("burst: {burst} — from {origin}"));
    }
    if let Some((capacity, origin)) = &policy.capacity {
        lines.push(format!("capacity: {capacity} — from {origin}"));
    }
    if let Some((hybrid, origin)) = &policy.hybrid {
        let how = if *hybrid {
            "with --store redis each replica counts locally and adds its hits to Redis in batches"
        } else {
            "every hit goes to the store"
        };
        lines.push(format!("hybrid: {hybrid} ({how}) — from {origin}"));
    }
    if let Some((count, origin)) = &policy.count_rejected {
        let how = if *count {
            "hits over the limit count too"
        } else {
            "only admitted hits count"
        };
        lines.push(format!("count_rejected: {count} ({how}) — from {origin}"));
    }
    if let Some((shadow, origin)) = &policy.shadow_mode {
        lines.push(format!("shadow_mode: {shadow} — from {origin}"));
    }
    if let Some((name, origin)) = &policy.name {
        lines.push(format!("name: {name} — from {origin}"));
    }
    if let Some((warn, origin)) = &policy.warn_only {
        lines.push(format!(
            "mode: {} — from {origin}",
            if *warn { "warn" } else { "enforce" }
        ));
    }
    if let Some((ratio, origin)) = &policy.soft_limit {
        lines.push(format!("soft_limit: {} — from {origin}", ratio.as_f64()));
    }
    if let Some((penalty, origin)) = &policy.penalty {
        lines.push(format!(
            "penalty: block for {} after {} rejections within {} — from {origin}",
            format_duration(penalty.block_millis),
            penalty.after_rejections,
            format_duration(penalty.within_millis)
        ));
    }
    if let Some((headers, origin)) = &policy.headers {
        lines.push(format!("headers: {headers} — from {origin}"));
    }
    if let Some((_, origin)) = &policy.body {
        lines.push(format!("body: custom 429 body — from {origin}"));
    }
    if let Some((priority, origin)) = &policy.priority {
        lines.push(format!("priority: {priority} — from {origin}"));
    }
    if let Some((reserved, origin)) = &policy.reserved {
        lines.push(format!(
            "reserved: {} of the domain capacity — from {origin}",
            reserved.as_f64()
        ));
    }
    lines
}
