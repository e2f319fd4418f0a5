//! One Jupyter kernel: the process, its shell/iopub/control connections and the readers that
//! route what it says to the run that asked.

mod process;
pub mod router;

use std::path::{Path, PathBuf};
use std::time::Duration;

use jupyter_protocol::{
    ExecuteRequest, ExecutionState, InterruptRequest, JupyterMessage, JupyterMessageContent,
    KernelInfoRequest,
};
use jupyter_zmq_client::DealerSendConnection;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use process::KernelOptions;
use process::KernelProcess;
use router::{From, Routed, Router};

use crate::error::KernelError;
use crate::language::{InterruptMode, KernelSpec};

/// How long a kernel may take from spawn to answering `kernel_info` with iopub connected.
/// Generous: under TCG on a busy 2-core host an ipykernel-based kernel (Python, bash) takes
/// tens of seconds to import what it needs.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Starts tried before giving up: another program may take a port between our pick and the
/// kernel's bind, which costs one attempt.
const START_ATTEMPTS: usize = 3;

/// A started kernel, ready for executions.
pub struct Kernel {
    language: String,
    spec: KernelSpec,
    cwd: PathBuf,
    process: KernelProcess,
    shell: DealerSendConnection,
    control: DealerSendConnection,
    router: Router,
    readers: Vec<JoinHandle<()>>,
    /// The sandbox state this kernel has caught up with (see [`crate::sandbox`]).
    sandbox: Option<firkin_e2b_wire::GuestState>,
}

