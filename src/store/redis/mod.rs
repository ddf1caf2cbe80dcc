//! The Redis counter store: counters shared by every replica, in Redis / Valkey standalone,
//! behind Redis Sentinel or in a Redis Cluster, making exactly the decisions of the
//! in-memory store.
//!
//! - `counter.lua` / `script`: every algorithm, the all-or-nothing groups and the penalty
//!   box run atomically in one script, with the `now` the limiter passes in;
//! - `keys`: the key layout and its cluster hash tag;
//! - `node`: one server's connection; `breaker`: its circuit breaker;
//! - `cluster`: the slot map that splits a request's groups by node;
//! - `sentinel`: which server is the master, asked of the sentinels again after a failover;
//! - `over_cache`: descriptors known to be over their limit, answered without Redis;
//! - `hybrid`: `hybrid: true` fixed windows, counted here and sent to Redis in batches;
//! - `settings`: flags and envoyproxy/ratelimit's environment variables.
//!
//! One round trip per node per request: standalone (or to Sentinel's master), all groups of
//! an `apply` call go into one EVALSHA; on a cluster, groups are split by slot, each node gets one pipeline of one
//! EVALSHA per slot, and the nodes are called concurrently. Every call has a deadline; a
//! node that fails or misses it is answered for by the failure policy (`FailureMode`).
//! Descriptors the local over-limit cache can answer take no round trip at all.

mod breaker;
mod cluster;
mod coalesce;
mod hybrid;
mod keys;
mod node;
mod over_cache;
mod resets;
mod script;
mod sentinel;
pub mod settings;

/// How often an unreachable Redis is tried again; `--health-requires-redis` pings at it.
pub use breaker::PROBE_INTERVAL;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::{
    Client, ClientTlsConfig, ConnectionInfo, IntoConnectionInfo, Pipeline, Script, TlsCertificates,
    Value,
};

use self::breaker::Permit;
use self::cluster::SlotMap;
use self::hybrid::{Hybrid, Increment};
pub use self::keys::{push_penalty_key, push_redis_key, slot};
use self::node::{Node, NodeError};
use self::over_cache::OverCache;
use self::resets::Forgotten;
use self::sentinel::Sentinel;
pub use self::settings::{FailureMode, RedisOptions, RedisTarget, RedisTls};
use super::{Check, CounterStore, MemoryStore, StoreError, groups};
use crate::algorithm::Verdict;

/// Whether every Redis node answers, as the admin port reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreHealth {
    Healthy,
    /// At least one node's breaker is open: its keys are decided by the failure policy.
    Degraded,
}

/// A problem with the Redis settings, found at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedisSetupError(pub String);

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Topology,
    script: Script,
    prefix: String,
    timeout: Duration,
    failure_mode: FailureMode,
    replicas: u32,
    /// The `local` failure policy's counters.
    local: MemoryStore,
    /// Decisions taken by the failure policy instead of Redis.
    fallbacks: AtomicU64,
    /// `None` with `--redis-local-cache-entries 0`.
    over_cache: Option<OverCache>,
    /// Told how many descriptors each cached answer covered (the server's metric).
    cache_hit_sink: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// Told of each call to Redis that got no answer (the server's store error count).
    failed_call_sink: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// `hybrid: true` counters; on a cluster each master is sent its own keys' hits.
    hybrid: Hybrid,
}

enum Topology {
    Standalone(Arc<Node>),
    Cluster(Cluster),
    // Boxed: the sentinel list and master settings dwarf the other variants.
    Sentinel(Box<Sentinel>),
}

struct Cluster {
    seeds: Vec<ConnectionInfo>,
    map: ArcSwap<SlotMap>,
    /// Set by a failed or redirected call; the refresher re-reads the slot map soon.
    stale: AtomicBool,
    refreshing: tokio::sync::Mutex<()>,
}

/// The groups of one request that go to one node, as one EVALSHA per entry of `calls`.
struct Batch {
    node: Option<Arc<Node>>,
    calls: Vec<Vec<Range<usize>>>,
}

/// One hash slot and the groups (ranges of checks) that hash to it.
type SlotGroups = (u16, Vec<Range<usize>>);

/// How long a replica goes on answering from what Redis told it without asking again, where
/// it could otherwise hold an answer until a window or a block ends (an over-limit answer
/// in `over_cache`, a full window in `hybrid`): a reset it did not hear of (pub/sub is at
/// most once) or a Redis that lost its keys (flushed, restarted without persistence) is seen
/// within this long, in the limiter's milliseconds. It costs one round trip a second per
/// such descriptor per replica.
const REASK_MILLIS: u64 = 1_000;

/// How often a cluster's slot map is re-read even when nothing failed.
const CLUSTER_REFRESH: Duration = Duration::from_secs(5);
/// How often a stale slot map is looked at.
const CLUSTER_STALE_CHECK: Duration = Duration::from_millis(200);

