//! Operations on one existing sandbox: kill, pause, resume (`connect`, the v1 resume and the
//! proxy's auto-resume), and changes to its lifetime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use firkin_artifacts::{DigestCache, SnapshotArtifactIntegrity};
use firkin_runtime::{PausedSandbox, RuntimeError, SandboxSource, StartSandbox};
use firkin_types::SandboxId;

use super::create::envd_init;
use crate::app::{App, now_ms, remove_dir, secs_ms, store_err};
use crate::auth::random_alnum;
use crate::error::ApiError;
use crate::store::{RecordState, SandboxRecord, SnapshotRecord};

impl App {
    pub(crate) async fn kill(&self, id: &SandboxId) -> Result<(), ApiError> {
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        self.kill_locked(&record).await;
        Ok(())
    }

    pub(super) async fn kill_locked(&self, record: &SandboxRecord) {
        let id = &record.sandbox_id;
        if record.state != RecordState::Paused {
            match self.rt.kill(id).await {
                Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                // The runtime has let go of it either way; its run directory is the launcher's.
                Err(err) => tracing::warn!(sandbox = %id, %err, "stopping sandbox"),
            }
        }
        self.forget(id);
        tracing::info!(sandbox = %id, "sandbox killed");
    }

    // ------------------------------------------------------------------ pause / resume

    /// Returns `false` if the sandbox was already paused (409 for the SDK).
    pub(crate) async fn pause(&self, id: &SandboxId) -> Result<bool, ApiError> {
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        if record.state == RecordState::Paused {
            return Ok(false);
        }
        self.pause_locked(&record).await?;
        Ok(true)
    }

    pub(super) async fn pause_locked(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        let id = &record.sandbox_id;
        let snapshot_id = random_alnum(12);
        let dir = self
            .config
            .paths
            .snapshots_dir()
            .join(id.as_str())
            .join(&snapshot_id);
        let started = Instant::now();
        match self.rt.pause(id, &dir).await {
            Ok(paused) => {
                let snap = SnapshotRecord {
                    snapshot_id,
                    sandbox_id: id.clone(),
                    dir,
                    descriptor: paused.descriptor,
                    integrity: paused.integrity,
                    created_ms: now_ms(),
                };
                if let Err(err) = self.store.mark_paused(id, &snap) {
                    // The VM is gone and the database does not know the snapshot: nothing could
                    // ever resume it, so do not keep it.
                    self.forget(id);
                    return Err(store_err(err));
                }
                tracing::info!(sandbox = %id, ms = started.elapsed().as_millis() as u64, "sandbox paused");
                self.drop_superseded_snapshots(id, &paused.depends_on);
                self.warm_digests_later(snap.descriptor, snap.integrity);
                Ok(())
            }
            Err(err) => {
                remove_dir(&dir);
                if self.rt.is_running(id) {
                    tracing::warn!(sandbox = %id, %err, "pause failed; sandbox keeps running");
                    Err(crate::error::from_runtime(&err))
                } else {
                    tracing::warn!(sandbox = %id, %err, "pause failed and the sandbox is gone");
                    self.forget(id);
                    Err(ApiError::sandbox_not_found(id.as_str()))
                }
            }
        }
    }

    /// A sandbox paused again no longer needs its earlier continuations (the new one's disk was
    /// flattened onto the template): each held a full RAM image, ~130 MiB on disk for `base`.
    /// Failing here only leaves files behind; the pause itself succeeded.
    fn drop_superseded_snapshots(&self, id: &SandboxId, depends_on: &[PathBuf]) {
        match self.store.drop_superseded_snapshots(id, depends_on) {
            Ok(dirs) => {
                for dir in &dirs {
                    remove_dir(dir);
                }
                if !dirs.is_empty() {
                    tracing::debug!(sandbox = %id, removed = dirs.len(), "earlier continuations deleted");
                }
            }
            Err(err) => tracing::warn!(sandbox = %id, %err, "keeping earlier continuations"),
        }
    }

    /// A pause has just written its snapshot, too recently for the digest cache to keep the
    /// digests the seal computed (see `DigestCache`'s racy window), so a resume would hash the
    /// whole RAM image again. Hashing once more just past the window, in the background, makes
    /// a later resume's integrity check one `stat` per file.
    fn warm_digests_later(&self, descriptor: PathBuf, integrity: SnapshotArtifactIntegrity) {
        let rt = Arc::clone(&self.rt);
        tokio::spawn(async move {
            tokio::time::sleep(DigestCache::DEFAULT_RACY_WINDOW + Duration::from_millis(250)).await;
            // A snapshot resumed or deleted meanwhile fails here harmlessly; a restore verifies
            // on its own either way.
            if let Err(err) = rt.warm_digests(descriptor, integrity).await {
                tracing::debug!(%err, "pre-hashing a paused sandbox's snapshot");
            }
        });
    }

