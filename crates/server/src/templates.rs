//! Template builds: the pluggable builder, build progress, and the small manifest a finished
//! build leaves in its directory so that another server (another state directory sharing the
//! cache) can adopt it instead of building again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use firkin_admission::ResourceBudget;
use firkin_artifacts::{DigestCache, SnapshotArtifactIntegrity};
use firkin_runtime::TemplateSnapshot;
use firkin_types::{Size, TemplateId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What a build is asked to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateBuildRequest {
    pub template_id: TemplateId,
    pub build_id: String,
    /// An empty directory the builder writes the sealed snapshot into
    /// (`<cache>/templates/<template>/<build>/`).
    pub dir: PathBuf,
    /// What one sandbox of the template holds: vCPUs, guest RAM, disk quota.
    pub budget: ResourceBudget,
    /// Shell commands run in the booted template (through envd) before the snapshot is taken.
    pub commands: Vec<String>,
    /// Root filesystem source; `None` means the default `base` image.
    pub source: Option<firkin_runtime::qemu::RootfsSource>,
    /// Upload the code interpreter's bundle (service, bash_kernel wheel, Deno) before
    /// `commands` run.
    pub interpreter: bool,
}

/// A builder failed. The message is shown to the user as the build's `reason`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TemplateBuildError {
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl TemplateBuildError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Boots a template, prepares it and seals its snapshot. The QEMU backend implements this;
/// the server only schedules builds, records them and publishes the result.
#[async_trait]
pub trait TemplateBuilder: Send + Sync + 'static {
    async fn build(
        &self,
        request: &TemplateBuildRequest,
        progress: &BuildProgress,
    ) -> Result<TemplateSnapshot, TemplateBuildError>;

    /// Identifies what this builder puts into every template (guest kernel, init, agent), so
    /// that a finished build in the shared cache is adopted only if it was made from the same
    /// guest binaries: a template holding an older `firkin-envd` would otherwise be served
    /// after an upgrade. `None`: the builder has no such inputs.
    fn guest_fingerprint(&self) -> Option<String> {
        None
    }

    /// The root filesystem a request without `source` gets (part of the build fingerprint, so
    /// that a change of the default image is not hidden by an adopted old build).
    fn default_source(&self) -> Option<firkin_runtime::qemu::RootfsSource> {
        None
    }

    /// Identifies the code interpreter's bundle (service, bash_kernel wheel, Deno) a build
    /// with `interpreter` uploads. Apart from [`Self::guest_fingerprint`] so that a new file
    /// of it rebuilds only the templates that hold it.
    fn interpreter_fingerprint(&self) -> Option<String> {
        None
    }
}

/// Identifies a build's inputs: the builder's guest binaries and the recipe (root filesystem
/// source, prepare commands, budget). Two builds with the same fingerprint are interchangeable.
/// `None` when the builder has no guest fingerprint.
pub fn build_fingerprint(
    builder: &dyn TemplateBuilder,
    source: Option<&firkin_runtime::qemu::RootfsSource>,
    commands: &[String],
    budget: ResourceBudget,
    interpreter: bool,
) -> Option<String> {
    use sha2::{Digest, Sha256};
    let guest = builder.guest_fingerprint()?;
    let source = source.cloned().or_else(|| builder.default_source());
    let mut recipe = serde_json::json!({
        "guest": guest,
        "rootfsRules": firkin_runtime::qemu::ROOTFS_RULES_VERSION,
        "source": source,
        "commands": commands,
        "cpus": budget.cpus,
        "memoryMiB": budget.memory.as_mib(),
        "diskMiB": budget.disk.as_mib(),
    });
    // Only when asked for: a key added to every recipe would change every template's
    // fingerprint, and each would be rebuilt once for nothing.
    if interpreter {
        recipe["interpreter"] = serde_json::json!(builder.interpreter_fingerprint());
    }
    Some(hex::encode(Sha256::digest(recipe.to_string().as_bytes())))
}

/// Live state of one build, shared between the builder, the API and `firkin serve`'s
/// progress bar.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgressState {
    pub phase: String,
    /// 0.0 to 1.0.
    pub fraction: f32,
    pub logs: Vec<String>,
    /// `Some(Ok(()))` when ready, `Some(Err(reason))` when failed.
    pub done: Option<Result<(), String>>,
}

