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
    // The windows of Envoy's units are spelled from a table; `write_duration` (division
    // by every unit size) is for the rest.
    match limit.window_millis {
        1_000 => out.push_str("1s"),
        60_000 => out.push_str("1m"),
        3_600_000 => out.push_str("1h"),
        86_400_000 => out.push_str("1d"),
        other => write_duration(out, other),
    }
    out.push('/');
    out.push_str(limit.algorithm.name());
}

fn push_escaped(out: &mut String, text: &str) {
    // All three are ASCII, so a byte scan finds them. It folds over every byte rather
    // than stopping at the first hit so the compiler vectorises it: names and values are
    // short, rarely contain one, and are then copied whole.
    let special = text.bytes().fold(false, |found, b| {
        found | (b == b'|') | (b == b'=') | (b == b'%')
    });
    if !special {
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
