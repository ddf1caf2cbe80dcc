//! Any bytes as the body of a ShouldRateLimit call: decoded as the gRPC adapter's codec
//! decodes it (and checked against prost's decoding), then decided by the limiter against a config of every algorithm. Decoding
//! may fail; a decoded request must be answered or refused, with one status per
//! descriptor, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use libfuzzer_sys::fuzz_target;
use meshlimit::clock::ManualClock;
use meshlimit::codec::decode_request;
use meshlimit::config::{LoadOptions, compile_str};
use meshlimit::limit::Algorithm;
use meshlimit::limiter::{DecisionError, RateLimiter, RequestBounds};
use meshlimit::matcher::RateLimitConfig;
use meshlimit::proto::RateLimitRequest;
use meshlimit::store::MemoryStore;
use prost::Message;

const CONFIG: &str = "\
domain: edge
capacity: {requests_per_unit: 1000, per: 1s}
policies:
  bursty: {algorithm: token_bucket, burst: 3, limits: [{requests_per_unit: 5, unit: second}]}
  login:
    limits: [{requests_per_unit: 2, per: 10s}]
    penalty: {after: 2, within: 1m, block_for: 3s}
  meter: {algorithm: leaky_bucket, capacity: 4, limits: [{requests_per_unit: 3, unit: second}]}
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
  - {key: plan, value: bursty, policy: bursty, descriptors: [{key: user}]}
  - {key: login, policy: login}
  - {key: meter, policy: meter}
";

struct Harness {
    runtime: tokio::runtime::Runtime,
    clock: ManualClock,
    limiter: RateLimiter<MemoryStore, ManualClock>,
}

/// One limiter for the whole run, so counters and penalties carry state from one input to
/// the next (a small store, so eviction runs too).
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let tree = compile_str("edge.yaml", CONFIG, &LoadOptions::default())
            .unwrap_or_else(|errors| panic!("the fuzz config does not load: {errors:?}"));
        let config = RateLimitConfig::new([tree], Algorithm::SlidingWindow);
        let clock = ManualClock::at(1_750_000_000_000);
        Harness {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a tokio runtime"),
            limiter: RateLimiter::new(
                Arc::new(ArcSwapOption::from_pointee(config)),
                MemoryStore::new(256),
                clock.clone(),
                RequestBounds::default(),
            ),
            clock,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte moves the clock (up to ~4 minutes), so windows roll and buckets refill.
    let Some((&pause, body)) = data.split_first() else {
        return;
    };
    // The service's own reader must agree with prost on every input: the same request
    // where prost decodes one, an error where prost refuses — but where prost refuses an
    // entry value that is not UTF-8, which is taken with its stray bytes escaped.
    let decoded = decode_request(body);
    match (&decoded, RateLimitRequest::decode(body)) {
        (Ok(ours), Err(refused)) => {
            assert!(refused.to_string().contains("UTF-8"), "{refused}");
            assert!(
                ours.descriptors
                    .iter()
                    .flat_map(|d| &d.entries)
                    .any(|e| e.value.contains("\\x")),
                "meshlimit's reader took what prost refused: {ours:?}"
            );
        }
        (ours, prost) => assert_eq!(
            ours.as_ref().ok(),
            prost.as_ref().ok(),
            "meshlimit's reader and prost disagree"
        ),
    }
    let Ok(request) = decoded else {
        return;
    };
    let harness = harness();
    harness.clock.advance(u64::from(pause) * 1_000);
    match harness
        .runtime
        .block_on(harness.limiter.should_rate_limit(&request))
    {
        Ok(response) => assert_eq!(
            response.statuses.len(),
            request.descriptors.len(),
            "one status per descriptor"
        ),
        Err(DecisionError::InvalidRequest(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("{other}"),
    }
});
