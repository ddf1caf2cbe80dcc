//! Redis Sentinel: which server is the master now, asked of the sentinels with
//! `SENTINEL get-master-addr-by-name`, and asked again when the master fails, answers
//! READONLY (Sentinel demoted it), or once a second in case a failover went unnoticed.
//!
//! meshlimit resolves the master itself rather than through redis-rs's sentinel client so
//! that the master is one `Node` like a standalone server: the same deadline, circuit
//! breaker and failure policy apply to it. The look-up runs beside the requests, never in
//! their way — while the master is unknown or failing, requests are answered by the failure
//! policy within their deadline, and the first request after the switch goes to the new
//! master.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::{ConnectionInfo, Script, Value};

use super::cluster::with_addr;
use super::node::{Node, NodeError};
use super::script;

pub struct Sentinel {
    /// The name the sentinels monitor the master under.
    master_name: String,
    sentinels: Vec<Arc<Node>>,
    /// The sentinel that answered last, asked first next time (as the Sentinel client
    /// guidelines say), so a dead first sentinel costs one timeout, not one per look-up.
    preferred: AtomicUsize,
    /// The master's credentials, TLS and database; its address comes from the sentinels.
    master_info: ConnectionInfo,
    /// The master in use; `None` until a sentinel has named one that says it is a master.
    master: ArcSwapOption<Node>,
    /// Set when the master failed a call; the background loop asks the sentinels soon.
    stale: AtomicBool,
    resolving: tokio::sync::Mutex<()>,
}

/// How often a stale master is looked at: a failover is followed this soon after the
/// sentinels announce it.
pub const STALE_CHECK: Duration = Duration::from_millis(100);
/// How often the sentinels are asked even when the master answers.
pub const REFRESH: Duration = Duration::from_secs(1);

impl Sentinel {
    pub fn new(
        master_name: String,
        sentinels: Vec<(String, ConnectionInfo)>,
        master_info: ConnectionInfo,
    ) -> Result<Self, String> {
        let sentinels = sentinels
            .into_iter()
            .map(|(name, info)| {
                Node::new(name, info)
                    .map(Arc::new)
                    .map_err(|error| error.to_string())
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            master_name,
            sentinels,
            preferred: AtomicUsize::new(0),
            master_info,
            master: ArcSwapOption::empty(),
            stale: AtomicBool::new(true),
            resolving: tokio::sync::Mutex::new(()),
        })
    }

    pub fn master(&self) -> Option<Arc<Node>> {
        self.master.load_full()
    }

    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// Asks the sentinels for the master and switches to it when it moved. Each call waits
    /// at most `wait`; another look-up already under way makes this one return at once.
    pub async fn resolve(&self, wait: Duration, script: &Script) -> Result<(), NodeError> {
        let Ok(_resolving) = self.resolving.try_lock() else {
            return Ok(());
        };
        self.stale.store(false, Ordering::Release);
        let outcome = self.switch(wait, script).await;
        if outcome.is_err() {
            self.mark_stale();
        }
        outcome
    }

    async fn switch(&self, wait: Duration, script: &Script) -> Result<(), NodeError> {
        let (host, port) = self.ask(wait, script).await?;
        let name = format!("{host}:{port}");
        let current = self.master.load_full();
        if let Some(current) = &current
            && current.name == name
        {
            return Ok(());
        }
        let info = with_addr(&self.master_info, host, port).map_err(NodeError::failed)?;
        let node =
            Arc::new(Node::new(name.clone(), info).map_err(|e| NodeError::failed(e.to_string()))?);
        // A sentinel can name a server that has not finished becoming master (or that is
        // gone): only a server whose ROLE says master takes writes. The script is loaded in
        // the same round trip, so the first request does not pay for it.
        let mut check = redis::pipe();
        check.cmd("ROLE");
        check.cmd("SCRIPT").arg("LOAD").arg(script::SOURCE);
        let values = match tokio::time::timeout(wait, node.run(&check, script)).await {
            Ok(Ok(values)) => values,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(NodeError::failed(format!(
                    "{name}, named master by the sentinels, did not answer ROLE within {wait:?}"
                )));
            }
        };
        let role = match values.first() {
            Some(Value::Array(fields)) => fields.first().and_then(text),
            _ => None,
        };
        if role.as_deref() != Some("master") {
            return Err(NodeError::failed(format!(
                "{name}, named master by the sentinels, is still {} (a failover under way?)",
                role.as_deref().unwrap_or("of an unknown role")
            )));
        }
        match &current {
            Some(old) => tracing::warn!(
                master = %self.master_name,
                from = %old.name,
                to = %name,
                "redis sentinel names a new master; counting there"
            ),
            None => {
                tracing::info!(master = %self.master_name, at = %name, "redis sentinel names the master")
            }
        }
        self.master.store(Some(node));
        Ok(())
    }

    /// `host, port` of the master, from the first sentinel that knows it.
    async fn ask(&self, wait: Duration, script: &Script) -> Result<(String, u16), NodeError> {
        let mut question = redis::pipe();
        question
            .cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name);
        let count = self.sentinels.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut problems = Vec::new();
        for offset in 0..count {
            let index = (first + offset) % count;
            let Some(sentinel) = self.sentinels.get(index) else {
                continue;
            };
            let reply = match tokio::time::timeout(wait, sentinel.run(&question, script)).await {
                Ok(Ok(mut values)) if !values.is_empty() => values.swap_remove(0),
                Ok(Ok(_)) => {
                    problems.push(format!("{}: no reply", sentinel.name));
                    continue;
                }
                Ok(Err(NodeError::Untrusted(message))) => {
                    return Err(NodeError::Untrusted(format!(
                        "sentinel {}: {message}",
                        sentinel.name
                    )));
                }
                Ok(Err(error)) => {
                    problems.push(format!("{}: {error}", sentinel.name));
                    continue;
                }
                Err(_) => {
                    problems.push(format!("{}: no answer within {wait:?}", sentinel.name));
                    continue;
                }
            };
            match address(&reply) {
                Some(address) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(address);
                }
                None => problems.push(format!(
                    "{} does not monitor a master named `{}` (answered {reply:?}); check the \
                     name in --redis-sentinel against the sentinels' `sentinel monitor` line",
                    sentinel.name, self.master_name
                )),
            }
        }
        Err(NodeError::failed(format!(
            "no sentinel named the master: {}",
            problems.join("; ")
        )))
    }
}

/// The `[host, port]` reply of `SENTINEL get-master-addr-by-name`; nil for an unknown name.
fn address(reply: &Value) -> Option<(String, u16)> {
    let Value::Array(fields) = reply else {
        return None;
    };
    let host = fields.first().and_then(text)?;
    let port = fields.get(1).and_then(text)?.parse().ok()?;
    Some((host, port))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_master_address_and_refuses_anything_else() {
        let reply = Value::Array(vec![
            Value::BulkString(b"10.0.0.7".to_vec()),
            Value::BulkString(b"6380".to_vec()),
        ]);
        assert_eq!(address(&reply), Some(("10.0.0.7".into(), 6380)));
        assert_eq!(address(&Value::Nil), None);
        let bad_port = Value::Array(vec![
            Value::BulkString(b"h".to_vec()),
            Value::BulkString(b"x".to_vec()),
        ]);
        assert_eq!(address(&bad_port), None);
    }
}
