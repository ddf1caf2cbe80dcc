//! Human-readable views of a loaded config: `meshlimit explain` (why a descriptor gets the
//! limit it gets), the admin port's `/rlconfig` (every effective rule) and the debug
//! port's `/rlconfig` (envoyproxy/ratelimit's one-line-per-rule dump).

use std::fmt::Write;

use crate::calendar::local_time;
use crate::key::{append_counter_key, with_shared_values};
use crate::limit::{Algorithm, Limit};
use crate::matcher::{DomainTree, RateLimitConfig};
use crate::proto::rate_limit_descriptor::Entry;
use crate::rule::{Rule, RuleLimit};

/// Parses `key=value,key=value` into descriptor entries.
pub fn parse_descriptor(text: &str) -> Result<Vec<Entry>, String> {
    text.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok(Entry {
                key: key.to_owned(),
                value: value.to_owned(),
            }),
            _ => Err(format!(
                "`{pair}` in `{text}` is not key=value; write descriptors like `user=alice,path=/login`"
            )),
        })
        .collect()
}

/// Explains, for each descriptor, the walk through the tree, the effective rule with where
/// each field came from, and the counter keys; for a fixed window, the window that holds
/// `now_millis` (a calendar month's first and last instant in its zone; envoyproxy's
/// epoch-aligned "month" of 30 days).
pub fn explain(
    config: &RateLimitConfig,
    domain: &str,
    descriptors: &[Vec<Entry>],
    now_millis: u64,
) -> String {
    let mut out = String::new();
    let Some(tree) = config.domain(domain) else {
        let known: Vec<String> = config
            .domains()
            .iter()
            .map(|d| d.name.to_string())
            .collect();
        let _ = writeln!(
            out,
            "domain `{domain}` is not configured: every descriptor is OK with no limit (configured domains: {})",
            known.join(", ")
        );
        return out;
    };
    let _ = writeln!(out, "domain {} ({})", tree.name, tree.file);
    let rules: Vec<Option<&Rule>> = descriptors.iter().map(|d| tree.lookup(d)).collect();
    let replaced: Vec<&str> = rules
        .iter()
        .flatten()
        .flat_map(|rule| rule.replaces.iter().map(|name| &**name))
        .collect();
    for (i, entries) in descriptors.iter().enumerate() {
        let shown: Vec<String> = entries
            .iter()
            .map(|e| format!("{}={}", e.key, e.value))
            .collect();
        let _ = writeln!(out, "\ndescriptor {}: {}", i + 1, shown.join(","));
        explain_one(&mut out, tree, entries, &replaced, now_millis);
    }
    out
}

fn explain_one(
    out: &mut String,
    tree: &DomainTree,
    entries: &[Entry],
    replaced: &[&str],
    now_millis: u64,
) {
    let (node, steps) = tree.lookup_traced(entries);
    for step in steps {
        let _ = writeln!(out, "  {step}");
    }
    let Some(node) = node else {
        let _ = writeln!(out, "  result: no limit");
        return;
    };
    let at = node
        .source
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let _ = writeln!(out, "  matched node: {} at {at}", node.label);
    let Some(rule) = node.rule.as_deref() else {
        let _ = writeln!(out, "  {}", node.note.as_deref().unwrap_or("no limit"));
        return;
    };
    if let Some(name) = &rule.name
        && replaced.contains(&&**name)
    {
        let _ = writeln!(
            out,
            "  result: no limit — rule `{name}` is replaced by another descriptor of this request"
        );
        return;
    }
    describe_rule(out, rule, "  ");
    if let RuleLimit::Limited(limits) = &rule.limit {
        let _ = writeln!(out, "  counter keys:");
        for limit in limits.iter() {
            let mut key = String::new();
            let entries = with_shared_values(entries, &rule.shared_values);
            append_counter_key(&mut key, &tree.name, &entries, limit);
            let _ = writeln!(out, "    {key}");
            if limit.algorithm == Algorithm::FixedWindow {
                let _ = writeln!(out, "      {}", current_window(limit, now_millis));
            }
        }
    }
}

