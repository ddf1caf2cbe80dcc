//! Config parsing and matching, each case named for the behaviour it pins down.

use super::*;
use crate::limit::Unit;
use crate::proto::rate_limit_descriptor::Entry;
use crate::rule::{Rule, RuleLimit};

fn compile(text: &str) -> Result<DomainTree, Vec<ConfigError>> {
    compile_str("test.yaml", text, &LoadOptions::default())
}

fn tree(text: &str) -> DomainTree {
    match compile(text) {
        Ok(tree) => tree,
        Err(errors) => panic!("config should compile: {errors:?}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    match compile(text) {
        Ok(_) => panic!("config should be rejected"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
    pairs
        .iter()
        .map(|(key, value)| Entry {
            key: key.to_string(),
            value: value.to_string(),
        })
        .collect()
}

/// The `requests_per_unit` of the rule a descriptor matches, or None.
fn matched(tree: &DomainTree, pairs: &[(&str, &str)]) -> Option<u32> {
    tree.lookup(&entries(pairs)).map(|rule| match &rule.limit {
        RuleLimit::Limited(limits) => limits.iter().map(|l| l.requests_per_unit).sum(),
        RuleLimit::Unlimited => u32::MAX,
    })
}

const TREE: &str = "\
domain: edge
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 10}
    descriptors:
      - key: path
        rate_limit: {unit: minute, requests_per_unit: 5}
      - key: path
        value: /admin
        rate_limit: {unit: minute, requests_per_unit: 1}
      - key: path
        value: /api/*
        rate_limit: {unit: minute, requests_per_unit: 2}
      - key: path
        value: /api/v2*
        rate_limit: {unit: minute, requests_per_unit: 3}
  - key: user
    value: root
    rate_limit: {unit: minute, requests_per_unit: 1000}
  - key: source
    value: mobile
    descriptors:
      - key: app
        rate_limit: {unit: second, requests_per_unit: 7}
  - key: internal
    rate_limit: {unlimited: true}
";

#[test]
fn a_value_less_key_matches_any_value() {
    assert_eq!(matched(&tree(TREE), &[("user", "alice")]), Some(10));
    assert_eq!(matched(&tree(TREE), &[("user", "bob")]), Some(10));
}

#[test]
fn an_exact_value_wins_over_the_value_less_key() {
    assert_eq!(matched(&tree(TREE), &[("user", "root")]), Some(1000));
}

#[test]
fn exact_then_wildcard_in_file_order_then_value_less() {
    let tree = tree(TREE);
    assert_eq!(
        matched(&tree, &[("user", "a"), ("path", "/admin")]),
        Some(1)
    );
    // `/api/*` comes first in the file, so it wins over the longer `/api/v2*`.
    assert_eq!(
        matched(&tree, &[("user", "a"), ("path", "/api/v2/x")]),
        Some(2)
    );
    assert_eq!(
        matched(&tree, &[("user", "a"), ("path", "/other")]),
        Some(5)
    );
}

#[test]
fn a_star_anywhere_in_a_value_is_a_wildcard() {
    // envoyproxy/ratelimit reads `*` at any place, any number of times, as "any run of
    // characters"; a config using it must match the same requests here.
    let tree = tree(
        "\
domain: edge
descriptors:
  - key: path
    value: /api/*/orders
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: path
    value: '*.pdf'
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: path
    value: /a*b*b
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: path
    rate_limit: {unit: minute, requests_per_unit: 9}
",
    );
    let path = |value: &str| matched(&tree, &[("path", value)]);
    assert_eq!(path("/api/v1/orders"), Some(1));
    assert_eq!(
        path("/api//orders"),
        Some(1),
        "a star may stand for nothing"
    );
    assert_eq!(
        path("/api/v1/orders/7"),
        Some(9),
        "the last run must close the value"
    );
    assert_eq!(path("/files/report.pdf"), Some(2));
    assert_eq!(path(".pdf"), Some(2));
    assert_eq!(path("/report.pdf.txt"), Some(9));
    assert_eq!(path("/abb"), Some(3));
    assert_eq!(path("/axbxbxb"), Some(3));
    // `b*b` needs two b's after the prefix's; the closing one cannot be reused.
    assert_eq!(path("/ab"), Some(9));
}

#[test]
fn the_limit_comes_only_from_the_node_of_the_last_entry() {
    let tree = tree(TREE);
    // `source: mobile` has no rate_limit of its own: a one-entry request gets none.
    assert_eq!(matched(&tree, &[("source", "mobile")]), None);
    assert_eq!(
        matched(&tree, &[("source", "mobile"), ("app", "x")]),
        Some(7)
    );
}

#[test]
fn no_backtracking_after_an_exact_match() {
    // `user: root` matched exactly and has no children, so (root, path) has no limit even
    // though the value-less `user` node has a `path` child: envoyproxy/ratelimit does not
    // go back to try it.
    assert_eq!(
        matched(&tree(TREE), &[("user", "root"), ("path", "/admin")]),
        None
    );
}

#[test]
fn a_request_deeper_than_the_config_has_no_limit() {
    let tree = tree(TREE);
    assert_eq!(
        matched(&tree, &[("user", "a"), ("path", "/x"), ("extra", "1")]),
        None
    );
}

#[test]
fn unknown_keys_and_wrong_order_do_not_match() {
    let tree = tree(TREE);
    assert_eq!(matched(&tree, &[("nobody", "x")]), None);
    assert_eq!(matched(&tree, &[("path", "/x"), ("user", "a")]), None);
}

#[test]
fn unlimited_is_a_rule_of_its_own() {
    assert_eq!(matched(&tree(TREE), &[("internal", "x")]), Some(u32::MAX));
}

#[test]
fn rule_paths_read_like_envoyproxy_stat_keys() {
    let tree = tree(TREE);
    let rule = tree.lookup(&entries(&[("user", "a"), ("path", "/admin")]));
    assert_eq!(rule.map(|r| &*r.path), Some("edge.user.path_/admin"));
}

#[test]
fn units_are_case_insensitive_and_algorithms_selectable() {
    let tree = tree(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: HOUR, requests_per_unit: 2, algorithm: fixed_window}\n",
    );
    let rule = tree.lookup(&entries(&[("k", "v")]));
    let Some(Rule {
        limit: RuleLimit::Limited(limits),
        ..
    }) = rule
    else {
        panic!("expected a limited rule, got {rule:?}");
    };
    let limit = limits[0];
    assert_eq!(limit.unit(), Some(Unit::Hour));
    assert_eq!(limit.algorithm, Algorithm::FixedWindow);
}

