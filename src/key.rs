//! Counter keys: one string per (domain, matched descriptor values, limit window).
//!
//! Two forms, chosen by the store (`CounterStore::KEY_FORM`):
//! - text, for stores whose keys people read (Redis): `domain|key=value|key=value|window/algorithm`,
//!   e.g. `edge|user=alice|1m/sliding_window`. Separators inside names and values are
//!   percent-escaped, so a crafted value such as `alice|path=/admin` can never produce the
//!   key of a different descriptor and drain someone else's counter. Braces are escaped
//!   too (`{` → `%7B`, `}` → `%7D`), so the Redis store can put a key's descriptor part in
//!   a cluster hash tag as it is, without a second pass over it;
//! - packed, for the memory store, which only hashes its keys: every part behind its
//!   length, so no byte of a name or value needs scanning or escaping. Lengths make the
//!   form as unambiguous as escaping does, at a fraction of the work.

use std::borrow::Cow;

use crate::limit::{Limit, write_duration};
use crate::proto::rate_limit_descriptor::Entry;

/// How a store wants its counter keys written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyForm {
    Text,
    Packed,
}

/// Entries whose value a counter key replaces by a wildcard: `(entry index, wildcard)`,
/// a rule's `share_threshold` values (`Rule::shared_values`).
pub type Shared = [(usize, Box<str>)];

/// The entries a counter key is written from: the request's own, or, for a rule with
/// `share_threshold` wildcards, a copy with the wildcard in place of each shared value, so
/// every value a wildcard matches lands on one key. Borrowed (free) when nothing is shared.
#[inline]
pub fn with_shared_values<'e>(entries: &'e [Entry], shared: &Shared) -> Cow<'e, [Entry]> {
    if shared.is_empty() {
        Cow::Borrowed(entries)
    } else {
        Cow::Owned(shared_copy(entries, shared))
    }
}

#[cold]
fn shared_copy(entries: &[Entry], shared: &Shared) -> Vec<Entry> {
    let mut copy = entries.to_vec();
    for (at, wildcard) in shared {
        if let Some(entry) = copy.get_mut(*at) {
            entry.value = wildcard.to_string();
        }
    }
    copy
}

/// How much of a long value its digest keeps as it is, so keys and metric names stay
/// readable.
const DIGEST_KEEPS_BYTES: usize = 256;

/// The form a value longer than 4 096 bytes is counted under: its first 256 bytes
/// (to a character boundary), `…#`, and the xxh3-128 of the whole value in hex. A client
/// controls its own header values, and refusing the call over one would let every
/// request with a long header past every limit behind a fail-open Envoy; a digest counts
/// it like any other value at a bounded cost in keys, Redis memory and metric names. The
/// hash is unseeded, so every replica sharing a Redis agrees on it.
#[cold]
pub fn value_digest(value: &str) -> String {
    let mut end = DIGEST_KEEPS_BYTES.min(value.len());
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let hash = xxhash_rust::xxh3::xxh3_128(value.as_bytes());
    format!("{}…#{hash:032x}", &value[..end])
}

/// Appends the counter key in `form` to `out`, so one buffer can hold every key of a request.
pub fn append_key(out: &mut String, form: KeyForm, domain: &str, entries: &[Entry], limit: &Limit) {
    match form {
        KeyForm::Text => append_counter_key(out, domain, entries, limit),
        KeyForm::Packed => append_packed_key(out, domain, entries, limit),
    }
}

