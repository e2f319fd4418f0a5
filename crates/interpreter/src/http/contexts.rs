//! `/contexts`: create, list, restart, remove.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use firkin_e2b_wire::ApiError;
use serde::Deserialize;

use crate::contexts::{ContextInfo, Contexts};

/// `POST /contexts` body; both fields optional, as the SDK sends only what it was given.
#[derive(Debug, Default, Deserialize)]
pub struct CreateContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

pub async fn create(
    State(contexts): State<Arc<Contexts>>,
    body: Option<Json<CreateContext>>,
) -> Result<Json<ContextInfo>, ApiError> {
    let Json(req) = body.unwrap_or_default();
    let ctx = contexts
        .create(req.language.as_deref(), req.cwd.map(PathBuf::from))
        .await?;
    Ok(Json(ctx.info()))
}

pub async fn list(State(contexts): State<Arc<Contexts>>) -> Json<Vec<ContextInfo>> {
    Json(contexts.list())
}

pub async fn restart(
    State(contexts): State<Arc<Contexts>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    contexts.restart(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove(
    State(contexts): State<Arc<Contexts>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    contexts.remove(&id)?;
    Ok(StatusCode::NO_CONTENT)
}
