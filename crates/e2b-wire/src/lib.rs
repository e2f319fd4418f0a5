//! Serde DTOs of the E2B REST control plane, spelled exactly as the E2B SDKs spell them.
//!
//! Only data and serde attributes live here; no validation beyond what serde does, no logic.
//! Key casing is mixed on purpose (`templateID`, `envVars`, but `allow_internet_access`): it
//! follows what the official Python SDK 2.63.0 sends and parses. Unknown request keys are
//! ignored so that newer SDKs keep working.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod envd;
pub use envd::{EnvdInit, GuestState, SANDBOX_STATE_FILE, SANDBOX_STATE_LOCK};

mod network;
pub use network::{EgressRules, SandboxNetworkConfig, SandboxNetworkUpdate};

#[cfg(feature = "signature")]
pub mod file_signature;

#[cfg(feature = "axum")]
mod api_error;
#[cfg(feature = "axum")]
pub use api_error::{ApiError, SHOULD_RETRY};

/// Template used when a create request names none.
pub const DEFAULT_TEMPLATE: &str = "base";
/// Sandbox lifetime in seconds when a create request gives none.
pub const DEFAULT_TIMEOUT_SECS: i64 = 300;

fn default_template() -> String {
    DEFAULT_TEMPLATE.to_owned()
}

fn default_timeout() -> i64 {
    DEFAULT_TIMEOUT_SECS
}

/// `POST /v2/sandboxes` body (E2B's `NewSandboxV2`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxCreateRequest {
    #[serde(rename = "templateID", default = "default_template")]
    pub template_id: String,
    /// Seconds until the sandbox is killed (or paused, with `autoPause`). Signed so that a
    /// negative value reaches validation and gets a clear error instead of a parse failure.
    #[serde(default = "default_timeout")]
    pub timeout: i64,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(rename = "envVars", default)]
    pub env_vars: BTreeMap<String, String>,
    #[serde(rename = "autoPause", default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    #[serde(
        rename = "autoPauseMemory",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_pause_memory: Option<bool>,
    #[serde(
        rename = "autoResume",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_resume: Option<AutoResume>,
    /// Deprecated in the SDK and no longer sent; every sandbox gets an access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam: Option<serde_json::Value>,
    #[serde(
        rename = "volumeMounts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub volume_mounts: Option<Vec<VolumeMount>>,
}

impl Default for SandboxCreateRequest {
    fn default() -> Self {
        Self {
            template_id: default_template(),
            timeout: default_timeout(),
            metadata: BTreeMap::new(),
            env_vars: BTreeMap::new(),
            auto_pause: None,
            auto_pause_memory: None,
            auto_resume: None,
            secure: None,
            allow_internet_access: None,
            network: None,
            mcp: None,
            iam: None,
            volume_mounts: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub name: String,
    pub path: String,
}

/// Create and connect response (E2B's `Sandbox`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(rename = "envdAccessToken", default)]
    pub envd_access_token: Option<String>,
    #[serde(rename = "trafficAccessToken", default)]
    pub traffic_access_token: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
}

/// The only two states the SDK accepts; anything else makes it raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    Kill,
    Pause,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLifecycle {
    #[serde(rename = "autoResume")]
    pub auto_resume: bool,
    #[serde(rename = "onTimeout")]
    pub on_timeout: OnTimeout,
}

/// One element of `GET /v2/sandboxes` (E2B's `ListedSandbox`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "startedAt")]
    pub started_at: String,
    #[serde(rename = "endAt")]
    pub end_at: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: SandboxState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `GET /sandboxes/{id}` response (E2B's `SandboxDetail`): the list view plus what only the
/// sandbox's owner should see, in one flat JSON object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxDetail {
    #[serde(flatten)]
    pub listed: ListedSandbox,
    #[serde(
        rename = "envdAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_access_token: Option<String>,
    #[serde(rename = "allowInternetAccess", default)]
    pub allow_internet_access: Option<bool>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<SandboxLifecycle>,
    /// The sandbox's network settings, when it has any beyond the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetworkConfig>,
}

/// `POST /sandboxes/{id}/timeout` body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTimeoutRequest {
    pub timeout: i64,
}

/// `POST /sandboxes/{id}/refreshes` body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<i64>,
}

/// `POST /v2/sandboxes/{id}/connect` body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectSandboxRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/pause` body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseSandboxRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    #[serde(
        rename = "requireHealthyGuest",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub require_healthy_guest: Option<bool>,
}

