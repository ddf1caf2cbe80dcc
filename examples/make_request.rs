//! The requests bench/load.sh and bench/run.sh send, and a check that a server answers
//! them correctly.
//!
//!     cargo run --release --example make_request -- write request.bin
//!     cargo run --release --example make_request -- write --descriptors 8 --client 12 r.bin
//!     cargo run --release --example make_request -- rotate --seconds 11 request.bin
//!     cargo run --release --example make_request -- check --addr 127.0.0.1:18081 \
//!         --body request.bin --expect-limits
//!     cargo run --release --example make_request -- pace --addr 127.0.0.1:18081 \
//!         --rate 10000 --seconds 10
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
//!
//! `pace` measures latency at a given load, which h2load cannot do well: its `--rps` sends
//! each 10 ms tick's requests together, so at half of a server's maximum every request
//! queues behind a burst. `pace` is an open-loop client: request i is due at start +
//! i / rate, whatever happened to the ones before it, and its latency is counted from
//! when it was due, not from when it was sent, so a late sender shows up as latency
//! rather than hiding it. It sends the same hot/cold client pattern as `rotate`, one
//! request per slot, over several HTTP/2 connections.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
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
        #[command(flatten)]
        mix: Mix,
        #[arg(long, default_value_t = 200)]
        slot_us: u64,
        #[arg(long)]
        seconds: f64,
    },
    /// Send requests at --rate per second for --seconds (after --warmup seconds at the same
    /// rate), open loop, and print the latency percentiles counted from each request's due
    /// time. Exits 1 if any request failed or was not answered gRPC OK.
    Pace {
        #[arg(long)]
        addr: String,
        #[command(flatten)]
        pacing: Pacing,
    },
    /// Spin on one core for --seconds and count the times this thread was kept from running
    /// (two clock readings more than 0.2 ms apart): the machine's own stalls, which every
    /// latency measured on it includes. Run it pinned to the servers' core while they idle.
    Hiccups {
        #[arg(long, default_value_t = 5.0)]
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

/// Which client sends each request (or each rotated slot): `descriptors` a request, slots
/// that are not cold going to the hot clients in turn.
#[derive(clap::Args, Clone, Copy)]
struct Mix {
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
    /// The cold clients' turn starts at the Nth of them: a soak's later runs reach clients
    /// the earlier ones did not (bench/soak.sh).
    #[arg(long, default_value_t = 0)]
    cold_from: u64,
}

impl Mix {
    fn check(&self) -> Result<(), String> {
        if self.hot == 0 || self.cold == 0 || self.cold_every < 2 {
            return Err("--hot and --cold must be at least 1, --cold-every at least 2".into());
        }
        Ok(())
    }

    /// The clients of slots 1, 2, 3, ...: hot ones in turn, every `cold_every`th slot the
    /// next cold one.
    fn clients(self) -> impl Iterator<Item = u32> {
        let Mix {
            hot,
            cold,
            cold_every,
            cold_from,
            ..
        } = self;
        (1u64..).scan(0u64, move |cold_slots, slot| {
            Some(if slot % cold_every == 0 {
                *cold_slots += 1;
                hot + 1 + ((cold_from + *cold_slots - 1) % u64::from(cold)) as u32
            } else {
                1 + ((slot - *cold_slots) % u64::from(hot)) as u32
            })
        })
    }

    /// Whether `client` is one of the cold ones.
    fn is_cold(&self, client: u32) -> bool {
        client > self.hot
    }
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

/// One paced request: when it was due, how late the sender was, how long from due to
/// answer, and how it was answered.
struct Sample {
    late: Duration,
    latency: Duration,
    answer: Answer,
}

enum Answer {
    Ok,
    OverLimit,
    Failed(String),
}

#[derive(clap::Args, Clone, Copy)]
struct Pacing {
    #[command(flatten)]
    mix: Mix,
    /// Every request from client 0 (bench/load.sh's request) instead of the hot/cold
    /// pattern.
    #[arg(long)]
    one_client: bool,
    /// Requests per second, over all connections.
    #[arg(long)]
    rate: f64,
    #[arg(long)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// HTTP/2 connections; requests go to them in turn.
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

/// Sends `pacing.rate` requests a second, open loop, and summarizes the measured ones.
async fn pace(addr: &str, pacing: &Pacing) -> Result<String, String> {
    let Pacing {
        mix,
        one_client,
        rate,
        seconds,
        warmup,
        connections,
    } = *pacing;
    mix.check()?;
    // 1e7 a second is far beyond what one core sends; the bound keeps the sample vector sane.
    if !(rate > 0.0 && rate <= 1e7 && seconds > 0.0 && warmup >= 0.0 && connections > 0) {
        return Err(
            "--rate must be above 0 (at most 1e7), --seconds above 0, --warmup at least 0 and --connections at least 1"
                .into(),
        );
    }
    let mut links = Vec::with_capacity(connections);
    for _ in 0..connections {
        links.push(connect_h2(addr).await?);
    }
    let uri: http::Uri = format!("http://{addr}{RPC}")
        .parse()
        .map_err(|error| format!("bad address {addr}: {error}"))?;
    let warm = (warmup * rate) as u64;
    let total = warm + (seconds * rate) as u64;
    // Built up front, for the clients this run sends as (not every --cold client: a soak
    // names a hundred million): the sender's own work between due times is a clone and a
    // spawn.
    let order: Vec<u32> = if one_client {
        vec![0; usize::try_from(total).unwrap_or(0)]
    } else {
        mix.clients()
            .take(usize::try_from(total).unwrap_or(0))
            .collect()
    };
    let mut bodies: std::collections::HashMap<u32, Bytes> = std::collections::HashMap::new();
    for &client in &order {
        bodies
            .entry(client)
            .or_insert_with(|| Bytes::from(frame(&edge_request(mix.descriptors, client))));
    }
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(
        usize::try_from(total - warm).unwrap_or(0),
    )));
    let mut running = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let start = Instant::now() + Duration::from_millis(20);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        // A spin, not a sleep: tokio's timer counts whole milliseconds, and a thread that
        // sleeps and is woken costs more than a request at these rates. Each turn lets the
        // runtime read answers (tokio's yield) and lets any other process waiting for this
        // core run first (sched_yield: in bench/run.sh, redis-server shares it).
        while Instant::now() < due {
            std::thread::yield_now();
            tokio::task::yield_now().await;
        }
        let late = due.elapsed();
        let body = order
            .get(i as usize)
            .and_then(|client| bodies.get(client))
            .cloned()
            .unwrap_or_default();
        let connection = links[i as usize % connections].clone();
        let uri = uri.clone();
        let samples = Arc::clone(&samples);
        running.push(tokio::spawn(async move {
            let answer = match call_h2(connection, uri, body).await {
                Ok(code) if code == Code::Ok as i32 => Answer::Ok,
                Ok(code) if code == Code::OverLimit as i32 => Answer::OverLimit,
                Ok(code) => Answer::Failed(format!("overall_code {code}")),
                Err(error) => Answer::Failed(error),
            };
            let latency = due.elapsed();
            if i >= warm {
                let sample = Sample {
                    late,
                    latency,
                    answer,
                };
                samples.lock().map(|mut samples| samples.push(sample)).ok();
            }
        }));
    }
    for request in running {
        request
            .await
            .map_err(|error| format!("a request task failed: {error}"))?;
    }
    let samples = std::mem::take(
        &mut *samples
            .lock()
            .map_err(|_| "the samples' lock is poisoned")?,
    );
    summarize(&samples, seconds)
}

