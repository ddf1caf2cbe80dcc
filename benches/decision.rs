//! The decision path without a socket: `RateLimiter::should_rate_limit` against the
//! in-memory store, for the descriptors an edge gateway sends (bench/config/edge.yaml).
//!
//!     cargo bench --bench decision
//!
//! Criterion prints means; the medians quoted in BENCHMARKS.md are the `median` of
//! target/criterion/<group>/<bench>/new/estimates.json.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use arc_swap::ArcSwapOption;
use criterion::{Criterion, criterion_group, criterion_main};
use meshlimit::clock::{Clock, SystemClock};
use meshlimit::config::{LoadOptions, compile_str};
use meshlimit::limiter::{LiveConfig, RateLimiter, RequestBounds};
use meshlimit::matcher::RateLimitConfig;
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use meshlimit::store::MemoryStore;

type Limiter = RateLimiter<MemoryStore, SystemClock>;

const EDGE_YAML: &str = include_str!("../bench/config/edge.yaml");
/// The server's default `--cache-capacity`.
const CAPACITY: u64 = 1_000_000;
/// The cold benchmarks rotate through this many clients, so a request's counters were last
/// touched 100k requests earlier and sit far outside the CPU caches, as on a busy gateway.
const COLD_CLIENTS: usize = 100_000;

/// Whether criterion is measuring (`cargo bench` passes `--bench`) rather than running each
/// benchmark once as `cargo test --all-targets` does. The test run only checks that the
/// benchmarks work, so it skips the large setups that make numbers meaningful.
fn measuring() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

fn cold_clients() -> usize {
    if measuring() { COLD_CLIENTS } else { 1_000 }
}

// ---------------------------------------------------------------------------------------
// Driving the decision future.

/// Runs a future that must finish on its first poll, with a waker that does nothing.
///
/// The memory store answers with `std::future::ready`, so `should_rate_limit` never
/// returns `Pending` and needs no executor: this poll is the whole cost of "awaiting" it.
/// A current-thread tokio runtime's `block_on` also works but costs more per call (see the
/// `block_on` group): it enters the runtime's thread-local context, takes the scheduler
/// core out of its slot and puts it back, and resets the coop budget — all of which a
/// future that is ready at once never needs. Neither waits, so both give the same answer.
fn poll_once<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the in-memory decision path awaited; it must finish in one poll"),
    }
}

fn decide(limiter: &Limiter, request: &RateLimitRequest) -> RateLimitResponse {
    match poll_once(limiter.should_rate_limit(request)) {
        Ok(response) => response,
        Err(error) => panic!("the benchmark request was refused: {error}"),
    }
}

// ---------------------------------------------------------------------------------------
// The limiter and the requests.

fn live_config() -> LiveConfig {
    let options = LoadOptions::default();
    let domain = compile_str("bench/config/edge.yaml", EDGE_YAML, &options)
        .unwrap_or_else(|errors| panic!("bench/config/edge.yaml does not load: {errors:?}"));
    let config = RateLimitConfig::new([domain], options.default_algorithm);
    Arc::new(ArcSwapOption::from_pointee(config))
}

/// A limiter as `meshlimit serve` builds it: default algorithm, capacity and bounds.
fn limiter() -> Limiter {
    RateLimiter::new(
        live_config(),
        MemoryStore::new(CAPACITY),
        SystemClock,
        RequestBounds::default(),
    )
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: (*key).into(),
                value: (*value).into(),
            })
            .collect(),
        ..Default::default()
    }
}

/// What an edge route's rate_limits actions send for one client: remote_address; the
/// x-user-id header as `user`; user and :path; and the login generic_key with the address.
/// Every descriptor matches a counted rule, so each costs one counter update.
fn edge_request(ip: &str, user: &str) -> RateLimitRequest {
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

/// A gateway that limits per client address only.
fn address_request(ip: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![descriptor(&[("remote_address", ip)])],
        ..Default::default()
    }
}

struct Client {
    ip: String,
    user: String,
}

/// Client `n`: a distinct IPv4 address and a UUID-shaped user id, as x-user-id usually is.
fn client(n: u64) -> Client {
    Client {
        ip: format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
        user: format!(
            "{:08x}-7d3e-4b1a-9c2f-{n:012x}",
            n.wrapping_mul(0x9e37_79b9) as u32
        ),
    }
}