impl RedisStore {
    /// Builds the store from its settings. An unreachable Redis is not an error: the store
    /// starts degraded and uses Redis as soon as it answers. Must run inside a tokio runtime
    /// (a cluster's slot map is refreshed by a background task).
    pub async fn connect(options: RedisOptions) -> Result<RedisStore, RedisSetupError> {
        keys::check_prefix(&options.prefix).map_err(RedisSetupError)?;
        let tls = tls_certificates(&options.tls)?;
        let connection_info = |url: &str| connection_info(url, tls.as_ref());
        let topology = match &options.target {
            RedisTarget::Standalone(url) => {
                let info = connection_info(url)?;
                let name = describe(&info);
                let node = Node::new(name, info)
                    .map_err(|error| RedisSetupError(format!("redis url `{url}`: {error}")))?;
                Topology::Standalone(Arc::new(node))
            }
            RedisTarget::Cluster(seeds) => {
                if seeds.is_empty() {
                    return Err(RedisSetupError(
                        "no Redis Cluster seed nodes; list at least one with --redis-cluster-nodes host:port".into(),
                    ));
                }
                Topology::Cluster(Cluster {
                    seeds: seeds
                        .iter()
                        .map(|url| connection_info(url))
                        .collect::<Result<_, _>>()?,
                    map: ArcSwap::from_pointee(SlotMap::empty()),
                    stale: AtomicBool::new(true),
                    refreshing: tokio::sync::Mutex::new(()),
                })
            }
            RedisTarget::Sentinel(target) => {
                let sentinels = target
                    .sentinels
                    .iter()
                    .map(|url| connection_info(url).map(|info| (describe(&info), info)))
                    .collect::<Result<_, _>>()?;
                // The master's settings come from a URL with a stand-in address, which each
                // master the sentinels name replaces.
                let master = connection_info(&target.master.at("127.0.0.1", 6379))?;
                let sentinel = Sentinel::new(target.master_name.clone(), sentinels, master)
                    .map_err(|error| RedisSetupError(format!("redis sentinel: {error}")))?;
                Topology::Sentinel(Box::new(sentinel))
            }
        };
        let store = RedisStore {
            inner: Arc::new(Inner {
                topology,
                script: script::counter_script(),
                prefix: options.prefix,
                timeout: options.timeout,
                failure_mode: options.failure_mode,
                replicas: options.replicas.max(1),
                local: MemoryStore::new(options.local_capacity),
                fallbacks: AtomicU64::new(0),
                over_cache: OverCache::new(options.local_cache_entries),
                cache_hit_sink: OnceLock::new(),
                failed_call_sink: OnceLock::new(),
                hybrid: Hybrid::default(),
            }),
        };
        tokio::spawn(hybrid_loop(
            Arc::downgrade(&store.inner),
            options.hybrid_flush,
        ));
        tokio::spawn(reset_loop(Arc::downgrade(&store.inner)));
        match &store.inner.topology {
            Topology::Standalone(node) => {
                // Connect and load the script now, so the first request does not pay for it;
                // failing here only means starting degraded.
                let mut ping = redis::pipe();
                ping.cmd("SCRIPT").arg("LOAD").arg(script::SOURCE);
                let warm = tokio::time::timeout(store.inner.timeout * 20, async {
                    node.run(&ping, &store.inner.script).await?;
                    Ok::<_, NodeError>(())
                })
                .await;
                match warm {
                    Ok(Ok(())) => {}
                    Ok(Err(NodeError::Untrusted(message))) => {
                        return Err(untrusted(&node.name, &message));
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(node = %node.name, %error, "redis does not answer yet; starting with the failure policy");
                    }
                    Err(_) => {
                        tracing::warn!(node = %node.name, "redis does not answer yet; starting with the failure policy");
                    }
                }
            }
            Topology::Cluster(cluster) => {
                match store.inner.refresh(cluster).await {
                    Ok(()) => {}
                    Err(NodeError::Untrusted(message)) => {
                        return Err(untrusted("the Redis Cluster", &message));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the Redis Cluster slot map yet; retrying in the background");
                    }
                }
                tokio::spawn(refresh_loop(Arc::downgrade(&store.inner)));
            }
            Topology::Sentinel(sentinel) => {
                match sentinel
                    .resolve(store.inner.timeout * 20, &store.inner.script)
                    .await
                {
                    Ok(()) => {}
                    Err(NodeError::Untrusted(message)) => {
                        return Err(untrusted("the Redis Sentinel master", &message));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "no master from redis sentinel yet; starting with the failure policy and asking again in the background");
                    }
                }
                tokio::spawn(sentinel_loop(Arc::downgrade(&store.inner)));
            }
        }
        Ok(store)
    }

    /// Degraded while any node's breaker is open (or, on a cluster, no slot map is known).
    pub fn health(&self) -> StoreHealth {
        let degraded = match &self.inner.topology {
            Topology::Standalone(node) => node.breaker.is_open(),
            Topology::Cluster(cluster) => {
                let map = cluster.map.load();
                map.nodes.is_empty() || map.nodes.iter().any(|node| node.breaker.is_open())
            }
            Topology::Sentinel(sentinel) => sentinel
                .master()
                .is_none_or(|master| master.breaker.is_open()),
        };
        if degraded {
            StoreHealth::Degraded
        } else {
            StoreHealth::Healthy
        }
    }

    /// Pings every node once (the Sentinel's master, a cluster's masters), each answer or
    /// silence counted by its breaker as a call's, so `health` follows Redis without
    /// traffic. A PING may wait up to 20 × `--redis-timeout`, as connecting does: a probe is
    /// not a request, and a slow start is not an outage.
    pub async fn probe(&self) {
        let timeout = self.inner.timeout * 20;
        let nodes: Vec<Arc<Node>> = match &self.inner.topology {
            Topology::Standalone(node) => vec![node.clone()],
            Topology::Cluster(cluster) => cluster.map.load().nodes.clone(),
            Topology::Sentinel(sentinel) => sentinel.master().into_iter().collect(),
        };
        futures_util::future::join_all(nodes.iter().map(|node| node.ping(timeout))).await;
    }

    /// Decisions taken by the failure policy because Redis did not answer in time.
    pub fn fallback_decisions(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    /// Counters held in this replica's memory by `--redis-failure-mode local`, for the
    /// decisions it took while Redis was away (0 under the other failure modes).
    pub fn fallback_counters(&self) -> u64 {
        self.inner.local.len()
    }

    /// Descriptors answered over the limit by the local over-limit cache, without Redis.
    pub fn local_cache_hits(&self) -> u64 {
        self.inner.over_cache.as_ref().map_or(0, OverCache::hits)
    }

    /// Calls `sink` with the number of descriptors of every answer the local over-limit
    /// cache gives (the server adds them to its metrics, which the store does not know).
    /// Only the first sink is kept.
    pub fn on_local_cache_hits(&self, sink: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.inner.cache_hit_sink.set(Box::new(sink));
    }

    /// Calls `sink` with 1 for every call to Redis that got no answer in time (refused,
    /// timed out, or not made while the breaker is open), whose checks the failure policy
    /// decided: the store answers them, so no error reaches the caller to count. Only the
    /// first sink is kept.
    pub fn on_failed_calls(&self, sink: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.inner.failed_call_sink.set(Box::new(sink));
    }
}