const RPC: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// An HTTP/2 connection (prior knowledge, as gRPC without TLS), driven by a task of its own.
async fn connect_h2(addr: &str) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| format!("cannot connect to {addr}: {error}"))?;
    tcp.set_nodelay(true)
        .map_err(|error| format!("cannot set TCP_NODELAY: {error}"))?;
    // h2 closes a connection (ENHANCE_YOUR_CALM, "too_many_data_frames") once the small
    // DATA frames it holds unread pass a budget of half the connection window. Every
    // answer is one small DATA frame, so when the answers come faster than this process's
    // tasks read them (a stall of either side), the default window's 32 KiB budget runs
    // out: in one run that closed a connection and failed a quarter of a row's requests.
    // A 4 MiB window lets a stall show up as the latency it is.
    let (send, connection) = h2::client::Builder::new()
        .initial_connection_window_size(4 << 20)
        .handshake(tcp)
        .await
        .map_err(|error| format!("HTTP/2 handshake with {addr} failed: {error}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("make_request: HTTP/2 connection closed: {error}");
        }
    });
    Ok(send)
}

/// One ShouldRateLimit call with a framed body: its overall_code, or why it failed.
async fn call_h2(
    connection: h2::client::SendRequest<Bytes>,
    uri: http::Uri,
    body: Bytes,
) -> Result<i32, String> {
    let failed = |what: &str, error: h2::Error| format!("{what}: {error}");
    let mut connection = connection
        .ready()
        .await
        .map_err(|error| failed("connection", error))?;
    let request = http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|error| format!("cannot build the request: {error}"))?;
    let (response, mut stream) = connection
        .send_request(request, false)
        .map_err(|error| failed("send", error))?;
    stream
        .send_data(body, true)
        .map_err(|error| failed("send body", error))?;
    let response = response.await.map_err(|error| failed("response", error))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status()));
    }
    // A gRPC error without a message comes as headers only.
    if let Some(status) = response.headers().get("grpc-status") {
        return Err(format!("grpc-status {status:?} in the headers"));
    }
    let mut body = response.into_body();
    let mut message = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|error| failed("body", error))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|error| failed("trailers", error))?;
    let status = trailers
        .as_ref()
        .and_then(|trailers| trailers.get("grpc-status"));
    if status.is_none_or(|status| status != "0") {
        return Err(format!("grpc-status {status:?}, not 0"));
    }
    let Some(message) = message.get(5..) else {
        return Err("the answer is shorter than the gRPC prefix".into());
    };
    RateLimitResponse::decode(message)
        .map(|response| response.overall_code)
        .map_err(|error| format!("not a RateLimitResponse: {error}"))
}

