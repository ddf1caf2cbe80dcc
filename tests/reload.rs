//! Hot reload against the real binary: the config directory changes under a running
//! meshlimit — a Kubernetes ConfigMap swap, a plain write, a broken file, a SIGHUP — while
//! a client keeps asking. No request may fail, every answer comes from the old config or
//! the new one, and a broken file leaves the old one serving.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::avoid_window_edge;
use common::config_dir::{self, ConfigMapDir};
use common::meshlimit::Meshlimit;
use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_response::Code;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How often the server looks at the config directory in these tests.
const WATCH_INTERVAL: &str = "200ms";
/// How long a change may take to be served. It usually takes one or two watch intervals;
/// the rest is margin for a 2-core machine busy compiling.
const TAKES_EFFECT_WITHIN: Duration = Duration::from_secs(10);
/// Bounds on the background client, whatever happens to the test driving it.
const LOAD_MAX_REQUESTS: u64 = 20_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(30);
/// The background client's pause between requests: continuous traffic (a few hundred
/// requests a second) without starving the server of the machine's two cores.
const LOAD_PAUSE: Duration = Duration::from_millis(2);

const SUCCESS: &str = "ratelimit_service_config_load_success";
const ERROR: &str = "ratelimit_service_config_load_error";

/// Domain `edge` with one rule, [user] at `requests_per_unit` a minute. The limits are far
/// above what the background client sends, so its answers are OK; only the reported
/// `current_limit` tells the configs apart.
fn edge_per_minute(requests_per_unit: u32) -> String {
    format!(
        "domain: edge\n\
         descriptors:\n\
         \x20 - key: user\n\
         \x20   rate_limit:\n\
         \x20     unit: minute\n\
         \x20     requests_per_unit: {requests_per_unit}\n"
    )
}

/// Domain `edge` with [user] as a token bucket of `requests_per_unit` an hour: a new token
/// every few minutes at most, so the counts a test reads cannot refill under it.
fn edge_bucket_per_hour(requests_per_unit: u32) -> String {
    format!(
        "domain: edge\n\
         descriptors:\n\
         \x20 - key: user\n\
         \x20   rate_limit:\n\
         \x20     unit: hour\n\
         \x20     requests_per_unit: {requests_per_unit}\n\
         \x20     algorithm: token_bucket\n"
    )
}

fn start_watching(dir: &Path, interval: &str) -> Meshlimit {
    Meshlimit::start_with(dir, &["--watch-interval", interval])
}

