//! The control plane: E2B's REST API (protocol notes §2) and firkin's template endpoints.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use firkin_e2b_wire::{
    ConnectSandboxRequest, ListedSandbox, PauseSandboxRequest, RefreshRequest,
    SandboxCreateRequest, SetTimeoutRequest, Template,
};
use firkin_types::SandboxId;
use serde::de::DeserializeOwned;

use crate::app::{App, ENVD_VERSION, rfc3339_ms};
use crate::error::ApiError;
use crate::list::parse_list_query;
use crate::store::RecordState;
use crate::types::{BuildTemplateRequest, ServerStatus};

/// Builds the control-plane router.
pub(crate) fn router(app: Arc<App>) -> Router {
    let authed = Router::new()
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes", get(list_v1))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume_v1))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/templates", get(list_templates))
        .route("/firkin/v1/status", get(status))
        .route(
            "/firkin/v1/templates",
            post(build_template).get(list_templates),
        )
        .route("/firkin/v1/templates/{template}", delete(delete_template))
        .route(
            "/firkin/v1/templates/{template}/builds/{build}",
            get(build_status),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(authed)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .with_state(app)
}

async fn require_api_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match req.headers().get("x-api-key").map(|v| v.to_str()) {
        None => ApiError::unauthorized("missing X-API-KEY header").into_response(),
        Some(Ok(key)) if app.keys.accepts(key) => next.run(req).await,
        Some(_) => ApiError::unauthorized("invalid API key").into_response(),
    }
}

/// A JSON body, with E2B-shaped errors: 413 past the body limit, 400 for anything that does
/// not parse. An empty body means the type's default (the SDK sends `{}` or nothing for the
/// optional bodies).
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(Self)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// A JSON body that must be present.
struct RequiredJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for RequiredJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("missing JSON body"));
        }
        serde_json::from_slice(&bytes)
            .map(Self)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Bodies past the limit are still read (and dropped) up to this much, so that the client
/// finishes sending and sees the 413 instead of a broken pipe.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let limit = req
        .extensions()
        .get::<BodyLimit>()
        .map_or(1024 * 1024, |l| l.0);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(too_large());
    }
    let mut buf = bytes::BytesMut::new();
    let mut seen: u64 = 0;
    let mut over = declared.is_some_and(|n| n > limit as u64);
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            seen += data.len() as u64;
            if seen > limit as u64 {
                over = true;
                buf.clear();
                if seen > DRAIN_LIMIT {
                    break;
                }
            } else {
                buf.extend_from_slice(data);
            }
        }
        Ok::<(), ApiError>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), read).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request body too slow",
            ));
        }
    }
    if over {
        return Err(too_large());
    }
    Ok(buf.freeze())
}

/// The body limit, put into each request's extensions by the dispatcher.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimit(pub usize);

/// A sandbox id from the path. An id that cannot exist is simply not found.
struct SandboxPath(SandboxId);

impl<S: Send + Sync> FromRequestParts<S> for SandboxPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))?;
        SandboxId::new(&raw)
            .map(Self)
            .map_err(|_| ApiError::sandbox_not_found(&raw))
    }
}

/// Any path parameters, with E2B-shaped errors.
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| Self(p))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))
    }
}

async fn health() -> Response {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
}

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

