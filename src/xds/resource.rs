//! An xDS `RateLimitConfig` resource as the text of a config file.
//!
//! The resource holds exactly what an envoyproxy/ratelimit config file holds (a domain and
//! its descriptor tree), so it is written out as one, in JSON (which the YAML loader
//! reads), and loaded by the same code as the files: every check and every error message
//! is the same whichever way a config arrives.

use std::sync::Arc;

use prost::Message as _;
use serde::Serialize;

use crate::config::{self, ConfigError, ConfigErrors, LoadOptions};

use crate::proto::ratelimit_config::{RateLimitConfig, RateLimitDescriptor, RateLimitPolicy};

/// The type URL of the resources meshlimit subscribes to.
pub const TYPE_URL: &str = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig";

/// Loads every resource of a response as one config, as a directory's files are loaded
/// together; a resource that does not decode is one more error, named after it. Decoding,
/// writing out and compiling each recurse once per level of a descriptor tree: run this on
/// the loader's stack (`reload::on_loader_stack`), as the xDS client does.
pub fn load_snapshot(
    resources: &[prost_types::Any],
    options: &LoadOptions,
) -> Result<crate::matcher::RateLimitConfig, ConfigErrors> {
    let texts =
        resources
            .iter()
            .enumerate()
            .map(|(index, resource)| match decode(index, resource) {
                Ok((label, text)) => (Arc::<str>::from(label), Ok(text)),
                Err(message) => {
                    let label = format!("xds:resource {index}");
                    let error = ConfigError {
                        file: label.clone(),
                        line: 0,
                        column: 0,
                        message,
                    };
                    (Arc::<str>::from(label), Err(error))
                }
            });
    config::load_texts(texts, options)
}

/// One resource of a response, decoded: the label its errors carry and its config text.
fn decode(index: usize, resource: &prost_types::Any) -> Result<(String, String), String> {
    if resource.type_url != TYPE_URL {
        return Err(format!(
            "a {}, where a rate limit service takes {TYPE_URL} only",
            resource.type_url
        ));
    }
    let config = RateLimitConfig::decode(resource.value.as_slice()).map_err(|error| {
        format!(
            "not a valid RateLimitConfig: {}",
            shortened(&error.to_string())
        )
    })?;
    let label = if config.name.is_empty() {
        format!("xds:resource {index}")
    } else {
        format!("xds:{}", config.name)
    };
    Ok((label, config_text(&config)))
}

/// prost names every message on the way down to a problem: a hundred levels of nesting
/// make a message of kilobytes. The start and the problem itself are what help.
fn shortened(message: &str) -> String {
    const KEEP: usize = 120;
    match message.char_indices().nth(KEEP) {
        Some((cut, _)) if message.len() > 2 * KEEP => {
            let problem = message.rsplit(": ").next().unwrap_or_default();
            format!("{}…: {problem}", &message[..cut])
        }
        _ => message.to_owned(),
    }
}

/// The config file `config` stands for. Fields at their proto3 default are left out, so
/// that the loader's own defaults and checks apply ("a limit needs a unit"); the rest are
/// written in the order a file would have them, which is the order `/rlconfig` lists.
pub fn config_text(config: &RateLimitConfig) -> String {
    let file = FileText {
        // Always written: an empty domain must be refused as one, not taken for a file
        // of shared policies.
        domain: &config.domain,
        descriptors: config.descriptors.iter().map(NodeText::of).collect(),
    };
    serde_json::to_string_pretty(&file).unwrap_or_default()
}

#[derive(Serialize)]
struct FileText<'a> {
    domain: &'a str,
    descriptors: Vec<NodeText<'a>>,
}

#[derive(Serialize)]
struct NodeText<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    key: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    value: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<LimitText<'a>>,
    #[serde(skip_serializing_if = "is_false")]
    shadow_mode: bool,
    #[serde(skip_serializing_if = "is_false")]
    detailed_metric: bool,
    #[serde(skip_serializing_if = "is_false")]
    quota_mode: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    descriptors: Vec<NodeText<'a>>,
}

impl<'a> NodeText<'a> {
    fn of(node: &'a RateLimitDescriptor) -> Self {
        Self {
            key: &node.key,
            value: &node.value,
            rate_limit: node.rate_limit.as_ref().map(LimitText::of),
            shadow_mode: node.shadow_mode,
            detailed_metric: node.detailed_metric,
            quota_mode: node.quota_mode,
            metadata: node.metadata.as_ref().map(json_object),
            descriptors: node.descriptors.iter().map(NodeText::of).collect(),
        }
    }
}

#[derive(Serialize)]
struct LimitText<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests_per_unit: Option<u32>,
    #[serde(skip_serializing_if = "is_false")]
    unlimited: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    replaces: Vec<ReplaceText<'a>>,
}

