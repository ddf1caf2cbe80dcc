//! Counter stores: where the state behind each counter key lives.
//!
//! The limiter hands a store a batch of checks and gets one verdict per check back; the
//! store makes each check atomic. Matching and policy never see which store is in use.

pub mod memory;
pub mod redis;
pub mod split;

use std::future::Future;

use crate::algorithm::Verdict;
use crate::algorithm::penalty::Penalty;
use crate::key::KeyForm;
use crate::limit::Limit;

pub use self::redis::RedisStore;
pub use memory::{MemoryStore, Restored, SnapshotError};

/// One counter to update: the hits of one descriptor against one of its limits.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    /// The full counter key: domain, every matched entry, and the limit's window, in the
    /// store's `KEY_FORM` (see `key`).
    pub key: &'a str,
    pub limit: Limit,
    /// 0 checks without counting.
    pub hits: u64,
    /// Consecutive checks with the same group are one descriptor's limits: applied all or
    /// nothing, so a request rejected by one of them consumes from none.
    pub group: u32,
    /// Keep the hit even when rejected: envoyproxy/ratelimit's fixed window counts every hit,
    /// and a migrated `rate_limit` rule must reject exactly what it rejected before.
    pub count_rejected: bool,
    /// The descriptor's penalty box, the same on every check of the group. Its state lives
    /// under the group's first key with `|penalty` appended.
    pub penalty: Option<Penalty>,
}

/// Splits checks into runs of the same group.
pub fn groups<'c, 'k>(checks: &'c [Check<'k>]) -> impl Iterator<Item = &'c [Check<'k>]> {
    checks.chunk_by(|a, b| a.group == b.group)
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
    /// Whether `apply` can wait on I/O. Only then is a call worth timing: an in-memory
    /// call is part of the decision's own latency, and two clock reads would cost more
    /// than the call itself.
    const WAITS: bool = true;

    /// The store's name in traces: a span of each call is named after it.
    const NAME: &'static str;

    /// How the limiter writes this store's keys: text where people read them, packed where
    /// they are only hashed.
    const KEY_FORM: KeyForm = KeyForm::Text;

    /// Applies every check at time `now_millis`, writing one verdict per check into `out`
    /// (cleared first), in the order of `checks`. Each group is atomic: either every check
    /// of it is counted or (but for `count_rejected`) none.
    fn apply(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
        out: &mut Vec<Verdict>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Drops the state of every check's counter and of each group's penalty box, so the
    /// next hit on them starts afresh: an operator's reset of one client's limits. Only
    /// the keys matter (hits are ignored); `now_millis` names the current window where a
    /// store keys counters by window.
    fn forget(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
