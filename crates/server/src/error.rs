//! Every error the control plane answers, as E2B's `{"code","message"}` JSON, and the
//! sandbox-plane "not found" shape.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use firkin_runtime::RuntimeError;

pub use firkin_e2b_wire::{ApiError, SHOULD_RETRY};

/// Maps a runtime failure of a create or resume. Capacity problems are retryable
/// (429 with `Retry-After`); a create that failed left nothing behind, so a retry is safe.
pub fn from_runtime(err: &RuntimeError) -> ApiError {
    let message = err.to_string();
    match err {
        RuntimeError::QueueFull { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
            .retry_after(Duration::from_secs(2)),
        RuntimeError::QueueTimeout { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
                .retry_after(Duration::from_secs(5))
        }
        RuntimeError::NotFound(id) => ApiError::sandbox_not_found(id.as_str()),
        RuntimeError::AlreadyRunning(_) => ApiError::conflict(message),
        RuntimeError::Oversized(_) => ApiError::bad_request(message),
        // Free disk does not come back by itself quickly; an operator has to act.
        RuntimeError::Disk(_) => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, message),
        RuntimeError::Integrity { .. } => ApiError::internal(format!(
            "{message}; the snapshot on disk is damaged or was changed (rebuild the template)"
        )),
        // The sandbox runs, but the port could not be forwarded (its limit, most likely).
        RuntimeError::Port { .. } => ApiError::new(StatusCode::BAD_GATEWAY, message),
        RuntimeError::Launch(_)
        | RuntimeError::Init(_)
        | RuntimeError::Pause { .. }
        | RuntimeError::Seal(_)
        | RuntimeError::Stop { .. }
        | RuntimeError::Network { .. }
        | RuntimeError::Io { .. } => ApiError::internal(message),
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
        let e = from_runtime(&RuntimeError::QueueFull { max_pending: 3 });
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let resp = e.into_response();
        assert_eq!(resp.headers()[SHOULD_RETRY], "true");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn launch_failures_say_do_not_retry() {
        let e = from_runtime(&RuntimeError::Launch("qemu died".into()));
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()[SHOULD_RETRY], "false");
    }
}