/// `window: from … to … (resets in …)` of `limit`'s fixed window at `now_millis`, in the
/// calendar's zone or in UTC.
fn current_window(limit: &Limit, now_millis: u64) -> String {
    let (start, end) = limit.window_bounds(now_millis);
    let zone = limit.calendar.map(|c| c.zone);
    let named = zone
        .map(|z| format!(" in {}", z.name()))
        .unwrap_or_default();
    format!(
        "window now: {} to {}{named} (resets in {})",
        local_time(start, zone),
        local_time(end, zone),
        spell_duration(end - now_millis)
    )
}

/// `16 d 12 h`, `3 h 5 min`, `59 s`: the two largest parts, rounded down.
fn spell_duration(millis: u64) -> String {
    let seconds = millis / 1_000;
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds} s"),
        (0, 0, _) => format!("{minutes} min {} s", seconds % 60),
        (0, _, _) => format!("{hours} h {minutes} min"),
        _ => format!("{days} d {hours} h"),
    }
}

fn describe_rule(out: &mut String, rule: &Rule, indent: &str) {
    for line in rule.provenance.iter() {
        let _ = writeln!(out, "{indent}{line}");
    }
    if rule.shadow_mode {
        let _ = writeln!(
            out,
            "{indent}shadow mode: counted and reported, never rejects"
        );
    }
    if !rule.replaces.is_empty() {
        let names: Vec<&str> = rule.replaces.iter().map(|n| &**n).collect();
        let _ = writeln!(out, "{indent}replaces: {}", names.join(", "));
    }
}

/// Every effective rule of every domain, for `/rlconfig`.
pub fn render_config(config: &RateLimitConfig) -> String {
    let mut out = String::new();
    for domain in config.domains() {
        let _ = writeln!(out, "domain {} ({})", domain.name, domain.file);
        for rule in domain.rules() {
            let limit = match &rule.limit {
                RuleLimit::Unlimited => "unlimited".to_owned(),
                RuleLimit::Limited(limits) => limits
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" + "),
            };
            let _ = writeln!(out, "  {}: {limit} ({})", rule.path, rule.source);
            describe_rule(&mut out, rule, "    ");
        }
    }
    out
}

