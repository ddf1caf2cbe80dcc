//! The counter script (`counter.lua`): how checks become its KEYS and ARGV, and how its
//! reply becomes verdicts.

use std::ops::Range;

use redis::{Cmd, Script, Value};

use super::keys::{push_penalty_key, push_redis_key};
use crate::algorithm::penalty::PenaltyState;
use crate::algorithm::{self, Verdict};
use crate::limit::Algorithm;
use crate::store::Check;

pub const SOURCE: &str = include_str!("counter.lua");

/// Numbers each check adds, at most: algorithm and count_rejected (in one), limit, window,
/// hits, lifetime, and a bucket's burst. Each number costs the script ~600 instructions to
/// unpack, so none is sent that the check does not use.
const NUMBERS_PER_CHECK: usize = 6;
/// Numbers a group adds besides its checks, at most: its check count and has_penalty (in
/// one), and the penalty's after, within, block and lifetime.
const NUMBERS_PER_GROUP: usize = 5;
/// Room for the hash tag's braces and a few escapes per key.
const KEY_ESCAPE_ROOM: usize = 8;
/// The largest number the script reads exactly: Lua's numbers are doubles. A lifetime
/// above it (no real limit comes near: 2^53 ms is 285 000 years) is capped rather than
/// rounded into a different TTL.
const LARGEST_EXACT: u64 = 1 << 53;
/// Added to a window counter's Redis TTL. The script sets the TTL at a window's first write
/// and keeps it for the window's later writes (KEEPTTL), so a replica whose clock runs
/// ahead can start a key's life early by its skew; the margin keeps the count alive for
/// replicas whose clocks lag by up to a second.
const CLOCK_SKEW_MARGIN_MILLIS: u64 = 1_000;

pub fn counter_script() -> Script {
    Script::new(SOURCE)
}

/// The script's code for each algorithm (its `readers` table is indexed by it).
/// The script's code for a fixed window on a calendar (`counter.lua`'s `calendar_window`).
const CALENDAR_WINDOW: u64 = 6;

fn algorithm_code(algorithm: Algorithm) -> u64 {
    match algorithm {
        Algorithm::SlidingWindow => 1,
        Algorithm::FixedWindow => 2,
        Algorithm::TokenBucket => 3,
        Algorithm::SlidingLog => 4,
        Algorithm::LeakyBucket => 5,
    }
}

/// One request's part of a script call: its keys and its numbers.
pub struct Encoded {
    /// The keys one after another; `key_ends` says where each ends.
    keys: String,
    key_ends: Vec<usize>,
    numbers: Vec<u8>,
    /// How many checks it applies: its answer is three numbers (24 bytes) per check.
    pub checks: usize,
}

