//! Service counters exported on the admin port's `/metrics` in Prometheus text format.
//!
//! Names follow envoyproxy/ratelimit's stats as its Prometheus exporter spells them
//! (`ratelimit_service_…`), so existing dashboards and alerts keep working.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub config_load_success: AtomicU64,
    pub config_load_error: AtomicU64,
    /// A hash of the loaded files' bytes: replicas serving the same config show the same value.
    pub config_hash: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "ratelimit_service_config_load_success",
                "Config loads that succeeded.",
                &self.config_load_success,
            ),
            (
                "ratelimit_service_config_load_error",
                "Config loads that failed; the previous config kept serving.",
                &self.config_load_error,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshlimit_config_hash Hash of the loaded config files.\n# TYPE meshlimit_config_hash gauge\nmeshlimit_config_hash {}",
            self.config_hash.load(Ordering::Relaxed)
        );
        out
    }
}
