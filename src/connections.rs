//! The gRPC port's client connections and how long each lives.
//!
//! Envoy keeps a few long-lived HTTP/2 connections to a rate limit service, so replicas
//! added later get no share of them until they are rotated. `--max-connection-age`
//! (envoyproxy/ratelimit's `GRPC_MAX_CONNECTION_AGE`) asks a connection to go (an HTTP/2
//! GOAWAY: Envoy finishes what it sent and opens a new connection) once it is that old, give
//! or take a tenth, drawn for each connection as grpc-go draws it. Without the spread,
//! connections opened in the same second — every Envoy reconnecting after a rollout — would
//! be rotated in the same second forever after. `--max-connection-age-grace` bounds how
//! long a connection asked to go may take to finish; past it, it is closed.
//!
//! Served here rather than by tonic's server, whose age is the same for every connection
//! and which, given a grace, closes at age plus grace without sending the GOAWAY first.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_stream::{Stream, StreamExt};

/// How much a connection's age is spread either side of `--max-connection-age`, in
/// thousandths (grpc-go's ±10 %).
const AGE_SPREAD_PER_MILLE: u32 = 100;

/// How long each connection is served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// Ask a connection to go once it is about this old; `None`: never.
    pub max_age: Option<Duration>,
    /// Close a connection this long after asking it to go, if it has not gone.
    pub grace: Option<Duration>,
}

impl std::fmt::Display for Lifetime {
    /// As the start-up log says it: `rotated at 86400s ±10%, cut 3600s later`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(age) = self.max_age else {
            return f.write_str("never rotated");
        };
        write!(f, "rotated at {age:?} ±{}%", AGE_SPREAD_PER_MILLE / 10)?;
        match self.grace {
            Some(grace) => write!(f, ", cut {grace:?} later"),
            None => f.write_str(", never cut"),
        }
    }
}

impl Lifetime {
    /// This connection's age: `max_age` give or take a tenth.
    fn draw_age(&self) -> Option<Duration> {
        self.max_age
            .map(|age| crate::jitter::give_or_take(age, AGE_SPREAD_PER_MILLE))
    }
}

/// What the connections did, for `/metrics`: whether Envoys are connected, and whether
/// rotation is giving replicas added later their share.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    /// Open now.
    pub open: AtomicU64,
    /// Accepted since the start.
    pub opened: AtomicU64,
    /// Asked to go at their age.
    pub rotated: AtomicU64,
    /// Closed at the end of their grace with requests still running.
    pub cut: AtomicU64,
}

/// Counts a connection open for as long as it is held, however its task ends.
struct OpenConnection(Arc<ConnectionCounts>);

impl OpenConnection {
    fn new(counts: Arc<ConnectionCounts>) -> Self {
        counts.opened.fetch_add(1, Ordering::Relaxed);
        counts.open.fetch_add(1, Ordering::Relaxed);
        Self(counts)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every connection is served, and how: the gRPC services, the connection's lifetime,
/// and where connections are counted.
pub struct Server {
    pub routes: tonic::service::Routes,
    pub lifetime: Lifetime,
    pub counts: Arc<ConnectionCounts>,
}

impl Server {
    /// Serves every connection `incoming` yields until `stop` resolves; then stops
    /// accepting (dropping `incoming`, which closes its listener), asks every connection to
    /// go, and returns once all have closed.
    pub async fn serve<I, IO>(self, incoming: I, stop: impl Future<Output = ()>)
    where
        I: Stream<Item = io::Result<IO>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Server {
            routes,
            lifetime,
            counts,
        } = self;
        let mut http2 = auto::Builder::new(TokioExecutor::new()).http2_only();
        // 200 streams at once a connection (hyper's default, written out): a client that wants
        // more opens another connection, as Envoy does, and one client cannot queue unbounded
        // work on one connection.
        http2
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(200);
        let (closing, _) = tokio::sync::watch::channel(false);
        let mut connections = JoinSet::new();
        // In a block of its own so that `incoming` is dropped on leaving it: its listener
        // closes at once, and new clients are refused rather than left waiting.
        {
            let mut incoming = std::pin::pin!(incoming);
            let mut stop = std::pin::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    // Finished connections are reaped as they go, so the set holds open ones.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    next = incoming.next() => match next {
                        None => break,
                        Some(Err(error)) => {
                            // Out of file descriptors, accepting fails at once again: a pause
                            // keeps the loop from spinning a core until some close.
                            tracing::warn!("accepting a gRPC connection failed: {error}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Some(Ok(io)) => {
                            let open = OpenConnection::new(counts.clone());
                            let served = connection(
                                io,
                                routes.clone(),
                                http2.clone(),
                                lifetime,
                                closing.subscribe(),
                                open,
                            );
                            connections.spawn(served);
                        }
                    },
                }
            }
        }
        let _ = closing.send(true);
        while connections.join_next().await.is_some() {}
    }
}

/// One connection, served until the client closes it, or until it is asked to go (its age,
/// or the server stopping) and has finished its requests — or its grace has run out.
async fn connection<IO>(
    io: IO,
    routes: tonic::service::Routes,
    http2: auto::Builder<TokioExecutor>,
    lifetime: Lifetime,
    mut server_closing: tokio::sync::watch::Receiver<bool>,
    open: OpenConnection,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(crate::deadline::Deadlines::new(routes));
    let served = http2.serve_connection(TokioIo::new(io), service);
    let mut served = std::pin::pin!(served);
    let age = lifetime.draw_age().map(|age| Instant::now() + age);
    // Once the connection is asked to go: when it is closed regardless, if ever.
    let mut asked_to_go = false;
    let mut closes_at: Option<Instant> = None;
    loop {
        tokio::select! {
            finished = served.as_mut() => {
                if let Err(error) = finished {
                    tracing::debug!("a gRPC connection ended: {error}");
                }
                return;
            }
            () = until(age), if !asked_to_go => {
                open.0.rotated.fetch_add(1, Ordering::Relaxed);
                served.as_mut().graceful_shutdown();
                asked_to_go = true;
                closes_at = lifetime.grace.map(|grace| Instant::now() + grace);
            }
            // The server's own shutdown grace bounds this wait.
            _ = server_closing.wait_for(|closing| *closing), if !asked_to_go => {
                served.as_mut().graceful_shutdown();
                asked_to_go = true;
            }
            () = until(closes_at), if closes_at.is_some() => {
                open.0.cut.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("closed a gRPC connection whose requests outlasted --max-connection-age-grace");
                return;
            }
        }
    }
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
