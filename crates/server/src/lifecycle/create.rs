//! `POST /v2/sandboxes`: validating the request, resolving its template, restoring the VM and
//! recording the sandbox, deduplicated by `Idempotency-Key`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use firkin_e2b_wire::SandboxCreateRequest;
use firkin_runtime::{EnvdInit, SandboxSource, StartSandbox};
use firkin_types::{SandboxId, TemplateId};
use futures::FutureExt;

use super::templates::template_snapshot;
use crate::app::{App, CreateFuture, now_ms, secs_ms, store_err};
use crate::auth::{generate_token, random_alnum};
use crate::error::ApiError;
use crate::procfs;
use crate::server::EnsureTemplate;
use crate::store::{RecordState, SandboxRecord, TemplateRecord};

impl App {
    /// `POST /v2/sandboxes`, optionally deduplicated by an idempotency key. The create itself
    /// runs in its own task: a client that disconnects must not cancel a half-done restore.
    pub(crate) async fn create_idempotent(
        self: &Arc<Self>,
        req: SandboxCreateRequest,
        key: Option<String>,
    ) -> Result<SandboxRecord, ApiError> {
        let spawn = {
            let app = Arc::clone(self);
            move || -> CreateFuture {
                let handle = tokio::spawn(async move { app.create(req).await });
                async move {
                    handle.await.unwrap_or_else(|err| {
                        tracing::error!(%err, "create task failed");
                        Err(ApiError::internal(format!("create task failed: {err}")))
                    })
                }
                .boxed()
                .shared()
            }
        };
        match key {
            Some(key) => {
                let fut = self.idempotency.get_or_insert(key.clone(), spawn);
                let result = fut.clone().await;
                if result.is_err() {
                    // Only successes are remembered: a retry of a failed create (a 429, say)
                    // must try again, not replay the failure.
                    self.idempotency.forget(&key, &fut);
                }
                result
            }
            None => spawn().await,
        }
    }

    async fn create(self: Arc<Self>, req: SandboxCreateRequest) -> Result<SandboxRecord, ApiError> {
        let timeout = self.validate_timeout("timeout", req.timeout, 1)?;
        validate_vars("metadata", &req.metadata, false)?;
        validate_vars("envVars", &req.env_vars, true)?;
        refuse_unsupported(&req)?;
        let egress = crate::egress::from_create(req.allow_internet_access, req.network.as_ref())?;
        // Refused before anything is reserved: a sandbox that shares the host's network would
        // silently ignore the policy.
        if egress.is_some() && !self.config.egress_control {
            return Err(crate::egress::unenforceable());
        }
        let template = self.resolve_template(&req.template_id).await?;
        let snapshot = template_snapshot(&template)?;

        let sandbox_id = SandboxId::new(random_alnum(20))
            .map_err(|e| ApiError::internal(format!("generating a sandbox id: {e}")))?;
        let _guard = self.locks.lock(&sandbox_id).await;
        let private = private_traffic(&req);
        let now = now_ms();
        let mut record = SandboxRecord {
            seq: 0,
            sandbox_id: sandbox_id.clone(),
            template_id: template.template_id.clone(),
            build_id: template.build_id.clone(),
            state: RecordState::Starting,
            metadata: req.metadata,
            env_vars: req.env_vars,
            access_token: generate_token(),
            traffic_access_token: private.then(generate_token),
            egress,
            timeout_secs: timeout,
            auto_pause: req.auto_pause.unwrap_or(false),
            auto_resume: req.auto_resume.is_some_and(|a| a.enabled),
            budget: template.budget,
            started_ms: now,
            end_ms: now + secs_ms(timeout),
            pid: None,
            pid_start: None,
            snapshot: None,
            created_ms: now,
        };
        record.seq = self.store.insert_sandbox(&record).map_err(store_err)?;

        let started = self
            .rt
            .start(StartSandbox {
                sandbox_id: sandbox_id.clone(),
                source: SandboxSource::Template(snapshot),
                init: envd_init(&record),
                network: record.egress.as_ref().map(|e| e.policy().clone()),
            })
            .await;
        let started = match started {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(sandbox = %sandbox_id, template = %template.template_id, %err, "create failed");
                self.forget(&sandbox_id);
                return Err(crate::error::from_runtime(&err));
            }
        };
        // The lifetime starts when the sandbox is usable, not when the request arrived.
        let ready = now_ms();
        record.started_ms = ready;
        record.end_ms = ready + secs_ms(timeout);
        if let Err(err) = self.mark_running(&mut record, started.pid, "create").await {
            self.forget(&sandbox_id);
            return Err(err);
        }
        tracing::info!(
            sandbox = %sandbox_id,
            template = %template.template_id,
            warm = started.from_warm_pool,
            ms = ready - now,
            "sandbox created"
        );
        Ok(record)
    }

    /// Records that `record`'s VM answered (a create or a resume). If the database cannot say
    /// so, the VM is stopped: a sandbox without a running record would be invisible and
    /// unkillable.
    pub(super) async fn mark_running(
        &self,
        record: &mut SandboxRecord,
        pid: Option<u32>,
        during: &str,
    ) -> Result<(), ApiError> {
        record.state = RecordState::Running;
        record.pid = pid;
        record.pid_start = pid.and_then(procfs::start_time);
        let marked = self.store.mark_running(
            &record.sandbox_id,
            record.pid,
            record.pid_start,
            record.started_ms,
            record.end_ms,
        );
        if matches!(marked, Ok(true)) {
            return Ok(());
        }
        let _ = self.rt.kill(&record.sandbox_id).await;
        Err(match marked {
            Err(e) => store_err(e),
            Ok(_) => ApiError::internal(format!("sandbox record vanished during {during}")),
        })
    }

    /// The template a create names, waiting for a build of it that is in progress. A built-in
    /// recipe's name (`code-interpreter-v1`) that was never built is built now: its first
    /// create waits for it like any other build (`template_wait`, then 503 with Retry-After).
    async fn resolve_template(self: &Arc<Self>, raw: &str) -> Result<TemplateRecord, ApiError> {
        let id = TemplateId::new(raw)
            .map_err(|e| ApiError::bad_request(format!("invalid templateID: {e}")))?;
        if let Some(t) = self.store.template(id.as_str()).map_err(store_err)? {
            return Ok(t);
        }
        let mut live = self.live_build(id.as_str());
        if live.is_none()
            && let Some(recipe) = crate::recipes::builtin(id.as_str())
        {
            match self.ensure_template(recipe) {
                Ok(EnsureTemplate::Building { build_id, progress }) => {
                    tracing::info!(template = %id, build = %build_id, "building a built-in template for its first create");
                    live = Some(progress);
                }
                // Built or adopted meanwhile: the store has it now.
                Ok(EnsureTemplate::Ready | EnsureTemplate::Adopted { .. }) => {}
                // Another create started the build between the look-up and the start.
                Err(e) => live = Some(self.live_build(id.as_str()).ok_or(e)?),
            }
        }
        if let Some(progress) = live {
            tracing::info!(template = %id, "create waits for the template build");
            match tokio::time::timeout(self.config.template_wait, progress.wait()).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    return Err(ApiError::not_found(format!(
                        "template {id:?} failed to build: {reason}"
                    )));
                }
                Err(_) => {
                    return Err(ApiError::new(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("template {id:?} is still being built; retry shortly"),
                    )
                    .retry_after(Duration::from_secs(10)));
                }
            }
        }
        if let Some(t) = self.store.template(id.as_str()).map_err(store_err)? {
            return Ok(t);
        }
        Err(ApiError::not_found(format!(
            "template {id:?} not found; build it with `firkin template build {id}`"
        )))
    }
}

