//! What the policy model and the client-facing features cost on the decision path:
//! a flat config against a deep inherited tree of the same size (inheritance is resolved at
//! load time, so they should cost the same), and a policy with headers, soft limit and
//! penalty box against a plain one. Off the decision path: what loading a config costs when
//! it arrives from an xDS server (decoded, written out, loaded) against the same config
//! read as a file.
//!
//!     cargo bench --bench policy

use std::fmt::Write as _;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use arc_swap::ArcSwapOption;
use criterion::{Criterion, criterion_group, criterion_main};
use meshlimit::clock::SystemClock;
use meshlimit::config::{LoadOptions, compile_str};
use meshlimit::limiter::{RateLimiter, RequestBounds};
use meshlimit::matcher::RateLimitConfig;
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use meshlimit::response::ResponseSettings;
use meshlimit::rule::HeaderSet;
use meshlimit::store::MemoryStore;

type Limiter = RateLimiter<MemoryStore, SystemClock>;

/// The memory store never waits, so one poll with a no-op waker drives a decision.
fn decide(limiter: &Limiter, request: &RateLimitRequest) {
    let mut future = pin!(limiter.should_rate_limit(request));
    if let Poll::Ready(result) = future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        black_box(result.ok());
    }
}

fn limiter(yaml: &str, presentation: ResponseSettings) -> Limiter {
    let tree = compile_str("bench.yaml", yaml, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e:?}"));
    let config = RateLimitConfig::new([tree], Default::default());
    RateLimiter::new(
        Arc::new(ArcSwapOption::from_pointee(config)),
        MemoryStore::new(1_000_000),
        SystemClock,
        RequestBounds::default(),
    )
    .with_presentation(presentation)
}

/// 1 000 rules side by side, each with its own `rate_limit`.
fn flat_yaml() -> String {
    let mut yaml = String::from("domain: bench\ndescriptors:\n");
    for i in 0..1_000 {
        let _ = write!(
            yaml,
            "  - key: k\n    value: v{i}\n    rate_limit: {{unit: second, requests_per_unit: 1000000000}}\n"
        );
    }
    yaml
}

/// 1 000 leaves four levels down (10 × 10 × 10 under one root), all inheriting one policy
/// set at the top.
fn deep_yaml() -> String {
    let mut yaml = String::from(
        "domain: bench\npolicies:\n  big:\n    limits: [{requests_per_unit: 1000000000, unit: second}]\ndescriptors:\n  - key: tenant\n    policy: big\n    descriptors:\n",
    );
    for a in 0..10 {
        let _ = write!(
            yaml,
            "      - key: a\n        value: a{a}\n        descriptors:\n"
        );
        for b in 0..10 {
            let _ = write!(
                yaml,
                "          - key: b\n            value: b{b}\n            descriptors:\n"
            );
            for c in 0..10 {
                let _ = write!(
                    yaml,
                    "              - key: c\n                value: c{c}\n"
                );
            }
        }
    }
    yaml
}

fn descriptor(pairs: &[(&str, String)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: pairs
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).to_owned(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors,
        hits_addend: 0,
    }
}

fn inheritance(c: &mut Criterion) {
    let mut group = c.benchmark_group("inheritance_4_descriptors");
    let flat = limiter(&flat_yaml(), ResponseSettings::default());
    let flat_request = request(
        (0..4)
            .map(|i| descriptor(&[("k", format!("v{}", i * 250))]))
            .collect(),
    );
    group.bench_function("flat_1000_rules", |b| {
        b.iter(|| decide(&flat, &flat_request))
    });
    let deep = limiter(&deep_yaml(), ResponseSettings::default());
    let deep_request = request(
        (0..4)
            .map(|i| {
                descriptor(&[
                    ("tenant", "t".into()),
                    ("a", format!("a{i}")),
                    ("b", format!("b{i}")),
                    ("c", format!("c{i}")),
                ])
            })
            .collect(),
    );
    group.bench_function("depth_4_inherited_1000_rules", |b| {
        b.iter(|| decide(&deep, &deep_request))
    });
    group.finish();
}

const PLAIN: &str = "domain: bench\npolicies:\n  p:\n    limits: [{requests_per_unit: 1000000000, unit: second}]\ndescriptors:\n  - key: user\n    policy: p\n";
const FEATURED: &str = "domain: bench\npolicies:\n  p:\n    limits: [{requests_per_unit: 1000000000, unit: second}]\n    soft_limit: 0.0000001\n    penalty: {after: 5, within: 1m, block_for: 15m}\n    headers: [ietf, legacy, retry-after]\ndescriptors:\n  - key: user\n    policy: p\n";

