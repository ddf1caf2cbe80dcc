//! When the allocator gives freed memory back to the operating system.
//!
//! meshlimit's binaries allocate with mimalloc. By default mimalloc keeps freed memory for
//! a while (its purge delay) before giving it back, and the memory store frees large
//! blocks as it grows: every shard's table is reallocated as counters arrive. With the
//! delay, those old tables stay resident, so a live counter costs 178–185 bytes and a
//! flood of 10 M distinct keys peaks at 32–33 MiB; purging at once makes it 151 bytes and
//! 21 MiB, at no CPU cost we could measure (BENCHMARKS.md section 12).
//!
//! Only the memory store gets it. With the Redis store, whose requests allocate and free
//! more (the script's arguments, the replies) and which holds few counters in meshlimit,
//! purging at once cost 16–17 % more CPU a request in the same measurement, so it keeps
//! mimalloc's default.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay`'s place in mimalloc's `mi_option_e` (the same in the version 2
/// and version 3 sources libmimalloc-sys builds); the Rust bindings name no constant for
/// it. `tests::the_option_is_the_one_mimalloc_reads_from_its_variable` holds it to the
/// environment variable mimalloc reads into that option, so a renumbering fails a test
/// rather than silently setting some other option.
const PURGE_DELAY: mi_option_t = 15;

/// The variables mimalloc reads the purge delay from (the second is its old name).
/// mimalloc compares names without regard to case.
const PURGE_DELAY_VARIABLES: [&str; 2] = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"];

/// Has mimalloc give freed memory back at once, unless the operator chose a purge delay
/// in the environment, which then stands. Returns whether the delay was changed. Call it
/// before starting threads: mimalloc's option table is plain memory.
pub fn purge_freed_memory_at_once() -> bool {
    if operator_chose_a_purge_delay() {
        return false;
    }
    // SAFETY: `mi_option_set` stores a number into mimalloc's option table; the index is
    // in range (the tests hold it to mimalloc's own table) and any value is valid for a
    // delay.
    unsafe { mi_option_set(PURGE_DELAY, 0) };
    true
}

/// mimalloc's purge delay in milliseconds, as it will use it now.
// `c_long` is `i64` here but `i32` on other targets, where the conversion is not useless.
#[allow(clippy::useless_conversion)]
pub fn purge_delay_millis() -> i64 {
    // SAFETY: reads one entry of mimalloc's option table (initialising it from the
    // environment on first use); the index is in range.
    i64::from(unsafe { mi_option_get(PURGE_DELAY) })
}

fn operator_chose_a_purge_delay() -> bool {
    std::env::vars_os().any(|(name, _)| {
        name.to_str().is_some_and(|name| {
            PURGE_DELAY_VARIABLES
                .iter()
                .any(|variable| variable.eq_ignore_ascii_case(name))
        })
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Set only in a child of this test binary, which then checks instead of spawning; its
    /// value is the delay the first test expects the child to read.
    const CHILD: &str = "MESHLIMIT_ALLOCATOR_TEST_CHILD";

    /// Runs `test` of this module again in a child process with `variables` set, and
    /// asserts it passed. Option state is process-wide, so each case gets a process of
    /// its own.
    fn in_child(test: &str, variables: &[(&str, &str)]) {
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command
            .args([
                "--exact",
                &format!("allocator::tests::{test}"),
                "--nocapture",
            ])
            .env_remove("MIMALLOC_PURGE_DELAY")
            .env_remove("MIMALLOC_RESET_DELAY");
        for (name, value) in variables {
            command.env(name, value);
        }
        let output = command.output().expect("the test binary runs again");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "the child run of {test} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn the_option_is_the_one_mimalloc_reads_from_its_variable() {
        if let Ok(expected) = std::env::var(CHILD) {
            assert_eq!(purge_delay_millis().to_string(), expected);
            return;
        }
        in_child(
            "the_option_is_the_one_mimalloc_reads_from_its_variable",
            &[("MIMALLOC_PURGE_DELAY", "4321"), (CHILD, "4321")],
        );
    }

    #[test]
    fn purging_at_once_sets_the_delay_to_zero() {
        if std::env::var(CHILD).is_ok() {
            assert_ne!(purge_delay_millis(), 0, "mimalloc's default delay");
            assert!(purge_freed_memory_at_once());
            assert_eq!(purge_delay_millis(), 0);
            return;
        }
        in_child("purging_at_once_sets_the_delay_to_zero", &[(CHILD, "")]);
    }

    #[test]
    fn a_delay_the_operator_set_stands() {
        if std::env::var(CHILD).is_ok() {
            assert!(!purge_freed_memory_at_once());
            assert_eq!(purge_delay_millis(), 250);
            return;
        }
        // In lower case: mimalloc reads its variables without regard to case.
        in_child(
            "a_delay_the_operator_set_stands",
            &[("mimalloc_purge_delay", "250"), (CHILD, "")],
        );
    }
}
