//! Any bytes as a PROMETHEUS_MAPPER_YAML file, then as a stat name mapped by it: loading
//! must give a mapping or an error that says where, and a loaded mapping must name every
//! stat it keeps with a name Prometheus accepts, never panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlimit::prometheus_mapping::{PrometheusMapping, StatKind};

fuzz_target!(|data: &[u8]| {
    // The file and a stat name, split at the first NUL.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, stat) = text.split_once('\0').unwrap_or((text, "ratelimit.service.a.b.c"));
    let mapping = match PrometheusMapping::parse("fuzz.yaml", file) {
        Ok(mapping) => mapping,
        Err(error) => {
            assert!(!error.message.is_empty(), "an empty message at {error}");
            return;
        }
    };
    // meshlimit's stat names are never empty.
    if stat.is_empty() {
        return;
    }
    for kind in [StatKind::Counter, StatKind::Gauge, StatKind::Observer] {
        if let Some(series) = mapping.map(stat, kind) {
            let name = &series.name;
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            assert!(valid, "{stat:?} named {name:?}");
        }
    }
});