#[test]
fn the_default_algorithm_applies_to_rules_that_name_none() {
    let options = LoadOptions {
        default_algorithm: Algorithm::FixedWindow,
        ..LoadOptions::default()
    };
    let tree = compile_str("t.yaml", "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 2}\n", &options).unwrap_or_else(|e| panic!("{e:?}"));
    let rule = tree.lookup(&entries(&[("k", "v")]));
    assert!(
        matches!(rule, Some(Rule { limit: RuleLimit::Limited(l), .. }) if l[0].algorithm == Algorithm::FixedWindow)
    );
}

#[test]
fn error_missing_requests_per_unit_suggests_a_number_or_unlimited() {
    let errors =
        errors("domain: d\ndescriptors:\n  - key: user\n    rate_limit:\n      unit: minute\n");
    assert_eq!(
        errors,
        [
            "test.yaml:5:7: `requests_per_unit` is missing under key `user`; a limit of 0 would block every request — write a number, or `unlimited: true`"
        ]
    );
}

#[test]
fn error_missing_unit_lists_the_units() {
    let errors =
        errors("domain: d\ndescriptors:\n  - key: user\n    rate_limit: {requests_per_unit: 3}\n");
    assert_eq!(
        errors,
        [
            "test.yaml:4:17: `unit` is missing under key `user`; write one of second, minute, hour, day, week, month or year"
        ]
    );
}

#[test]
fn error_unknown_unit_points_at_the_unit() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: user\n    rate_limit: {unit: minutes, requests_per_unit: 3}\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:4:24: unknown unit `minutes` under key `user`; write one of second, minute, hour, day, week, month or year"
        ]
    );
}

#[test]
fn error_a_typo_in_a_field_is_not_silently_ignored() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: user\n    rate_limit:\n      unit: minute\n      request_per_unit: 5\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:6:7: unknown field `request_per_unit`, expected one of unit, requests_per_unit, unlimited, name, replaces, algorithm, calendar, week_starts"
        ]
    );
}

#[test]
fn error_negative_or_huge_limits_say_the_range() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: -1}\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:4:51: `requests_per_unit` under key `user` is -1; write a whole number from 0 to 4294967295"
        ]
    );
}

#[test]
fn error_unknown_algorithm_lists_the_algorithms() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 1, algorithm: leaky}\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:4:65: unknown algorithm `leaky` under key `user`; write one of sliding_window, fixed_window, token_bucket, sliding_log, leaky_bucket"
        ]
    );
}

#[test]
fn error_unlimited_with_a_number_is_a_contradiction() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: user\n    rate_limit: {unlimited: true, requests_per_unit: 5}\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:4:54: `unlimited: true` and `requests_per_unit` under key `user` contradict each other; remove one of them"
        ]
    );
}

#[test]
fn error_missing_or_empty_domain_and_key() {
    assert_eq!(
        errors("descriptors: []\n"),
        [
            "test.yaml:1:1: `domain` is missing; every config file starts with `domain: NAME`, the domain Envoy's ratelimit filter sends"
        ]
    );
    assert_eq!(
        errors("domain: ''\n"),
        [
            "test.yaml:1:9: `domain` is empty; write the domain Envoy's ratelimit filter sends, e.g. `domain: edge`"
        ]
    );
    assert_eq!(
        errors("domain: d\ndescriptors:\n  - key: ''\n"),
        ["test.yaml:3:10: `key` is empty; write the key Envoy sends, e.g. `key: remote_address`"]
    );
}

#[test]
fn error_duplicate_descriptor_names_the_first_one() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: user\n    value: a\n  - key: user\n    value: a\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:5:10: the descriptor `user: a` is already defined at line 3 of this level; merge the two blocks"
        ]
    );
}

#[test]
fn error_duplicate_yaml_keys_are_rejected() {
    let errors = errors("domain: a\ndomain: b\n");
    assert_eq!(
        errors,
        [
            "test.yaml:2:1: duplicate mapping key: domain; a key may appear once per mapping, remove one of them"
        ]
    );
}

#[test]
fn error_a_count_that_is_not_a_whole_number_says_what_to_write() {
    let found = errors(
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 3.5}\n",
    );
    assert_eq!(
        found,
        ["test.yaml:4:51: expected a whole number such as 10 (no decimal point, no quotes)"]
    );
    let found = errors(
        "domain: a\npolicies:\n  p: {limits: [{requests_per_unit: 1, unit: minute}], soft_limit: half}\ndescriptors:\n  - key: k\n    policy: p\n",
    );
    assert_eq!(
        found,
        ["test.yaml:3:67: expected a number such as 0.5 (no quotes)"]
    );
}

#[test]
fn error_a_reservation_without_a_capacity_to_reserve_from() {
    let found = errors(
        "domain: a\npolicies:\n  gold: {limits: [{requests_per_unit: 9, unit: minute}], priority: 10, reserved: 0.4}\ndescriptors:\n  - key: plan\n    value: gold\n    policy: gold\n",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("test.yaml:5:10: the policy of `a.plan_gold` reserves a share of domain `a`'s `capacity`, but the domain declares none; add `capacity:"),
        "{found:?}"
    );
    // With a capacity, or with a priority alone, it loads.
    tree(
        "domain: a\ncapacity: {requests_per_unit: 100, unit: second}\npolicies:\n  gold: {limits: [{requests_per_unit: 9, unit: minute}], priority: 10, reserved: 0.4}\ndescriptors:\n  - key: plan\n    policy: gold\n",
    );
    tree(
        "domain: a\npolicies:\n  gold: {limits: [{requests_per_unit: 9, unit: minute}], priority: 10}\ndescriptors:\n  - key: plan\n    policy: gold\n",
    );
}

#[test]
fn error_replaces_needs_a_name() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 1, replaces: [{}]}\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:4:17: an entry of `replaces` under key `user` has no `name`; write the `name` of the rate limit to replace"
        ]
    );
}

#[test]
fn error_a_second_yaml_document_says_to_move_it_to_a_file_of_its_own() {
    let errors = errors("domain: a\n---\ndomain: b\n");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .starts_with("test.yaml:3:1: a second YAML document (after a `---` line) starts here"),
        "{errors:?}"
    );
    assert!(!errors[0].contains("from_str_multiple"), "{errors:?}");
}

