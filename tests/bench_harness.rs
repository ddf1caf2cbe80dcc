//! The load harness, `bench/run.sh`, at CI size, so it cannot rot: a second per step and no
//! warm-up, with the debug binaries this test run has already built (`BENCH_BIN_DIR`), so
//! it needs no release build. It checks that every row of the results file is there, with
//! requests answered and none failed; the script itself fails if any request failed or a
//! sampled answer was wrong.
//!
//! It asserts no performance target: a debug build on a busy CI machine says nothing
//! about those. The full-size numbers are in BENCHMARKS.md.
//!
//! Needs h2load (`apt-get install nghttp2-client`, which `scripts/test.sh` does as root);
//! without it the test says so and passes. Envoy and a Redis server come from
//! `scripts/test.sh` as for the other end-to-end tests.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

/// Ports the script uses from its BENCH_PORT_BASE up.
const PORTS: u16 = 10;
/// Seconds before `timeout` stops the script: its steps take ~30 s on a busy 2-core
/// machine; the rest is for startup.
const LIMIT_SECONDS: &str = "180";

const MIXES: [&str; 4] = ["d1-mix", "d4-mix", "d8-mix", "d4-one"];
const SERVERS: [&str; 3] = ["ceiling", "memory", "redis"];
const LOADS: [&str; 2] = ["max", "half"];

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// Where the search for free ports starts, and how far it goes: 20000-31999, below Linux's
/// ephemeral range (32768-60999 by default). A port found free there can still be taken
/// before the script binds it by the local end of any outgoing connection (h2load's,
/// Envoy's, a Redis client's), which is how a run once lost port 35020.
const PORT_LOW: u16 = 20_000;
const PORT_SPAN: u16 = 12_000;

/// A base port with the PORTS after it free on loopback (a later bind may still lose a
/// race; the script then says which port is taken). Each test passes its own `lane`, so
/// two tests of this process do not start their search at the same port.
fn free_port_base(lane: u16) -> u16 {
    let offset = ((std::process::id() % 1_000) as u16 * 10 + lane * (PORT_SPAN / 4)) % PORT_SPAN;
    (0..200)
        .map(|i| PORT_LOW + (offset + i * 97) % (PORT_SPAN - PORTS))
        .find(|&base| {
            (base..base + PORTS).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        })
        .expect("no run of free loopback ports between 20000 and 31999")
}

/// target/debug: the meshlimit binary, and beside it the examples, which `cargo test
/// --all-targets` builds only as test harnesses; this builds them as programs (cargo is no
/// longer holding the build directory while tests run).
fn debug_binaries() -> &'static Path {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--locked",
            "--example",
            "ok_server",
            "--example",
            "make_request",
        ])
        .output()
        .expect("run cargo build");
    assert!(
        build.status.success(),
        "cargo build --example ok_server --example make_request:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    Path::new(env!("CARGO_BIN_EXE_meshlimit"))
        .parent()
        .expect("the binary's directory")
}

/// Runs `script` under `timeout limit_seconds` with the debug binaries, results in a
/// temp dir, ports from `lane`'s search and `settings`; returns the results dir and the
/// script's output, after asserting it succeeded.
fn run_script(
    script: &str,
    limit_seconds: &str,
    lane: u16,
    settings: &[(&str, &str)],
) -> (tempfile::TempDir, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = debug_binaries();
    let results = tempfile::tempdir().expect("a temp dir for the results");
    let output = Command::new("timeout")
        .args(["--kill-after=10", limit_seconds, "bash"])
        .arg(root.join(script))
        .envs(settings.iter().copied())
        .env("BENCH_BIN_DIR", bin_dir)
        .env("BENCH_RESULTS", results.path())
        .env("BENCH_PORT_BASE", free_port_base(lane).to_string())
        .output()
        .unwrap_or_else(|err| panic!("run {script}: {err}"));
    let log = format!(
        "{script} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{log}");
    (results, log)
}

