//! `GET /firkin/v1/status`: capacity, sandboxes and warm pools of this server.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::internal;
use crate::app::{App, ENVD_VERSION};
use crate::error::ApiError;
use crate::store::RecordState;
use crate::types::ServerStatus;

pub(super) async fn status(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let cap = app.rt.capacity();
    let records = app.store.sandboxes().map_err(internal)?;
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
