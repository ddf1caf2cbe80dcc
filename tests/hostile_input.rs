//! Hostile input, in CI: the config loader, the decision path and the real binary's gRPC
//! port are attacked with generated and hand-made input. Every attack must end in an
//! answer or an error — never a panic, a hang, a stack overflow or unbounded memory — and
//! the server must keep serving afterwards.
//!
//! The same attacks, without a time bound, are the cargo-fuzz targets in `fuzz/`.
//! `PROPTEST_CASES=N` raises the number of generated cases for a longer local run.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use meshlimit::clock::ManualClock;
use meshlimit::config::{LoadOptions, MAX_FILE_BYTES, compile_str, load_dir, snapshot};
use meshlimit::limit::Algorithm;
use meshlimit::limiter::{DecisionError, RateLimiter, RequestBounds};
use meshlimit::matcher::RateLimitConfig;
use meshlimit::proto::rate_limit_descriptor::{Entry, RateLimitOverride};
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use meshlimit::store::MemoryStore;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

/// Cases per property: `PROPTEST_CASES` when set, else `default` (sized so the whole file
/// runs in seconds on a 2-core CI machine with a debug build).
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Shrinking a loader or limiter failure to its smallest input is what makes it
        // readable; give it room, but not forever.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

/// Compiles `text` and checks the one promise every outcome keeps: errors name a file
/// position and say something.
fn compile(text: &str) -> Result<(), String> {
    match compile_str("hostile.yaml", text, &LoadOptions::default()) {
        Ok(_) => Ok(()),
        Err(errors) => {
            assert!(!errors.is_empty(), "an Err with no errors for:\n{text}");
            for error in &errors {
                assert_eq!(error.file, "hostile.yaml");
                assert!(
                    !error.message.trim().is_empty(),
                    "an empty message for:\n{text}"
                );
            }
            Err(errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"))
        }
    }
}

/// Runs `work` where hot reload runs the loader (`meshlimit::reload::on_loader_stack`),
/// so deep recursion fails here exactly as it would there.
fn on_reload_sized_stack<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    meshlimit::reload::on_loader_stack(work).expect("start the loader thread")
}

/// `meshlimit validate DIR` with its address space capped at `limit_mib`, so an input that
/// expands in memory fails the test (allocation failure) instead of swapping the machine.
fn validate_with_memory_cap(dir: &Path, limit_mib: u64) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v {} && exec \"$0\" validate \"$1\"",
            limit_mib * 1024
        ))
        .arg(common::meshlimit::binary())
        .arg(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run meshlimit validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text, started.elapsed())
}

// ---------------------------------------------------------------------------------------
// The config loader
// ---------------------------------------------------------------------------------------

/// Pieces of YAML and of meshlimit's config vocabulary, glued together at random: text
/// that is almost a config, so the parser and the compiler get past their first check.
fn yaml_fragment() -> impl Strategy<Value = String> {
    let pieces: &[&str] = &[
        "domain: edge\n",
        "domain: \n",
        "domain: [a]\n",
        "extends: edge\n",
        "descriptors:\n",
        "  - key: user\n",
        "  - key: \"\"\n",
        "    value: /a/*\n",
        "    value: \"*\"\n",
        "    rate_limit:\n",
        "      unit: minute\n",
        "      unit: fortnight\n",
        "      requests_per_unit: 10\n",
        "      requests_per_unit: -1\n",
        "      requests_per_unit: 99999999999999999999\n",
        "      requests_per_unit: 4294967296\n",
        "      unlimited: true\n",
        "      name: n\n",
        "      replaces: [{name: n}]\n",
        "      algorithm: sliding_log\n",
        "      calendar: Europe/Berlin\n",
        "      calendar: Nowhere/City\n",
        "      calendar: ''\n",
        "      week_starts: sunday\n",
        "      week_starts: someday\n",
        "    descriptors:\n",
        "      - key: path\n",
        "    policy: p\n",
        "    limits: [{requests_per_unit: 1, per: 1ms}]\n",
        "    limits: [{requests_per_unit: 1, unit: month, calendar: UTC}]\n",
        "    limits: [{requests_per_unit: 1, per: 1d, calendar: Asia/Tokyo}]\n",
        "    limits: [{requests_per_unit: 1, unit: week, calendar: UTC, week_starts: sat}]\n",
        "    limits: [{requests_per_unit: 1, per: 99999999999999999d}]\n",
        "    algorithm: token_bucket\n",
        "    burst: -5\n",
        "    capacity: 0\n",
        "    shadow_mode: true\n",
        "policies:\n",
        "  p:\n",
        "    extends: p\n",
        "    extends: q\n",
        "    soft_limit: .nan\n",
        "    reserved: .inf\n",
        "    reserved: 0.7\n",
        "    priority: -9223372036854775808\n",
        "    penalty: {after: 0, within: 0s, block_for: 1d}\n",
        "    mode: warn\n",
        "    headers: [ietf, nope]\n",
        "    body: '{policy} {limit} {window_seconds} {retry_after_seconds} {'\n",
        "defaults: {policy: p}\n",
        "capacity: {requests_per_unit: 1, per: 1s}\n",
        "&a ",
        "*a\n",
        "<<: *a\n",
        "!!binary ",
        "? ",
        ": ",
        "- ",
        "{",
        "}",
        "[",
        "]",
        "'",
        "\"",
        "\\u0000",
        "\t",
        "---\n",
        "...\n",
        "%YAML 1.2\n",
        "#",
        "\u{feff}",
        "é",
        " ",
        "\n",
    ];
    prop::collection::vec(prop::sample::select(pieces), 0..40).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn the_loader_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = compile(&text);
    }

    #[test]
    fn the_loader_never_panics_on_arbitrary_text(text in "(?s).{0,400}") {
        let _ = compile(&text);
    }

    #[test]
    fn the_loader_never_panics_on_yaml_ish_text(text in yaml_fragment()) {
        let _ = compile(&text);
    }
}

/// Pieces of statsd_exporter mapping files, valid and not.
fn mapping_fragment() -> impl Strategy<Value = String> {
    let pieces = vec![
        "mappings:\n",
        "defaults:\n",
        "  - match: ",
        "    name: ",
        "    labels: {",
        "a: $1",
        "b: ${2}",
        "}",
        "    match_type: regex\n",
        "    action: drop\n",
        "    observer_type: histogram\n",
        "    match_metric_type: observer\n",
        "    scale: 0.001\n",
        "  glob_disable_ordering: true\n",
        "ratelimit.*.*",
        "*",
        ".",
        "(.*)",
        "([^.]+)",
        "\\",
        "$",
        "$$",
        "${x}",
        "rl_$3",
        "&a ",
        "*a",
        "\n",
        " ",
        "é",
    ];
    prop::collection::vec(prop::sample::select(pieces), 0..40).prop_map(|p| p.concat())
}