/// envoyproxy/ratelimit's `/rlconfig` on its debug port: one line per limit,
/// `domain.key_value.key: unit=MINUTE requests_per_unit=10, shadow_mode: false, quota_mode: false`,
/// so the scripts and runbooks that read it read meshlimit's too. An unlimited rule is
/// `unit=UNKNOWN requests_per_unit=0`, as envoyproxy/ratelimit shows one; a window that is
/// not one unit (`per: 10s`, meshlimit's own) shows its length; a rule of several limits
/// has a line for each.
pub fn render_envoyproxy_dump(config: &RateLimitConfig) -> String {
    let mut out = String::new();
    for domain in config.domains() {
        for rule in domain.rules() {
            let modes = format!(
                "shadow_mode: {}, quota_mode: {}",
                rule.shadow_mode, rule.quota_mode
            );
            match &rule.limit {
                RuleLimit::Unlimited => {
                    let _ = writeln!(
                        out,
                        "{}: unit=UNKNOWN requests_per_unit=0, {modes}",
                        rule.path
                    );
                }
                RuleLimit::Limited(limits) => {
                    for limit in limits {
                        let unit = match limit.unit() {
                            Some(unit) => unit.to_proto().as_str_name().to_owned(),
                            None => crate::limit::format_duration(limit.window_millis()),
                        };
                        let _ = writeln!(
                            out,
                            "{}: unit={unit} requests_per_unit={}, {modes}",
                            rule.path, limit.requests_per_unit
                        );
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoadOptions, compile_str};
    use crate::limit::Algorithm;

    const CONFIG: &str = "\
domain: shop
policies:
  base:
    limits: [{requests_per_unit: 10, unit: minute}]
descriptors:
  - key: tenant
    policy: base
    descriptors:
      - key: path
      - key: path
        value: /admin*
        limits: [{requests_per_unit: 1, unit: minute}]
  - key: vip
    rate_limit: {unit: minute, requests_per_unit: 100, replaces: [{name: base}]}
";

    /// 2026-03-15T12:00:00Z: a Sunday, in a month whose last day Berlin spends on summer
    /// time.
    const NOW: u64 = 1_773_576_000_000;

    fn config() -> RateLimitConfig {
        let tree = compile_str("shop.yaml", CONFIG, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e:?}"));
        RateLimitConfig::new([tree], Algorithm::SlidingWindow)
    }

    #[test]
    fn explains_the_walk_the_inherited_policy_and_the_keys() {
        let descriptor = parse_descriptor("tenant=acme,path=/orders").unwrap();
        let text = explain(&config(), "shop", &[descriptor], NOW);
        let expected = "\
domain shop (shop.yaml)

descriptor 1: tenant=acme,path=/orders
  `tenant: acme`: no exact `tenant: acme`
  `tenant: acme`: matched `tenant` (any value)
  `path: /orders`: no exact `path: /orders`
  `path: /orders`: wildcard `/admin*` does not match
  `path: /orders`: matched `path` (any value)
  matched node: `path` (any value) at shop.yaml:9:14
  policy — inherited: descriptor `tenant` (any value) (shop.yaml:6:10)
  limits: 10/minute — from policy `base` (shop.yaml:4:13)
  algorithm: sliding_window — the service default
  name: base — from policy `base` (shop.yaml:4:5)
  counter keys:
    shop|tenant=acme|path=/orders|1m/sliding_window
";
        assert_eq!(text, expected);
    }

    /// A policy's `hybrid: true` changes how its counts reach Redis; explain says so and
    /// where it was set.
    #[test]
    fn explains_a_hybrid_policy() {
        let yaml = "\
domain: api
policies:
  hot:
    algorithm: fixed_window
    hybrid: true
    limits: [{requests_per_unit: 1000, unit: second}]
descriptors:
  - key: tenant
    policy: hot
";
        let tree = compile_str("api.yaml", yaml, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e:?}"));
        let config = RateLimitConfig::new([tree], Algorithm::SlidingWindow);
        let tenant = parse_descriptor("tenant=acme").unwrap();
        let text = explain(&config, "api", &[tenant], NOW);
        assert!(
            text.contains("hybrid: true (with --store redis each replica counts locally and adds its hits to Redis in batches) — from policy `hot` (api.yaml:5:13)"),
            "{text}"
        );
    }

    /// A fixed window's line says when the window holding the instant started and ends:
    /// a calendar month in its zone (the clocks change in between), envoyproxy's
    /// epoch-aligned 30-day "month" in UTC.
    #[test]
    fn shows_the_fixed_window_that_holds_the_instant() {
        let yaml = "\
domain: plans
descriptors:
  - key: plan
    value: monthly
    limits: [{requests_per_unit: 100000, unit: month, calendar: Europe/Berlin}]
  - key: plan
    value: envoyproxy
    rate_limit: {unit: month, requests_per_unit: 100000}
  - key: plan
    value: daily
    limits: [{requests_per_unit: 10, unit: day, calendar: Asia/Kolkata}]
";
        // envoyproxy/ratelimit's counting, as `--default-algorithm fixed_window` sets it.
        let options = LoadOptions {
            default_algorithm: Algorithm::FixedWindow,
            ..LoadOptions::default()
        };
        let tree = compile_str("plans.yaml", yaml, &options).unwrap_or_else(|e| panic!("{e:?}"));
        let config = RateLimitConfig::new([tree], Algorithm::FixedWindow);
        let ask = |plan: &str| {
            let text = explain(&config, "plans", &[parse_descriptor(plan).unwrap()], NOW);
            let at = text.find("counter keys:").expect("counter keys");
            text[at..]
                .lines()
                .skip(1)
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            ask("plan=monthly"),
            "plans|plan=monthly|month@Europe/Berlin/fixed_window\n\
             window now: 2026-03-01 00:00:00 +01:00 to 2026-04-01 00:00:00 +02:00 in Europe/Berlin (resets in 16 d 10 h)"
        );
        // 30 days from the epoch: 2026-03-08 to 2026-04-07, at midnight UTC.
        assert_eq!(
            ask("plan=envoyproxy"),
            "plans|plan=envoyproxy|30d/fixed_window\n\
             window now: 2026-03-08 00:00:00 UTC to 2026-04-07 00:00:00 UTC (resets in 22 d 12 h)"
        );
        // Half past five in the evening in Kolkata: six and a half hours to its midnight.
        assert_eq!(
            ask("plan=daily"),
            "plans|plan=daily|day@Asia/Kolkata/fixed_window\n\
             window now: 2026-03-15 00:00:00 +05:30 to 2026-03-16 00:00:00 +05:30 in Asia/Kolkata (resets in 6 h 30 min)"
        );
    }

    #[test]
    fn spells_durations_by_their_two_largest_parts() {
        assert_eq!(spell_duration(59_999), "59 s");
        assert_eq!(spell_duration(61_000), "1 min 1 s");
        assert_eq!(
            spell_duration(3 * 3_600_000 + 5 * 60_000 + 59_000),
            "3 h 5 min"
        );
        assert_eq!(spell_duration(2 * 86_400_000 + 3_600_000), "2 d 1 h");
    }

    #[test]
    fn explains_an_inline_override_on_a_wildcard() {
        let admin = parse_descriptor("tenant=acme,path=/admin/users").unwrap();
        let text = explain(&config(), "shop", &[admin], NOW);
        assert!(text.contains("matched wildcard `/admin*`"), "{text}");
        assert!(
            text.contains("limits: 1/minute — from descriptor `path: /admin*` (shop.yaml:12:17)"),
            "{text}"
        );
        assert!(text.contains("name: base — from policy `base`"), "{text}");
    }

    #[test]
    fn explains_a_replaced_rule_and_a_miss() {
        let tenant = parse_descriptor("tenant=acme,path=/orders").unwrap();
        let vip = parse_descriptor("vip=yes").unwrap();
        let miss = parse_descriptor("nobody=x").unwrap();
        let text = explain(&config(), "shop", &[tenant, vip, miss], NOW);
        assert!(
            text.contains(
                "result: no limit — rule `base` is replaced by another descriptor of this request"
            ),
            "{text}"
        );
        assert!(text.contains("rate_limit 100/minute sliding_window — its own `rate_limit` (shop.yaml:14:17); applies to this node only"), "{text}");
        assert!(
            text.contains("no descriptor with key `nobody` here (keys at this level: tenant, vip)"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_domain_is_explained_too() {
        let text = explain(&config(), "other", &[], NOW);
        assert!(
            text.starts_with("domain `other` is not configured"),
            "{text}"
        );
    }

    #[test]
    fn descriptors_must_be_key_value_pairs() {
        assert!(
            parse_descriptor("user")
                .unwrap_err()
                .contains("is not key=value")
        );
        assert_eq!(parse_descriptor("a=1,b=").unwrap().len(), 2);
    }

    #[test]
    fn rlconfig_lists_every_effective_rule() {
        let text = render_config(&config());
        assert!(
            text.contains("shop.tenant.path_/admin*: 1/minute sliding_window"),
            "{text}"
        );
        assert!(
            text.contains("shop.vip: 100/minute sliding_window"),
            "{text}"
        );
    }

    #[test]
    fn the_debug_dump_is_envoyproxys_line_per_limit() {
        let yaml = "\
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 5}
    shadow_mode: true
  - key: user
    descriptors:
      - key: path
        value: /login
        rate_limit: {unit: minute, requests_per_unit: 3}
        quota_mode: true
  - key: internal
    rate_limit: {unlimited: true}
  - key: tenant
    limits:
      - {requests_per_unit: 100, unit: hour}
      - {requests_per_unit: 10, per: 10s}
";
        let tree = compile_str("edge.yaml", yaml, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e:?}"));
        let config = RateLimitConfig::new([tree], Algorithm::SlidingWindow);
        let mut lines: Vec<String> = render_envoyproxy_dump(&config)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "edge.internal: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false",
                "edge.remote_address: unit=SECOND requests_per_unit=5, shadow_mode: true, quota_mode: false",
                "edge.tenant: unit=10s requests_per_unit=10, shadow_mode: false, quota_mode: false",
                "edge.tenant: unit=HOUR requests_per_unit=100, shadow_mode: false, quota_mode: false",
                "edge.user.path_/login: unit=MINUTE requests_per_unit=3, shadow_mode: false, quota_mode: true",
            ]
        );
    }
}
