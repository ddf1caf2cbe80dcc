//! statsd output: the service's and every rule's counters pushed over UDP or TCP under
//! envoyproxy/ratelimit's names (`ratelimit.service.rate_limit.<domain>.<key>.over_limit`,
//! `ratelimit_server.ShouldRateLimit.response_time`, …), for deployments whose metrics go
//! through statsd — envoyproxy/ratelimit's default, often with a statsd_exporter or a
//! Datadog agent beside it.
//!
//! Every interval, what each counter gained since the last push is sent as a statsd
//! counter (`name:delta|c`); counters that did not move are not sent. Call latency goes as
//! a timer, one line per latency bucket that gained calls (see `Value::Millis`). Lines are
//! packed into datagrams that fit an ordinary MTU. A lost datagram loses those increments,
//! as statsd over UDP always may; over TCP (envoyproxy/ratelimit's transport) a push that
//! reached nothing — the agent down or restarting — goes out with the next one instead.
//! Nothing here can slow a decision: the push runs in its own task.
//!
//! `dialect` writes each line as plain statsd or DogStatsD, with envoyproxy/ratelimit's
//! `EXTRA_TAGS`; `mogrifier` holds its DogStatsD name-to-tags rules.

mod dialect;
mod mogrifier;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

pub use dialect::{Dialect, StatsdFormat, Value};
pub use mogrifier::Mogrifier;

use crate::metrics::Metrics;
use crate::metrics::RESPONSE_TIME_STAT as RESPONSE_TIME;

/// Datagram payloads stay under this, so they cross an Ethernet MTU unfragmented.
const MAX_DATAGRAM_BYTES: usize = 1_432;

/// How long connecting to a TCP agent, or writing one push to it, may take before the
/// push gives up (and, when nothing went out, waits for the next interval).
const TCP_DEADLINE: Duration = Duration::from_secs(2);

/// How lines reach the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Datagrams, as statsd is usually spoken: nothing waits on the agent.
    #[default]
    Udp,
    /// One connection, kept open and opened again when it breaks: envoyproxy/ratelimit's
    /// plain statsd transport, for agents that listen on TCP only.
    Tcp,
}

/// Where and how often to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsdOptions {
    /// `host:port`, resolved at every push so a restarted agent's new address is found.
    pub target: String,
    pub interval: Duration,
    pub dialect: Dialect,
    pub transport: Transport,
}

impl StatsdOptions {
    /// Plain statsd to `target` every 10 s (envoyproxy/ratelimit's `STATS_FLUSH_INTERVAL`).
    pub fn new(target: String) -> Self {
        Self {
            target,
            interval: Duration::from_secs(10),
            dialect: Dialect::default(),
            transport: Transport::Udp,
        }
    }
}

/// What the last push sent: each counter's total and each latency bucket's calls.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    counters: HashMap<String, u64>,
    latency: Vec<u64>,
}

/// The totals now: every counter by name, and each latency bucket as (about how many ms
/// its calls took, how many calls it holds).
pub struct Totals {
    pub counters: Vec<(String, u64)>,
    pub latency: Vec<(f64, u64)>,
}

/// Pushes the counters every `options.interval`, forever (the server aborts the task when
/// it stops). Errors are logged once per run of failures and never stop the loop.
pub async fn push_loop(metrics: Arc<Metrics>, options: StatsdOptions) {
    let mut sender = match Sender::open(options.transport).await {
        Ok(sender) => sender,
        Err(error) => {
            tracing::error!(%error, "statsd: cannot open a UDP socket; no statsd output");
            return;
        }
    };
    let mut sent = Sent::default();
    let mut warned = false;
    let mut ticks = tokio::time::interval(options.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let totals = Totals {
            counters: metrics.statsd_counters(),
            latency: metrics.decision_latency.millis_buckets(),
        };
        let before = sent.clone();
        let datagrams = datagrams(&mut sent, totals, &options.dialect);
        match sender.send(&options.target, &datagrams).await {
            Ok(()) => warned = false,
            Err(failure) => {
                if !warned {
                    let error = &failure.error;
                    tracing::warn!(target = %options.target, %error, "statsd: cannot send; increments are kept for the next push while nothing goes out");
                    warned = true;
                }
                // Nothing reached the agent: the next push sends these increments too.
                if !failure.partly_sent {
                    sent = before;
                }
            }
        }
    }
}

/// A push that did not all go out.
struct SendFailure {
    error: std::io::Error,
    /// Some of it may have reached the agent, so sending it again could count it twice.
    partly_sent: bool,
}

/// The socket pushes go out on.
enum Sender {
    Udp(UdpSocket),
    /// `None` until connected, and again after the connection broke.
    Tcp(Option<TcpStream>),
}

impl Sender {
    async fn open(transport: Transport) -> std::io::Result<Self> {
        Ok(match transport {
            Transport::Udp => {
                Self::Udp(UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await?)
            }
            Transport::Tcp => Self::Tcp(None),
        })
    }

