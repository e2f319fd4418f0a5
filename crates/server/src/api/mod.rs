//! The control plane: E2B's REST API (protocol notes §2) and firkin's template endpoints, cut
//! by resource. Each module extracts requests and maps records to E2B's DTOs; the decisions and
//! state changes are [`App`]'s (see [`crate::lifecycle`]).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};

use crate::app::App;
use crate::error::ApiError;
use crate::store::StoreError;

mod build_files;
mod extract;
pub mod list;
mod sandboxes;
mod status;
mod templates;
pub mod unsupported;

pub(crate) use extract::BodyLimit;

/// Builds the control-plane router.
pub(crate) fn router(app: Arc<App>) -> Router {
    let authed = unsupported::add(Router::new())
        .route(
            "/v2/sandboxes",
            post(sandboxes::create).get(sandboxes::list_v2),
        )
        // v1 create takes the same body as v2 (E2B's `NewSandbox`); older clients and Cube's
        // SDK call it.
        .route(
            "/sandboxes",
            get(sandboxes::list_v1).post(sandboxes::create),
        )
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get_sandbox).delete(sandboxes::kill),
        )
        .route("/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(sandboxes::refresh))
        .route("/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/sandboxes/{id}/resume", post(sandboxes::resume_v1))
        .route("/sandboxes/{id}/connect", post(sandboxes::connect))
        .route("/v2/sandboxes/{id}/connect", post(sandboxes::connect))
        .route("/sandboxes/{id}/metrics", get(sandboxes::metrics))
        .route("/sandboxes/{id}/network", put(sandboxes::update_network))
        .route("/templates", get(templates::list))
        // One page holds every template, so v2's pagination ends at once (no X-Next-Token).
        .route("/v2/templates", get(templates::list))
        .route(
            "/templates/{template}/files/{hash}",
            get(build_files::lookup),
        )
        .route("/firkin/v1/build-files/{hash}", put(build_files::upload))
        .route("/firkin/v1/status", get(status::status))
        .route(
            "/firkin/v1/templates",
            post(templates::build).get(templates::list),
        )
        .route("/firkin/v1/templates/{template}", delete(templates::delete))
        .route(
            "/firkin/v1/templates/{template}/builds/{build}",
            get(templates::build_status),
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

async fn health() -> Response {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
}

/// A database failure while reading for a response: a 500 that names it.
fn internal(err: StoreError) -> ApiError {
    ApiError::internal(err.to_string())
}
