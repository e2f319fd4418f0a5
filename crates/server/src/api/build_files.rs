//! `GET /templates/{template}/files/{hash}` and the upload it hands out (issue 14): E2B's SDKs
//! ask whether a COPY step's files are present and, if not, `PUT` a tar to the `url` answered
//! with exactly the `headers` answered. Upstream the url is a presigned bucket URL; here it is
//! firkin's own `PUT /firkin/v1/build-files/{hash}` on the same listener, and the headers carry
//! the caller's own API key (the only credential this API has).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::extract::ApiPath;
use crate::app::App;
use crate::build_files::BuildFilesError;
use crate::error::ApiError;

fn files_error(err: BuildFilesError) -> ApiError {
    match &err {
        BuildFilesError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, err.to_string())
        }
        e if e.is_client_error() => ApiError::bad_request(err.to_string()),
        _ => {
            tracing::error!(%err, "build files");
            ApiError::internal(err.to_string())
        }
    }
}

pub(super) async fn lookup(
    State(app): State<Arc<App>>,
    ApiPath((_template, hash)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let present = app.build_files.contains(&hash).map_err(files_error)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::bad_request("a Host header is needed for the upload url"))?;
    // firkin itself serves plain HTTP (TLS is issue 15's); behind a TLS-terminating proxy the
    // SDK must be sent back through it.
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    let key = headers
        .get("x-api-key")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "present": present,
            "url": format!("{scheme}://{host}/firkin/v1/build-files/{hash}"),
            "headers": {"X-API-KEY": key},
        })),
    )
        .into_response())
}

pub(super) async fn upload(
    State(app): State<Arc<App>>,
    ApiPath(hash): ApiPath<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let size = app
        .build_files
        .receive(&hash, body)
        .await
        .map_err(files_error)?;
    tracing::info!(%hash, size, "build files received");
    Ok((
        StatusCode::CREATED,
        Json(json!({"hash": hash, "size": size})),
    )
        .into_response())
}
