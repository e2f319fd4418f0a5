//! The QEMU backend's template builder, adapted to the server's [`TemplateBuilder`] trait.
//! The build itself (rootfs, boot, prepare, snapshot, seal) is `firkin_runtime::qemu`'s.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use firkin_artifacts::DigestCache;
use firkin_runtime::TemplateSnapshot;
use firkin_runtime::qemu::{AccelDecision, BuildEvent, GuestAssets, TemplateBuild, base_template};
use tokio::sync::mpsc;

use crate::templates::{BuildProgress, TemplateBuildError, TemplateBuildRequest, TemplateBuilder};

/// Builds templates as QEMU microVM snapshots.
#[derive(Debug)]
pub struct QemuTemplateBuilder {
    assets: GuestAssets,
    accel: AccelDecision,
    cache: Arc<DigestCache>,
    fingerprint: OnceLock<Option<String>>,
    /// Network slots templates are booted in (so that they restore onto TAPs); `None`:
    /// user-mode networking.
    slots: Option<firkin_net::SlotPool>,
    /// Where root filesystem images are kept for later builds from the same source.
    rootfs_cache: Option<std::path::PathBuf>,
}

impl QemuTemplateBuilder {
    pub fn new(assets: GuestAssets, accel: AccelDecision, cache: Arc<DigestCache>) -> Self {
        Self {
            assets,
            accel,
            cache,
            fingerprint: OnceLock::new(),
            slots: None,
            rootfs_cache: None,
        }
    }

    /// Keeps finished root filesystem images in `dir` (the cache's `rootfs/`), so that a
    /// second build from the same source skips mmdebstrap.
    pub fn with_rootfs_cache(mut self, dir: std::path::PathBuf) -> Self {
        self.rootfs_cache = Some(dir);
        self
    }

    /// Boots templates in network slots from `slots`, as the sandboxes of a server with
    /// per-sandbox networks run.
    pub fn with_slots(mut self, slots: firkin_net::SlotPool) -> Self {
        self.slots = Some(slots);
        self
    }
}

#[async_trait]
impl TemplateBuilder for QemuTemplateBuilder {
    async fn build(
        &self,
        request: &TemplateBuildRequest,
        progress: &BuildProgress,
    ) -> Result<TemplateSnapshot, TemplateBuildError> {
        let build = TemplateBuild {
            template_id: request.template_id.clone(),
            build_id: request.build_id.clone(),
            dir: request.dir.clone(),
            source: request.source.clone().unwrap_or_else(base_template),
            commands: request.commands.clone(),
            interpreter: request.interpreter,
            budget: request.budget,
            accel: self.accel.clone(),
            slots: self.slots.clone(),
            rootfs_cache: self.rootfs_cache.clone(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let forward = {
            let progress = progress.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    match ev {
                        BuildEvent::Phase { name, fraction } => progress.phase(name, fraction),
                        BuildEvent::Log(line) => progress.log(line),
                    }
                }
            })
        };
        let result =
            firkin_runtime::qemu::build_template(&self.assets, &build, Arc::clone(&self.cache), tx)
                .await;
        let _ = forward.await;
        match result {
            Ok((snapshot, samples)) => {
                for s in samples {
                    progress.log(s.to_string());
                }
                Ok(snapshot)
            }
            Err(e) => Err(TemplateBuildError::with_source(e.to_string(), e)),
        }
    }

    fn guest_fingerprint(&self) -> Option<String> {
        self.fingerprint
            .get_or_init(|| match self.assets.fingerprint(&self.cache, self.accel.accel) {
                // A template snapshotted on a TAP restores only onto one (and a user-mode one
                // only onto user-mode): the network is part of what makes builds equal.
                Ok(f) if self.slots.is_some() => Some(format!("{f}+net=tap/{}", firkin_net::SLOT_RECIPE)),
                Ok(f) => Some(f),
                Err(err) => {
                    // Without it any finished build is adopted, as before fingerprints.
                    tracing::warn!(%err, "cannot hash the guest assets; cached templates are adopted unchecked");
                    None
                }
            })
            .clone()
    }

    fn default_source(&self) -> Option<firkin_runtime::qemu::RootfsSource> {
        Some(base_template())
    }

    fn interpreter_fingerprint(&self) -> Option<String> {
        match self.assets.interpreter_fingerprint(&self.cache) {
            Ok(f) => f,
            Err(err) => {
                tracing::warn!(%err, "cannot hash the code interpreter's bundle; its templates are adopted unchecked for it");
                None
            }
        }
    }
}
