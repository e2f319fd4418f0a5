use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use firkin_artifacts::{DigestCache, SealError, SealedSnapshot, SnapshotArtifactKind};
use firkin_envd::client::Client as EnvdClient;
use firkin_vmm::{ExitInfo, RestoreRequest, Snapshot, Vm, VmmError};
use tokio::sync::{Mutex, watch};

use crate::paths::unique_run_dir;
use crate::restore::{SnapshotRestoreRequest, SnapshotSessionLauncher};
use crate::service::SNAPSHOT_DESCRIPTOR;
use crate::session::{ContinuationSaved, EgressPolicy, EnvdInit, SandboxSession};
use firkin_net::SlotPool;

use super::net::SlotLease;

use super::component;
use super::ready::{GUEST_PORTS, envd_addr, envd_ready_seeding};

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "restore of {artifact} was asked without a verified sealed descriptor; the QEMU \
         launcher only restores sealed snapshots"
    )]
    Unsealed { artifact: PathBuf },
    #[error("disk layer {layer} below this snapshot failed its integrity check: {source}")]
    LowerLayer { layer: PathBuf, source: SealError },
    #[error(transparent)]
    Vmm(Box<VmmError>),
    #[error("envd at {addr} refused /init: {reason}")]
    Init { addr: SocketAddr, reason: String },
    #[error("the sandbox VM is already stopped")]
    Stopped,
    #[error(
        "the sandbox already forwards {max} ports besides its agent's; port {port} was not \
         added (each forward is a listening host socket in its QEMU)"
    )]
    TooManyPorts { port: u16, max: usize },
    #[error(
        "snapshot {artifact} was taken on a {kind} network, which this server does not give \
         sandboxes (`firkin serve --network`); rebuild the template under this server"
    )]
    NetworkKind {
        artifact: PathBuf,
        kind: firkin_vmm::NetKind,
    },
    #[error(transparent)]
    Net(Box<firkin_net::NetError>),
    #[error(
        "template snapshot {artifact} was booted without a per-VM secret (firkin before access \
         tokens on every restore): its clones would answer anyone until their first /init; \
         rebuild the template"
    )]
    NoGuestSecret { artifact: PathBuf },
}

impl From<VmmError> for QemuError {
    fn from(e: VmmError) -> Self {
        QemuError::Vmm(Box::new(e))
    }
}

/// Ports a sandbox may have forwarded at run time, besides [`GUEST_PORTS`]: each is a host
/// socket inside its QEMU, and a guest (or a client trying ports) must not be able to make
/// that grow without end.
pub const MAX_PORT_FORWARDS: usize = 64;

/// Restores sealed QEMU snapshots (templates and continuations) into fresh `microvm`s.
///
/// Each restore gets its own run directory under `sandboxes_dir` (qcow2 overlay, console log,
/// sockets); the directory's path is on QEMU's command line, which is how a restarted server
/// recognises leftovers.
#[derive(Clone, Debug)]
pub struct QemuLauncher {
    sandboxes_dir: PathBuf,
    cache: Arc<DigestCache>,
    /// Network slots, one per sandbox; `None`: user-mode networking.
    slots: Option<SlotPool>,
    health_timeout: Duration,
    stop_timeout: Duration,
}

impl QemuLauncher {
    pub fn new(sandboxes_dir: impl Into<PathBuf>, cache: Arc<DigestCache>) -> Self {
        Self {
            sandboxes_dir: sandboxes_dir.into(),
            cache,
            slots: None,
            health_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(5),
        }
    }

    /// Gives every sandbox a network slot from `slots` (templates must then be snapshotted
    /// on a TAP too: see [`crate::qemu::TemplateBuild::slots`]).
    pub fn with_slots(mut self, slots: SlotPool) -> Self {
        self.slots = Some(slots);
        self
    }

    /// The kind of network this launcher's sandboxes get.
    pub fn net_kind(&self) -> firkin_vmm::NetKind {
        if self.slots.is_some() {
            firkin_vmm::NetKind::Tap
        } else {
            firkin_vmm::NetKind::User
        }
    }

