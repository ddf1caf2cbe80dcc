//! The service Envoy protects in the end-to-end tests: an HTTP/1.1 server on loopback that
//! answers every request with 200 and a JSON echo of what it received (and any header the
//! request asks for with `x-respond-header`), and remembers it.
//!
//! It runs on its own threads, not on a test's tokio runtime, so a test may block on an
//! HTTP call through Envoy without starving the server that has to answer it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Map, Value, json};

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The echo body: `{"method", "path", "headers": {name: value}}`, repeated header
    /// values joined with ", " as HTTP allows.
    pub fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for (name, value) in &self.headers {
            match headers.get_mut(name) {
                Some(Value::String(joined)) => {
                    joined.push_str(", ");
                    joined.push_str(value);
                }
                _ => {
                    headers.insert(name.clone(), Value::String(value.clone()));
                }
            }
        }
        json!({ "method": self.method, "path": self.path, "headers": headers })
    }
}

pub struct EchoUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl EchoUpstream {
    pub fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo upstream");
        let addr = listener.local_addr().expect("echo upstream address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let received = Arc::clone(&received);
            let stopping = Arc::clone(&stopping);
            std::thread::spawn(move || accept_loop(listener, received, stopping))
        };
        EchoUpstream {
            addr,
            received,
            stopping,
            acceptor: Some(acceptor),
        }
    }

    /// Every request received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("echo log lock").clone()
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // `accept` only returns when a connection arrives, so make one.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    received: Arc<Mutex<Vec<Received>>>,
    stopping: Arc<AtomicBool>,
) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let received = Arc::clone(&received);
        let stopping = Arc::clone(&stopping);
        // Connection threads are detached: Envoy keeps upstream connections open, and they
        // end on their own when Envoy closes them or the idle timeout below passes.
        std::thread::spawn(move || {
            let _ = serve_connection(stream, &received, &stopping);
        });
    }
}

/// Answers requests on one keep-alive connection until the peer closes it.
fn serve_connection(
    stream: TcpStream,
    received: &Mutex<Vec<Received>>,
    stopping: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while !stopping.load(Ordering::SeqCst) {
        let Some(request) = read_request(&mut reader)? else {
            return Ok(());
        };
        let body = request.to_json().to_string();
        // `x-respond-header: name=value` asks for that header on the response: what an
        // upstream reports about the work it did (an LLM's `x-tokens-used`).
        let extra = request
            .header("x-respond-header")
            .and_then(|asked| asked.split_once('='))
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .unwrap_or_default();
        received.lock().expect("echo log lock").push(request);
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
    }
    Ok(())
}

/// Reads one request head (and skips its body); `None` when the peer closed cleanly.
fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Received>> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(None);
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();

    let mut headers = Vec::new();
    loop {
        // Header values may hold bytes that are not UTF-8 (obs-text), which Envoy passes on.
        let mut raw = Vec::new();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }

    // The tests send GETs; a body, if any, must still be consumed to keep the connection
    // in step. Envoy sends HTTP/1.1 bodies with content-length or not at all here.
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse::<u64>().ok())
        .unwrap_or(0);
    std::io::copy(&mut reader.by_ref().take(length), &mut std::io::sink())?;

    Ok(Some(Received {
        method,
        path,
        headers,
    }))
}
