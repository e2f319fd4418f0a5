//! JSON of firkin's own endpoints (`/firkin/v1/...`), shared with the CLI.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;

/// `POST /firkin/v1/templates`: build (or rebuild, with `force`) a template.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildTemplateRequest {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    #[serde(rename = "memoryMB", default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(
        rename = "diskSizeMB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub disk_size_mb: Option<u64>,
    /// Shell commands run in the template before its snapshot is taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// Rebuild even if the template exists.
    #[serde(default)]
    pub force: bool,
    /// Where the root filesystem comes from: `{"kind":"debian","suite":…,"packages":[…]}`,
    /// `{"kind":"oci","archive":"/path/image.tar"}` or `{"kind":"directory","path":"/path"}`.
    /// Default: E2B's `base` (Debian bookworm, python3, git, curl, sudo, user `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<firkin_runtime::qemu::RootfsSource>,
    /// Upload the code interpreter's bundle (the static `firkin-interpreter`, port 49999,
    /// bash_kernel's wheel and Deno) into the booted template's
    /// `firkin_runtime::qemu::INTERPRETER_UPLOAD_DIR` before `commands` run; the commands
    /// install and start it (see the built-in `code-interpreter-v1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interpreter: bool,
}

/// A build's state: the answer of the build request (202) and of status polling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// `building`, `ready` or `error`.
    pub status: String,
    /// What the builder is doing now.
    #[serde(default)]
    pub phase: String,
    /// 0.0 to 1.0.
    #[serde(default)]
    pub progress: f32,
    /// Log lines from `logsOffset` on.
    #[serde(default)]
    pub logs: Vec<String>,
    /// Pass as `logsOffset` next time to get only newer lines.
    #[serde(default)]
    pub next_logs_offset: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /firkin/v1/status`: what the server holds and can hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    pub version: String,
    pub envd_version: String,
    pub capacity: Budget,
    pub active: Budget,
    pub warm: Budget,
    pub running: usize,
    pub paused: usize,
    pub warm_sandboxes: usize,
    pub queued: usize,
    /// One entry per template with a warm pool, by template ID.
    #[serde(default)]
    pub warm_pool: Vec<WarmPoolState>,
}

/// A template's warm pool in [`ServerStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolState {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Sandboxes the pool is meant to hold.
    pub target: usize,
    /// Sandboxes it holds now.
    pub ready: usize,
    /// `ok`, or `failing` while its refills fail (then the fields below say why and when the
    /// next attempt is).
    pub state: WarmPoolHealth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC 3339 time of the first failure in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_in_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmPoolHealth {
    Ok,
    Failing,
}

impl From<firkin_runtime::WarmPoolStatus> for WarmPoolState {
    fn from(p: firkin_runtime::WarmPoolStatus) -> Self {
        let failing = p.failing;
        Self {
            template_id: p.template_id.to_string(),
            build_id: p.build_id,
            target: p.target,
            ready: p.ready,
            state: match failing {
                Some(_) => WarmPoolHealth::Failing,
                None => WarmPoolHealth::Ok,
            },
            failing_since: failing.as_ref().and_then(|f| f.since.format(&Rfc3339).ok()),
            consecutive_failures: failing.as_ref().map(|f| f.consecutive_failures),
            next_retry_in_ms: failing
                .as_ref()
                .map(|f| u64::try_from(f.next_retry_in.as_millis()).unwrap_or(u64::MAX)),
            error: failing.map(|f| f.error),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
}

impl From<firkin_admission::ResourceBudget> for Budget {
    fn from(b: firkin_admission::ResourceBudget) -> Self {
        Self {
            cpu_count: b.cpus,
            memory_mb: b.memory.as_mib(),
            disk_size_mb: b.disk.as_mib(),
        }
    }
}
