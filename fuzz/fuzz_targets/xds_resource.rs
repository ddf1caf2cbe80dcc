//! Any bytes as an xDS `RateLimitConfig` resource, through what the xDS client does with a
//! response: decode, write out as a config file, load. It must end in a config or an error
//! naming the resource, never panic, overflow the stack or run away with memory.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use meshlimit::config::{LoadOptions, load_texts};
use meshlimit::xds::resource::{TYPE_URL, decode};

fuzz_target!(|data: &[u8]| {
    let resource = prost_types::Any {
        type_url: TYPE_URL.to_owned(),
        value: data.to_vec(),
    };
    let Ok((label, text)) = decode(0, &resource) else {
        return;
    };
    // The client compiles on the reload thread's 8 MiB stack (meshlimit::reload).
    let loaded = meshlimit::reload::on_loader_stack(move || {
        load_texts([(Arc::<str>::from(label), Ok(text))], &LoadOptions::default())
    });
    if let Some(Err(errors)) = loaded {
        assert!(errors.to_string().contains("xds:"), "{errors}");
    }
});
