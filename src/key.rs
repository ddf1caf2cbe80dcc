//! Counter keys: one string per (domain, matched descriptor values, limit window).
//!
//! Layout: `domain|key=value|key=value|window/algorithm`, e.g. `edge|user=alice|1m/sliding_window`. Separators inside names and values
//! are percent-escaped, so a crafted value such as `alice|path=/admin` can never produce the
//! key of a different descriptor and drain someone else's counter.

use crate::limit::{Limit, write_duration};
use crate::proto::rate_limit_descriptor::Entry;

/// Appends the counter key to `out`, so one buffer can hold every key of a request.
pub fn append_counter_key(out: &mut String, domain: &str, entries: &[Entry], limit: &Limit) {
    push_escaped(out, domain);
    for entry in entries {
        out.push('|');
        push_escaped(out, &entry.key);
        out.push('=');
        push_escaped(out, &entry.value);
    }
    out.push('|');
    write_duration(out, limit.window_millis);
    out.push('/');
    out.push_str(limit.algorithm.name());
}

fn push_escaped(out: &mut String, text: &str) {
    // Most names and values contain no separator and are copied whole.
    if !has_separator(text.as_bytes()) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '|' => out.push_str("%7C"),
            '=' => out.push_str("%3D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
}

/// Whether `bytes` holds `|`, `=` or `%`: the separators a key escapes.
fn has_separator(bytes: &[u8]) -> bool {
    contains_any(bytes, [b'|', b'=', b'%'])
}

/// Whether `bytes` holds any of `needles`, eight bytes at a time: a word XORed with a
/// needle repeated has a zero byte exactly where the needle was, and
/// `(v - 0x01…) & !v & 0x80…` is non-zero exactly when `v` has a zero byte. Keys are built
/// (and, for Redis, escaped again) on every request, and a byte-at-a-time scan was a
/// sixth of a decision.
pub fn contains_any<const N: usize>(bytes: &[u8], needles: [u8; N]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let Ok(word) = <[u8; 8]>::try_from(word) else {
            continue;
        };
        let v = u64::from_ne_bytes(word);
        if needles.iter().fold(false, |found, &n| {
            found | has_zero_byte(v ^ (ONES * u64::from(n)))
        }) {
            return true;
        }
    }
    words.remainder().iter().any(|b| needles.contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Algorithm, Unit};

    fn key(entries: &[(&str, &str)]) -> String {
        let entries: Vec<Entry> = entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect();
        let limit = Limit::per_unit(1, Unit::Minute, Algorithm::SlidingWindow);
        let mut out = String::new();
        append_counter_key(&mut out, "edge", &entries, &limit);
        out
    }

    #[test]
    fn names_the_domain_every_entry_and_the_window() {
        assert_eq!(
            key(&[("user", "alice"), ("path", "/a")]),
            "edge|user=alice|path=/a|1m/sliding_window"
        );
    }

    #[test]
    fn separators_are_found_at_every_position() {
        for len in 0..40 {
            let plain = "a".repeat(len);
            assert!(!has_separator(plain.as_bytes()), "{plain}");
            for at in 0..len {
                for separator in ['|', '=', '%'] {
                    let mut text = plain.clone();
                    text.replace_range(at..=at, &separator.to_string());
                    assert!(has_separator(text.as_bytes()), "{text}");
                }
            }
        }
        // Bytes next to the separators' values, and non-ASCII, are not separators.
        assert!(!has_separator("{}<>~$&é\u{7f}\u{80}ÿ/:;?@".as_bytes()));
    }

    #[test]
    fn every_window_is_spelled_as_written_in_config() {
        for (millis, text) in [
            (1_000, "1s"),
            (60_000, "1m"),
            (3_600_000, "1h"),
            (86_400_000, "1d"),
            (10_000, "10s"),
            (1_500, "1500ms"),
            (7 * 86_400_000, "7d"),
        ] {
            let limit = Limit {
                window_millis: millis,
                ..Limit::per_unit(1, Unit::Second, Algorithm::FixedWindow)
            };
            let mut out = String::new();
            append_counter_key(&mut out, "d", &[], &limit);
            assert_eq!(out, format!("d|{text}/fixed_window"));
        }
    }

    #[test]
    fn a_crafted_value_cannot_forge_a_deeper_descriptor() {
        assert_ne!(
            key(&[("user", "alice|path=/a")]),
            key(&[("user", "alice"), ("path", "/a")])
        );
    }
}