/// A Prometheus metric name: letters, digits and `_`, not starting with a digit.
fn is_metric_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A mapping file that loads more often than not: one glob or regex mapping whose parts
/// are drawn from pieces, with a name and a label made of captures.
fn mapping_file() -> impl Strategy<Value = String> {
    let part = prop::sample::select(vec!["*", "ratelimit", "a*b", "x-y", "é", "9"]);
    let glob = prop::collection::vec(part, 1..6).prop_map(|parts| parts.join("."));
    let regex = prop::sample::select(vec![
        r"(.*)",
        r"^([^.]*)\.(.*)$",
        r"(?P<d>[a-z]+)\.(\d*)",
        r"\.(.)(.)?",
        r"x|(y)",
    ]);
    let name = prop::sample::select(vec!["$1", "rl_$1", "${2}_x", "$d", "$9", "a$1$2"]);
    let label = prop::sample::select(vec!["$1", "${2}", "$d", "", "$$"]);
    (glob, regex, any::<bool>(), name, label).prop_map(|(glob, regex, is_regex, name, label)| {
        let (pattern, kind) = if is_regex {
            (regex.to_owned(), "regex")
        } else {
            (glob, "glob")
        };
        format!(
            "mappings:\n  - match: '{pattern}'\n    match_type: {kind}\n    name: '{name}'\n    labels: {{l: '{label}'}}\n"
        )
    })
}

proptest! {
    #![proptest_config(cases(256))]

    /// An operator's PROMETHEUS_MAPPER_YAML: loaded or refused with a place, never a
    /// panic.
    #[test]
    fn a_prometheus_mapping_of_any_text_loads_or_is_refused(text in mapping_fragment()) {
        use meshlimit::prometheus_mapping::PrometheusMapping;
        if let Err(error) = PrometheusMapping::parse("mapper.yaml", &text) {
            prop_assert!(!error.message.is_empty());
        }
    }

    /// Loaded, a mapping gives every stat it does not drop a name Prometheus accepts,
    /// whatever the stat and whatever its captures caught.
    #[test]
    fn a_loaded_prometheus_mapping_names_every_stat_validly(
        text in mapping_file(),
        stats in prop::collection::vec("[a-z_./:*$0-9é-]{1,40}", 1..8),
    ) {
        use meshlimit::prometheus_mapping::{PrometheusMapping, StatKind};
        let mapping = PrometheusMapping::parse("mapper.yaml", &text)
            .map_err(|error| TestCaseError::fail(format!("{error}\n{text}")))?;
        for stat in &stats {
            for kind in [StatKind::Counter, StatKind::Observer] {
                if let Some(series) = mapping.map(stat, kind) {
                    prop_assert!(
                        is_metric_name(&series.name),
                        "{stat} -> {:?} under\n{text}", series.name
                    );
                }
            }
        }
    }
}

#[test]
fn a_prometheus_mapping_alias_bomb_is_refused() {
    use meshlimit::prometheus_mapping::PrometheusMapping;
    let mut text = String::from("mappings:\n  - &m0 {match: a.b, name: x}\n");
    for level in 1..=9 {
        let row = vec![format!("*m{}", level - 1); 10].join(", ");
        text.push_str(&format!("  - &m{level} [{row}]\n"));
    }
    let started = Instant::now();
    let error = PrometheusMapping::parse("mapper.yaml", &text)
        .expect_err("a bomb is no mapping")
        .to_string();
    assert!(error.starts_with("mapper.yaml:"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
}

#[test]
fn invalid_utf8_in_a_file_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("edge.yaml"),
        b"domain: edge\ndescriptors:\n  - key: us\xffer\n",
    )
    .expect("write");
    let errors = load_dir(dir.path(), &LoadOptions::default())
        .expect_err("invalid UTF-8 must not load")
        .to_string();
    assert!(errors.contains("edge.yaml"), "{errors}");
    assert!(errors.contains("UTF-8"), "{errors}");
}

/// The classic "billion laughs": ten levels of ten aliases each, 10^10 strings if expanded.
/// The schema refuses its unknown top-level keys before anything is expanded.
fn billion_laughs() -> String {
    let mut text = String::from("domain: edge\nlol0: &l0 [\"lol\"]\n");
    for level in 1..=10 {
        let row = vec![format!("*l{}", level - 1); 10].join(", ");
        text.push_str(&format!("lol{level}: &l{level} [{row}]\n"));
    }
    text
}

/// The same bomb where the schema accepts every step: each descriptor nests ten copies of
/// the one before, 10^9 descriptors if expanded.
fn descriptor_bomb() -> String {
    let mut text = String::from("domain: edge\ndescriptors:\n  - &d0 {key: k0}\n");
    for level in 1..=9 {
        let row = vec![format!("*d{}", level - 1); 10].join(", ");
        text.push_str(&format!(
            "  - &d{level} {{key: k{level}, descriptors: [{row}]}}\n"
        ));
    }
    text
}

/// Few aliases, large anchor: a list of 2 000 descriptors replayed 90 times (under the
/// 100 aliases where an alias-to-anchor ratio check would start looking).
fn replayed_anchor() -> String {
    let mut text =
        String::from("domain: edge\ndescriptors:\n  - key: wide\n    descriptors: &wide\n");
    for i in 0..2_000 {
        text.push_str(&format!("      - {{key: k, value: v{i}}}\n"));
    }
    for i in 0..90 {
        text.push_str(&format!("  - {{key: copy{i}, descriptors: *wide}}\n"));
    }
    text
}

