//! The error both E2B planes answer, the control plane (`firkin serve`) and envd in the guest:
//! E2B's `{"code": <status>, "message": ...}` JSON, so the SDKs parse one shape everywhere.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::ErrorBody;

/// `Should-Retry` tells the SDK whether to retry (§2.1 of the protocol notes). Without it, a
/// 429/502/503/504 is retried, and for a create that can mean duplicate sandboxes; so every
/// error states it explicitly.
pub const SHOULD_RETRY: &str = "should-retry";

/// An error answered to an SDK.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status (also the JSON `code`).
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
    /// E2B's optional machine-readable `error_code`.
    pub error_code: Option<&'static str>,
    /// `Some` marks a failure worth retrying, after that long (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with the given status, not worth retrying.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            error_code: None,
            retry_after: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 404 for a sandbox id the control plane does not know.
    pub fn sandbox_not_found(id: &str) -> Self {
        Self::not_found(format!("sandbox {id:?} not found"))
    }

    /// Maps a filesystem error on `what` to the status the SDK understands.
    pub fn from_io(err: &std::io::Error, what: &str) -> Self {
        use std::io::ErrorKind;
        let status = match err.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::IsADirectory
            | ErrorKind::NotADirectory
            | ErrorKind::InvalidInput
            | ErrorKind::InvalidFilename
            | ErrorKind::AlreadyExists => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, format!("{what}: {err}"))
    }

    /// Marks the error as transient: the SDK waits `after` and retries.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Adds E2B's machine-readable `error_code`.
    pub fn with_error_code(mut self, code: &'static str) -> Self {
        self.error_code = Some(code);
        self
    }

    fn body(&self) -> Vec<u8> {
        let body = ErrorBody {
            code: self.status.as_u16(),
            message: self.message.clone(),
            error_code: self.error_code.map(str::to_owned),
        };
        // Serialising a struct of a u16 and strings cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self.retry_after {
            Some(after) => {
                h.insert(SHOULD_RETRY, HeaderValue::from_static("true"));
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(after.as_secs().max(1)),
                );
            }
            None => {
                h.insert(SHOULD_RETRY, HeaderValue::from_static("false"));
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_code_and_message_only_without_an_error_code() {
        let e = ApiError::not_found("gone");
        assert_eq!(e.body(), br#"{"code":404,"message":"gone"}"#);
        let e = ApiError::bad_request("x").with_error_code("bad");
        assert_eq!(
            e.body(),
            br#"{"code":400,"message":"x","error_code":"bad"}"#
        );
    }

    #[test]
    fn retryable_errors_say_when() {
        let resp = ApiError::internal("busy")
            .retry_after(Duration::from_millis(10))
            .into_response();
        assert_eq!(resp.headers()[SHOULD_RETRY], "true");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let resp = ApiError::conflict("no").into_response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()[SHOULD_RETRY], "false");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn io_errors_map_to_sdk_statuses() {
        use std::io::{Error, ErrorKind};
        for (kind, status) in [
            (ErrorKind::NotFound, StatusCode::NOT_FOUND),
            (ErrorKind::PermissionDenied, StatusCode::FORBIDDEN),
            (ErrorKind::StorageFull, StatusCode::INSUFFICIENT_STORAGE),
            (ErrorKind::IsADirectory, StatusCode::BAD_REQUEST),
            (ErrorKind::Other, StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            let e = ApiError::from_io(&Error::from(kind), "/x");
            assert_eq!(e.status, status, "{kind:?}");
            assert!(e.message.starts_with("/x: "), "{}", e.message);
        }
    }
}
