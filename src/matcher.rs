//! Descriptor matching: the compiled descriptor tree of each domain and its lookup.
//!
//! The lookup follows envoyproxy/ratelimit step by step, so a config migrated from it
//! matches the same nodes: at each level try the exact `key=value`, then the wildcard values
//! (`value: "prefix*"`, `"a*b"`, `"*x*"`: each `*` any run of characters) in file order,
//! then the value-less `key`; never backtrack; take a rule only from the node matched by
//! the request's last entry.

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::fast::RandomState;

use crate::limit::{Algorithm, Limit};
use crate::proto::rate_limit_descriptor::Entry;
use crate::rule::Rule;

type Map<V> = HashMap<Box<str>, V, RandomState>;

/// All domains of a loaded config.
#[derive(Debug, Default)]
pub struct RateLimitConfig {
    domains: Map<DomainTree>,
    /// The algorithm of rules that name none, also used for request-supplied overrides.
    pub default_algorithm: Algorithm,
}

impl RateLimitConfig {
    pub fn new(
        domains: impl IntoIterator<Item = DomainTree>,
        default_algorithm: Algorithm,
    ) -> Self {
        Self {
            default_algorithm,
            domains: domains
                .into_iter()
                .map(|domain| (domain.name.clone(), domain))
                .collect(),
        }
    }

    pub fn domain(&self, name: &str) -> Option<&DomainTree> {
        self.domains.get(name)
    }

    /// Moves the domains out, e.g. to compile one file on its own.
    pub fn take_domains(&mut self) -> Vec<DomainTree> {
        self.domains.drain().map(|(_, domain)| domain).collect()
    }

    /// The domains' names, sorted and comma-separated, for messages.
    pub fn domain_names(&self) -> String {
        let names: Vec<&str> = self.domains().iter().map(|d| &*d.name).collect();
        names.join(", ")
    }

    /// Domains sorted by name, for stable reports.
    pub fn domains(&self) -> Vec<&DomainTree> {
        let mut domains: Vec<_> = self.domains.values().collect();
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        domains
    }
}

/// One domain's descriptor tree.
#[derive(Debug)]
pub struct DomainTree {
    pub name: Box<str>,
    pub file: Arc<str>,
    pub(crate) root: Level,
    /// Shared capacity, divided by priority, checked before any descriptor's own limits.
    pub capacity: Option<Capacity>,
}

/// A domain's shared capacity. Requests of priority `p` are admitted while the domain's use
/// stays within the capacity minus what higher priorities reserve, so a flood of low
/// priority traffic can never take a higher priority's reserved share, and the highest
/// priority may use everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// The whole domain's limit (sliding window).
    pub limit: Limit,
    /// `(priority, reserved requests)`, highest priority first.
    pub reservations: Vec<(i64, u64)>,
    pub source: crate::rule::SourceLocation,
}

impl Capacity {
    /// The most of the capacity requests of `priority` may fill.
    pub fn threshold(&self, priority: i64) -> u64 {
        let reserved_above: u64 = self
            .reservations
            .iter()
            .filter(|(p, _)| *p > priority)
            .map(|(_, reserved)| reserved)
            .sum();
        u64::from(self.limit.requests_per_unit).saturating_sub(reserved_above)
    }
}

impl DomainTree {
    /// The rule for a request descriptor's entries, if any.
    pub fn lookup(&self, entries: &[Entry]) -> Option<&Rule> {
        self.walk(entries, &mut NoTrace)
            .and_then(|node| node.rule.as_deref())
    }

    /// Like `lookup`, and also says, step by step, what was tried and why it did or did
    /// not match: what `meshlimit explain` prints.
    pub fn lookup_traced(&self, entries: &[Entry]) -> (Option<&Node>, Vec<String>) {
        let mut steps = Vec::new();
        let node = self.walk(entries, &mut steps);
        (node, steps)
    }

