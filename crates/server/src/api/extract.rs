//! Extractors with E2B-shaped errors: JSON bodies under a size limit, path parameters and query
//! strings. axum's own rejections are plain text, which the SDK cannot parse.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use firkin_types::SandboxId;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body, with E2B-shaped errors: 413 past the body limit, 400 for anything that does
/// not parse. An empty body means the type's default (the SDK sends `{}` or nothing for the
/// optional bodies).
pub(super) struct JsonBody<T>(pub(super) T);

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
pub(super) struct RequiredJson<T>(pub(super) T);

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
pub(super) struct SandboxPath(pub(super) SandboxId);

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
pub(super) struct ApiPath<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| Self(p))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))
    }
}

/// A query string deserialised by axum's `Query`, with E2B-shaped errors.
pub(super) struct ApiQuery<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Self(q))
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }
}
