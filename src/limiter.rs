//! The decision path: a `RateLimitRequest` in, a `RateLimitResponse` out.
//!
//! validate the request → match each descriptor in the live config → apply `replaces` →
//! count in the store → build one status per descriptor. Transport-free, so it is tested
//! and benchmarked without a socket; the gRPC adapter only converts errors.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::LocalKey;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use smallvec::SmallVec;

use crate::algorithm::Verdict;
use crate::algorithm::penalty::Penalty;
use crate::clock::Clock;
use crate::key::{KeyForm, append_key, with_shared_values};
use crate::limit::{Limit, Unit};
use crate::matcher::{Capacity, DomainTree, RateLimitConfig};
use crate::metrics::{Hit, Metrics, RuleStats};
use crate::proto::rate_limit_response::rate_limit::Unit as ProtoUnit;
use crate::proto::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use crate::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use crate::response::{self, Decided, ResponseSettings};
use crate::rule::{MetricPart, Rule, RuleLimit};
use crate::store::{Check, CounterStore, StoreError};

/// Bounds on a request's shape, so a hostile or broken client cannot make one request cost
/// unbounded work.
#[derive(Debug, Clone, Copy)]
pub struct RequestBounds {
    pub max_descriptors: usize,
    pub max_entries: usize,
    /// Longest key, in bytes; a longer value is counted under its digest
    /// (`key::value_digest`).
    pub max_entry_bytes: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        // Envoy's filters send a handful of descriptors of a few entries each; these leave
        // an order of magnitude of headroom.
        Self {
            max_descriptors: 64,
            max_entries: 32,
            max_entry_bytes: 4_096,
        }
    }
}

/// Why a request got no decision.
#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "no rate limit configuration is loaded yet; meshlimit's log says why (a config directory that does not load, or an xDS server that has sent none)"
    )]
    NoConfig,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The live config, swapped whole on reload and read without waiting.
pub type LiveConfig = Arc<ArcSwapOption<RateLimitConfig>>;

pub struct RateLimiter<S, C> {
    config: LiveConfig,
    store: S,
    clock: C,
    bounds: RequestBounds,
    presentation: ResponseSettings,
    metrics: Arc<Metrics>,
    /// Parts per million of a limit past which a hit counts as near the limit
    /// (envoyproxy/ratelimit's NEAR_LIMIT_RATIO).
    near_limit_ppm: u64,
    modes: GlobalModes,
}

/// Service-wide overrides of every rule: envoyproxy/ratelimit's `SHADOW_MODE`,
/// `QUOTA_MODE` and `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalModes {
    /// Count and report everything, but answer every request OK.
    pub shadow: bool,
    /// Every descriptor in quota mode: a request is turned away only when all its
    /// descriptors (but unlimited ones) are over their limits.
    pub quota: bool,
    /// A request one descriptor turns away counts on none of the others.
    pub spare_when_turned_away: bool,
}

/// Per-descriptor scratch lists of a decision. Envoy's filters send a handful of
/// descriptors, so up to eight live on the stack and a decision allocates none of them.
type Few<T> = SmallVec<[T; 8]>;

/// What one request descriptor resolved to.
enum Resolved<'a> {
    NoLimit,
    Rule(&'a Rule),
    /// The descriptor's own `limit` override.
    Override(Limit),
}

impl<'a> Resolved<'a> {
    fn rule(&self) -> Option<&'a Rule> {
        match self {
            Resolved::Rule(rule) => Some(rule),
            _ => None,
        }
    }
}

impl<S: CounterStore, C: Clock> RateLimiter<S, C> {
    pub fn new(config: LiveConfig, store: S, clock: C, bounds: RequestBounds) -> Self {
        Self {
            config,
            store,
            clock,
            bounds,
            presentation: ResponseSettings::default(),
            metrics: Arc::new(Metrics::default()),
            near_limit_ppm: 800_000,
            modes: GlobalModes::default(),
        }
    }

    /// Applies service-wide shadow or quota mode to every rule.
    pub fn with_global_modes(mut self, modes: GlobalModes) -> Self {
        self.modes = modes;
        self
    }

    /// The answer's overall code when its descriptors do or do not turn it away. Global
    /// shadow mode lets every request pass, shed ones included, counting those it let
    /// through; their descriptors still report being over.
    fn overall(&self, turned_away: bool) -> Code {
        if !turned_away {
            return Code::Ok;
        }
        if self.modes.shadow {
            self.metrics
                .global_shadow_mode
                .fetch_add(1, Ordering::Relaxed);
            return Code::Ok;
        }
        Code::OverLimit
    }