/// The packed form: the domain, the number of entries, each name and value, each behind
/// its length, then the window in milliseconds and the algorithm. Every length and count is
/// written in six-bit groups, low first, as ASCII bytes with 0x40 marking "more follows",
/// so the key is still a `str` and each part ends exactly where its length says. A key is
/// therefore never a prefix of another, and a suffix such as `|penalty` cannot turn one
/// key into another.
fn append_packed_key(out: &mut String, domain: &str, entries: &[Entry], limit: &Limit) {
    push_packed(out, domain);
    push_length(out, entries.len() as u64);
    for entry in entries {
        push_packed(out, &entry.key);
        push_packed(out, &entry.value);
    }
    push_length(out, limit.window_millis);
    match limit.calendar {
        None => out.push(char::from(limit.algorithm as u8)),
        // `c` where the algorithm's byte (0 to 4) stands, so no epoch-aligned key (nor one
        // with a suffix) is a calendar key; then which unit, and the zone.
        Some(calendar) => {
            out.push('c');
            out.push(char::from(calendar.key_byte()));
            push_packed(out, calendar.zone.name());
        }
    }
}

fn push_packed(out: &mut String, text: &str) {
    push_length(out, text.len() as u64);
    out.push_str(text);
}

fn push_length(out: &mut String, mut value: u64) {
    while value >= 0x40 {
        out.push(char::from((value & 0x3F) as u8 | 0x40));
        value >>= 6;
    }
    out.push(char::from(value as u8));
}

/// Appends the text form of the counter key to `out`.
pub fn append_counter_key(out: &mut String, domain: &str, entries: &[Entry], limit: &Limit) {
    push_escaped(out, domain);
    for entry in entries {
        out.push('|');
        push_escaped(out, &entry.key);
        out.push('=');
        push_escaped(out, &entry.value);
    }
    out.push('|');
    match limit.calendar {
        None => write_duration(out, limit.window_millis),
        // `month@Europe/Berlin`: zone names hold no separator.
        Some(calendar) => {
            calendar.push_key_unit(out);
            out.push('@');
            out.push_str(calendar.zone.name());
        }
    }
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
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
}

/// Whether `bytes` holds `|`, `=`, `%`, `{` or `}`: what a text key escapes.
fn has_separator(bytes: &[u8]) -> bool {
    contains_any(bytes, [b'|', b'=', b'%', b'{', b'}'])
}

