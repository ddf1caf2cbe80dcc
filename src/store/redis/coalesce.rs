//! Requests waiting for the same server share one script call.
//!
//! A script call has a fixed cost on both sides: Redis parses the command, finds the
//! script, sets up its KEYS and ARGV and wakes for a socket read and write; meshlimit
//! encodes, sends and decodes one command. Under load many requests wait for the same
//! server at once, so each node keeps a queue: a few calls are in flight at a time, and
//! the requests that arrived while they were away go together in the next one. Nothing
//! waits for company: a lone request is sent at once, as before. Each request's checks are
//! still applied atomically and in order (the script applies the requests of a call one
//! after another, inside one atomic call).
//!
//! Only a standalone server and Sentinel's master are called this way: on a cluster, one
//! call may only touch one slot, and requests rarely share one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::{Pipeline, Script, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::node::{Node, NodeError};
use super::script::{self, Encoded};

/// Calls in flight per node: one being run by Redis while the next travels, and one more
/// so a slow reply does not stall the queue.
const IN_FLIGHT: usize = 3;
/// A call's size is bounded: Redis runs a script without serving anyone else, so one call
/// of many checks would hold every other client up.
const MAX_CHECKS_PER_CALL: usize = 128;
/// Requests waiting for a node beyond this are answered by the failure policy: a server
/// that far behind will not answer them within their deadline anyway.
const MAX_WAITING: usize = 8_192;

struct Waiting {
    request: Encoded,
    answer: oneshot::Sender<Result<Value, NodeError>>,
}

/// One node's queue of requests, and the task that sends them.
pub struct Queue {
    waiting: mpsc::Sender<Waiting>,
}

impl Queue {
    /// Starts the task sending `node`'s calls; it ends when the queue is dropped with
    /// the node. `timeout` bounds each call (the callers also bound their own wait).
    pub fn start(node: Weak<Node>, script: Script, timeout: Duration) -> Self {
        let (waiting, queue) = mpsc::channel(MAX_WAITING);
        tokio::spawn(send_calls(node, queue, script, timeout));
        Self { waiting }
    }

    /// Applies `request` in the next call to the node; its answer (three packed numbers a
    /// check), or why there is none.
    pub async fn call(&self, request: Encoded) -> Result<Value, NodeError> {
        let (answer, answered) = oneshot::channel();
        self.waiting
            .try_send(Waiting { request, answer })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => NodeError::failed(format!(
                    "{MAX_WAITING} requests are already waiting for this server"
                )),
                mpsc::error::TrySendError::Closed(_) => {
                    NodeError::failed("the server's queue is closed")
                }
            })?;
        answered
            .await
            .map_err(|_| NodeError::failed("the call carrying this request was dropped"))?
    }
}

async fn send_calls(
    node: Weak<Node>,
    mut queue: mpsc::Receiver<Waiting>,
    script: Script,
    timeout: Duration,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        // Whatever queued up while every call was away goes in this one.
        let mut checks = first.request.checks;
        let mut call = vec![first];
        while checks < MAX_CHECKS_PER_CALL {
            match queue.try_recv() {
                Ok(next) => {
                    checks += next.request.checks;
                    call.push(next);
                }
                Err(_) => break,
            }
        }
        let Some(node) = node.upgrade() else {
            return;
        };
        let script = script.clone();
        tokio::spawn(async move {
            send_call(&node, call, &script, timeout).await;
            drop(permit);
        });
    }
}

/// One script call for `call`'s requests; each gets its part of the answer, or the error.
async fn send_call(node: &Node, call: Vec<Waiting>, script: &Script, timeout: Duration) {
    // A request whose caller stopped waiting (its deadline passed) is not sent: after a
    // stall, Redis is not made to work through a backlog nobody waits for.
    let call: Vec<Waiting> = call
        .into_iter()
        .filter(|waiting| !waiting.answer.is_closed())
        .collect();
    if call.is_empty() {
        return;
    }
    let mut pipeline = Pipeline::with_capacity(1);
    // NOSCRIPT comes back as a value, which `Node::run` answers by loading the script.
    pipeline.ignore_errors();
    pipeline.add_command(script::evalsha(
        script,
        call.iter().map(|waiting| &waiting.request),
    ));
    let answers = match tokio::time::timeout(timeout, node.run(&pipeline, script)).await {
        Ok(Ok(mut values)) if values.len() == 1 => values
            .pop()
            .ok_or_else(|| NodeError::failed("no reply to the script call"))
            .and_then(|value| {
                script::split(value, call.iter().map(|w| w.request.checks))
                    .map_err(NodeError::failed)
            }),
        Ok(Ok(values)) => Err(NodeError::failed(format!(
            "{} replies to one script call",
            values.len()
        ))),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(NodeError::failed(format!(
            "did not answer within {timeout:?}"
        ))),
    };
    match answers {
        Ok(answers) => {
            for (waiting, answer) in call.into_iter().zip(answers) {
                // A caller that gave up meanwhile has its failure-policy answer already.
                let _ = waiting.answer.send(Ok(answer));
            }
        }
        Err(error) => {
            for waiting in call {
                let _ = waiting.answer.send(Err(error.clone()));
            }
        }
    }
}