#[test]
fn every_step_of_the_load_harness_runs_without_failures() {
    if !on_path("h2load") {
        eprintln!(
            "skipped: h2load is missing (apt-get install nghttp2-client; scripts/test.sh \
             installs it when run as root)"
        );
        return;
    }
    let (results, log) = run_script(
        "bench/run.sh",
        LIMIT_SECONDS,
        0,
        &[
            ("BENCH_SECONDS", "1"),
            ("BENCH_WARMUP", "0"),
            ("BENCH_ENVOY_RPS", "400"),
        ],
    );

    let tsv = std::fs::read_to_string(results.path().join("run.tsv"))
        .unwrap_or_else(|err| panic!("read run.tsv: {err}\n{log}"));
    let mut lines = tsv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "mix\tstore\tload\treq_per_s\tp50_ms\tp99_ms\tp999_ms\tcpu_us_per_req\tpct_of_ceiling\trequests\tfailed"
        ),
        "{log}"
    );
    let mut seen = BTreeSet::new();
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 11, "row {line:?}\n{log}");
        let number = |i: usize| -> f64 {
            fields[i]
                .parse()
                .unwrap_or_else(|_| panic!("field {i} of {line:?} is not a number\n{log}"))
        };
        assert!(number(3) > 0.0, "no throughput in {line:?}\n{log}");
        assert!(number(9) > 0.0, "no requests in {line:?}\n{log}");
        assert_eq!(number(10), 0.0, "failed requests in {line:?}\n{log}");
        for percentile in 4..=6 {
            assert!(number(percentile) > 0.0, "no latency in {line:?}\n{log}");
        }
        assert!(
            seen.insert((
                fields[0].to_owned(),
                fields[1].to_owned(),
                fields[2].to_owned()
            )),
            "row {line:?} twice\n{log}"
        );
    }
    let mut expected = BTreeSet::new();
    for mix in MIXES {
        for server in SERVERS {
            for load in LOADS {
                expected.insert((mix.to_owned(), server.to_owned(), load.to_owned()));
            }
        }
    }
    for variant in ["plain", "filter", "uds"] {
        for load in ["fixed", "serial"] {
            expected.insert(("envoy".to_owned(), variant.to_owned(), load.to_owned()));
        }
    }
    assert_eq!(seen, expected, "rows of run.tsv\n{log}");
    let report = std::fs::read_to_string(results.path().join("run.txt")).expect("read run.txt");
    // Each max row is the median of that server's rounds, as the report lists them.
    for mix in MIXES {
        for server in SERVERS {
            let prefix = format!("{mix} {server} max, req/s by round: ");
            let line = report
                .lines()
                .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no rounds for {mix} {server}\n{report}"));
            let mut rounds: Vec<f64> = line
                .split(" (")
                .next()
                .unwrap_or_default()
                .split(" / ")
                .map(|rps| rps.parse().unwrap_or_else(|_| panic!("{line:?}")))
                .collect();
            assert_eq!(rounds.len(), 3, "{line:?}");
            rounds.sort_by(f64::total_cmp);
            let row = tsv
                .lines()
                .find(|row| row.starts_with(&format!("{mix}\t{server}\tmax\t")))
                .expect("a max row");
            let rps: f64 = row
                .split('\t')
                .nth(3)
                .unwrap_or_default()
                .parse()
                .expect("req/s");
            assert_eq!(rps, rounds[1], "{row:?} is not the median of {line:?}");
        }
    }
    assert!(
        report.contains("Envoy: the ratelimit filter adds")
            && report.contains("Envoy: on a Unix socket the filter adds")
            && report.contains("one request at a time"),
        "{report}"
    );
    // The machine's own stalls, which every latency on it includes, are in the report.
    assert!(report.contains("stalls_over_1ms="), "{report}");
}