fn validate_vars(what: &str, vars: &BTreeMap<String, String>, names: bool) -> Result<(), ApiError> {
    const MAX_ENTRIES: usize = 1000;
    if vars.len() > MAX_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "{what} has {} entries; at most {MAX_ENTRIES} are allowed",
            vars.len()
        )));
    }
    for (k, v) in vars {
        if k.is_empty() || k.len() > 1024 {
            return Err(ApiError::bad_request(format!(
                "{what} key {k:?} must be 1-1024 bytes"
            )));
        }
        if k.contains('\0') || v.contains('\0') || (names && k.contains('=')) {
            return Err(ApiError::bad_request(format!(
                "{what} entry {k:?} contains a forbidden character (NUL{})",
                if names { " or '='" } else { "" }
            )));
        }
    }
    Ok(())
}

/// Options firkin cannot honour. Ignoring them would hand out a sandbox other than the one
/// asked for, so they are refused. (The egress fields are [`crate::egress`]'s, which refuses
/// what it cannot do: `egressProxy`, `rules`.)
fn refuse_unsupported(req: &SandboxCreateRequest) -> Result<(), ApiError> {
    let unsupported = |what: &str| {
        Err(ApiError::bad_request(format!(
            "{what} is not supported by this firkin server"
        )))
    };
    if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return unsupported("volumeMounts");
    }
    if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return unsupported("mcp");
    }
    Ok(())
}

/// `network.allowPublicTraffic: false`: the sandbox's ports answer only requests that carry
/// its traffic token. Absent or null is E2B's default, public.
fn private_traffic(req: &SandboxCreateRequest) -> bool {
    req.network
        .as_ref()
        .and_then(|n| n.get("allowPublicTraffic"))
        .is_some_and(|v| *v == serde_json::Value::Bool(false))
}

pub(super) fn envd_init(r: &SandboxRecord) -> EnvdInit {
    EnvdInit {
        env_vars: r.env_vars.clone(),
        access_token: Some(r.access_token.clone()),
        ..firkin_runtime::fresh_init(r.sandbox_id.as_str())
    }
}
