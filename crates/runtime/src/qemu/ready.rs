//! What the runtime asks of a VM it starts: the E2B ports forwarded, and envd answering
//! `/health` before the VMM hands the VM back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use firkin_e2b_contract::{CODE_INTERPRETER_PORT, ENVD_PORT};
use firkin_envd::client::Client as EnvdClient;
use firkin_vmm::{ReadyCheck, Vm, VmmError};

/// The guest ports every firkin VM forwards to the host's loopback: envd and the code
/// interpreter.
pub const GUEST_PORTS: [u16; 2] = [ENVD_PORT, CODE_INTERPRETER_PORT];

/// How long one `/health` attempt may take. A fresh attempt after a slow one is cheaper than
/// waiting on a connection QEMU's user-mode network accepted before the guest listened.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);

/// One `GET /health`; `true` on a 2xx answer.
///
/// A refused or reset connection is normal while the guest boots: QEMU's user-mode network
/// accepts on the host side first and only then finds nobody listening in the guest.
pub async fn envd_health(addr: SocketAddr) -> bool {
    let Ok(client) = EnvdClient::new(&format!("http://{addr}")) else {
        return false;
    };
    matches!(
        tokio::time::timeout(ATTEMPT_TIMEOUT, client.health()).await,
        Ok(Ok(()))
    )
}

/// Ready when envd answers `/health` within `timeout` (QEMU dying first fails at once).
pub fn envd_ready(timeout: Duration) -> ReadyCheck {
    ReadyCheck::new(ENVD_PORT, timeout, envd_health)
}

/// [`envd_ready`] that first puts the slot's ARP entry for the guest in (`seed`), once:
/// probing starts after QEMU has opened its TAP, which is what an entry must come after.
pub fn envd_ready_seeding(timeout: Duration, seed: Option<firkin_net::GuestSeed>) -> ReadyCheck {
    let Some(seed) = seed else {
        return envd_ready(timeout);
    };
    let seeded = Arc::new(AtomicBool::new(false));
    ReadyCheck::new(ENVD_PORT, timeout, move |addr| {
        let first = !seeded.swap(true, Ordering::Relaxed);
        let seed = seed.clone();
        async move {
            if first && let Err(err) = seed.apply().await {
                // Best effort: without it the first packet waits for ARP.
                tracing::debug!(%err, "seeding the guest's ARP entry");
            }
            envd_health(addr).await
        }
    })
}

/// The host address forwarded to `vm`'s envd. Boxed like the runtime's errors hold it.
pub fn envd_addr(vm: &Vm) -> Result<SocketAddr, Box<VmmError>> {
    vm.forward(ENVD_PORT).ok_or_else(|| {
        Box::new(VmmError::NotForwarded {
            guest_port: ENVD_PORT,
        })
    })
}