/// `bench/instructions.sh` at CI size: 100 counted requests per row with the debug
/// binaries, the traced row included. Checks every server has a count for every request
/// size and that the traced one's spans reached the collector; the counts of a debug build
/// say nothing about the release numbers in BENCHMARKS.md.
#[test]
fn the_instruction_count_has_a_row_for_every_server() {
    for tool in ["h2load", "valgrind", "callgrind_control"] {
        if !on_path(tool) {
            eprintln!(
                "skipped: {tool} is missing (apt-get install nghttp2-client valgrind; \
                 scripts/test.sh installs them when run as root)"
            );
            return;
        }
    }
    let (results, log) = run_script(
        "bench/instructions.sh",
        "600",
        1,
        &[
            ("BENCH_REQUESTS", "100"),
            ("BENCH_WARMUP_REQUESTS", "20"),
            ("BENCH_TRACED", "1"),
        ],
    );
    let report = std::fs::read_to_string(results.path().join("instructions.txt"))
        .unwrap_or_else(|err| panic!("read instructions.txt: {err}\n{log}"));
    for server in SERVERS.iter().chain(&["traced"]) {
        let row = report
            .lines()
            .find(|line| line.split_whitespace().next() == Some(*server))
            .unwrap_or_else(|| panic!("no {server} row\n{report}"));
        let counts: Vec<u64> = row
            .split_whitespace()
            .skip(1)
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        assert_eq!(counts.len(), 3, "{row}\n{report}");
        assert!(counts.iter().all(|&n| n > 0), "{row}\n{report}");
    }
    assert!(report.contains("d8: memory = "), "{report}");
    assert!(report.contains("d8: tracing every call costs"), "{report}");
    // Every traced request made a span: warm-up and counted, at three sizes, and the
    // readiness checks.
    let spans: u64 = report
        .split_once("the collector received ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no span count\n{report}"));
    assert!(spans >= 3 * 120, "{spans} spans\n{report}");
}

/// `bench/soak.sh` at CI size: four one-second periods on each store, with a cache of 500
/// counters the new clients overfill in the first. Checks a row per period, with memory,
/// counters within the capacity (the memory store holds some, and evicts), CPU per decision and
/// latency, no failed request, and the memory verdict's line (its bound set loose: a
/// debug build's four seconds say nothing about a soak's growth).
#[test]
fn the_soak_samples_every_period_on_both_stores() {
    for (lane, store) in [(2, "memory"), (3, "redis")] {
        let (results, log) = run_script(
            "bench/soak.sh",
            "180",
            lane,
            &[
                ("SOAK_STORE", store),
                ("SOAK_SECONDS", "4"),
                ("SOAK_PERIOD", "1"),
                ("SOAK_RATE", "300"),
                ("SOAK_CAPACITY", "500"),
                ("SOAK_MAX_GROWTH", "1000"),
            ],
        );
        let report = std::fs::read_to_string(results.path().join("soak.txt"))
            .unwrap_or_else(|err| panic!("read soak.txt: {err}\n{log}"));
        let rows: Vec<Vec<f64>> = report
            .lines()
            .skip_while(|line| !line.starts_with("t_s"))
            .skip(1)
            .take_while(|line| line.starts_with(|c: char| c.is_ascii_digit()))
            .map(|line| {
                line.split_whitespace()
                    .map(|field| {
                        field
                            .parse()
                            .unwrap_or_else(|_| panic!("{field:?} in {line:?}\n{report}"))
                    })
                    .collect()
            })
            .collect();
        assert_eq!(rows.len(), 4, "{store}: a row a period\n{report}");
        for row in &rows {
            let [_, rss, counters, evicted, cpu, p50, p99, p999, late, failed] = row[..] else {
                panic!("{store}: {row:?}\n{report}");
            };
            assert!(rss > 1.0 && cpu > 0.0, "{store}: {row:?}\n{report}");
            assert!(
                p50 > 0.0 && p99 >= p50 && p999 >= p99,
                "{store}: {row:?}\n{report}"
            );
            assert!(counters <= 500.0, "{store}: {row:?}\n{report}");
            if store == "redis" {
                assert_eq!(evicted, 0.0, "nothing to evict\n{report}");
            }
            assert!((0.0..=100.0).contains(&late), "{store}: {row:?}\n{report}");
            assert_eq!(failed, 0.0, "{store}: {row:?}\n{report}");
        }
        if store == "memory" {
            assert_eq!(rows[3][2], 500.0, "the cache fills up\n{report}");
            // Then turns over: new clients' counters push out older ones.
            let evicted: f64 = rows.iter().map(|row| row[3]).sum();
            assert!(evicted > 0.0, "the cache turns over\n{report}");
        }
        assert!(report.contains("resident memory: "), "{report}");
        assert!(report.contains("soak passed"), "{report}");
    }
}
