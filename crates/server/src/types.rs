//! JSON of firkin's own endpoints (`/firkin/v1/...`), shared with the CLI.

use serde::{Deserialize, Serialize};

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
