//! Compiling one domain: walking its descriptors top-down with the policy each node
//! inherits, and producing the `DomainTree` requests are matched against.
//!
//! Precedence, resolved here once so the request path only looks rules up:
//! the node's own setting > its nearest ancestor's > the domain's `defaults` > the shared
//! `defaults`. envoyproxy/ratelimit's `rate_limit` applies to its node alone and is never
//! inherited, so a file using only its fields keeps exactly its old meaning.

use std::collections::HashMap;
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::error::ConfigError;
use super::file::{DescriptorEntry, PolicyFields, RateLimitBlock};
use super::policy::{self, Overrides, PolicyTable, Problems, ResolvedPolicy, Scope, location};
use crate::limit::{Algorithm, Limit, Unit};
use crate::matcher::{Level, Node, ValuePattern};
use crate::rule::{MetricPart, Rule, RuleLimit, SourceLocation, Treatment};
use prost_types::value::Kind;

/// The policy that applies at a node with the node's own `shadow_mode`, which is then
/// inherited like the policy's other fields: trying a limit out on a service in shadow
/// mode tries it on all its routes. Beside envoyproxy's `rate_limit`, which is never
/// inherited, a `shadow_mode` is that rule's alone, as in envoyproxy/ratelimit.
fn with_node_shadow(
    applies: Inherited,
    entry: &DescriptorEntry,
    what: &str,
    file: &Arc<str>,
) -> Inherited {
    match (&entry.shadow_mode, &entry.rate_limit, applies) {
        (Some(shadow), None, Inherited::Policy { policy, via }) => {
            let origin = policy::Origin {
                what: what.to_owned(),
                at: location(file, &shadow.referenced),
            };
            Inherited::Policy {
                policy: Arc::new(ResolvedPolicy {
                    shadow_mode: Some((shadow.value, origin)),
                    ..(*policy).clone()
                }),
                via,
            }
        }
        (_, _, applies) => applies,
    }
}

/// What a node passes down to its descendants.
#[derive(Debug, Clone)]
pub enum Inherited {
    Nothing,
    Policy {
        policy: Arc<ResolvedPolicy>,
        via: String,
    },
    Unlimited {
        via: String,
    },
    NoLimit {
        via: String,
    },
}

/// One node on the way from the domain to a rule: what the rule's counter keys and metric
/// key take from the request entry that node matched.
#[derive(Debug, Clone)]
pub struct Step {
    metric: MetricPart,
    /// The part of a `detailed_metric` key: the request's value, or a shared wildcard.
    detailed: MetricPart,
    /// `share_threshold`: the wildcard, as written, that stands for the entry's value.
    shared: Option<Box<str>>,
}

pub struct Compiler<'t, 'd> {
    pub table: &'t mut PolicyTable<'d>,
    pub default_algorithm: Algorithm,
    pub max_sliding_log: u32,
    pub errors: Vec<ConfigError>,
}

impl Problems for Vec<ConfigError> {
    fn problem(&mut self, at: &SourceLocation, message: String) {
        self.push(ConfigError::at(at, message));
    }
}

impl Compiler<'_, '_> {
    fn error(&mut self, at: &SourceLocation, message: impl Into<String>) {
        self.errors.push(ConfigError::at(at, message));
    }

    /// What `defaults:` hands to every node that sets nothing itself.
    pub fn defaults(
        &mut self,
        fields: &Spanned<PolicyFields>,
        file: &Arc<str>,
        what: &str,
        scope: Scope<'_>,
    ) -> Inherited {
        let at = location(file, &fields.referenced);
        let via = format!("{what} ({at})");
        let fields = &fields.value;
        let overrides = Overrides {
            limits: fields.limits.as_ref(),
            algorithm: fields.algorithm.as_ref(),
            burst: fields.burst.as_ref(),
            capacity: fields.capacity.as_ref(),
            shadow_mode: None,
            name: None,
            policy_only: None,
        };
        self.own_setting(
            fields.unlimited.as_ref(),
            fields.policy.as_ref(),
            &overrides,
            &Inherited::Nothing,
            file,
            what,
            &via,
            scope,
        )
        .unwrap_or(Inherited::Nothing)
    }

