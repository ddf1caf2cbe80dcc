//! One Redis server (a standalone server or a cluster master): its connection, reconnected
//! on demand, and its circuit breaker.

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionInfo, Pipeline, Script, Value};

use super::breaker::Breaker;

/// Why a call to a node gave no answer.
#[derive(Debug)]
pub enum NodeError {
    /// Another request is connecting right now; rather than queue behind it, this request
    /// takes the failure policy. Not counted against the node.
    Connecting,
    /// The node failed the call. `redirect` marks cluster answers (MOVED, ASK, CLUSTERDOWN…)
    /// that mean the slot map is stale.
    Failed { message: String, redirect: bool },
}

impl NodeError {
    fn failed(message: impl Into<String>) -> Self {
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
}

impl Node {
    pub fn new(name: String, info: ConnectionInfo) -> redis::RedisResult<Self> {
        Ok(Self {
            client: Client::open(info)?,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker::new(name.clone()),
            name,
        })
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
            .map_err(|error| NodeError::failed(format!("cannot connect: {error}")))?;
        *self.connection.lock() = Some(connection.clone());
        Ok(connection)
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
        if let Some(Value::ServerError(error)) =
            values.iter().find(|v| matches!(v, Value::ServerError(_)))
        {
            let code = error.code();
            return Err(NodeError::Failed {
                message: format!("{code} {}", error.details().unwrap_or_default()),
                redirect: matches!(
                    code,
                    "MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "CROSSSLOT"
                ),
            });
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

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.code() == "NOSCRIPT")
}
