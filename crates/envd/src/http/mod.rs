//! The plain-HTTP side of envd (§4 of the protocol reference), the access-token gate in front
//! of everything, and the router that joins them with the Connect RPC services.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use firkin_e2b_wire::file_signature;

pub use firkin_e2b_wire::ApiError;

use crate::state::{Envd, Gate};

mod control;
pub mod files;

/// The envd version reported to clients. The SDK gates features on it; 0.6.4 unlocks all that
/// firkin implements and nothing it does not.
pub const ENVD_VERSION: &str = "0.6.4";

/// Builds the complete envd service: plain HTTP routes, Connect RPC, and the token gate.
pub fn router(envd: Arc<Envd>) -> Router {
    let rpc = crate::rpc::connect_router(envd.clone());
    Router::new()
        .route("/health", axum::routing::get(control::health))
        .route("/init", axum::routing::post(control::init))
        .route("/envs", axum::routing::get(control::envs))
        .route("/metrics", axum::routing::get(control::metrics))
        .route(
            "/files",
            axum::routing::get(files::download).post(files::upload),
        )
        // Streams end with deadline_exceeded at the client's deadline, as upstream's do.
        .fallback_service(
            rpc.into_axum_service().with_deadline_policy(
                connectrpc::DeadlinePolicy::new().with_enforce_on_streams(true),
            ),
        )
        .layer(middleware::from_fn_with_state(envd.clone(), require_token))
        .with_state(envd)
}

fn header_token_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get("x-access-token")
        .is_some_and(|v| file_signature::constant_time_eq(v.as_bytes(), token.as_bytes()))
}

/// Every request but `/health` must carry the token `/init` set in `X-Access-Token`, or, before
/// any `/init` set one, the host's secret for this VM; `/files` may instead carry a valid
/// signature (checked by its handler, which knows the operation). An agent never answers
/// tokenless in a sandbox: another guest that finds its port finds nothing to use.
async fn require_token(State(envd): State<Arc<Envd>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/health" {
        return next.run(req).await;
    }
    let token = match envd.gate() {
        Gate::Open => return next.run(req).await,
        Gate::Token(token) => token,
        Gate::Closed(why) => {
            tracing::warn!(%why, "refusing a request: no token can be checked");
            return ApiError::unauthorized("missing or invalid access token").into_response();
        }
    };
    if header_token_matches(req.headers(), &token) {
        return next.run(req).await;
    }
    if path == "/files" {
        let op = file_signature::SigningOp::of_method(req.method().as_str());
        return match files::verify_signature(req.uri().query().unwrap_or(""), op, &token) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        };
    }
    ApiError::unauthorized("missing or invalid access token").into_response()
}