#[test]
fn descriptors_written_with_nothing_after_them_are_none() {
    // envoyproxy/ratelimit loads both; one such file stopped every domain from loading.
    tree("domain: x\ndescriptors:\n");
    let tree = tree("domain: y\ndescriptors:\n  - key: a\n    descriptors:\n");
    assert!(tree.lookup(&entries(&[("a", "1")])).is_none());
}

#[test]
fn error_unlimited_false_under_an_unlimited_ancestor_limits_nothing() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: a\n    unlimited: true\n    descriptors:\n      - key: b\n        unlimited: false\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:7:20: descriptor `b` (any value) says `unlimited: false` under an unlimited ancestor, which leaves it unlimited; give it a `policy` or `limits` to limit it"
        ]
    );
    // With limits of its own it is limited, and says so by them.
    tree(
        "domain: d\ndescriptors:\n  - key: a\n    unlimited: true\n    descriptors:\n      - key: b\n        unlimited: false\n        limits: [{requests_per_unit: 1, unit: second}]\n",
    );
}

#[test]
fn error_a_rule_that_replaces_itself() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: minute, requests_per_unit: 1, name: x, replaces: [{name: x}]}\n",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:4:81: the rate limit `x` under key `a` replaces itself, so it would never apply; remove its own name from `replaces`"
        ]
    );
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let errors = errors(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: minute}\n  - key: b\n    rate_limit: {requests_per_unit: 1}\n",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
}

mod directory {
    use super::*;
    use std::os::unix::fs::symlink;

    const USER: &str = "domain: one\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 3}\n";

    #[test]
    fn loads_yaml_files_and_skips_dotfiles_and_other_extensions() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("one.yaml"), USER).unwrap();
        fs::write(dir.path().join("two.yml"), USER.replace("one", "two")).unwrap();
        fs::write(dir.path().join(".hidden.yaml"), "not: [valid").unwrap();
        fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let config = load_dir(dir.path(), &LoadOptions::default()).unwrap();
        let names: Vec<_> = config
            .domains()
            .iter()
            .map(|d| d.name.to_string())
            .collect();
        assert_eq!(names, ["one", "two"]);
    }

    #[test]
    fn skipped_files_and_subdirectories_are_named_but_dot_names_are_not() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("one.yaml"), USER).unwrap();
        fs::write(dir.path().join(".hidden"), "").unwrap();
        fs::write(dir.path().join("ratelimit-config"), USER).unwrap();
        fs::create_dir(dir.path().join("..2026_01_01")).unwrap();
        fs::create_dir(dir.path().join("team")).unwrap();
        let skipped: Vec<String> = super::skipped_entries(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(skipped, ["ratelimit-config", "team"]);
    }

    #[test]
    fn reads_a_kubernetes_configmap_mount_through_its_symlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        let timestamped = dir.path().join("..2026_11_23_10_00_00.123");
        fs::create_dir(&timestamped).unwrap();
        fs::write(timestamped.join("one.yaml"), USER).unwrap();
        symlink("..2026_11_23_10_00_00.123", dir.path().join("..data")).unwrap();
        symlink("..data/one.yaml", dir.path().join("one.yaml")).unwrap();
        let config = load_dir(dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(config.domains().len(), 1);
    }

    #[test]
    fn a_domain_defined_twice_is_an_error_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.yaml"), USER).unwrap();
        fs::write(dir.path().join("b.yaml"), USER).unwrap();
        let errors = load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
        let text = errors.to_string();
        assert!(
            text.contains("b.yaml:1:9: domain `one` is already defined in"),
            "{text}"
        );
        assert!(text.contains("a.yaml"), "{text}");
    }

    #[test]
    fn merge_domain_config_adds_every_files_descriptors_to_one_domain() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.yaml"), USER).unwrap();
        let ip = "domain: one\ndescriptors:\n  - key: ip\n    rate_limit: {unit: second, requests_per_unit: 9}\n";
        fs::write(dir.path().join("b.yaml"), ip).unwrap();
        let merge = LoadOptions {
            merge_domains: true,
            ..LoadOptions::default()
        };
        let config = load_dir(dir.path(), &merge).unwrap_or_else(|e| panic!("{e}"));
        let domain = config.domain("one").expect("one domain");
        assert_eq!(matched(domain, &[("user", "u")]), Some(3));
        assert_eq!(matched(domain, &[("ip", "1.2.3.4")]), Some(9));
        // Errors in a merged file still name it.
        assert_eq!(
            domain
                .lookup(&entries(&[("ip", "x")]))
                .map(|r| r.source.file.ends_with("b.yaml")),
            Some(true)
        );

        // The same descriptor in both files is the usual duplicate, with both places.
        fs::write(dir.path().join("c.yaml"), USER).unwrap();
        let text = load_dir(dir.path(), &merge).unwrap_err().to_string();
        assert!(
            text.contains(
                "c.yaml:3:10: the descriptor `user` without a value is already defined at "
            ) && text.contains("a.yaml:3"),
            "{text}"
        );
        fs::remove_file(dir.path().join("c.yaml")).unwrap();

        // Only the first file shapes the domain as a whole.
        fs::write(
            dir.path().join("c.yaml"),
            "domain: one\ndefaults: {limits: [{requests_per_unit: 1, unit: second}]}\n",
        )
        .unwrap();
        let text = load_dir(dir.path(), &merge).unwrap_err().to_string();
        assert!(
            text.contains("c.yaml:1:9: domain `one` is also defined in")
                && text.contains("so move `defaults` to"),
            "{text}"
        );
    }

    #[test]
    fn invalid_utf8_and_a_missing_directory_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("bad.yaml"), b"domain: \xff\xfe\n").unwrap();
        let text = load_dir(dir.path(), &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            text.ends_with("bad.yaml: the file is not valid UTF-8; save it as UTF-8 text"),
            "{text}"
        );
        let missing = load_dir(&dir.path().join("nope"), &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("cannot read the config directory"),
            "{missing}"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
        let config = load_dir(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.domain("edge").is_some());
    }
}

/// The policy model: named policies, `extends`, inheritance down the tree and defaults.
mod policies {
    use super::*;

    const SHARED: &str = "\
policies:
  standard:
    limits:
      - {requests_per_unit: 100, unit: minute}
      - {requests_per_unit: 5000, unit: day}
  strict:
    extends: standard
    limits:
      - {requests_per_unit: 10, unit: minute}
  bursty:
    extends: strict
    algorithm: token_bucket
    burst: 20
defaults:
  policy: standard
";

