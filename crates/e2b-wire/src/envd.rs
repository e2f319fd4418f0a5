//! envd's `POST /init` body: the one definition the host encodes and the agent decodes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the host tells a sandbox's agent right after a restore or a warm-pool checkout. Clones
/// of one snapshot share the snapshot's clock, RNG state and configuration, so every restore
/// gets fresh values here before the sandbox is handed out. Absent fields change nothing.
/// Fields marked firkin are firkin's additions to E2B's body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvdInit {
    /// Added to the agent's environment for every process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    /// The token every later request must carry; empty removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// RFC 3339 wall-clock time at the moment of the call; the agent moves its clock to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// firkin: base64 of fresh random bytes for the guest kernel RNG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<String>,
    /// firkin: the hostname to set (guest mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// firkin: the guest NIC's new MAC address (a clone of a template takes its own; a resumed
    /// sandbox keeps the one it had); guest mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// firkin: the processes running now are the template's own (a template build sends this
    /// just before its snapshot).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mark_template_processes: bool,
    /// firkin: refuse with 409, changing nothing, if any process runs that is not the
    /// template's (a warm-pool checkout sends this: an entry that ran anything is discarded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_template_processes_only: bool,
}

/// Where envd publishes [`GuestState`] in a sandbox (`/run` is a tmpfs, so the file is part
/// of the RAM snapshot, as the processes that read it are).
pub const SANDBOX_STATE_FILE: &str = "/run/firkin/sandbox.json";
/// The lock envd holds exclusively from writing a new [`GuestState`] until `/init`'s machine
/// set-up (kernel RNG reseed, rename) is done; a reader takes it shared to wait for that.
pub const SANDBOX_STATE_LOCK: &str = "/run/firkin/sandbox.lock";

/// firkin: what envd tells services inside the sandbox (the code interpreter) after each
/// `/init` that changes it. Services that were running when a template was snapshotted run on
/// in every clone with the template's state (its env vars, its language runtimes' RNG seeds);
/// a change of `sandbox` tells them they now serve another sandbox. A resumed sandbox keeps its
/// name, so its processes keep their state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestState {
    /// The sandbox's name as `/init` gave it (its hostname; the sandbox id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The sandbox-wide env vars, all of them (not only the last `/init`'s).
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_are_left_out_and_read_back_as_absent() {
        let only = EnvdInit {
            require_template_processes_only: true,
            ..EnvdInit::default()
        };
        assert_eq!(
            serde_json::to_string(&only).unwrap(),
            r#"{"requireTemplateProcessesOnly":true}"#
        );
        let full: EnvdInit = serde_json::from_str(
            r#"{"envVars":{"A":"1"},"accessToken":"t","timestamp":"2026-12-01T00:00:00Z",
                "macAddress":"02:00:00:00:00:01","markTemplateProcesses":true,"unknown":1}"#,
        )
        .unwrap();
        assert_eq!(full.env_vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(full.mac_address.as_deref(), Some("02:00:00:00:00:01"));
        assert!(full.mark_template_processes && !full.require_template_processes_only);
        assert_eq!(
            serde_json::from_str::<EnvdInit>("{}").unwrap(),
            EnvdInit::default()
        );
    }
}
