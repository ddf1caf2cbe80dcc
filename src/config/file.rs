//! The YAML shape of one config file, exactly as an operator writes it.
//!
//! The fields are envoyproxy/ratelimit's (`domain`, `descriptors`, `key`, `value`,
//! `rate_limit`, `shadow_mode`, `quota_mode`, `detailed_metric`, `value_to_metric`,
//! `share_threshold`, `metadata`), plus meshlimit's policy model
//! (`policies`, `defaults`, `extends`, and `policy` / `limits` on a descriptor). Unknown
//! fields are rejected rather than ignored: a typo like `request_per_unit` must not silently
//! become "no limit" or a limit of 0.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Absent in a shared file, which only offers `policies` and `defaults` to every domain.
    pub domain: Option<Spanned<String>>,
    /// Another domain whose descriptors, policies and defaults this one starts from.
    pub extends: Option<Spanned<String>>,
    #[serde(default)]
    pub policies: BTreeMap<String, Spanned<PolicyBlock>>,
    pub defaults: Option<Spanned<PolicyFields>>,
    pub capacity: Option<Spanned<CapacityBlock>>,
    #[serde(default, deserialize_with = "empty_if_null")]
    pub descriptors: Vec<DescriptorEntry>,
}

/// A list written with nothing after it (`descriptors:`) is an empty one, as in
/// envoyproxy/ratelimit, whose Go decoder takes it so: a file it loads must load here.
fn empty_if_null<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorEntry {
    pub key: Option<Spanned<String>>,
    pub value: Option<Spanned<String>>,
    /// envoyproxy/ratelimit's limit: applies to this node only, never inherited.
    pub rate_limit: Option<Spanned<RateLimitBlock>>,
    #[serde(default, deserialize_with = "empty_if_null")]
    pub descriptors: Vec<DescriptorEntry>,
    pub shadow_mode: Option<Spanned<bool>>,
    #[serde(default)]
    pub detailed_metric: bool,
    /// envoyproxy/ratelimit's: value-less and wildcard nodes put the request's value in
    /// the rule's metric key.
    #[serde(default)]
    pub value_to_metric: bool,
    /// envoyproxy/ratelimit's, wildcard values only: every value the wildcard matches
    /// counts on one counter instead of one each.
    pub share_threshold: Option<Spanned<bool>>,
    /// envoyproxy/ratelimit's soft check: over the limit, the descriptor is still answered
    /// OK (meshlimit's `mode: warn`).
    pub quota_mode: Option<Spanned<bool>>,
    /// envoyproxy/ratelimit's: names and values handed to Envoy's dynamic metadata when
    /// this descriptor's rule lets a request pass (with `--dynamic-metadata`).
    pub metadata: Option<Spanned<serde_json::Value>>,
    /// `policy`, `limits`, `algorithm`, `burst`, `unlimited`: this node's policy, inherited
    /// by its descendants.
    pub policy: Option<Spanned<String>>,
    pub limits: Option<Spanned<Vec<Spanned<LimitBlock>>>>,
    pub algorithm: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
    pub capacity: Option<Spanned<i64>>,
    pub unlimited: Option<Spanned<bool>>,
    /// The file this entry was written in: a domain that `extends` another holds entries
    /// of both files, and every error and `explain` line must name the right one.
    #[serde(skip)]
    pub file: Option<Arc<str>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBlock {
    pub unit: Option<Spanned<String>>,
    pub requests_per_unit: Option<Spanned<i64>>,
    #[serde(default)]
    pub unlimited: bool,
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub replaces: Vec<Replaces>,
    pub algorithm: Option<Spanned<String>>,
    /// meshlimit's: the unit is this IANA zone's calendar day, week, month or year.
    pub calendar: Option<Spanned<String>>,
    /// meshlimit's: the day a calendar week starts on (Monday when left out).
    pub week_starts: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replaces {
    pub name: Option<Spanned<String>>,
}

/// A named policy under `policies:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBlock {
    pub extends: Option<Spanned<String>>,
    /// Reported in `current_limit.name`; defaults to the policy's own name.
    pub name: Option<Spanned<String>>,
    pub limits: Option<Spanned<Vec<Spanned<LimitBlock>>>>,
    pub algorithm: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
    /// Leaky bucket only: what the bucket holds.
    pub capacity: Option<Spanned<i64>>,
    pub shadow_mode: Option<Spanned<bool>>,
    /// `enforce` (default) or `warn`: over the limit, admit but mark the request.
    pub mode: Option<Spanned<String>>,
    /// Fraction of the limit (0–1] past which the upstream is told, by a request header,
    /// that the client is close to its limit.
    pub soft_limit: Option<Spanned<f64>>,
    /// After `after` rejections within `within`, block the key for `block_for`.
    pub penalty: Option<Spanned<PenaltyBlock>>,
    /// Which header sets this policy's responses carry: `ietf`, `legacy`, `retry-after`.
    pub headers: Option<Spanned<Vec<Spanned<String>>>>,
    /// The 429 body; `{policy}`, `{limit}`, `{window_seconds}`, `{retry_after_seconds}`
    /// are filled in. JSON unless `body_content_type` says otherwise.
    pub body: Option<Spanned<String>>,
    pub body_content_type: Option<Spanned<String>>,
    /// Under a domain's shared `capacity`: higher is served first.
    pub priority: Option<Spanned<i64>>,
    /// Under a domain's shared `capacity`: the fraction of it lower priorities may not use.
    pub reserved: Option<Spanned<f64>>,
    /// Fixed windows only: count on each replica and add to Redis in batches (the Redis
    /// store's hybrid mode), for keys too hot for a round trip each.
    pub hybrid: Option<Spanned<bool>>,
    /// Windows and buckets (not a sliding log): hits over the limit are counted too, for
    /// costs charged after they were spent (Envoy's `apply_on_stream_done` with
    /// `hits_addend`: an LLM response's tokens); the overspend must weigh on the budget.
    pub count_rejected: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PenaltyBlock {
    pub after: Spanned<i64>,
    pub within: Spanned<String>,
    pub block_for: Spanned<String>,
}

/// A domain's shared capacity, divided by priority (see `priority` and `reserved`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityBlock {
    pub requests_per_unit: Spanned<i64>,
    pub unit: Option<Spanned<String>>,
    pub per: Option<Spanned<String>>,
}

/// `defaults:` of a domain or a shared file: a policy by name, or inline fields over it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFields {
    pub policy: Option<Spanned<String>>,
    pub limits: Option<Spanned<Vec<Spanned<LimitBlock>>>>,
    pub algorithm: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
    pub capacity: Option<Spanned<i64>>,
    pub unlimited: Option<Spanned<bool>>,
}

