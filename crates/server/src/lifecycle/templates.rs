//! Template builds (started in the background, finished into the store), their status, warm
//! pools and template deletion.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use firkin_admission::ResourceBudget;
use firkin_runtime::TemplateSnapshot;
use firkin_types::{Size, TemplateId};

use crate::app::{
    App, DEFAULT_TEMPLATE_BUDGET, ENVD_VERSION, LiveBuild, now_ms, remove_dir, remove_empty_dir,
    store_err,
};
use crate::auth::random_alnum;
use crate::error::ApiError;
use crate::server::EnsureTemplate;
use crate::store::{BuildRecord, BuildStatus, StoreError, TemplateRecord};
use crate::templates::{
    BuildProgress, TemplateBuildRequest, build_fingerprint, find_cached_build,
    read_template_manifest, write_template_manifest,
};
use crate::types::{BuildStatusResponse, BuildTemplateRequest};

impl App {
    pub(super) fn live_build(&self, template: &str) -> Option<BuildProgress> {
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(template)
            .map(|b| b.progress.clone())
    }

    /// The build currently running for `template`, if any.
    pub fn building(&self, template: &str) -> Option<(String, BuildProgress)> {
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(template)
            .map(|b| (b.build_id.clone(), b.progress.clone()))
    }

    /// Publishes a template's warm pool (depth from the configuration; 0 disables it).
    pub(crate) fn apply_warm_pool(&self, t: &TemplateRecord) {
        let depth = self
            .config
            .warm_pools
            .get(&t.template_id)
            .copied()
            .unwrap_or(0);
        if depth > 0
            && let Ok(snapshot) = template_snapshot(t)
        {
            tracing::info!(template = %t.template_id, depth, "warm pool");
            self.rt.set_warm_pool(snapshot, depth);
        }
    }

    /// Adopts a finished build of `id` from the shared template cache whose inputs match
    /// `fingerprint` (another state directory may have built it), and returns its build id.
    pub(crate) fn adopt_cached_build(
        &self,
        id: &TemplateId,
        fingerprint: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        // Only the small descriptor is hashed here. In memory: the runtime's cache persists to
        // the same file, and two writers would drop each other's entries.
        let cache = firkin_artifacts::DigestCache::in_memory();
        let Some((manifest, snapshot)) =
            find_cached_build(&self.config.paths.templates_dir(), id, &cache, fingerprint)
        else {
            return Ok(None);
        };
        let now = now_ms();
        let record = TemplateRecord {
            template_id: id.to_string(),
            build_id: manifest.build_id.clone(),
            descriptor: snapshot.descriptor.clone(),
            integrity: snapshot.integrity.clone(),
            budget: snapshot.budget,
            envd_version: manifest.envd_version.clone(),
            created_ms: manifest.created_ms,
            updated_ms: now,
        };
        let dir = snapshot
            .descriptor
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        self.store.insert_build(&BuildRecord {
            build_id: manifest.build_id.clone(),
            template_id: id.to_string(),
            status: BuildStatus::Building,
            spec: "{\"adopted\":true}".into(),
            dir,
            logs: String::new(),
            reason: None,
            created_ms: manifest.created_ms,
            finished_ms: None,
        })?;
        self.store.finish_build(
            &manifest.build_id,
            BuildStatus::Ready,
            None,
            "adopted from the template cache",
            now,
            Some(&record),
        )?;
        self.apply_warm_pool(&record);
        tracing::info!(template = %id, build = %manifest.build_id, "adopted a cached template build");
        Ok(Some(manifest.build_id))
    }

    /// Makes `spec.template_id` available: already built, adopted from a finished build in the
    /// shared cache, or built now (in the background; follow `progress`).
    pub(crate) fn ensure_template(
        self: &Arc<Self>,
        spec: BuildTemplateRequest,
    ) -> Result<EnsureTemplate, ApiError> {
        let id = TemplateId::new(&spec.template_id)
            .map_err(|e| ApiError::bad_request(format!("invalid templateID: {e}")))?;
        let budget = budget_of(&spec)?;
        let fingerprint = build_fingerprint(
            self.builder.as_ref(),
            spec.from.as_ref(),
            &spec.commands,
            budget,
            spec.interpreter,
        );
        if let Some(t) = self.store.template(id.as_str()).map_err(store_err)? {
            // Kept as is (sandboxes, paused ones too, may depend on its files), but a template
            // from other guest binaries is worth a word: an upgraded agent is not in it.
            let built = t
                .descriptor
                .parent()
                .and_then(read_template_manifest)
                .and_then(|m| m.fingerprint);
            if fingerprint.is_some() && built != fingerprint {
                tracing::warn!(
                    template = %id,
                    "template was built from other guest binaries or another recipe; rebuild it \
                     with `firkin template build {id} --force` to pick them up"
                );
            }
            return Ok(EnsureTemplate::Ready);
        }
        if let Some((build_id, progress)) = self.building(id.as_str()) {
            return Ok(EnsureTemplate::Building { build_id, progress });
        }
        if let Some(build_id) = self
            .adopt_cached_build(&id, fingerprint.as_deref())
            .map_err(store_err)?
        {
            return Ok(EnsureTemplate::Adopted { build_id });
        }
        let (build_id, progress) = self.start_build(spec)?;
        Ok(EnsureTemplate::Building { build_id, progress })
    }