/// Encodes `groups` (ranges of `checks`, each one descriptor) at `now_millis`.
///
/// Every number travels in one argument, as unsigned 64-bit big-endian integers the script
/// unpacks with one `struct.unpack`: as decimal arguments, each cost Redis an argument
/// object and a `strtod`, which was a third of what the script cost it.
pub fn encode(
    prefix: &str,
    checks: &[Check<'_>],
    groups: &[Range<usize>],
    now_millis: u64,
) -> Encoded {
    let group_checks = || groups.iter().filter_map(|range| checks.get(range.clone()));
    let key_count: usize = group_checks()
        .map(|group| group.len() + usize::from(has_penalty(group)))
        .sum();
    let check_count: usize = group_checks().map(<[Check<'_>]>::len).sum();
    let key_bytes: usize = group_checks()
        .flatten()
        .map(|check| prefix.len() + check.key.len() + KEY_ESCAPE_ROOM)
        .sum();
    let mut encoded = Encoded {
        keys: String::with_capacity(key_bytes + 16),
        key_ends: Vec::with_capacity(key_count),
        numbers: Vec::with_capacity(
            8 * (2 + groups.len() * NUMBERS_PER_GROUP + check_count * NUMBERS_PER_CHECK),
        ),
        checks: check_count,
    };
    for group in group_checks() {
        if let (Some(first), true) = (group.first(), has_penalty(group)) {
            push_penalty_key(&mut encoded.keys, prefix, first.key);
            encoded.key_ends.push(encoded.keys.len());
        }
        for check in group {
            push_redis_key(&mut encoded.keys, prefix, check.key);
            encoded.key_ends.push(encoded.keys.len());
        }
    }
    let numbers = &mut encoded.numbers;
    let mut push =
        |number: u64| numbers.extend_from_slice(&number.min(LARGEST_EXACT).to_be_bytes());
    push(now_millis);
    push(groups.len() as u64);
    for group in group_checks() {
        let penalty = group.first().and_then(|c| c.penalty);
        push(group.len() as u64 * 2 + u64::from(penalty.is_some()));
        if let Some(penalty) = penalty {
            push(u64::from(penalty.after_rejections));
            push(penalty.within_millis);
            push(penalty.block_millis);
            push(PenaltyState::lifetime_millis(&penalty).max(1));
        }
        for check in group {
            let limit = &check.limit;
            // A calendar window's boundaries come from the zone's rules, which Redis does
            // not have: the script is given the window's number and its reset instead.
            let calendar = limit.calendar.map(|_| limit.window_at(now_millis));
            let code = match calendar {
                Some(_) => CALENDAR_WINDOW,
                None => algorithm_code(limit.algorithm),
            };
            push(code * 2 + u64::from(check.count_rejected));
            push(u64::from(limit.requests_per_unit));
            push(calendar.map_or(limit.window_millis(), |(window, _)| window));
            push(check.hits);
            let (margin, bucket) = match limit.algorithm {
                Algorithm::SlidingWindow | Algorithm::FixedWindow => {
                    (CLOCK_SKEW_MARGIN_MILLIS, false)
                }
                Algorithm::SlidingLog => (0, false),
                Algorithm::TokenBucket | Algorithm::LeakyBucket => (0, true),
            };
            push(algorithm::state_lifetime_millis(limit, check.count_rejected).max(1) + margin);
            if bucket {
                push(u64::from(limit.burst()));
            }
            if let Some((_, reset_after_millis)) = calendar {
                push(reset_after_millis);
            }
        }
    }
    encoded
}

/// One EVALSHA applying `requests` in order (on a cluster, all in one slot).
pub fn evalsha<'a>(script: &Script, requests: impl Iterator<Item = &'a Encoded> + Clone) -> Cmd {
    let (key_count, arg_count, bytes) = requests.clone().fold((0, 0, 0), |(k, a, b), r| {
        (
            k + r.key_ends.len(),
            a + r.key_ends.len() + 1,
            b + r.keys.len() + r.numbers.len(),
        )
    });
    // Sized up front: grown argument by argument, the command's two buffers were
    // reallocated a dozen times a call, a visible share of the Redis store's CPU.
    let mut cmd = Cmd::with_capacity(3 + arg_count, bytes + 64);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(key_count);
    for request in requests.clone() {
        let mut start = 0;
        for &end in &request.key_ends {
            cmd.arg(request.keys.get(start..end).unwrap_or_default());
            start = end;
        }
    }
    for request in requests {
        cmd.arg(request.numbers.as_slice());
    }
    cmd
}

/// Splits the answer to a call of several requests into one answer per request, each
/// `checks` long (three numbers a check).
pub fn split(value: Value, checks: impl Iterator<Item = usize>) -> Result<Vec<Value>, String> {
    let Value::BulkString(bytes) = value else {
        return Err(format!(
            "the counter script answered {value:?}, not a string of packed numbers"
        ));
    };
    let mut parts = Vec::new();
    let mut start = 0;
    for count in checks {
        let end = start + count * 24;
        let Some(part) = bytes.get(start..end) else {
            return Err(format!(
                "the counter script answered {} bytes, fewer than its checks need",
                bytes.len()
            ));
        };
        parts.push(Value::BulkString(part.to_vec()));
        start = end;
    }
    if start != bytes.len() {
        return Err(format!(
            "the counter script answered {} bytes, more than its checks need",
            bytes.len()
        ));
    }
    Ok(parts)
}

fn has_penalty(group: &[Check<'_>]) -> bool {
    group.first().is_some_and(|c| c.penalty.is_some())
}

/// Writes the verdicts of one script reply (three unsigned 64-bit big-endian integers per
/// check, in one string) into `out`, at the positions of `groups`, and into `blocked`
/// whether the penalty box answered (the script's over code 2).
pub fn decode(
    value: &Value,
    groups: &[Range<usize>],
    out: &mut [Verdict],
    blocked: &mut [bool],
) -> Result<(), String> {
    let Value::BulkString(bytes) = value else {
        return Err(format!(
            "the counter script answered {value:?}, not a string of packed numbers"
        ));
    };
    let words = bytes.chunks_exact(8);
    if !words.remainder().is_empty() {
        return Err(format!(
            "the counter script answered {} bytes, not whole 8-byte numbers",
            bytes.len()
        ));
    }
    let mut numbers = words.map(|word| <[u8; 8]>::try_from(word).map_or(0, u64::from_be_bytes));
    let mut next = || {
        numbers
            .next()
            .ok_or_else(|| "the counter script answered too few numbers".to_string())
    };
    for index in groups.iter().flat_map(|r| r.clone()) {
        let (over, remaining, reset) = (next()?, next()?, next()?);
        let Some(slot) = out.get_mut(index) else {
            return Err(format!(
                "no check at {index} for the counter script's answer"
            ));
        };
        *slot = Verdict {
            over_limit: over != 0,
            remaining,
            reset_after_millis: reset,
            from_local_cache: false,
        };
        if let Some(flag) = blocked.get_mut(index) {
            *flag = over == 2;
        }
    }
    if numbers.next().is_some() {
        return Err("the counter script answered more numbers than checks".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(numbers: &[u64]) -> Value {
        Value::BulkString(numbers.iter().flat_map(|n| n.to_be_bytes()).collect())
    }

    fn verdict(over_limit: bool, remaining: u64, reset_after_millis: u64) -> Verdict {
        Verdict {
            over_limit,
            remaining,
            reset_after_millis,
            from_local_cache: false,
        }
    }

    #[test]
    fn reads_three_numbers_per_check_into_the_groups_positions() {
        let reply = packed(&[0, 4, 60_000, 2, 0, 1_500, 1, 0, 250]);
        let mut out = [verdict(false, 9, 9); 4];
        let mut blocked = [false; 4];
        decode(&reply, &[0..1, 2..4], &mut out, &mut blocked).unwrap();
        assert_eq!(
            out,
            [
                verdict(false, 4, 60_000),
                verdict(false, 9, 9),
                verdict(true, 0, 1_500),
                verdict(true, 0, 250)
            ]
        );
        assert_eq!(blocked, [false, false, true, false]);
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error_naming_it() {
        let mut out = [verdict(false, 0, 0); 2];
        let mut blocked = [false; 2];
        for (reply, expected) in [
            (packed(&[0, 4]), "too few"),
            (packed(&[0, 4, 1, 0, 4, 1, 7]), "more numbers"),
            (Value::BulkString(vec![0; 20]), "20 bytes"),
            (Value::Array(vec![Value::Int(0)]), "not a string"),
        ] {
            let error = decode(
                &reply,
                std::slice::from_ref(&(0..2)),
                &mut out,
                &mut blocked,
            )
            .unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }
}
