//! Hot reload: the config directory is checked every interval and on SIGHUP; a changed and
//! valid set of files replaces the live config in one atomic swap.
//!
//! The whole directory is validated before anything is swapped, so a request sees either
//! the old config or the new one, never a mix; an invalid set leaves the old one serving.
//! Counters live in the store, keyed by descriptor and window, so counts of unchanged
//! rules carry over a reload untouched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;

use crate::config::{self, ConfigErrors, LoadOptions};
use crate::limiter::LiveConfig;
use crate::matcher::RateLimitConfig;
use crate::metrics::Metrics;

type Snapshot = Vec<(PathBuf, Vec<u8>)>;

/// How long a changed directory must stay the same before it is loaded.
const SETTLE: Duration = Duration::from_millis(50);

/// The stack a reload parses and compiles on. Both recurse once per level of nesting and
/// the parser stops a file at 64 levels; tokio's blocking threads have 2 MiB, which an
/// unoptimised build overflowed at that depth, so reloads get a main thread's 8 MiB.
pub const LOADER_STACK_BYTES: usize = 8 * 1024 * 1024;

/// Runs `work` on a thread of its own with `LOADER_STACK_BYTES` of stack and waits for it;
/// `None`, logged, when no thread can be started (the next reload tries again).
pub fn on_loader_stack<T: Send>(work: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("config-loader".into())
            .stack_size(LOADER_STACK_BYTES)
            .spawn_scoped(scope, work);
        match spawned {
            Ok(loader) => Some(
                loader
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            ),
            Err(error) => {
                tracing::error!(%error, "cannot start a thread to load the config; keeping the current one");
                None
            }
        }
    })
}

pub struct Reloader {
    dir: PathBuf,
    options: LoadOptions,
    live: LiveConfig,
    metrics: Arc<Metrics>,
    /// The files as last loaded (or last rejected), to notice changes.
    last: Mutex<Snapshot>,
}

impl Reloader {
    /// Loads `dir` for the first time; an invalid config is an error the caller reports.
    pub fn start(
        dir: &Path,
        options: LoadOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigErrors> {
        let snapshot = config::snapshot(dir);
        let loaded = config::load_dir(dir, &options).inspect_err(|_| {
            metrics.config_load_error.fetch_add(1, Ordering::Relaxed);
        })?;
        warn_if_empty(dir, &loaded);
        metrics.attach(&loaded);
        metrics.config_load_success.fetch_add(1, Ordering::Relaxed);
        metrics
            .config_hash
            .store(hash(dir, &snapshot), Ordering::Relaxed);
        Ok(Self {
            dir: dir.to_owned(),
            options,
            live: Arc::new(ArcSwapOption::from_pointee(loaded)),
            metrics,
            last: Mutex::new(snapshot),
        })
    }

    pub fn live(&self) -> &LiveConfig {
        &self.live
    }

    /// Reloads now, whether or not the files changed (SIGHUP). True when the new config
    /// is serving.
    pub fn reload(&self) -> bool {
        let snapshot = config::snapshot(&self.dir);
        self.load(snapshot)
    }

    /// Reloads if any file was added, removed or changed since the last attempt, once the
    /// files have stopped changing: an editor's or `cat >`'s write can be caught half done
    /// (even empty), and loading that would count a failed load for nothing.
    pub fn reload_if_changed(&self) -> bool {
        let snapshot = config::snapshot(&self.dir);
        if *self.last.lock() == snapshot {
            return false;
        }
        std::thread::sleep(SETTLE);
        if config::snapshot(&self.dir) != snapshot {
            // Still being written: the next check tries again.
            return false;
        }
        self.load(snapshot)
    }

    fn load(&self, snapshot: Snapshot) -> bool {
        let hash = hash(&self.dir, &snapshot);
        *self.last.lock() = snapshot;
        let source = self.dir.display().to_string();
        match config::load_dir(&self.dir, &self.options) {
            Ok(loaded) => {
                warn_if_empty(&self.dir, &loaded);
                install(&self.live, &self.metrics, loaded, hash, &source);
                true
            }
            Err(errors) => {
                refuse(&self.metrics, &source, &errors);
                false
            }
        }
    }

    /// Checks for changes every `interval` (0 = only on SIGHUP, delivered through `hangup`)
    /// until `shutdown` resolves.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut hangup: tokio::sync::mpsc::Receiver<()>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut ticker = tokio::time::interval(if interval.is_zero() {
            Duration::from_secs(3_600)
        } else {
            interval
        });
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticker.tick(), if !interval.is_zero() => {
                    let reloader = self.clone();
                    // File reads are blocking; keep them off the request threads.
                    let _ = tokio::task::spawn_blocking(move || {
                        on_loader_stack(|| reloader.reload_if_changed())
                    })
                    .await;
                }
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    let reloader = self.clone();
                    let _ = tokio::task::spawn_blocking(move || on_loader_stack(|| reloader.reload()))
                        .await;
                }
            }
        }
    }
}

