use std::net::SocketAddr;
use std::path::Path;

use async_trait::async_trait;

pub use firkin_e2b_wire::EnvdInit;
pub use firkin_net::EgressPolicy;

/// The host's wall clock now, as `/init` carries it.
pub fn wall_clock_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What every restore needs whoever asks: the wall clock now, 32 fresh random bytes for the
/// guest kernel's RNG (clones share the snapshot's RNG state), and a hostname.
pub fn fresh_init(hostname: &str) -> EnvdInit {
    use base64::Engine;
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
    EnvdInit {
        timestamp: Some(wall_clock_now()),
        entropy: Some(base64::engine::general_purpose::STANDARD.encode(seed)),
        hostname: Some(hostname.to_owned()),
        ..EnvdInit::default()
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

    /// Makes `guest_port` reachable from the host if it is not yet (a forward added while the
    /// sandbox runs) and returns its loopback address; `None` if this backend cannot reach that
    /// port. Concurrent calls for one port add at most one forward. Whether anything listens
    /// on the port is for the caller's connection to find out.
    async fn open_port(&self, guest_port: u16) -> Result<Option<SocketAddr>, Self::Error> {
        Ok(self.port_addr(guest_port))
    }

    /// Replaces the sandbox's egress policy; new connections see it at once. `Ok(false)`: this
    /// backend cannot enforce one (no network of its own per sandbox).
    async fn set_egress(&self, _policy: &EgressPolicy) -> Result<bool, Self::Error> {
        Ok(false)
    }

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