    /// A block's own policy setting, if it has one: `unlimited`, `policy: none`,
    /// `policy: NAME`, or inline fields over the named or inherited policy.
    #[allow(clippy::too_many_arguments)]
    fn own_setting(
        &mut self,
        unlimited: Option<&Spanned<bool>>,
        policy: Option<&Spanned<String>>,
        overrides: &Overrides<'_>,
        inherited: &Inherited,
        file: &Arc<str>,
        what: &str,
        via: &str,
        scope: Scope<'_>,
    ) -> Option<Inherited> {
        if let Some(off) = unlimited.filter(|u| !u.value)
            && policy.is_none()
            && overrides.is_empty()
            && matches!(inherited, Inherited::Unlimited { .. })
        {
            // It reads as "limited again", but there is no limit to go back to.
            self.error(&location(file, &off.referenced), format!("{what} says `unlimited: false` under an unlimited ancestor, which leaves it unlimited; give it a `policy` or `limits` to limit it"));
        }
        if let Some(unlimited) = unlimited.filter(|u| u.value) {
            if policy.is_some() || !overrides.is_empty() {
                self.error(
                    &location(file, &unlimited.referenced),
                    format!(
                        "{what} says `unlimited: true` and also sets a policy; remove one of them"
                    ),
                );
            }
            return Some(Inherited::Unlimited {
                via: via.to_owned(),
            });
        }
        if let Some(policy) = policy.filter(|p| p.value == "none") {
            if !overrides.is_empty() {
                self.error(
                    &location(file, &policy.referenced),
                    format!("{what} says `policy: none` and also sets limits; remove one of them"),
                );
            }
            return Some(Inherited::NoLimit {
                via: via.to_owned(),
            });
        }
        let base = match policy {
            Some(name) => {
                let at = location(file, &name.referenced);
                let resolved = self
                    .table
                    .resolve(&name.value, scope, &at, &mut self.errors)?;
                (*resolved).clone()
            }
            None if overrides.is_empty() => return None,
            // Inline fields alone refine whatever would apply here otherwise.
            None => match inherited {
                Inherited::Policy { policy, .. } => (**policy).clone(),
                _ => ResolvedPolicy::default(),
            },
        };
        let resolved = policy::apply_overrides(base, overrides, what, file, &mut self.errors);
        Some(Inherited::Policy {
            policy: Arc::new(resolved),
            via: via.to_owned(),
        })
    }