/// Puts a validated config live in one atomic swap, with its rules' metrics attached
/// first; counted, and logged with `source` (a directory, an xDS server).
pub fn install(
    live: &LiveConfig,
    metrics: &Metrics,
    loaded: RateLimitConfig,
    hash: u64,
    source: &str,
) {
    let domains: Vec<String> = loaded
        .domains()
        .iter()
        .map(|d| d.name.to_string())
        .collect();
    metrics.attach(&loaded);
    live.store(Some(Arc::new(loaded)));
    metrics.config_load_success.fetch_add(1, Ordering::Relaxed);
    metrics.config_hash.store(hash, Ordering::Relaxed);
    tracing::info!(%source, domains = %domains.join(","), config_hash = hash, "config reloaded");
}

/// A directory with no domain loads, as envoyproxy/ratelimit starts with no config, but
/// limits nothing: said at every load, since a wrong mount path or an empty ConfigMap
/// otherwise shows only as every request let through.
fn warn_if_empty(dir: &Path, loaded: &RateLimitConfig) {
    if loaded.domains().is_empty() {
        tracing::warn!(
            "no domain was loaded from {}: it has no *.yaml or *.yml file, so nothing is \
             limited; check the mount path (--config, or RUNTIME_ROOT and \
             RUNTIME_SUBDIRECTORY) and that the ConfigMap has files",
            dir.display()
        );
    }
}

/// Counts and logs a config that failed validation; the live one keeps serving.
pub fn refuse(metrics: &Metrics, source: &str, errors: &ConfigErrors) {
    metrics.config_load_error.fetch_add(1, Ordering::Relaxed);
    tracing::error!(%source, "config reload failed, the previous config keeps serving:\n{errors}");
}

/// The files' names relative to `dir` and their bytes: replicas that mount one config at
/// different paths, or are given it as `cfg` and `/srv/cfg`, must report the same hash, or
/// the alert comparing replicas' hashes fires for nothing.
fn hash(dir: &Path, snapshot: &Snapshot) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for (path, bytes) in snapshot {
        let name = path.strip_prefix(dir).unwrap_or(path);
        hasher.update(name.as_os_str().as_encoded_bytes());
        // Ends the name, so a name and the bytes after it cannot be split another way.
        hasher.update(&[0]);
        hasher.update(bytes);
    }
    hasher.digest()
}

/// A stream of SIGHUPs; on platforms without them, one that never fires. The handler is
/// installed when this is called, so call it before the service reports healthy: an
/// unhandled SIGHUP ends the process.
pub fn hangup_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if sender.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    #[cfg(not(unix))]
    drop(sender);
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const V1: &str = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 1}\n";
    const V2: &str = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 2}\n";

    fn limit_of(reloader: &Reloader) -> Option<u32> {
        let config = reloader.live().load_full()?;
        let entries = [crate::proto::rate_limit_descriptor::Entry {
            key: "k".into(),
            value: "v".into(),
        }];
        match &config.domain("d")?.lookup(&entries)?.limit {
            crate::rule::RuleLimit::Limited(limits) => limits.first().map(|l| l.requests_per_unit),
            crate::rule::RuleLimit::Unlimited => None,
        }
    }

    #[test]
    fn a_valid_change_is_swapped_in_and_a_broken_one_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("d.yaml"), V1).unwrap();
        let metrics = Arc::new(Metrics::default());
        let reloader =
            Reloader::start(dir.path(), LoadOptions::default(), metrics.clone()).unwrap();
        assert_eq!(limit_of(&reloader), Some(1));
        assert!(!reloader.reload_if_changed(), "nothing changed");

        fs::write(dir.path().join("d.yaml"), V2).unwrap();
        assert!(reloader.reload_if_changed());
        assert_eq!(limit_of(&reloader), Some(2));

        fs::write(
            dir.path().join("d.yaml"),
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute}\n",
        )
        .unwrap();
        assert!(!reloader.reload_if_changed());
        assert_eq!(
            limit_of(&reloader),
            Some(2),
            "the last good config keeps serving"
        );
        assert_eq!(metrics.config_load_error.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.config_load_success.load(Ordering::Relaxed), 2);
        // The same broken files are not retried every tick.
        assert!(!reloader.reload_if_changed());
        assert_eq!(metrics.config_load_error.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_config_hash_depends_on_the_files_not_where_they_are_mounted() {
        let hash_of = |dir: &Path| {
            let metrics = Arc::new(Metrics::default());
            Reloader::start(dir, LoadOptions::default(), metrics.clone()).unwrap();
            metrics.config_hash.load(Ordering::Relaxed)
        };
        let (one, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fs::write(one.path().join("d.yaml"), V1).unwrap();
        fs::write(other.path().join("d.yaml"), V1).unwrap();
        assert_eq!(hash_of(one.path()), hash_of(other.path()));
        // A dotted spelling of the same directory, as `--config ./cfg` would give.
        assert_eq!(hash_of(one.path()), hash_of(&one.path().join(".")));

        fs::write(other.path().join("d.yaml"), V2).unwrap();
        assert_ne!(hash_of(one.path()), hash_of(other.path()));
    }
}