    /// Starts a template build in the background.
    pub fn start_build(
        self: &Arc<Self>,
        spec: BuildTemplateRequest,
    ) -> Result<(String, BuildProgress), ApiError> {
        let template_id = TemplateId::new(&spec.template_id)
            .map_err(|e| ApiError::bad_request(format!("invalid templateID: {e}")))?;
        let budget = budget_of(&spec)?;
        for c in &spec.commands {
            if c.contains('\0') {
                return Err(ApiError::bad_request("a build command contains NUL"));
            }
        }
        let existing = self
            .store
            .template(template_id.as_str())
            .map_err(store_err)?;
        if existing.is_some() && !spec.force {
            return Err(ApiError::conflict(format!(
                "template {template_id:?} is already built; pass force to rebuild it"
            )));
        }
        let build_id = random_alnum(12);
        let progress = BuildProgress::new();
        {
            let mut builds = self.builds.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(b) = builds.get(template_id.as_str()) {
                return Err(ApiError::conflict(format!(
                    "template {template_id:?} is already being built (build {})",
                    b.build_id
                )));
            }
            builds.insert(
                template_id.to_string(),
                LiveBuild {
                    build_id: build_id.clone(),
                    progress: progress.clone(),
                },
            );
        }
        let dir = self
            .config
            .paths
            .templates_dir()
            .join(template_id.as_str())
            .join(&build_id);
        let record = BuildRecord {
            build_id: build_id.clone(),
            template_id: template_id.to_string(),
            status: BuildStatus::Building,
            spec: serde_json::to_string(&spec).unwrap_or_default(),
            dir: dir.clone(),
            logs: String::new(),
            reason: None,
            created_ms: now_ms(),
            finished_ms: None,
        };
        let prepared = std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))
            .and_then(|()| self.store.insert_build(&record).map_err(store_err));
        if let Err(e) = prepared {
            self.end_build(template_id.as_str());
            remove_dir(&dir);
            return Err(e);
        }
        let request = TemplateBuildRequest {
            template_id,
            build_id: build_id.clone(),
            dir,
            budget,
            source: spec.from.clone(),
            commands: spec.commands,
            interpreter: spec.interpreter,
        };
        let app = Arc::clone(self);
        let p = progress.clone();
        tokio::spawn(async move {
            // A second task so that a panicking builder still ends the build cleanly.
            let app2 = Arc::clone(&app);
            let req2 = request.clone();
            let p2 = p.clone();
            let result = tokio::spawn(async move { app2.builder.build(&req2, &p2).await }).await;
            let result = result.unwrap_or_else(|e| {
                Err(crate::templates::TemplateBuildError::new(format!(
                    "the builder crashed: {e}"
                )))
            });
            app.finish_build(&request, &p, result);
        });
        Ok((build_id, progress))
    }

    fn end_build(&self, template: &str) {
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(template);
    }

    fn finish_build(
        &self,
        req: &TemplateBuildRequest,
        progress: &BuildProgress,
        result: Result<TemplateSnapshot, crate::templates::TemplateBuildError>,
    ) {
        let now = now_ms();
        let outcome = result
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                msg
            })
            .and_then(|snap| {
                if snap.template_id != req.template_id || !snap.descriptor.starts_with(&req.dir) {
                    return Err(format!(
                        "the builder returned a snapshot of {} at {}, not of {} in {}",
                        snap.template_id,
                        snap.descriptor.display(),
                        req.template_id,
                        req.dir.display()
                    ));
                }
                let fingerprint = build_fingerprint(
                    self.builder.as_ref(),
                    req.source.as_ref(),
                    &req.commands,
                    req.budget,
                    req.interpreter,
                );
                write_template_manifest(&req.dir, &snap, ENVD_VERSION, now, fingerprint)
                    .map_err(|e| e.to_string())?;
                Ok(snap)
            });
        let logs = progress.snapshot().logs.join("\n");
        match outcome {
            Ok(snap) => {
                let record = TemplateRecord {
                    template_id: snap.template_id.to_string(),
                    build_id: snap.build_id.clone(),
                    descriptor: snap.descriptor.clone(),
                    integrity: snap.integrity.clone(),
                    budget: snap.budget,
                    envd_version: ENVD_VERSION.to_owned(),
                    created_ms: now,
                    updated_ms: now,
                };
                match self.store.finish_build(
                    &req.build_id,
                    BuildStatus::Ready,
                    None,
                    &logs,
                    now,
                    Some(&record),
                ) {
                    Ok(()) => {
                        tracing::info!(template = %req.template_id, build = %req.build_id, "template built");
                        self.apply_warm_pool(&record);
                        if let Ok(old) = self.store.prune_builds(&record.template_id) {
                            for dir in old.iter().filter(|d| **d != req.dir) {
                                remove_dir(dir);
                            }
                        }
                        self.end_build(req.template_id.as_str());
                        progress.finish(Ok(()));
                    }
                    Err(err) => {
                        remove_dir(&req.dir);
                        self.end_build(req.template_id.as_str());
                        progress.finish(Err(err.to_string()));
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(template = %req.template_id, build = %req.build_id, %reason, "template build failed");
                if let Err(err) = self.store.finish_build(
                    &req.build_id,
                    BuildStatus::Error,
                    Some(&reason),
                    &logs,
                    now,
                    None,
                ) {
                    tracing::error!(%err, "recording a failed build");
                }
                remove_dir(&req.dir);
                self.end_build(req.template_id.as_str());
                progress.finish(Err(reason));
            }
        }
    }

    /// A build's status, with log lines from `offset` on.
    pub(crate) fn build_status(
        &self,
        template: &str,
        build_id: &str,
        offset: usize,
    ) -> Result<BuildStatusResponse, ApiError> {
        let record = self
            .store
            .build(build_id)
            .map_err(store_err)?
            .filter(|b| b.template_id == template)
            .ok_or_else(|| {
                ApiError::not_found(format!("build {build_id:?} of {template:?} not found"))
            })?;
        let live = self
            .building(template)
            .filter(|(b, _)| b == build_id)
            .map(|(_, p)| p.snapshot());
        let (status, phase, fraction, logs, reason) = match live {
            Some(s) => ("building".to_owned(), s.phase, s.fraction, s.logs, None),
            None => (
                record.status.as_str().to_owned(),
                record.status.as_str().to_owned(),
                if record.status == BuildStatus::Ready {
                    1.0
                } else {
                    0.0
                },
                record.logs.lines().map(str::to_owned).collect(),
                record.reason,
            ),
        };
        let total = logs.len();
        Ok(BuildStatusResponse {
            template_id: template.to_owned(),
            build_id: build_id.to_owned(),
            status,
            phase,
            progress: fraction,
            logs: logs.into_iter().skip(offset).collect(),
            next_logs_offset: total,
            reason,
        })
    }

    /// Deletes a template and its builds, unless sandboxes still use it.
    pub(crate) fn delete_template(&self, raw: &str) -> Result<(), ApiError> {
        let id = TemplateId::new(raw)
            .map_err(|e| ApiError::bad_request(format!("invalid templateID: {e}")))?;
        if self.building(id.as_str()).is_some() {
            return Err(ApiError::conflict(format!(
                "template {id:?} is being built; wait for the build to end"
            )));
        }
        let known = self.store.template(id.as_str()).map_err(store_err)?;
        let users = self
            .store
            .sandboxes_of_template(id.as_str())
            .map_err(store_err)?;
        if known.is_none() {
            return Err(ApiError::not_found(format!("template {id:?} not found")));
        }
        if users > 0 {
            return Err(ApiError::conflict(format!(
                "template {id:?} is used by {users} sandbox(es), running or paused; kill them first"
            )));
        }
        if let Some(Ok(t)) = known.as_ref().map(template_snapshot) {
            self.rt.set_warm_pool(t, 0);
        }
        let dirs = self.store.delete_template(id.as_str()).map_err(store_err)?;
        for d in dirs {
            remove_dir(&d);
        }
        remove_empty_dir(&self.config.paths.templates_dir().join(id.as_str()));
        tracing::info!(template = %id, "template deleted");
        Ok(())
    }
}

