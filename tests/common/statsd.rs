//! Etsy's statsd daemon (`.venv/statsd`, installed by scripts/test.sh from npm) on a free
//! loopback UDP or TCP port, flushing every 200 ms through tests/wire/statsd_json_backend.js:
//! what a real statsd made of the lines it was sent, as JSON, one flush a line.

use std::collections::HashMap;
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::process::Supervised;
use super::{free_loopback_addr, repo_root, venv_tool};

pub struct StatsdDaemon {
    pub port: u16,
    flushes: std::path::PathBuf,
    process: Supervised,
}

/// What statsd counted over every flush so far.
#[derive(Debug, Default)]
pub struct Totals {
    /// Each counter's sum.
    pub counters: HashMap<String, f64>,
    /// Each timer's calls, its lines' sample rates included.
    pub timer_calls: HashMap<String, f64>,
}

/// What the daemon listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Udp,
    Tcp,
}

impl StatsdDaemon {
    pub fn start(listen: Listen) -> StatsdDaemon {
        let port = match listen {
            // A UDP port free a moment ago, as free_loopback_addr finds TCP ones.
            Listen::Udp => UdpSocket::bind("127.0.0.1:0")
                .and_then(|socket| socket.local_addr())
                .expect("find a free UDP port")
                .port(),
            Listen::Tcp => free_loopback_addr().port(),
        };
        Self::start_on(listen, port)
    }

    /// A daemon on `port`, e.g. where one was stopped: it starts with nothing counted.
    pub fn start_on(listen: Listen, port: u16) -> StatsdDaemon {
        let stats_js = venv_tool("MESHLIMIT_STATSD", "statsd/node_modules/statsd/stats.js");
        let dir = tempfile::tempdir().expect("create a temp dir for statsd");
        let flushes = dir.path().join("flushes.jsonl");
        let server = match listen {
            Listen::Udp => "./servers/udp",
            Listen::Tcp => "./servers/tcp",
        };
        let config = json!({
            "servers": [{"server": server, "address": "127.0.0.1", "port": port}],
            "mgmt_address": "127.0.0.1",
            "mgmt_port": free_loopback_addr().port(),
            "flushInterval": 200,
            "deleteIdleStats": true,
            "backends": [repo_root().join("tests/wire/statsd_json_backend.js")],
            "jsonLinesFile": flushes,
        });
        let config_path = dir.path().join("config.js");
        std::fs::write(&config_path, config.to_string()).expect("write statsd's config");
        let mut command = Command::new("node");
        command.arg(stats_js).arg(&config_path);
        let mut process = Supervised::spawn("statsd", command, dir);
        let started = process.wait_ready(Duration::from_secs(30), "statsd's first flush", || {
            std::fs::metadata(&flushes).is_ok()
                && (listen == Listen::Udp || TcpStream::connect(("127.0.0.1", port)).is_ok())
        });
        if let Err(failure) = started {
            panic!("statsd did not start:\n{}", failure.report);
        }
        StatsdDaemon {
            port,
            flushes,
            process,
        }
    }

    /// The sums over every flush written so far.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        let text = std::fs::read_to_string(&self.flushes).unwrap_or_default();
        for flush in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let add = |into: &mut HashMap<String, f64>, field: &Value| {
                for (name, value) in field.as_object().into_iter().flatten() {
                    *into.entry(name.clone()).or_default() += value.as_f64().unwrap_or(0.0);
                }
            };
            add(&mut totals.counters, &flush["counters"]);
            add(&mut totals.timer_calls, &flush["timer_counts"]);
        }
        totals
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}
