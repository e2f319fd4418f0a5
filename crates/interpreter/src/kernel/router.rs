//! One reader task per kernel socket hands every message to the run that caused it (by the
//! parent header's `msg_id`), so concurrent readers never steal each other's messages and a
//! run sees exactly its own output.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use jupyter_protocol::JupyterMessage;
use jupyter_zmq_client::{Connection, RuntimeError};
use tokio::sync::mpsc;

/// Which socket a message came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    IoPub,
    Shell,
    Control,
}

/// A kernel message for one run.
#[derive(Debug)]
pub struct Routed {
    pub from: From,
    pub msg: JupyterMessage,
}

type Routes = HashMap<String, mpsc::UnboundedSender<Routed>>;

/// The routing table; `None` once the kernel is gone, so that new runs fail at once.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Arc<Mutex<Option<Routes>>>,
}

impl Router {
    pub fn new() -> Self {
        Self {
            routes: Arc::new(Mutex::new(Some(HashMap::new()))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Routes>> {
        // A panic while holding the lock leaves a plain map behind, which is still consistent.
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages whose parent is `msg_id`; `None` if the kernel has already gone.
    pub fn register(&self, msg_id: &str) -> Option<mpsc::UnboundedReceiver<Routed>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().as_mut()?.insert(msg_id.to_owned(), tx);
        Some(rx)
    }

    pub fn unregister(&self, msg_id: &str) {
        if let Some(routes) = self.lock().as_mut() {
            routes.remove(msg_id);
        }
    }

    fn deliver(&self, from: From, msg: JupyterMessage) {
        let Some(parent) = msg.parent_header.as_ref().map(|h| h.msg_id.clone()) else {
            return;
        };
        let guard = self.lock();
        match guard.as_ref().and_then(|r| r.get(&parent)) {
            Some(tx) => {
                // A run that stopped listening has nothing left to tell.
                let _ = tx.send(Routed { from, msg });
            }
            None => tracing::trace!(msg_type = %msg.header.msg_type, "kernel message for no run"),
        }
    }

    /// The kernel is gone: every waiting run sees its channel close.
    pub fn close(&self) {
        self.lock().take();
    }
}

/// Reads one socket until it fails, delivering each message.
pub async fn read_loop<S: zeromq::SocketRecv>(
    mut conn: Connection<S>,
    from: From,
    router: Router,
    language: String,
) {
    loop {
        match conn.read().await {
            Ok(msg) => router.deliver(from, msg),
            Err(RuntimeError::ZmqError(e)) => {
                tracing::debug!(%language, ?from, error = %e, "kernel socket closed");
                return;
            }
            // ipykernel 6's interrupt_reply lacks `status`; nothing on control matters enough
            // to warn about.
            Err(e) if from == From::Control => {
                tracing::debug!(%language, error = %e, "unparsed control message");
            }
            // A message we cannot parse or verify is dropped; the next one may be fine.
            Err(e) => tracing::warn!(%language, ?from, error = %e, "bad kernel message"),
        }
    }
}
