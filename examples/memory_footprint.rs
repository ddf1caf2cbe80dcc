//! What counters cost in memory: resident memory per live counter in the in-memory store,
//! and proof that a full store stays bounded under a flood of distinct keys. Also what
//! `--memory-snapshot` costs for those counters: the file's size, and the time to write
//! it and read it back.
//!
//!     cargo run --release --example memory_footprint
//!
//! Each measurement runs in a fresh child process (this program re-run with a mode), so
//! memory freed by one cannot be reused by the next and hide its cost. Counters are made
//! the way the server makes them: one-descriptor requests through `RateLimiter`, each with
//! a value never seen before, so each creates exactly one counter.

use std::fmt::Write as _;
use std::pin::pin;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use arc_swap::ArcSwapOption;
use meshlimit::clock::SystemClock;
use meshlimit::config::{LoadOptions, compile_str};
use meshlimit::limiter::{RateLimiter, RequestBounds};
use meshlimit::matcher::RateLimitConfig;
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use meshlimit::store::MemoryStore;

/// The allocator `meshlimit serve` uses, set as it sets it, so the footprint is the shipped
/// binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Live counters in the footprint measurement: the server's default `--cache-capacity`.
const COUNTERS: u64 = 1_000_000;
/// The flood: a store a tenth of that size, sent ten million distinct keys.
const FLOOD_CAPACITY: u64 = 100_000;
const FLOOD_KEYS: u64 = 10_000_000;
/// The memory target for one live counter.
const TARGET_BYTES_PER_COUNTER: u64 = 200;

type Limiter = RateLimiter<MemoryStore, SystemClock>;

/// One rule, one counter per distinct `user` value, counted per minute.
fn limiter(algorithm: &str, capacity: u64) -> Limiter {
    let yaml = format!(
        "domain: footprint\n\
         descriptors:\n\
         \x20 - key: user\n\
         \x20   rate_limit:\n\
         \x20     unit: minute\n\
         \x20     requests_per_unit: 1000\n\
         \x20     algorithm: {algorithm}\n"
    );
    let options = LoadOptions::default();
    let domain = compile_str("memory_footprint.yaml", &yaml, &options)
        .unwrap_or_else(|errors| panic!("the footprint config does not load: {errors:?}"));
    let config = RateLimitConfig::new([domain], options.default_algorithm);
    RateLimiter::new(
        Arc::new(ArcSwapOption::from_pointee(config)),
        MemoryStore::new(capacity),
        SystemClock,
        RequestBounds::default(),
    )
}

/// Sends one request per key `first..end`, each creating (or finding) one counter.
struct Sender {
    request: RateLimitRequest,
}