/// One line of key=value pairs (bench/run.sh reads them); an error if any request failed.
fn summarize(samples: &[Sample], seconds: f64) -> Result<String, String> {
    if samples.is_empty() {
        return Err("no request was measured; raise --rate or --seconds".into());
    }
    if let Some(failure) = samples.iter().find_map(|sample| match &sample.answer {
        Answer::Failed(why) => Some(why),
        _ => None,
    }) {
        let failed = samples
            .iter()
            .filter(|s| matches!(s.answer, Answer::Failed(_)))
            .count();
        return Err(format!(
            "{failed} of {} requests failed, the first with {failure}",
            samples.len()
        ));
    }
    let over_limit = samples
        .iter()
        .filter(|s| matches!(s.answer, Answer::OverLimit))
        .count();
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    latencies.sort_unstable();
    let at = |fraction: f64| {
        let rank = ((fraction * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1].as_secs_f64() * 1e3
    };
    // A sender more than 0.1 ms behind its schedule: the client, not the server, was busy.
    let late = samples
        .iter()
        .filter(|s| s.late > Duration::from_micros(100))
        .count();
    let worst_late = samples.iter().map(|s| s.late).max().unwrap_or_default();
    Ok(format!(
        "requests={} rate={:.1} over_limit={over_limit} failed=0 p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} sent_late={late} worst_late_ms={:.3}",
        samples.len(),
        samples.len() as f64 / seconds,
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0),
        worst_late.as_secs_f64() * 1e3,
    ))
}

/// Gaps in a busy loop over `seconds`, as key=value pairs.
fn hiccups(seconds: f64) -> String {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut last = Instant::now();
    let (mut over_1ms, mut over_5ms, mut longest, mut lost) =
        (0u32, 0u32, Duration::ZERO, Duration::ZERO);
    while last < end {
        let now = Instant::now();
        let gap = now - last;
        if gap > Duration::from_micros(200) {
            lost += gap;
            longest = longest.max(gap);
            over_1ms += u32::from(gap > Duration::from_millis(1));
            over_5ms += u32::from(gap > Duration::from_millis(5));
        }
        last = now;
    }
    format!(
        "seconds={seconds} stalls_over_1ms={over_1ms} stalls_over_5ms={over_5ms} longest_ms={:.1} lost_ms={:.1}",
        longest.as_secs_f64() * 1e3,
        lost.as_secs_f64() * 1e3
    )
}

struct Rotation {
    mix: Mix,
    slot: Duration,
    seconds: f64,
}

/// Rewrites `file` slot by slot until `stop`; returns a summary of the slots.
fn rotate(file: &Path, rotation: &Rotation, stop: &AtomicBool) -> Result<String, String> {
    use std::os::unix::fs::FileExt;
    let Rotation { mix, slot, seconds } = *rotation;
    mix.check()?;
    // Encoded up front, so a slot costs one write and no encoding on h2load's CPU.
    let bodies: Vec<Vec<u8>> = (1..=mix.hot + mix.cold)
        .map(|client| frame(&edge_request(mix.descriptors, client)))
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
    let mut clients = mix.clients();
    while std::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let Some(client) = clients.next() else { break };
        slots += 1;
        cold_slots += u64::from(mix.is_cold(client));
        out.write_all_at(&bodies[client as usize - 1], 0)
            .map_err(cannot)?;
        // A thread sleep, not tokio's timer: that one counts in whole milliseconds.
        std::thread::sleep(slot);
    }
    Ok(format!(
        "{slots} slots: {} to {} hot clients, {cold_slots} to {} distinct cold clients",
        slots - cold_slots,
        mix.hot,
        cold_slots.min(u64::from(mix.cold))
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
            mix,
            slot_us,
            seconds,
        } => {
            let rotation = Rotation {
                mix,
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
            finish(
                "rotate",
                rotated.unwrap_or_else(|error| Err(format!("the rotation failed: {error}"))),
            )
        }
        Command::Pace { addr, pacing } => finish(&addr, pace(&addr, &pacing).await),
        Command::Hiccups { seconds } => {
            println!("{}", hiccups(seconds));
            ExitCode::SUCCESS
        }
        Command::Check {
            addr,
            body,
            expect_limits,
        } => finish(&addr, check(&addr, &body, expect_limits).await),
    }
}

/// Prints a command's summary (exit 0), or its error after `context` (exit 1).
fn finish(context: &str, outcome: Result<String, String>) -> ExitCode {
    match outcome {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("make_request: {context}: {error}");
            ExitCode::FAILURE
        }
    }
}