/// Connecting fails now and then while the kernel is still binding its sockets (a peer reset
/// during the ZMTP greeting), so connecting is retried for as long as the kernel lives.
async fn connect_retrying<T, F, Fut>(
    process: &KernelProcess,
    mut connect: F,
) -> Result<T, jupyter_zmq_client::RuntimeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, jupyter_zmq_client::RuntimeError>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match connect().await {
            Ok(conn) => return Ok(conn),
            Err(e) if Instant::now() < deadline && !process.has_exited() => {
                tracing::debug!(error = %e, "connecting to the kernel; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The messages of one request, until the caller drops it.
#[derive(Debug)]
pub struct Pending {
    pub msg_id: String,
    pub rx: mpsc::UnboundedReceiver<Routed>,
    router: Router,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.router.unregister(&self.msg_id);
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("language", &self.language)
            .field("cwd", &self.cwd)
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

impl Kernel {
    /// Spawns the kernel and waits until it answers on shell *and* its iopub reaches us.
    pub async fn start(
        language: &str,
        spec: &KernelSpec,
        cwd: &Path,
        opts: &KernelOptions,
    ) -> Result<Self, KernelError> {
        let mut attempt = 1;
        loop {
            match Self::start_once(language, spec, cwd, opts).await {
                Ok(kernel) => return Ok(kernel),
                Err(
                    e @ (KernelError::Connect { .. }
                    | KernelError::ExitedEarly { .. }
                    | KernelError::NotReady { .. }),
                ) if attempt < START_ATTEMPTS => {
                    tracing::warn!(%language, attempt, error = %e, "kernel start failed; retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(
        language: &str,
        spec: &KernelSpec,
        cwd: &Path,
        opts: &KernelOptions,
    ) -> Result<Self, KernelError> {
        let router = Router::new();
        let (process, info) = process::spawn(language, spec, cwd, opts, router.clone()).await?;
        let session = uuid::Uuid::new_v4().to_string();
        let connect_err = |channel| {
            let language = language.to_owned();
            move |source| KernelError::Connect {
                language,
                channel,
                source,
            }
        };
        let iopub = connect_retrying(&process, || {
            jupyter_zmq_client::create_client_iopub_connection(&info, "", &session)
        })
        .await
        .map_err(connect_err("iopub"))?;
        let shell = connect_retrying(&process, || async {
            let identity = jupyter_zmq_client::peer_identity_for_session(&session)?;
            jupyter_zmq_client::create_client_shell_connection_with_identity(
                &info, &session, identity,
            )
            .await
        })
        .await
        .map_err(connect_err("shell"))?;
        let control = connect_retrying(&process, || {
            jupyter_zmq_client::create_client_control_connection(&info, &session)
        })
        .await
        .map_err(connect_err("control"))?;
        let (shell, shell_rx) = shell.split();
        let (control, control_rx) = control.split();
        let readers = vec![
            tokio::spawn(router::read_loop(
                iopub,
                From::IoPub,
                router.clone(),
                language.to_owned(),
            )),
            tokio::spawn(router::read_loop(
                shell_rx,
                From::Shell,
                router.clone(),
                language.to_owned(),
            )),
            // Interrupt replies carry nothing we act on; reading them keeps the queue empty.
            tokio::spawn(router::read_loop(
                control_rx,
                From::Control,
                router.clone(),
                language.to_owned(),
            )),
        ];
        let mut kernel = Self {
            language: language.to_owned(),
            spec: spec.clone(),
            cwd: cwd.to_owned(),
            process,
            shell,
            control,
            router,
            readers,
            sandbox: None,
        };
        kernel.wait_ready().await?;
        Ok(kernel)
    }

    /// A new kernel with the same language, spec and cwd (the old one is killed when dropped).
    pub async fn restarted(&self, opts: &KernelOptions) -> Result<Self, KernelError> {
        Self::start(&self.language, &self.spec, &self.cwd, opts).await
    }

    pub fn language(&self) -> &str {
        &self.language
    }

    /// The sandbox state this kernel has caught up with, if any.
    pub fn sandbox(&self) -> Option<&firkin_e2b_wire::GuestState> {
        self.sandbox.as_ref()
    }

    pub fn set_sandbox(&mut self, state: firkin_e2b_wire::GuestState) {
        self.sandbox = Some(state);
    }

    pub fn is_alive(&self) -> bool {
        !self.process.has_exited()
    }

    /// Whether Deno-like silence after an interrupt must be turned into an error by us.
    pub fn silent_on_interrupt(&self) -> bool {
        self.spec.silent_on_interrupt
    }

    /// How long a finished run's output may still trail its end (see `KernelSpec`).
    pub fn late_output(&self) -> Option<std::time::Duration> {
        self.spec.late_output
    }

    /// PUB/SUB joins slowly: a kernel may answer on shell before our iopub subscription is in
    /// place, and what it publishes meanwhile is lost. So ask `kernel_info` until a `status`
    /// for one of the requests comes back on iopub, as jupyter_client does.
    async fn wait_ready(&mut self) -> Result<(), KernelError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut replies_without_status = 0;
        while Instant::now() < deadline {
            let mut pending = self
                .send_shell(KernelInfoRequest {}.into(), "kernel_info_request")
                .await?;
            let round = Instant::now() + Duration::from_millis(500);
            let (mut reply, mut status, mut idle) = (false, false, false);
            while !(idle || (reply && status)) {
                let Ok(next) = tokio::time::timeout_at(round, pending.rx.recv()).await else {
                    break;
                };
                let Some(routed) = next else {
                    return Err(self.exited_early());
                };
                match (routed.from, &routed.msg.content) {
                    (From::Shell, JupyterMessageContent::KernelInfoReply(_)) => reply = true,
                    (From::IoPub, JupyterMessageContent::Status(s)) => {
                        status = true;
                        idle = s.execution_state == ExecutionState::Idle;
                    }
                    _ => {}
                }
            }
            // `idle` for the request: the kernel has handled it and iopub is joined, even if its
            // reply did not parse (bash_kernel's `language_info` has no `version`, which the
            // protocol crate requires, so its reply is dropped as a bad message).
            if (reply && status) || idle {
                return Ok(());
            }
            if reply {
                replies_without_status += 1;
                // A kernel that never publishes status for kernel_info is ready enough once
                // iopub has had a few rounds to join.
                if replies_without_status >= 4 {
                    return Ok(());
                }
            }
            if self.process.has_exited() {
                return Err(self.exited_early());
            }
        }
        Err(KernelError::NotReady {
            language: self.language.clone(),
            secs: READY_TIMEOUT.as_secs(),
        })
    }

    fn exited_early(&self) -> KernelError {
        KernelError::ExitedEarly {
            language: self.language.clone(),
            status: self
                .process
                .exited
                .borrow()
                .clone()
                .unwrap_or_else(|| "sockets closed".to_owned()),
        }
    }

    async fn send_shell(
        &mut self,
        content: JupyterMessageContent,
        msg_type: &'static str,
    ) -> Result<Pending, KernelError> {
        let msg = JupyterMessage::new(content, None);
        let msg_id = msg.header.msg_id.clone();
        let Some(rx) = self.router.register(&msg_id) else {
            return Err(KernelError::Dead {
                language: self.language.clone(),
            });
        };
        let pending = Pending {
            msg_id,
            rx,
            router: self.router.clone(),
        };
        self.shell
            .send(msg)
            .await
            .map_err(|source| KernelError::Send {
                language: self.language.clone(),
                msg_type,
                source,
            })?;
        Ok(pending)
    }

    /// Sends code to run; its output arrives on the returned [`Pending`].
    pub async fn execute(&mut self, code: &str, silent: bool) -> Result<Pending, KernelError> {
        let mut req = ExecuteRequest::new(code.to_owned());
        req.silent = silent;
        req.store_history = !silent;
        req.allow_stdin = false;
        // Runs on a context are serialized by us, so there is no queue of cells to abort after
        // an error; with ipykernel's default, the env restore that follows a failed run could
        // itself be aborted (as could the user's next run, if it came quickly).
        req.stop_on_error = false;
        self.send_shell(req.into(), "execute_request").await
    }

    /// Runs code silently and waits for it to finish; its output is dropped (but logged if it
    /// failed), since it is ours, not the user's.
    pub async fn execute_quietly(&mut self, code: &str) -> Result<(), KernelError> {
        let mut pending = self.execute(code, true).await?;
        while let Some(routed) = pending.rx.recv().await {
            match &routed.msg.content {
                JupyterMessageContent::ErrorOutput(e) => {
                    tracing::warn!(language = %self.language, ename = %e.ename, evalue = %e.evalue,
                        "internal snippet failed");
                }
                JupyterMessageContent::Status(s)
                    if routed.from == From::IoPub && s.execution_state == ExecutionState::Idle =>
                {
                    return Ok(());
                }
                _ => {}
            }
        }
        Err(KernelError::Dead {
            language: self.language.clone(),
        })
    }

    /// Asks the kernel to stop what it runs, the way its spec says it wants.
    pub async fn interrupt(&mut self) {
        match self.spec.interrupt_mode {
            InterruptMode::Signal => self.process.signal(Signal::SIGINT),
            InterruptMode::Message => {
                let msg = JupyterMessage::new(InterruptRequest {}, None);
                if let Err(e) = self.control.send(msg).await {
                    tracing::warn!(language = %self.language, error = %e,
                        "interrupt_request failed; sending SIGINT");
                    self.process.signal(Signal::SIGINT);
                }
            }
        }
    }

    /// The fallback when an interrupt request is not acted on.
    pub fn sigint(&self) {
        self.process.signal(Signal::SIGINT);
    }
}
