//! What a /metrics scrape costs, off the decision path: 1 000 rules (keys of two parts)
//! under the built-in envoyproxy/ratelimit names, against the same names given by a
//! statsd_exporter mapping file (PROMETHEUS_MAPPER_YAML, envoyproxy/ratelimit's own
//! mapping written out in tests/fixtures/prometheus/envoyproxy_mapping.yaml), which matches
//! every stat's statsd name against the mapping's patterns on the first scrape and
//! remembers where each went for the next.
//!
//!     cargo bench --bench scrape

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use meshlimit::config::{LoadOptions, compile_str};
use meshlimit::matcher::RateLimitConfig;
use meshlimit::metrics::{EnvoyproxyNames, Metrics};
use meshlimit::prometheus_mapping::PrometheusMapping;

const MAPPING: &str = include_str!("../tests/fixtures/prometheus/envoyproxy_mapping.yaml");

/// 1 000 rules `user_<i>.path`, each with a limit.
fn config() -> RateLimitConfig {
    let mut yaml = String::from("domain: bench\ndescriptors:\n");
    for i in 0..1_000 {
        let _ = write!(
            yaml,
            "  - key: user_{i}\n    descriptors:\n      - key: path\n        rate_limit: {{unit: second, requests_per_unit: 100}}\n"
        );
    }
    let tree = compile_str("bench.yaml", &yaml, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e:?}"));
    RateLimitConfig::new([tree], Default::default())
}

fn scrape(c: &mut Criterion) {
    let config = config();
    let mut group = c.benchmark_group("scrape_1000_rules");
    let builtin = Metrics::default();
    builtin.attach(&config);
    group.bench_function("builtin_names", |b| b.iter(|| black_box(builtin.render())));
    let mapping = PrometheusMapping::parse("envoyproxy_mapping.yaml", MAPPING)
        .unwrap_or_else(|e| panic!("{e}"));
    // The first scrape matches every stat; later ones find where each went remembered.
    group.bench_function("mapped_names_first_scrape", |b| {
        b.iter_batched(
            || {
                let fresh = Metrics::with_names(EnvoyproxyNames::Mapped(Box::new(mapping.clone())));
                fresh.attach(&config);
                fresh
            },
            |fresh| black_box(fresh.render()),
            BatchSize::LargeInput,
        )
    });
    let mapped = Metrics::with_names(EnvoyproxyNames::Mapped(Box::new(mapping)));
    mapped.attach(&config);
    group.bench_function("mapped_names", |b| b.iter(|| black_box(mapped.render())));
    group.finish();
}

criterion_group!(benches, scrape);
criterion_main!(benches);
