//! What the firkin runtime promises the E2B API layer: start requests, prepared templates,
//! sandbox records and the ports a sandbox exposes.
//!
//! This crate sits between `firkin-e2b-wire` (the JSON the SDKs send) and the runtime. It must
//! not import the runtime, the VMM or the server: both sides depend on it, not on each other.

use firkin_e2b_wire::SandboxCreateRequest;
use serde::{Deserialize, Serialize};

/// envd, the E2B agent protocol (Connect RPC + `/files`).
pub const ENVD_PORT: u16 = 49983;
/// The code-interpreter service.
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// The MCP gateway.
pub const MCP_PORT: u16 = 50005;
/// Ports every sandbox exposes, in this order.
pub const DEFAULT_EXPOSED_PORTS: [u16; 3] = [ENVD_PORT, CODE_INTERPRETER_PORT, MCP_PORT];

/// A create as the runtime receives it: the user's request plus the template it resolved to.
#[derive(Clone, Debug, PartialEq)]
pub struct StartSandboxRequest {
    pub create_request: SandboxCreateRequest,
    /// `None` when the template is unknown or not built yet; the runtime refuses such a create.
    pub prepared_template: Option<PreparedTemplate>,
}

/// A template that has been built, booted, prepared and snapshotted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedTemplate {
    pub template_id: String,
    pub build_id: String,
    /// Path of the snapshot artifact (for QEMU snapshots: the sealed descriptor).
    pub artifact: String,
    /// Whether the snapshot has an envd agent answering on [`ENVD_PORT`].
    pub has_envd: bool,
    /// Expected size and digest of `artifact`. When absent, the runtime reads the artifact's
    /// integrity sidecar instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_integrity: Option<PreparedTemplateArtifactIntegrity>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedTemplateArtifactIntegrity {
    pub size_bytes: u64,
    pub sha256_hex: String,
}

/// The facts about one sandbox that the API layer reports back to SDKs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRuntimeConfig {
    pub sandbox_id: String,
    pub domain: String,
    pub envd_version: String,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub end_at: String,
    pub cpu_count: u32,
    pub memory_mb: u64,
    #[serde(default)]
    pub envd_access_token: Option<String>,
    #[serde(default)]
    pub traffic_access_token: Option<String>,
}

/// A sandbox the runtime started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSandbox {
    pub config: SandboxRuntimeConfig,
    pub exposed_ports: Vec<u16>,
}

impl RuntimeSandbox {
    /// A record exposing the [`DEFAULT_EXPOSED_PORTS`].
    pub fn with_default_ports(config: SandboxRuntimeConfig) -> Self {
        Self {
            config,
            exposed_ports: DEFAULT_EXPOSED_PORTS.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrity_is_omitted_from_json_when_absent() {
        let t = PreparedTemplate {
            template_id: "base".into(),
            build_id: "b1".into(),
            artifact: "/x/snapshot.json".into(),
            has_envd: true,
            artifact_integrity: None,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert!(v.get("artifact_integrity").is_none());
        let back: PreparedTemplate = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn default_ports_are_envd_code_interpreter_mcp() {
        assert_eq!(DEFAULT_EXPOSED_PORTS, [49983, 49999, 50005]);
    }
}
