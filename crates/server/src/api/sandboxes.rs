//! `/sandboxes/…` and `/v2/sandboxes/…`: create, list, get, kill, timeouts, pause, resume,
//! connect, network and metrics, and the mapping of sandbox records to E2B's DTOs.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use firkin_e2b_wire::{
    ConnectSandboxRequest, ListedSandbox, OnTimeout, PauseSandboxRequest, RefreshRequest, Sandbox,
    SandboxCreateRequest, SandboxDetail, SandboxLifecycle, SandboxNetworkUpdate, SandboxState,
    SetTimeoutRequest,
};

use super::extract::{ApiQuery, JsonBody, RequiredJson, SandboxPath};
use super::internal;
use super::list::ListQuery;
use crate::app::{App, CLIENT_ID, ENVD_VERSION, rfc3339_ms};
use crate::egress;
use crate::error::ApiError;
use crate::lifecycle::MetricsRange;
use crate::store::{RecordState, SandboxRecord};

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| {
            (1..=255).contains(&k.len())
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        .ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key must be 1-255 characters of [a-z0-9-]")
        })?;
    // Keys are scoped by API key so that two clients cannot see each other's sandboxes.
    let scope = headers
        .get("x-api-key")
        .map(|k| crate::auth::hash_key(k.to_str().unwrap_or_default()))
        .unwrap_or_default();
    Ok(Some(format!("{scope}:{key}")))
}

pub(super) async fn create(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<SandboxCreateRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let record = app.create_idempotent(req, key).await?;
    Ok((StatusCode::CREATED, Json(sandbox_dto(&app, &record))).into_response())
}

pub(super) async fn list_v2(
    State(app): State<Arc<App>>,
    ApiQuery(params): ApiQuery<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let q = ListQuery::from_params(params)?;
    let records = app.store.sandboxes().map_err(internal)?;
    let (page, next) = q.page(&records);
    let body: Vec<ListedSandbox> = page.into_iter().map(listed_dto).collect();
    let mut resp = Json(body).into_response();
    if let Some(next) = next
        && let Ok(v) = header::HeaderValue::from_str(&next)
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// v1 list: running sandboxes only, no pagination.
pub(super) async fn list_v1(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let records = app.store.sandboxes().map_err(internal)?;
    let body: Vec<ListedSandbox> = records
        .iter()
        .filter(|r| r.state == RecordState::Running)
        .map(listed_dto)
        .collect();
    Ok(Json(body).into_response())
}

pub(super) async fn get_sandbox(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
) -> Result<Response, ApiError> {
    let r = app.visible(&id)?;
    Ok(Json(detail_dto(&app, &r)).into_response())
}

pub(super) async fn kill(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
) -> Result<StatusCode, ApiError> {
    app.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn set_timeout(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    RequiredJson(req): RequiredJson<SetTimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    app.set_timeout(&id, req.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn refresh(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(req): JsonBody<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    app.refresh(&id, req.duration).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn pause(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(_req): JsonBody<PauseSandboxRequest>,
) -> Result<StatusCode, ApiError> {
    // `memory: false` (filesystem-only pause) is served by a full pause, which keeps more.
    if app.pause(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::conflict(format!(
            "sandbox {id} is already paused"
        )))
    }
}

pub(super) async fn connect(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(req): JsonBody<ConnectSandboxRequest>,
) -> Result<Response, ApiError> {
    let (record, resumed) = app.connect(&id, req.timeout).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sandbox_dto(&app, &record))).into_response())
}

#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct ResumeV1 {
    #[serde(default)]
    timeout: Option<i64>,
}

/// v1 resume: 201 when resumed, 409 when it was not paused.
pub(super) async fn resume_v1(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(req): JsonBody<ResumeV1>,
) -> Result<Response, ApiError> {
    let r = app.visible(&id)?;
    if r.state != RecordState::Paused {
        return Err(ApiError::conflict(format!("sandbox {id} is not paused")));
    }
    let (record, _) = app.connect(&id, req.timeout).await?;
    Ok((StatusCode::CREATED, Json(sandbox_dto(&app, &record))).into_response())
}

/// `PUT /sandboxes/{id}/network`: 204 once replaced. An empty body is `{}`: it clears the
/// policy, as an omitted field does.
pub(super) async fn update_network(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(req): JsonBody<SandboxNetworkUpdate>,
) -> Result<StatusCode, ApiError> {
    app.update_network(&id, &req).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn metrics(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    ApiQuery(range): ApiQuery<MetricsRange>,
) -> Result<Response, ApiError> {
    Ok(Json(app.metrics(&id, range).await?).into_response())
}

fn sandbox_dto(app: &App, r: &SandboxRecord) -> Sandbox {
    Sandbox {
        template_id: r.template_id.clone(),
        sandbox_id: r.sandbox_id.to_string(),
        client_id: CLIENT_ID.to_owned(),
        envd_version: ENVD_VERSION.to_owned(),
        alias: Some(r.template_id.clone()),
        envd_access_token: Some(r.access_token.clone()),
        traffic_access_token: r.traffic_access_token.clone(),
        domain: app.config.domain.clone(),
    }
}

fn listed_dto(r: &SandboxRecord) -> ListedSandbox {
    ListedSandbox {
        template_id: r.template_id.clone(),
        sandbox_id: r.sandbox_id.to_string(),
        client_id: CLIENT_ID.to_owned(),
        started_at: rfc3339_ms(r.started_ms),
        end_at: rfc3339_ms(r.end_ms),
        envd_version: ENVD_VERSION.to_owned(),
        cpu_count: r.budget.cpus,
        memory_mb: r.budget.memory.as_mib(),
        disk_size_mb: r.budget.disk.as_mib(),
        state: public_state(r.state),
        alias: Some(r.template_id.clone()),
        metadata: r.metadata.clone(),
    }
}

/// The detail view is the list view plus what only the sandbox's owner should see.
fn detail_dto(app: &App, r: &SandboxRecord) -> SandboxDetail {
    SandboxDetail {
        listed: listed_dto(r),
        envd_access_token: Some(r.access_token.clone()),
        allow_internet_access: Some(egress::internet_access(r.egress.as_ref())),
        domain: app.config.domain.clone(),
        lifecycle: Some(SandboxLifecycle {
            auto_resume: r.auto_resume,
            on_timeout: if r.auto_pause {
                OnTimeout::Pause
            } else {
                OnTimeout::Kill
            },
        }),
        network: egress::detail_network(r.egress.as_ref(), r.traffic_access_token.is_some()),
    }
}

fn public_state(s: RecordState) -> SandboxState {
    match s {
        RecordState::Paused => SandboxState::Paused,
        RecordState::Running | RecordState::Starting => SandboxState::Running,
    }
}