fn bombs() -> [(&'static str, String); 3] {
    [
        ("billion laughs", billion_laughs()),
        ("descriptor bomb", descriptor_bomb()),
        ("replayed anchor", replayed_anchor()),
    ]
}

#[test]
fn yaml_alias_bombs_are_refused_quickly() {
    for (name, text) in bombs() {
        let started = Instant::now();
        let error = compile(&text).expect_err(name);
        let took = started.elapsed();
        eprintln!("{name}: refused in {took:?}: {}", first_line(&error));
        // Unbounded expansion would run for minutes or exhaust memory; the margin is wide
        // because the suite runs unoptimised with other test binaries beside it.
        assert!(took < Duration::from_secs(30), "{name}: took {took:?}");
        assert!(
            error.contains("alias") || error.contains("unknown field"),
            "{name}: {error}"
        );
    }
}

#[test]
fn yaml_alias_bombs_stay_within_memory_in_the_binary() {
    for (name, text) in bombs() {
        let dir = common::config_dir::plain(&[("edge.yaml", &text)]);
        // A normal config validates in 40 MiB of address space and these in under 100;
        // with serde-saphyr's default alias budget the descriptor bomb needed over 200.
        let (code, output, took) = validate_with_memory_cap(dir.path(), 160);
        assert_eq!(code, Some(1), "{name}: validate exited {code:?}:\n{output}");
        assert!(output.contains("edge.yaml"), "{name}:\n{output}");
        assert!(took < Duration::from_secs(30), "{name}: took {took:?}");
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// `levels` descriptors, each nested in the one before, in block style (indentation grows
/// with depth, so the text grows with the square of it).
fn nested_block_descriptors(levels: usize) -> String {
    let mut text = String::from("domain: edge\ndescriptors:\n");
    for level in 0..levels {
        let indent = "  ".repeat(2 * level + 1);
        text.push_str(&format!("{indent}- key: k{level}\n"));
        text.push_str(&format!(
            "{indent}  rate_limit: {{unit: second, requests_per_unit: 1}}\n"
        ));
        text.push_str(&format!("{indent}  descriptors:\n"));
    }
    text.push_str(&format!("{}- key: leaf\n", "  ".repeat(2 * levels + 1)));
    text
}

/// `levels` descriptors, each nested in the one before, in flow style.
fn nested_flow_descriptors(levels: usize) -> String {
    let mut text = String::from("domain: edge\ndescriptors: ");
    for level in 0..levels {
        text.push_str(&format!("[{{key: k{level}, descriptors: "));
    }
    text.push_str("[]");
    text.push_str(&"}]".repeat(levels));
    text.push('\n');
    text
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let realistic = on_reload_sized_stack(|| compile(&nested_block_descriptors(10)));
    assert!(realistic.is_ok(), "10 levels must load: {realistic:?}");

    for (name, text) in [
        (
            "500 nested block descriptors",
            nested_block_descriptors(500),
        ),
        (
            "10 000 nested flow descriptors",
            nested_flow_descriptors(10_000),
        ),
        (
            "100 000 nested flow mappings",
            format!(
                "domain: edge\ndefaults: {}{}\n",
                "{a: ".repeat(100_000),
                "}".repeat(100_000)
            ),
        ),
        (
            "100 000 nested block sequences",
            format!("domain: edge\ndescriptors:\n{}\n", "- ".repeat(100_000)),
        ),
    ] {
        let started = Instant::now();
        let error = on_reload_sized_stack(move || compile(&text)).expect_err(name);
        let took = started.elapsed();
        eprintln!("{name}: refused in {took:?}: {}", first_line(&error));
        // Unbounded expansion would run for minutes or exhaust memory; the margin is wide
        // because the suite runs unoptimised with other test binaries beside it.
        assert!(took < Duration::from_secs(30), "{name}: took {took:?}");
    }
}

/// A chain of `n` policies, each extending the next: flat YAML, deep resolution.
fn policy_chain(n: usize) -> String {
    let mut text = String::from("domain: edge\npolicies:\n");
    for i in 0..n {
        text.push_str(&format!("  p{i}: {{extends: p{}}}\n", i + 1));
    }
    text.push_str(&format!(
        "  p{n}: {{limits: [{{requests_per_unit: 1, unit: second}}]}}\n\
         descriptors:\n  - key: user\n    policy: p0\n"
    ));
    text
}

/// A config directory of `n` domains, each extending the next.
fn domain_chain(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for i in 0..n {
        let extends = if i + 1 < n {
            format!("extends: d{}\n", i + 1)
        } else {
            String::new()
        };
        let text = format!(
            "domain: d{i}\n{extends}descriptors:\n  - {{key: k{i}, rate_limit: {{unit: second, requests_per_unit: 1}}}}\n"
        );
        std::fs::write(dir.path().join(format!("d{i}.yaml")), text).expect("write");
    }
    dir
}

/// Regression: resolving `extends` recursed once per link, and a chain of a few hundred
/// domains or a few thousand policies overflowed the reload thread's stack (the process
/// aborted). Chains are now bounded with an error that says so.
#[test]
fn long_extends_chains_are_an_error_not_a_stack_overflow() {
    let started = Instant::now();
    let error =
        on_reload_sized_stack(|| compile(&policy_chain(5_000))).expect_err("a 5 000-policy chain");
    assert!(
        error.contains("at most 32 policies"),
        "{}",
        first_line(&error)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let short = on_reload_sized_stack(|| compile(&policy_chain(20)));
    assert!(short.is_ok(), "a 20-policy chain must load: {short:?}");

    let dir = domain_chain(500);
    let path = dir.path().to_owned();
    let error = on_reload_sized_stack(move || load_dir(&path, &LoadOptions::default()))
        .expect_err("a 500-domain chain")
        .to_string();
    assert!(
        error.contains("at most 32 domains"),
        "{}",
        first_line(&error)
    );

    let dir = domain_chain(20);
    let path = dir.path().to_owned();
    let short = on_reload_sized_stack(move || load_dir(&path, &LoadOptions::default()).map(|_| ()));
    assert!(short.is_ok(), "a 20-domain chain must load: {short:?}");
}

/// Two domains of `n` descriptors each, the second extending the first when `extends`.
fn wide_domains(n: usize, extends: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let header = if extends { "extends: base\n" } else { "" };
    let (mut base, mut over) = (
        String::from("domain: base\ndescriptors:\n"),
        format!("domain: over\n{header}descriptors:\n"),
    );
    for i in 0..n {
        let rule = "rate_limit: {unit: second, requests_per_unit: 1}";
        base.push_str(&format!("  - {{key: k, value: b{i}, {rule}}}\n"));
        over.push_str(&format!("  - {{key: k, value: o{i}, {rule}}}\n"));
    }
    std::fs::write(dir.path().join("base.yaml"), base).expect("write");
    std::fs::write(dir.path().join("over.yaml"), over).expect("write");
    dir
}

/// Regression: a domain extending another looked each of its nodes up by a linear search
/// of the base's, so two domains of 20 000 descriptors took three minutes to load. Now
/// `extends` costs about what compiling the extra descriptors costs.
#[test]
fn extending_a_wide_domain_loads_in_linear_time() {
    let time_load = |extends: bool| {
        let dir = wide_domains(3_000, extends);
        let started = Instant::now();
        let loaded = load_dir(dir.path(), &LoadOptions::default());
        assert!(loaded.is_ok(), "{:?}", loaded.err().map(|e| e.to_string()));
        started.elapsed()
    };
    // The fastest of three, alternating: a stall from other tests running beside this one
    // lengthens one load, not all three.
    let (mut plain, mut extended) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        plain = plain.min(time_load(false));
        extended = extended.min(time_load(true));
    }
    eprintln!("2 x 3 000 descriptors: {plain:?} as two domains, {extended:?} with extends");
    // The quadratic merge took about 5 times the plain load at this size.
    assert!(
        extended < plain * 3 + Duration::from_millis(500),
        "extends took {extended:?}, two plain domains {plain:?}"
    );
}

/// Regression: files were read whole, whatever their size, on every reload check. A
/// file over `MAX_FILE_BYTES` is now refused by name, and reading stops at the bound.
#[test]
fn a_huge_file_is_refused_by_size() {
    let dir = tempfile::tempdir().expect("temp dir");
    let line = "  - {key: user, value: a, rate_limit: {unit: second, requests_per_unit: 1}}\n";
    let text = format!(
        "domain: edge\ndescriptors:\n{}",
        line.repeat(50 * 1024 * 1024 / line.len())
    );
    std::fs::write(dir.path().join("edge.yaml"), &text).expect("write");
    let started = Instant::now();
    let errors = load_dir(dir.path(), &LoadOptions::default())
        .expect_err("a 50 MB file must be refused")
        .to_string();
    let took = started.elapsed();
    assert!(errors.contains("edge.yaml"), "{errors}");
    assert!(
        errors.contains(&format!("at most {MAX_FILE_BYTES} bytes")),
        "{errors}"
    );
    // Reading and parsing all 50 MB unoptimised takes minutes; refusing by size, moments.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let snapshot = snapshot(dir.path());
    assert!(
        snapshot
            .iter()
            .all(|(_, bytes)| bytes.len() as u64 <= MAX_FILE_BYTES + 1)
    );

    // A file of exactly the bound is read (a config, then one long comment line).
    let config = "domain: edge\ndescriptors:\n  - key: user\n    rate_limit: {unit: second, requests_per_unit: 1}\n#";
    let padding = "x".repeat(MAX_FILE_BYTES as usize - config.len() - 1);
    std::fs::write(dir.path().join("edge.yaml"), format!("{config}{padding}\n")).expect("write");
    let loaded = load_dir(dir.path(), &LoadOptions::default());
    assert!(loaded.is_ok(), "{:?}", loaded.err().map(|e| e.to_string()));
}

// ---------------------------------------------------------------------------------------
// The decision path, in process
// ---------------------------------------------------------------------------------------

/// A small config using every algorithm and every policy feature a request can reach.
const LIMITER_CONFIG: &str = "\
domain: edge
capacity: {requests_per_unit: 50, per: 1s}
policies:
  standard:
    limits: [{requests_per_unit: 5, unit: second}, {requests_per_unit: 20, unit: minute}]
  bursty:
    extends: standard
    algorithm: token_bucket
    burst: 3
    priority: 10
    reserved: 0.2
  login:
    limits: [{requests_per_unit: 2, per: 10s}]
    penalty: {after: 2, within: 1m, block_for: 3s}
  meter:
    algorithm: leaky_bucket
    capacity: 4
    limits: [{requests_per_unit: 3, unit: second}]
  warn:
    mode: warn
    soft_limit: 0.5
    headers: [ietf, legacy, retry-after]
    limits: [{requests_per_unit: 1, unit: minute}]
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2, name: per-user}
    descriptors:
      - key: path
        value: /a/*
        rate_limit: {unit: hour, requests_per_unit: 1, algorithm: fixed_window}
  - key: ip
    rate_limit: {unit: second, requests_per_unit: 1, algorithm: sliding_log}
  - key: vip
    rate_limit: {unit: minute, requests_per_unit: 100, replaces: [{name: per-user}]}
  - key: internal
    rate_limit: {unlimited: true}
  - key: trial
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: plan
    value: bursty
    policy: bursty
    descriptors: [{key: user}]
  - key: login
    policy: login
  - key: meter
    policy: meter
  - key: warn
    policy: warn
";

/// Keys the configs know, and some they do not.
const KEYS: &[&str] = &[
    "user", "path", "ip", "vip", "internal", "trial", "plan", "login", "meter", "warn", "other",
];
const VALUES: &[&str] = &["a", "b", "/a/b", "/a/*", "bursty", "*", "|", "=", "%7C", ""];

/// 4 096 bytes is the default bound on a key or value; cross it from both sides.
fn text_near_bound() -> impl Strategy<Value = String> {
    (4_090usize..4_100).prop_map(|n| "x".repeat(n))
}

fn entry() -> BoxedStrategy<Entry> {
    let key = prop_oneof![
        8 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => Just(String::new()),
        1 => "\\PC{0,6}",
        1 => text_near_bound(),
    ];
    let value = prop_oneof![
        8 => prop::sample::select(VALUES).prop_map(str::to_owned),
        2 => "\\PC{0,12}",
        1 => text_near_bound(),
    ];
    (key, value)
        .prop_map(|(key, value)| Entry { key, value })
        .boxed()
}

fn hits() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        2u64..10,
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        any::<u64>()
    ]
}

fn descriptor() -> BoxedStrategy<RateLimitDescriptor> {
    let entries = prop_oneof![
        12 => prop::collection::vec(entry(), 1..4),
        1 => prop::collection::vec(entry(), 0..40),
    ];
    let limit = prop::option::weighted(
        0.15,
        (
            prop_oneof![Just(0u32), 1u32..10, Just(u32::MAX), any::<u32>()],
            -2i32..10,
        )
            .prop_map(|(requests_per_unit, unit)| RateLimitOverride {
                requests_per_unit,
                unit,
            }),
    );
    (entries, limit, prop::option::weighted(0.2, hits()))
        .prop_map(|(entries, limit, hits_addend)| RateLimitDescriptor {
            entries,
            limit,
            hits_addend,
        })
        .boxed()
}

fn request() -> BoxedStrategy<RateLimitRequest> {
    let domain = prop_oneof![
        12 => Just("edge".to_owned()),
        1 => Just(String::new()),
        1 => "\\PC{0,8}",
    ];
    let descriptors = prop_oneof![
        12 => prop::collection::vec(descriptor(), 1..5),
        1 => prop::collection::vec(descriptor(), 0..70),
    ];
    let hits_addend = prop_oneof![Just(0u32), Just(1), 2u32..5, any::<u32>()];
    (domain, descriptors, hits_addend)
        .prop_map(|(domain, descriptors, hits_addend)| RateLimitRequest {
            domain,
            descriptors,
            hits_addend,
        })
        .boxed()
}

/// A few requests, each after a pause of up to two minutes: enough for windows to roll,
/// buckets to refill and penalties to start and end.
fn request_sequence() -> BoxedStrategy<Vec<(u64, RateLimitRequest)>> {
    prop::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..2_000, 0u64..120_000],
            request(),
        ),
        1..8,
    )
    .boxed()
}

/// Whether the limiter must accept `request`: within `bounds`, and, in a domain it knows
/// (an unknown one is answered OK before any descriptor is looked at, as envoyproxy/ratelimit
/// does), with limit overrides in a unit it can count.
fn is_valid(request: &RateLimitRequest, bounds: &RequestBounds, known: bool) -> bool {
    !request.domain.is_empty()
        && (1..=bounds.max_descriptors).contains(&request.descriptors.len())
        && request.descriptors.iter().all(|d| {
            // No entries is fine: what Envoy sends when every action was skipped.
            d.entries.len() <= bounds.max_entries
                && d.entries.iter().all(|e| {
                    // A value of any length is counted (under a digest past the bound).
                    !e.key.is_empty() && e.key.len() <= bounds.max_entry_bytes
                })
                && (!known || d.limit.as_ref().is_none_or(|l| (1..=7).contains(&l.unit)))
        })
}

/// What every answer promises: one status per descriptor, and an overall OVER_LIMIT
/// exactly when some descriptor is over its limit.
fn check_answer(request: &RateLimitRequest, response: &RateLimitResponse) -> Result<(), String> {
    if response.statuses.len() != request.descriptors.len() {
        return Err(format!(
            "{} statuses for {} descriptors",
            response.statuses.len(),
            request.descriptors.len()
        ));
    }
    let any_over = response
        .statuses
        .iter()
        .any(|s| s.code() == Code::OverLimit);
    if (response.overall_code() == Code::OverLimit) != any_over {
        return Err(format!(
            "overall {:?} with statuses {:?}",
            response.overall_code(),
            response.statuses
        ));
    }
    Ok(())
}

/// Runs `sequence` through a fresh limiter over `config` on a manual clock.
fn decide_all(
    config: Arc<RateLimitConfig>,
    sequence: &[(u64, RateLimitRequest)],
) -> Result<(), TestCaseError> {
    let clock = ManualClock::at(1_750_000_000_000);
    let bounds = RequestBounds::default();
    let limiter = RateLimiter::new(
        Arc::new(ArcSwapOption::new(Some(config.clone()))),
        MemoryStore::new(1_000),
        clock.clone(),
        bounds,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    for (pause, request) in sequence {
        clock.advance(*pause);
        let known = config.domain(&request.domain).is_some();
        let valid = is_valid(request, &bounds, known);
        match runtime.block_on(limiter.should_rate_limit(request)) {
            Ok(response) => {
                prop_assert!(valid, "an invalid request was answered: {request:?}");
                check_answer(request, &response).map_err(TestCaseError::fail)?;
            }
            Err(DecisionError::InvalidRequest(message)) => {
                prop_assert!(
                    !valid,
                    "a valid request was refused ({message}): {request:?}"
                );
                prop_assert!(!message.is_empty());
            }
            Err(other) => prop_assert!(false, "{other} for {request:?}"),
        }
    }
    Ok(())
}

fn limiter_config() -> Arc<RateLimitConfig> {
    let tree = compile_str("edge.yaml", LIMITER_CONFIG, &LoadOptions::default())
        .unwrap_or_else(|errors| panic!("the test config does not load: {errors:?}"));
    Arc::new(RateLimitConfig::new([tree], Algorithm::SlidingWindow))
}

proptest! {
    #![proptest_config(cases(200))]

    #[test]
    fn the_limiter_answers_every_request_or_refuses_it(sequence in request_sequence()) {
        decide_all(limiter_config(), &sequence)?;
    }
}

/// Mostly one of `valid`, sometimes one of `invalid`: a config that loads reaches the
/// decision path, one that does not exercises the loader's errors.
fn mostly(
    valid: &'static [&'static str],
    invalid: &'static [&'static str],
) -> impl Strategy<Value = String> {
    prop_oneof![
        12 => prop::sample::select(valid),
        1 => prop::sample::select(invalid),
    ]
    .prop_map(str::to_owned)
}

/// `, name: value` with probability `p`, for building flow mappings.
fn field(
    name: &'static str,
    p: f64,
    value: impl Strategy<Value = String>,
) -> impl Strategy<Value = String> {
    prop::option::weighted(p, value)
        .prop_map(move |v| v.map_or_else(String::new, |v| format!(", {name}: {v}")))
}

/// `{a, b, c}` from fields that each start with `, `.
fn flow_map(fields: &[String]) -> String {
    format!("{{{}}}", fields.concat().trim_start_matches(", "))
}

fn units() -> impl Strategy<Value = String> {
    mostly(
        &[
            "second", "minute", "hour", "day", "week", "month", "year", "MINUTE",
        ],
        &["fortnight", "''"],
    )
}

fn counts() -> impl Strategy<Value = String> {
    mostly(
        &["1", "2", "3", "100", "4294967295"],
        &["-1", "0", "4294967296", "9223372036854775807", "1.5", "x"],
    )
}

fn durations() -> impl Strategy<Value = String> {
    mostly(
        &[
            "1ms",
            "1s",
            "10s",
            "1m",
            "1h",
            "1d",
            "18446744073709551ms",
            "213503982334d",
        ],
        &["0s", "18446744073709551615ms", "99999999999999d", "5", "''"],
    )
}

fn algorithms() -> impl Strategy<Value = String> {
    mostly(
        &[
            "sliding_window",
            "fixed_window",
            "token_bucket",
            "sliding_log",
            "leaky_bucket",
        ],
        &["bogus"],
    )
}

fn policy_names() -> impl Strategy<Value = String> {
    mostly(&["p0", "p1", "p2", "none"], &["missing"])
}

/// One limit, usually with a count and one window.
fn limit() -> BoxedStrategy<String> {
    let window = prop_oneof![
        8 => units().prop_map(|u| format!(", unit: {u}")),
        8 => durations().prop_map(|d| format!(", per: {d}")),
        1 => (units(), durations()).prop_map(|(u, d)| format!(", unit: {u}, per: {d}")),
        1 => Just(String::new()),
    ];
    (field("requests_per_unit", 0.95, counts()), window)
        .prop_map(|(a, b)| flow_map(&[a, b]))
        .boxed()
}

fn limit_list() -> BoxedStrategy<String> {
    prop_oneof![
        8 => limit().prop_map(|l| format!("[{l}]")),
        2 => prop::collection::vec(limit(), 0..4).prop_map(|l| format!("[{}]", l.join(", "))),
    ]
    .boxed()
}

/// The fields that give a node (or `defaults`) its limit, meshlimit's way.
fn policy_fields() -> BoxedStrategy<String> {
    (
        field("policy", 0.4, policy_names()),
        field("limits", 0.5, limit_list()),
        field("algorithm", 0.3, algorithms()),
        field("burst", 0.1, counts()),
        field("capacity", 0.1, counts()),
        field("unlimited", 0.1, mostly(&["true"], &["false"])),
    )
        .prop_map(|(a, b, c, d, e, f)| [a, b, c, d, e, f].concat())
        .boxed()
}

/// envoyproxy/ratelimit's `rate_limit` block.
fn rate_limit_block() -> BoxedStrategy<String> {
    (
        field("unit", 0.95, units()),
        field("requests_per_unit", 0.95, counts()),
        field("unlimited", 0.05, mostly(&["true"], &["false"])),
        field("name", 0.3, mostly(&["n0", "n1"], &["''"])),
        field(
            "replaces",
            0.2,
            mostly(&["[{name: n0}]", "[{name: n1}]"], &["[{}]"]),
        ),
        field("algorithm", 0.3, algorithms()),
    )
        .prop_map(|(a, b, c, d, e, f)| format!(", rate_limit: {}", flow_map(&[a, b, c, d, e, f])))
        .boxed()
}

/// A descriptor node and up to `depth` levels of children, as a flow mapping.
fn node(depth: u32) -> BoxedStrategy<String> {
    let limit = prop_oneof![
        3 => rate_limit_block(),
        3 => policy_fields(),
        2 => Just(String::new()),
    ];
    let children = if depth == 0 {
        Just(String::new()).boxed()
    } else {
        prop::collection::vec(node(depth - 1), 0..3)
            .prop_map(|c| {
                if c.is_empty() {
                    String::new()
                } else {
                    format!(", descriptors: [{}]", c.join(", "))
                }
            })
            .boxed()
    };
    (
        prop::sample::select(KEYS),
        field(
            "value",
            0.4,
            prop::sample::select(VALUES).prop_map(|v| format!("{v:?}")),
        ),
        limit,
        field("shadow_mode", 0.1, one_of(&["true", "false"])),
        field("detailed_metric", 0.1, one_of(&["true", "false"])),
        children,
    )
        .prop_map(|(key, value, limit, shadow, detailed, children)| {
            format!("{{key: {key}{value}{limit}{shadow}{detailed}{children}}}")
        })
        .boxed()
}

fn one_of(options: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(options).prop_map(str::to_owned)
}

/// A named policy with any of the fields a policy may have.
fn policy(name: &'static str) -> BoxedStrategy<String> {
    let shape = (
        field("extends", 0.2, policy_names()),
        field("limits", 0.8, limit_list()),
        field("algorithm", 0.3, algorithms()),
        field("burst", 0.1, counts()),
        field("capacity", 0.1, counts()),
        field("mode", 0.2, mostly(&["enforce", "warn"], &["loud"])),
    );
    let extras = (
        field(
            "soft_limit",
            0.2,
            mostly(&["0.5", "1"], &["0", "1.5", ".nan", "-.inf"]),
        ),
        field(
            "penalty",
            0.2,
            mostly(
                &[
                    "{after: 2, within: 1m, block_for: 3s}",
                    "{after: 1, within: 1ms, block_for: 213503982334d}",
                ],
                &[
                    "{after: 0, within: 0s, block_for: 1s}",
                    "{after: -1, within: 1s, block_for: 1s}",
                ],
            ),
        ),
        field(
            "priority",
            0.2,
            one_of(&["0", "10", "-9223372036854775808", "9223372036854775807"]),
        ),
        field(
            "reserved",
            0.2,
            mostly(&["0.2", "0.5", "1"], &[".nan", "-1", "2"]),
        ),
        field(
            "headers",
            0.2,
            mostly(&["[ietf]", "[legacy, retry-after]"], &["[nope]"]),
        ),
        field(
            "body",
            0.2,
            one_of(&[
                "'{policy} {limit} {window_seconds} {retry_after_seconds}'",
                "'{'",
                "'}{'",
            ]),
        ),
    );
    (shape, extras)
        .prop_map(move |((a, b, c, d, e, f), (g, h, i, j, k, l))| {
            format!(
                "  {name}: {}\n",
                flow_map(&[a, b, c, d, e, f, g, h, i, j, k, l])
            )
        })
        .boxed()
}

/// A whole config file of domain `edge`, from the pieces above.
fn generated_config() -> BoxedStrategy<String> {
    (
        prop::option::weighted(
            0.3,
            (
                counts(),
                prop_oneof![
                    units().prop_map(|u| format!("unit: {u}")),
                    durations().prop_map(|d| format!("per: {d}")),
                ],
            ),
        ),
        (policy("p0"), policy("p1"), policy("p2")),
        prop::option::weighted(0.3, policy_fields()),
        prop::collection::vec(node(2), 1..5),
    )
        .prop_map(|(capacity, (p0, p1, p2), defaults, nodes)| {
            let mut text = String::from("domain: edge\n");
            if let Some((count, window)) = capacity {
                text.push_str(&format!(
                    "capacity: {{requests_per_unit: {count}, {window}}}\n"
                ));
            }
            text.push_str(&format!("policies:\n{p0}{p1}{p2}"));
            if let Some(defaults) = defaults {
                text.push_str(&format!(
                    "defaults: {{{}}}\n",
                    defaults.trim_start_matches(", ")
                ));
            }
            text.push_str(&format!("descriptors: [{}]\n", nodes.join(", ")));
            text
        })
        .boxed()
}

proptest! {
    #![proptest_config(cases(200))]

    /// Any config the loader accepts must answer any request: no limit, window or policy
    /// it lets through may panic or overflow when counted.
    #[test]
    fn every_config_that_loads_answers_every_request(
        text in generated_config(),
        sequence in request_sequence(),
    ) {
        let _ = compile(&text);
        if let Ok(tree) = compile_str("edge.yaml", &text, &LoadOptions::default()) {
            let config = Arc::new(RateLimitConfig::new([tree], Algorithm::SlidingWindow));
            decide_all(config, &sequence)?;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The real binary's gRPC port
// ---------------------------------------------------------------------------------------

const RPC_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// `--max-request-bytes` of the servers below (a quarter of the default, so the cases
/// stay small).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How many hits of a probe value are admitted: the answer `still_serves` expects.
const PROBE_LIMIT: u32 = 5;

/// A meshlimit with one limit, `probe` (5 an hour per value), and a bound on request size.
fn start_server() -> (common::meshlimit::Meshlimit, tempfile::TempDir) {
    let config = format!(
        "domain: edge\ndescriptors:\n  - key: probe\n    rate_limit: {{unit: hour, requests_per_unit: {PROBE_LIMIT}}}\n"
    );
    let dir = common::config_dir::plain(&[("edge.yaml", &config)]);
    let max = MAX_REQUEST_BYTES.to_string();
    let server =
        common::meshlimit::Meshlimit::start_with(dir.path(), &["--max-request-bytes", &max]);
    (server, dir)
}

fn probe(value: &str) -> RateLimitRequest {
    common::meshlimit::one_entry_request("edge", "probe", value)
}

/// After an attack: a fresh value gets the right answer on a new connection, `/healthcheck`
/// is 200, and nothing in the server's output says it panicked.
async fn still_serves(server: &common::meshlimit::Meshlimit, after: &str) {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let value = format!(
        "after-{}",
        PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut client = server.client().await;
    let response = match client.should_rate_limit(probe(&value)).await {
        Ok(response) => response.into_inner(),
        Err(status) => panic!(
            "after {after}, a normal request failed: {status}\n{}",
            server.logs()
        ),
    };
    let status = response.statuses.first().expect("one status");
    assert_eq!(
        (response.overall_code(), status.limit_remaining),
        (Code::Ok, PROBE_LIMIT - 1),
        "after {after}: {response:?}"
    );
    let health = server.admin_get("/healthcheck");
    assert_eq!(health.status, 200, "after {after}: /healthcheck {health:?}");
    assert!(
        !server.logs().contains("panicked"),
        "after {after}:\n{}",
        server.logs()
    );
}

/// Sends bytes as the request message, unchecked: what a broken or hostile client can put
/// on the wire inside a well-formed gRPC frame.
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// One ShouldRateLimit call whose message is `body`, exactly.
async fn call_raw(
    channel: &tonic::transport::Channel,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(RPC_PATH);
    grpc.unary(tonic::Request::new(body), path, RawBytes)
        .await
        .map(tonic::Response::into_inner)
}

/// Whether a status shows the server refused the message, as opposed to a server that is
/// gone or cut the call off. tonic answers a message it cannot decode with INTERNAL and one
/// over its size bound with OUT_OF_RANGE; meshlimit's own checks answer INVALID_ARGUMENT.
fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::Internal | tonic::Code::OutOfRange
    )
}

/// Protobuf wire format by hand, for messages prost would refuse to build.
fn length_delimited(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = varint(u64::from(field << 3 | 2));
    out.extend(varint(bytes.len() as u64));
    out.extend_from_slice(bytes);
    out
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A request whose entry key is not UTF-8, which protobuf strings must be.
fn request_with_key(key: &[u8]) -> Vec<u8> {
    let entry = [length_delimited(1, key), length_delimited(2, b"v")].concat();
    let descriptor = length_delimited(1, &entry);
    [
        length_delimited(1, b"edge"),
        length_delimited(2, &descriptor),
    ]
    .concat()
}

#[test]
fn malformed_protobuf_gets_an_error_status() {
    let (server, _config) = start_server();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let channel = runtime.block_on(server.channel());

    let mut hand_made: Vec<(&str, Vec<u8>)> = vec![
        ("a truncated varint", vec![0x08, 0xff]),
        ("a field of wire type 7", vec![0x0f]),
        ("a length past the end", vec![0x0a, 0x7f, b'e']),
        ("a 2^63 length", [vec![0x0a], varint(1 << 63)].concat()),
        ("field number 0", vec![0x02, 0x00]),
        ("the domain is not UTF-8", length_delimited(1, b"ed\xffge")),
        ("a key that is not UTF-8", request_with_key(b"us\xc3\x28er")),
        (
            "a key that is a lone surrogate",
            request_with_key(b"\xed\xa0\x80"),
        ),
        (
            "a group that never ends",
            [vec![0x0b], [0x08, 0x01].repeat(1_000)].concat(),
        ),
        (
            "a descriptor of nested garbage",
            length_delimited(2, &[0x0a; 200]),
        ),
    ];
    // A descriptor nested far deeper than prost's recursion limit of 100.
    let mut nested = Vec::new();
    for _ in 0..200 {
        nested = length_delimited(1, &nested);
    }
    hand_made.push(("messages nested 200 deep", length_delimited(2, &nested)));

    for (name, body) in hand_made {
        let answer = runtime.block_on(call_raw(&channel, body));
        match &answer {
            Err(status) => assert!(is_refusal(status), "{name}: {status:?}"),
            Ok(bytes) => {
                let decoded = <RateLimitResponse as prost::Message>::decode(bytes.as_slice());
                panic!("{name}: answered {decoded:?}");
            }
        }
        eprintln!("{name}: {:?}", answer.err().map(|s| s.code()));
        runtime.block_on(still_serves(&server, name));
    }

    // Arbitrary bytes: some happen to decode (then the limiter judges them), the rest are
    // refused; every call is answered.
    let mut runner = TestRunner::new(cases(48));
    let outcome = runner.run(&prop::collection::vec(any::<u8>(), 0..300), |body| {
        let answer = runtime.block_on(call_raw(&channel, body.clone()));
        if let Err(status) = &answer {
            prop_assert!(
                is_refusal(status),
                "{body:?}: {status:?}\n{}",
                server.logs()
            );
        }
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    runtime.block_on(still_serves(&server, "arbitrary bytes"));
}

fn descriptors(
    count: usize,
    entries: usize,
    key_bytes: usize,
    value_bytes: usize,
) -> Vec<RateLimitDescriptor> {
    let entry = Entry {
        key: "k".repeat(key_bytes),
        value: "v".repeat(value_bytes),
    };
    vec![
        RateLimitDescriptor {
            entries: vec![entry; entries],
            ..Default::default()
        };
        count
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_overfull_requests_are_refused() {
    let (server, _config) = start_server();
    let mut client = server.client().await;
    let request = |descriptors| RateLimitRequest {
        domain: "edge".into(),
        descriptors,
        hits_addend: 0,
    };
    let cases: Vec<(&str, RateLimitRequest, tonic::Code, &str)> = vec![
        (
            "just over --max-request-bytes",
            request(descriptors(20, 1, 5, 3_400)),
            tonic::Code::InvalidArgument,
            "--max-request-bytes",
        ),
        (
            "over 4 x --max-request-bytes",
            request(descriptors(64, 1, 5, 4_096)),
            tonic::Code::OutOfRange,
            "message length too large",
        ),
        (
            "a 16 MiB value",
            request(descriptors(1, 1, 5, 16 << 20)),
            tonic::Code::OutOfRange,
            "message length too large",
        ),
        (
            "5 000 descriptors",
            request(descriptors(5_000, 1, 1, 1)),
            tonic::Code::InvalidArgument,
            "--max-descriptors",
        ),
        (
            "a descriptor of 5 000 entries",
            request(descriptors(1, 5_000, 1, 1)),
            tonic::Code::InvalidArgument,
            "--max-entries",
        ),
        (
            "an empty key",
            request(descriptors(1, 1, 0, 1)),
            tonic::Code::InvalidArgument,
            "empty key",
        ),
        (
            "a 4 097-byte key",
            request(descriptors(1, 1, 4_097, 1)),
            tonic::Code::InvalidArgument,
            "longer than 4096 bytes",
        ),
        (
            "an empty domain",
            RateLimitRequest {
                domain: String::new(),
                ..request(descriptors(1, 1, 1, 1))
            },
            tonic::Code::InvalidArgument,
            "domain is empty",
        ),
    ];
    for (name, request, code, says) in cases {
        let status = client.should_rate_limit(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(status.message().contains(says), "{name}: {status:?}");
        still_serves(&server, name).await;
    }

    // At the bounds exactly, and with empty values, requests are answered.
    let fine = [
        (
            "4 096-byte key and value",
            request(descriptors(1, 1, 4_096, 4_096)),
        ),
        ("an empty value", request(descriptors(1, 1, 1, 0))),
        // A client's own long header: counted under a digest, not refused.
        ("a 40 000-byte value", request(descriptors(1, 1, 1, 40_000))),
        // What Envoy sends when `skip_if_absent` skipped every action: no limit.
        (
            "a descriptor of no entries",
            request(descriptors(1, 0, 1, 1)),
        ),
        (
            "64 descriptors of 32 entries",
            request(descriptors(64, 32, 4, 4)),
        ),
    ];
    for (name, request) in fine {
        let response = client
            .should_rate_limit(request)
            .await
            .unwrap_or_else(|status| panic!("{name}: {status:?}"))
            .into_inner();
        assert!(!response.statuses.is_empty(), "{name}");
    }
    still_serves(&server, "requests at the bounds").await;
}

/// Many oversized requests at once: each is refused, and the server's memory stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_oversized_requests_leaves_memory_bounded() {
    let (server, _config) = start_server();
    let channel = server.channel().await;
    let rss_before = rss_kib(server.pid());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let channel = channel.clone();
        // Just under the transport's bound (4 x --max-request-bytes): decoded, then refused.
        let body = RateLimitRequest {
            domain: "edge".into(),
            descriptors: descriptors(60, 1, 5, 4_000),
            hits_addend: 0,
        };
        calls.spawn(async move {
            let mut client =
                meshlimit::proto::rate_limit_service_client::RateLimitServiceClient::new(channel);
            client.should_rate_limit(body).await.map(|_| ())
        });
    }
    while let Some(done) = calls.join_next().await {
        let status = done
            .expect("a call task")
            .expect_err("an oversized request");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let rss_after = rss_kib(server.pid());
    eprintln!("RSS {rss_before} KiB before 64 oversized requests, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "{rss_before} -> {rss_after} KiB"
    );
    still_serves(&server, "64 concurrent oversized requests").await;
}

/// Connections past the process's file limit: accepting fails while no descriptor is free,
/// and the server neither spins a core retrying nor stops serving once descriptors free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_file_limit_do_not_spin_the_accept_loop() {
    let (server, _config) = start_server();
    let pid = server.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count();
    let usual = file_limit(pid);
    set_file_limit(pid, &(open + 4).to_string());
    // A few are accepted; the rest wait in the listen backlog while accepting fails.
    let flood: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(server.grpc_addr).expect("connect"))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(pid) - before;
    drop(flood);
    set_file_limit(pid, &usual);
    // Retrying without a pause spends the whole 2 s (about 200 ticks) on one core.
    assert!(
        spent < 50,
        "{spent} ticks of CPU in 2 s with accepting failing\n{}",
        server.logs()
    );
    assert!(
        server.logs().contains("accepting a gRPC connection failed"),
        "{}",
        server.logs()
    );
    still_serves(&server, "connections past the file limit").await;
}

/// Process `pid`'s soft limit on open files, from /proc.
fn file_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace()
        .nth(3)
        .expect("a soft limit")
        .to_owned()
}

/// Sets process `pid`'s soft limit on open files (its hard limit stays), with util-linux's
/// prlimit.
fn set_file_limit(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --nofile={soft}: failed");
}

/// CPU time process `pid` has used, user and system, in clock ticks (1/100 s), from /proc.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a command name")
        .1
        .split_whitespace()
        .collect();
    // utime and stime: the 14th and 15th fields, the 12th and 13th after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The resident memory of process `pid`, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// HTTP/2 by hand, below what any client library lets a caller break: bad gRPC frame
/// headers, bad pseudo-headers, garbage instead of the connection preface.
mod raw_h2 {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const ACK: u8 = 0x1;

    /// How the server ended the exchange.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Ending {
        /// The stream ended with a response (trailers or a trailers-only answer).
        Answered,
        /// The stream was reset.
        Reset,
        /// The whole connection was ended: GOAWAY, or closed.
        ConnectionClosed,
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// HPACK "literal header field without indexing, new name", no Huffman coding.
    fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in headers {
            out.push(0x00);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.push(value.len() as u8);
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// The request headers of a gRPC call to `path` with `content_type`.
    pub fn grpc_headers<'a>(path: &'a str, content_type: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", content_type),
            ("te", "trailers"),
        ]
    }

    /// Opens a connection, sends one stream of `headers` and then `data` (each chunk one
    /// DATA frame, the last ending the stream), and reads until the server ends it.
    pub fn exchange(
        addr: SocketAddr,
        headers: &[(&str, &str)],
        data: &[Vec<u8>],
    ) -> Result<Ending, String> {
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(SETTINGS, 0, 0, &[]));
        let end_now = if data.is_empty() { END_STREAM } else { 0 };
        wire.extend(frame(
            HEADERS,
            END_HEADERS | end_now,
            1,
            &header_block(headers),
        ));
        for (i, chunk) in data.iter().enumerate() {
            let flags = if i + 1 == data.len() { END_STREAM } else { 0 };
            wire.extend(frame(DATA, flags, 1, chunk));
        }
        send_and_read(addr, &wire)
    }

    /// Sends `wire` as the first bytes of a connection and reads until the server ends
    /// stream 1 or the connection; an error if it does neither within 10 s.
    pub fn send_and_read(addr: SocketAddr, wire: &[u8]) -> Result<Ending, String> {
        let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        // The server may close before taking everything; what it answers is what counts.
        let _ = stream.write_all(wire);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            while buffer.len() >= 9 {
                let len = (usize::from(buffer[0]) << 16)
                    | (usize::from(buffer[1]) << 8)
                    | usize::from(buffer[2]);
                if buffer.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buffer[3], buffer[4]);
                let id =
                    u32::from_be_bytes([buffer[5], buffer[6], buffer[7], buffer[8]]) & 0x7fff_ffff;
                buffer.drain(..9 + len);
                match (kind, id) {
                    (SETTINGS, 0) if flags & ACK == 0 => {
                        let _ = stream.write_all(&frame(SETTINGS, ACK, 0, &[]));
                    }
                    (HEADERS | DATA, 1) if flags & END_STREAM != 0 => return Ok(Ending::Answered),
                    (RST_STREAM, 1) => return Ok(Ending::Reset),
                    (GOAWAY, _) => return Ok(Ending::ConnectionClosed),
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no end of stream or connection within 10 s; {} bytes unread",
                    buffer.len()
                ));
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(Ending::ConnectionClosed),
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Ok(Ending::ConnectionClosed);
                }
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

type Headers<'a> = Vec<(&'a str, &'a str)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_http2_and_grpc_framing_is_answered_or_closed() {
    use common::grpc_frame;
    use raw_h2::{Ending, exchange, grpc_headers, send_and_read};
    let (server, _config) = start_server();
    let addr = server.grpc_addr;
    let valid = <RateLimitRequest as prost::Message>::encode_to_vec(&probe("raw"));
    let grpc = grpc_headers(RPC_PATH, "application/grpc");
    let valid_len = valid.len() as u32;
    let slashes = "/".repeat(120);
    // (what, request headers, DATA frames)
    let cases: Vec<(&str, Headers<'_>, Vec<Vec<u8>>)> = vec![
        (
            "a well-formed call, for reference",
            grpc.clone(),
            vec![grpc_frame(0, valid_len, &valid)],
        ),
        (
            "the compressed flag without grpc-encoding",
            grpc.clone(),
            vec![grpc_frame(1, valid_len, &valid)],
        ),
        (
            "a compressed flag of 7",
            grpc.clone(),
            vec![grpc_frame(7, valid_len, &valid)],
        ),
        (
            "a length of 4 GiB",
            grpc.clone(),
            vec![grpc_frame(0, u32::MAX, &valid)],
        ),
        (
            "a length past the end",
            grpc.clone(),
            vec![grpc_frame(0, valid_len + 100, &valid)],
        ),
        ("half a frame header", grpc.clone(), vec![vec![0, 0, 0]]),
        (
            "two messages in a unary call",
            grpc.clone(),
            vec![
                [
                    grpc_frame(0, valid_len, &valid),
                    grpc_frame(0, valid_len, &valid),
                ]
                .concat(),
            ],
        ),
        (
            "the message split over 3 000 DATA frames",
            grpc.clone(),
            grpc_frame(0, valid_len, &valid)
                .iter()
                .map(|b| vec![*b])
                .chain(std::iter::repeat_n(Vec::new(), 3_000))
                .collect(),
        ),
        ("no message at all", grpc.clone(), vec![]),
        (
            "content-type text/plain",
            grpc_headers(RPC_PATH, "text/plain"),
            vec![grpc_frame(0, valid_len, &valid)],
        ),
        (
            "an unknown method",
            grpc_headers(
                "/envoy.service.ratelimit.v3.RateLimitService/Nope",
                "application/grpc",
            ),
            vec![grpc_frame(0, valid_len, &valid)],
        ),
        (
            "a path of 120 slashes",
            grpc_headers(&slashes, "application/grpc"),
            vec![grpc_frame(0, valid_len, &valid)],
        ),
        (
            "no pseudo-headers",
            vec![("content-type", "application/grpc")],
            vec![grpc_frame(0, valid_len, &valid)],
        ),
    ];
    for (name, headers, data) in cases {
        let ending = tokio::task::block_in_place(|| exchange(addr, &headers, &data))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("{name}: {ending:?}");
        if name.ends_with("for reference") {
            assert_eq!(ending, Ending::Answered, "{name}");
        }
        still_serves(&server, name).await;
    }

    // Not HTTP/2 at all: garbage, an HTTP/1.1 request, a preface and then garbage.
    let mut garbage = vec![0u8; 4096];
    for (i, byte) in garbage.iter_mut().enumerate() {
        *byte = (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0];
    }
    let preface_then_garbage = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &garbage].concat();
    let connections: Vec<(&str, Vec<u8>)> = vec![
        ("4 KiB of garbage", garbage),
        (
            "an HTTP/1.1 request",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
        ),
        ("the preface, then garbage", preface_then_garbage),
    ];
    for (name, wire) in connections {
        let ending = tokio::task::block_in_place(|| send_and_read(addr, &wire))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ending, Ending::ConnectionClosed, "{name}");
        still_serves(&server, name).await;
    }
}

/// An xDS resource's bytes as a control plane (or an attacker in its place) might send
/// them, through what the xDS client does with a response: decode, write out, load. An
/// error must name the resource; nothing may panic.
fn load_xds_resource(bytes: Vec<u8>) -> Result<(), String> {
    let resource = prost_types::Any {
        type_url: meshlimit::xds::resource::TYPE_URL.to_owned(),
        value: bytes,
    };
    on_reload_sized_stack(move || {
        meshlimit::xds::resource::load_snapshot(&[resource], &LoadOptions::default())
            .map(|_| ())
            .map_err(|errors| {
                let text = errors.to_string();
                assert!(
                    text.starts_with("xds:"),
                    "an error without its resource: {text}"
                );
                text
            })
    })
}

/// A `RateLimitConfig` whose descriptors nest `levels` deep, encoded level by level: a
/// nested struct that deep would overflow the test's own stack to build, encode and drop.
fn nested_xds_config(levels: usize) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
        encode_key(number, WireType::LengthDelimited, out);
        encode_varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    // RateLimitDescriptor: key = 1, descriptors = 4; RateLimitConfig: name = 1,
    // domain = 2, descriptors = 3.
    let mut node = Vec::new();
    field(&mut node, 1, b"leaf");
    for level in 0..levels {
        let mut parent = Vec::new();
        field(&mut parent, 1, format!("k{level}").as_bytes());
        field(&mut parent, 4, &node);
        node = parent;
    }
    let mut config = Vec::new();
    field(&mut config, 1, b"deep");
    field(&mut config, 2, b"edge");
    field(&mut config, 3, &node);
    config
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn xds_resources_of_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = load_xds_resource(bytes);
    }
}

#[test]
fn deep_xds_resources_are_an_error_not_a_stack_overflow() {
    assert!(
        load_xds_resource(nested_xds_config(8)).is_ok(),
        "8 levels must load"
    );
    for levels in [40, 99, 500, 5_000] {
        let started = Instant::now();
        let error =
            load_xds_resource(nested_xds_config(levels)).expect_err("deeper than the loader takes");
        eprintln!(
            "{levels} levels: refused in {:?}: {}",
            started.elapsed(),
            first_line(&error)
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