    /// Sends `datagrams` to `target`: each as a datagram, or all as newline-ended lines on
    /// the TCP connection, opened first if need be.
    async fn send(&mut self, target: &str, datagrams: &[String]) -> Result<(), SendFailure> {
        match self {
            Self::Udp(socket) => {
                for (i, datagram) in datagrams.iter().enumerate() {
                    if let Err(error) = socket.send_to(datagram.as_bytes(), target).await {
                        return Err(SendFailure {
                            error,
                            partly_sent: i > 0,
                        });
                    }
                }
                Ok(())
            }
            Self::Tcp(connection) => {
                if datagrams.is_empty() {
                    return Ok(());
                }
                let not_sent = |error| SendFailure {
                    error,
                    partly_sent: false,
                };
                // An agent that restarted closed our end: writing into it would look sent
                // and be lost, so a connection the agent closed is opened again first.
                if connection.as_ref().is_some_and(closed_by_peer) {
                    *connection = None;
                }
                let stream = match connection {
                    Some(stream) => stream,
                    None => {
                        let connect = TcpStream::connect(target);
                        let stream = (tokio::time::timeout(TCP_DEADLINE, connect).await)
                            .unwrap_or_else(|_| Err(timed_out("connecting")))
                            .map_err(not_sent)?;
                        connection.insert(stream)
                    }
                };
                let mut payload = datagrams.join("\n");
                payload.push('\n');
                let written =
                    tokio::time::timeout(TCP_DEADLINE, stream.write_all(payload.as_bytes()))
                        .await
                        .unwrap_or_else(|_| Err(timed_out("writing")));
                written.map_err(|error| {
                    *connection = None;
                    SendFailure {
                        error,
                        partly_sent: true,
                    }
                })
            }
        }
    }
}

/// Whether the agent closed the connection (or reset it). statsd agents never write
/// back, so anything readable is the end of the stream or an error.
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} took over {TCP_DEADLINE:?}"),
    )
}

/// The statsd lines of what each counter and latency bucket of `now` gained since `sent`,
/// packed into datagrams; `sent` is updated to `now`. A counter that went down (it cannot,
/// but a renamed rule's may start again) sends its whole new value.
pub fn datagrams(sent: &mut Sent, now: Totals, dialect: &Dialect) -> Vec<String> {
    let mut lines = Vec::new();
    for (name, value) in now.counters {
        let before = sent.counters.insert(name.clone(), value).unwrap_or(0);
        let gained = if value >= before {
            value - before
        } else {
            value
        };
        if gained > 0 {
            lines.push(dialect.line(&name, Value::Count(gained)));
        }
    }
    sent.latency.resize(now.latency.len(), 0);
    for ((millis, calls), before) in now.latency.into_iter().zip(&mut sent.latency) {
        let gained = calls.saturating_sub(*before);
        *before = calls;
        if gained > 0 {
            let value = Value::Millis {
                millis,
                calls: gained,
            };
            lines.push(dialect.line(RESPONSE_TIME, value));
        }
    }
    pack(lines)
}

/// Lines joined by newlines into datagrams of at most `MAX_DATAGRAM_BYTES` (a longer line
/// goes alone).
fn pack(lines: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut datagram = String::new();
    for line in lines {
        if !datagram.is_empty() && datagram.len() + 1 + line.len() > MAX_DATAGRAM_BYTES {
            out.push(std::mem::take(&mut datagram));
        }
        if !datagram.is_empty() {
            datagram.push('\n');
        }
        datagram.push_str(&line);
    }
    if !datagram.is_empty() {
        out.push(datagram);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(pairs: &[(&str, u64)]) -> Totals {
        Totals {
            counters: pairs.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect(),
            latency: Vec::new(),
        }
    }

    fn plain(sent: &mut Sent, now: Totals) -> Vec<String> {
        datagrams(sent, now, &Dialect::default())
    }

    #[test]
    fn only_what_moved_is_sent_as_its_increase() {
        let mut sent = Sent::default();
        let first = plain(&mut sent, counters(&[("a.hits", 3), ("a.over", 0)]));
        assert_eq!(first, ["a.hits:3|c"]);
        let second = plain(&mut sent, counters(&[("a.hits", 5), ("a.over", 1)]));
        assert_eq!(second, ["a.hits:2|c\na.over:1|c"]);
        assert!(plain(&mut sent, counters(&[("a.hits", 5), ("a.over", 1)])).is_empty());
        // A counter that starts again (a rule removed and added back) sends its new value.
        assert_eq!(plain(&mut sent, counters(&[("a.hits", 2)])), ["a.hits:2|c"]);
    }

    #[test]
    fn latency_goes_as_one_timer_line_per_bucket_that_gained_calls() {
        let mut sent = Sent::default();
        let latency = |calls: [u64; 3]| Totals {
            counters: Vec::new(),
            latency: vec![(0.005, calls[0]), (0.0175, calls[1]), (1000.0, calls[2])],
        };
        assert_eq!(
            plain(&mut sent, latency([4, 1, 0])),
            [format!(
                "{RESPONSE_TIME}:0.005|ms|@0.25\n{RESPONSE_TIME}:0.0175|ms"
            )]
        );
        assert_eq!(
            plain(&mut sent, latency([4, 3, 1])),
            [format!(
                "{RESPONSE_TIME}:0.0175|ms|@0.5\n{RESPONSE_TIME}:1000|ms"
            )]
        );
        assert!(plain(&mut sent, latency([4, 3, 1])).is_empty());
    }

    #[test]
    fn names_lose_the_protocol_separators_and_datagrams_stay_small() {
        let mut sent = Sent::default();
        let odd = plain(&mut sent, counters(&[("d.path_/a:b|c@d.total_hits", 1)]));
        assert_eq!(odd, ["d.path_/a_b_c_d.total_hits:1|c"]);
        let many = Totals {
            counters: (0..200)
                .map(|i| {
                    (
                        format!("ratelimit.service.rate_limit.edge.user_{i}.total_hits"),
                        1,
                    )
                })
                .collect(),
            latency: Vec::new(),
        };
        let packed = plain(&mut Sent::default(), many);
        assert!(packed.len() > 1);
        assert!(packed.iter().all(|d| d.len() <= MAX_DATAGRAM_BYTES));
        assert_eq!(packed.iter().map(|d| d.lines().count()).sum::<usize>(), 200);
    }
}
