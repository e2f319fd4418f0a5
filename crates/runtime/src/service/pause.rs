//! Pause: saving a running sandbox as a sealed continuation snapshot. Resume is an ordinary
//! start from that snapshot.

use std::path::Path;
use std::sync::Arc;

use firkin_admission::ResourceBudget;
use firkin_artifacts::{SealedSnapshot, SnapshotArtifactIntegrity, SnapshotArtifactKind};
use firkin_types::SandboxId;

use super::admission::grant_waiters;
use super::{
    PausedSandbox, RuntimeError, RuntimeLauncher, SNAPSHOT_DESCRIPTOR, SandboxRuntime, lock,
    stop_all,
};
use crate::restore::IntegrityFailure;
use crate::session::SandboxSession;

impl<L> SandboxRuntime<L>
where
    L: RuntimeLauncher,
{
    /// Saves a running sandbox as a sealed continuation snapshot in `dir`, stops it and gives
    /// its capacity back. On failure the sandbox keeps running when it still can.
    pub async fn pause(&self, id: &SandboxId, dir: &Path) -> Result<PausedSandbox, RuntimeError> {
        let (session, budget) = {
            let mut st = lock(&self.inner.state);
            let a = st
                .active
                .get_mut(id)
                .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
            if a.pausing {
                return Err(RuntimeError::NotFound(id.clone()));
            }
            a.pausing = true;
            (Arc::clone(&a.session), a.budget)
        };
        let result = self.pause_inner(id, &session, budget, dir).await;
        let mut st = lock(&self.inner.state);
        match &result {
            Ok(_) => {
                if st.active.remove(id).is_some()
                    && let Err(err) = st.ledger.release_active(budget)
                {
                    tracing::error!(%err, "releasing a paused sandbox");
                }
                let evicted = grant_waiters(&mut st);
                drop(st);
                stop_all(evicted);
                self.inner.refill.notify_one();
            }
            Err(_) => {
                if session.is_alive() {
                    if let Some(a) = st.active.get_mut(id) {
                        a.pausing = false;
                    }
                } else if st.active.remove(id).is_some() {
                    let _ = st.ledger.release_active(budget);
                    grant_waiters(&mut st);
                }
            }
        }
        result
    }

    async fn pause_inner(
        &self,
        id: &SandboxId,
        session: &Arc<L::Session>,
        budget: ResourceBudget,
        dir: &Path,
    ) -> Result<PausedSandbox, RuntimeError> {
        let io = |source| RuntimeError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let saved = session
            .save_continuation(dir)
            .await
            .map_err(|e| RuntimeError::Pause {
                sandbox_id: id.clone(),
                reason: e.to_string(),
            })?;
        let depends_on = saved.depends_on.clone();
        let cache = Arc::clone(&self.inner.cache);
        let dir2 = dir.to_path_buf();
        let id2 = id.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            let components: Vec<(&str, &str)> = saved
                .components
                .iter()
                .map(|(n, f)| (n.as_str(), f.as_str()))
                .collect();
            SealedSnapshot::seal(
                &dir2,
                SNAPSHOT_DESCRIPTOR,
                SnapshotArtifactKind::Continuation,
                id2.as_str(),
                &components,
                saved.machine.clone(),
                &cache,
            )
        })
        .await
        .map_err(|e| io(std::io::Error::other(e.to_string())))??;
        let descriptor = sealed.1.path().to_path_buf();
        let integrity = SnapshotArtifactIntegrity::from_path(&descriptor).map_err(|e| {
            RuntimeError::Integrity {
                artifact: descriptor.clone(),
                source: IntegrityFailure::Artifact(e),
            }
        })?;
        // save_continuation stopped the VM; make sure its run directory is gone too.
        let _ = session.stop().await;
        Ok(PausedSandbox {
            sandbox_id: id.clone(),
            descriptor,
            integrity,
            budget,
            depends_on,
        })
    }
}