/// Points the request at another client by rewriting its values in place: once the strings
/// have grown this allocates nothing, so the rotation adds only a few copies (measured on
/// its own as `decision/rotation_only`).
fn set_client(request: &mut RateLimitRequest, ip: &str, user: &str) {
    for entry in request
        .descriptors
        .iter_mut()
        .flat_map(|d| d.entries.iter_mut())
    {
        let value = match entry.key.as_str() {
            "remote_address" => ip,
            "user" => user,
            _ => continue,
        };
        entry.value.clear();
        entry.value.push_str(value);
    }
}

/// Rotates a request over a fixed set of clients whose counters already exist.
struct Rotation {
    clients: Vec<Client>,
    next: usize,
}

impl Rotation {
    fn new(count: usize) -> Self {
        Self {
            clients: (0..count as u64).map(client).collect(),
            next: 0,
        }
    }

    fn advance(&mut self, request: &mut RateLimitRequest) {
        let client = &self.clients[self.next];
        set_client(request, &client.ip, &client.user);
        self.next = (self.next + 1) % self.clients.len();
    }
}

// ---------------------------------------------------------------------------------------
// Allocation count.

/// The system allocator, counting calls while `COUNTING` is on so the benchmark can report
/// how many allocations one decision makes. Off, it costs one relaxed load per call.
struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