    /// Compiles the descriptors of one level; `path` is the stat-style path of the parent
    /// and `above` the steps that led to it.
    pub fn level(
        &mut self,
        path: &str,
        above: &[Step],
        entries: &[DescriptorEntry],
        inherited: &Inherited,
        domain_file: &Arc<str>,
    ) -> Level {
        let mut level = Level::default();
        let mut seen: HashMap<(String, ValuePattern), SourceLocation> = HashMap::new();
        for entry in entries {
            let file = entry.file.clone().unwrap_or_else(|| domain_file.clone());
            let Some(key) = &entry.key else {
                let at = entry
                    .rate_limit
                    .as_ref()
                    .map(|block| location(&file, &block.referenced))
                    .unwrap_or_else(|| location(&file, &serde_saphyr::Location::UNKNOWN));
                self.error(&at, "a descriptor has no `key`; write the key Envoy sends, e.g. `key: remote_address`");
                continue;
            };
            let at = location(&file, &key.referenced);
            if key.value.is_empty() {
                self.error(
                    &at,
                    "`key` is empty; write the key Envoy sends, e.g. `key: remote_address`",
                );
                continue;
            }
            let value = entry
                .value
                .as_ref()
                .map(|value| value.value.as_str())
                .filter(|v| !v.is_empty());
            let pattern = ValuePattern::parse(value);
            let (node_path, label) = match value {
                Some(value) => (
                    format!("{path}.{}_{value}", key.value),
                    format!("`{}: {value}`", key.value),
                ),
                None => (
                    format!("{path}.{}", key.value),
                    format!("`{}` (any value)", key.value),
                ),
            };
            if let Some(first) = seen.get(&(key.value.clone(), pattern.clone())) {
                let described = match value {
                    Some(value) => format!("`{}: {value}`", key.value),
                    None => format!("`{}` without a value", key.value),
                };
                // Files merged into one domain share its top level.
                let place = if first.file == at.file {
                    format!("line {}", first.line)
                } else {
                    format!("{}:{}", first.file, first.line)
                };
                self.error(&at, format!("the descriptor {described} is already defined at {place} of this level; merge the two blocks"));
                continue;
            }
            seen.insert((key.value.clone(), pattern.clone()), at.clone());
            let Some(step) = self.step(entry, &key.value, &pattern, &file) else {
                continue;
            };
            let steps = [above, &[step]].concat();

            let what = format!("descriptor {label}");
            let via = format!("{what} ({at})");
            let overrides = Overrides {
                limits: entry.limits.as_ref(),
                algorithm: entry.algorithm.as_ref(),
                burst: entry.burst.as_ref(),
                capacity: entry.capacity.as_ref(),
                shadow_mode: None,
                name: None,
                policy_only: None,
            };
            let own = self.own_setting(
                entry.unlimited.as_ref(),
                entry.policy.as_ref(),
                &overrides,
                inherited,
                &file,
                &what,
                &via,
                Scope::Domain(self.table.domain),
            );
            let applies = with_node_shadow(
                own.clone().unwrap_or_else(|| inherited.clone()),
                entry,
                &what,
                &file,
            );
            let rule = match (&entry.rate_limit, &own) {
                (Some(block), Some(_)) => {
                    self.error(&location(&file, &block.referenced), format!("{what} has both envoyproxy's `rate_limit` and a meshlimit policy (`policy`, `limits`, `algorithm`, `burst` or `unlimited`); keep one of them"));
                    None
                }
                (Some(block), None) => {
                    self.compat_rule(block, entry, &file, &key.value, &node_path)
                }
                (None, Some(_)) => {
                    self.policy_rule(&applies, entry, &at, &node_path, "its own setting")
                }
                (None, None) => self.policy_rule(&applies, entry, &at, &node_path, "inherited"),
            }
            .map(|rule| with_steps(rule, &steps));
            let rule = match (rule, &entry.metadata) {
                (Some(mut rule), Some(metadata)) => {
                    rule.metadata = self.metadata(metadata, &file);
                    Some(rule)
                }
                (rule, _) => rule,
            };
            let setting = own.as_ref().unwrap_or(inherited);
            let note = match (&rule, setting) {
                (Some(_), _) => None,
                (None, Inherited::NoLimit { via }) => Some(format!("no limit — `policy: none` at {via}")),
                (None, _) => Some("no limit — no `rate_limit`, `policy`, `limits` or `defaults` apply to this node".to_owned()),
            };
            let passed_down = applies;
            let children = self.level(
                &node_path,
                &steps,
                &entry.descriptors,
                &passed_down,
                domain_file,
            );
            level.insert(
                &key.value,
                pattern,
                Node {
                    rule: rule.map(Arc::new),
                    children,
                    label: label.into(),
                    source: Some(at),
                    note: note.map(String::into_boxed_str),
                },
            );
        }
        level
    }

    /// A descriptor's `metadata` block as Envoy's metadata: it must be a mapping.
    fn metadata(
        &mut self,
        metadata: &Spanned<serde_json::Value>,
        file: &Arc<str>,
    ) -> Option<prost_types::Struct> {
        match to_proto(&metadata.value).kind {
            Some(Kind::StructValue(fields)) => Some(fields),
            _ => {
                self.error(&location(file, &metadata.referenced), "`metadata` must be a mapping of names to values, e.g. `metadata: {team: payments}`");
                None
            }
        }
    }

