//! An xDS management server (tests/wire/xds_server.py, on the venv's Python) serving
//! `RateLimitConfig` resources over ADS, as Envoy Gateway serves envoyproxy/ratelimit. The
//! test publishes snapshots and reads back every DiscoveryRequest (subscriptions, ACKs,
//! NACKs) meshlimit sent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use super::process::Supervised;
use super::tls::{Ca, Issued};
use super::{poll_until, repo_root, venv_tool};

/// TLS for the server: its certificate, and the CA client certificates must come from
/// (mTLS) when set.
pub struct ServerTls<'a> {
    pub issued: &'a Issued,
    pub client_ca: Option<&'a Ca>,
}

/// Publishes snapshots to an `XdsServer`: see `XdsServer::publisher`.
#[derive(Clone)]
pub struct Publisher(PathBuf);

impl Publisher {
    /// Writes `configs` as `version` into the server's snapshot file, which it polls.
    pub fn publish(&self, version: &str, configs: Value) {
        let path = self.0.join("snapshot.json");
        let temp = self.0.join(".snapshot.json.tmp");
        let snapshot = json!({ "version": version, "configs": configs });
        std::fs::write(&temp, snapshot.to_string()).expect("write the snapshot");
        std::fs::rename(&temp, &path).expect("swap in the snapshot");
    }
}

pub struct XdsServer {
    pub port: u16,
    /// The snapshot and the request log, kept across restarts.
    state: TempDir,
    /// TLS arguments, to start the same server again.
    tls_args: Vec<PathBuf>,
    process: Option<Supervised>,
}

impl XdsServer {
    /// A plain-text server on a free loopback port, with no snapshot yet.
    pub fn start() -> XdsServer {
        XdsServer::start_with(None)
    }

    pub fn start_with(tls: Option<ServerTls>) -> XdsServer {
        let state = tempfile::tempdir().expect("create a temp dir for the xDS server");
        let mut tls_args = Vec::new();
        if let Some(tls) = tls {
            let (cert, key) = (state.path().join("cert.pem"), state.path().join("key.pem"));
            tls.issued.write(&cert, &key);
            tls_args = vec![cert, key];
            if let Some(ca) = tls.client_ca {
                let path = state.path().join("client-ca.pem");
                std::fs::write(&path, ca.pem()).expect("write the client CA");
                tls_args.push(path);
            }
        }
        let mut server = XdsServer {
            port: 0,
            state,
            tls_args,
            process: None,
        };
        server.run(0);
        server
    }

    fn run(&mut self, port: u16) {
        let logs = tempfile::tempdir().expect("create a temp dir for the xDS server's log");
        let log = logs.path().join("xds-server.log");
        let mut command = Command::new(venv_tool("MESHLIMIT_PYTHON", "bin/python"));
        command
            .arg(repo_root().join("tests/wire/xds_server.py"))
            .arg(self.state.path())
            .arg(port.to_string())
            .args(&self.tls_args);
        let mut process = Supervised::spawn("xds-server", command, logs);
        let mut bound = None;
        let started =
            process.wait_ready(Duration::from_secs(30), "the xDS server listening", || {
                bound = listening_port(&std::fs::read_to_string(&log).unwrap_or_default());
                bound.is_some()
            });
        if let Err(failure) = started {
            panic!("the xDS server did not start:\n{}", failure.report);
        }
        self.port = bound.expect("the port was read");
        self.process = Some(process);
    }

    /// `http://127.0.0.1:PORT`, for `--xds-server`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, as envoyproxy/ratelimit's CONFIG_GRPC_XDS_SERVER_URL is written.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Serves `configs` (RateLimitConfig resources as JSON) as `version`, pushing them to
    /// every open stream.
    pub fn publish(&self, version: &str, configs: Value) {
        self.publisher().publish(version, configs);
    }

    /// A handle that publishes to this server, for a task that does while the test kills
    /// and restarts the server (a stopped server serves the latest snapshot on restart).
    pub fn publisher(&self) -> Publisher {
        Publisher(self.state.path().to_owned())
    }

    /// Every DiscoveryRequest received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        read_lines(&self.state.path().join("requests.jsonl"))
    }

    /// Waits (up to 30 s) for a request satisfying `matches`, and returns it.
    pub fn wait_for_request(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_request_after(0, what, matches)
    }

    /// Like `wait_for_request`, among the requests after the first `seen`.
    pub fn wait_for_request_after(
        &self,
        seen: usize,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        poll_until(Duration::from_secs(30), || {
            self.requests()
                .into_iter()
                .skip(seen)
                .find(|request| matches(request))
        })
        .unwrap_or_else(|| {
            panic!(
                "the xDS server never received {what}; it received:\n{:#?}\n{}",
                self.requests(),
                self.describe()
            )
        })
    }

    /// Kills the server, as a crashed or redeployed control plane goes.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Starts the server again on its old port, with the snapshot it had.
    pub fn restart(&mut self) {
        self.kill();
        self.run(self.port);
    }

    pub fn describe(&self) -> String {
        self.process.as_ref().map_or_else(
            || "(the xDS server is stopped)".to_owned(),
            Supervised::describe,
        )
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("the xDS server writes JSON lines"))
        .collect()
}

fn listening_port(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|line| line.strip_prefix("listening port=")?.trim().parse().ok())
}
