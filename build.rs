//! Compiles meshlimit's own copies of Envoy's rate limit protos with a pure-Rust protobuf
//! compiler (protox), so building needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/envoy/service/ratelimit/v3/rls.proto",
    // Messages only: the xDS config source's (src/xds/).
    "proto/envoy/service/discovery/v3/discovery.proto",
    "proto/ratelimit/config/ratelimit/v3/rls_conf.proto",
];
/// OTLP's trace export, which meshlimit calls as a client (src/trace/export.rs).
const OTLP_PROTOS: &[&str] = &["proto/opentelemetry/proto/collector/trace/v1/trace_service.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // The encoded descriptor set also feeds gRPC reflection at run time.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("meshlimit_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // tonic's prost codec with buffers sized for our messages (src/codec.rs).
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    // Messages only, kept out of the reflection set: spans are written by hand
    // (src/trace/encode.rs) and these types read the collector's answer and check the
    // encoder in its tests.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(protox::compile(OTLP_PROTOS, ["proto"])?)?;
    Ok(())
}