impl CounterStore for RedisStore {
    const NAME: &'static str = "redis";
    fn apply(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
        out: &mut Vec<Verdict>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.apply(checks, now_millis, out)
    }

    fn forget(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.forget(checks, now_millis)
    }
}

impl Inner {
    async fn apply(
        &self,
        checks: &[Check<'_>],
        now_millis: u64,
        out: &mut Vec<Verdict>,
    ) -> Result<(), StoreError> {
        out.clear();
        out.resize(
            checks.len(),
            Verdict {
                over_limit: false,
                remaining: 0,
                reset_after_millis: 0,
                from_local_cache: false,
            },
        );
        // Descriptors the over-limit cache answers need no round trip, nor do hybrid ones;
        // the others go to Redis.
        let mut ranges = Vec::new();
        let mut start = 0;
        let mut cached = 0;
        // Hybrid groups whose windows must be read before they are decided.
        let (mut stale_reads, mut undecided) = (Vec::new(), Vec::new());
        for group in groups(checks) {
            let range = start..start + group.len();
            start = range.end;
            if self.is_hybrid(group) {
                let reads = self.decide_hybrid(checks, range.clone(), now_millis, out);
                if !reads.is_empty() {
                    stale_reads.extend(reads);
                    undecided.push(range);
                }
                continue;
            }
            if let (Some(cache), Some(slots)) = (&self.over_cache, out.get_mut(range.clone()))
                && cache.answer(group, now_millis, slots)
            {
                cached += 1;
                continue;
            }
            ranges.push(range);
        }
        if cached > 0
            && let Some(sink) = self.cache_hit_sink.get()
        {
            sink(cached);
        }
        if !undecided.is_empty() {
            self.send_hybrid(stale_reads).await;
            for range in undecided {
                // Read now (or marked read, if Redis did not answer): decided this time.
                let _ = self.decide_hybrid(checks, range, now_millis, out);
            }
        }
        if ranges.is_empty() {
            return Ok(());
        }
        let mut blocked = vec![false; checks.len()];
        let batches = self.plan(checks, ranges);
        // One batch (a standalone server, Sentinel's master, or keys on one cluster node)
        // is awaited directly: join_all's bookkeeping is a cost for nothing there.
        let replies = if let [batch] = batches.as_slice() {
            vec![self.call(batch, checks, now_millis).await]
        } else {
            let calls = batches
                .iter()
                .map(|batch| self.call(batch, checks, now_millis));
            futures_util::future::join_all(calls).await
        };
        for (batch, reply) in batches.iter().zip(replies) {
            let decoded = reply.and_then(|values| {
                if values.len() != batch.calls.len() {
                    let error = format!(
                        "{} replies to {} script calls",
                        values.len(),
                        batch.calls.len()
                    );
                    if let Some(node) = &batch.node {
                        node.breaker.failure(&error);
                    }
                    return Err(error);
                }
                for (value, groups) in values.iter().zip(&batch.calls) {
                    if let Err(error) = script::decode(value, groups, out, &mut blocked) {
                        if let Some(node) = &batch.node {
                            node.breaker.failure(&error);
                        }
                        return Err(error);
                    }
                }
                Ok(())
            });
            if decoded.is_ok()
                && let Some(cache) = &self.over_cache
            {
                for range in batch.calls.iter().flatten() {
                    if let (Some(group), Some(verdicts), Some(blocked)) = (
                        checks.get(range.clone()),
                        out.get(range.clone()),
                        blocked.get(range.clone()),
                    ) {
                        cache.remember(group, verdicts, blocked, now_millis);
                    }
                }
            }
            if let Err(error) = decoded {
                tracing::debug!(%error, "no answer from redis; answering with the failure policy");
                self.call_failed();
                for groups in &batch.calls {
                    let unanswered = self.held_in_cache(checks, groups, now_millis, out);
                    if !unanswered.is_empty() {
                        self.fallback(checks, &unanswered, now_millis, out);
                    }
                }
            }
        }
        Ok(())
    }

    /// Answers from the over-limit cache the groups it still holds (requests let through
    /// to Redis to ask again, which got no answer: what was cached is still what Redis
    /// would say, barring a reset) and returns the others, for the failure policy.
    fn held_in_cache(
        &self,
        checks: &[Check<'_>],
        groups: &[Range<usize>],
        now_millis: u64,
        out: &mut [Verdict],
    ) -> Vec<Range<usize>> {
        let Some(cache) = &self.over_cache else {
            return groups.to_vec();
        };
        let mut held = 0;
        let unanswered = groups
            .iter()
            .filter(|range| {
                let answered = match (checks.get((*range).clone()), out.get_mut((*range).clone())) {
                    (Some(group), Some(slots)) => cache.held(group, now_millis, slots),
                    _ => false,
                };
                held += u64::from(answered);
                !answered
            })
            .cloned()
            .collect();
        if held > 0
            && let Some(sink) = self.cache_hit_sink.get()
        {
            sink(held);
        }
        unanswered
    }

    /// Whether `group` is counted in hybrid mode: its limits say so, and no penalty box
    /// needs exact counts.
    fn is_hybrid(&self, group: &[Check<'_>]) -> bool {
        group
            .first()
            .is_some_and(|c| c.limit.hybrid && c.penalty.is_none())
    }

    /// The node hybrid counters are sent to: the standalone server, Sentinel's master, or
    /// the cluster master serving the slot `slot` works out (only asked on a cluster).
    fn hybrid_node(&self, slot: impl FnOnce() -> u16) -> Option<Arc<Node>> {
        match &self.topology {
            Topology::Standalone(node) => Some(node.clone()),
            Topology::Sentinel(sentinel) => sentinel.master(),
            Topology::Cluster(cluster) => {
                let map = cluster.map.load();
                map.node_of(slot()).map(|(_, node)| node.clone())
            }
        }
    }

    /// Decides one hybrid group locally; while its node is away (breaker open, or no master
    /// known) the failure policy answers, as for any other key. A group with a window not
    /// read lately is not decided: the reads to make first are returned.
    fn decide_hybrid(
        &self,
        checks: &[Check<'_>],
        range: Range<usize>,
        now_millis: u64,
        out: &mut [Verdict],
    ) -> Vec<Increment> {
        // A group's hybrid keys share its counter keys' hash tag, so its first key's slot.
        let node = checks.get(range.start).and_then(|first| {
            self.hybrid_node(|| {
                let mut key = String::with_capacity(self.prefix.len() + first.key.len() + 8);
                push_redis_key(&mut key, &self.prefix, first.key);
                keys::slot(&key)
            })
        });
        let reachable = node.as_ref().is_some_and(|node| !node.breaker.is_open());
        if !reachable {
            if node.is_none() {
                self.mark_stale();
            }
            self.master_failed();
            self.call_failed();
            self.fallback(checks, std::slice::from_ref(&range), now_millis, out);
            return Vec::new();
        }
        match (checks.get(range.clone()), out.get_mut(range)) {
            (Some(group), Some(slots)) => {
                (self.hybrid).decide_unless_stale(&self.prefix, group, now_millis, slots)
            }
            _ => Vec::new(),
        }
    }

    /// Sends every hybrid counter's unsent hits and reads the totals back: one pipeline per
    /// node (on a cluster, each master gets the keys of its slots), the nodes at once.
    async fn flush_hybrid(&self) {
        self.send_hybrid(self.hybrid.take_increments()).await;
    }

    /// Sends `increments` and reads the totals back: one pipeline per node (on a cluster,
    /// each master gets the keys of its slots), the nodes at once.
    async fn send_hybrid(&self, increments: Vec<Increment>) {
        if increments.is_empty() {
            return;
        }
        let mut by_node: Vec<(Arc<Node>, Vec<Increment>)> = Vec::new();
        let mut nowhere = Vec::new();
        for increment in increments {
            match self.hybrid_node(|| keys::slot(&increment.key)) {
                Some(node) => match by_node.iter_mut().find(|(n, _)| Arc::ptr_eq(n, &node)) {
                    Some((_, increments)) => increments.push(increment),
                    None => by_node.push((node, vec![increment])),
                },
                None => nowhere.push(increment),
            }
        }
        if !nowhere.is_empty() {
            // No master known for them yet: kept for the next flush.
            self.mark_stale();
            self.hybrid.unsent(nowhere);
        }
        let flushes = by_node
            .into_iter()
            .map(|(node, increments)| self.flush_hybrid_to(node, increments));
        futures_util::future::join_all(flushes).await;
    }

    /// Sends one node its hybrid increments. Hits of a failed flush are sent again with the
    /// next (a flush that timed out after Redis applied it counts them twice: the error is
    /// on the side of limiting).
    async fn flush_hybrid_to(&self, node: Arc<Node>, increments: Vec<Increment>) {
        if node.breaker.permit() == Permit::Skip {
            self.hybrid.unsent(increments);
            return;
        }
        let pipeline = hybrid::pipeline(&increments);
        match tokio::time::timeout(self.timeout, node.run(&pipeline, &self.script)).await {
            Ok(Ok(totals)) => {
                node.breaker.success();
                self.hybrid.flushed(&increments, &totals);
            }
            Ok(Err(NodeError::Connecting)) => self.hybrid.unsent(increments),
            Ok(Err(error)) => {
                if matches!(error, NodeError::Failed { redirect: true, .. }) {
                    self.mark_stale();
                }
                self.master_failed();
                node.breaker
                    .failure(&format!("{}: hybrid flush: {error}", node.name));
                self.hybrid.unsent(increments);
            }
            Err(_) => {
                self.master_failed();
                node.breaker.failure(&format!(
                    "{}: hybrid flush did not answer within {:?}",
                    node.name, self.timeout
                ));
                self.hybrid.unsent(increments);
            }
        }
    }

    /// Splits `ranges` (groups of `checks`) by node, and on a cluster by slot within a node.
    fn plan(&self, checks: &[Check<'_>], ranges: Vec<Range<usize>>) -> Vec<Batch> {
        match &self.topology {
            Topology::Standalone(node) => vec![Batch {
                node: Some(node.clone()),
                calls: vec![ranges],
            }],
            Topology::Sentinel(sentinel) => vec![Batch {
                node: sentinel.master(),
                calls: vec![ranges],
            }],
            Topology::Cluster(cluster) => {
                let map = cluster.map.load();
                // (node index, or none while the slot has no known master) → its slots' groups
                let mut by_node: Vec<(Option<usize>, Vec<SlotGroups>)> = Vec::new();
                let mut key = String::new();
                for range in ranges {
                    let Some(first) = checks.get(range.start) else {
                        continue;
                    };
                    key.clear();
                    push_redis_key(&mut key, &self.prefix, first.key);
                    let slot = keys::slot(&key);
                    let node = map.node_of(slot).map(|(index, _)| index);
                    let entry = match by_node.iter_mut().position(|(n, _)| *n == node) {
                        Some(i) => by_node.get_mut(i),
                        None => {
                            by_node.push((node, Vec::new()));
                            by_node.last_mut()
                        }
                    };
                    if let Some((_, slots)) = entry {
                        match slots.iter_mut().find(|(s, _)| *s == slot) {
                            Some((_, groups)) => groups.push(range),
                            None => slots.push((slot, vec![range])),
                        }
                    }
                }
                by_node
                    .into_iter()
                    .map(|(node, slots)| Batch {
                        node: node.and_then(|i| map.nodes.get(i).cloned()),
                        calls: slots.into_iter().map(|(_, groups)| groups).collect(),
                    })
                    .collect()
            }
        }
    }

    /// One round trip to the batch's node, within the deadline, unless its breaker is open.
    async fn call(
        &self,
        batch: &Batch,
        checks: &[Check<'_>],
        now_millis: u64,
    ) -> Result<Vec<Value>, String> {
        let node = self.callable(batch)?;
        let reply = async {
            if let (false, [groups]) = (
                matches!(self.topology, Topology::Cluster(_)),
                batch.calls.as_slice(),
            ) {
                // One server for every key: the request shares a call with any others
                // waiting for it.
                let request = script::encode(&self.prefix, checks, groups, now_millis);
                return node
                    .call(request, &self.script, self.timeout)
                    .await
                    .map(|value| vec![value]);
            }
            // A cluster node: one call per slot, in one pipeline.
            let mut pipeline = Pipeline::with_capacity(batch.calls.len());
            // The replies are inspected one by one: a server error in one is not an error
            // of the whole round trip (NOSCRIPT is answered by loading the script).
            pipeline.ignore_errors();
            for groups in &batch.calls {
                let request = script::encode(&self.prefix, checks, groups, now_millis);
                pipeline.add_command(script::evalsha(&self.script, std::iter::once(&request)));
            }
            let mut values = node.run_values(&pipeline, &self.script).await?;
            self.follow_redirects(&batch.calls, checks, now_millis, &mut values)
                .await;
            node::no_server_error(values)
        };
        self.settle(node, tokio::time::timeout(self.timeout, reply).await)
    }

    /// Sends the calls a cluster node answered MOVED (their slot was resharded to another
    /// master) or ASK (it is being moved) to the master it names, at once, when the slot
    /// map knows that master: otherwise the failure policy would answer them until the map
    /// is re-read, admitting uncounted or turning away wrongly. The map is re-read soon
    /// either way. Answers replace the redirects in `values`; a call redirected again, or
    /// to a master not yet in the map, keeps its redirect (and gets the failure policy).
    async fn follow_redirects(
        &self,
        calls: &[Vec<Range<usize>>],
        checks: &[Check<'_>],
        now_millis: u64,
        values: &mut [Value],
    ) {
        let Topology::Cluster(cluster) = &self.topology else {
            return;
        };
        // (master, whether ASK, the calls' indices)
        let mut redirected: Vec<(Arc<Node>, bool, Vec<usize>)> = Vec::new();
        for (i, value) in values.iter().enumerate() {
            let Some((ask, to)) = node::redirect_of(value) else {
                continue;
            };
            self.mark_stale();
            let map = cluster.map.load();
            let Some(target) = map.nodes.iter().find(|n| n.name == to) else {
                continue;
            };
            match redirected
                .iter_mut()
                .find(|(n, a, _)| Arc::ptr_eq(n, target) && *a == ask)
            {
                Some((_, _, indices)) => indices.push(i),
                None => redirected.push((target.clone(), ask, vec![i])),
            }
        }
        for (target, ask, indices) in redirected {
            if target.breaker.permit() == Permit::Skip {
                continue;
            }
            let mut pipeline = Pipeline::with_capacity(indices.len() * 2);
            pipeline.ignore_errors();
            for groups in indices.iter().filter_map(|&i| calls.get(i)) {
                // ASK holds for the next command only: the importing master serves the
                // slot's keys it already has to a client that says it was sent.
                if ask {
                    pipeline.cmd("ASKING");
                }
                let request = script::encode(&self.prefix, checks, groups, now_millis);
                pipeline.add_command(script::evalsha(&self.script, std::iter::once(&request)));
            }
            let answers = match target.run_values(&pipeline, &self.script).await {
                Ok(answers) => answers,
                Err(error) => {
                    target.breaker.failure(&format!("{}: {error}", target.name));
                    continue;
                }
            };
            let step = if ask { 2 } else { 1 };
            for (i, answer) in indices
                .into_iter()
                .zip(answers.into_iter().skip(step - 1).step_by(step))
            {
                if let Some(slot) = values.get_mut(i) {
                    *slot = answer;
                }
            }
        }
    }

    /// The batch's node, unless none is known for it or its breaker is open.
    fn callable<'b>(&self, batch: &'b Batch) -> Result<&'b Arc<Node>, String> {
        let Some(node) = &batch.node else {
            self.mark_stale();
            return Err(match self.topology {
                Topology::Sentinel(_) => "redis sentinel has not named a master that answers yet",
                _ => "no Redis Cluster node serves this slot yet",
            }
            .into());
        };
        if node.breaker.permit() == Permit::Skip {
            self.master_failed();
            return Err(format!("{}: circuit breaker open", node.name));
        }
        Ok(node)
    }

    /// What a round trip to `node` came to, told to its breaker and, on a redirect or a
    /// failed master, to the node map.
    fn settle(
        &self,
        node: &Node,
        outcome: Result<Result<Vec<Value>, NodeError>, tokio::time::error::Elapsed>,
    ) -> Result<Vec<Value>, String> {
        match outcome {
            Ok(Ok(values)) => {
                node.breaker.success();
                Ok(values)
            }
            Ok(Err(NodeError::Connecting)) => Err(format!("{} is being connected", node.name)),
            Ok(Err(NodeError::Failed { message, redirect })) => {
                if redirect {
                    self.mark_stale();
                }
                self.master_failed();
                let message = format!("{}: {message}", node.name);
                // A cluster node that redirects is up: resharding must not open its breaker
                // and send its other slots to the failure policy.
                if !(redirect && matches!(self.topology, Topology::Cluster(_))) {
                    node.breaker.failure(&message);
                }
                Err(message)
            }
            Ok(Err(NodeError::Untrusted(message))) => {
                let message = format!("{}: {message}", node.name);
                node.breaker.failure(&message);
                Err(message)
            }
            Err(_) => {
                self.master_failed();
                let message = format!(
                    "{} did not answer within {:?} (--redis-timeout)",
                    node.name, self.timeout
                );
                node.breaker.failure(&message);
                Err(message)
            }
        }
    }

    /// Deletes the Redis keys of `checks` (counters, penalty boxes, the current hybrid
    /// windows), drops what this replica holds for them (the over-limit cache's answers,
    /// the hybrid counts, the local failure policy's counters) and tells the other
    /// replicas to drop theirs (`resets`). One DEL per slot, in one pipeline per node, the
    /// nodes at once. Unlike a decision, a reset Redis did not take is an error, so the
    /// operator knows to try again.
    async fn forget(&self, checks: &[Check<'_>], now_millis: u64) -> Result<(), StoreError> {
        if checks.is_empty() {
            return Ok(());
        }
        self.local.forget_now(checks);
        let mut ranges = Vec::new();
        let mut forgotten = Vec::new();
        let mut start = 0;
        for group in groups(checks) {
            let range = start..start + group.len();
            start = range.end;
            if self.over_cache.is_some() {
                forgotten.push(Forgotten::Cached(over_cache::identity(group)));
            }
            if self.is_hybrid(group) {
                forgotten.extend(group.iter().map(|check| {
                    Forgotten::Hybrid(hybrid::window_key(&self.prefix, check, now_millis))
                }));
            }
            ranges.push(range);
        }
        self.drop_local(&forgotten);
        let failed = |message: String| StoreError {
            message: format!("the reset did not reach Redis: {message}"),
            transient: true,
        };
        let batches = self.plan(checks, ranges);
        let deletes = batches.iter().map(|batch| async move {
            let node = self.callable(batch)?;
            let mut pipeline = Pipeline::with_capacity(batch.calls.len());
            for groups in &batch.calls {
                let mut delete = redis::cmd("DEL");
                for group in groups.iter().filter_map(|range| checks.get(range.clone())) {
                    for key in self.keys_of(group, now_millis) {
                        delete.arg(key);
                    }
                }
                pipeline.add_command(delete);
            }
            let reply = node.run(&pipeline, &self.script);
            self.settle(node, tokio::time::timeout(self.timeout, reply).await)
        });
        for reply in futures_util::future::join_all(deletes).await {
            reply.map_err(failed)?;
        }
        // After every DEL: a replica told earlier could read the old count back into its
        // cache.
        if let (false, Some(batch)) = (forgotten.is_empty(), batches.first()) {
            let first = self.callable(batch).map_err(failed)?;
            let mut publish = redis::pipe();
            publish
                .cmd("PUBLISH")
                .arg(resets::channel(&self.prefix))
                .arg(resets::encode(&forgotten));
            let publishes = self.publishing_nodes(first).into_iter().map(|node| {
                let publish = &publish;
                async move {
                    let reply = node.run(publish, &self.script);
                    self.settle(&node, tokio::time::timeout(self.timeout, reply).await)
                }
            });
            let replies = futures_util::future::join_all(publishes).await;
            // One node that took it is enough: the others hear it over the cluster bus.
            if replies.iter().all(Result::is_err) {
                let message = replies
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or_default();
                return Err(StoreError {
                    message: format!(
                        "the counters were reset in Redis, but the other replicas were not told \
                         (they answer from what they cached until its reset; try again): {message}"
                    ),
                    transient: true,
                });
            }
        }
        Ok(())
    }

    /// Where a reset is published. On a cluster every master, not only `first`: a
    /// subscriber hears a PUBLISH on its own node at once, while the cluster bus drops
    /// what it carries whenever a link between two nodes is being made again (a node busy
    /// past half the node timeout has its links closed), which can lose a reset under load.
    /// Each replica then hears a reset once per master; dropping twice is harmless, and
    /// resets are rare.
    fn publishing_nodes(&self, first: &Arc<Node>) -> Vec<Arc<Node>> {
        match &self.topology {
            Topology::Cluster(cluster) => {
                let nodes = cluster.map.load().nodes.clone();
                // Masters whose breaker is open are left to the bus.
                let others = nodes.into_iter().filter(|node| {
                    !Arc::ptr_eq(node, first) && node.breaker.permit() != Permit::Skip
                });
                std::iter::once(first.clone()).chain(others).collect()
            }
            Topology::Standalone(_) | Topology::Sentinel(_) => vec![first.clone()],
        }
    }

    /// Drops this replica's own answers and counts for what a reset names.
    fn drop_local(&self, forgotten: &[Forgotten]) {
        for item in forgotten {
            match item {
                Forgotten::Cached(identity) => {
                    if let Some(cache) = &self.over_cache {
                        cache.forget(*identity);
                    }
                }
                Forgotten::Hybrid(key) => self.hybrid.forget(key),
            }
        }
    }

    /// The server another replica's resets are heard from on the `attempt`-th try: the
    /// standalone server, Sentinel's master, or a cluster node, each in turn (a PUBLISH
    /// reaches every node, and a dead one stays in the slot map until it is failed over).
    fn listening_node(&self, attempt: usize) -> Option<Arc<Node>> {
        match &self.topology {
            Topology::Standalone(node) => Some(node.clone()),
            Topology::Sentinel(sentinel) => sentinel.master(),
            Topology::Cluster(cluster) => {
                let map = cluster.map.load();
                let count = map.nodes.len().max(1);
                map.nodes.get(attempt % count).cloned()
            }
        }
    }

    /// Every Redis key holding state of `group`: its counters, its penalty box, and for
    /// hybrid counting the current window's.
    fn keys_of(&self, group: &[Check<'_>], now_millis: u64) -> Vec<String> {
        let mut keys = Vec::with_capacity(group.len() * 2 + 1);
        let hybrid = self.is_hybrid(group);
        for check in group {
            let mut key = String::new();
            push_redis_key(&mut key, &self.prefix, check.key);
            keys.push(key);
            if hybrid {
                keys.push(hybrid::window_key(&self.prefix, check, now_millis));
            }
        }
        if let Some(first) = group.first().filter(|c| c.penalty.is_some()) {
            let mut key = String::new();
            push_penalty_key(&mut key, &self.prefix, first.key);
            keys.push(key);
        }
        keys
    }

    /// The node map is out of date: a cluster's slot map, or which server Sentinel's master is.
    fn mark_stale(&self) {
        match &self.topology {
            Topology::Cluster(cluster) => cluster.stale.store(true, Ordering::Release),
            Topology::Sentinel(sentinel) => sentinel.mark_stale(),
            Topology::Standalone(_) => {}
        }
    }

    /// Sentinel's master failed a call: it may have been failed over, so the sentinels are
    /// asked soon. (A cluster's slot map is re-read only on redirects: a dead master there
    /// keeps its slots until the cluster moves them, which a redirect then reports.)
    fn master_failed(&self) {
        if let Topology::Sentinel(sentinel) = &self.topology {
            sentinel.mark_stale();
        }
    }

    fn call_failed(&self) {
        if let Some(sink) = self.failed_call_sink.get() {
            sink(1);
        }
    }

    /// Decides `groups` without Redis, as `--redis-failure-mode` says.
    fn fallback(
        &self,
        checks: &[Check<'_>],
        groups: &[Range<usize>],
        now_millis: u64,
        out: &mut [Verdict],
    ) {
        crate::trace::note_fallback(match self.failure_mode {
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
            FailureMode::Local => "local",
        });
        let mut local = Vec::new();
        for range in groups {
            let Some(group) = checks.get(range.clone()) else {
                continue;
            };
            self.fallbacks
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            match self.failure_mode {
                FailureMode::Allow | FailureMode::Deny => {
                    let over_limit = self.failure_mode == FailureMode::Deny;
                    for (check, slot) in group
                        .iter()
                        .zip(out.get_mut(range.clone()).unwrap_or_default())
                    {
                        *slot = Verdict {
                            over_limit,
                            remaining: if over_limit {
                                0
                            } else {
                                u64::from(check.limit.requests_per_unit)
                            },
                            reset_after_millis: check.limit.window_at(now_millis).1,
                            from_local_cache: false,
                        };
                    }
                }
                FailureMode::Local => {
                    // Each replica enforces its share of the limit, so all of them together
                    // stay near the configured limit while Redis is away.
                    let shares: Vec<Check<'_>> = group
                        .iter()
                        .map(|check| {
                            let mut share = *check;
                            share.limit = settings::replica_share(&check.limit, self.replicas);
                            share
                        })
                        .collect();
                    local.clear();
                    self.local.apply_group(&shares, now_millis, &mut local);
                    for (verdict, slot) in local
                        .iter()
                        .zip(out.get_mut(range.clone()).unwrap_or_default())
                    {
                        *slot = *verdict;
                    }
                }
            }
        }
    }

    /// Re-reads the slot map from the first node (known masters first, then the seeds) that
    /// answers `CLUSTER SLOTS`.
    async fn refresh(&self, cluster: &Cluster) -> Result<(), NodeError> {
        let Ok(_refreshing) = cluster.refreshing.try_lock() else {
            return Ok(());
        };
        cluster.stale.store(false, Ordering::Release);
        let current = cluster.map.load_full();
        let known: HashMap<String, Arc<Node>> = current
            .nodes
            .iter()
            .map(|node| (node.name.clone(), node.clone()))
            .collect();
        let mut candidates: Vec<Arc<Node>> = current.nodes.clone();
        for seed in &cluster.seeds {
            let name = describe(seed);
            if !known.contains_key(&name) {
                let node = Node::new(name, seed.clone())
                    .map_err(|error| NodeError::failed(error.to_string()))?;
                candidates.push(Arc::new(node));
            }
        }
        let mut last_error = NodeError::failed("no seed node");
        for candidate in candidates {
            let mut pipeline = redis::pipe();
            pipeline.cmd("CLUSTER").arg("SLOTS");
            let reply =
                tokio::time::timeout(self.timeout * 20, candidate.run(&pipeline, &self.script))
                    .await;
            let reply = match reply {
                Ok(Ok(mut values)) if !values.is_empty() => values.swap_remove(0),
                Ok(Ok(_)) => continue,
                Ok(Err(NodeError::Failed { message, .. })) => {
                    last_error = NodeError::failed(format!("{}: {message}", candidate.name));
                    continue;
                }
                Ok(Err(NodeError::Untrusted(message))) => {
                    last_error = NodeError::Untrusted(format!("{}: {message}", candidate.name));
                    continue;
                }
                Ok(Err(NodeError::Connecting)) => continue,
                Err(_) => {
                    last_error = NodeError::failed(format!("{}: no answer", candidate.name));
                    continue;
                }
            };
            let seed = cluster
                .seeds
                .first()
                .ok_or_else(|| NodeError::failed("no seed node"))?;
            let map = cluster::parse_slots(&reply, seed, &known).map_err(NodeError::failed)?;
            if map.nodes.len() != current.nodes.len() {
                tracing::info!(
                    masters = map.nodes.len(),
                    nodes = %map.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(","),
                    "read the Redis Cluster slot map"
                );
            }
            cluster.map.store(Arc::new(map));
            return Ok(());
        }
        cluster.stale.store(true, Ordering::Release);
        Err(last_error)
    }
}

/// Keeps a cluster's slot map fresh for as long as the store lives.
async fn refresh_loop(inner: std::sync::Weak<Inner>) {
    let mut since_refresh = Duration::ZERO;
    loop {
        tokio::time::sleep(CLUSTER_STALE_CHECK).await;
        since_refresh += CLUSTER_STALE_CHECK;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Topology::Cluster(cluster) = &inner.topology else {
            return;
        };
        if cluster.stale.load(Ordering::Acquire) || since_refresh >= CLUSTER_REFRESH {
            since_refresh = Duration::ZERO;
            if let Err(error) = inner.refresh(cluster).await {
                tracing::debug!(%error, "cannot refresh the Redis Cluster slot map");
            }
        }
    }
}

/// Sends the hybrid counters' hits every `every` for as long as the store lives.
async fn hybrid_loop(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.flush_hybrid().await;
    }
}

/// Follows Sentinel's master for as long as the store lives: soon after a failed call, and
/// every `sentinel::REFRESH` in case a failover happened while the master still answered.
/// Listens for the resets other replicas publish (`resets`) while the store lives; a lost
/// subscription is made again on whichever server then answers.
async fn reset_loop(inner: std::sync::Weak<Inner>) {
    use futures_util::StreamExt;
    for attempt in 0.. {
        let Some(store) = inner.upgrade() else {
            return;
        };
        let channel = resets::channel(&store.prefix);
        let node = store.listening_node(attempt);
        // Not held while waiting: the store must be free to go.
        drop(store);
        if let Some(node) = node {
            // A server that takes the connection but never answers must not hold the loop.
            let subscribed = tokio::time::timeout(Duration::from_secs(5), node.pubsub(&channel))
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "no answer to SUBSCRIBE within 5s",
                    )))
                });
            match subscribed {
                Ok(pubsub) => {
                    // Resets published while this replica was not listening were missed:
                    // what it cached may be one of them, so it asks Redis again.
                    if attempt > 0
                        && let Some(store) = inner.upgrade()
                    {
                        if let Some(cache) = &store.over_cache {
                            cache.clear();
                        }
                        store.hybrid.reread();
                    }
                    let mut messages = pubsub.into_on_message();
                    loop {
                        let message = tokio::select! {
                            message = messages.next() => message,
                            // Wakes now and then to see whether the store is gone.
                            () = tokio::time::sleep(Duration::from_secs(1)) => {
                                if inner.strong_count() == 0 {
                                    return;
                                }
                                continue;
                            }
                        };
                        let Some(message) = message else {
                            break;
                        };
                        let Some(store) = inner.upgrade() else {
                            return;
                        };
                        let text: String = message.get_payload().unwrap_or_default();
                        store.drop_local(&resets::decode(&text));
                    }
                    tracing::debug!(node = %node.name, "the subscription to resets ended; subscribing again");
                }
                Err(error) => {
                    tracing::debug!(node = %node.name, %error, "cannot subscribe to resets yet");
                }
            }
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

async fn sentinel_loop(inner: std::sync::Weak<Inner>) {
    let mut since_refresh = Duration::ZERO;
    loop {
        tokio::time::sleep(sentinel::STALE_CHECK).await;
        since_refresh += sentinel::STALE_CHECK;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Topology::Sentinel(sentinel) = &inner.topology else {
            return;
        };
        if sentinel.is_stale() || since_refresh >= sentinel::REFRESH {
            since_refresh = Duration::ZERO;
            if let Err(error) = sentinel.resolve(inner.timeout * 20, &inner.script).await {
                tracing::debug!(%error, "cannot follow the redis sentinel master yet");
            }
        }
    }
}

/// The start-up error for a server whose certificate is not trusted (or that refused ours).
fn untrusted(what: &str, message: &str) -> RedisSetupError {
    RedisSetupError(format!("TLS to {what} failed: {message}"))
}

/// `--redis-tls-ca` and the client certificate, read once at start-up; `None` without them,
/// when `rediss://` trusts the system's CA roots.
fn tls_certificates(tls: &RedisTls) -> Result<Option<TlsCertificates>, RedisSetupError> {
    if !tls.is_set() {
        return Ok(None);
    }
    let read = |path: &std::path::Path, flag: &str| {
        let bytes = std::fs::read(path).map_err(|error| {
            RedisSetupError(format!("cannot read {} ({flag}): {error}", path.display()))
        })?;
        if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
            return Err(RedisSetupError(format!(
                "{} ({flag}) holds no PEM block; pass a PEM file (-----BEGIN …)",
                path.display()
            )));
        }
        Ok(bytes)
    };
    let root_cert = tls
        .ca
        .as_deref()
        .map(|path| read(path, "--redis-tls-ca, REDIS_TLS_CACERT"))
        .transpose()?;
    let client_tls = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read(cert, "--redis-tls-cert, REDIS_TLS_CLIENT_CERT")?,
            client_key: read(key, "--redis-tls-key, REDIS_TLS_CLIENT_KEY")?,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The connection settings of `url`, with `tls`'s CA and client certificate on a
/// `rediss://` URL.
fn connection_info(
    url: &str,
    tls: Option<&TlsCertificates>,
) -> Result<ConnectionInfo, RedisSetupError> {
    let info = url.into_connection_info().map_err(|error| {
        RedisSetupError(format!(
            "`{}` is not a Redis URL ({error}); write redis://[user:password@]host:port[/db] or rediss:// for TLS",
            settings::redact(url)
        ))
    })?;
    match tls {
        Some(certificates) if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) => {
            Client::build_with_tls(info, certificates.clone())
                .map(|client| client.get_connection_info().clone())
                .map_err(|error| {
                    RedisSetupError(format!(
                        "the Redis TLS files (--redis-tls-ca, --redis-tls-cert, --redis-tls-key): {error}"
                    ))
                })
        }
        _ => Ok(info),
    }
}

/// `host:port` of a connection, without credentials, for logs.
fn describe(info: &ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        other => other.to_string(),
    }
}