/// Whether `bytes` holds any of `needles`, eight bytes at a time: a word XORed with a
/// needle repeated has a zero byte exactly where the needle was, and
/// `(v - 0x01…) & !v & 0x80…` is non-zero exactly when `v` has a zero byte. Keys are built
/// (and, for Redis, escaped again) on every request, and a byte-at-a-time scan was a
/// sixth of a decision. The tail is one more word, not a byte loop: the last eight bytes
/// again (overlapping what was read) or, under eight bytes, the bytes padded with a byte
/// that is no needle. The loop over a 13-byte value's five tail bytes cost more than its
/// first word.
pub fn contains_any<const N: usize>(bytes: &[u8], needles: [u8; N]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let word_has_needle = |v: u64| {
        needles.iter().fold(false, |found, &n| {
            found | has_zero_byte(v ^ (ONES * u64::from(n)))
        })
    };
    let word_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|word| <[u8; 8]>::try_from(word).ok())
            .map_or(0, u64::from_ne_bytes)
    };
    if bytes.len() < 8 {
        // Padding with the first needle's successor would do for one needle, not for
        // several; a byte equal to none of them is found among the nine values 0..=N.
        let pad = (0u8..=N as u8).find(|b| !needles.contains(b)).unwrap_or(0);
        let mut word = [pad; 8];
        if let Some(head) = word.get_mut(..bytes.len()) {
            head.copy_from_slice(bytes);
        }
        return word_has_needle(u64::from_ne_bytes(word));
    }
    let last = bytes.len() - 8;
    (0..last).step_by(8).any(|at| word_has_needle(word_at(at))) || word_has_needle(word_at(last))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_digest_keeps_the_start_and_tells_apart_values_that_differ_anywhere() {
        let long = "€".repeat(3_000);
        let digest = value_digest(&long);
        // 256 bytes end inside a three-byte character: cut before it.
        assert!(
            digest.starts_with(&format!("{}…#", "€".repeat(85))),
            "{digest}"
        );
        assert!(digest.len() < 300, "{}", digest.len());
        assert_eq!(digest, value_digest(&long));
        assert_ne!(digest, value_digest(&format!("{long}x")));
    }
    use crate::limit::{Algorithm, Unit};

    fn entries_of<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Entry> {
        pairs
            .into_iter()
            .map(|(key, value)| Entry {
                key: key.to_owned(),
                value: value.to_owned(),
            })
            .collect()
    }

    fn key(entries: &[(&str, &str)]) -> String {
        let entries = entries_of(entries.iter().copied());
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
    fn a_calendar_window_names_its_unit_and_zone_in_both_forms() {
        let entries = entries_of([("user", "alice")]);
        let month = Limit::per_unit(1, Unit::Month, Algorithm::FixedWindow);
        let in_zone = |zone: &str| Limit {
            calendar: Some(
                crate::calendar::Calendar::new(
                    Unit::Month,
                    crate::calendar::Zone::named(zone).unwrap(),
                )
                .unwrap(),
            ),
            ..month
        };
        let text = |limit: &Limit| {
            let mut out = String::new();
            append_counter_key(&mut out, "edge", &entries, limit);
            out
        };
        assert_eq!(
            text(&in_zone("Europe/Berlin")),
            "edge|user=alice|month@Europe/Berlin/fixed_window"
        );
        assert_eq!(text(&month), "edge|user=alice|30d/fixed_window");
        let packed = |limit: &Limit| {
            let mut out = String::new();
            append_packed_key(&mut out, "edge", &entries, limit);
            out
        };
        let keys = [
            packed(&month),
            packed(&in_zone("Europe/Berlin")),
            packed(&in_zone("UTC")),
        ];
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[1], keys[2]);
        assert!(
            !keys[1].starts_with(&keys[0]),
            "a calendar key is no plain key with a suffix"
        );

        // Weeks from Sunday are counted apart from weeks from Monday, in both forms.
        let monday = crate::calendar::Calendar::new(
            Unit::Week,
            crate::calendar::Zone::named("America/New_York").unwrap(),
        )
        .unwrap();
        let sunday = monday
            .starting_weeks_on(jiff::civil::Weekday::Sunday)
            .unwrap();
        let week = |calendar| Limit {
            calendar: Some(calendar),
            ..Limit::per_unit(1, Unit::Week, Algorithm::FixedWindow)
        };
        assert_eq!(
            text(&week(monday)),
            "edge|user=alice|week@America/New_York/fixed_window"
        );
        assert_eq!(
            text(&week(sunday)),
            "edge|user=alice|week-sunday@America/New_York/fixed_window"
        );
        assert_ne!(packed(&week(monday)), packed(&week(sunday)));
    }

    #[test]
    fn separators_are_found_at_every_position() {
        for len in 0..40 {
            let plain = "a".repeat(len);
            assert!(!has_separator(plain.as_bytes()), "{plain}");
            for at in 0..len {
                for separator in ['|', '=', '%', '{', '}'] {
                    let mut text = plain.clone();
                    text.replace_range(at..=at, &separator.to_string());
                    assert!(has_separator(text.as_bytes()), "{text}");
                }
            }
        }
        // Bytes next to the separators' values, and non-ASCII, are not separators.
        assert!(!has_separator("<>$&z~[]é\u{7f}\u{80}ÿ/:;?@".as_bytes()));
    }

    fn packed(
        domain: &str,
        entries: &[(String, String)],
        window_millis: u64,
        algorithm: Algorithm,
    ) -> String {
        let entries = entries_of(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let limit = Limit {
            window_millis,
            ..Limit::per_unit(1, Unit::Second, algorithm)
        };
        let mut out = String::new();
        append_packed_key(&mut out, domain, &entries, &limit);
        out
    }

    #[test]
    fn the_packed_form_puts_each_part_behind_its_length() {
        let entries = [("user".to_owned(), "alice".to_owned())];
        // 60 000 ms in six-bit groups, low first: 32, 41, 14; more-follows marked by 0x40.
        assert_eq!(
            packed("edge", &entries, 60_000, Algorithm::SlidingWindow),
            "\x04edge\x01\x04user\x05alice\x60\x69\x0e\x00"
        );
        assert_eq!(
            packed("edge", &entries, 60_000, Algorithm::FixedWindow)
                .as_bytes()
                .last(),
            Some(&1)
        );
    }

    /// A counter's parts: domain, entries, window in milliseconds, algorithm's index.
    type Parts = (String, Vec<(String, String)>, u64, usize);

    /// A small alphabet, with the text form's separators and the packed form's length
    /// bytes in it, so different keys often share long runs of bytes.
    fn part() -> impl Strategy<Value = String> {
        "[ab|=%\x00\x01\x02\x40A]{0,3}"
    }

    fn parts() -> impl Strategy<Value = Parts> {
        (
            part(),
            prop::collection::vec((part(), part()), 0..3),
            prop::sample::select(vec![0u64, 1, 63, 64, 1_000, 4_095, 4_096]),
            0..Algorithm::ALL.len(),
        )
    }

    fn packed_of(parts: &Parts) -> String {
        let algorithm = Algorithm::ALL.get(parts.3).copied().unwrap_or_default();
        packed(&parts.0, &parts.1, parts.2, algorithm)
    }

    /// Reads a packed key back into its parts, failing unless every byte is accounted for:
    /// a key that reads back whole and unambiguously is one no other counter can have.
    fn unpack(key: &str) -> Option<Parts> {
        fn length(bytes: &mut &[u8]) -> Option<u64> {
            let (mut value, mut shift) = (0u64, 0);
            loop {
                let (&byte, rest) = bytes.split_first()?;
                *bytes = rest;
                value |= u64::from(byte & 0x3F) << shift;
                if byte & 0x40 == 0 {
                    return Some(value);
                }
                shift += 6;
            }
        }
        fn text(bytes: &mut &[u8]) -> Option<String> {
            let len = usize::try_from(length(bytes)?).ok()?;
            let (head, rest) = bytes.split_at_checked(len)?;
            *bytes = rest;
            String::from_utf8(head.to_vec()).ok()
        }
        let mut bytes = key.as_bytes();
        let domain = text(&mut bytes)?;
        let entries = (0..length(&mut bytes)?)
            .map(|_| Some((text(&mut bytes)?, text(&mut bytes)?)))
            .collect::<Option<Vec<_>>>()?;
        let window = length(&mut bytes)?;
        let ([algorithm], []) = bytes.split_at_checked(1)? else {
            return None;
        };
        let algorithm = usize::from(*algorithm);
        let as_written = Algorithm::ALL.get(algorithm)?;
        (*as_written as usize == algorithm).then_some((domain, entries, window, algorithm))
    }

    proptest! {
        #[test]
        fn a_packed_key_reads_back_as_exactly_its_counter(a in parts()) {
            let key = packed_of(&a);
            prop_assert_eq!(unpack(&key), Some(a), "{:?}", key);
            // The penalty box and capacity keys append a suffix to a counter key; the
            // result is no counter's key.
            prop_assert_eq!(unpack(&format!("{key}|penalty")), None);
            prop_assert_eq!(unpack(&format!("{key}|capacity")), None);
        }
    }

    #[test]
    fn short_input_padding_is_never_a_needle() {
        // Under eight bytes the word is padded; a needle of 0 must not match the padding.
        assert!(!contains_any(b"ab", [0, 1]));
        assert!(contains_any(b"a\0", [0, 1]));
        assert!(contains_any(b"\x01", [0, 1]));
        assert!(!contains_any(b"", [b'|']));
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
