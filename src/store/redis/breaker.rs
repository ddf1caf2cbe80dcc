//! A circuit breaker per Redis node: after a few consecutive failures, stop waiting on the
//! node and let the failure policy answer; every `PROBE_INTERVAL` one request goes through
//! as a probe, and the first success closes the breaker again.
//!
//! envoyproxy/ratelimit waits on a dead Redis for every request (its issue #462); with the
//! breaker open, a request costs no Redis wait at all, and recovery is noticed within one
//! probe interval.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Consecutive failures that open the breaker. More than one, so a single lost packet or a
/// slow reply does not send a whole replica to its fallback.
pub const FAILURES_TO_OPEN: u32 = 3;
/// How often an open breaker lets one request try the node: recovery is seen within this.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// What a request may do with the node now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The breaker is closed: use the node.
    Use,
    /// The breaker is open and this request is the probe: use the node and report back.
    Probe,
    /// The breaker is open: do not wait on the node.
    Skip,
}

pub struct Breaker {
    /// Names the node in log lines.
    name: String,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    open: AtomicBool,
    /// When the next probe may go, in milliseconds since `epoch`.
    next_probe_millis: AtomicU64,
}

impl Breaker {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            next_probe_millis: AtomicU64::new(0),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn now_millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn permit(&self) -> Permit {
        if !self.is_open() {
            return Permit::Use;
        }
        let now = self.now_millis();
        let next = self.next_probe_millis.load(Ordering::Acquire);
        // One probe per interval: only the request that moves the time on goes.
        if now >= next
            && self
                .next_probe_millis
                .compare_exchange(
                    next,
                    now + PROBE_INTERVAL.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            Permit::Probe
        } else {
            Permit::Skip
        }
    }

    pub fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!(node = %self.name, "redis is reachable again; counting through redis");
        }
    }

    /// Records a failed call; `why` goes into the log line when this one opens the breaker.
    pub fn failure(&self, why: &str) {
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= FAILURES_TO_OPEN && !self.is_open() {
            self.next_probe_millis.store(
                self.now_millis() + PROBE_INTERVAL.as_millis() as u64,
                Ordering::Release,
            );
            if !self.open.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    node = %self.name,
                    failures,
                    error = why,
                    "redis is unreachable; answering with the failure policy until it is back"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_once_per_interval() {
        let breaker = Breaker::new("test");
        for _ in 0..FAILURES_TO_OPEN - 1 {
            breaker.failure("refused");
            assert_eq!(breaker.permit(), Permit::Use);
        }
        breaker.failure("refused");
        assert!(breaker.is_open());
        assert_eq!(
            breaker.permit(),
            Permit::Skip,
            "no probe before the interval"
        );
        std::thread::sleep(PROBE_INTERVAL + Duration::from_millis(20));
        assert_eq!(breaker.permit(), Permit::Probe);
        assert_eq!(
            breaker.permit(),
            Permit::Skip,
            "a single probe per interval"
        );
        breaker.success();
        assert!(!breaker.is_open());
        assert_eq!(breaker.permit(), Permit::Use);
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = Breaker::new("test");
        for _ in 0..10 {
            breaker.failure("timeout");
            breaker.success();
        }
        assert!(!breaker.is_open());
    }
}