/// One sample of `GET /sandboxes/{id}/metrics`. Every key is required by the SDK.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxMetric {
    pub timestamp: String,
    #[serde(rename = "timestampUnix")]
    pub timestamp_unix: i64,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "cpuUsedPct")]
    pub cpu_used_pct: f64,
    #[serde(rename = "memUsed")]
    pub mem_used: u64,
    #[serde(rename = "memTotal")]
    pub mem_total: u64,
    #[serde(rename = "memCache")]
    pub mem_cache: u64,
    #[serde(rename = "diskUsed")]
    pub disk_used: u64,
    #[serde(rename = "diskTotal")]
    pub disk_total: u64,
}

/// One element of `GET /templates`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Template {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub public: bool,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "updatedAt")]
    pub updated_at: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(rename = "buildStatus")]
    pub build_status: String,
}

/// `POST /sandboxes/{id}/snapshots` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSnapshotRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/snapshots` response and `GET /snapshots` element.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    #[serde(default)]
    pub names: Vec<String>,
}

/// Every control-plane error body. The SDK requires an integer `code` and a string `message`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_sdk_create_body_gets_defaults() {
        let req: SandboxCreateRequest =
            serde_json::from_str(r#"{"templateID":"base","metadata":{},"envVars":{}}"#).unwrap();
        assert_eq!(req.template_id, "base");
        assert_eq!(req.timeout, 300);
        let empty: Result<SandboxCreateRequest, _> = serde_json::from_str("{}");
        assert_eq!(empty.ok(), Some(SandboxCreateRequest::default()));
    }

    #[test]
    fn full_create_body_keeps_mixed_key_casing() {
        let body = r#"{"templateID":"t","timeout":60,"metadata":{"k":"v"},"envVars":{"A":"1"},
            "autoPause":true,"autoResume":{"enabled":true},"allow_internet_access":false,
            "someFutureKey":1}"#;
        let req: Result<SandboxCreateRequest, _> = serde_json::from_str(body);
        let req = req.unwrap();
        assert_eq!(req.timeout, 60);
        assert_eq!(req.auto_pause, Some(true));
        assert_eq!(req.allow_internet_access, Some(false));
        assert_eq!(req.env_vars.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn sandbox_response_uses_sdk_key_names() {
        let s = Sandbox {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: "firkin".into(),
            envd_version: "0.6.4".into(),
            alias: None,
            envd_access_token: Some("tok".into()),
            traffic_access_token: None,
            domain: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["sandboxID"], "abc");
        assert_eq!(v["envdAccessToken"], "tok");
        assert!(v["trafficAccessToken"].is_null());
        assert!(v.get("alias").is_none());
    }

    #[test]
    fn detail_is_the_listed_sandbox_flattened() {
        let listed = ListedSandbox {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: "firkin".into(),
            started_at: "2030-01-01T00:00:00.000Z".into(),
            end_at: "2030-01-01T00:05:00.000Z".into(),
            envd_version: "0.6.4".into(),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            state: SandboxState::Running,
            alias: Some("base".into()),
            metadata: BTreeMap::from([("k".into(), "v".into())]),
        };
        let detail = SandboxDetail {
            listed: listed.clone(),
            envd_access_token: Some("tok".into()),
            allow_internet_access: Some(true),
            domain: None,
            lifecycle: Some(SandboxLifecycle {
                auto_resume: false,
                on_timeout: OnTimeout::Kill,
            }),
            network: None,
        };
        let text = serde_json::to_string(&detail).unwrap();
        let listed_text = serde_json::to_string(&listed).unwrap();
        // The listed keys first and in their order, then the owner's.
        assert!(
            text.starts_with(listed_text.trim_end_matches('}')),
            "{text}"
        );
        assert!(text.ends_with(
            r#","envdAccessToken":"tok","allowInternetAccess":true,"domain":null,"lifecycle":{"autoResume":false,"onTimeout":"kill"}}"#
        ), "{text}");
        let back: SandboxDetail = serde_json::from_str(&text).unwrap();
        assert_eq!(back, detail);
    }

    #[test]
    fn states_are_lowercase() {
        assert_eq!(
            serde_json::to_string(&SandboxState::Paused).unwrap(),
            "\"paused\""
        );
        assert!(serde_json::from_str::<SandboxState>("\"killed\"").is_err());
    }
}
