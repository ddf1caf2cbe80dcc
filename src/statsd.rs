//! statsd output: the service's and every rule's counters pushed over UDP under
//! envoyproxy/ratelimit's names (`ratelimit.service.rate_limit.<domain>.<key>.over_limit`),
//! for deployments whose metrics go through statsd — envoyproxy/ratelimit's default, often
//! with a statsd_exporter or a Datadog agent beside it.
//!
//! Every interval, what each counter gained since the last push is sent as a statsd
//! counter (`name:delta|c`); counters that did not move are not sent. Lines are packed
//! into datagrams that fit an ordinary MTU. A lost datagram loses those increments, as
//! statsd over UDP always may; nothing here can slow a decision.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// Datagram payloads stay under this, so they cross an Ethernet MTU unfragmented.
const MAX_DATAGRAM_BYTES: usize = 1_432;

/// Where and how often to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsdOptions {
    /// `host:port`, resolved at every push so a restarted agent's new address is found.
    pub target: String,
    pub interval: Duration,
}

/// Pushes the counters every `options.interval`, forever (the server aborts the task when
/// it stops). Errors are logged once per kind and never stop the loop.
pub async fn push_loop(metrics: Arc<Metrics>, options: StatsdOptions) {
    let socket = match tokio::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await {
        Ok(socket) => socket,
        Err(error) => {
            tracing::error!(%error, "statsd: cannot open a UDP socket; no statsd output");
            return;
        }
    };
    let mut sent = HashMap::new();
    let mut warned = false;
    let mut ticks = tokio::time::interval(options.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for datagram in datagrams(&mut sent, metrics.statsd_counters()) {
            if let Err(error) = socket.send_to(datagram.as_bytes(), &options.target).await {
                if !warned {
                    tracing::warn!(target = %options.target, %error, "statsd: cannot send; counters are dropped until it works");
                    warned = true;
                }
                break;
            }
            warned = false;
        }
    }
}

/// The statsd lines of what each counter of `current` gained since `sent`, packed into
/// datagrams; `sent` is updated to `current`. A counter that went down (it cannot, but a
/// renamed rule's may start again) sends its whole new value.
pub fn datagrams(sent: &mut HashMap<String, u64>, current: Vec<(String, u64)>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut datagram = String::new();
    for (name, value) in current {
        let before = sent.insert(name.clone(), value).unwrap_or(0);
        let delta = if value >= before {
            value - before
        } else {
            value
        };
        if delta == 0 {
            continue;
        }
        let line = format!("{}:{delta}|c", sanitize(&name));
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

/// A statsd name cannot hold the protocol's separators (`:`, `|`, `@`) or line breaks;
/// they become `_`, as statsd clients write them.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            ':' | '|' | '@' | '\n' | '\r' => '_',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
    }

    #[test]
    fn only_what_moved_is_sent_as_its_increase() {
        let mut sent = HashMap::new();
        let first = datagrams(&mut sent, counters(&[("a.hits", 3), ("a.over", 0)]));
        assert_eq!(first, ["a.hits:3|c"]);
        let second = datagrams(&mut sent, counters(&[("a.hits", 5), ("a.over", 1)]));
        assert_eq!(second, ["a.hits:2|c\na.over:1|c"]);
        assert!(datagrams(&mut sent, counters(&[("a.hits", 5), ("a.over", 1)])).is_empty());
        // A counter that starts again (a rule removed and added back) sends its new value.
        assert_eq!(
            datagrams(&mut sent, counters(&[("a.hits", 2)])),
            ["a.hits:2|c"]
        );
    }

    #[test]
    fn names_lose_the_protocol_separators_and_datagrams_stay_small() {
        let mut sent = HashMap::new();
        let odd = datagrams(&mut sent, counters(&[("d.path_/a:b|c@d.total_hits", 1)]));
        assert_eq!(odd, ["d.path_/a_b_c_d.total_hits:1|c"]);
        let many: Vec<(String, u64)> = (0..200)
            .map(|i| {
                (
                    format!("ratelimit.service.rate_limit.edge.user_{i}.total_hits"),
                    1,
                )
            })
            .collect();
        let packed = datagrams(&mut HashMap::new(), many);
        assert!(packed.len() > 1);
        assert!(packed.iter().all(|d| d.len() <= MAX_DATAGRAM_BYTES));
        assert_eq!(packed.iter().map(|d| d.lines().count()).sum::<usize>(), 200);
    }
}
