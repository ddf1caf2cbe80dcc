//! Redis Cluster topology: which master serves which slot, read with `CLUSTER SLOTS` from
//! any reachable node and refreshed when a node answers MOVED/ASK/CLUSTERDOWN or fails.
//!
//! meshlimit keeps its own slot map (rather than redis-rs's cluster client) because it
//! needs to know the node of each slot before sending: the groups of one request are split
//! by node, each node gets one pipelined round trip, and each node has its own circuit
//! breaker, so one dead master only sends its own slots to the failure policy.

use std::collections::HashMap;
use std::sync::Arc;

use redis::{ConnectionAddr, ConnectionInfo, Value};

use super::node::Node;

pub const SLOTS: usize = 16_384;

/// The masters and the slots each serves. `owner[slot]` indexes `nodes`.
pub struct SlotMap {
    pub nodes: Vec<Arc<Node>>,
    pub owner: Vec<Option<u16>>,
}

impl SlotMap {
    pub fn empty() -> Self {
        Self {
            nodes: Vec::new(),
            owner: vec![None; SLOTS],
        }
    }

    pub fn node_of(&self, slot: u16) -> Option<(usize, &Arc<Node>)> {
        let index = usize::from((*self.owner.get(usize::from(slot))?)?);
        Some((index, self.nodes.get(index)?))
    }
}

/// Builds a slot map from a `CLUSTER SLOTS` reply. Nodes already known (by `host:port`) are
/// reused with their connection and breaker; new ones get `seed`'s credentials and TLS.
pub fn parse_slots(
    reply: &Value,
    seed: &ConnectionInfo,
    known: &HashMap<String, Arc<Node>>,
) -> Result<SlotMap, String> {
    let Value::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS answered {reply:?}"));
    };
    let mut map = SlotMap::empty();
    let mut index_of: HashMap<String, u16> = HashMap::new();
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let (Some(start), Some(end), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let (Some(start), Some(end)) = (int(start), int(end)) else {
            continue;
        };
        let host = master.first().and_then(text).unwrap_or_default();
        let port = master.get(1).and_then(int).unwrap_or(0);
        let seed_host = match seed.addr() {
            ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
            _ => String::new(),
        };
        // An empty or `?` endpoint means "the address you reached me on": the seed's host.
        let host = if host.is_empty() || host == "?" {
            seed_host
        } else {
            host
        };
        let port = u16::try_from(port).map_err(|_| format!("bad port {port} in CLUSTER SLOTS"))?;
        let name = format!("{host}:{port}");
        let index = match index_of.get(&name) {
            Some(index) => *index,
            None => {
                let node = match known.get(&name) {
                    Some(node) => node.clone(),
                    None => Arc::new(
                        Node::new(name.clone(), with_addr(seed, host, port)?)
                            .map_err(|error| error.to_string())?,
                    ),
                };
                let index = map.nodes.len() as u16;
                map.nodes.push(node);
                index_of.insert(name, index);
                index
            }
        };
        for slot in start..=end.min(SLOTS as i64 - 1) {
            if let Some(owner) = usize::try_from(slot)
                .ok()
                .and_then(|s| map.owner.get_mut(s))
            {
                *owner = Some(index);
            }
        }
    }
    Ok(map)
}

/// `seed`'s connection settings (auth, TLS, database) for another node.
pub fn with_addr(seed: &ConnectionInfo, host: String, port: u16) -> Result<ConnectionInfo, String> {
    let addr = match seed.addr() {
        ConnectionAddr::Tcp(..) => ConnectionAddr::Tcp(host, port),
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => {
            return Err("a Redis Cluster can only be reached over TCP (host:port)".into());
        }
    };
    Ok(seed.clone().set_addr(addr))
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}