async fn create(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<SandboxCreateRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let sandbox = app.create_idempotent(req, key).await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

async fn list_v2(
    State(app): State<Arc<App>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse_list_query(raw.as_deref())?;
    let records = app
        .store
        .sandboxes()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (page, next) = q.page(&records);
    let body: Vec<ListedSandbox> = page.into_iter().map(|r| app.listed_dto(r)).collect();
    let mut resp = Json(body).into_response();
    if let Some(next) = next
        && let Ok(v) = header::HeaderValue::from_str(&next)
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// v1 list: running sandboxes only, no pagination.
async fn list_v1(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let records = app
        .store
        .sandboxes()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let body: Vec<ListedSandbox> = records
        .iter()
        .filter(|r| r.state == RecordState::Running)
        .map(|r| app.listed_dto(r))
        .collect();
    Ok(Json(body).into_response())
}

async fn get_sandbox(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
) -> Result<Response, ApiError> {
    let r = app.visible(&id)?;
    Ok(Json(app.detail_dto(&r)).into_response())
}

async fn kill(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
) -> Result<StatusCode, ApiError> {
    app.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    RequiredJson(req): RequiredJson<SetTimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    app.set_timeout(&id, req.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(req): JsonBody<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    app.refresh(&id, req.duration).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
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

async fn connect(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(req): JsonBody<ConnectSandboxRequest>,
) -> Result<Response, ApiError> {
    let (sandbox, resumed) = app.connect(&id, req.timeout).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sandbox)).into_response())
}

#[derive(Debug, Default, serde::Deserialize)]
struct ResumeV1 {
    #[serde(default)]
    timeout: Option<i64>,
}

/// v1 resume: 201 when resumed, 409 when it was not paused.
async fn resume_v1(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
    JsonBody(req): JsonBody<ResumeV1>,
) -> Result<Response, ApiError> {
    let r = app.visible(&id)?;
    if r.state != RecordState::Paused {
        return Err(ApiError::conflict(format!("sandbox {id} is not paused")));
    }
    let (sandbox, _) = app.connect(&id, req.timeout).await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

async fn metrics(
    State(app): State<Arc<App>>,
    SandboxPath(id): SandboxPath,
) -> Result<Response, ApiError> {
    Ok(Json(app.metrics(&id).await?).into_response())
}

async fn list_templates(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let records = app
        .store
        .templates()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut out: Vec<Template> = records
        .iter()
        .map(|t| Template {
            template_id: t.template_id.clone(),
            build_id: t.build_id.clone(),
            cpu_count: t.budget.cpus,
            memory_mb: t.budget.memory.as_mib(),
            disk_size_mb: t.budget.disk.as_mib(),
            public: false,
            aliases: vec![t.template_id.clone()],
            names: vec![t.template_id.clone()],
            created_at: rfc3339_ms(t.created_ms),
            updated_at: rfc3339_ms(t.updated_ms),
            envd_version: t.envd_version.clone(),
            build_status: match app.building(&t.template_id) {
                Some(_) => "building".into(),
                None => "ready".into(),
            },
        })
        .collect();
    // Templates whose first build is still running are listed too, so a user sees them.
    let builds = app
        .store
        .builds()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    for b in builds {
        if out.iter().any(|t| t.template_id == b.template_id) {
            continue;
        }
        if app
            .building(&b.template_id)
            .is_some_and(|(id, _)| id == b.build_id)
        {
            out.push(Template {
                template_id: b.template_id.clone(),
                build_id: b.build_id.clone(),
                cpu_count: 0,
                memory_mb: 0,
                disk_size_mb: 0,
                public: false,
                aliases: vec![b.template_id.clone()],
                names: vec![b.template_id.clone()],
                created_at: rfc3339_ms(b.created_ms),
                updated_at: rfc3339_ms(b.created_ms),
                envd_version: ENVD_VERSION.to_owned(),
                build_status: "building".into(),
            });
        }
    }
    Ok(Json(out).into_response())
}

async fn build_template(
    State(app): State<Arc<App>>,
    RequiredJson(req): RequiredJson<BuildTemplateRequest>,
) -> Result<Response, ApiError> {
    let template = req.template_id.clone();
    let (build_id, _) = app.start_build(req)?;
    let status = app.build_status(&template, &build_id, 0)?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

#[derive(Debug, serde::Deserialize)]
struct BuildPath {
    template: String,
    build: String,
}

async fn build_status(
    State(app): State<Arc<App>>,
    ApiPath(p): ApiPath<BuildPath>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let offset = raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("logsOffset="))
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid logsOffset {v:?}")))
        })
        .transpose()?
        .unwrap_or(0);
    Ok(Json(app.build_status(&p.template, &p.build, offset)?).into_response())
}

async fn delete_template(
    State(app): State<Arc<App>>,
    ApiPath(template): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    app.delete_template(&template)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn status(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let cap = app.rt.capacity();
    let records = app
        .store
        .sandboxes()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let paused = records
        .iter()
        .filter(|r| r.state == RecordState::Paused)
        .count();
    Ok(Json(ServerStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        envd_version: ENVD_VERSION.to_owned(),
        capacity: cap.capacity.into(),
        active: cap.active.into(),
        warm: cap.warm.into(),
        running: cap.running,
        paused,
        warm_sandboxes: cap.warm_sandboxes,
        queued: cap.queued,
        warm_pool: app.rt.warm_pools().into_iter().map(Into::into).collect(),
    })
    .into_response())
}
