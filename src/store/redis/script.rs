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

/// Arguments each check adds: algorithm, limit, window, burst, hits, count_rejected and
/// lifetime.
const ARGS_PER_CHECK: usize = 7;
/// Room for the hash tag's braces and a few escapes per key.
const KEY_ESCAPE_ROOM: usize = 8;

pub fn counter_script() -> Script {
    Script::new(SOURCE)
}

/// One EVALSHA applying `groups` (ranges of `checks`, each one descriptor) at `now_millis`.
pub fn evalsha(
    script: &Script,
    prefix: &str,
    checks: &[Check<'_>],
    groups: &[Range<usize>],
    now_millis: u64,
) -> Cmd {
    let group_checks = || groups.iter().filter_map(|range| checks.get(range.clone()));
    let key_count: usize = group_checks()
        .map(|group| group.len() + usize::from(has_penalty(group)))
        .sum();
    // Sized up front: grown argument by argument, the command's two buffers were
    // reallocated a dozen times a call, a visible share of the Redis store's CPU.
    let check_count: usize = group_checks().map(<[Check<'_>]>::len).sum();
    let key_bytes: usize = group_checks()
        .flatten()
        .map(|check| prefix.len() + check.key.len() + KEY_ESCAPE_ROOM)
        .sum();
    let arg_count = 4 + key_count + groups.len() * 6 + check_count * ARGS_PER_CHECK;
    let mut cmd = Cmd::with_capacity(arg_count, key_bytes + arg_count * 8 + 64);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(key_count);
    let mut key = String::with_capacity(96);
    for group in group_checks() {
        if let (Some(first), true) = (group.first(), has_penalty(group)) {
            key.clear();
            push_penalty_key(&mut key, prefix, first.key);
            cmd.arg(&key);
        }
        for check in group {
            key.clear();
            push_redis_key(&mut key, prefix, check.key);
            cmd.arg(&key);
        }
    }
    cmd.arg(now_millis).arg(groups.len());
    for group in group_checks() {
        cmd.arg(group.len());
        match group.first().and_then(|c| c.penalty) {
            Some(penalty) => {
                cmd.arg(1)
                    .arg(penalty.after_rejections)
                    .arg(penalty.within_millis)
                    .arg(penalty.block_millis)
                    .arg(PenaltyState::lifetime_millis(&penalty).max(1));
            }
            None => {
                cmd.arg(0);
            }
        }
        for check in group {
            let limit = &check.limit;
            cmd.arg(match limit.algorithm {
                Algorithm::SlidingWindow => "s",
                Algorithm::FixedWindow => "f",
                Algorithm::TokenBucket => "t",
                Algorithm::SlidingLog => "l",
                Algorithm::LeakyBucket => "k",
            })
            .arg(limit.requests_per_unit)
            .arg(limit.window_millis())
            .arg(limit.burst())
            .arg(check.hits)
            .arg(u8::from(check.count_rejected))
            .arg(algorithm::state_lifetime_millis(limit).max(1));
        }
    }
    cmd
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