    /// The node matched by the last entry, if the walk gets that far.
    fn walk<T: Trace>(&self, entries: &[Entry], trace: &mut T) -> Option<&Node> {
        let mut level = &self.root;
        let last = entries.len().checked_sub(1)?;
        for (i, entry) in entries.iter().enumerate() {
            let node = level.find(&entry.key, &entry.value, trace)?;
            if i == last {
                return Some(node);
            }
            // A node with no children ends the walk: a request deeper than the config has
            // no limit (envoyproxy/ratelimit: "request depth does not match config depth").
            if node.children.is_empty() {
                trace.step(|| format!("{} has no nested descriptors, so the remaining entries match nothing: no limit", node.label));
                return None;
            }
            level = &node.children;
        }
        None
    }

    /// Every rule in the tree, depth first in file order of keys as stored.
    pub fn rules(&self) -> Vec<&Rule> {
        let mut rules = Vec::new();
        self.root.collect_rules(&mut rules);
        rules.sort_by_key(|rule| (rule.source.line, rule.source.column));
        rules
    }
}

/// The descriptors configured at one depth of the tree, grouped by key.
#[derive(Debug, Default)]
pub(crate) struct Level {
    keys: Map<KeyBranch>,
}

#[derive(Debug, Default)]
struct KeyBranch {
    exact: Map<Node>,
    /// Values written with a `*`, in file order.
    wildcards: Vec<(Wildcard, Node)>,
    any_value: Option<Box<Node>>,
}

#[derive(Debug, Default)]
pub struct Node {
    pub rule: Option<Arc<Rule>>,
    pub(crate) children: Level,
    /// How the node is written, e.g. "`user: alice`" or "`user` (any value)".
    pub label: Box<str>,
    pub source: Option<crate::rule::SourceLocation>,
    /// Why a node without a rule has none, for `explain`.
    pub note: Option<Box<str>>,
}

/// Records the steps of a lookup; the request path uses `NoTrace`, which compiles away.
trait Trace {
    fn step(&mut self, describe: impl FnOnce() -> String);
}

struct NoTrace;

impl Trace for NoTrace {
    #[inline(always)]
    fn step(&mut self, _: impl FnOnce() -> String) {}
}

impl Trace for Vec<String> {
    fn step(&mut self, describe: impl FnOnce() -> String) {
        self.push(describe());
    }
}

/// How a descriptor's value is written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ValuePattern {
    Exact(String),
    Wildcard(Wildcard),
    Any,
}

impl ValuePattern {
    pub(crate) fn parse(value: Option<&str>) -> Self {
        match value {
            None | Some("") => ValuePattern::Any,
            Some(value) if value.contains('*') => ValuePattern::Wildcard(Wildcard::new(value)),
            Some(value) => ValuePattern::Exact(value.to_owned()),
        }
    }
}

/// A value written with `*`s, each standing for any run of characters (none included):
/// `files/*`, `*.pdf`, `api/*/orders`. envoyproxy/ratelimit first allowed only a
/// trailing `*` and later any number anywhere; both read the same here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Wildcard {
    /// As written, e.g. `api/*/orders`.
    pattern: Box<str>,
    /// The literal runs between the `*`s: `["api/", "/orders"]`. There is always one more
    /// than there are `*`s, so the first and last may be empty.
    parts: Box<[Box<str>]>,
}

