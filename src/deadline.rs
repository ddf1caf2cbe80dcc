//! The caller's deadline: a gRPC client says in `grpc-timeout` how long it will wait, and a
//! call still running past it is dropped (its store calls with it) and answered
//! `DEADLINE_EXCEEDED`, as the gRPC protocol asks of servers. Envoy and most clients also
//! give up on their side and reset the stream; this covers the ones that only wait.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::{Either, Map};
use http::{HeaderMap, Request, Response};
use tokio::time::{Timeout, error::Elapsed};
use tonic::body::Body;

/// Wraps the gRPC services so each call ends by its `grpc-timeout`.
#[derive(Clone)]
pub struct Deadlines<S> {
    inner: S,
}

impl<S> Deadlines<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

type Answer = Result<Response<Body>, Infallible>;

/// A call with no deadline as it is; one with a deadline raced against it. Named (rather
/// than boxed) so a call costs no allocation for it.
pub type CallFuture<F> = Either<F, Map<Timeout<F>, fn(Result<Answer, Elapsed>) -> Answer>>;

impl<S, B> tonic::codegen::Service<Request<B>> for Deadlines<S>
where
    S: tonic::codegen::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let deadline = grpc_timeout(request.headers());
        let call = self.inner.call(request);
        match deadline {
            None => Either::Left(call),
            Some(deadline) => {
                let past: fn(Result<Answer, Elapsed>) -> Answer = |raced| {
                    raced.unwrap_or_else(|_| {
                        let status = tonic::Status::deadline_exceeded(
                            "the call's grpc-timeout passed before it was decided",
                        );
                        Ok(status.into_http())
                    })
                };
                Either::Right(tokio::time::timeout(deadline, call).map(past))
            }
        }
    }
}

/// The `grpc-timeout` header's duration: at most 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`). A header that is not one is no deadline: the call runs as without it.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let unit = text.chars().last()?;
    let digits = &text[..text.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn every_unit_reads_and_anything_else_is_no_deadline() {
        assert_eq!(timeout_of("20m"), Some(Duration::from_millis(20)));
        assert_eq!(timeout_of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout_of("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout_of("3S"), Some(Duration::from_secs(3)));
        assert_eq!(timeout_of("250u"), Some(Duration::from_micros(250)));
        assert_eq!(
            timeout_of("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789S", "10x", "-5S", "5 S", "1.5S", "éS"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
