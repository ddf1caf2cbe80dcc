//! Counter stores: where the state behind each counter key lives.
//!
//! The limiter hands a store a batch of checks and gets one verdict per check back; the
//! store makes each check atomic. Matching and policy never see which store is in use.

pub mod memory;

use std::future::Future;

use crate::algorithm::Verdict;
use crate::limit::Limit;

pub use memory::MemoryStore;

/// One counter to update: the hits of one descriptor against one limit.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    /// The full counter key: domain, every matched entry, and the limit's window (see `key`).
    pub key: &'a str,
    pub limit: Limit,
    /// 0 checks without counting.
    pub hits: u64,
}

/// A store failed to decide. `transient` tells the limiter whether waiting could help, so
/// failing open or closed is a decision taken in one place, not an accident.
#[derive(Debug, thiserror::Error)]
#[error("counter store failed: {message}")]
pub struct StoreError {
    pub message: String,
    pub transient: bool,
}

/// A place counters live. Implementations must make every check atomic: concurrent batches
/// touching the same key never lose or double a hit.
pub trait CounterStore: Send + Sync + 'static {
    /// Applies every check at time `now_millis`, writing one verdict per check into `out`
    /// (cleared first), in the order of `checks`.
    fn apply(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
        out: &mut Vec<Verdict>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
