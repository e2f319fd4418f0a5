//! Registration of running sandboxes and reaping of those whose VM dies on its own.

use std::sync::Arc;

use firkin_admission::ResourceBudget;
use firkin_types::SandboxId;

use super::admission::grant_waiters;
use super::{Active, RuntimeLauncher, SandboxExit, SandboxRuntime, lock, stop_all};
use crate::session::SandboxSession;

impl<L> SandboxRuntime<L>
where
    L: RuntimeLauncher,
{
    pub(super) fn register(
        &self,
        id: &SandboxId,
        session: Arc<L::Session>,
        budget: ResourceBudget,
    ) {
        lock(&self.inner.state).active.insert(
            id.clone(),
            Active {
                session: Arc::clone(&session),
                budget,
                pausing: false,
            },
        );
        let rt = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            session.exited().await;
            rt.on_exit(&id, &session);
        });
    }

    fn on_exit(&self, id: &SandboxId, session: &Arc<L::Session>) {
        let mut st = lock(&self.inner.state);
        let ours = st
            .active
            .get(id)
            .is_some_and(|a| Arc::ptr_eq(&a.session, session) && !a.pausing);
        if !ours {
            return;
        }
        if let Some(a) = st.active.remove(id) {
            if let Err(err) = st.ledger.release_active(a.budget) {
                tracing::error!(%err, "releasing a dead sandbox");
            }
            let mut evicted = grant_waiters(&mut st);
            drop(st);
            // Stopping a dead VM cleans up what it left: run directory, overlay, sockets.
            evicted.push(a.session);
            stop_all(evicted);
            self.inner.refill.notify_one();
            tracing::warn!(sandbox = %id, "sandbox VM exited on its own");
            let _ = self.inner.exits.send(SandboxExit {
                sandbox_id: id.clone(),
                reason: "the sandbox VM exited".into(),
            });
        }
    }
}
