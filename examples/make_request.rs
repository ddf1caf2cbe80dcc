//! The request bench/load.sh sends, and a check that a server answers it correctly.
//!
//!     cargo run --release --example make_request -- write request.bin
//!     cargo run --release --example make_request -- check --addr 127.0.0.1:18081 \
//!         --body request.bin --expect-limits
//!
//! `write` stores one gRPC message as it travels in an HTTP/2 DATA frame: a 5-byte prefix
//! (compressed flag 0, big-endian length) and the protobuf `RateLimitRequest`, which is the
//! body h2load posts for every request. `check` decodes that same file, sends it through a
//! real gRPC client and checks the answer, so the load test measures answers that are
//! right and not just HTTP 200s (a gRPC error also travels as HTTP 200).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use prost::Message;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Writes the load test's gRPC request body, or checks a server's answer to it")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the gRPC-framed request body.
    Write { file: PathBuf },
    /// Send the request in FILE to a server and check it answers gRPC OK, overall OK, with
    /// one OK status per descriptor.
    Check {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        body: PathBuf,
        /// Also require every status to name its limit: every descriptor was matched and
        /// counted, not waved through for want of a rule.
        #[arg(long)]
        expect_limits: bool,
    },
}

/// What an edge route's rate_limits actions send for one client (see bench/config/edge.yaml):
/// remote_address; x-user-id as `user`; user and :path; the login generic_key and address.
fn edge_request() -> RateLimitRequest {
    let ip = "203.0.113.7";
    let user = "5f0c6a2e-7d3e-4b1a-9c2f-0000000000a7";
    let descriptor = |entries: &[(&str, &str)]| RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: (*key).into(),
                value: (*value).into(),
            })
            .collect(),
        ..Default::default()
    };
    RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![
            descriptor(&[("remote_address", ip)]),
            descriptor(&[("user", user)]),
            descriptor(&[("user", user), ("path", "/api/v1/orders")]),
            descriptor(&[("generic_key", "login"), ("remote_address", ip)]),
        ],
        ..Default::default()
    }
}

/// The gRPC length-prefixed message: flag 0 (not compressed), then the length in 4 bytes.
fn frame(request: &RateLimitRequest) -> Vec<u8> {
    let message = request.encode_to_vec();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    body
}

fn unframe(body: &[u8]) -> Result<RateLimitRequest, String> {
    let Some((prefix, message)) = body.split_at_checked(5) else {
        return Err(format!(
            "{} bytes is shorter than the 5-byte gRPC prefix",
            body.len()
        ));
    };
    if prefix[0] != 0 {
        return Err("the compressed flag is set; the body must be an uncompressed message".into());
    }
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if length != message.len() {
        return Err(format!(
            "the prefix says {length} bytes but {} follow",
            message.len()
        ));
    }
    RateLimitRequest::decode(message).map_err(|error| format!("not a RateLimitRequest: {error}"))
}

async fn check(addr: &str, body: &Path, expect_limits: bool) -> Result<String, String> {
    let bytes =
        std::fs::read(body).map_err(|error| format!("cannot read {}: {error}", body.display()))?;
    let request = unframe(&bytes).map_err(|error| format!("{}: {error}", body.display()))?;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .map_err(|error| format!("bad address {addr}: {error}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|error| format!("cannot connect to {addr}: {error}"))?;
    let response = RateLimitServiceClient::new(channel)
        .should_rate_limit(request.clone())
        .await
        .map_err(|status| {
            format!(
                "grpc-status {} ({:?}): {}",
                status.code() as i32,
                status.code(),
                status.message()
            )
        })?
        .into_inner();
    if response.overall_code != Code::Ok as i32 {
        return Err(format!(
            "overall_code is {}, not OK: {response:?}",
            response.overall_code
        ));
    }
    if response.statuses.len() != request.descriptors.len() {
        return Err(format!(
            "{} statuses for {} descriptors",
            response.statuses.len(),
            request.descriptors.len()
        ));
    }
    let mut described = Vec::new();
    for (i, status) in response.statuses.iter().enumerate() {
        if status.code != Code::Ok as i32 {
            return Err(format!(
                "descriptor {i} answered code {}, not OK",
                status.code
            ));
        }
        match &status.current_limit {
            Some(limit) => described.push(format!(
                "OK ({} left of {})",
                status.limit_remaining, limit.requests_per_unit
            )),
            None if expect_limits => {
                return Err(format!(
                    "descriptor {i} matched no limit; check bench/config"
                ));
            }
            None => described.push("OK".into()),
        }
    }
    Ok(format!(
        "grpc-status 0 (OK), overall_code OK, statuses: {}",
        described.join(", ")
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Write { file } => match std::fs::write(&file, frame(&edge_request())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("make_request: cannot write {}: {error}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::Check {
            addr,
            body,
            expect_limits,
        } => match check(&addr, &body, expect_limits).await {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("make_request: {addr}: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