    /// `connect`: a running sandbox is returned as is (its lifetime extended to `timeout` if
    /// given); a paused one is resumed. Returns whether it was resumed.
    pub(crate) async fn connect(
        &self,
        id: &SandboxId,
        timeout: Option<i64>,
    ) -> Result<(SandboxRecord, bool), ApiError> {
        let timeout = timeout
            .map(|t| self.validate_timeout("timeout", t, 1))
            .transpose()?;
        let _guard = self.locks.lock(id).await;
        let mut record = self.visible(id)?;
        match record.state {
            RecordState::Running => {
                if let Some(t) = timeout {
                    let end = record.end_ms.max(now_ms() + secs_ms(t));
                    self.store.set_end(id, end).map_err(store_err)?;
                    record.end_ms = end;
                }
                Ok((record, false))
            }
            RecordState::Paused => {
                self.resume_locked(&mut record, timeout).await?;
                Ok((record, true))
            }
            RecordState::Starting => Err(ApiError::sandbox_not_found(id.as_str())),
        }
    }

    async fn resume_locked(
        &self,
        record: &mut SandboxRecord,
        timeout: Option<i64>,
    ) -> Result<(), ApiError> {
        let id = record.sandbox_id.clone();
        let Some(snap) = record.snapshot.clone() else {
            self.forget(&id);
            return Err(ApiError::sandbox_not_found(id.as_str()));
        };
        let begun = Instant::now();
        let started = self
            .rt
            .start(StartSandbox {
                sandbox_id: id.clone(),
                source: SandboxSource::Continuation(PausedSandbox {
                    sandbox_id: id.clone(),
                    descriptor: snap.descriptor.clone(),
                    integrity: snap.integrity.clone(),
                    budget: record.budget,
                    depends_on: Vec::new(),
                }),
                init: envd_init(record),
                // The policy survives pause: the resumed VM gets it before its agent is
                // configured, as at create.
                network: record.egress.as_ref().map(|e| e.policy().clone()),
            })
            .await
            .map_err(|err| {
                tracing::warn!(sandbox = %id, %err, "resume failed; sandbox stays paused");
                crate::error::from_runtime(&err)
            })?;
        record.end_ms = now_ms() + secs_ms(timeout.unwrap_or(record.timeout_secs));
        self.mark_running(record, started.pid, "resume").await?;
        tracing::info!(sandbox = %id, ms = begun.elapsed().as_millis() as u64, "sandbox resumed");
        Ok(())
    }

    /// For the proxy: resumes a paused sandbox that asked for auto-resume. Returns whether the
    /// sandbox is running afterwards.
    pub(crate) async fn auto_resume(&self, id: &SandboxId) -> Result<bool, ApiError> {
        let _guard = self.locks.lock(id).await;
        let Some(mut record) = self.store.sandbox(id).map_err(store_err)? else {
            return Ok(false);
        };
        match record.state {
            RecordState::Running => Ok(self.rt.is_running(id)),
            RecordState::Paused if record.auto_resume => {
                self.resume_locked(&mut record, None).await?;
                Ok(true)
            }
            RecordState::Paused | RecordState::Starting => Ok(false),
        }
    }

    // ------------------------------------------------------------------ timeouts

    pub(crate) async fn set_timeout(&self, id: &SandboxId, secs: i64) -> Result<(), ApiError> {
        // E2B accepts 0: the sandbox's time is up now. The timeout loop then kills it, or pauses
        // it if it asked for that, on its next tick, as for any other end.
        let secs = self.validate_timeout("timeout", secs, 0)?;
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        match (record.state, secs) {
            // The lifetime is kept for a later resume: storing 0 would expire it again at once.
            (RecordState::Running, 0) => self.store.set_end(id, now_ms()),
            (RecordState::Running, _) => self.store.set_timeout(id, secs, now_ms() + secs_ms(secs)),
            // A paused sandbox is already past its end.
            (_, 0) => Ok(true),
            // A paused sandbox's clock starts at resume; keep the new lifetime for then.
            _ => self.store.set_timeout(id, secs, record.end_ms),
        }
        .map_err(store_err)?;
        Ok(())
    }

    pub(crate) async fn refresh(
        &self,
        id: &SandboxId,
        duration: Option<i64>,
    ) -> Result<(), ApiError> {
        if let Some(d) = duration
            && !(0..=3600).contains(&d)
        {
            return Err(ApiError::bad_request(format!(
                "duration must be between 0 and 3600 seconds, got {d}"
            )));
        }
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        if record.state == RecordState::Running {
            let d = duration.unwrap_or(record.timeout_secs);
            let end = record.end_ms.max(now_ms() + secs_ms(d));
            self.store.set_end(id, end).map_err(store_err)?;
        }
        Ok(())
    }
}
