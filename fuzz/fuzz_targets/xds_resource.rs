//! Any bytes as an xDS `RateLimitConfig` resource, through what the xDS client does with a
//! response: decode, write out as a config file, load. It must end in a config or an error
//! naming the resource, never panic, overflow the stack or run away with memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlimit::config::LoadOptions;
use meshlimit::xds::resource::{TYPE_URL, load_snapshot};

fuzz_target!(|data: &[u8]| {
    let resource = prost_types::Any {
        type_url: TYPE_URL.to_owned(),
        value: data.to_vec(),
    };
    // The client loads on the reload thread's 8 MiB stack (meshlimit::reload).
    let loaded = meshlimit::reload::on_loader_stack(move || {
        load_snapshot(&[resource], &LoadOptions::default())
    });
    if let Some(Err(errors)) = loaded {
        assert!(errors.to_string().starts_with("xds:"), "{errors}");
    }
});