    pub fn with_health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// A continuation's lower disk layers live in other sealed snapshots (its template, earlier
    /// pauses). They are verified too, through the cache: a tampered template disk must not be
    /// resumed onto.
    fn verify_lower_layers(&self, snap: &Snapshot) -> Result<(), QemuError> {
        for layer in snap.disk.iter().filter(|l| l.path.is_absolute()) {
            let dir = layer.path.parent().unwrap_or(Path::new("/"));
            let descriptor = dir.join(SNAPSHOT_DESCRIPTOR);
            let sealed = SealedSnapshot::verify_with_sidecar(&descriptor, &self.cache).map_err(
                |source| QemuError::LowerLayer {
                    layer: layer.path.clone(),
                    source,
                },
            )?;
            let covered = sealed
                .components
                .iter()
                .any(|c| dir.join(&c.file) == layer.path);
            if !covered {
                return Err(QemuError::LowerLayer {
                    layer: layer.path.clone(),
                    source: SealError::UnsafeComponentPath {
                        file: layer.path.display().to_string(),
                    },
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl SnapshotSessionLauncher for QemuLauncher {
    type Error = QemuError;
    type Session = QemuSession;

    async fn restore_from_snapshot(
        &mut self,
        request: &SnapshotRestoreRequest<'_>,
    ) -> Result<QemuSession, QemuError> {
        let sealed = request.sealed().ok_or_else(|| QemuError::Unsealed {
            artifact: request.manifest().path().to_path_buf(),
        })?;
        let snap = Snapshot::load(sealed.dir())?;
        let kind = request.manifest().kind();
        if kind == SnapshotArtifactKind::BaseTemplate && !snap.machine.guest_secret {
            return Err(QemuError::NoGuestSecret {
                artifact: sealed.dir().to_path_buf(),
            });
        }
        self.verify_lower_layers(&snap)?;
        if snap.machine.net != self.net_kind() {
            return Err(QemuError::NetworkKind {
                artifact: sealed.dir().to_path_buf(),
                kind: snap.machine.net,
            });
        }
        let slot = match &self.slots {
            Some(pool) => Some(
                SlotLease::take(pool)
                    .await
                    .map_err(|e| QemuError::Net(Box::new(e)))?,
            ),
            None => None,
        };
        // A clone's NIC has the template's address until its /init; a resumed sandbox's guest
        // may have taken another one, which the slot then learns by ARP.
        let seed = match (&slot, kind) {
            (Some(lease), SnapshotArtifactKind::BaseTemplate) => {
                lease.guest_seed(&snap.machine.mac)
            }
            _ => None,
        };
        let restored = Vm::restore(
            &snap,
            RestoreRequest {
                run_dir: unique_run_dir(&self.sandboxes_dir, "vm"),
                guest_ports: GUEST_PORTS.to_vec(),
                net: super::net::attach(slot.as_ref()),
                ready: Some(envd_ready_seeding(self.health_timeout, seed)),
            },
        )
        .await;
        let vm = match restored {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(lease) = slot {
                    lease.release().await;
                }
                return Err(e.into());
            }
        };
        tracing::debug!(pid = vm.pid(), timings = ?vm.timings(), "restored");
        let session = QemuSession::new(vm, self.stop_timeout)?.with_slot(slot);
        // A clone of a template takes its own MAC address at its first /init; a resumed
        // sandbox keeps the one it had, and its agent still holds the sandbox's token.
        Ok(match kind {
            SnapshotArtifactKind::BaseTemplate => session.with_mac(random_mac()),
            SnapshotArtifactKind::Continuation => session.with_token_from_init(),
        })
    }
}

/// One running sandbox VM.
#[derive(Debug)]
pub struct QemuSession {
    vm: Mutex<Option<Vm>>,
    envd: SocketAddr,
    /// Guest port → host loopback address: every port in [`GUEST_PORTS`], then those
    /// [`SandboxSession::open_port`] added. A copy of the VM's list that `port_addr` can read
    /// without waiting for the VM's lock; written only under that lock.
    forwards: std::sync::Mutex<Vec<(u16, SocketAddr)>>,
    /// In a network slot: the address at which every guest port is reached.
    reach: Option<std::net::Ipv4Addr>,
    pid: u32,
    exit: watch::Receiver<Option<ExitInfo>>,
    stop_timeout: Duration,
    /// The MAC address every `/init` gives the guest, if it should change from the snapshot's.
    mac: Option<String>,
    /// The sandbox's network slot and the pool it goes back to; `None` on user-mode networking
    /// and once released.
    slot: Mutex<Option<SlotLease>>,
    /// What the agent accepts as its token now: the VM's secret (which QEMU gave this guest
    /// alone) until an `/init` sets the sandbox's token. `None`: the token the next `/init`
    /// carries (a resumed sandbox's agent already holds it).
    auth: std::sync::Mutex<Option<String>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A random locally administered unicast MAC address.
fn random_mac() -> String {
    let mut b = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b[0] = (b[0] & 0xfc) | 0x02;
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

impl QemuSession {
    /// Fails when the VM does not forward envd's port (it was not started with
    /// [`GUEST_PORTS`]).
    pub fn new(vm: Vm, stop_timeout: Duration) -> Result<Self, QemuError> {
        let vm_secret = vm.guest_secret().map(str::to_owned);
        Ok(Self {
            envd: envd_addr(&vm).map_err(QemuError::Vmm)?,
            forwards: std::sync::Mutex::new(vm.forwards().to_vec()),
            reach: vm.reach(),
            pid: vm.pid(),
            exit: vm.exit_watch(),
            vm: Mutex::new(Some(vm)),
            stop_timeout,
            mac: None,
            auth: std::sync::Mutex::new(vm_secret),
            slot: Mutex::new(None),
        })
    }

    /// Hands the session the network slot its VM runs in; it is released when the VM stops.
    pub(crate) fn with_slot(mut self, slot: Option<SlotLease>) -> Self {
        *self.slot.get_mut() = slot;
        self
    }

    /// Gives the slot back to its pool (which resets it for the next sandbox); after the VM has exited.
    async fn release_slot(&self) {
        let taken = self.slot.lock().await.take();
        if let Some(lease) = taken {
            lease.release().await;
        }
    }

    /// The agent already holds the token that the first `/init` will carry (a resumed sandbox).
    pub fn with_token_from_init(self) -> Self {
        *lock(&self.auth) = None;
        self
    }

    fn auth(&self) -> Option<String> {
        lock(&self.auth).clone()
    }

    /// Gives the guest `mac` at every `/init` (the first changes it, later ones are no-ops).
    pub fn with_mac(mut self, mac: String) -> Self {
        self.mac = Some(mac);
        self
    }

    /// The MAC address this session gives its guest, if it changes it.
    pub fn mac(&self) -> Option<&str> {
        self.mac.as_deref()
    }

    /// Runs `f` on the VM if it is still there (for diagnostics such as memory figures).
    pub async fn with_vm<R>(&self, f: impl FnOnce(&Vm) -> R) -> Option<R> {
        self.vm.lock().await.as_ref().map(f)
    }
}

#[async_trait]
impl SandboxSession for QemuSession {
    type Error = QemuError;

    fn envd_addr(&self) -> SocketAddr {
        self.envd
    }

    fn port_addr(&self, guest_port: u16) -> Option<SocketAddr> {
        if let Some(ip) = self.reach {
            return Some(SocketAddr::from((ip, guest_port)));
        }
        lock(&self.forwards)
            .iter()
            .find(|(guest, _)| *guest == guest_port)
            .map(|&(_, host)| host)
    }

    async fn open_port(&self, guest_port: u16) -> Result<Option<SocketAddr>, QemuError> {
        // The VM's lock is the per-sandbox lock: concurrent first requests for one port wait
        // here, and all but the first find the forward the first added.
        let mut vm = self.vm.lock().await;
        let vm = vm.as_mut().ok_or(QemuError::Stopped)?;
        if let Some(addr) = vm.forward(guest_port) {
            return Ok(Some(addr));
        }
        if vm.forwards().len() >= GUEST_PORTS.len() + MAX_PORT_FORWARDS {
            return Err(QemuError::TooManyPorts {
                port: guest_port,
                max: MAX_PORT_FORWARDS,
            });
        }
        let addr = vm.add_forward(guest_port).await?;
        *lock(&self.forwards) = vm.forwards().to_vec();
        Ok(Some(addr))
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn is_alive(&self) -> bool {
        self.exit.borrow().is_none()
    }

    async fn init(&self, init: &EnvdInit) -> Result<(), QemuError> {
        let err = |reason: String| QemuError::Init {
            addr: self.envd,
            reason,
        };
        let mut client =
            EnvdClient::new(&format!("http://{}", self.envd)).map_err(|e| err(e.to_string()))?;
        if let Some(token) = self.auth().or_else(|| init.access_token.clone()) {
            client = client.with_token(token);
        }
        // The clock is read now, not when the request was made: a create waits in the
        // admission queue and for its restore (hundreds of ms under TCG) between the two, and a
        // guest set to the request's time would run that far behind the host.
        let init = EnvdInit {
            mac_address: self.mac.clone(),
            timestamp: Some(crate::session::wall_clock_now()),
            ..init.clone()
        };
        tokio::time::timeout(Duration::from_secs(20), client.init(&init))
            .await
            .map_err(|_| err("no answer within 20 s".into()))?
            .map_err(|e| err(e.to_string()))?;
        if let Some(token) = init.access_token.as_ref().filter(|t| !t.is_empty()) {
            *lock(&self.auth) = Some(token.clone());
        }
        Ok(())
    }

    async fn warm_up(&self) {
        let Ok(mut client) = EnvdClient::new(&format!("http://{}", self.envd)) else {
            return;
        };
        if let Some(token) = self.auth() {
            client = client.with_token(token);
        }
        // An /init that takes the same paths as the real one at checkout, so that TCG has
        // translated them before a create waits on them (measured: a checkout's /init took
        // 50-75 ms after a warm-up without entropy and rename, ~10 ms when warm): the current
        // time, a kernel RNG reseed (more entropy never hurts; checkout adds fresh seed again),
        // a rename, which rewrites /etc/hosts as the checkout's rename will, and the clone's
        // own MAC address (the checkout sends the same one again, a no-op). No token is
        // set here: until its checkout the entry answers only to its VM's secret. A login
        // shell running `true` translates envd's spawn path, bash and the profile scripts a
        // first command uses.
        let started = std::time::Instant::now();
        let init = EnvdInit {
            mac_address: self.mac.clone(),
            ..crate::session::fresh_init("firkin-warm")
        };
        let _ = client.init(&init).await;
        let _ = client.run("true").await;
        // The checkout's process check, once now: the agent learns which new pids are kernel
        // threads (each costs a /proc read under TCG), so the checkout reads only pids born
        // since. An entry running anything else fails it again at checkout and is discarded.
        let check = EnvdInit {
            require_template_processes_only: true,
            ..EnvdInit::default()
        };
        if let Err(err) = client.init(&check).await {
            tracing::warn!(%err, "warm sandbox failed its process check");
        }
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "warm sandbox warmed up"
        );
    }

    async fn set_egress(&self, policy: &EgressPolicy) -> Result<bool, QemuError> {
        let mut slot = self.slot.lock().await;
        match slot.as_mut() {
            Some(lease) => {
                lease
                    .set_policy(policy.clone())
                    .await
                    .map_err(|e| QemuError::Net(Box::new(e)))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn save_continuation(&self, dir: &Path) -> Result<ContinuationSaved, QemuError> {
        let vm = self.vm.lock().await.take().ok_or(QemuError::Stopped)?;
        let saved = vm.save_continuation(dir).await;
        self.release_slot().await;
        let snap = saved?;
        let mut components = vec![
            (
                component::VM.to_owned(),
                firkin_vmm::SNAPSHOT_JSON.to_owned(),
            ),
            (component::RAM.to_owned(), firkin_vmm::RAM_FILE.to_owned()),
            (
                component::STATE.to_owned(),
                firkin_vmm::STATE_FILE.to_owned(),
            ),
        ];
        for layer in snap.disk.iter().filter(|l| l.path.is_relative()) {
            components.push((component::DISK.to_owned(), layer.path.display().to_string()));
        }
        let machine = serde_json::to_value(&snap.machine).unwrap_or(serde_json::Value::Null);
        let mut depends_on: Vec<PathBuf> = snap
            .disk
            .iter()
            .filter(|l| l.path.is_absolute())
            .filter_map(|l| l.path.parent().map(Path::to_path_buf))
            .collect();
        depends_on.dedup();
        Ok(ContinuationSaved {
            components,
            machine,
            depends_on,
        })
    }

    async fn stop(&self) -> Result<(), QemuError> {
        let vm = self.vm.lock().await.take();
        match vm {
            Some(vm) => {
                let stopped = vm.stop(self.stop_timeout).await;
                self.release_slot().await;
                let exit = stopped?;
                tracing::debug!(pid = self.pid, %exit, "sandbox VM stopped");
                Ok(())
            }
            None => {
                self.release_slot().await;
                Ok(())
            }
        }
    }

    async fn exited(&self) {
        let mut rx = self.exit.clone();
        let _ = rx.wait_for(Option::is_some).await;
    }
}
