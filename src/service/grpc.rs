//! The gRPC adapter: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
//!
//! Thin on purpose: size check, hand the request to the limiter, and turn its errors into
//! gRPC statuses — the one place where that mapping lives.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::limiter::{DecisionError, RateLimiter};
use crate::proto::rate_limit_service_server::RateLimitService;
use crate::proto::{RateLimitRequest, RateLimitResponse};
use crate::store::CounterStore;
use crate::trace::Tracer;

pub struct GrpcRateLimitService<S, C> {
    limiter: Arc<RateLimiter<S, C>>,
    max_request_bytes: usize,
    tracer: Option<Arc<Tracer>>,
}

impl<S, C> GrpcRateLimitService<S, C> {
    pub fn new(limiter: Arc<RateLimiter<S, C>>, max_request_bytes: usize) -> Self {
        Self {
            limiter,
            max_request_bytes,
            tracer: None,
        }
    }

    /// Makes a span of every sampled call.
    pub fn with_tracer(mut self, tracer: Option<Arc<Tracer>>) -> Self {
        self.tracer = tracer;
        self
    }
}

impl From<DecisionError> for Status {
    fn from(error: DecisionError) -> Self {
        match error {
            DecisionError::InvalidRequest(message) => Status::invalid_argument(message),
            // UNAVAILABLE lets Envoy apply its own failure_mode_deny choice.
            DecisionError::NoConfig => Status::unavailable(error.to_string()),
            DecisionError::Store(ref store) if store.transient => {
                Status::unavailable(error.to_string())
            }
            DecisionError::Store(_) => Status::internal(error.to_string()),
        }
    }
}

#[tonic::async_trait]
impl<S: CounterStore, C: Clock> RateLimitService for GrpcRateLimitService<S, C> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let traced = self.tracer.as_ref().and_then(|tracer| {
            let metadata = request.metadata();
            Some((
                tracer,
                tracer.start(|name| metadata.get(name)?.to_str().ok())?,
            ))
        });
        let request = request.into_inner();
        let answer = match traced {
            None => self.answer(&request).await,
            // Boxed, so the traced path's future (the decision inside a task-local scope)
            // is not laid out in every call's future: unboxed, the Redis store's untraced
            // calls spent ~25 k instructions a call in memcpy moving the larger future,
            // +14 k in all (BENCHMARKS.md section 16).
            Some((tracer, call)) => {
                let (domain, descriptors) = (&request.domain, request.descriptors.len());
                let decision = self.answer(&request);
                Box::pin(tracer.trace(call, domain, descriptors, decision)).await
            }
        };
        answer.map(Response::new)
    }
}

impl<S: CounterStore, C: Clock> GrpcRateLimitService<S, C> {
    async fn answer(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        // The transport refuses bodies far over the bound without decoding them; this check
        // gives requests just over it the clearer INVALID_ARGUMENT. prost's exact size walks
        // every field a varint at a time, so it is only worked out when a cheap upper bound
        // does not already settle it, as it does for nearly every request.
        if size_at_most(request) > self.max_request_bytes {
            let size = request.encoded_len();
            if size > self.max_request_bytes {
                return Err(Status::invalid_argument(format!(
                    "the request is {size} bytes; at most {} are accepted (--max-request-bytes)",
                    self.max_request_bytes
                )));
            }
        }
        Ok(self.limiter.should_rate_limit(request).await?)
    }
}

/// The most bytes any field's framing takes: a one-byte key (every field number here is
/// below 16) and a 10-byte varint (a length, or a negative enum sign-extended).
const FRAMING: usize = 11;

/// An upper bound of `request.encoded_len()`: the strings' lengths plus the most framing
/// every field could take, the optional ones counted as present.
fn size_at_most(request: &RateLimitRequest) -> usize {
    // domain and hits_addend.
    let mut bytes = 2 * FRAMING + request.domain.len();
    for descriptor in &request.descriptors {
        // Its own framing; `limit`, with two varint fields; `hits_addend`, with one.
        bytes += FRAMING + 3 * FRAMING + 2 * FRAMING;
        for entry in &descriptor.entries {
            // Its own framing, then the key's and the value's.
            bytes += 3 * FRAMING + entry.key.len() + entry.value.len();
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto::RateLimitDescriptor;
    use crate::proto::rate_limit_descriptor::{Entry, RateLimitOverride};

    fn descriptor() -> impl Strategy<Value = RateLimitDescriptor> {
        let entry = (".{0,200}", ".{0,300}").prop_map(|(key, value)| Entry { key, value });
        let limit =
            (any::<u32>(), any::<i32>()).prop_map(|(requests_per_unit, unit)| RateLimitOverride {
                requests_per_unit,
                unit,
            });
        (
            prop::collection::vec(entry, 0..6),
            prop::option::of(limit),
            prop::option::of(any::<u64>()),
        )
            .prop_map(|(entries, limit, hits_addend)| RateLimitDescriptor {
                entries,
                limit,
                hits_addend,
            })
    }

    proptest! {
        /// The bound may only be loose, never short: a request it passed as small enough
        /// is small enough.
        #[test]
        fn the_size_bound_is_never_below_the_encoded_size(
            domain in ".{0,400}",
            descriptors in prop::collection::vec(descriptor(), 0..12),
            hits_addend in any::<u32>(),
        ) {
            let request = RateLimitRequest { domain, descriptors, hits_addend };
            prop_assert!(size_at_most(&request) >= request.encoded_len());
        }
    }
}