/// One limit of a policy: `requests_per_unit` per `unit`, or per a duration (`per: 10s`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitBlock {
    pub requests_per_unit: Option<Spanned<i64>>,
    pub unit: Option<Spanned<String>>,
    pub per: Option<Spanned<String>>,
    /// An IANA time zone: the window is that zone's calendar day, week, month or year.
    pub calendar: Option<Spanned<String>>,
    /// The day a calendar week starts on (Monday when left out).
    pub week_starts: Option<Spanned<String>>,
}

impl DescriptorEntry {
    /// Records `file` on this entry and every entry below it.
    pub fn set_file(&mut self, file: &Arc<str>) {
        self.file = Some(file.clone());
        for child in &mut self.descriptors {
            child.set_file(file);
        }
    }

    /// What makes two entries the same node: the key, and the value (absent = empty).
    fn node_id(&self) -> (Option<String>, String) {
        (
            self.key.as_ref().map(|k| k.value.clone()),
            self.value
                .as_ref()
                .map(|v| v.value.clone())
                .unwrap_or_default(),
        )
    }
}

/// The descriptors of a domain that `extends` a base: the base's tree with each node of
/// `over` laid on the node with the same key and value (children merge the same way);
/// nodes only in `over` are added after the base's.
///
/// How a node is limited comes in three forms that exclude each other — a `rate_limit`,
/// `unlimited`, or a policy with its inline refinements (`policy`, `limits`, `algorithm`,
/// `burst`, `capacity`) — so a node of `over` that says how it is limited replaces the
/// base's form (within the policy form, fields it leaves out stay the base's), and one
/// that does not keeps the base's limit, and the base's file for it. The other fields
/// (`shadow_mode`, `quota_mode`, `share_threshold`, `metadata`, the metric switches) are
/// `over`'s where it sets them, else the base's.
fn overlay(base: &DescriptorEntry, over: &DescriptorEntry) -> DescriptorEntry {
    let policy_form = over.policy.is_some()
        || over.limits.is_some()
        || over.algorithm.is_some()
        || over.burst.is_some()
        || over.capacity.is_some();
    let limits_itself = policy_form || over.rate_limit.is_some() || over.unlimited.is_some();
    let mut node = if limits_itself {
        over.clone()
    } else {
        base.clone()
    };
    if policy_form && base.rate_limit.is_none() && base.unlimited.is_none() {
        node.policy = over.policy.clone().or_else(|| base.policy.clone());
        node.limits = over.limits.clone().or_else(|| base.limits.clone());
        node.algorithm = over.algorithm.clone().or_else(|| base.algorithm.clone());
        node.burst = over.burst.clone().or_else(|| base.burst.clone());
        node.capacity = over.capacity.clone().or_else(|| base.capacity.clone());
    }
    node.shadow_mode = over
        .shadow_mode
        .clone()
        .or_else(|| base.shadow_mode.clone());
    node.quota_mode = over.quota_mode.clone().or_else(|| base.quota_mode.clone());
    node.share_threshold = (over.share_threshold.clone()).or_else(|| base.share_threshold.clone());
    node.metadata = over.metadata.clone().or_else(|| base.metadata.clone());
    node.detailed_metric = over.detailed_metric || base.detailed_metric;
    node.value_to_metric = over.value_to_metric || base.value_to_metric;
    node.descriptors = merge_descriptors(&base.descriptors, &over.descriptors);
    node
}

pub fn merge_descriptors(
    base: &[DescriptorEntry],
    over: &[DescriptorEntry],
) -> Vec<DescriptorEntry> {
    let mut merged: Vec<DescriptorEntry> = base.to_vec();
    // Nodes are found by key and value through an index: a search of `merged` per node made
    // a domain extending a wide one (thousands of siblings) take minutes to load. The first
    // of equal nodes keeps its place, as the search found it.
    let mut index: HashMap<(Option<String>, String), usize> = HashMap::new();
    for (position, entry) in merged.iter().enumerate() {
        index.entry(entry.node_id()).or_insert(position);
    }
    for node in over {
        let id = node.node_id();
        let found = index
            .get(&id)
            .and_then(|&position| merged.get_mut(position));
        match found {
            Some(existing) => {
                let merged_node = overlay(existing, node);
                *existing = merged_node;
            }
            None => {
                index.insert(id, merged.len());
                merged.push(node.clone());
            }
        }
    }
    merged
}
