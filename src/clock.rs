//! Time as the rate limiter sees it: milliseconds since the Unix epoch, from an injectable clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the limiter reads "now" from. Windows are aligned to the Unix epoch (like
/// envoyproxy/ratelimit), so the clock speaks epoch milliseconds rather than `Instant`.
pub trait Clock: Send + Sync + 'static {
    fn now_millis(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        // A clock before 1970 is a broken host; counting from 0 keeps serving instead of panicking.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to: deterministic time for tests and `simulate`.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn at(millis: u64) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(millis)),
        }
    }

    pub fn set(&self, millis: u64) {
        self.now.store(millis, Ordering::SeqCst);
    }

    pub fn advance(&self, millis: u64) {
        self.now.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}
