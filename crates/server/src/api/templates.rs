//! `/templates` and `/firkin/v1/templates/…`: listing (E2B's DTO), builds, their status and
//! deletion.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use firkin_e2b_wire::Template;

use super::extract::{ApiPath, ApiQuery, RequiredJson};
use super::internal;
use crate::app::{App, ENVD_VERSION, rfc3339_ms};
use crate::error::ApiError;
use crate::types::BuildTemplateRequest;

pub(super) async fn list(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let records = app.store.templates().map_err(internal)?;
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
    let builds = app.store.builds().map_err(internal)?;
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

pub(super) async fn build(
    State(app): State<Arc<App>>,
    RequiredJson(req): RequiredJson<BuildTemplateRequest>,
) -> Result<Response, ApiError> {
    let template = req.template_id.clone();
    let (build_id, _) = app.start_build(req)?;
    let status = app.build_status(&template, &build_id, 0)?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

/// Kept as text so that a bad number is answered with the same message as before `Query`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct BuildStatusQuery {
    #[serde(rename = "logsOffset")]
    logs_offset: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct BuildPath {
    template: String,
    build: String,
}

pub(super) async fn build_status(
    State(app): State<Arc<App>>,
    ApiPath(p): ApiPath<BuildPath>,
    ApiQuery(q): ApiQuery<BuildStatusQuery>,
) -> Result<Response, ApiError> {
    let offset = q
        .logs_offset
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid logsOffset {v:?}")))
        })
        .transpose()?
        .unwrap_or(0);
    Ok(Json(app.build_status(&p.template, &p.build, offset)?).into_response())
}

pub(super) async fn delete(
    State(app): State<Arc<App>>,
    ApiPath(template): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    app.delete_template(&template)?;
    Ok(StatusCode::NO_CONTENT)
}
