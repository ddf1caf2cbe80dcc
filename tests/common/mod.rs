//! Shared harness for the integration tests: every test talks to the real `meshlimit`
//! binary (and, where it matters, a real Envoy) over loopback, through these helpers.
//!
//! - `config_dir`: config directories rewritten during a test, plain or ConfigMap-style
//! - `process`: child processes with captured logs, killed when dropped
//! - `meshlimit`: the built binary, started on free ports and waited on until healthy
//! - `envoy`: Envoy from the test venv, started from a bootstrap template
//! - `http`: a minimal HTTP/1.1 client for Envoy's listener and admin endpoints
//! - `upstream`: an in-process HTTP server that echoes the requests it receives
//! - `redis`: real Redis / Valkey servers, standalone and a 3-master cluster
//! - `stack`: meshlimit, the upstream and Envoy in front of them, for end-to-end tests
//! - `tls`: a test CA issuing server and client certificates, and a raw TLS client
//! - `collector`: an OTLP trace collector that keeps the spans it receives
//! - `xds`: an xDS management server serving rate limit configs, as Envoy Gateway does
//! - `statsd`: Etsy's statsd daemon, reporting what it counted from the lines it was sent
//! - `calendar`: the coming midnight of a day in a zone, to check calendar windows against
//!
//! Each test binary compiles this module separately and uses only part of it.
#![allow(dead_code)]

pub mod calendar;
pub mod collector;
pub mod config_dir;
pub mod envoy;
pub mod http;
pub mod meshlimit;
pub mod process;
pub mod redis;
pub mod stack;
pub mod statsd;
pub mod tls;
pub mod upstream;
pub mod xds;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The crate root, where `scripts/test.sh` puts `.venv`.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A path under `tests/fixtures/`.
pub fn fixture(relative: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(relative)
}

/// A loopback address with a port nobody was listening on a moment ago.
///
/// The port is released before the caller binds it, so another process can take it in
/// between; the process helpers retry a start that fails for that reason.
pub fn free_loopback_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("read the ephemeral port")
}

/// A tool that `scripts/test.sh` installs into `.venv`: the path in `env_var` when set,
/// else `.venv/<relative>`. Panics with the way to install it when neither exists.
pub fn venv_tool(env_var: &str, relative: &str) -> PathBuf {
    let path = match std::env::var_os(env_var) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => repo_root().join(".venv").join(relative),
    };
    assert!(
        path.exists(),
        "{} not found (looked at {env_var}, then {}). Run `bash scripts/test.sh`, which \
         installs it into .venv, or point {env_var} at an existing one.",
        path.display(),
        repo_root().join(".venv").join(relative).display(),
    );
    path
}

/// Calls `probe` every 50 ms until it returns `Some`, or `None` once `timeout` has passed.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds left in the current fixed window of `window_secs`, assuming windows start at
/// multiples of the unit since the Unix epoch, as envoyproxy/ratelimit aligns them.
pub fn secs_left_in_window(window_secs: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    window_secs - now % window_secs
}

/// Sleeps into the next window when fewer than `margin_secs` are left in this one, so a
/// test that counts requests against a real clock cannot see its counter reset halfway.
pub fn avoid_window_edge(window_secs: u64, margin_secs: u64) {
    let left = secs_left_in_window(window_secs);
    if left < margin_secs {
        std::thread::sleep(Duration::from_secs(left) + Duration::from_millis(200));
    }
}

/// Like `avoid_window_edge`, to the millisecond, for windows of a few seconds: sleeps to
/// just past the start of the next `window` when less than `margin` is left in this one.
/// Windows are aligned to the Unix epoch, so a minute's edge is also the edge of every
/// window that divides a minute.
pub fn avoid_window_edge_precisely(window: Duration, margin: Duration) {
    let window_ms = window.as_millis().max(1);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    let left = Duration::from_millis((window_ms - now_ms % window_ms) as u64);
    if left < margin {
        std::thread::sleep(left + Duration::from_millis(20));
    }
}

/// A gRPC message frame as it goes on the wire: the compressed flag, a length (which a test
/// may make lie), the bytes.
pub fn grpc_frame(compressed: u8, length: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![compressed];
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}
