//! One Redis server (a standalone server or a cluster master): its connection, reconnected
//! on demand, and its circuit breaker.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionInfo, Pipeline, Script, Value};

use super::breaker::Breaker;
use super::coalesce::Queue;
use super::script::Encoded;

/// Why a call to a node gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    /// Another request is connecting right now; rather than queue behind it, this request
    /// takes the failure policy. Not counted against the node.
    #[error("another request is connecting")]
    Connecting,
    /// The node failed the call. `redirect` marks answers that mean the node no longer
    /// serves these keys (MOVED, ASK, CLUSTERDOWN… on a cluster, READONLY from a master
    /// Sentinel has demoted): the slot map or the master's address is stale.
    #[error("{message}")]
    Failed { message: String, redirect: bool },
    /// The TLS handshake failed over certificates: waiting will not help, the settings must
    /// change, so start-up stops on it instead of running degraded.
    #[error("{0}")]
    Untrusted(String),
}

impl NodeError {
    pub fn failed(message: impl Into<String>) -> Self {
        NodeError::Failed {
            message: message.into(),
            redirect: false,
        }
    }
}

pub struct Node {
    /// `host:port`, for logs and the cluster's node table.
    pub name: String,
    client: Client,
    // Held only to clone the connection out or put one in; never across an await.
    connection: Mutex<Option<MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
    pub breaker: Breaker,
    /// Requests waiting to share a script call (see `coalesce`); started by the first.
    queue: OnceLock<Queue>,
}

impl Node {
    pub fn new(name: String, info: ConnectionInfo) -> redis::RedisResult<Self> {
        Ok(Self {
            client: Client::open(info)?,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker::new(name.clone()),
            name,
            queue: OnceLock::new(),
        })
    }

    /// Applies one request's checks in the next script call to this node, together with
    /// whatever other requests are waiting for it; its answer, or why there is none.
    pub async fn call(
        self: &Arc<Self>,
        request: Encoded,
        script: &Script,
        timeout: Duration,
    ) -> Result<Value, NodeError> {
        self.queue
            .get_or_init(|| Queue::start(Arc::downgrade(self), script.clone(), timeout))
            .call(request)
            .await
    }

