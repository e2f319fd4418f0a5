use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// What the runtime tells a sandbox's agent right after a restore or a warm-pool checkout
/// (envd's `POST /init`). Clones of one snapshot share the snapshot's clock, RNG state and
/// configuration, so every restore gets fresh values here before the sandbox is handed out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvdInit {
    pub env_vars: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// RFC 3339 wall-clock time at the moment of the call.
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// Base64 of fresh random bytes for the guest kernel RNG.
    pub entropy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The guest NIC's new MAC address (a clone of a template takes its own; a resumed sandbox
    /// keeps the one it had). Set by the launcher, which chose it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// A warm-pool checkout: the agent refuses (and the entry is discarded) if any process
    /// runs that its template did not have.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_template_processes_only: bool,
}

impl EnvdInit {
    /// The host's wall clock now, as `/init` carries it.
    pub fn now() -> String {
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }

    /// What every restore needs whoever asks: the wall clock now, 32 fresh random bytes for the
    /// guest kernel's RNG (clones share the snapshot's RNG state), and a hostname.
    pub fn fresh(hostname: &str) -> Self {
        use base64::Engine;
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
        Self {
            timestamp: Self::now(),
            entropy: base64::engine::general_purpose::STANDARD.encode(seed),
            hostname: Some(hostname.to_owned()),
            ..Self::default()
        }
    }
}

/// The files a continuation capture wrote, for sealing: `(role, file name in the directory)`,
/// plus the launcher's machine description needed to restore it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContinuationSaved {
    pub components: Vec<(String, String)>,
    pub machine: serde_json::Value,
    /// Directories of other sealed snapshots whose files the continuation still reads (its
    /// template's disk; earlier continuations' only if their layers could not be folded in).
    /// An earlier continuation of the same sandbox that is not listed can be deleted.
    pub depends_on: Vec<std::path::PathBuf>,
}

/// A running sandbox as the runtime drives it. Implemented by the QEMU backend.
#[async_trait]
pub trait SandboxSession: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Loopback address forwarded to the guest's envd port.
    fn envd_addr(&self) -> SocketAddr;

    /// Loopback address forwarded to `guest_port`, if that port is forwarded.
    fn port_addr(&self, guest_port: u16) -> Option<SocketAddr>;

    /// Host pid of the VMM process, if there is one.
    fn pid(&self) -> Option<u32>;

    /// Whether the VMM process is still running.
    fn is_alive(&self) -> bool;

    /// Configures the agent (`POST /init`); also proves it answers.
    async fn init(&self, init: &EnvdInit) -> Result<(), Self::Error>;

    /// Exercises the paths a first request takes, for a sandbox parked in a warm pool: under
    /// software emulation a restored VM starts with no translated code, so whatever runs first
    /// pays for translating it. Best effort; the default does nothing.
    async fn warm_up(&self) {}

    /// Saves RAM, device state and disk into `dir` so the sandbox can be resumed later, then
    /// stops the VM.
    async fn save_continuation(&self, dir: &Path) -> Result<ContinuationSaved, Self::Error>;

    /// Stops the VM (gracefully, then by force) and removes its per-instance files. Idempotent.
    async fn stop(&self) -> Result<(), Self::Error>;

    /// Resolves when the VMM process has exited, for whatever reason.
    async fn exited(&self);
}