    /// What a node's matched entry gives rules below it; `None` after an error.
    fn step(
        &mut self,
        entry: &DescriptorEntry,
        key: &str,
        pattern: &ValuePattern,
        file: &Arc<str>,
    ) -> Option<Step> {
        let share = entry.share_threshold.as_ref().filter(|s| s.value);
        let by_value = entry.value_to_metric;
        let step = match pattern {
            ValuePattern::Exact(value) => {
                if let Some(share) = share {
                    self.error(&location(file, &share.referenced), format!("`share_threshold` is for wildcard values, and `{key}: {value}` has no `*`; remove it, or write the value as a wildcard such as `{value}*`"));
                    return None;
                }
                Step {
                    metric: MetricPart::Written(format!("{key}_{value}").into()),
                    detailed: MetricPart::RequestValue(key.into()),
                    shared: None,
                }
            }
            ValuePattern::Wildcard(wildcard) => {
                let written: Box<str> = format!("{key}_{}", wildcard.pattern()).into();
                Step {
                    metric: if by_value && share.is_none() {
                        MetricPart::RequestValue(key.into())
                    } else {
                        MetricPart::Written(written.clone())
                    },
                    // Values sharing one counter share one series too.
                    detailed: if share.is_some() {
                        MetricPart::Written(written)
                    } else {
                        MetricPart::RequestValue(key.into())
                    },
                    shared: share.map(|_| wildcard.pattern().into()),
                }
            }
            ValuePattern::Any => {
                if let Some(share) = share {
                    self.error(&location(file, &share.referenced), format!("`share_threshold` is for wildcard values, and `{key}` has no value; remove it (a value-less key already counts each value on its own), or give it a wildcard value"));
                    return None;
                }
                Step {
                    metric: if by_value {
                        MetricPart::RequestValue(key.into())
                    } else {
                        MetricPart::Written(key.into())
                    },
                    detailed: MetricPart::RequestValue(key.into()),
                    shared: None,
                }
            }
        };
        Some(step)
    }

    fn policy_rule(
        &mut self,
        setting: &Inherited,
        entry: &DescriptorEntry,
        at: &SourceLocation,
        path: &str,
        how: &str,
    ) -> Option<Rule> {
        let shadow_flag = entry.shadow_mode.as_ref().map(|s| s.value);
        let mut treatment = Treatment::default();
        let mut count_rejected = false;
        let (limit, name, shadow, provenance) = match setting {
            Inherited::Nothing | Inherited::NoLimit { .. } => return None,
            Inherited::Unlimited { via } => (
                RuleLimit::Unlimited,
                None,
                false,
                vec![format!("unlimited — {how}: {via}")],
            ),
            Inherited::Policy { policy, via } => {
                let limits = policy::limits_of(
                    policy,
                    self.default_algorithm,
                    self.max_sliding_log,
                    at,
                    &mut self.errors,
                )?;
                let mut provenance = vec![format!("policy — {how}: {via}")];
                provenance.extend(policy::describe(policy, self.default_algorithm));
                let shadow = shadow_flag
                    .or(policy.shadow_mode.as_ref().map(|(s, _)| *s))
                    .unwrap_or(false);
                count_rejected = policy.count_rejected.as_ref().is_some_and(|(c, _)| *c);
                treatment = Treatment {
                    warn_only: policy.warn_only.as_ref().is_some_and(|(w, _)| *w),
                    soft_limit: policy.soft_limit.as_ref().map(|(r, _)| r.0),
                    penalty: policy.penalty.as_ref().map(|(p, _)| *p),
                    headers: policy.headers.as_ref().map(|(h, _)| *h),
                    body: policy.body.as_ref().map(|(b, _)| b.clone()),
                    priority: policy.priority.as_ref().map_or(0, |(p, _)| *p),
                    reserved: policy.reserved.as_ref().map_or(0, |(r, _)| r.0),
                };
                (
                    RuleLimit::Limited(limits.into()),
                    policy
                        .name
                        .as_ref()
                        .map(|(n, _)| n.clone().into_boxed_str()),
                    shadow,
                    provenance,
                )
            }
        };
        Some(Rule {
            limit,
            name,
            replaces: Box::new([]),
            shadow_mode: shadow,
            detailed_metric: entry.detailed_metric,
            shared_values: Box::default(),
            metric_key: Box::default(),
            metadata: None,
            quota_mode: quota_mode(entry),
            path: path.into(),
            source: at.clone(),
            count_rejected,
            provenance: provenance.into(),
            treatment,
            stats: Default::default(),
        })
    }

