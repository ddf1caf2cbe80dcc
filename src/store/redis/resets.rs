//! Resets told to every replica. A reset deletes a client's counters in Redis, but each
//! replica may hold answers of its own for them — the over-limit cache's "over until T",
//! a hybrid window's last-read total — which would keep turning the client away until T
//! (for a penalty box, until the block ends). The replica that resets publishes what it
//! dropped on a channel every replica of the same key prefix listens on, and each drops
//! the same. (Redis Cluster broadcasts a PUBLISH to every node, so any node will do.)

/// What one replica dropped, for the others to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgotten {
    /// An over-limit cache entry, by its descriptor's identity (`over_cache::identity`,
    /// the same on every replica).
    Cached(u128),
    /// A hybrid window, by its Redis key.
    Hybrid(String),
}

/// The channel of the replicas sharing `prefix`.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}meshlimit|resets")
}

/// One line per item: `cache <32 hex digits>` or `hybrid <the key's bytes in hex>` (a
/// descriptor's value may hold a newline, which counter keys keep as it is).
pub fn encode(forgotten: &[Forgotten]) -> String {
    let mut out = String::new();
    for item in forgotten {
        match item {
            Forgotten::Cached(identity) => out.push_str(&format!("cache {identity:032x}\n")),
            Forgotten::Hybrid(key) => {
                out.push_str("hybrid ");
                for byte in key.bytes() {
                    out.push_str(&format!("{byte:02x}"));
                }
                out.push('\n');
            }
        }
    }
    out
}

/// What a message names; lines this version does not know are skipped, so a newer
/// replica's message never stops an older one.
pub fn decode(message: &str) -> Vec<Forgotten> {
    message
        .lines()
        .filter_map(|line| match line.split_once(' ')? {
            ("cache", hex) => u128::from_str_radix(hex, 16).ok().map(Forgotten::Cached),
            ("hybrid", hex) if !hex.is_empty() => unhex(hex).map(Forgotten::Hybrid),
            _ => None,
        })
        .collect()
}

fn unhex(hex: &str) -> Option<String> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(hex.get(at..at + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_names_what_was_dropped_and_skips_what_it_does_not_know() {
        let items = vec![
            Forgotten::Cached(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            Forgotten::Hybrid(
                "rl:{edge|user=ann\ncache 7}|1m/fixed_window|hybrid|60000".to_owned(),
            ),
            Forgotten::Cached(7),
        ];
        let message = encode(&items);
        assert_eq!(decode(&message), items);
        let newer = format!("{message}flush everything\ncache not-hex\nhybrid \nhybrid abc\n");
        assert_eq!(decode(&newer), items);
    }
}