fn request(descriptors: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "edge".into(),
        descriptors: descriptors
            .iter()
            .map(|(key, value)| RateLimitDescriptor {
                entries: vec![Entry {
                    key: (*key).into(),
                    value: (*value).into(),
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

async fn ask(server: &Meshlimit, descriptors: &[(&str, &str)]) -> RateLimitResponse {
    let mut client = server.client().await;
    match client.should_rate_limit(request(descriptors)).await {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("{descriptors:?} failed: {status}\n{}", server.logs()),
    }
}

/// Per descriptor: (code, requests_per_unit of the limit that applied, remaining).
fn decisions(response: &RateLimitResponse) -> Vec<(Code, Option<u32>, u32)> {
    response
        .statuses
        .iter()
        .map(|status| {
            (
                status.code(),
                status.current_limit.as_ref().map(|l| l.requests_per_unit),
                status.limit_remaining,
            )
        })
        .collect()
}

/// Awaits `probe` every 50 ms until it returns `Some`; panics after `TAKES_EFFECT_WITHIN`
/// with `what` and the server's logs.
async fn eventually<T, F, Fut>(server: &Meshlimit, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + TAKES_EFFECT_WITHIN;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {TAKES_EFFECT_WITHIN:?}\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/metrics` shows `value` for the counter `name`.
async fn wait_for_metric(server: &Meshlimit, name: &str, value: u64) {
    eventually(server, &format!("{name} reaching {value}"), || async {
        (server.metric(name) == value).then_some(())
    })
    .await;
}

/// A client on its own task sending `ShouldRateLimit` for [user=load] back to back until
/// stopped, remembering every failure and the limit each answer reported.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    /// `requests_per_unit` of the latest answer; 0 before the first or without a limit.
    latest_limit: Arc<AtomicU32>,
    task: JoinHandle<LoadReport>,
}

#[derive(Debug)]
struct LoadReport {
    answered: u64,
    /// Transport errors, gRPC errors and answers that were neither OK nor OVER_LIMIT.
    failures: Vec<String>,
    /// The limit of each answer in order, with repeats collapsed: one entry per config
    /// that served the client.
    limits_seen: Vec<Option<u32>>,
}

impl Load {
    async fn start(server: &Meshlimit) -> Load {
        let client = server.client().await;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let latest_limit = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn(run_load(
            client,
            stop.clone(),
            answered.clone(),
            latest_limit.clone(),
        ));
        Load {
            stop,
            answered,
            latest_limit,
            task,
        }
    }

    /// Waits until an answer reports `limit`: the config that has it is serving.
    async fn wait_for_limit(&self, server: &Meshlimit, limit: u32) {
        let latest = &self.latest_limit;
        eventually(
            server,
            &format!("an answer with requests_per_unit {limit}"),
            || async { (latest.load(Ordering::SeqCst) == limit).then_some(()) },
        )
        .await;
    }

    /// Waits for `count` more answers, so the config being served has seen traffic.
    async fn wait_for_answers(&self, server: &Meshlimit, count: u64) {
        let target = self.answered.load(Ordering::SeqCst) + count;
        let answered = &self.answered;
        eventually(server, &format!("{count} more answers"), || async {
            (answered.load(Ordering::SeqCst) >= target).then_some(())
        })
        .await;
    }

    async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the load task panicked")
    }
}

async fn run_load(
    mut client: RateLimitServiceClient<Channel>,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    latest_limit: Arc<AtomicU32>,
) -> LoadReport {
    let started = Instant::now();
    let mut report = LoadReport {
        answered: 0,
        failures: Vec::new(),
        limits_seen: Vec::new(),
    };
    for sent in 0..LOAD_MAX_REQUESTS {
        if stop.load(Ordering::SeqCst) || started.elapsed() > LOAD_MAX_TIME {
            break;
        }
        match client.should_rate_limit(request(&[("user", "load")])).await {
            Ok(response) => {
                let response = response.into_inner();
                let code = response.overall_code();
                if !matches!(code, Code::Ok | Code::OverLimit) {
                    report.failures.push(format!(
                        "request {sent}: overall code {code:?}: {response:?}"
                    ));
                }
                let limit = response
                    .statuses
                    .first()
                    .and_then(|status| status.current_limit.as_ref())
                    .map(|limit| limit.requests_per_unit);
                if report.limits_seen.last() != Some(&limit) {
                    report.limits_seen.push(limit);
                }
                latest_limit.store(limit.unwrap_or(0), Ordering::SeqCst);
                report.answered += 1;
                answered.fetch_add(1, Ordering::SeqCst);
            }
            Err(status) => report.failures.push(format!("request {sent}: {status}")),
        }
        tokio::time::sleep(LOAD_PAUSE).await;
    }
    report
}

impl LoadReport {
    /// No request failed, and the answers came from exactly `configs`, in that order: the
    /// old config until the swap and the new one after it, never a mix, never a gap.
    fn assert_clean(&self, server: &Meshlimit, configs: &[u32]) {
        assert!(
            self.failures.is_empty(),
            "{} of {} requests failed during the reload:\n{}\n{}",
            self.failures.len(),
            self.answered + self.failures.len() as u64,
            self.failures.join("\n"),
            server.logs()
        );
        let expected: Vec<Option<u32>> = configs.iter().copied().map(Some).collect();
        assert_eq!(
            self.limits_seen,
            expected,
            "limits reported over {} answers\n{}",
            self.answered,
            server.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_under_load_changes_the_limit_without_a_failed_request() {
    let mut config_map = ConfigMapDir::new(&[("edge.yaml", &edge_per_minute(1000))]);
    let server = start_watching(config_map.path(), WATCH_INTERVAL);
    let load = Load::start(&server).await;
    load.wait_for_limit(&server, 1000).await;

    // Two swaps, each while requests are flowing, as the kubelet makes them.
    for limit in [2000, 3000] {
        load.wait_for_answers(&server, 20).await;
        config_map.update(&[("edge.yaml", &edge_per_minute(limit))]);
        load.wait_for_limit(&server, limit).await;
    }
    load.wait_for_answers(&server, 20).await;

    let report = load.finish().await;
    report.assert_clean(&server, &[1000, 2000, 3000]);
    assert_eq!(server.metric(SUCCESS), 3, "{}", server.logs());
    assert_eq!(server.metric(ERROR), 0, "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_write_under_load_changes_the_limit_without_a_failed_request() {
    let dir = config_dir::plain(&[("edge.yaml", &edge_per_minute(1000))]);
    let server = start_watching(dir.path(), WATCH_INTERVAL);
    let load = Load::start(&server).await;
    load.wait_for_limit(&server, 1000).await;
    load.wait_for_answers(&server, 20).await;

    // Truncate and write, as an editor or `cat >` does. A watcher can catch the file
    // empty in between (a load error: the old config keeps serving); a file this small
    // is never seen half written, so no answer may come from anything but the two configs.
    std::fs::write(dir.path().join("edge.yaml"), edge_per_minute(2000)).unwrap();
    load.wait_for_limit(&server, 2000).await;
    load.wait_for_answers(&server, 20).await;

    let report = load.finish().await;
    report.assert_clean(&server, &[1000, 2000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_old_limits_serving_until_it_is_fixed() {
    let dir = config_dir::plain(&[("edge.yaml", &edge_bucket_per_hour(3))]);
    let server = start_watching(dir.path(), WATCH_INTERVAL);
    let limited = |remaining| vec![(Code::Ok, Some(3), remaining)];
    for remaining in [2, 1, 0] {
        let response = ask(&server, &[("user", "carol")]).await;
        assert_eq!(decisions(&response), limited(remaining), "{response:?}");
    }
    let over = vec![(Code::OverLimit, Some(3), 0)];
    let response = ask(&server, &[("user", "carol")]).await;
    assert_eq!(decisions(&response), over, "carol's 4th: {response:?}");
    let rule_v1 = "edge.user: 3/hour token_bucket";
    let rlconfig = server.admin_get("/rlconfig").text();
    assert!(rlconfig.contains(rule_v1), "/rlconfig before:\n{rlconfig}");
    assert_eq!((server.metric(SUCCESS), server.metric(ERROR)), (1, 0));

    // The typo that envoyproxy/ratelimit would turn into a limit of 0. Written in one
    // rename, so the watcher sees exactly one broken version.
    let broken = edge_bucket_per_hour(3).replace("requests_per_unit", "request_per_unit");
    config_dir::write_atomically(dir.path(), "edge.yaml", &broken);
    wait_for_metric(&server, ERROR, 1).await;

    // The old rule still decides: carol stays over, dave gets the old 3.
    let response = ask(&server, &[("user", "carol")]).await;
    assert_eq!(
        decisions(&response),
        over,
        "carol after the bad file: {response:?}"
    );
    let response = ask(&server, &[("user", "dave")]).await;
    assert_eq!(
        decisions(&response),
        limited(2),
        "dave after the bad file: {response:?}"
    );
    let rlconfig = server.admin_get("/rlconfig").text();
    assert!(
        rlconfig.contains(rule_v1),
        "/rlconfig after the bad file:\n{rlconfig}"
    );
    let logs = server.logs();
    assert!(
        logs.contains("edge.yaml:6:"),
        "the load error names the file and line of the typo:\n{logs}"
    );
    // The same broken files are not retried on every tick.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.metric(ERROR), 1, "{}", server.logs());
    assert_eq!(server.metric(SUCCESS), 1, "{}", server.logs());

    config_dir::write_atomically(dir.path(), "edge.yaml", &edge_bucket_per_hour(10));
    // Each probe is a new user, so none of them uses up someone else's tokens.
    let mut probes = 0;
    eventually(&server, "the fixed file serving", || {
        probes += 1;
        let user = format!("probe-{probes}");
        let server = &server;
        async move {
            let response = ask(server, &[("user", &user)]).await;
            (decisions(&response)[0].1 == Some(10)).then_some(())
        }
    })
    .await;
    let response = ask(&server, &[("user", "erin")]).await;
    assert_eq!(
        decisions(&response),
        [(Code::Ok, Some(10), 9)],
        "erin under the fixed file: {response:?}"
    );
    let rlconfig = server.admin_get("/rlconfig").text();
    assert!(
        rlconfig.contains("edge.user: 10/hour token_bucket") && !rlconfig.contains(rule_v1),
        "/rlconfig after the fix:\n{rlconfig}"
    );
    assert_eq!((server.metric(SUCCESS), server.metric(ERROR)), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_when_watching_is_off() {
    let dir = config_dir::plain(&[("edge.yaml", &edge_per_minute(1000))]);
    let server = start_watching(dir.path(), "0s");
    let load = Load::start(&server).await;
    load.wait_for_limit(&server, 1000).await;

    config_dir::write_atomically(dir.path(), "edge.yaml", &edge_per_minute(2000));
    // Many times the interval the other tests poll at: nothing looks without a signal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.wait_for_answers(&server, 20).await;
    assert_eq!(load.latest_limit.load(Ordering::SeqCst), 1000);
    assert_eq!(server.metric(SUCCESS), 1, "{}", server.logs());

    server.hangup();
    load.wait_for_limit(&server, 2000).await;
    load.wait_for_answers(&server, 20).await;

    let report = load.finish().await;
    report.assert_clean(&server, &[1000, 2000]);
    assert_eq!(server.metric(SUCCESS), 2, "{}", server.logs());
    let logs = server.logs();
    assert!(logs.contains("SIGHUP"), "the reload is logged:\n{logs}");
}

#[tokio::test]
async fn counts_carry_over_a_reload_that_keeps_the_rules() {
    // One rule per algorithm family: a token bucket, and a sliding window (the default).
    let edge = "\
domain: edge
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 5, algorithm: token_bucket}
  - key: client
    rate_limit: {unit: hour, requests_per_unit: 5}
";
    let dir = config_dir::plain(&[("edge.yaml", edge)]);
    let server = start_watching(dir.path(), WATCH_INTERVAL);
    // The hourly window must not roll over while counting.
    avoid_window_edge(3600, 20);
    let both = [("user", "frank"), ("client", "web")];
    let counted = |remaining| vec![(Code::Ok, Some(5), remaining); 2];

    for remaining in [4, 3] {
        assert_eq!(decisions(&ask(&server, &both).await), counted(remaining));
    }

    // An unrelated domain appears...
    config_dir::write_atomically(
        dir.path(),
        "other.yaml",
        &edge_per_minute(7).replace("edge", "other"),
    );
    wait_for_metric(&server, SUCCESS, 2).await;
    assert_eq!(decisions(&ask(&server, &both).await), counted(2));

    // ...and edge.yaml is rewritten with the same rules and a new comment.
    let commented = format!("# reviewed\n{edge}");
    config_dir::write_atomically(dir.path(), "edge.yaml", &commented);
    wait_for_metric(&server, SUCCESS, 3).await;
    assert_eq!(decisions(&ask(&server, &both).await), counted(1));
    assert_eq!(decisions(&ask(&server, &both).await), counted(0));
    let over = vec![(Code::OverLimit, Some(5), 0); 2];
    assert_eq!(decisions(&ask(&server, &both).await), over);
    assert_eq!(server.metric(ERROR), 0, "{}", server.logs());
}