    async fn connection(&self) -> Result<MultiplexedConnection, NodeError> {
        if let Some(connection) = self.connection.lock().clone() {
            return Ok(connection);
        }
        // One connect at a time per node: the others answer from the failure policy instead
        // of piling onto a server that may be down.
        let Ok(_connecting) = self.connecting.try_lock() else {
            return Err(NodeError::Connecting);
        };
        if let Some(connection) = self.connection.lock().clone() {
            return Ok(connection);
        }
        // The caller bounds the whole call with its deadline; no timeout of redis-rs's own
        // is needed (its default response timeout would only add a second clock).
        let config = AsyncConnectionConfig::new().set_response_timeout(None);
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|error| {
                let message = format!("cannot connect: {error}");
                if is_certificate_error(&error) {
                    NodeError::Untrusted(format!(
                        "{message}; if the server's certificate is signed by a private CA, pass \
                         that CA with --redis-tls-ca FILE (REDIS_TLS_CACERT), and if the server \
                         asks for a client certificate, --redis-tls-cert and --redis-tls-key"
                    ))
                } else {
                    NodeError::failed(message)
                }
            })?;
        *self.connection.lock() = Some(connection.clone());
        Ok(connection)
    }

    /// A subscription of its own to `channel`: a connection apart from the decisions', as
    /// a subscribed connection can do nothing else.
    pub async fn pubsub(&self, channel: &str) -> redis::RedisResult<redis::aio::PubSub> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    }

    /// One PING within `timeout`, its outcome recorded in the breaker as a call's is: how a
    /// replica that gets no requests (one whose health checks fail) still sees Redis go
    /// and come back.
    pub async fn ping(&self, timeout: Duration) {
        let pinged = tokio::time::timeout(timeout, async {
            let mut connection = self.connection().await?;
            redis::cmd("PING")
                .query_async::<Value>(&mut connection)
                .await
                .map_err(|error| self.broken(&error))
        })
        .await;
        match pinged {
            Ok(Ok(_)) => self.breaker.success(),
            // Another task connecting: that one's outcome will count.
            Ok(Err(NodeError::Connecting)) => {}
            Ok(Err(error)) => self.breaker.failure(&error.to_string()),
            Err(_) => self
                .breaker
                .failure(&format!("no answer to PING in {timeout:?}")),
        }
    }

    /// Forgets the connection, so the next call connects anew (after the server restarted,
    /// or the connection broke).
    pub fn reset(&self) {
        self.connection.lock().take();
    }

    /// Sends `pipeline` (one or more EVALSHA of `script`) in one round trip and returns one
    /// value per command. A server that lost the script (restarted, or flushed) answers
    /// NOSCRIPT: the script is loaded and the pipeline sent once more.
    pub async fn run(&self, pipeline: &Pipeline, script: &Script) -> Result<Vec<Value>, NodeError> {
        no_server_error(self.run_values(pipeline, script).await?)
    }

    /// As `run`, with each command's server error (MOVED, …) left in its place for the
    /// caller to deal with.
    pub async fn run_values(
        &self,
        pipeline: &Pipeline,
        script: &Script,
    ) -> Result<Vec<Value>, NodeError> {
        let mut connection = self.connection().await?;
        let mut values = self.query(pipeline, &mut connection).await?;
        if values.iter().any(is_noscript) {
            script
                .prepare_invoke()
                .load_async(&mut connection)
                .await
                .map_err(|error| self.broken(&error))?;
            values = self.query(pipeline, &mut connection).await?;
        }
        Ok(values)
    }

    async fn query(
        &self,
        pipeline: &Pipeline,
        connection: &mut MultiplexedConnection,
    ) -> Result<Vec<Value>, NodeError> {
        pipeline
            .query_async::<Vec<Value>>(connection)
            .await
            .map_err(|error| self.broken(&error))
    }

    fn broken(&self, error: &redis::RedisError) -> NodeError {
        if error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error() {
            self.reset();
        }
        NodeError::failed(error.to_string())
    }
}

/// Whether a failed connect was a TLS certificate problem: the server's certificate not
/// trusted or not for this host (rustls: "invalid peer certificate"), or the server
/// refusing ours ("received fatal alert"). redis-rs hands the rustls error over inside a
/// shared `dyn Error` that cannot be downcast, so its text is what there is to go by.
fn is_certificate_error(error: &redis::RedisError) -> bool {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text.contains("invalid peer certificate") || text.contains("received fatal alert")
}

/// `values`, or the failure the first server error among them stands for.
pub fn no_server_error(values: Vec<Value>) -> Result<Vec<Value>, NodeError> {
    if let Some(Value::ServerError(error)) =
        values.iter().find(|v| matches!(v, Value::ServerError(_)))
    {
        let code = error.code();
        return Err(NodeError::Failed {
            message: format!("{code} {}", error.details().unwrap_or_default()),
            redirect: matches!(
                code,
                "MOVED"
                    | "ASK"
                    | "CLUSTERDOWN"
                    | "TRYAGAIN"
                    | "MASTERDOWN"
                    | "CROSSSLOT"
                    | "READONLY"
            ),
        });
    }
    Ok(values)
}

/// A cluster node's MOVED or ASK answer: whether it is ASK, and the `host:port` it names.
pub fn redirect_of(value: &Value) -> Option<(bool, &str)> {
    let Value::ServerError(error) = value else {
        return None;
    };
    let ask = match error.code() {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    // `<slot> <host:port>`
    let to = error.details()?.split_whitespace().nth(1)?;
    Some((ask, to))
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.code() == "NOSCRIPT")
}
