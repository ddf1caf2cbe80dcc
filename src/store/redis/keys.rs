//! Redis key layout: `<prefix>{<domain|entries>}|<window>/<algorithm>`.
//!
//! The hash tag is the counter key's descriptor part (everything before the last `|`), so
//! every limit of one descriptor, and its penalty box (`…|penalty`), hash to the same
//! Redis Cluster slot and one script can update them atomically. Braces inside names and
//! values are percent-escaped (`{` → `%7B`, `}` → `%7D`) so a crafted value cannot end the
//! tag early; counter keys never hold a raw `%` (see `key.rs`), so the escape is one to one.

/// Appends the Redis key of `counter_key` to `out`.
pub fn push_redis_key(out: &mut String, prefix: &str, counter_key: &str) {
    out.push_str(prefix);
    let (tag, rest) = match counter_key.bytes().rposition(|b| b == b'|') {
        Some(split) => counter_key.split_at(split),
        None => (counter_key, ""),
    };
    out.push('{');
    push_escaped(out, tag);
    out.push('}');
    push_escaped(out, rest);
}

/// The penalty box of a group lives under its first counter key with `|penalty` appended,
/// as in the memory store, inside the same hash tag.
pub fn push_penalty_key(out: &mut String, prefix: &str, first_counter_key: &str) {
    push_redis_key(out, prefix, first_counter_key);
    out.push_str("|penalty");
}

fn push_escaped(out: &mut String, text: &str) {
    // A `contains` with a pattern of chars decodes UTF-8 as it goes: several times the
    // cost of the rest of the key's encoding.
    if !crate::key::contains_any(text.as_bytes(), [b'{', b'}']) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
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
        let minute = key("ml:", "edge|user=a}b{c|1m/sliding_window");
        let day = key("ml:", "edge|user=a}b{c|1d/fixed_window");
        let mut penalty = String::new();
        push_penalty_key(&mut penalty, "ml:", "edge|user=a}b{c|1m/sliding_window");
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