impl CountingAllocator {
    fn count(size: usize) {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            ALLOCATED_BYTES.fetch_add(size as u64, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded unchanged to `System`; counting touches only atomics.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocations and bytes per decision, averaged over many so the store's occasional
/// housekeeping is spread out as it is in service.
fn allocations_per_decision(limiter: &Limiter, request: &RateLimitRequest) -> (f64, f64) {
    let runs: u64 = if measuring() { 10_000 } else { 100 };
    for _ in 0..runs {
        decide(limiter, request);
    }
    ALLOCATIONS.store(0, Ordering::Relaxed);
    ALLOCATED_BYTES.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    for _ in 0..runs {
        black_box(decide(limiter, request));
    }
    COUNTING.store(false, Ordering::Relaxed);
    let per_run = |total: &AtomicU64| total.load(Ordering::Relaxed) as f64 / runs as f64;
    (per_run(&ALLOCATIONS), per_run(&ALLOCATED_BYTES))
}

fn report_allocations() {
    let hot = client(7);
    for (name, request) in [
        ("4 descriptors", edge_request(&hot.ip, &hot.user)),
        ("1 descriptor", address_request(&hot.ip)),
    ] {
        let (count, bytes) = allocations_per_decision(&limiter(), &request);
        eprintln!("allocations per decision, {name}, hot keys: {count:.1} ({bytes:.0} bytes)");
    }
}

// ---------------------------------------------------------------------------------------
// Benchmarks.

fn decision(c: &mut Criterion) {
    report_allocations();
    let mut group = c.benchmark_group("decision");
    let hot = client(7);

    let limiter_4_hot = limiter();
    let request = edge_request(&hot.ip, &hot.user);
    group.bench_function("4_descriptors/hot", |b| {
        b.iter(|| decide(&limiter_4_hot, black_box(&request)))
    });
    drop(limiter_4_hot);

    let limiter_4_cold = limiter();
    let cold = cold_clients();
    let mut rotation = Rotation::new(cold);
    let mut request = edge_request(&hot.ip, &hot.user);
    // Create every client's counters first: the cold case is a lookup, not an insert.
    for _ in 0..cold {
        rotation.advance(&mut request);
        decide(&limiter_4_cold, &request);
    }
    group.bench_function("4_descriptors/cold_100k_clients", |b| {
        b.iter(|| {
            rotation.advance(&mut request);
            decide(&limiter_4_cold, black_box(&request))
        })
    });
    drop(limiter_4_cold);

    // Every request from a client never seen before: four counters inserted per decision,
    // and once the store is full (the warm-up fills it) as many evicted.
    let limiter_4_new = limiter();
    let mut request = edge_request(&hot.ip, &hot.user);
    let (mut ip, mut user) = (String::new(), String::new());
    let mut n: u64 = 1 << 32;
    group.bench_function("4_descriptors/new_client_every_request", |b| {
        b.iter(|| {
            n += 1;
            ip.clear();
            user.clear();
            let _ = write!(ip, "10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
            let _ = write!(user, "{n:036x}");
            set_client(&mut request, &ip, &user);
            decide(&limiter_4_new, black_box(&request))
        })
    });
    drop(limiter_4_new);

    let limiter_1_hot = limiter();
    let request = address_request(&hot.ip);
    group.bench_function("1_descriptor/hot", |b| {
        b.iter(|| decide(&limiter_1_hot, black_box(&request)))
    });
    drop(limiter_1_hot);

    let limiter_1_cold = limiter();
    let mut request = address_request(&hot.ip);
    for _ in 0..cold {
        rotation.advance(&mut request);
        decide(&limiter_1_cold, &request);
    }
    group.bench_function("1_descriptor/cold_100k_clients", |b| {
        b.iter(|| {
            rotation.advance(&mut request);
            decide(&limiter_1_cold, black_box(&request))
        })
    });
    drop(limiter_1_cold);

    // What the cold benchmarks spend outside the decision.
    let mut request = edge_request(&hot.ip, &hot.user);
    group.bench_function("rotation_only", |b| {
        b.iter(|| {
            rotation.advance(&mut request);
            black_box(&request);
        })
    });
    group.finish();
}

/// The two ways to drive the decision future, on a future that is ready at once and on a
/// hot four-descriptor decision.
fn block_on(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|error| panic!("cannot build a tokio runtime: {error}"));
    let limiter = limiter();
    let hot = client(7);
    let request = edge_request(&hot.ip, &hot.user);
    let mut group = c.benchmark_group("block_on");
    group.bench_function("ready_future/noop_waker_poll", |b| {
        b.iter(|| poll_once(std::future::ready(black_box(1u64))))
    });
    group.bench_function("ready_future/tokio_current_thread", |b| {
        b.iter(|| runtime.block_on(std::future::ready(black_box(1u64))))
    });
    group.bench_function("4_descriptors_hot/noop_waker_poll", |b| {
        b.iter(|| decide(&limiter, black_box(&request)))
    });
    group.bench_function("4_descriptors_hot/tokio_current_thread", |b| {
        b.iter(|| runtime.block_on(limiter.should_rate_limit(black_box(&request))))
    });
    group.finish();
}

/// Steps of a hot four-descriptor decision that can be timed through the public API, done
/// the way `should_rate_limit` does them. (The per-function split of the whole path, store
/// included, comes from `perf`; see BENCHMARKS.md.)
fn parts(c: &mut Criterion) {
    let live = live_config();
    let hot = client(7);
    let request = edge_request(&hot.ip, &hot.user);
    let mut group = c.benchmark_group("parts");

    // `should_rate_limit` clones the Arc; the guard is arc-swap's cheaper read.
    group.bench_function("config_load_full", |b| {
        b.iter(|| black_box(live.load_full()))
    });
    group.bench_function("config_load_guard", |b| b.iter(|| black_box(live.load())));

    let config = live
        .load_full()
        .unwrap_or_else(|| panic!("the config is loaded above"));
    let domain = config
        .domain("edge")
        .unwrap_or_else(|| panic!("bench/config/edge.yaml defines domain edge"));
    group.bench_function("match_4_descriptors", |b| {
        b.iter(|| {
            for descriptor in &black_box(&request).descriptors {
                black_box(domain.lookup(&descriptor.entries));
            }
        })
    });

    group.bench_function("clock_now_millis", |b| {
        b.iter(|| black_box(SystemClock.now_millis()))
    });

    // The store's key hash, as `MemoryStore::apply_one` computes it, over a key of the
    // user-and-path descriptor's length.
    let key = format!(
        "edge|user={}|path=/api/v1/orders|minute/sliding_window",
        hot.user
    );
    group.bench_function("xxh3_128_of_one_key", |b| {
        b.iter(|| black_box(xxhash_rust::xxh3::xxh3_128(black_box(key.as_bytes()))))
    });
    group.finish();
}

criterion_group!(benches, decision, block_on, parts);
criterion_main!(benches);
