//! The runtime as the server uses it, behind one object-safe trait.
//!
//! The server is generic over the launcher only at its entry ([`crate::Server::open`] takes a
//! `SandboxRuntime<L>`); everything behind it works with `Arc<dyn Orchestrator>`, so the
//! handlers are compiled once instead of once per launcher type.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use firkin_artifacts::{SealError, SealedSnapshot, SnapshotArtifactIntegrity};
use firkin_net::EgressPolicy;
use firkin_runtime::{
    CapacityStatus, PausedSandbox, RuntimeError, RuntimeLauncher, SandboxExit, SandboxRuntime,
    StartSandbox, StartedSandbox, TemplateSnapshot, WarmPoolStatus,
};
use firkin_types::SandboxId;
use tokio::sync::broadcast;

/// Pre-hashing a snapshot into the runtime's digest cache failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmDigestsError {
    #[error("snapshot {descriptor} does not verify: {source}")]
    Verify {
        descriptor: PathBuf,
        source: SealError,
    },
    #[error("the hashing task for {descriptor} failed: {reason}")]
    Task { descriptor: PathBuf, reason: String },
}

#[async_trait]
pub trait Orchestrator: Send + Sync + 'static {
    async fn start(&self, req: StartSandbox) -> Result<StartedSandbox, RuntimeError>;
    async fn kill(&self, id: &SandboxId) -> Result<(), RuntimeError>;
    async fn pause(&self, id: &SandboxId, dir: &Path) -> Result<PausedSandbox, RuntimeError>;
    /// Replaces a running sandbox's egress policy.
    async fn set_egress(&self, id: &SandboxId, policy: &EgressPolicy) -> Result<(), RuntimeError>;
    fn route(&self, id: &SandboxId, guest_port: u16) -> Option<SocketAddr>;
    /// [`Orchestrator::route`], forwarding the port first if the sandbox does not yet.
    async fn open_port(
        &self,
        id: &SandboxId,
        guest_port: u16,
    ) -> Result<Option<SocketAddr>, RuntimeError>;
    fn is_running(&self, id: &SandboxId) -> bool;
    fn running_ids(&self) -> Vec<SandboxId>;
    fn pid(&self, id: &SandboxId) -> Option<u32>;
    fn capacity(&self) -> CapacityStatus;
    fn exits(&self) -> broadcast::Receiver<SandboxExit>;
    fn set_warm_pool(&self, template: TemplateSnapshot, depth: usize);
    fn warm_pools(&self) -> Vec<WarmPoolStatus>;
    /// Starts the warm-pool refill loop (call once).
    fn spawn_warm_pool(&self);
    async fn shutdown(&self);
    /// Verifies a sealed snapshot (descriptor and every component) through the runtime's
    /// digest cache, so that its next restore costs one `stat` per file instead of hashing
    /// gigabytes on a create's or resume's hot path. Files younger than the cache's racy window
    /// are hashed but not cached: call this once that window has passed.
    async fn warm_digests(
        &self,
        descriptor: PathBuf,
        integrity: SnapshotArtifactIntegrity,
    ) -> Result<(), WarmDigestsError>;
}

#[async_trait]
impl<L> Orchestrator for SandboxRuntime<L>
where
    L: RuntimeLauncher,
{
    async fn start(&self, req: StartSandbox) -> Result<StartedSandbox, RuntimeError> {
        SandboxRuntime::start(self, req).await
    }

    async fn kill(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        SandboxRuntime::kill(self, id).await
    }

    async fn pause(&self, id: &SandboxId, dir: &Path) -> Result<PausedSandbox, RuntimeError> {
        SandboxRuntime::pause(self, id, dir).await
    }

    async fn set_egress(&self, id: &SandboxId, policy: &EgressPolicy) -> Result<(), RuntimeError> {
        SandboxRuntime::set_egress(self, id, policy).await
    }

    fn route(&self, id: &SandboxId, guest_port: u16) -> Option<SocketAddr> {
        SandboxRuntime::route(self, id, guest_port)
    }

    async fn open_port(
        &self,
        id: &SandboxId,
        guest_port: u16,
    ) -> Result<Option<SocketAddr>, RuntimeError> {
        SandboxRuntime::open_port(self, id, guest_port).await
    }

    fn is_running(&self, id: &SandboxId) -> bool {
        SandboxRuntime::is_running(self, id)
    }

    fn running_ids(&self) -> Vec<SandboxId> {
        SandboxRuntime::running_ids(self)
    }

    fn pid(&self, id: &SandboxId) -> Option<u32> {
        SandboxRuntime::pid(self, id)
    }

    fn capacity(&self) -> CapacityStatus {
        SandboxRuntime::capacity(self)
    }

    fn exits(&self) -> broadcast::Receiver<SandboxExit> {
        SandboxRuntime::exits(self)
    }

    fn set_warm_pool(&self, template: TemplateSnapshot, depth: usize) {
        SandboxRuntime::set_warm_pool(self, template, depth);
    }

    fn warm_pools(&self) -> Vec<WarmPoolStatus> {
        SandboxRuntime::warm_pools(self)
    }

    fn spawn_warm_pool(&self) {
        tokio::spawn(self.clone().run_warm_pool());
    }

    async fn shutdown(&self) {
        SandboxRuntime::shutdown(self).await;
    }

    async fn warm_digests(
        &self,
        descriptor: PathBuf,
        integrity: SnapshotArtifactIntegrity,
    ) -> Result<(), WarmDigestsError> {
        let rt = self.clone();
        let path = descriptor.clone();
        // Hashing reads whole files: keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            SealedSnapshot::verify(&path, &integrity, rt.digest_cache()).map(drop)
        })
        .await
        .map_err(|e| WarmDigestsError::Task {
            descriptor: descriptor.clone(),
            reason: e.to_string(),
        })?
        .map_err(|source| WarmDigestsError::Verify { descriptor, source })
    }
}
