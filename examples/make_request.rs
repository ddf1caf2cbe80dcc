//! The requests bench/load.sh and bench/run.sh send, and a check that a server answers
//! them correctly.
//!
//!     cargo run --release --example make_request -- write request.bin
//!     cargo run --release --example make_request -- write --descriptors 8 --client 12 r.bin
//!     cargo run --release --example make_request -- rotate --seconds 11 request.bin
//!     cargo run --release --example make_request -- check --addr 127.0.0.1:18081 \
//!         --body request.bin --expect-limits
//!
//! `write` stores one gRPC message as it travels in an HTTP/2 DATA frame: a 5-byte prefix
//! (compressed flag 0, big-endian length) and the protobuf `RateLimitRequest`, which is the
//! body h2load posts for every request. `check` decodes that same file, sends it through a
//! real gRPC client and checks the answer, so the load test measures answers that are
//! right and not just HTTP 200s (a gRPC error also travels as HTTP 200).
//!
//! `rotate` gives h2load a key mix. h2load posts one file for every request, but reads it
//! (`pread`) as each request is sent, so rewriting the file in place changes which client
//! the next requests come from. `rotate` rewrites it every `--slot-us` microseconds, in
//! a fixed pattern: most slots go to a few hot clients in turn, every `--cold-every`th to
//! the next of many cold clients. All the bodies have the same length and layout, so a
//! read that overlaps a rewrite still posts a valid request, only of a mixed client.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use prost::Message;
use tokio::signal::unix::{SignalKind, signal};
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
    Write {
        file: PathBuf,
        /// Descriptors in the request: 1, 4 or 8 (see `edge_request`).
        #[arg(long, default_value_t = 4, value_parser = descriptor_count)]
        descriptors: usize,
        /// Which client sends it: its address and user id, and so its counters. Client 0
        /// is the one bench/load.sh has always sent.
        #[arg(long, default_value_t = 0)]
        client: u32,
    },
    /// Rewrite FILE in place with a hot/cold mix of clients until --seconds have passed or
    /// SIGTERM arrives, then print how the slots went.
    Rotate {
        file: PathBuf,
        #[arg(long, default_value_t = 4, value_parser = descriptor_count)]
        descriptors: usize,
        /// Clients 1..=HOT take the slots that are not cold, in turn.
        #[arg(long, default_value_t = 2)]
        hot: u32,
        /// The next COLD clients after the hot ones take every --cold-every'th slot, in
        /// turn, so each comes back once in COLD cold slots.
        #[arg(long, default_value_t = 2000)]
        cold: u32,
        #[arg(long, default_value_t = 5)]
        cold_every: u64,
        #[arg(long, default_value_t = 200)]
        slot_us: u64,
        #[arg(long)]
        seconds: f64,
    },
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

fn descriptor_count(text: &str) -> Result<usize, String> {
    text.parse()
        .ok()
        .filter(|count| matches!(count, 1 | 4 | 8))
        .ok_or_else(|| format!("{text}: the requests have 1, 4 or 8 descriptors"))
}

