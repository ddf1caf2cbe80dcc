//! The built `meshlimit` binary as a server under test: started on free loopback ports,
//! ready once `/healthcheck` answers `OK`, killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use meshlimit::proto::rate_limit_descriptor::Entry;
use meshlimit::proto::rate_limit_service_client::RateLimitServiceClient;
use meshlimit::proto::{RateLimitDescriptor, RateLimitRequest};
use tonic::transport::{Channel, ClientTlsConfig};

use super::process::{StartFailure, Supervised};

/// The secret in `reset_token_file()`, which `admin_delete` sends.
pub const RESET_TOKEN: &str = "test-reset-secret";

/// `tests/fixtures/admin/reset_token`, for `--admin-reset-token-file`.
pub fn reset_token_file() -> String {
    super::fixture("admin/reset_token").display().to_string()
}
use super::{free_loopback_addr, http, poll_until};

/// How long a start may take before the test fails; far above the usual fraction of a
/// second, because CI may be compiling other test binaries at the same time.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Tries at a start, of which all but the first only follow a lost port race (see
/// `StartFailure::lost_port_race`).
const START_ATTEMPTS: usize = 3;

/// Settings a developer's shell may carry that would change what the tests start.
const INHERITED_SETTINGS: &[&str] = &[
    "MESHLIMIT_CONFIG",
    "MESHLIMIT_GRPC_ADDR",
    "MESHLIMIT_ADMIN_ADDR",
    "MESHLIMIT_XDS_SERVER",
    "MESHLIMIT_DEFAULT_ALGORITHM",
    // What responses carry, including envoyproxy/ratelimit's variables of the same meaning.
    "MESHLIMIT_RESPONSE_HEADERS",
    "MESHLIMIT_OVER_LIMIT_BODY",
    "MESHLIMIT_SOFT_LIMIT_HEADER",
    "LIMIT_RESPONSE_HEADERS_ENABLED",
    "LIMIT_LIMIT_HEADER",
    "LIMIT_REMAINING_HEADER",
    "LIMIT_RESET_HEADER",
    "RESPONSE_DYNAMIC_METADATA",
    "NEAR_LIMIT_RATIO",
    // Where meshlimit listens, reads its config and keeps counters, in envoyproxy/ratelimit's
    // words (src/envoyproxy_env.rs).
    "RUNTIME_ROOT",
    "RUNTIME_SUBDIRECTORY",
    "RUNTIME_APPDIRECTORY",
    "HOST",
    "PORT",
    "GRPC_HOST",
    "GRPC_PORT",
    "DEBUG_HOST",
    "DEBUG_PORT",
    "MESHLIMIT_DEBUG_ADDR",
    "USE_PROMETHEUS",
    "PROMETHEUS_MAPPER_YAML",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "GRPC_SERVER_USE_TLS",
    "BACKEND_TYPE",
    "REDIS_URL",
    "REDIS_TYPE",
    "REDIS_TIMEOUT",
    "REDIS_PERSECOND",
    "CONFIG_TYPE",
    "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
    "GRPC_MAX_CONNECTION_AGE",
    "SHADOW_MODE",
    "QUOTA_MODE",
    "MERGE_DOMAIN_CONFIG",
];

/// A `Command` for the built binary with the developer's meshlimit settings removed.
pub fn command() -> Command {
    command_for(binary())
}

/// Runs `command` (meshlimit expected to refuse to start) to its exit: the exit code and
/// stderr. One that starts instead is killed after 10 s, and the caller's check of the code
/// fails.
pub fn exit_of(mut command: Command) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start meshlimit");
    let exited = poll_until(Duration::from_secs(10), || child.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for meshlimit");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status.code(), stderr)
}

/// Like `command`, running `program` (the binary, or a link to it).
fn command_for(program: PathBuf) -> Command {
    let mut command = Command::new(program);
    for name in INHERITED_SETTINGS {
        command.env_remove(name);
    }
    // Logs end up in failure messages; colour escapes would only garble them.
    command.env("NO_COLOR", "1");
    command
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshlimit"))
}

