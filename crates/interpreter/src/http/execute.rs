//! `POST /execute`: runs code in a context and streams its output as NDJSON.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use firkin_e2b_wire::ApiError;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::contexts::Contexts;
use crate::envvars;
use crate::error::RequestError;
use crate::execution::{self, Outcome, RunRequest};
use crate::language::Dialect;

/// Lines buffered between the kernel and a slow client before the run waits for it.
const LINE_BUFFER: usize = 256;

/// The SDK always sends all four keys (null when unused). `timeout` (seconds) is ours: E2B's
/// SDK enforces its timeout by closing the connection, which interrupts the run just the same.
#[derive(Debug, Deserialize)]
pub struct ExecuteBody {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    timeout: Option<f64>,
}

pub async fn execute(
    State(contexts): State<Arc<Contexts>>,
    Json(body): Json<ExecuteBody>,
) -> Result<Response, ApiError> {
    let ctx = match (&body.context_id, &body.language) {
        (Some(_), Some(_)) => return Err(RequestError::ContextAndLanguage.into()),
        (Some(id), None) => contexts.find(id)?,
        (None, language) => contexts.default_for(language.as_deref().unwrap_or("python"))?,
    };
    let env_vars = body.env_vars.unwrap_or_default();
    envvars::validate(&env_vars)?;
    if !env_vars.is_empty() && Dialect::of(&ctx.language).is_none() {
        return Err(ApiError::bad_request(format!(
            "env_vars are not supported for {}",
            ctx.language
        )));
    }
    let timeout = body
        .timeout
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(Duration::from_secs_f64);

    // Taken before queueing for the kernel: a restart meanwhile cancels this run too.
    let cancel = ctx.cancellation();
    let mut slot = ctx.lock().await;
    contexts
        .ensure_started(&ctx, &mut slot)
        .await
        .map_err(RequestError::from)?;
    let (tx, mut rx) = mpsc::channel(LINE_BUFFER);
    let req = RunRequest {
        code: body.code,
        env_vars,
        timeout,
    };
    let contexts = contexts.clone();
    tokio::spawn(async move {
        let Some(kernel) = slot.as_mut() else {
            return;
        };
        let outcome = execution::run(kernel, req, tx, cancel).await;
        if outcome == Outcome::Stuck || outcome == Outcome::Died {
            slot.take();
            // Started again now rather than on the next run, so the context is ready sooner.
            if let Err(e) = contexts.ensure_started(&ctx, &mut slot).await {
                tracing::warn!(context = %ctx.id, error = %e, "restarting the kernel");
            }
        }
    });

    let lines = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|line| line.map(|l| Ok::<_, Infallible>(Bytes::from(l.to_ndjson()))))
    });
    let mut resp = Body::from_stream(lines).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}
