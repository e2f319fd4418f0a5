//! The Connect RPC services, on the `connectrpc` runtime.
//!
//! `connectrpc` already gives the SDK what it checks: streaming responses with the exact
//! `application/connect+json` content type and an end-of-stream envelope, unary errors as
//! `{"code","message"}` JSON with the standard status mapping, JSON and binary codecs. The
//! runtime is built without compression codecs, so responses are never compressed (the SDK
//! rejects compressed responses).

mod filesystem;
mod process;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use connectrpc::{ConnectError, RequestContext};

use crate::state::Envd;
use crate::users::{User, UserError};

pub use filesystem::FilesystemService;
pub use process::ProcessService;

/// Keepalive interval when the client asks for none (upstream's default).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// The Connect router serving both services.
pub fn connect_router(envd: Arc<Envd>) -> connectrpc::Router {
    connectrpc::Router::new()
        .add_service(Arc::new(ProcessService::new(envd.clone())))
        .add_service(Arc::new(FilesystemService::new(envd)))
}

/// The user a call acts as: the username of `Authorization: Basic base64(user:)`, or the
/// default user. An unknown user is `unauthenticated`, as upstream answers.
pub(crate) fn request_user(envd: &Envd, ctx: &RequestContext) -> Result<User, ConnectError> {
    let name = match ctx.header("authorization") {
        None => None,
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| ConnectError::unauthenticated("invalid authorization header"))?;
            let encoded = v
                .strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
                .ok_or_else(|| ConnectError::unauthenticated("expected Basic authorization"))?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| ConnectError::unauthenticated("invalid Basic credentials"))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| ConnectError::unauthenticated("invalid Basic credentials"))?;
            let user = decoded.split(':').next().unwrap_or("").to_owned();
            Some(user)
        }
    };
    envd.resolve_user(name.as_deref()).map_err(|e| match e {
        UserError::NotFound(_) => ConnectError::unauthenticated(e.to_string()),
        UserError::Read { .. } => ConnectError::internal(e.to_string()),
    })
}

/// The `Keepalive-Ping-Interval` (seconds) the client asked for.
pub(crate) fn keepalive_interval(ctx: &RequestContext) -> Duration {
    ctx.header("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs)
}

/// Maps a filesystem error on `what` to the Connect code the SDK understands.
pub(crate) fn io_error(e: &std::io::Error, what: &str) -> ConnectError {
    use std::io::ErrorKind;
    let msg = format!("{what}: {e}");
    match e.kind() {
        ErrorKind::NotFound => ConnectError::not_found(msg),
        ErrorKind::AlreadyExists => ConnectError::already_exists(msg),
        ErrorKind::PermissionDenied => ConnectError::permission_denied(msg),
        ErrorKind::NotADirectory
        | ErrorKind::IsADirectory
        | ErrorKind::InvalidInput
        | ErrorKind::InvalidFilename
        | ErrorKind::DirectoryNotEmpty => ConnectError::invalid_argument(msg),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => ConnectError::resource_exhausted(msg),
        _ => ConnectError::internal(msg),
    }
}