impl<'a> LimitText<'a> {
    fn of(policy: &'a RateLimitPolicy) -> Self {
        Self {
            unit: unit(policy.unit),
            // An unlimited policy usually leaves the count at 0; any other keeps it, 0
            // included (which turns every request away, as in a file).
            requests_per_unit: (!policy.unlimited || policy.requests_per_unit != 0)
                .then_some(policy.requests_per_unit),
            unlimited: policy.unlimited,
            name: &policy.name,
            replaces: policy
                .replaces
                .iter()
                .map(|replace| ReplaceText {
                    name: &replace.name,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct ReplaceText<'a> {
    name: &'a str,
}

/// A protobuf `Value` as the JSON a config file's `metadata:` block would hold.
fn json(value: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value as Json;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        // JSON has no NaN or infinity: null, as protobuf's own JSON mapping refuses them.
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number)
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(json).collect()),
        Some(Kind::StructValue(fields)) => json_object(fields),
    }
}

fn json_object(fields: &prost_types::Struct) -> serde_json::Value {
    let fields = fields.fields.iter();
    serde_json::Value::Object(
        fields
            .map(|(name, value)| (name.clone(), json(value)))
            .collect(),
    )
}

fn is_false(set: &bool) -> bool {
    !*set
}

/// `RateLimitUnit`'s numbers (MONTH, YEAR and WEEK were added later, in that order). An
/// unknown number is written as itself, for the loader to refuse by name.
fn unit(number: i32) -> Option<String> {
    let name = match number {
        0 => return None,
        1 => "second",
        2 => "minute",
        3 => "hour",
        4 => "day",
        5 => "month",
        6 => "year",
        7 => "week",
        other => return Some(format!("unit number {other}")),
    };
    Some(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_texts;
    use crate::proto::ratelimit_config::RateLimitReplace;

    fn node(key: &str, value: &str, limit: Option<RateLimitPolicy>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            key: key.into(),
            value: value.into(),
            rate_limit: limit,
            ..RateLimitDescriptor::default()
        }
    }

    fn per(unit: i32, requests: u32) -> Option<RateLimitPolicy> {
        Some(RateLimitPolicy {
            unit,
            requests_per_unit: requests,
            ..RateLimitPolicy::default()
        })
    }

    fn load(config: &RateLimitConfig) -> Result<crate::matcher::RateLimitConfig, String> {
        let label = std::sync::Arc::<str>::from(format!("xds:{}", config.name));
        load_texts([(label, Ok(config_text(config)))], &LoadOptions::default())
            .map_err(|errors| errors.to_string())
    }

    #[test]
    fn descriptor_metadata_reaches_the_rule_as_a_files_would() {
        use prost_types::value::Kind;
        let value = |kind| prost_types::Value { kind: Some(kind) };
        let fields = |pairs: Vec<(&str, prost_types::Value)>| prost_types::Struct {
            fields: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        let owner = fields(vec![
            ("team", value(Kind::StringValue("payments".into()))),
            ("pager", value(Kind::BoolValue(true))),
        ]);
        let mut tenant = node("tenant", "gold", per(2, 100));
        tenant.metadata = Some(fields(vec![
            ("owner", value(Kind::StructValue(owner))),
            ("weight", value(Kind::NumberValue(2.5))),
            (
                "zones",
                value(Kind::ListValue(prost_types::ListValue {
                    values: vec![value(Kind::StringValue("eu-1".into()))],
                })),
            ),
        ]));
        let config = RateLimitConfig {
            name: "meta".into(),
            domain: "edge".into(),
            descriptors: vec![tenant],
        };
        let file = "\
domain: edge
descriptors:
  - key: tenant
    value: gold
    metadata: {owner: {team: payments, pager: true}, weight: 2.5, zones: [eu-1]}
    rate_limit: {unit: minute, requests_per_unit: 100}
";
        let from_file = load_texts(
            [(
                std::sync::Arc::<str>::from("edge.yaml"),
                Ok(file.to_owned()),
            )],
            &LoadOptions::default(),
        )
        .expect("the file loads");
        let metadata = |loaded: &crate::matcher::RateLimitConfig| {
            let domain = *loaded.domains().first().expect("one domain");
            let rule = *domain.rules().first().expect("one rule");
            rule.metadata.clone()
        };
        let from_xds = metadata(&load(&config).expect("the resource loads"));
        assert!(from_xds.is_some(), "{}", config_text(&config));
        assert_eq!(from_xds, metadata(&from_file));
    }

    #[test]
    fn a_resource_loads_as_the_same_tree_a_file_would() {
        let mut route = node("path", "/slow", per(2, 5));
        route.shadow_mode = true;
        route.rate_limit.as_mut().unwrap().name = "slow".into();
        route.rate_limit.as_mut().unwrap().replaces = vec![RateLimitReplace {
            name: "per-user".into(),
        }];
        let mut user = node("user", "", per(1, 10));
        user.rate_limit.as_mut().unwrap().name = "per-user".into();
        user.descriptors = vec![route];
        let config = RateLimitConfig {
            name: "edge-config".into(),
            domain: "edge".into(),
            descriptors: vec![user, node("tenant", "free", per(7, 100))],
        };
        let from_xds = load(&config).expect("a valid resource loads");
        let file = "\
domain: edge
descriptors:
  - key: user
    rate_limit: {unit: second, requests_per_unit: 10, name: per-user}
    descriptors:
      - key: path
        value: /slow
        shadow_mode: true
        rate_limit:
          unit: minute
          requests_per_unit: 5
          name: slow
          replaces: [{name: per-user}]
  - key: tenant
    value: free
    rate_limit: {unit: week, requests_per_unit: 100}
";
        let from_file = load_texts(
            [(
                std::sync::Arc::<str>::from("edge.yaml"),
                Ok(file.to_owned()),
            )],
            &LoadOptions::default(),
        )
        .expect("the file loads");
        // The rules, their limits, shadow modes and replacements; not where each was
        // written, which differs.
        let rules = |loaded: &crate::matcher::RateLimitConfig| {
            crate::explain::render_config(loaded)
                .lines()
                .filter(|line| {
                    (line.starts_with("  ") && !line.starts_with("    "))
                        || line.contains("shadow mode")
                        || line.contains("replaces:")
                })
                .map(|line| line.split(" (").next().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        };
        let listed = rules(&from_xds);
        assert_eq!(listed, rules(&from_file));
        assert_eq!(
            listed.len(),
            5,
            "three rules, a shadow mode, a replacement: {listed:?}"
        );
    }

    #[test]
    fn problems_are_the_loaders_named_after_the_resource() {
        let no_unit = RateLimitConfig {
            name: "broken".into(),
            domain: "edge".into(),
            descriptors: vec![node("user", "", per(0, 10))],
        };
        let error = load(&no_unit).unwrap_err();
        assert!(error.contains("xds:broken"), "{error}");
        assert!(error.contains("unit"), "{error}");

        let empty_domain = RateLimitConfig {
            name: "nameless".into(),
            ..RateLimitConfig::default()
        };
        let error = load(&empty_domain).unwrap_err();
        assert!(error.contains("domain"), "{error}");

        let strange_unit = RateLimitConfig {
            name: "odd".into(),
            domain: "edge".into(),
            descriptors: vec![node("user", "", per(42, 1))],
        };
        let error = load(&strange_unit).unwrap_err();
        assert!(error.contains("unit number 42"), "{error}");
    }

    #[test]
    fn unlimited_needs_no_count_and_zero_turns_everyone_away() {
        let mut unlimited = node("user", "admin", None);
        unlimited.rate_limit = Some(RateLimitPolicy {
            unlimited: true,
            ..RateLimitPolicy::default()
        });
        let config = RateLimitConfig {
            name: "u".into(),
            domain: "edge".into(),
            descriptors: vec![unlimited, node("user", "blocked", per(1, 0))],
        };
        let text = config_text(&config);
        assert!(!text.contains("\"unit\": null"), "{text}");
        load(&config).expect("unlimited without a unit, and a limit of 0, are valid");
    }

    #[test]
    fn resources_of_another_type_or_broken_bytes_are_refused() {
        let other = prost_types::Any {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            value: vec![],
        };
        assert!(decode(0, &other).unwrap_err().contains("Cluster"));
        let errors = load_snapshot(&[other], &LoadOptions::default()).unwrap_err();
        assert!(
            errors
                .to_string()
                .starts_with("xds:resource 0: a type.googleapis.com/envoy.config.cluster"),
            "{errors}"
        );
        let broken = prost_types::Any {
            type_url: TYPE_URL.into(),
            value: vec![0x0a, 0xff],
        };
        assert!(
            decode(3, &broken)
                .unwrap_err()
                .contains("not a valid RateLimitConfig")
        );
        let long = format!(
            "failed: {}recursion limit reached",
            "Node.children: ".repeat(100)
        );
        let short = shortened(&long);
        assert!(
            short.len() < 200 && short.ends_with("…: recursion limit reached"),
            "{short}"
        );
        assert_eq!(shortened("short: message"), "short: message");
        let good = prost_types::Any {
            type_url: TYPE_URL.into(),
            value: RateLimitConfig {
                name: "n".into(),
                domain: "d".into(),
                descriptors: vec![],
            }
            .encode_to_vec(),
        };
        let (label, text) = decode(0, &good).unwrap();
        assert_eq!(label, "xds:n");
        assert!(text.contains("\"domain\": \"d\""), "{text}");
    }
}
