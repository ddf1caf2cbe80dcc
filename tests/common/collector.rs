//! An OTLP trace collector (tests/wire/otlp_collector.py, on the venv's Python): takes spans
//! over gRPC and HTTP on loopback and keeps each as a JSON line the test reads back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::process::Supervised;
use super::tls::{Ca, Issued};
use super::{poll_until, repo_root, venv_tool};

pub struct Collector {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    spans: PathBuf,
    process: Supervised,
}

impl Collector {
    pub fn start() -> Collector {
        Collector::start_with(None, None, 0)
    }

    /// A collector refusing its first `exports` exports as a busy one does (HTTP 503, gRPC
    /// UNAVAILABLE), taking the rest.
    pub fn start_refusing(exports: u32) -> Collector {
        Collector::start_with(None, None, exports)
    }

    /// A collector whose ports speak TLS only, with the certificate `issued`.
    pub fn start_tls(issued: &Issued) -> Collector {
        Collector::start_with(Some(issued), None, 0)
    }

    /// Like `start_tls`, also requiring a client certificate `client_ca` signed.
    pub fn start_mtls(issued: &Issued, client_ca: &Ca) -> Collector {
        Collector::start_with(Some(issued), Some(client_ca), 0)
    }

    fn start_with(tls: Option<&Issued>, client_ca: Option<&Ca>, refuse_first: u32) -> Collector {
        let dir = tempfile::tempdir().expect("create a temp dir for the collector");
        let spans = dir.path().join("spans.jsonl");
        let mut command = Command::new(venv_tool("MESHLIMIT_PYTHON", "bin/python"));
        command.env("COLLECTOR_REFUSE_FIRST", refuse_first.to_string());
        command
            .arg(repo_root().join("tests/wire/otlp_collector.py"))
            .arg(&spans);
        if let Some(issued) = tls {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            issued.write(&cert, &key);
            command.arg(&cert).arg(&key);
            if let Some(ca) = client_ca {
                let path = dir.path().join("client-ca.pem");
                std::fs::write(&path, ca.pem()).expect("write the client CA");
                command.arg(path);
            }
        }
        let mut process = Supervised::spawn("otlp-collector", command, dir);
        let mut ports = None;
        let started =
            process.wait_ready(Duration::from_secs(30), "the collector listening", || {
                ports = listening_ports(&process_log_of(&spans));
                ports.is_some()
            });
        if let Err(failure) = started {
            panic!("the OTLP collector did not start:\n{}", failure.report);
        }
        let (grpc, http) = ports.expect("ports were read");
        Collector {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], http)),
            spans,
            process,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("the collector writes JSON lines"))
            .collect()
    }

    /// Waits (up to 30 s) until the spans received satisfy `done`, and returns them.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        poll_until(Duration::from_secs(30), || {
            let spans = self.spans();
            done(&spans).then_some(spans)
        })
        .unwrap_or_else(|| {
            panic!(
                "the collector never had {what}; it has:\n{:#?}\n{}",
                self.spans(),
                self.process.describe()
            )
        })
    }
}

/// The collector's log sits beside its spans file (Supervised names it after the process).
fn process_log_of(spans: &std::path::Path) -> String {
    std::fs::read_to_string(spans.with_file_name("otlp-collector.log")).unwrap_or_default()
}

fn listening_ports(log: &str) -> Option<(u16, u16)> {
    let line = log.lines().find(|line| line.starts_with("listening "))?;
    let mut ports = line
        .split_whitespace()
        .filter_map(|part| part.split_once('=')?.1.parse().ok());
    Some((ports.next()?, ports.next()?))
}