/// Where a started server is told its config directory and addresses.
#[derive(Clone, Copy)]
enum Placement<'a> {
    /// `--config`, `--grpc-addr` and `--admin-addr`.
    Flags(&'a Path),
    /// envoyproxy/ratelimit's variables only.
    Environment,
    /// `--grpc-addr` and `--admin-addr`, no config directory: the config comes another
    /// way (`--xds-server`).
    Addresses,
}

/// What a start waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// `/healthcheck` answers 200 OK: a config is loaded.
    Healthy,
    /// `/healthcheck` answers at all, healthy or not.
    Listening,
}

pub struct Meshlimit {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// envoyproxy/ratelimit's debug port, opened by every server started as
    /// `/bin/ratelimit` (at `DEBUG_HOST`/`DEBUG_PORT` when `env` sets them).
    pub debug_addr: Option<SocketAddr>,
    process: Supervised,
}

impl Meshlimit {
    /// `meshlimit serve --config <config_dir>` with everything else at its default.
    pub fn start(config_dir: impl AsRef<Path>) -> Meshlimit {
        Meshlimit::start_with(config_dir, &[])
    }

    /// Like `start`, with `extra_args` appended to the `serve` command line.
    pub fn start_with(config_dir: impl AsRef<Path>, extra_args: &[&str]) -> Meshlimit {
        Meshlimit::start_with_env(config_dir, extra_args, &[])
    }