    /// envoyproxy/ratelimit's quota mode: quota-mode descriptors over their limits turn the
    /// request away only when every quota-mode descriptor of it is over. Under global
    /// quota mode that is every descriptor but unlimited ones, matched by a rule or not.
    fn settle_quota(&self, resolved: &[Resolved<'_>], decided: &mut [Decided<'_>]) {
        let quota_over = decided.iter().filter(|d| d.quota && d.over).count();
        if quota_over == 0 {
            return;
        }
        let quota_descriptors = if self.modes.quota {
            let unlimited = |r: &&Resolved<'_>| {
                matches!(
                    r,
                    Resolved::Rule(Rule {
                        limit: RuleLimit::Unlimited,
                        ..
                    })
                )
            };
            resolved.iter().filter(|r| !unlimited(r)).count()
        } else {
            decided.iter().filter(|d| d.quota).count()
        };
        if quota_over == quota_descriptors {
            for d in decided.iter_mut().filter(|d| d.quota && d.over) {
                d.rejects = true;
            }
        }
    }

    /// Records decisions into `metrics`; `near_limit_ratio` (0–1] marks near-limit hits.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>, near_limit_ratio: f64) -> Self {
        self.metrics = metrics;
        self.near_limit_ppm = (near_limit_ratio.clamp(0.0, 1.0) * 1e6) as u64;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets what responses carry besides status codes (headers, 429 body, metadata).
    pub fn with_presentation(mut self, presentation: ResponseSettings) -> Self {
        self.presentation = presentation;
        self
    }

    pub fn config(&self) -> &LiveConfig {
        &self.config
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub async fn should_rate_limit(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, DecisionError> {
        let started = Instant::now();
        let result = self.decide(request).await;
        self.metrics.observe_decision(started.elapsed());
        if tracing::enabled!(tracing::Level::DEBUG) {
            log_decision(request, &result);
        }
        result
    }

    async fn decide(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, DecisionError> {
        let long_values = self.validate(request)?;
        let config = self.config.load_full().ok_or(DecisionError::NoConfig)?;
        let Some(domain) = config.domain(&request.domain) else {
            // envoyproxy/ratelimit answers OK with no limit for a domain it does not know.
            if self.metrics.record_unknown_domain(&request.domain) {
                tracing::warn!(domain = %request.domain, known = %config.domain_names(), "a request for a domain no config defines: answered OK with no limits, as are the next (counted in meshlimit_unknown_domain_requests_total); check the domain in Envoy's ratelimit filter");
            }
            return Ok(no_limits(request.descriptors.len()));
        };
        let resolved = resolve(request, &config, domain)?;
        let counted = self.counted_form(request, long_values);
        let request = &*counted;
        let now = self.clock.now_millis();

        let plan = Plan::new(request, &resolved, Counting::Hits, S::KEY_FORM);
        let mut checks = plan.checks();
        // Only a request some limit applies to is held to the domain's capacity (an
        // `unlimited` one is never counted, as it says); it is charged below once it is
        // admitted, so requests its own limits turn away take no one else's share.
        let capacity = domain.capacity.as_ref().filter(|_| !checks.is_empty());
        if let Some(capacity) = capacity
            && let Some(shed) = self
                .shed(request, capacity, &resolved, &checks, now)
                .await?
        {
            return Ok(shed);
        }
        let mut verdicts = Spare::verdicts();
        if !checks.is_empty() {
            if self.modes.spare_when_turned_away {
                self.spare_the_others(&resolved, &mut checks, now, &mut verdicts)
                    .await?;
            }
            self.count(&checks, now, &mut verdicts).await?;
        }

        // One outcome per counted descriptor: of its limits, the one that decided.
        let mut decided: Few<Decided<'_>> = Few::new();
        let mut results = plan.counted.iter().zip(verdicts.iter()).peekable();
        while let Some((first, verdict)) = results.next() {
            let mut deciding = (first.limit, *verdict);
            while let Some((next, verdict)) =
                results.next_if(|(c, _)| c.descriptor == first.descriptor)
            {
                if decides_over(verdict, &deciding.1) {
                    deciding = (next.limit, *verdict);
                }
            }
            let rule = resolved.get(first.descriptor).and_then(Resolved::rule);
            let forgiven = rule.is_some_and(|r| r.shadow_mode || r.treatment.warn_only);
            let over = deciding.1.over_limit && !forgiven;
            let quota = self.modes.quota || rule.is_some_and(|r| r.quota_mode);
            decided.push(Decided {
                descriptor: first.descriptor,
                rule,
                name: rule.and_then(|r| r.name.as_deref()).unwrap_or_default(),
                limit: deciding.0,
                verdict: deciding.1,
                over,
                quota,
                rejects: over && !quota,
            });
        }
        self.settle_quota(&resolved, &mut decided);

        // `decided` is in descriptor order, one entry per counted descriptor: one pass
        // builds every status once.
        let mut deciding = decided.iter().peekable();
        let statuses: Vec<DescriptorStatus> = (resolved.iter().enumerate())
            .map(
                |(i, resolved)| match deciding.next_if(|d| d.descriptor == i) {
                    Some(d) => counted_status(&d.limit, d.name, &d.verdict, d.over),
                    None => status_without_counting(resolved),
                },
            )
            .collect();
        for d in &decided {
            match resolved.get(d.descriptor) {
                Some(Resolved::Override(_)) => self.record_override(request, d),
                _ => self.record(request, d),
            }
        }
        let rejects = decided.iter().any(|d| d.rejects);
        // As enforcing would (a global shadow mode answers OK to a request it would turn
        // away, and takes no capacity for it, as for a shed one).
        if let Some(capacity) = capacity
            && !rejects
        {
            self.take_capacity(request, capacity, now).await;
        }
        let overall = self.overall(rejects);
        let mut response = RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..Default::default()
        };
        let passed = if self.presentation.dynamic_metadata {
            passed_rules(&resolved, &decided)
        } else {
            Few::new()
        };
        response::present(
            &mut response,
            request,
            &decided,
            &passed,
            &self.presentation,
        );
        Ok(response)
    }

    /// Looks at the domain's shared capacity at the priority of the request's most
    /// important matched rule, without taking any (`take_capacity` does, once the request
    /// is admitted). A shed request is answered at once and counts against none of its own
    /// limits, so overload does not eat into a client's quota — but for those that count
    /// every hit, rejected or not (`count_rejected`, envoyproxy's fixed windows): a cost
    /// charged after the fact (Envoy's `apply_on_stream_done`) was already spent, and a
    /// budget that did not see it would be overspent.
    async fn shed(
        &self,
        request: &RateLimitRequest,
        capacity: &Capacity,
        resolved: &[Resolved<'_>],
        checks: &[Check<'_>],
        now: u64,
    ) -> Result<Option<RateLimitResponse>, DecisionError> {
        let priority = resolved
            .iter()
            .filter_map(Resolved::rule)
            .map(|rule| rule.treatment.priority)
            .max()
            .unwrap_or(0);
        let threshold = capacity.threshold(priority);
        let limit = Limit {
            requests_per_unit: u32::try_from(threshold).unwrap_or(u32::MAX),
            ..capacity.limit
        };
        let key = capacity_key::<S>(request, capacity);
        let look = Check {
            key: &key,
            limit,
            hits: 0,
            group: u32::MAX,
            count_rejected: false,
            penalty: None,
        };
        let mut verdicts = Vec::with_capacity(1);
        self.count(&[look], now, &mut verdicts).await?;
        let cost = u64::from(request.hits_addend.max(1));
        let Some(verdict) = verdicts
            .first()
            .filter(|v| v.over_limit || v.remaining < cost)
        else {
            return Ok(None);
        };
        let verdict = Verdict {
            over_limit: true,
            remaining: 0,
            ..*verdict
        };
        self.metrics.shed.fetch_add(1, Ordering::Relaxed);
        let charged: Few<Check<'_>> = checks
            .iter()
            .filter(|check| check.count_rejected && check.hits > 0)
            .cloned()
            .collect();
        if !charged.is_empty() {
            let mut ignored = Vec::with_capacity(charged.len());
            self.count(&charged, now, &mut ignored).await?;
        }
        let decided: Vec<Decided<'_>> = (0..request.descriptors.len())
            .map(|descriptor| Decided {
                descriptor,
                rule: None,
                name: "capacity",
                // What this request's priority may fill, not the whole capacity.
                limit,
                verdict,
                over: true,
                quota: false,
                rejects: true,
            })
            .collect();
        let overall = self.overall(true);
        let mut response = RateLimitResponse {
            overall_code: overall as i32,
            statuses: decided
                .iter()
                .map(|d| counted_status(&d.limit, d.name, &d.verdict, true))
                .collect(),
            ..Default::default()
        };
        response::present(&mut response, request, &decided, &[], &self.presentation);
        Ok(Some(response))
    }

    /// Counts an admitted request against the domain's capacity, whatever it holds: the
    /// request is on its way, and the next one looks at the total. A store that fails here
    /// is counted in the store errors and changes nothing: the request was decided.
    async fn take_capacity(&self, request: &RateLimitRequest, capacity: &Capacity, now: u64) {
        let key = capacity_key::<S>(request, capacity);
        let take = Check {
            key: &key,
            limit: capacity.limit,
            hits: u64::from(request.hits_addend.max(1)),
            group: u32::MAX,
            count_rejected: true,
            penalty: None,
        };
        let mut ignored = Vec::with_capacity(1);
        let _ = self.count(&[take], now, &mut ignored).await;
    }

    /// Current use of every limit the request's descriptors match, without consuming any
    /// (the "current usage" query). Penalty blocks show as over the limit.
    pub async fn usage(
        &self,
        request: &RateLimitRequest,
    ) -> Result<Vec<LimitUsage>, DecisionError> {
        let long_values = self.validate(request)?;
        let config = self.config.load_full().ok_or(DecisionError::NoConfig)?;
        let Some(domain) = config.domain(&request.domain) else {
            return Ok(Vec::new());
        };
        let resolved = resolve(request, &config, domain)?;
        let counted = self.counted_form(request, long_values);
        let request = &*counted;
        let plan = Plan::new(request, &resolved, Counting::LookOnly, S::KEY_FORM);
        let checks = plan.checks();
        let mut verdicts = Vec::with_capacity(checks.len());
        let now = self.clock.now_millis();
        if !checks.is_empty() {
            self.count(&checks, now, &mut verdicts).await?;
        }
        Ok(plan
            .counted
            .iter()
            .zip(&verdicts)
            .map(|(c, verdict)| {
                let rule = resolved.get(c.descriptor).and_then(Resolved::rule);
                // A bucket holds up to its burst (a leaky bucket's capacity), a window up
                // to its limit: what is used is what it holds less what is left.
                let bucket = matches!(
                    c.limit.algorithm,
                    crate::limit::Algorithm::TokenBucket | crate::limit::Algorithm::LeakyBucket
                );
                let limit = if bucket {
                    u64::from(c.limit.burst())
                } else {
                    u64::from(c.limit.requests_per_unit)
                };
                // A look of zero hits is over only when a bucket charged past what it
                // holds (`count_rejected`): it is in debt, refilling at the rate until the
                // reset, so the debt is what refills by then.
                let owed =
                    (bucket && verdict.over_limit && c.count_rejected && c.penalty.is_none()).then(
                        || {
                            let refill = u128::from(verdict.reset_after_millis)
                                * u128::from(c.limit.requests_per_unit)
                                / u128::from(c.limit.window_millis().max(1));
                            u64::try_from(refill).unwrap_or(u64::MAX)
                        },
                    );
                LimitUsage {
                    descriptor: c.descriptor,
                    rule: rule.map_or_else(|| "override".to_owned(), |r| r.path.to_string()),
                    name: rule
                        .and_then(|r| r.name.as_deref())
                        .unwrap_or_default()
                        .to_owned(),
                    limit: c.limit,
                    used: limit.saturating_sub(verdict.remaining),
                    remaining: verdict.remaining,
                    reset_after_millis: verdict.reset_after_millis,
                    reset_at_millis: now + verdict.reset_after_millis,
                    // A look of no hits is over only past the limit; a window exactly at
                    // it turns the next request away too.
                    over_limit: verdict.over_limit || verdict.remaining == 0,
                    owed,
                }
            })
            .collect())
    }

    /// Starts every limit the request's descriptors match afresh (their counters and penalty
    /// boxes dropped) and returns their use afterwards: an operator's way to let one
    /// client in again now, rather than when its window or block ends.
    pub async fn reset(
        &self,
        request: &RateLimitRequest,
    ) -> Result<Vec<LimitUsage>, DecisionError> {
        let long_values = self.validate(request)?;
        let config = self.config.load_full().ok_or(DecisionError::NoConfig)?;
        if let Some(domain) = config.domain(&request.domain) {
            let resolved = resolve(request, &config, domain)?;
            let counted = self.counted_form(request, long_values);
            let request = &*counted;
            let plan = Plan::new(request, &resolved, Counting::LookOnly, S::KEY_FORM);
            let checks = plan.checks();
            if !checks.is_empty() {
                self.store
                    .forget(&checks, self.clock.now_millis())
                    .await
                    .inspect_err(|_| {
                        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    })?;
                self.metrics.resets.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.usage(request).await
    }

    /// envoyproxy/ratelimit's `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`: when a descriptor
    /// is about to turn the request away, the request's other descriptors count nothing,
    /// so a request rejected by a per-minute limit does not use up a per-day one on another
    /// descriptor. The counters are looked at first, then counted: a second store call, for
    /// requests with more than one limited descriptor only, and not atomic across
    /// descriptors (as envoyproxy/ratelimit's is not). Several limits on one descriptor are
    /// all or nothing without it, atomically.
    async fn spare_the_others(
        &self,
        resolved: &[Resolved<'_>],
        checks: &mut [Check<'_>],
        now: u64,
        looked: &mut Vec<Verdict>,
    ) -> Result<(), StoreError> {
        let first = checks.first().map(|c| c.group);
        if checks.iter().all(|c| Some(c.group) == first) {
            return Ok(());
        }
        let looks: Few<Check<'_>> = checks.iter().map(|c| Check { hits: 0, ..*c }).collect();
        self.count(&looks, now, looked).await?;
        // Shadow, warn and quota descriptors do not turn a request away on their own.
        let turns_away = |group: u32| {
            resolved.get(group as usize).is_some_and(|r| match r {
                Resolved::Rule(rule) => {
                    !(rule.shadow_mode
                        || rule.treatment.warn_only
                        || rule.quota_mode
                        || self.modes.quota)
                }
                _ => !self.modes.quota,
            })
        };
        let mut rejecting: Few<u32> = Few::new();
        for (check, verdict) in checks.iter().zip(looked.iter()) {
            let over = verdict.over_limit || verdict.remaining < check.hits;
            if over && turns_away(check.group) && !rejecting.contains(&check.group) {
                rejecting.push(check.group);
            }
        }
        if !rejecting.is_empty() {
            for check in checks.iter_mut() {
                if !rejecting.contains(&check.group) {
                    check.hits = 0;
                }
            }
        }
        Ok(())
    }

    /// One store call, timed when the store can wait, with failures counted.
    async fn count(
        &self,
        checks: &[Check<'_>],
        now: u64,
        verdicts: &mut Vec<Verdict>,
    ) -> Result<(), StoreError> {
        let result = if S::WAITS {
            let started = Instant::now();
            let result = self.store.apply(checks, now, verdicts).await;
            let elapsed = started.elapsed();
            self.metrics.store_latency.observe(elapsed);
            crate::trace::note_store_call(
                S::NAME,
                started,
                elapsed,
                checks.len(),
                result.as_ref().err(),
            );
            result
        } else {
            self.store.apply(checks, now, verdicts).await
        };
        if result.is_err() {
            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// What one descriptor's decision adds to its counters.
    fn hit(&self, request: &RateLimitRequest, d: &Decided<'_>, shadow: bool) -> Hit {
        let hits = request
            .descriptors
            .get(d.descriptor)
            .map_or(1, |descriptor| hits_of(request, descriptor));
        let limit = u64::from(d.limit.requests_per_unit);
        let used = limit.saturating_sub(d.verdict.remaining);
        Hit {
            hits,
            over_limit: d.verdict.over_limit,
            near_limit: used * 1_000_000 > self.near_limit_ppm * limit,
            shadow,
            local_cache: d.verdict.from_local_cache,
        }
    }

    /// Adds a decision under a descriptor's own `limit` to its domain's override counters,
    /// keyed by the descriptor's entries as envoyproxy/ratelimit keys them.
    #[cold]
    fn record_override(&self, request: &RateLimitRequest, d: &Decided<'_>) {
        let Some(descriptor) = request.descriptors.get(d.descriptor) else {
            return;
        };
        let hit = self.hit(request, d, false);
        (self.metrics.override_stats(&request.domain)).record_keyed(
            &hit,
            &MetricPart::key_of_entries(&descriptor.entries),
            self.clock.now_millis(),
        );
    }

    /// Adds one descriptor's decision to its rule's counters.
    fn record(&self, request: &RateLimitRequest, d: &Decided<'_>) {
        let Some(rule) = d.rule else {
            return;
        };
        let Some(stats) = rule.stats.get() else {
            return;
        };
        let hit = self.hit(request, d, rule.shadow_mode);
        // `value_to_metric` and `detailed_metric` write the request's values into the
        // metric key; the rule's own series counts the rest.
        if rule.metric_key.is_empty() {
            stats.record(&hit);
        } else {
            record_by_value(request, d, rule, stats, &hit, self.clock.now_millis());
        }
    }

    /// Whether the request is one meshlimit answers, and if so whether a value in it is
    /// longer than `max_entry_bytes` (counted under its digest).
    fn validate(&self, request: &RateLimitRequest) -> Result<bool, DecisionError> {
        let invalid = |message: String| Err(DecisionError::InvalidRequest(message));
        if request.domain.is_empty() {
            return invalid("the domain is empty; set `domain` in Envoy's ratelimit filter".into());
        }
        if request.descriptors.is_empty() {
            return invalid("the request has no descriptors; Envoy sends at least one per matched rate_limits action".into());
        }
        let bounds = &self.bounds;
        let mut long_values = false;
        if request.descriptors.len() > bounds.max_descriptors {
            return invalid(format!(
                "the request has {} descriptors; at most {} are accepted (--max-descriptors)",
                request.descriptors.len(),
                bounds.max_descriptors
            ));
        }
        // A descriptor with no entries is no error: Envoy sends one when every action of a
        // `rate_limits` entry was skipped (`skip_if_absent` without its header). It matches
        // no rule, as in envoyproxy/ratelimit, and the request's other descriptors count.
        for (i, descriptor) in request.descriptors.iter().enumerate() {
            if descriptor.entries.len() > bounds.max_entries {
                return invalid(format!(
                    "descriptor {i} has {} entries; at most {} are accepted (--max-entries)",
                    descriptor.entries.len(),
                    bounds.max_entries
                ));
            }
            for (j, entry) in descriptor.entries.iter().enumerate() {
                if entry.key.is_empty() {
                    return invalid(format!("descriptor {i} entry {j} has an empty key"));
                }
                // Keys come from Envoy's config; values from clients, who must not be
                // able to fail the call (see `value_digest`).
                if entry.key.len() > bounds.max_entry_bytes {
                    return invalid(format!(
                        "descriptor {i} entry {j} has a key longer than {} bytes",
                        bounds.max_entry_bytes
                    ));
                }
                long_values |= entry.value.len() > bounds.max_entry_bytes;
            }
        }
        Ok(long_values)
    }

    /// What is counted, recorded and shown once the request's descriptors have matched
    /// their rules on the whole values: the request itself, or, when `validate` found
    /// `long_values`, a copy with each value longer than `max_entry_bytes` replaced by its
    /// digest.
    fn counted_form<'r>(
        &self,
        request: &'r RateLimitRequest,
        long_values: bool,
    ) -> Cow<'r, RateLimitRequest> {
        if long_values {
            Cow::Owned(self.digest_long_values(request))
        } else {
            Cow::Borrowed(request)
        }
    }

    #[cold]
    fn digest_long_values(&self, request: &RateLimitRequest) -> RateLimitRequest {
        let mut digested = request.clone();
        for entry in digested.descriptors.iter_mut().flat_map(|d| &mut d.entries) {
            if entry.value.len() > self.bounds.max_entry_bytes {
                entry.value = crate::key::value_digest(&entry.value);
            }
        }
        digested
    }
}

/// One line per decision at `debug` (`MESHLIMIT_LOG=debug`): what was asked and what
/// each descriptor got, for following one client's requests while debugging a config.
#[cold]
fn log_decision(request: &RateLimitRequest, result: &Result<RateLimitResponse, DecisionError>) {
    let asked: Vec<String> = (request.descriptors.iter())
        .map(|d| {
            let entries: Vec<String> = (d.entries.iter())
                .map(|e| format!("{}={}", e.key, e.value))
                .collect();
            format!("[{}]", entries.join(","))
        })
        .collect();
    let asked = asked.join(" ");
    match result {
        Ok(response) => {
            let statuses: Vec<String> = (response.statuses.iter())
                .map(|s| match &s.current_limit {
                    Some(limit) => format!(
                        "{:?} ({}/{:?}, {} left)",
                        s.code(),
                        limit.requests_per_unit,
                        limit.unit(),
                        s.limit_remaining
                    ),
                    None => format!("{:?}", s.code()),
                })
                .collect();
            tracing::debug!(domain = %request.domain, descriptors = %asked, overall = ?response.overall_code(), statuses = %statuses.join("; "), "decided");
        }
        Err(error) => {
            tracing::debug!(domain = %request.domain, descriptors = %asked, %error, "not decided");
        }
    }
}

/// The counter of a domain's shared capacity, one for every priority.
fn capacity_key<S: CounterStore>(request: &RateLimitRequest, capacity: &Capacity) -> String {
    let mut key = String::new();
    append_key(&mut key, S::KEY_FORM, &request.domain, &[], &capacity.limit);
    key.push_str("|capacity");
    key
}

/// Records a `value_to_metric` rule's hit under its metric key with the request's values.
#[cold]
fn record_by_value(
    request: &RateLimitRequest,
    d: &Decided<'_>,
    rule: &Rule,
    stats: &RuleStats,
    hit: &Hit,
    now_millis: u64,
) {
    let entries = request
        .descriptors
        .get(d.descriptor)
        .map_or(&[][..], |descriptor| &descriptor.entries[..]);
    let values = entries.iter().map(|entry| entry.value.as_str());
    stats.record_keyed(
        hit,
        &MetricPart::key_of(&rule.metric_key, values),
        now_millis,
    );
}

/// The rules with `metadata` that let their descriptor pass: within the limit, or over it
/// in shadow or warn mode (envoyproxy/ratelimit answers shadow mode OK). A quota-mode
/// descriptor over its limit did not pass, even when the request does. An unlimited rule
/// counts nothing and is left out, as envoyproxy/ratelimit leaves it out of the passed
/// descriptors, so a migrated config hands later filters the same metadata.
fn passed_rules<'c>(resolved: &[Resolved<'c>], decided: &[Decided<'_>]) -> Few<&'c Rule> {
    resolved
        .iter()
        .enumerate()
        .filter_map(|(i, resolved)| {
            let rule = resolved.rule().filter(|rule| {
                rule.metadata.is_some() && !matches!(rule.limit, RuleLimit::Unlimited)
            })?;
            let over = decided.iter().any(|d| d.descriptor == i && d.over);
            (!over).then_some(rule)
        })
        .collect()
}

/// Matches every descriptor of a request, then applies `replaces`.
fn resolve<'c>(
    request: &RateLimitRequest,
    config: &RateLimitConfig,
    domain: &'c DomainTree,
) -> Result<Few<Resolved<'c>>, DecisionError> {
    let mut resolved: Few<Resolved<'c>> = Few::new();
    for (i, descriptor) in request.descriptors.iter().enumerate() {
        resolved.push(match &descriptor.limit {
            Some(limit) => {
                let unit = Unit::from_proto(limit.unit).ok_or_else(|| {
                    DecisionError::InvalidRequest(format!(
                        "descriptor {i} has a limit override with unit {}; use SECOND to YEAR",
                        limit.unit
                    ))
                })?;
                Resolved::Override(Limit::per_unit(
                    limit.requests_per_unit,
                    unit,
                    config.default_algorithm,
                ))
            }
            None => match domain.lookup(&descriptor.entries) {
                Some(rule) => Resolved::Rule(rule),
                None => Resolved::NoLimit,
            },
        });
    }
    apply_replaces(&mut resolved);
    Ok(resolved)
}

/// Whether a plan adds the request's hits or only looks (a usage query).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counting {
    Hits,
    LookOnly,
}

/// The counters one request touches: one entry per limit of every limited descriptor, with
/// all keys in one buffer (one allocation, not one per key).
struct Plan {
    counted: Vec<Counted>,
    key_text: String,
}

impl Plan {
    fn new(
        request: &RateLimitRequest,
        resolved: &[Resolved<'_>],
        counting: Counting,
        form: KeyForm,
    ) -> Self {
        let (mut key_text, mut counted) = (Spare::keys(), Spare::counted());
        for (i, (descriptor, resolved)) in request.descriptors.iter().zip(resolved).enumerate() {
            let (limits, count_rejected, penalty, shared) = match resolved {
                Resolved::Rule(Rule {
                    limit: RuleLimit::Limited(limits),
                    count_rejected,
                    treatment,
                    shared_values,
                    ..
                }) => (
                    &limits[..],
                    *count_rejected,
                    treatment.penalty,
                    &shared_values[..],
                ),
                Resolved::Override(limit) => (std::slice::from_ref(limit), false, None, &[][..]),
                _ => continue,
            };
            let hits = match counting {
                Counting::Hits => hits_of(request, descriptor),
                Counting::LookOnly => 0,
            };
            let entries = with_shared_values(&descriptor.entries, shared);
            for limit in limits {
                let start = key_text.len();
                append_key(&mut key_text, form, &request.domain, &entries, limit);
                counted.push(Counted {
                    descriptor: i,
                    limit: *limit,
                    hits,
                    count_rejected,
                    penalty,
                    key: start..key_text.len(),
                });
            }
        }
        Self { counted, key_text }
    }

    fn checks(&self) -> Few<Check<'_>> {
        self.counted
            .iter()
            .map(|c| Check {
                key: self.key_text.get(c.key.clone()).unwrap_or_default(),
                limit: c.limit,
                hits: c.hits,
                group: c.descriptor as u32,
                count_rejected: c.count_rejected,
                penalty: c.penalty,
            })
            .collect()
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        Spare::give_back(
            std::mem::take(&mut self.key_text),
            std::mem::take(&mut self.counted),
        );
    }
}

/// Buffers kept per thread between decisions, so a decision allocates none of them: the
/// key text, the counted limits and the store's verdicts. Taken at the start and given
/// back when dropped (a decision that moved to another thread gives them to that one).
/// Each thread keeps a few of each: with the Redis store, every decision waiting on its
/// round trip holds a set, and a single spare served only one of them (the others
/// allocated theirs and grew them, five reallocations a request).
struct Spare;

/// Buffers that grew past this (a request with many descriptors) are freed rather than
/// kept, so odd requests do not pin memory on every thread.
const SPARE_MAX_BYTES: usize = 4 * 1024;
/// Sets kept per thread: decisions in flight at once on one thread beyond this allocate
/// their own. At most 3 × 64 × 4 KiB per thread, typically a few KiB.
const SPARE_POOL: usize = 64;
/// A new key buffer's room: the keys of a few descriptors, without growing.
const KEY_TEXT_START: usize = 512;

thread_local! {
    static SPARE_KEYS: Cell<Vec<String>> = const { Cell::new(Vec::new()) };
    static SPARE_COUNTED: Cell<Vec<Vec<Counted>>> = const { Cell::new(Vec::new()) };
    static SPARE_VERDICTS: Cell<Vec<Vec<Verdict>>> = const { Cell::new(Vec::new()) };
}

/// Takes a buffer from `pool`, or makes one with `new`.
fn take_spare<T>(pool: &'static LocalKey<Cell<Vec<T>>>, new: impl FnOnce() -> T) -> T {
    pool.try_with(|cell| {
        let mut spares = cell.take();
        let spare = spares.pop();
        cell.set(spares);
        spare
    })
    .ok()
    .flatten()
    .unwrap_or_else(new)
}

/// Puts an emptied buffer of `bytes` capacity back into `pool`, if it is small and the
/// pool not full.
fn keep_spare<T>(pool: &'static LocalKey<Cell<Vec<T>>>, spare: T, bytes: usize) {
    if bytes > SPARE_MAX_BYTES {
        return;
    }
    // Whatever goes wrong (the thread is ending), the buffer is simply freed.
    let _ = pool.try_with(|cell| {
        let mut spares = cell.take();
        if spares.len() < SPARE_POOL {
            spares.push(spare);
        }
        cell.set(spares);
    });
}

impl Spare {
    fn keys() -> String {
        take_spare(&SPARE_KEYS, || String::with_capacity(KEY_TEXT_START))
    }

    fn counted() -> Vec<Counted> {
        take_spare(&SPARE_COUNTED, || Vec::with_capacity(8))
    }

    fn verdicts() -> Verdicts {
        Verdicts(take_spare(&SPARE_VERDICTS, || Vec::with_capacity(8)))
    }

    fn give_back(mut keys: String, mut counted: Vec<Counted>) {
        keys.clear();
        let bytes = keys.capacity();
        keep_spare(&SPARE_KEYS, keys, bytes);
        counted.clear();
        let bytes = counted.capacity() * size_of::<Counted>();
        keep_spare(&SPARE_COUNTED, counted, bytes);
    }
}

/// The store's verdicts for one decision, in a spare buffer.
struct Verdicts(Vec<Verdict>);

impl std::ops::Deref for Verdicts {
    type Target = Vec<Verdict>;
    fn deref(&self) -> &Vec<Verdict> {
        &self.0
    }
}

impl std::ops::DerefMut for Verdicts {
    fn deref_mut(&mut self) -> &mut Vec<Verdict> {
        &mut self.0
    }
}

impl Drop for Verdicts {
    fn drop(&mut self) {
        let mut verdicts = std::mem::take(&mut self.0);
        verdicts.clear();
        let bytes = verdicts.capacity() * size_of::<Verdict>();
        keep_spare(&SPARE_VERDICTS, verdicts, bytes);
    }
}

/// Current use of one limit, as `/v1/usage` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitUsage {
    pub descriptor: usize,
    /// The rule's path (`domain.key_value.key`), or `override` for a request's own limit.
    pub rule: String,
    pub name: String,
    pub limit: Limit,
    pub used: u64,
    pub remaining: u64,
    pub reset_after_millis: u64,
    /// When that is, in milliseconds since the Unix epoch.
    pub reset_at_millis: u64,
    /// A request of one hit now would be turned away: nothing left (a window at its
    /// limit, a bucket empty or in debt), or a penalty block.
    pub over_limit: bool,
    /// How far a bucket charged after the fact is past what it holds, in hits (to within
    /// what refills in a millisecond); `None` when it is not in debt.
    pub owed: Option<u64>,
}

/// The longest `google.protobuf.Duration`: 10 000 years.
const MAX_DURATION_SECONDS: u64 = 315_576_000_000;

/// One limit of one descriptor to count, with its key's place in the request's key buffer.
struct Counted {
    descriptor: usize,
    limit: Limit,
    hits: u64,
    count_rejected: bool,
    penalty: Option<Penalty>,
    key: std::ops::Range<usize>,
}

/// Whether `candidate` should be reported instead of `current`: a limit that is over
/// decides, and of several that are, the one that resets last — the client is turned away
/// until then, so an earlier reset would send it back too early. Among limits that are not
/// over, the one with the least left.
fn decides_over(candidate: &Verdict, current: &Verdict) -> bool {
    match (candidate.over_limit, current.over_limit) {
        (true, false) => true,
        (true, true) => candidate.reset_after_millis > current.reset_after_millis,
        (false, false) => candidate.remaining < current.remaining,
        (false, true) => false,
    }
}

/// A matched rule that lists others in `replaces` switches those off for the whole request.
fn apply_replaces(resolved: &mut [Resolved<'_>]) {
    let replaced: Vec<&str> = resolved
        .iter()
        .filter_map(|r| match r {
            Resolved::Rule(rule) => Some(rule.replaces.iter().map(|name| &**name)),
            _ => None,
        })
        .flatten()
        .collect();
    if replaced.is_empty() {
        return;
    }
    for r in resolved.iter_mut() {
        if let Resolved::Rule(Rule {
            name: Some(name),
            limit: RuleLimit::Limited(_),
            ..
        }) = r
            && replaced.contains(&&**name)
        {
            *r = Resolved::NoLimit;
        }
    }
}

/// Hits for one descriptor: its own `hits_addend` when set (0 = only check), else the
/// request's, where 0 means 1 — as Envoy and envoyproxy/ratelimit define them.
fn hits_of(request: &RateLimitRequest, descriptor: &RateLimitDescriptor) -> u64 {
    match descriptor.hits_addend {
        Some(hits) => hits,
        None => u64::from(request.hits_addend.max(1)),
    }
}

fn status_without_counting(resolved: &Resolved<'_>) -> DescriptorStatus {
    match resolved {
        Resolved::Rule(Rule {
            limit: RuleLimit::Unlimited,
            ..
        }) => DescriptorStatus {
            code: Code::Ok as i32,
            limit_remaining: u32::MAX,
            ..Default::default()
        },
        _ => DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        },
    }
}

fn counted_status(limit: &Limit, name: &str, verdict: &Verdict, rejects: bool) -> DescriptorStatus {
    let code = if rejects { Code::OverLimit } else { Code::Ok };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: name.to_owned(),
            requests_per_unit: limit.requests_per_unit,
            unit: limit.unit().map_or(ProtoUnit::Unknown, Unit::to_proto) as i32,
        }),
        limit_remaining: u32::try_from(verdict.remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(prost_types::Duration {
            // Whole seconds, rounded up: Envoy's x-ratelimit-reset and Retry-After are in
            // seconds, and rounding down would tell a client to come back too early.
            // At most protobuf's longest Duration (10 000 years), which a bucket charged
            // u64::MAX hits after the fact would pass; past it clients refuse the answer.
            seconds: (verdict.reset_after_millis.div_ceil(1_000)).min(MAX_DURATION_SECONDS) as i64,
            nanos: 0,
        }),
        quota: None,
    }
}

fn no_limits(descriptors: usize) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses: vec![
            DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            };
            descriptors
        ],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