/// What an edge route's rate_limits actions send for one client (see bench/config/edge.yaml),
/// every descriptor matched by a limit:
/// - 1: remote_address (the classic per-address limit);
/// - 4: remote_address; x-user-id as `user`; user and :path; the login generic_key and
///   address (what Envoy sends with bench/envoy/bootstrap.yaml);
/// - 8: those four, the user's plan, the user on the hourly fixed-window export path, and
///   the user on two more paths: a route with many rate_limits entries.
///
/// Client 0 is 203.0.113.7 with user ...00a7, as bench/load.sh has always sent; client
/// N > 0 has an address and user of its own, always as many bytes long (10.1xx.1xx.1xx),
/// so `rotate` can swap one client's body for another's in place.
fn edge_request(descriptors: usize, client: u32) -> RateLimitRequest {
    let ip = match client {
        0 => "203.0.113.7".to_owned(),
        n => {
            let octet = |i: u32| 100 + (n / 156u32.pow(i)) % 156;
            format!("10.{}.{}.{}", octet(2), octet(1), octet(0))
        }
    };
    let user = format!("5f0c6a2e-7d3e-4b1a-9c2f-{:012x}", 0xa7 + u64::from(client));
    let (ip, user) = (ip.as_str(), user.as_str());
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
    let all = [
        descriptor(&[("remote_address", ip)]),
        descriptor(&[("user", user)]),
        descriptor(&[("user", user), ("path", "/api/v1/orders")]),
        descriptor(&[("generic_key", "login"), ("remote_address", ip)]),
        descriptor(&[("plan", "free"), ("user", user)]),
        descriptor(&[("user", user), ("path", "/reports/export")]),
        descriptor(&[("user", user), ("path", "/api/v1/invoices")]),
        descriptor(&[("user", user), ("path", "/api/v1/customers")]),
    ];
    RateLimitRequest {
        domain: "edge".into(),
        descriptors: all.into_iter().take(descriptors).collect(),
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

struct Rotation {
    descriptors: usize,
    hot: u32,
    cold: u32,
    cold_every: u64,
    slot: Duration,
    seconds: f64,
}

/// Rewrites `file` slot by slot until `stop`; returns a summary of the slots.
fn rotate(file: &Path, rotation: &Rotation, stop: &AtomicBool) -> Result<String, String> {
    use std::os::unix::fs::FileExt;
    let Rotation {
        descriptors,
        hot,
        cold,
        cold_every,
        slot,
        seconds,
    } = *rotation;
    if hot == 0 || cold == 0 || cold_every < 2 {
        return Err("--hot and --cold must be at least 1, --cold-every at least 2".into());
    }
    // Encoded up front, so a slot costs one write and no encoding on h2load's CPU.
    let bodies: Vec<Vec<u8>> = (1..=hot + cold)
        .map(|client| frame(&edge_request(descriptors, client)))
        .collect();
    if bodies.iter().any(|body| body.len() != bodies[0].len()) {
        return Err("the clients' bodies differ in length; h2load would post torn requests".into());
    }
    let cannot = |error: std::io::Error| format!("cannot write {}: {error}", file.display());
    // Never truncated: h2load may already be reading the file, and a read of a truncated
    // file is a failed request. A new file gets its whole first body in one write.
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .map_err(cannot)?;
    let length = out.metadata().map_err(cannot)?.len();
    if length == 0 {
        out.write_all_at(&bodies[0], 0).map_err(cannot)?;
    } else if length != bodies[0].len() as u64 {
        return Err(format!(
            "{} holds {length} bytes; the rotated bodies are {} (write one with `write` first)",
            file.display(),
            bodies[0].len()
        ));
    }
    let end = std::time::Instant::now() + Duration::from_secs_f64(seconds);
    let (mut slots, mut cold_slots) = (0u64, 0u64);
    while std::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        slots += 1;
        let client = if slots % cold_every == 0 {
            cold_slots += 1;
            hot + 1 + ((cold_slots - 1) % u64::from(cold)) as u32
        } else {
            1 + ((slots - cold_slots) % u64::from(hot)) as u32
        };
        out.write_all_at(&bodies[client as usize - 1], 0)
            .map_err(cannot)?;
        // A thread sleep, not tokio's timer: that one counts in whole milliseconds.
        std::thread::sleep(slot);
    }
    Ok(format!(
        "{slots} slots: {} to {hot} hot clients, {cold_slots} to {} distinct cold clients",
        slots - cold_slots,
        cold_slots.min(u64::from(cold))
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Write {
            file,
            descriptors,
            client,
        } => match std::fs::write(&file, frame(&edge_request(descriptors, client))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("make_request: cannot write {}: {error}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::Rotate {
            file,
            descriptors,
            hot,
            cold,
            cold_every,
            slot_us,
            seconds,
        } => {
            let rotation = Rotation {
                descriptors,
                hot,
                cold,
                cold_every,
                slot: Duration::from_micros(slot_us),
                seconds,
            };
            // bench/run.sh stops the rotator with SIGTERM when h2load is done; the slots
            // are counted up to then.
            let stop = Arc::new(AtomicBool::new(false));
            let mut terminate = match signal(SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(error) => {
                    eprintln!("make_request: cannot handle SIGTERM: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let flag = Arc::clone(&stop);
            tokio::spawn(async move {
                terminate.recv().await;
                flag.store(true, Ordering::Relaxed);
            });
            let rotated =
                tokio::task::spawn_blocking(move || rotate(&file, &rotation, &stop)).await;
            match rotated.unwrap_or_else(|error| Err(format!("the rotation failed: {error}"))) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("make_request: {error}");
                    ExitCode::FAILURE
                }
            }
        }
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