impl Wildcard {
    pub(crate) fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.into(),
            parts: pattern.split('*').map(Into::into).collect(),
        }
    }

    pub(crate) fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether `value` is the literal runs in order, with anything between them. The
    /// first run must open the value and the last close it; the middle ones are taken
    /// leftmost first, which finds a match whenever one exists.
    pub(crate) fn matches(&self, value: &str) -> bool {
        let (first, rest) = match &*self.parts {
            [first, rest @ ..] => (first, rest),
            [] => return false,
        };
        let Some(mut left) = value.strip_prefix(&**first) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return left.is_empty();
        };
        // The last run is taken off the end first, so a middle run cannot use its bytes.
        let Some(between) = left.strip_suffix(&**last) else {
            return false;
        };
        left = between;
        for part in middle {
            match left.find(&**part) {
                Some(at) => left = &left[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

impl Level {
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn find<T: Trace>(&self, key: &str, value: &str, trace: &mut T) -> Option<&Node> {
        let Some(branch) = self.keys.get(key) else {
            trace.step(|| {
                let mut keys: Vec<&str> = self.keys.keys().map(|k| &**k).collect();
                keys.sort_unstable();
                format!("`{key}: {value}`: no descriptor with key `{key}` here (keys at this level: {})", keys.join(", "))
            });
            return None;
        };
        if let Some(node) = branch.exact.get(value) {
            trace.step(|| format!("`{key}: {value}`: matched {} exactly", node.label));
            return Some(node);
        }
        trace.step(|| format!("`{key}: {value}`: no exact `{key}: {value}`"));
        for (wildcard, node) in &branch.wildcards {
            if wildcard.matches(value) {
                trace.step(|| {
                    format!(
                        "`{key}: {value}`: matched wildcard `{}`",
                        wildcard.pattern()
                    )
                });
                return Some(node);
            }
            trace.step(|| {
                format!(
                    "`{key}: {value}`: wildcard `{}` does not match",
                    wildcard.pattern()
                )
            });
        }
        match branch.any_value.as_deref() {
            Some(node) => {
                trace.step(|| format!("`{key}: {value}`: matched {}", node.label));
                Some(node)
            }
            None => {
                trace.step(|| {
                    format!("`{key}: {value}`: no value-less `{key}` to fall back to: no limit")
                });
                None
            }
        }
    }

    /// Adds a node; `false` when the same key and value pattern is already there.
    pub(crate) fn insert(&mut self, key: &str, value: ValuePattern, node: Node) -> bool {
        let branch = self.keys.entry(key.into()).or_default();
        match value {
            ValuePattern::Exact(value) => {
                if branch.exact.contains_key(value.as_str()) {
                    return false;
                }
                branch.exact.insert(value.into(), node);
            }
            ValuePattern::Wildcard(wildcard) => {
                if branch.wildcards.iter().any(|(w, _)| *w == wildcard) {
                    return false;
                }
                branch.wildcards.push((wildcard, node));
            }
            ValuePattern::Any => {
                if branch.any_value.is_some() {
                    return false;
                }
                branch.any_value = Some(Box::new(node));
            }
        }
        true
    }

    fn collect_rules<'a>(&'a self, out: &mut Vec<&'a Rule>) {
        for branch in self.keys.values() {
            let nodes = branch
                .exact
                .values()
                .chain(branch.wildcards.iter().map(|(_, node)| node))
                .chain(branch.any_value.as_deref());
            for node in nodes {
                out.extend(node.rule.as_deref());
                node.children.collect_rules(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::Wildcard;

    /// Glob matching the slow, obviously right way: try every length for each `*`.
    fn reference(pattern: &[u8], value: &[u8]) -> bool {
        match pattern.split_first() {
            None => value.is_empty(),
            Some((b'*', rest)) => (0..=value.len()).any(|skip| reference(rest, &value[skip..])),
            Some((c, rest)) => value.first() == Some(c) && reference(rest, &value[1..]),
        }
    }

    proptest! {
        // Small alphabets so stars, repeats and overlaps between runs come up often.
        #[test]
        fn matches_like_a_glob(pattern in "[ab*]{0,8}", value in "[ab]{0,10}") {
            let wildcard = Wildcard::new(&pattern);
            prop_assert_eq!(
                wildcard.matches(&value),
                reference(pattern.as_bytes(), value.as_bytes()),
                "pattern {:?} value {:?}", pattern, value
            );
        }
    }
}
