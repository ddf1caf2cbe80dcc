//! statsd output: the service's and every rule's counters pushed over UDP or TCP under
//! envoyproxy/ratelimit's names (`ratelimit.service.rate_limit.<domain>.<key>.over_limit`,
//! `ratelimit_server.ShouldRateLimit.response_time`, …), for deployments whose metrics go
//! through statsd — envoyproxy/ratelimit's default, often with a statsd_exporter or a
//! Datadog agent beside it.
//!
//! Every interval, what each counter gained since the last push is sent as a statsd
//! counter (`name:delta|c`); counters that did not move are not sent. Call latency goes as
//! a timer, one line per latency bucket that gained calls (see `Value::Millis`). Lines are
//! packed into datagrams that fit an ordinary MTU. A datagram lost on the way loses those
//! increments, as statsd over UDP always may; what could not be sent at all — over TCP
//! (envoyproxy/ratelimit's transport) the lines not written when the agent went away or
//! stopped reading, over UDP the datagrams after a failed send — goes out with the next
//! push, and a line that was sent never goes twice.
//! Nothing here can slow a decision: the push runs in its own task.
//!
//! `dialect` writes each line as plain statsd or DogStatsD, with envoyproxy/ratelimit's
//! `EXTRA_TAGS`; `mogrifier` holds its DogStatsD name-to-tags rules.

mod dialect;
mod mogrifier;

use std::collections::{HashMap, HashSet};
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

/// One push: its datagrams, and for each of their lines in order, the total it brings its
/// counter or latency bucket to at the agent.
pub struct Push {
    pub datagrams: Vec<String>,
    reaches: Vec<Reached>,
    /// Counters sent before that are no longer kept (a rule's idle series with request
    /// values, a rule no config has): nothing more to send for them.
    gone: Vec<String>,
}

/// What a line, once the agent has it, has told it.
enum Reached {
    Counter(String, u64),
    /// A latency bucket (by index) and its calls.
    Latency(usize, u64),
}

impl Sent {
    /// Records that the first `lines` lines of `push` reached the agent; the others' gains
    /// stay to be sent by the next push.
    pub fn delivered(&mut self, push: &Push, lines: usize) {
        // Forgotten so that what was sent does not grow with every key ever seen; one
        // that comes back starts from zero, and its whole count is its gain.
        for name in &push.gone {
            self.counters.remove(name);
        }
        for reached in push.reaches.iter().take(lines) {
            match reached {
                Reached::Counter(name, total) => {
                    self.counters.insert(name.clone(), *total);
                }
                Reached::Latency(bucket, calls) => {
                    if self.latency.len() <= *bucket {
                        self.latency.resize(bucket + 1, 0);
                    }
                    if let Some(sent) = self.latency.get_mut(*bucket) {
                        *sent = *calls;
                    }
                }
            }
        }
    }
}

/// Pushes the counters every `options.interval` until `stop` fires (or its sender is
/// dropped), then once more, so what the last interval counted is not lost with the pod.
/// Errors are logged once per run of failures and never stop the loop.
pub async fn push_loop(
    metrics: Arc<Metrics>,
    options: StatsdOptions,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
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
        let last = tokio::select! {
            _ = ticks.tick() => false,
            _ = &mut stop => true,
        };
        let totals = Totals {
            counters: metrics.statsd_counters(),
            latency: metrics.decision_latency.millis_buckets(),
        };
        let push = push(&sent, totals, &options.dialect);
        let delivered = match sender.send(&options.target, &push.datagrams).await {
            Ok(()) => {
                warned = false;
                push.reaches.len()
            }
            Err(failure) => {
                if !warned {
                    let error = &failure.error;
                    tracing::warn!(target = %options.target, %error, "statsd: cannot send; what did not go out is kept for the next push");
                    warned = true;
                }
                failure.lines_sent
            }
        };
        sent.delivered(&push, delivered);
        if last {
            return;
        }
    }
}

