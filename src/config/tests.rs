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
            "test.yaml:6:7: unknown field `request_per_unit`, expected one of unit, requests_per_unit, unlimited, name, replaces, algorithm"
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
            "test.yaml:4:65: unknown algorithm `leaky` under key `user`; write one of sliding_window, fixed_window, token_bucket"
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
