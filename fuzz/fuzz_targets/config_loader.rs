//! Any bytes as a config file: `compile_str` must return `Ok` or errors that name a place,
//! never panic, overflow the stack or run away with memory (libFuzzer's -rss_limit_mb).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlimit::config::{LoadOptions, compile_str};

fuzz_target!(|data: &[u8]| {
    // The loader refuses a file that is not UTF-8 before parsing it (tests/hostile_input.rs
    // checks that); what remains to attack is the text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = compile_str("fuzz.yaml", text, &LoadOptions::default()) {
        assert!(!errors.is_empty(), "an Err with no errors");
        for error in errors {
            assert!(!error.message.is_empty(), "an empty message at {error}");
        }
    }
});