    const MESH: &str = "\
domain: mesh
defaults:
  policy: strict
descriptors:
  - key: service
    descriptors:
      - key: route
  - key: service
    value: payments
    policy: bursty
    descriptors:
      - key: route
      - key: route
        value: /health
        unlimited: true
        descriptors:
          - key: probe
      - key: route
        value: /refund
        limits:
          - {requests_per_unit: 2, per: 10s}
      - key: route
        value: /legacy
        rate_limit: {unit: second, requests_per_unit: 1}
        descriptors:
          - key: client
  - key: service
    value: search
    policy: none
    descriptors:
      - key: route
";

    const PLAIN: &str = "\
domain: plain
descriptors:
  - key: user
    descriptors:
      - key: path
";

    fn load(files: &[(&str, &str)]) -> Result<RateLimitConfig, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        load_dir(dir.path(), &LoadOptions::default())
    }

    fn config() -> RateLimitConfig {
        load(&[
            ("shared.yaml", SHARED),
            ("mesh.yaml", MESH),
            ("plain.yaml", PLAIN),
        ])
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `(limits as "N/window", algorithm, reported name)` of the matched rule.
    fn effective(
        config: &RateLimitConfig,
        domain: &str,
        pairs: &[(&str, &str)],
    ) -> Option<(Vec<String>, String, String)> {
        let rule = config.domain(domain)?.lookup(&entries(pairs))?;
        let name = rule.name.as_deref().unwrap_or_default().to_owned();
        match &rule.limit {
            RuleLimit::Unlimited => Some((vec!["unlimited".into()], String::new(), name)),
            RuleLimit::Limited(limits) => Some((
                limits
                    .iter()
                    .map(|l| {
                        format!(
                            "{}/{}",
                            l.requests_per_unit,
                            crate::limit::format_duration(l.window_millis)
                        )
                    })
                    .collect(),
                limits[0].algorithm.to_string(),
                name,
            )),
        }
    }

    fn limits(config: &RateLimitConfig, domain: &str, pairs: &[(&str, &str)]) -> Vec<String> {
        effective(config, domain, pairs)
            .map(|e| e.0)
            .unwrap_or_default()
    }

    #[test]
    fn domain_defaults_apply_to_every_node_without_a_setting() {
        let config = config();
        assert_eq!(
            effective(&config, "mesh", &[("service", "orders")]),
            Some((
                vec!["10/1m".into()],
                "sliding_window".into(),
                "strict".into()
            ))
        );
        assert_eq!(
            limits(&config, "mesh", &[("service", "orders"), ("route", "/x")]),
            ["10/1m"]
        );
    }

    #[test]
    fn extends_keeps_the_parents_fields_the_child_does_not_set() {
        // `bursty` extends `strict` (limits) which extends `standard`; it sets only the algorithm.
        let config = config();
        assert_eq!(
            effective(&config, "mesh", &[("service", "payments")]),
            Some((vec!["10/1m".into()], "token_bucket".into(), "bursty".into()))
        );
    }

    #[test]
    fn a_nodes_own_policy_is_inherited_by_its_descendants() {
        let config = config();
        assert_eq!(
            effective(
                &config,
                "mesh",
                &[("service", "payments"), ("route", "/pay")]
            )
            .map(|e| e.1),
            Some("token_bucket".into())
        );
    }

    #[test]
    fn inline_limits_refine_the_inherited_policy() {
        // The route keeps `bursty`'s algorithm and burst but has its own window.
        let config = config();
        let rule = config
            .domain("mesh")
            .unwrap()
            .lookup(&entries(&[("service", "payments"), ("route", "/refund")]))
            .unwrap();
        let RuleLimit::Limited(limits) = &rule.limit else {
            panic!("{rule:?}")
        };
        assert_eq!(limits.len(), 1);
        assert_eq!(
            (
                limits[0].requests_per_unit,
                limits[0].window_millis,
                limits[0].algorithm,
                limits[0].burst
            ),
            (2, 10_000, Algorithm::TokenBucket, Some(20))
        );
    }

    #[test]
    fn unlimited_cuts_inheritance_for_the_whole_subtree() {
        let config = config();
        assert_eq!(
            limits(
                &config,
                "mesh",
                &[("service", "payments"), ("route", "/health")]
            ),
            ["unlimited"]
        );
        assert_eq!(
            limits(
                &config,
                "mesh",
                &[
                    ("service", "payments"),
                    ("route", "/health"),
                    ("probe", "k8s")
                ]
            ),
            ["unlimited"]
        );
    }

    #[test]
    fn policy_none_means_no_limit_below() {
        let config = config();
        assert_eq!(effective(&config, "mesh", &[("service", "search")]), None);
        assert_eq!(
            effective(&config, "mesh", &[("service", "search"), ("route", "/q")]),
            None
        );
    }

    #[test]
    fn a_plain_rate_limit_applies_to_its_node_only_and_is_not_inherited() {
        let config = config();
        assert_eq!(
            limits(
                &config,
                "mesh",
                &[("service", "payments"), ("route", "/legacy")]
            ),
            ["1/1s"]
        );
        // Its child skips it and inherits the nearest policy: `bursty` from the service.
        assert_eq!(
            effective(
                &config,
                "mesh",
                &[
                    ("service", "payments"),
                    ("route", "/legacy"),
                    ("client", "c")
                ]
            )
            .map(|e| e.1),
            Some("token_bucket".into())
        );
    }

    #[test]
    fn shared_defaults_apply_to_domains_without_their_own() {
        let config = config();
        assert_eq!(
            limits(&config, "plain", &[("user", "u")]),
            ["100/1m", "5000/1d"]
        );
    }

    #[test]
    fn a_plain_envoyproxy_file_means_no_limit_where_it_sets_none() {
        let config = load(&[("plain.yaml", PLAIN)]).unwrap();
        assert_eq!(effective(&config, "plain", &[("user", "u")]), None);
        assert_eq!(
            effective(&config, "plain", &[("user", "u"), ("path", "/")]),
            None
        );
    }

    #[test]
    fn counters_are_keyed_by_the_full_matched_path() {
        // Two routes under one inherited tenant policy count separately.
        use crate::key::append_counter_key;
        let config = config();
        let rule = config
            .domain("mesh")
            .unwrap()
            .lookup(&entries(&[("service", "orders"), ("route", "/a")]))
            .unwrap();
        let RuleLimit::Limited(l) = &rule.limit else {
            panic!()
        };
        let (mut a, mut b) = (String::new(), String::new());
        append_counter_key(
            &mut a,
            "mesh",
            &entries(&[("service", "orders"), ("route", "/a")]),
            &l[0],
        );
        append_counter_key(
            &mut b,
            "mesh",
            &entries(&[("service", "orders"), ("route", "/b")]),
            &l[0],
        );
        assert_ne!(a, b);
    }

    #[test]
    fn a_domain_extends_another_and_overrides_nodes_by_key_and_value() {
        let staging = "domain: staging\nextends: mesh\ndefaults:\n  limits: [{requests_per_unit: 1000, unit: minute}]\ndescriptors:\n  - key: service\n    value: search\n    policy: standard\n";
        let config = load(&[
            ("shared.yaml", SHARED),
            ("mesh.yaml", MESH),
            ("staging.yaml", staging),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        // Overridden node.
        assert_eq!(
            limits(&config, "staging", &[("service", "search")]),
            ["100/1m", "5000/1d"]
        );
        // Inherited nodes keep their own settings; the new defaults reach the rest.
        assert_eq!(
            effective(&config, "staging", &[("service", "payments")]).map(|e| e.1),
            Some("token_bucket".into())
        );
        assert_eq!(
            limits(&config, "staging", &[("service", "orders")]),
            ["1000/1m"]
        );
        // The base domain is unchanged.
        assert_eq!(limits(&config, "mesh", &[("service", "orders")]), ["10/1m"]);
    }

    /// A node laid over a base domain's node: one that says how it is limited replaces
    /// the base's form (a policy over a `rate_limit`, `unlimited` over a policy: each
    /// was a "has both" error), and one that only adds children keeps the base's limit and
    /// its other switches (`share_threshold`, `quota_mode` were lost).
    #[test]
    fn a_derived_domains_node_replaces_how_the_base_node_is_limited_and_keeps_the_rest() {
        let base = "domain: base\ndescriptors:\n  - key: a\n    rate_limit: {unit: minute, requests_per_unit: 5}\n  - key: b\n    policy: standard\n  - key: c\n    value: x*\n    share_threshold: true\n    quota_mode: true\n    rate_limit: {unit: hour, requests_per_unit: 7}\n";
        let child = "domain: child\nextends: base\ndescriptors:\n  - key: a\n    policy: strict\n  - key: b\n    unlimited: true\n  - key: c\n    value: x*\n    descriptors:\n      - key: d\n        rate_limit: {unit: second, requests_per_unit: 1}\n";
        let config = load(&[
            ("shared.yaml", SHARED),
            ("base.yaml", base),
            ("child.yaml", child),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(limits(&config, "child", &[("a", "v")]), ["10/1m"]);
        assert_eq!(limits(&config, "base", &[("a", "v")]), ["5/1m"]);
        let b = config
            .domain("child")
            .and_then(|d| d.lookup(&entries(&[("b", "v")])))
            .expect("b's rule");
        assert!(matches!(b.limit, RuleLimit::Unlimited), "{:?}", b.limit);
        // c keeps its limit, shared by every value, and its quota mode.
        let c = config
            .domain("child")
            .and_then(|d| d.lookup(&entries(&[("c", "x1")])))
            .expect("c's rule");
        assert!(c.quota_mode, "quota_mode kept");
        assert!(!c.shared_values.is_empty(), "share_threshold kept");
        assert_eq!(limits(&config, "child", &[("c", "x1")]), ["7/1h"]);
        assert_eq!(
            limits(&config, "child", &[("c", "x1"), ("d", "y")]),
            ["1/1s"]
        );
        // Its limit is still reported in the base's file.
        assert_eq!(
            &*c.source.file,
            config.domain("base").unwrap().file.as_ref()
        );
    }

    #[test]
    fn a_domain_policy_shadows_a_shared_one_of_the_same_name() {
        let local = "domain: local\npolicies:\n  standard:\n    limits: [{requests_per_unit: 1, unit: second}]\ndescriptors:\n  - key: k\n    policy: standard\n";
        let config = load(&[("shared.yaml", SHARED), ("local.yaml", local)]).unwrap();
        assert_eq!(limits(&config, "local", &[("k", "v")]), ["1/1s"]);
    }

    /// `standard: {extends: standard, …}` in a domain adjusts the shared `standard` for
    /// that domain: its parent is the shared policy it shadows, not itself.
    #[test]
    fn a_domain_policy_extends_the_shared_one_it_shadows() {
        let local = "domain: local\npolicies:\n  standard:\n    extends: standard\n    algorithm: fixed_window\ndescriptors:\n  - key: k\n    policy: standard\n";
        let config = load(&[("shared.yaml", SHARED), ("local.yaml", local)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            limits(&config, "local", &[("k", "v")]),
            ["100/1m", "5000/1d"]
        );
        assert_eq!(
            effective(&config, "local", &[("k", "v")]).map(|e| e.1),
            Some("fixed_window".into())
        );
        // A shared policy extending its own name still names itself.
        let text = problems(&[
            ("p.yaml", "policies:\n  a:\n    extends: a\n"),
            ("d.yaml", "domain: d\ndefaults: {policy: a}\n"),
        ]);
        assert!(text.contains("policy `extends` chain is a cycle"), "{text}");
    }

    fn problems(files: &[(&str, &str)]) -> String {
        match load(files) {
            Ok(_) => panic!("expected errors"),
            Err(errors) => errors.to_string(),
        }
    }

    #[test]
    fn error_an_extends_cycle_prints_the_chain() {
        let text = problems(&[
            (
                "p.yaml",
                "policies:\n  a:\n    extends: b\n  b:\n    extends: a\n",
            ),
            ("d.yaml", "domain: d\ndefaults: {policy: a}\n"),
        ]);
        assert!(
            text.contains("policy `extends` chain is a cycle: `a` ("),
            "{text}"
        );
        assert!(text.contains("p.yaml:3:5) extends `b` ("), "{text}");
        assert!(
            text.contains("extends `a` again; remove one of the `extends`"),
            "{text}"
        );
    }

    #[test]
    fn error_an_unknown_parent_or_policy_lists_the_known_ones() {
        let text = problems(&[
            (
                "p.yaml",
                "policies:\n  a:\n    extends: nope\n    limits: [{requests_per_unit: 1, unit: second}]\n",
            ),
            (
                "d.yaml",
                "domain: d\ndescriptors:\n  - key: k\n    policy: a\n  - key: j\n    policy: missing\n",
            ),
        ]);
        assert!(
            text.contains("p.yaml:3:14: unknown policy `nope`; known policies: a"),
            "{text}"
        );
        assert!(
            text.contains("d.yaml:6:13: unknown policy `missing`; known policies: a"),
            "{text}"
        );
    }

    #[test]
    fn a_calendar_limit_is_a_fixed_window_beside_the_policys_sliding_ones() {
        let plans = "domain: api\npolicies:\n  pro:\n    limits:\n      - {requests_per_unit: 10, unit: second}\n      - {requests_per_unit: 100000, unit: month, calendar: europe/berlin}\ndescriptors:\n  - key: plan\n    value: pro\n    policy: pro\n  - key: legacy\n    rate_limit: {unit: day, requests_per_unit: 5, calendar: UTC}\n";
        let config = load(&[("api.yaml", plans)]).unwrap_or_else(|e| panic!("{e}"));
        let domain = config.domain("api").unwrap();
        let pro = domain.lookup(&entries(&[("plan", "pro")])).unwrap();
        let limits = |rule: &crate::rule::Rule| match &rule.limit {
            crate::rule::RuleLimit::Limited(limits) => {
                limits.iter().map(|l| l.to_string()).collect::<Vec<_>>()
            }
            crate::rule::RuleLimit::Unlimited => Vec::new(),
        };
        let shown = limits(pro);
        assert_eq!(
            shown,
            [
                "10/second sliding_window",
                "100000/month fixed_window calendar Europe/Berlin"
            ]
        );
        assert!(
            pro.provenance.iter().any(|line| line.starts_with(
                "limits: 10/second, 100000/month in Europe/Berlin (calendar, fixed_window)"
            )),
            "{:?}",
            pro.provenance
        );
        let legacy = domain.lookup(&entries(&[("legacy", "x")])).unwrap();
        assert_eq!(limits(legacy), ["5/day fixed_window calendar UTC"]);
    }

    #[test]
    fn error_a_calendar_names_where_it_cannot_apply() {
        let refused = |yaml: &str| problems(&[("c.yaml", yaml)]);
        let policy = |limit: &str, extra: &str| {
            format!(
                "domain: c\npolicies:\n  p:\n    limits: [{limit}]\n{extra}descriptors:\n  - key: k\n    policy: p\n"
            )
        };
        let text = refused(&policy(
            "{requests_per_unit: 1, unit: month, calendar: Berlin}",
            "",
        ));
        assert!(
            text.contains("c.yaml:4:60: unknown time zone `Berlin`; did you mean `Europe/Berlin`?"),
            "{text}"
        );
        assert!(
            !text.contains("has no `limits`"),
            "the refused limit is not also reported missing: {text}"
        );
        let text = refused(&policy(
            "{requests_per_unit: 1, per: 30d, calendar: UTC}",
            "",
        ));
        assert!(
            text.contains("c.yaml:4:57: `calendar` needs `unit:` (day, week, month or year)"),
            "{text}"
        );
        let text = refused(&policy(
            "{requests_per_unit: 1, unit: hour, calendar: UTC}",
            "",
        ));
        assert!(
            text.contains("c.yaml:4:43: `calendar` windows are days, weeks, months or years"),
            "{text}"
        );
        let text = refused(&policy(
            "{requests_per_unit: 1, unit: day, calendar: UTC}",
            "    algorithm: token_bucket\n",
        ));
        assert!(text.contains("c.yaml:4:13: a `calendar` limit is counted in fixed windows that start over at each calendar boundary, but token_bucket applies here"), "{text}");
        let hybrid = policy(
            "{requests_per_unit: 1, unit: day, calendar: UTC}",
            "    algorithm: fixed_window\n    hybrid: true\n",
        );
        let config = load(&[("c.yaml", &hybrid)]).unwrap_or_else(|e| panic!("{e}"));
        let rule = config
            .domain("c")
            .unwrap()
            .lookup(&entries(&[("k", "v")]))
            .unwrap();
        assert!(
            matches!(&rule.limit, crate::rule::RuleLimit::Limited(l) if l[0].hybrid && l[0].calendar.is_some()),
            "a hybrid calendar limit: {:?}",
            rule.limit
        );
        let text = refused(
            "domain: c\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: 1, calendar: UTC, algorithm: sliding_log}\n",
        );
        assert!(text.contains("c.yaml:4:17: a `calendar` limit is counted in fixed windows that start over at each calendar boundary, but sliding_log applies here"), "{text}");
    }

    /// `week_starts` on a calendar week, in `limits:` and on envoyproxy's `rate_limit:`;
    /// refused where it could change nothing, at its line.
    #[test]
    fn week_starts_names_the_first_day_of_a_calendar_week() {
        let weeks = "domain: w\npolicies:\n  us:\n    limits: [{requests_per_unit: 500, unit: week, calendar: America/New_York, week_starts: sunday}]\ndescriptors:\n  - key: region\n    value: us\n    policy: us\n  - key: region\n    value: gulf\n    rate_limit: {unit: week, requests_per_unit: 5, calendar: Asia/Riyadh, week_starts: Saturday}\n";
        let config = load(&[("w.yaml", weeks)]).unwrap_or_else(|e| panic!("{e}"));
        let domain = config.domain("w").unwrap();
        let shown =
            |value: &str| match &domain.lookup(&entries(&[("region", value)])).unwrap().limit {
                crate::rule::RuleLimit::Limited(limits) => limits[0].to_string(),
                crate::rule::RuleLimit::Unlimited => String::new(),
            };
        assert_eq!(
            shown("us"),
            "500/week fixed_window calendar America/New_York from Sunday"
        );
        assert_eq!(
            shown("gulf"),
            "5/week fixed_window calendar Asia/Riyadh from Saturday"
        );

        let refused = |limit: &str| {
            problems(&[(
                "w.yaml",
                &format!("domain: w\ndescriptors:\n  - key: k\n    limits: [{limit}]\n"),
            )])
        };
        let text =
            refused("{requests_per_unit: 1, unit: month, calendar: UTC, week_starts: sunday}");
        assert!(
            text.contains("w.yaml:4:78: `week_starts` applies to `unit: week`"),
            "{text}"
        );
        let text = refused("{requests_per_unit: 1, unit: week, week_starts: sunday}");
        assert!(
            text.contains("w.yaml:4:62: `week_starts` needs `calendar: <zone>` and `unit: week`"),
            "{text}"
        );
        let text =
            refused("{requests_per_unit: 1, unit: week, calendar: UTC, week_starts: sun-day}");
        assert!(
            text.contains("w.yaml:4:77: `sun-day` is not a weekday"),
            "{text}"
        );
        let text = problems(&[(
            "w.yaml",
            "domain: w\ndescriptors:\n  - key: k\n    rate_limit: {unit: week, requests_per_unit: 1, week_starts: sunday}\n",
        )]);
        assert!(
            text.contains("`week_starts` needs `calendar: <zone>`"),
            "{text}"
        );
    }

    #[test]
    fn count_rejected_reaches_the_rule_of_a_window_policy_and_is_refused_elsewhere() {
        let tokens = "domain: ai\npolicies:\n  tokens:\n    limits: [{requests_per_unit: 1000, unit: minute}]\n    count_rejected: true\n  plain:\n    limits: [{requests_per_unit: 1000, unit: minute}]\ndescriptors:\n  - key: team\n    policy: tokens\n  - key: user\n    policy: plain\n";
        let config = load(&[("ai.yaml", tokens)]).unwrap_or_else(|e| panic!("{e}"));
        let domain = config.domain("ai").unwrap();
        let team = domain.lookup(&entries(&[("team", "a")])).unwrap();
        assert!(team.count_rejected);
        assert!(
            team.provenance.iter().any(
                |line| line.starts_with("count_rejected: true (hits over the limit count too)")
            ),
            "{:?}",
            team.provenance
        );
        assert!(
            !domain
                .lookup(&entries(&[("user", "a")]))
                .unwrap()
                .count_rejected
        );

        let bucket = problems(&[(
            "b.yaml",
            "domain: b\npolicies:\n  p:\n    limits: [{requests_per_unit: 1, unit: second}]\n    algorithm: sliding_log\n    count_rejected: true\ndescriptors:\n  - key: k\n    policy: p\n",
        )]);
        assert!(
            bucket.contains(
                "b.yaml:6:21: `count_rejected: true` counts into windows and buckets, not a sliding log"
            ),
            "{bucket}"
        );
        let hybrid = problems(&[(
            "h.yaml",
            "domain: h\npolicies:\n  p:\n    limits: [{requests_per_unit: 1, unit: second}]\n    algorithm: fixed_window\n    hybrid: true\n    count_rejected: true\ndescriptors:\n  - key: k\n    policy: p\n",
        )]);
        assert!(
            hybrid.contains(
                "h.yaml:7:21: `count_rejected: true` and `hybrid: true` do not go together"
            ),
            "{hybrid}"
        );
    }

    #[test]
    fn error_burst_without_token_bucket_and_rate_limit_mixed_with_policy() {
        let text = problems(&[(
            "d.yaml",
            "domain: d\ndescriptors:\n  - key: a\n    limits: [{requests_per_unit: 1, unit: second}]\n    burst: 5\n  - key: b\n    policy: none\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
        )]);
        assert!(
            text.contains("d.yaml:5:12: `burst` only applies to `algorithm: token_bucket`"),
            "{text}"
        );
        assert!(text.contains("d.yaml:8:17: descriptor `b` (any value) has both envoyproxy's `rate_limit` and a meshlimit policy"), "{text}");
    }

    #[test]
    fn a_nodes_shadow_mode_beside_policy_fields_is_inherited_like_them() {
        let config = load(&[(
            "d.yaml",
            "domain: d\ndescriptors:\n  - key: svc\n    limits: [{requests_per_unit: 1, unit: minute}]\n    shadow_mode: true\n    descriptors:\n      - key: route\n      - key: route\n        value: /pay\n        shadow_mode: false\n  - key: legacy\n    rate_limit: {unit: minute, requests_per_unit: 1}\n    shadow_mode: true\n    descriptors:\n      - key: route\n        rate_limit: {unit: minute, requests_per_unit: 1}\n",
        )])
        .unwrap_or_else(|e| panic!("{e}"));
        let shadow = |pairs: &[(&str, &str)]| {
            let rule = config.domain("d").unwrap().lookup(&entries(pairs)).unwrap();
            let described = rule.provenance.join("\n");
            (rule.shadow_mode, described.contains("shadow_mode: true"))
        };
        assert_eq!(shadow(&[("svc", "a")]), (true, true));
        assert_eq!(shadow(&[("svc", "a"), ("route", "/x")]), (true, true));
        // Turned off again below, and `explain` says so.
        assert_eq!(shadow(&[("svc", "a"), ("route", "/pay")]), (false, false));
        // envoyproxy's `rate_limit` and its `shadow_mode` are the node's alone.
        assert!(shadow(&[("legacy", "a")]).0);
        assert!(!shadow(&[("legacy", "a"), ("route", "/x")]).0);
    }

    #[test]
    fn shared_defaults_name_the_policy_the_domain_sees_under_that_name() {
        let config = load(&[
            (
                "shared.yaml",
                "policies:\n  standard:\n    limits: [{requests_per_unit: 3, unit: hour}]\ndefaults:\n  policy: standard\n",
            ),
            (
                "d.yaml",
                "domain: d\npolicies:\n  standard: {extends: standard, algorithm: fixed_window}\ndescriptors:\n  - key: a\n  - key: b\n    policy: standard\n",
            ),
            ("e.yaml", "domain: e\ndescriptors:\n  - key: a\n"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let fixed = || {
            Some((
                vec!["3/1h".into()],
                "fixed_window".into(),
                "standard".into(),
            ))
        };
        assert_eq!(effective(&config, "d", &[("a", "x")]), fixed());
        assert_eq!(effective(&config, "d", &[("b", "x")]), fixed());
        // A domain without its own `standard` gets the shared one.
        assert_eq!(
            effective(&config, "e", &[("a", "x")]).map(|e| e.1),
            Some("sliding_window".into())
        );
    }

    #[test]
    fn a_child_that_leaves_the_token_bucket_leaves_its_burst_behind() {
        // `burst` belongs to the token bucket (`capacity` to the leaky one): a policy or node
        // that switches to another algorithm must not be refused for the burst it inherited.
        let config = load(&[(
            "d.yaml",
            "domain: d\npolicies:\n  bursty:\n    limits: [{requests_per_unit: 10, unit: second}]\n    algorithm: token_bucket\n    burst: 20\n  leaky:\n    limits: [{requests_per_unit: 10, unit: second}]\n    algorithm: leaky_bucket\n    capacity: 5\n  exact:\n    extends: bursty\n    algorithm: sliding_window\n  back:\n    extends: exact\n    algorithm: token_bucket\ndescriptors:\n  - key: a\n    policy: exact\n  - key: b\n    policy: bursty\n    descriptors:\n      - key: route\n        algorithm: fixed_window\n  - key: c\n    policy: leaky\n    algorithm: sliding_window\n  - key: d\n    policy: back\n  - key: e\n    policy: bursty\n    algorithm: token_bucket\n",
        )])
        .unwrap_or_else(|e| panic!("{e}"));
        let first = |pairs: &[(&str, &str)]| {
            let rule = config.domain("d").unwrap().lookup(&entries(pairs)).unwrap();
            let RuleLimit::Limited(limits) = &rule.limit else {
                panic!("{rule:?}")
            };
            (limits[0].algorithm, limits[0].burst)
        };
        assert_eq!(first(&[("a", "x")]), (Algorithm::SlidingWindow, None));
        assert_eq!(
            first(&[("b", "x"), ("route", "/")]),
            (Algorithm::FixedWindow, None)
        );
        assert_eq!(first(&[("c", "x")]), (Algorithm::SlidingWindow, None));
        // Back on a token bucket after a policy that dropped the burst: the default burst.
        assert_eq!(first(&[("d", "x")]), (Algorithm::TokenBucket, None));
        // Naming the token bucket again keeps the burst it already had.
        assert_eq!(first(&[("e", "x")]), (Algorithm::TokenBucket, Some(20)));
        assert_eq!(first(&[("b", "x")]), (Algorithm::TokenBucket, Some(20)));
    }

    #[test]
    fn error_limits_need_one_window_each() {
        let text = problems(&[(
            "d.yaml",
            "domain: d\ndescriptors:\n  - key: a\n    limits:\n      - {requests_per_unit: 1, unit: second, per: 1s}\n      - {requests_per_unit: 1}\n      - {requests_per_unit: 1, per: soon}\n  - key: b\n    limits: [{requests_per_unit: 1, unit: minute}, {requests_per_unit: 2, per: 60s}]\n",
        )]);
        assert!(
            text.contains("has both `unit` and `per`; keep one"),
            "{text}"
        );
        assert!(
            text.contains("a limit has no window; write `unit:`"),
            "{text}"
        );
        assert!(text.contains("`per: soon` is not a duration"), "{text}");
        assert!(text.contains("two limits share the window 1m"), "{text}");
    }

    #[test]
    fn error_domain_extends_unknown_or_cyclic() {
        let text = problems(&[
            ("a.yaml", "domain: a\nextends: b\n"),
            ("b.yaml", "domain: b\nextends: a\n"),
            ("c.yaml", "domain: c\nextends: zzz\n"),
        ]);
        assert!(text.contains("domain `extends` chain is a cycle"), "{text}");
        assert!(
            text.contains("c.yaml:2:10: domain `c` extends unknown domain `zzz`"),
            "{text}"
        );
    }

    #[test]
    fn error_a_shared_file_holds_no_descriptors() {
        let text = problems(&[(
            "s.yaml",
            "policies:\n  p:\n    limits: [{requests_per_unit: 1, unit: second}]\ndescriptors:\n  - key: k\n",
        )]);
        assert!(
            text.contains("s.yaml:5:10: a file without `domain` cannot hold `descriptors`"),
            "{text}"
        );
    }
}

mod classic_algorithms {
    use super::*;

    #[test]
    fn sliding_log_and_leaky_bucket_compile_with_their_own_fields() {
        let tree = tree(
            "domain: d\npolicies:\n  meter:\n    algorithm: leaky_bucket\n    capacity: 7\n    limits: [{requests_per_unit: 10, unit: second}]\ndescriptors:\n  - key: login\n    rate_limit: {unit: minute, requests_per_unit: 5, algorithm: sliding_log}\n  - key: api\n    policy: meter\n",
        );
        let login = tree.lookup(&entries(&[("login", "x")])).unwrap();
        let RuleLimit::Limited(l) = &login.limit else {
            panic!()
        };
        assert_eq!(l[0].algorithm, Algorithm::SlidingLog);
        let api = tree.lookup(&entries(&[("api", "x")])).unwrap();
        let RuleLimit::Limited(l) = &api.limit else {
            panic!()
        };
        assert_eq!(
            (l[0].algorithm, l[0].burst),
            (Algorithm::LeakyBucket, Some(7))
        );
    }

    #[test]
    fn error_a_sliding_log_above_the_maximum_suggests_sliding_window() {
        let errors = errors(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 5000, algorithm: sliding_log}\n",
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("5000 per window is above the maximum of 1000 (--max-sliding-log-limit); use `sliding_window`"), "{errors:?}");
    }

    #[test]
    fn error_capacity_belongs_to_the_leaky_bucket() {
        let errors = errors(
            "domain: d\ndescriptors:\n  - key: k\n    limits: [{requests_per_unit: 1, unit: second}]\n    capacity: 3\n",
        );
        assert!(
            errors[0].contains("`capacity` only applies to `algorithm: leaky_bucket`"),
            "{errors:?}"
        );
    }
}

#[test]
fn share_threshold_needs_a_wildcard_value() {
    let exact = errors(
        "\
domain: edge
descriptors:
  - key: files
    value: report.pdf
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 2}
",
    );
    assert_eq!(
        exact,
        [
            "test.yaml:5:22: `share_threshold` is for wildcard values, and `files: report.pdf` has no `*`; remove it, or write the value as a wildcard such as `report.pdf*`"
        ]
    );
    let value_less = errors(
        "\
domain: edge
descriptors:
  - key: files
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 2}
",
    );
    assert_eq!(value_less.len(), 1);
    assert!(
        value_less[0].starts_with(
            "test.yaml:4:22: `share_threshold` is for wildcard values, and `files` has no value"
        ),
        "{value_less:?}"
    );
    // `share_threshold: false` is accepted anywhere, as envoyproxy/ratelimit accepts it.
    tree(
        "domain: edge\ndescriptors:\n  - key: files\n    share_threshold: false\n    rate_limit: {unit: hour, requests_per_unit: 2}\n",
    );
}

#[test]
fn metadata_must_be_a_mapping() {
    let errors = errors(
        "\
domain: edge
descriptors:
  - key: tenant
    metadata: [payments]
    rate_limit: {unit: minute, requests_per_unit: 1}
",
    );
    assert_eq!(
        errors,
        [
            "test.yaml:4:15: `metadata` must be a mapping of names to values, e.g. `metadata: {team: payments}`"
        ]
    );
}
