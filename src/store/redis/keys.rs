//! Redis key layout: `<prefix>{<domain|entries>}|<window>/<algorithm>`.
//!
//! The hash tag is the counter key's descriptor part (everything before the last `|`), so
//! every limit of one descriptor, and its penalty box (`…|penalty`), hash to the same
//! Redis Cluster slot and one script can update them atomically. A crafted value cannot
//! end the tag early: text counter keys hold no braces, `key.rs` writes a value's as
//! `%7B` and `%7D` once, while it escapes the separators (a second pass over every key
//! here cost 1.3 % of a Redis decision's instructions at 8 descriptors; BENCHMARKS.md
//! section 15).

/// Appends the Redis key of `counter_key`, a text counter key (see `key.rs`), to `out`.
pub fn push_redis_key(out: &mut String, prefix: &str, counter_key: &str) {
    debug_assert!(
        !crate::key::contains_any(counter_key.as_bytes(), [b'{', b'}']),
        "a text counter key holds no braces: {counter_key}"
    );
    out.push_str(prefix);
    let (tag, rest) = match counter_key.bytes().rposition(|b| b == b'|') {
        Some(split) => counter_key.split_at(split),
        None => (counter_key, ""),
    };
    out.push('{');
    out.push_str(tag);
    out.push('}');
    out.push_str(rest);
}

/// The penalty box of a group lives under its first counter key with `|penalty` appended,
/// as in the memory store, inside the same hash tag.
pub fn push_penalty_key(out: &mut String, prefix: &str, first_counter_key: &str) {
    push_redis_key(out, prefix, first_counter_key);
    out.push_str("|penalty");
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag, modulo 16384, as the
/// cluster specification defines it.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let after = bytes.get(open + 1..)?;
            let close = after.iter().position(|&b| b == b'}')?;
            // An empty tag (`{}`) means the whole key is hashed.
            (close > 0).then(|| after.get(..close)).flatten()
        })
        .unwrap_or(bytes);
    crc16(hashed) % 16_384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A prefix containing a brace would become (part of) every key's hash tag and put every
/// counter in one cluster slot.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.contains(['{', '}']) {
        return Err(format!(
            "the Redis key prefix `{prefix}` contains a brace; braces would make it the cluster hash tag of every key — drop them"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str, counter: &str) -> String {
        let mut out = String::new();
        push_redis_key(&mut out, prefix, counter);
        out
    }

    #[test]
    fn the_descriptor_part_is_the_hash_tag() {
        assert_eq!(
            key("ml:", "edge|user=alice|1m/sliding_window"),
            "ml:{edge|user=alice}|1m/sliding_window"
        );
        let mut penalty = String::new();
        push_penalty_key(&mut penalty, "ml:", "edge|user=alice|1m/sliding_window");
        assert_eq!(penalty, "ml:{edge|user=alice}|1m/sliding_window|penalty");
    }

    #[test]
    fn every_limit_of_a_descriptor_and_its_penalty_share_a_slot() {
        // A value with braces, as the text key writes it.
        let counter_key = |window: &str, algorithm: &str| {
            let mut text = String::new();
            crate::key::append_counter_key(
                &mut text,
                "edge",
                &[crate::proto::rate_limit_descriptor::Entry {
                    key: "user".into(),
                    value: "a}b{c".into(),
                }],
                &crate::limit::Limit {
                    window_millis: crate::limit::parse_duration(window).unwrap(),
                    ..crate::limit::Limit::per_unit(
                        1,
                        crate::limit::Unit::Second,
                        algorithm.parse().unwrap(),
                    )
                },
            );
            text
        };
        let minute = key("ml:", &counter_key("1m", "sliding_window"));
        let day = key("ml:", &counter_key("1d", "fixed_window"));
        let mut penalty = String::new();
        push_penalty_key(&mut penalty, "ml:", &counter_key("1m", "sliding_window"));
        assert_eq!(minute, "ml:{edge|user=a%7Db%7Bc}|1m/sliding_window");
        assert_eq!(slot(&minute), slot(&day));
        assert_eq!(slot(&minute), slot(&penalty));
    }

    #[test]
    fn slots_match_the_cluster_specification() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16_384);
    }
}
