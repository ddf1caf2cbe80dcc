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
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(key_count);
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

/// Writes the verdicts of one script reply into `out`, at the positions of `groups`, and
/// into `blocked` whether the penalty box answered (the script's over code 2).
pub fn decode(
    value: &Value,
    groups: &[Range<usize>],
    out: &mut [Verdict],
    blocked: &mut [bool],
) -> Result<(), String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "the counter script answered {value:?}, not an array"
        ));
    };
    let expected: usize = groups.iter().map(|r| r.len()).sum();
    if items.len() != expected * 3 {
        return Err(format!(
            "the counter script answered {} numbers for {expected} checks",
            items.len()
        ));
    }
    let mut numbers = items.chunks_exact(3);
    for index in groups.iter().flat_map(|r| r.clone()) {
        let (Some([over, remaining, reset]), Some(slot)) = (numbers.next(), out.get_mut(index))
        else {
            return Err("the counter script answered too few numbers".into());
        };
        let over = number(over)?;
        *slot = Verdict {
            over_limit: over != 0,
            remaining: number(remaining)?,
            reset_after_millis: number(reset)?,
        };
        if let Some(flag) = blocked.get_mut(index) {
            *flag = over == 2;
        }
    }
    Ok(())
}

fn number(value: &Value) -> Result<u64, String> {
    match value {
        Value::Int(n) => u64::try_from(*n).map_err(|_| format!("negative number {n}")),
        other => Err(format!("expected a number, got {other:?}")),
    }
}