    /// Like `start_with`, with the environment variables `env` set, as a deployment that
    /// configures meshlimit through its environment (envoyproxy/ratelimit's variables) does.
    pub fn start_with_env(
        config_dir: impl AsRef<Path>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Meshlimit {
        let config_dir = config_dir.as_ref();
        Meshlimit::start_placed(Placement::Flags(config_dir), extra_args, env)
    }

    /// The binary run as envoyproxy/ratelimit's Deployments run theirs — as `ratelimit`,
    /// with no arguments: the config directory and everything else come from `env`, the
    /// addresses from `HOST`/`PORT` and `GRPC_HOST`/`GRPC_PORT`, which this sets to free
    /// loopback ports.
    pub fn start_envoyproxy_style(env: &[(&str, &str)]) -> Meshlimit {
        Meshlimit::start_placed(Placement::Environment, &[], env)
    }

    /// Like `start_envoyproxy_style`, waited on only until its admin port answers, healthy
    /// or not.
    pub fn start_envoyproxy_style_unready(env: &[(&str, &str)]) -> Meshlimit {
        Meshlimit::start_ready(Placement::Environment, Readiness::Listening, &[], env)
    }

    /// `meshlimit serve` with its addresses and `extra_args` only (e.g. `--xds-server`),
    /// waited on until healthy.
    pub fn start_without_dir(extra_args: &[&str], env: &[(&str, &str)]) -> Meshlimit {
        Meshlimit::start_placed(Placement::Addresses, extra_args, env)
    }

    /// Like `start_without_dir`, waited on only until its admin port answers, healthy or
    /// not: for a server that has no config yet.
    pub fn start_unready(extra_args: &[&str], env: &[(&str, &str)]) -> Meshlimit {
        Meshlimit::start_ready(Placement::Addresses, Readiness::Listening, extra_args, env)
    }

    fn start_placed(placement: Placement, extra_args: &[&str], env: &[(&str, &str)]) -> Meshlimit {
        Meshlimit::start_ready(placement, Readiness::Healthy, extra_args, env)
    }

    fn start_ready(
        placement: Placement,
        readiness: Readiness,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Meshlimit {
        let mut attempt = 1;
        loop {
            match Meshlimit::try_start(placement, readiness, extra_args, env) {
                Ok(server) => return server,
                Err(failure) if failure.lost_port_race && attempt < START_ATTEMPTS => attempt += 1,
                Err(failure) => panic!("meshlimit did not become healthy:\n{}", failure.report),
            }
        }
    }

    fn try_start(
        placement: Placement,
        readiness: Readiness,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Meshlimit, StartFailure> {
        let grpc_addr = free_loopback_addr();
        let admin_addr = free_loopback_addr();
        let mut debug_addr = None;
        let dir = tempfile::tempdir().expect("create a temp dir for meshlimit");
        let mut command = match placement {
            Placement::Flags(_) | Placement::Addresses => {
                let mut command = command();
                command.arg("serve");
                command
            }
            // As envoyproxy/ratelimit's Deployments start it: `/bin/ratelimit`, no arguments
            // (the image links that name to meshlimit).
            Placement::Environment => {
                let ratelimit = dir.path().join("ratelimit");
                std::os::unix::fs::symlink(binary(), &ratelimit)
                    .expect("link `ratelimit` to the meshlimit binary");
                command_for(ratelimit)
            }
        };
        command.envs(env.iter().copied());
        match placement {
            Placement::Flags(config_dir) => {
                command
                    .arg("--config")
                    .arg(config_dir)
                    .arg("--grpc-addr")
                    .arg(grpc_addr.to_string())
                    .arg("--admin-addr")
                    .arg(admin_addr.to_string());
            }
            Placement::Addresses => {
                command
                    .arg("--grpc-addr")
                    .arg(grpc_addr.to_string())
                    .arg("--admin-addr")
                    .arg(admin_addr.to_string());
            }
            Placement::Environment => {
                command
                    .env("HOST", admin_addr.ip().to_string())
                    .env("PORT", admin_addr.port().to_string())
                    .env("GRPC_HOST", grpc_addr.ip().to_string())
                    .env("GRPC_PORT", grpc_addr.port().to_string());
                // On loopback, not envoyproxy/ratelimit's 0.0.0.0:6070, unless asked.
                let setting = |name: &str| env.iter().find(|(key, _)| *key == name);
                let addr = match (setting("DEBUG_HOST"), setting("DEBUG_PORT")) {
                    (None, None) => {
                        let addr = free_loopback_addr();
                        command
                            .env("DEBUG_HOST", addr.ip().to_string())
                            .env("DEBUG_PORT", addr.port().to_string());
                        addr
                    }
                    (host, port) => SocketAddr::new(
                        host.map_or([0, 0, 0, 0].into(), |(_, host)| host.parse().unwrap()),
                        port.map_or(6070, |(_, port)| port.parse().unwrap()),
                    ),
                };
                debug_addr = Some(addr);
            }
        }
        command.args(extra_args);
        let mut server = Meshlimit {
            grpc_addr,
            admin_addr,
            debug_addr,
            process: Supervised::spawn("meshlimit", command, dir),
        };

        let what = match readiness {
            Readiness::Healthy => format!("GET http://{admin_addr}/healthcheck answered 200 OK"),
            Readiness::Listening => format!("GET http://{admin_addr}/healthcheck answered"),
        };
        server.process.wait_ready(STARTUP_TIMEOUT, &what, || {
            http::get(admin_addr, "/healthcheck", &[]).is_ok_and(|response| {
                readiness == Readiness::Listening
                    || (response.status == 200 && response.text().trim() == "OK")
            })
        })?;
        Ok(server)
    }

    /// The gRPC endpoint as a URI.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// A channel to the gRPC port, for any of the services served there.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc_url())
            .expect("valid gRPC URI")
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "connect to meshlimit at {}: {err}\n{}",
                    self.grpc_url(),
                    self.logs()
                )
            })
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(self.channel().await)
    }

    /// What the server has logged so far, framed for a failure message.
    pub fn logs(&self) -> String {
        self.process.describe()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGHUP (with `kill -HUP`, as an operator would), which makes meshlimit reload
    /// its config directory.
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -HUP");
        assert!(
            status.success(),
            "kill -HUP {} failed: {status}",
            self.pid()
        );
    }

    /// `GET path` on the admin port; panics with the server's logs when it cannot be asked.
    pub fn admin_get(&self, path: &str) -> http::Response {
        http::get(self.admin_addr, path, &[]).unwrap_or_else(|err| {
            panic!(
                "GET {path} on meshlimit's admin port {}: {err}\n{}",
                self.admin_addr,
                self.logs()
            )
        })
    }

    /// `DELETE path` on the admin port with the secret of `reset_token_file()` (which the
    /// server must have been started with, as `--admin-reset-token-file`).
    pub fn admin_delete(&self, path: &str) -> http::Response {
        self.admin_delete_as(path, Some(&format!("Bearer {RESET_TOKEN}")))
    }

    /// `DELETE path` with `authorization` as the `Authorization` header, or none; panics
    /// with the server's logs when it cannot be asked.
    pub fn admin_delete_as(&self, path: &str, authorization: Option<&str>) -> http::Response {
        let headers: Vec<(&str, &str)> = authorization
            .map(|value| ("authorization", value))
            .into_iter()
            .collect();
        http::delete(self.admin_addr, path, &headers).unwrap_or_else(|err| {
            panic!(
                "DELETE {path} on meshlimit's admin port {}: {err}\n{}",
                self.admin_addr,
                self.logs()
            )
        })
    }

    /// The value of the one counter on `/metrics` that `selector` picks (see [`sample`]).
    pub fn metric(&self, selector: &str) -> u64 {
        let text = self.admin_get("/metrics").text();
        sample(&text, selector)
            .unwrap_or_else(|| panic!("no counter {selector} on /metrics:\n{text}"))
    }

    /// A channel to the gRPC port over TLS with `tls`, at 127.0.0.1 (the certificate is
    /// checked for the name in `tls`); the error when connecting fails.
    pub async fn tls_channel(
        &self,
        tls: ClientTlsConfig,
    ) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("https://{}", self.grpc_addr))
            .expect("valid gRPC URI")
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
    }

    /// `POST path` on the admin port with a JSON `body`; panics with the server's logs when
    /// it cannot be asked.
    pub fn admin_post_json(&self, path: &str, body: &str) -> http::Response {
        let headers = [("content-type", "application/json")];
        http::post(self.admin_addr, path, &headers, body.as_bytes()).unwrap_or_else(|err| {
            panic!(
                "POST {path} on meshlimit's admin port {}: {err}\n{}",
                self.admin_addr,
                self.logs()
            )
        })
    }

    /// Sends SIGTERM (with `kill -TERM`), as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.pid()
        );
    }

    /// The exit status once the process ends on its own within `timeout`, else `None`.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.process.exited())
    }
}

