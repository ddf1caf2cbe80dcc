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
    // A byte scan: far cheaper than a char-set search, and all three are ASCII.
    if !text.bytes().any(|b| matches!(b, b'|' | b'=' | b'%')) {
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
    fn a_crafted_value_cannot_forge_a_deeper_descriptor() {
        assert_ne!(
            key(&[("user", "alice|path=/a")]),
            key(&[("user", "alice"), ("path", "/a")])
        );
    }
}