pub(crate) fn budget_of(spec: &BuildTemplateRequest) -> Result<ResourceBudget, ApiError> {
    let d = DEFAULT_TEMPLATE_BUDGET;
    let cpus = spec.cpu_count.unwrap_or(d.cpus);
    let memory = spec.memory_mb.unwrap_or(d.memory.as_mib());
    let disk = spec.disk_size_mb.unwrap_or(d.disk.as_mib());
    if !(1..=64).contains(&cpus) {
        return Err(ApiError::bad_request(format!(
            "cpuCount must be 1-64, got {cpus}"
        )));
    }
    if !(128..=256 * 1024).contains(&memory) {
        return Err(ApiError::bad_request(format!(
            "memoryMB must be 128-262144, got {memory}"
        )));
    }
    if !(256..=16 * 1024 * 1024).contains(&disk) {
        return Err(ApiError::bad_request(format!(
            "diskSizeMB must be 256-16777216, got {disk}"
        )));
    }
    Ok(ResourceBudget::new(
        cpus,
        Size::mib(memory),
        Size::mib(disk),
    ))
}

pub(crate) fn template_snapshot(t: &TemplateRecord) -> Result<TemplateSnapshot, ApiError> {
    // Stored ids were validated when they were written; a bad one means a damaged database.
    let template_id = TemplateId::new(&t.template_id)
        .map_err(|e| ApiError::internal(format!("stored template id: {e}")))?;
    Ok(TemplateSnapshot {
        template_id,
        build_id: t.build_id.clone(),
        descriptor: t.descriptor.clone(),
        integrity: t.integrity.clone(),
        budget: t.budget,
    })
}