/// A request for `domain` with one descriptor of one entry, `key` = `value`.
pub fn one_entry_request(domain: &str, key: &str, value: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: key.to_owned(),
                value: value.to_owned(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// The value of the one series in Prometheus `text` that `selector` picks, as a PromQL
/// selector would: `name` or `name{label="value",…}`, the series' other labels free.
/// `None` when no series or several match.
pub fn sample(text: &str, selector: &str) -> Option<u64> {
    let (name, wanted) = series(selector)?;
    let mut matching = text.lines().filter_map(|line| {
        let (series_part, value) = line.rsplit_once(' ')?;
        let (line_name, labels) = series(series_part)?;
        let picked = line_name == name && wanted.iter().all(|label| labels.contains(label));
        picked.then(|| value.trim().parse::<u64>().ok())?
    });
    let value = matching.next()?;
    matching.next().is_none().then_some(value)
}

/// `name{a="x",b="y"}` as its name and its (label, value) pairs, escapes undone.
fn series(text: &str) -> Option<(&str, Vec<(String, String)>)> {
    let Some((name, rest)) = text.split_once('{') else {
        return Some((text, Vec::new()));
    };
    let mut labels = Vec::new();
    let mut chars = rest.strip_suffix('}')?.chars().peekable();
    while chars.peek().is_some() {
        let label: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.push((label.trim_start_matches(',').to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels))
}