/// A push that did not all go out.
struct SendFailure {
    error: std::io::Error,
    /// How many of its lines, from the first, went out whole: those are not sent again.
    lines_sent: usize,
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
                let mut lines_sent = 0;
                for datagram in datagrams {
                    // A datagram goes whole or not at all.
                    if let Err(error) = socket.send_to(datagram.as_bytes(), target).await {
                        return Err(SendFailure { error, lines_sent });
                    }
                    lines_sent += datagram.lines().count();
                }
                Ok(())
            }
            Self::Tcp(connection) => {
                if datagrams.is_empty() {
                    return Ok(());
                }
                let not_sent = |error| SendFailure {
                    error,
                    lines_sent: 0,
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
                // Counted outside the write, so that a write cut short by the deadline
                // still says how far it got: a write that had not finished wrote nothing.
                let mut written = 0;
                let writing = write_counting(stream, payload.as_bytes(), &mut written);
                let result = (tokio::time::timeout(TCP_DEADLINE, writing).await)
                    .unwrap_or_else(|_| Err(timed_out("writing")));
                result.map_err(|error| {
                    *connection = None;
                    // A line cut off by the failure reaches the agent as a broken line,
                    // which it drops: it goes again, whole, with the next push.
                    let whole = payload.as_bytes().get(..written).unwrap_or_default();
                    let lines_sent = whole.iter().filter(|&&byte| byte == b'\n').count();
                    SendFailure { error, lines_sent }
                })
            }
        }
    }
}