fn features(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_features_1_descriptor");
    let req = request(vec![descriptor(&[("user", "alice".into())])]);
    let none = ResponseSettings {
        headers: HeaderSet::default(),
        json_body: false,
        ..ResponseSettings::default()
    };
    let plain = limiter(PLAIN, none);
    group.bench_function("not_configured", |b| b.iter(|| decide(&plain, &req)));
    let featured = limiter(
        FEATURED,
        ResponseSettings {
            dynamic_metadata: true,
            ..ResponseSettings::default()
        },
    );
    group.bench_function("headers_soft_limit_penalty_metadata", |b| {
        b.iter(|| decide(&featured, &req))
    });
    group.finish();
}

const EPOCH_DAY: &str = "domain: bench\ndescriptors:\n  - key: user\n    rate_limit: {unit: day, requests_per_unit: 1000000000, algorithm: fixed_window}\n";
const CALENDAR_DAY: &str = "domain: bench\ndescriptors:\n  - key: user\n    rate_limit: {unit: day, requests_per_unit: 1000000000, calendar: Europe/Berlin}\n";

/// A calendar day against the epoch-aligned day it replaces: what finding the window in
/// the zone's rules adds to a decision (mostly answered from the thread's last window).
fn calendar(c: &mut Criterion) {
    let mut group = c.benchmark_group("calendar_1_descriptor");
    let req = request(vec![descriptor(&[("user", "alice".into())])]);
    let epoch = limiter(EPOCH_DAY, ResponseSettings::default());
    group.bench_function("epoch_aligned_day", |b| b.iter(|| decide(&epoch, &req)));
    let berlin = limiter(CALENDAR_DAY, ResponseSettings::default());
    group.bench_function("calendar_day_in_berlin", |b| {
        b.iter(|| decide(&berlin, &req))
    });
    group.finish();
}

/// 20 domains of 100 users, each user with two routes of its own: 6 000 rules, as an
/// xDS snapshot (one resource per domain) and as the same files.
fn snapshot() -> (Vec<prost_types::Any>, Vec<(Arc<str>, String)>) {
    use meshlimit::proto::ratelimit_config::{
        RateLimitConfig as XdsConfig, RateLimitDescriptor as XdsNode, RateLimitPolicy,
    };
    use prost::Message as _;
    let limit = |unit, requests_per_unit| {
        Some(RateLimitPolicy {
            unit,
            requests_per_unit,
            ..RateLimitPolicy::default()
        })
    };
    let mut resources = Vec::new();
    let mut files = Vec::new();
    for d in 0..20 {
        let mut yaml = format!("domain: d{d}\ndescriptors:\n");
        let mut users = Vec::new();
        for u in 0..100 {
            let _ = write!(
                yaml,
                "  - key: user\n    value: u{u}\n    rate_limit: {{unit: minute, requests_per_unit: 100}}\n    descriptors:\n"
            );
            let mut routes = Vec::new();
            for r in 0..2 {
                let _ = write!(
                    yaml,
                    "      - key: path\n        value: /r{r}\n        rate_limit: {{unit: second, requests_per_unit: 5}}\n"
                );
                routes.push(XdsNode {
                    key: "path".into(),
                    value: format!("/r{r}"),
                    rate_limit: limit(1, 5),
                    ..XdsNode::default()
                });
            }
            users.push(XdsNode {
                key: "user".into(),
                value: format!("u{u}"),
                rate_limit: limit(2, 100),
                descriptors: routes,
                ..XdsNode::default()
            });
        }
        let config = XdsConfig {
            name: format!("d{d}"),
            domain: format!("d{d}"),
            descriptors: users,
        };
        resources.push(prost_types::Any {
            type_url: meshlimit::xds::resource::TYPE_URL.into(),
            value: config.encode_to_vec(),
        });
        files.push((Arc::<str>::from(format!("d{d}.yaml")), yaml));
    }
    (resources, files)
}

fn config_load(c: &mut Criterion) {
    let mut group = c.benchmark_group("config_load_6000_rules");
    group.sample_size(10);
    let (resources, files) = snapshot();
    let options = LoadOptions::default();
    group.bench_function("files", |b| {
        b.iter(|| {
            let texts = files
                .iter()
                .map(|(name, yaml)| (name.clone(), Ok(yaml.clone())));
            black_box(meshlimit::config::load_texts(texts, &options).expect("valid"))
        })
    });
    group.bench_function("xds_snapshot", |b| {
        b.iter(|| {
            black_box(meshlimit::xds::resource::load_snapshot(&resources, &options).expect("valid"))
        })
    });
    group.finish();
}

criterion_group!(benches, inheritance, features, calendar, config_load);
criterion_main!(benches);
