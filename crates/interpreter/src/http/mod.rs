//! The HTTP API on port 49999.

mod contexts;
mod execute;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use firkin_e2b_wire::ApiError;

use crate::contexts::Contexts;
use crate::error::RequestError;

/// The service's routes over its contexts.
pub fn router(contexts: Arc<Contexts>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/execute", post(execute::execute))
        .route("/contexts", post(contexts::create).get(contexts::list))
        .route("/contexts/{id}/restart", post(contexts::restart))
        .route("/contexts/{id}", delete(contexts::remove))
        .with_state(contexts)
}

async fn health() -> &'static str {
    "OK"
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match &e {
            RequestError::UnknownContext(_) => StatusCode::NOT_FOUND,
            RequestError::UnknownLanguage { .. }
            | RequestError::ContextAndLanguage
            | RequestError::EnvName(_) => StatusCode::BAD_REQUEST,
            RequestError::Kernel(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}