/// Writes all of `bytes`, adding to `written` as each write returns.
async fn write_counting(
    stream: &mut TcpStream,
    bytes: &[u8],
    written: &mut usize,
) -> std::io::Result<()> {
    while let Some(rest) = bytes.get(*written..).filter(|rest| !rest.is_empty()) {
        match stream.write(rest).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => *written += n,
        }
    }
    Ok(())
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
/// packed into datagrams. A counter that went down (it cannot, but a renamed rule's may
/// start again) sends its whole new value. `sent` moves only by `Sent::delivered`.
pub fn push(sent: &Sent, now: Totals, dialect: &Dialect) -> Push {
    let mut lines = Vec::new();
    let mut reaches = Vec::new();
    let kept: HashSet<&str> = now.counters.iter().map(|(name, _)| name.as_str()).collect();
    let gone = sent
        .counters
        .keys()
        .filter(|name| !kept.contains(name.as_str()))
        .cloned()
        .collect();
    for (name, value) in now.counters {
        let before = sent.counters.get(&name).copied().unwrap_or(0);
        let gained = if value >= before {
            value - before
        } else {
            value
        };
        if gained > 0 {
            lines.push(dialect.line(&name, Value::Count(gained)));
            reaches.push(Reached::Counter(name, value));
        }
    }
    for (bucket, (millis, calls)) in now.latency.into_iter().enumerate() {
        let before = sent.latency.get(bucket).copied().unwrap_or(0);
        let gained = calls.saturating_sub(before);
        if gained > 0 {
            let value = Value::Millis {
                millis,
                calls: gained,
            };
            lines.push(dialect.line(RESPONSE_TIME, value));
            reaches.push(Reached::Latency(bucket, calls));
        }
    }
    Push {
        datagrams: pack(lines),
        reaches,
        gone,
    }
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

    /// The datagrams of a push that all went out.
    fn plain(sent: &mut Sent, now: Totals) -> Vec<String> {
        let push = push(sent, now, &Dialect::default());
        sent.delivered(&push, usize::MAX);
        push.datagrams
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

    #[test]
    fn what_did_not_go_out_goes_next_time_and_what_did_never_again() {
        let mut sent = Sent::default();
        let now = || Totals {
            counters: vec![
                ("a".to_owned(), 5),
                ("b".to_owned(), 7),
                ("c".to_owned(), 1),
            ],
            latency: vec![(0.005, 2)],
        };
        let first = push(&sent, now(), &Dialect::default());
        assert_eq!(first.datagrams[0].lines().count(), 4);
        // Two lines went out before the failure.
        sent.delivered(&first, 2);
        let second = push(&sent, now(), &Dialect::default());
        assert_eq!(
            second.datagrams,
            [format!("c:1|c\n{RESPONSE_TIME}:0.005|ms|@0.5")]
        );
        sent.delivered(&second, usize::MAX);
        assert!(push(&sent, now(), &Dialect::default()).datagrams.is_empty());
    }

    #[test]
    fn a_counter_no_longer_kept_is_forgotten_and_one_that_comes_back_sends_its_count() {
        let mut sent = Sent::default();
        let first = plain(&mut sent, counters(&[("kept", 3), ("idle", 9)]));
        assert_eq!(first, ["kept:3|c\nidle:9|c"]);
        // The idle series was dropped: nothing to send for it, and it is not remembered.
        let second = plain(&mut sent, counters(&[("kept", 4)]));
        assert_eq!(second, ["kept:1|c"]);
        assert!(!sent.counters.contains_key("idle"));
        // Back with a new series counting from zero: its 12 hits are new, all of them
        // (not 3 more than the 9 sent before).
        let third = plain(&mut sent, counters(&[("kept", 4), ("idle", 12)]));
        assert_eq!(third, ["idle:12|c"]);
    }

    /// An agent that stops reading: the push is cut at the write deadline part way, the
    /// lines written whole reach the agent once the connection closes, and the next push,
    /// on a new connection, brings exactly the rest — every counter once.
    #[tokio::test]
    async fn a_tcp_push_cut_short_is_finished_by_the_next_without_repeating_a_line() {
        use tokio::io::AsyncReadExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small receive window, so that the sender's buffers fill after a few MB.
        socket.set_recv_buffer_size(4_096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(4).unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let counters: Vec<(String, u64)> = (0..150_000)
            .map(|i| {
                (
                    format!("ratelimit.service.rate_limit.edge.user_{i:06}.hits"),
                    1,
                )
            })
            .collect();
        let total = counters.len();
        let now = || Totals {
            counters: counters.clone(),
            latency: Vec::new(),
        };
        let mut sender = Sender::open(Transport::Tcp).await.unwrap();
        let mut sent = Sent::default();

        let first = push(&sent, now(), &Dialect::default());
        let (sending, accepted) =
            tokio::join!(sender.send(&target, &first.datagrams), listener.accept());
        let (mut agent, _) = accepted.unwrap();
        let Err(failure) = sending else {
            panic!("{total} lines went into a connection nobody reads");
        };
        let cut = failure.lines_sent;
        assert!(cut > 0 && cut < total, "{cut} of {total} lines");
        sent.delivered(&first, cut);
        let mut received = String::new();
        agent.read_to_string(&mut received).await.unwrap();

        // The agent reads again, and meshlimit's end closes once the push is out.
        let second = push(&sent, now(), &Dialect::default());
        let sending = async move {
            let sending = sender.send(&target, &second.datagrams).await;
            sending.map_err(|failure| failure.error)
        };
        let reading = async {
            let (mut agent, _) = listener.accept().await.unwrap();
            let mut text = String::new();
            agent.read_to_string(&mut text).await.map(|_| text)
        };
        let (sending, rest) = tokio::join!(sending, reading);
        sending.unwrap();
        received.push_str(&rest.unwrap());

        // Whole lines only: the one cut in two went again.
        let lines: Vec<&str> = received.lines().filter(|l| l.ends_with("|c")).collect();
        let distinct: std::collections::HashSet<&str> = lines.iter().copied().collect();
        assert_eq!(
            lines.len(),
            total,
            "{} lines, {cut} in the first push",
            lines.len()
        );
        assert_eq!(distinct.len(), total);
    }
}
