//! Every error the control plane answers, as E2B's `{"code","message"}` JSON, and the
//! sandbox-plane "not found" shape.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use firkin_e2b_wire::ErrorBody;
use firkin_runtime::RuntimeError;

/// `Should-Retry` tells the SDK whether to retry (§2.1 of the protocol notes). Without it, a
/// 429/502/503/504 is retried, and for a create that can mean duplicate sandboxes; so every
/// error states it explicitly.
pub const SHOULD_RETRY: &str = "should-retry";

/// An error answered to an SDK.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// E2B's optional machine-readable `error_code`.
    pub error_code: Option<&'static str>,
    /// `Some` marks a failure worth retrying, after that long (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            error_code: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn sandbox_not_found(id: &str) -> Self {
        Self::not_found(format!("sandbox {id:?} not found"))
    }

    /// Marks the error as transient: the SDK waits `after` and retries.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn with_error_code(mut self, code: &'static str) -> Self {
        self.error_code = Some(code);
        self
    }

    /// Maps a runtime failure of a create or resume. Capacity problems are retryable
    /// (429 with `Retry-After`); a create that failed left nothing behind, so a retry is safe.
    pub fn from_runtime(err: &RuntimeError) -> Self {
        let message = err.to_string();
        match err {
            RuntimeError::QueueFull { .. } => Self::new(StatusCode::TOO_MANY_REQUESTS, message)
                .retry_after(Duration::from_secs(2)),
            RuntimeError::QueueTimeout { .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
                    .retry_after(Duration::from_secs(5))
            }
            RuntimeError::NotFound(id) => Self::sandbox_not_found(id.as_str()),
            RuntimeError::AlreadyRunning(_) => Self::conflict(message),
            RuntimeError::Oversized(_) => Self::bad_request(message),
            // Free disk does not come back by itself quickly; an operator has to act.
            RuntimeError::Disk(_) => Self::new(StatusCode::INSUFFICIENT_STORAGE, message),
            RuntimeError::Integrity { .. } => Self::internal(format!(
                "{message}; the snapshot on disk is damaged or was changed (rebuild the template)"
            )),
            RuntimeError::Launch(_)
            | RuntimeError::Init(_)
            | RuntimeError::Pause { .. }
            | RuntimeError::Seal(_)
            | RuntimeError::Stop { .. }
            | RuntimeError::Io { .. } => Self::internal(message),
        }
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

/// The sandbox plane's answer for a sandbox that is gone (upstream's proxy shape). The SDK
/// matches "was not found" and raises `SandboxNotRunningException`.
pub fn sandbox_plane_not_found(sandbox_id: &str, detail: Option<&str>) -> Response {
    let message = match detail {
        Some(d) => format!("The sandbox was not found ({d})"),
        None => "The sandbox was not found".to_owned(),
    };
    sandbox_plane_502(sandbox_id, &message, None)
}

/// The sandbox runs but nothing listens on the port. The SDK matches "port is not open".
pub fn sandbox_plane_port_closed(sandbox_id: &str, port: u16) -> Response {
    sandbox_plane_502(
        sandbox_id,
        &format!("The sandbox is running but port is not open: {port}"),
        Some(port),
    )
}

fn sandbox_plane_502(sandbox_id: &str, message: &str, port: Option<u16>) -> Response {
    let mut body = serde_json::json!({
        "sandboxId": sandbox_id,
        "message": message,
        "code": 502,
    });
    if let Some(p) = port {
        body["port"] = p.into();
    }
    let mut resp = (StatusCode::BAD_GATEWAY, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_full_is_a_retryable_429() {
        let e = ApiError::from_runtime(&RuntimeError::QueueFull { max_pending: 3 });
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let resp = e.into_response();
        assert_eq!(resp.headers()[SHOULD_RETRY], "true");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn launch_failures_say_do_not_retry() {
        let e = ApiError::from_runtime(&RuntimeError::Launch("qemu died".into()));
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()[SHOULD_RETRY], "false");
    }
}