impl Sender {
    fn new() -> Self {
        Self {
            request: RateLimitRequest {
                domain: "footprint".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: vec![Entry {
                        key: "user".into(),
                        value: String::with_capacity(32),
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    fn send(&mut self, limiter: &Limiter, keys: std::ops::Range<u64>) {
        for n in keys {
            let value = &mut self.request.descriptors[0].entries[0].value;
            value.clear();
            let _ = write!(value, "user-{n:010}");
            // The memory store is ready at once, so one poll with a do-nothing waker
            // completes the decision (see benches/decision.rs).
            let mut decision = pin!(limiter.should_rate_limit(&self.request));
            match decision
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
            {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => panic!("the request was refused: {error}"),
                Poll::Pending => panic!("the in-memory decision path awaited"),
            }
        }
    }
}

/// A field of /proc/self/status in bytes, e.g. `VmRSS` (resident now) or `VmHWM` (peak).
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_else(|error| panic!("cannot read /proc/self/status (Linux only): {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("/proc/self/status has no {field} line"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `COUNTERS` live counters in a store that can hold them all.
fn counters(algorithm: &str) -> bool {
    let mut sender = Sender::new();
    let baseline = proc_status_bytes("VmRSS");
    let limiter = limiter(algorithm, COUNTERS);
    sender.send(&limiter, 0..COUNTERS);
    let live = limiter.store().len();
    let used = proc_status_bytes("VmRSS").saturating_sub(baseline);
    let per_counter = used / live.max(1);
    let verdict = if per_counter <= TARGET_BYTES_PER_COUNTER {
        "meets"
    } else {
        "misses"
    };
    println!(
        "{algorithm}, minute: {live} live counters, RSS +{} over a {} baseline = {per_counter} B per counter ({verdict} the {TARGET_BYTES_PER_COUNTER} B target)",
        mib(used),
        mib(baseline)
    );
    snapshot(limiter.store()) && live == COUNTERS
}

/// Saves `store` as `--memory-snapshot` does and reads it back, timing both, in the temp
/// directory (`TMPDIR`: point it at a disk to include the disk's time).
fn snapshot(store: &MemoryStore) -> bool {
    use meshlimit::clock::Clock;
    let path = std::env::temp_dir().join(format!("meshlimit-footprint-{}", std::process::id()));
    let now = SystemClock.now_millis();
    let started = std::time::Instant::now();
    let saved = store.save_snapshot(&path, now);
    let save_took = started.elapsed();
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let started = std::time::Instant::now();
    let loaded = MemoryStore::load_snapshot(COUNTERS, &path, now);
    let load_took = started.elapsed();
    let _ = std::fs::remove_file(&path);
    match (saved, loaded) {
        (Ok(saved), Ok((_, restored))) => {
            println!(
                "  snapshot: {saved} counters in {} ({} B each), written in {save_took:.0?}, read back in {load_took:.0?} ({} restored)",
                mib(size),
                size / saved.max(1),
                restored.counters
            );
            restored.counters == saved
        }
        (saved, loaded) => {
            eprintln!("snapshot failed: {:?} / {:?}", saved.err(), loaded.err());
            false
        }
    }
}

/// `FLOOD_KEYS` distinct keys into a store of `FLOOD_CAPACITY`: entries and memory must
/// level off, not grow with the flood.
fn flood() -> bool {
    let mut sender = Sender::new();
    let baseline = proc_status_bytes("VmRSS");
    let limiter = limiter("sliding_window", FLOOD_CAPACITY);
    let step = FLOOD_KEYS / 10;
    let mut bounded = true;
    for first in (0..FLOOD_KEYS).step_by(step as usize) {
        sender.send(&limiter, first..first + step);
        let live = limiter.store().len();
        bounded &= live <= FLOOD_CAPACITY;
        println!(
            "flood: {:>8} keys sent, {live:>6} counters held (capacity {FLOOD_CAPACITY}), RSS +{}",
            first + step,
            mib(proc_status_bytes("VmRSS").saturating_sub(baseline))
        );
    }
    println!(
        "flood: peak RSS {} (VmHWM), baseline {}",
        mib(proc_status_bytes("VmHWM")),
        mib(baseline)
    );
    bounded
}

/// Runs each measurement in its own process and reports whether all held.
fn run_all() -> bool {
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(error) => {
            eprintln!("memory_footprint: cannot find my own executable: {error}");
            return false;
        }
    };
    let mut ok = true;
    for mode in [
        ["counters", "sliding_window"],
        ["counters", "fixed_window"],
        ["flood", ""],
    ] {
        let args = mode.iter().filter(|arg| !arg.is_empty());
        match Command::new(&program).args(args).status() {
            Ok(status) => ok &= status.success(),
            Err(error) => {
                eprintln!("memory_footprint: cannot run {}: {error}", mode.join(" "));
                ok = false;
            }
        }
    }
    ok
}

fn main() -> ExitCode {
    // As `meshlimit serve --store memory` does (an operator's MIMALLOC_PURGE_DELAY wins).
    meshlimit::allocator::purge_freed_memory_at_once();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ok = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => run_all(),
        ["counters", algorithm] => counters(algorithm),
        ["flood"] => flood(),
        _ => {
            eprintln!("usage: memory_footprint [counters sliding_window|fixed_window | flood]");
            false
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