/// Where a builder reports what it is doing. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BuildProgress {
    state: Arc<Mutex<ProgressState>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for BuildProgress {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs kept per build; older lines are dropped (the database keeps what was logged last).
const MAX_LOG_LINES: usize = 5000;

impl BuildProgress {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.send_modify(|n| *n += 1);
    }

    /// One line of build output.
    pub fn log(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::debug!(target: "firkin_server::build", "{line}");
        self.update(|s| {
            if s.logs.len() >= MAX_LOG_LINES {
                s.logs.remove(0);
            }
            s.logs.push(line);
        });
    }

    /// The build moved on to `phase`, `fraction` (0-1) of the way through.
    pub fn phase(&self, phase: impl Into<String>, fraction: f32) {
        let phase = phase.into();
        self.update(|s| {
            s.logs.push(format!("== {phase}"));
            s.phase = phase;
            s.fraction = fraction.clamp(0.0, 1.0);
        });
    }

    pub(crate) fn finish(&self, result: Result<(), String>) {
        self.update(|s| {
            if result.is_ok() {
                s.fraction = 1.0;
                s.phase = "ready".into();
            }
            s.done = Some(result);
        });
    }

    pub fn snapshot(&self) -> ProgressState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Resolves at the next change (or right away if the build is already done).
    pub async fn changed(&self) {
        let mut rx = self.changed.subscribe();
        if self.snapshot().done.is_some() {
            return;
        }
        let _ = rx.changed().await;
    }

    /// Waits for the end of the build.
    pub async fn wait(&self) -> Result<(), String> {
        loop {
            let mut rx = self.changed.subscribe();
            if let Some(done) = self.snapshot().done {
                return done;
            }
            if rx.changed().await.is_err() {
                return Err("build abandoned".into());
            }
        }
    }
}

/// `firkin-template.json`: written last into a finished build's directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateManifest {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Descriptor file name inside the build directory.
    pub descriptor: String,
    pub descriptor_integrity: SnapshotArtifactIntegrity,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub envd_version: String,
    pub created_ms: i64,
    /// [`build_fingerprint`] of the build; absent in manifests of builders without one (and of
    /// firkin versions before it), which a fingerprinting builder never adopts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

pub const TEMPLATE_MANIFEST: &str = "firkin-template.json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("template snapshot descriptor {0} is not inside its build directory")]
    Outside(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Records a finished build next to its snapshot, atomically.
pub fn write_template_manifest(
    dir: &Path,
    snapshot: &TemplateSnapshot,
    envd_version: &str,
    created_ms: i64,
    fingerprint: Option<String>,
) -> Result<TemplateManifest, ManifestError> {
    let descriptor = snapshot
        .descriptor
        .strip_prefix(dir)
        .ok()
        .and_then(|p| p.to_str())
        .filter(|p| !p.contains('/'))
        .ok_or_else(|| ManifestError::Outside(snapshot.descriptor.clone()))?
        .to_owned();
    let manifest = TemplateManifest {
        template_id: snapshot.template_id.to_string(),
        build_id: snapshot.build_id.clone(),
        descriptor,
        descriptor_integrity: snapshot.integrity.clone(),
        cpu_count: snapshot.budget.cpus,
        memory_mb: snapshot.budget.memory.as_mib(),
        disk_size_mb: snapshot.budget.disk.as_mib(),
        envd_version: envd_version.to_owned(),
        created_ms,
        fingerprint,
    };
    let path = dir.join(TEMPLATE_MANIFEST);
    let write_err = |source| ManifestError::Write {
        path: path.clone(),
        source,
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| write_err(std::io::Error::other(e)))?;
    firkin_artifacts::write_bytes_atomic(&path, &json).map_err(write_err)?;
    Ok(manifest)
}

/// Reads a build directory's manifest, if it has a valid one.
pub fn read_template_manifest(dir: &Path) -> Option<TemplateManifest> {
    let text = std::fs::read(dir.join(TEMPLATE_MANIFEST)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The newest finished build of `template` in `<cache>/templates/<template>/`, if one verifies:
/// its manifest parses, its fingerprint is `fingerprint` (when one is given) and its descriptor
/// matches the recorded size and digest. Components are verified by the runtime at every
/// restore, through the digest cache.
pub fn find_cached_build(
    templates_dir: &Path,
    template: &TemplateId,
    cache: &DigestCache,
    fingerprint: Option<&str>,
) -> Option<(TemplateManifest, TemplateSnapshot)> {
    let root = templates_dir.join(template.as_str());
    let entries = std::fs::read_dir(&root).ok()?;
    let mut found: Vec<(TemplateManifest, TemplateSnapshot)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let dir = e.path();
            let m = read_template_manifest(&dir)?;
            if m.template_id != template.as_str() || m.descriptor.contains('/') {
                return None;
            }
            if let Some(want) = fingerprint
                && m.fingerprint.as_deref() != Some(want)
            {
                tracing::info!(
                    dir = %dir.display(),
                    "cached build was made from other guest binaries or another recipe; not adopting it"
                );
                return None;
            }
            let descriptor = dir.join(&m.descriptor);
            if let Err(err) = m.descriptor_integrity.verify_with(cache, &descriptor) {
                tracing::warn!(dir = %dir.display(), %err, "cached template build does not verify");
                return None;
            }
            let snapshot = TemplateSnapshot {
                template_id: template.clone(),
                build_id: m.build_id.clone(),
                descriptor,
                integrity: m.descriptor_integrity.clone(),
                budget: ResourceBudget::new(
                    m.cpu_count,
                    Size::mib(m.memory_mb),
                    Size::mib(m.disk_size_mb),
                ),
            };
            Some((m, snapshot))
        })
        .collect();
    found.sort_by_key(|(m, _)| m.created_ms);
    found.pop()
}
