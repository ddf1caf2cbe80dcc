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

pub struct GrpcRateLimitService<S, C> {
    limiter: Arc<RateLimiter<S, C>>,
    max_request_bytes: usize,
}

impl<S, C> GrpcRateLimitService<S, C> {
    pub fn new(limiter: Arc<RateLimiter<S, C>>, max_request_bytes: usize) -> Self {
        Self {
            limiter,
            max_request_bytes,
        }
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
        let request = request.into_inner();
        // The transport refuses bodies far over the bound without decoding them; this check
        // gives requests just over it the clearer INVALID_ARGUMENT.
        let size = request.encoded_len();
        if size > self.max_request_bytes {
            return Err(Status::invalid_argument(format!(
                "the request is {size} bytes; at most {} are accepted (--max-request-bytes)",
                self.max_request_bytes
            )));
        }
        let response = self.limiter.should_rate_limit(&request).await?;
        Ok(Response::new(response))
    }
}
