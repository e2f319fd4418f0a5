//! `GET /sandboxes/{id}/metrics`: one sample read from the sandbox's agent.

use std::time::Duration;

use axum::body::Body;
use firkin_e2b_contract::ENVD_PORT;
use firkin_e2b_wire::SandboxMetric;
use firkin_types::SandboxId;
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::app::{App, rfc3339_ms};
use crate::error::ApiError;
use crate::store::RecordState;

#[derive(Debug, Deserialize)]
struct EnvdMetrics {
    ts: i64,
    cpu_count: u32,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    #[serde(default)]
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

impl App {
    pub(crate) async fn metrics(&self, id: &SandboxId) -> Result<Vec<SandboxMetric>, ApiError> {
        let record = self.visible(id)?;
        if record.state != RecordState::Running {
            return Ok(Vec::new());
        }
        let Some(addr) = self.rt.route(id, ENVD_PORT) else {
            return Ok(Vec::new());
        };
        let req = http::Request::get(format!("http://{addr}/metrics"))
            .header("x-access-token", &record.access_token)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(format!("building the metrics request: {e}")))?;
        let unavailable = |detail: String| {
            ApiError::new(
                http::StatusCode::BAD_GATEWAY,
                format!("sandbox agent did not report metrics: {detail}"),
            )
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("status {}", resp.status())));
        }
        let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        let m: EnvdMetrics =
            serde_json::from_slice(&body).map_err(|e| unavailable(format!("bad JSON: {e}")))?;
        Ok(vec![SandboxMetric {
            timestamp: rfc3339_ms(m.ts.saturating_mul(1000)),
            timestamp_unix: m.ts,
            cpu_count: m.cpu_count,
            cpu_used_pct: m.cpu_used_pct,
            mem_used: m.mem_used,
            mem_total: m.mem_total,
            mem_cache: m.mem_cache,
            disk_used: m.disk_used,
            disk_total: m.disk_total,
        }])
    }
}