    /// envoyproxy/ratelimit's `rate_limit` block, with its exact meaning.
    fn compat_rule(
        &mut self,
        block: &Spanned<RateLimitBlock>,
        entry: &DescriptorEntry,
        file: &Arc<str>,
        key: &str,
        path: &str,
    ) -> Option<Rule> {
        let at = location(file, &block.referenced);
        let block = &block.value;
        let limit = if block.unlimited {
            if let Some(rpu) = &block.requests_per_unit {
                self.error(&location(file, &rpu.referenced), format!("`unlimited: true` and `requests_per_unit` under key `{key}` contradict each other; remove one of them"));
                return None;
            }
            if let Some(unit) = &block.unit {
                self.error(
                    &location(file, &unit.referenced),
                    format!("`unlimited: true` under key `{key}` takes no `unit`; remove it"),
                );
                return None;
            }
            RuleLimit::Unlimited
        } else {
            RuleLimit::Limited(Box::new([self.compat_limit(block, file, key, &at)?]))
        };
        let mut replaces = Vec::new();
        for replaced in &block.replaces {
            match &replaced.name {
                // envoyproxy/ratelimit refuses this too: the rule would switch itself off
                // for every request it matches.
                Some(name) if block.name.as_ref().is_some_and(|own| own.value == name.value) => {
                    self.error(&location(file, &name.referenced), format!("the rate limit `{}` under key `{key}` replaces itself, so it would never apply; remove its own name from `replaces`", name.value));
                }
                Some(name) if !name.value.is_empty() => replaces.push(name.value.clone().into()),
                _ => self.error(&at, format!("an entry of `replaces` under key `{key}` has no `name`; write the `name` of the rate limit to replace")),
            }
        }
        let count_rejected = matches!(&limit, RuleLimit::Limited(limits) if limits.iter().all(|l| l.algorithm == Algorithm::FixedWindow));
        let provenance = vec![match &limit {
            RuleLimit::Limited(limits) => format!(
                "rate_limit {} — its own `rate_limit` ({at}); applies to this node only",
                limits
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            RuleLimit::Unlimited => {
                format!("unlimited — its own `rate_limit` ({at}); applies to this node only")
            }
        }];
        Some(Rule {
            limit,
            name: block
                .name
                .as_ref()
                .filter(|name| !name.value.is_empty())
                .map(|name| name.value.clone().into()),
            replaces: replaces.into(),
            shadow_mode: entry.shadow_mode.as_ref().is_some_and(|s| s.value),
            detailed_metric: entry.detailed_metric,
            shared_values: Box::default(),
            metric_key: Box::default(),
            metadata: None,
            quota_mode: quota_mode(entry),
            path: path.into(),
            source: at,
            count_rejected,
            provenance: provenance.into(),
            treatment: Treatment::default(),
            stats: Default::default(),
        })
    }

    fn compat_limit(
        &mut self,
        block: &RateLimitBlock,
        file: &Arc<str>,
        key: &str,
        at: &SourceLocation,
    ) -> Option<Limit> {
        let units = "second, minute, hour, day, week, month or year";
        let unit = match &block.unit {
            None => {
                self.error(
                    at,
                    format!("`unit` is missing under key `{key}`; write one of {units}"),
                );
                None
            }
            Some(unit) => match unit.value.parse::<Unit>() {
                Ok(unit) => Some(unit),
                Err(()) => {
                    self.error(
                        &location(file, &unit.referenced),
                        format!(
                            "unknown unit `{}` under key `{key}`; write one of {units}",
                            unit.value
                        ),
                    );
                    None
                }
            },
        };
        let requests_per_unit = match &block.requests_per_unit {
            None => {
                self.error(at, format!("`requests_per_unit` is missing under key `{key}`; a limit of 0 would block every request — write a number, or `unlimited: true`"));
                None
            }
            Some(rpu) => match u32::try_from(rpu.value) {
                Ok(rpu) => Some(rpu),
                Err(_) => {
                    self.error(&location(file, &rpu.referenced), format!("`requests_per_unit` under key `{key}` is {}; write a whole number from 0 to {}", rpu.value, u32::MAX));
                    None
                }
            },
        };
        let algorithm = match &block.algorithm {
            None => Some(self.default_algorithm),
            Some(algorithm) => match algorithm.value.parse::<Algorithm>() {
                Ok(algorithm) => Some(algorithm),
                Err(()) => {
                    self.error(
                        &location(file, &algorithm.referenced),
                        format!(
                            "unknown algorithm `{}` under key `{key}`; write one of {}",
                            algorithm.value,
                            policy::algorithm_names()
                        ),
                    );
                    None
                }
            },
        };
        let week_starts = block.week_starts.as_ref();
        let calendar = match &block.calendar {
            None => policy::no_calendar(week_starts, file, &mut self.errors),
            Some(zone) => policy::calendar_of(
                zone,
                block.unit.as_ref(),
                week_starts,
                file,
                &mut self.errors,
            ),
        };
        let mut limit = Limit::per_unit(requests_per_unit?, unit?, algorithm?);
        if let Some(calendar) = calendar? {
            if let Some(problem) = policy::calendar_refuses(limit.algorithm) {
                self.error(at, problem);
                return None;
            }
            limit.calendar = Some(calendar);
            limit.algorithm = Algorithm::FixedWindow;
        }
        if limit.algorithm == Algorithm::SlidingLog
            && limit.requests_per_unit > self.max_sliding_log
        {
            self.error(
                at,
                policy::sliding_log_too_big(limit.requests_per_unit, self.max_sliding_log),
            );
            return None;
        }
        Some(limit)
    }
}

/// envoyproxy/ratelimit's `quota_mode: true` on a descriptor.
fn quota_mode(entry: &DescriptorEntry) -> bool {
    entry.quota_mode.as_ref().is_some_and(|q| q.value)
}

/// Gives a rule what the steps to it say about shared counters and metric keys, and says
/// so in its provenance (what `explain` and `/rlconfig` show).
fn with_steps(mut rule: Rule, steps: &[Step]) -> Rule {
    let mut provenance = rule.provenance.into_vec();
    rule.shared_values = steps
        .iter()
        .enumerate()
        .filter_map(|(at, step)| Some((at, step.shared.clone()?)))
        .collect();
    for (_, wildcard) in &rule.shared_values {
        provenance.push(format!(
            "share_threshold — every value matching `{wildcard}` counts on one counter"
        ));
    }
    if rule.quota_mode {
        provenance.push("quota_mode — over the limit, turns a request away only when all its quota-mode descriptors are over".to_owned());
    }
    // envoyproxy/ratelimit counts a `detailed_metric` rule's hits under a key with every
    // value of the request in it, in place of `value_to_metric`'s key.
    if rule.detailed_metric {
        rule.metric_key = steps.iter().map(|step| step.detailed.clone()).collect();
        provenance.push(format!(
            "detailed_metric — metric key {}",
            MetricPart::key_of(&rule.metric_key, steps.iter().map(|_| "<value>"))
        ));
    // The metric key differs from the rule's path only when some entry puts its value in.
    } else if steps
        .iter()
        .any(|step| matches!(step.metric, MetricPart::RequestValue(_)))
    {
        rule.metric_key = steps.iter().map(|step| step.metric.clone()).collect();
        provenance.push(format!(
            "value_to_metric — metric key {}",
            MetricPart::key_of(&rule.metric_key, steps.iter().map(|_| "<value>"))
        ));
    }
    rule.provenance = provenance.into();
    rule
}

/// A YAML value as a protobuf `Value`, the form Envoy's metadata takes. Numbers become
/// doubles, as in every protobuf `Struct`.
fn to_proto(value: &serde_json::Value) -> prost_types::Value {
    use serde_json::Value as Json;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_proto).collect(),
        }),
        Json::Object(fields) => Kind::StructValue(prost_types::Struct {
            fields: fields
                .iter()
                .map(|(name, value)| (name.clone(), to_proto(value)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}
