//! One host-mode agent, driven as a sandbox.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use firkin_e2b_contract::ENVD_PORT;
use firkin_envd::client::Client as EnvdClient;
use firkin_vmm::process::ChildHandle;

use super::{KILL_TIMEOUT, ProcessError, STATE_FILE, io_err};
use crate::session::{ContinuationSaved, EnvdInit, SandboxSession};

/// One host-mode agent.
#[derive(Debug)]
pub struct ProcessSession {
    addr: SocketAddr,
    run_dir: PathBuf,
    home: PathBuf,
    child: ChildHandle,
}

impl ProcessSession {
    pub(super) fn new(
        addr: SocketAddr,
        run_dir: PathBuf,
        home: PathBuf,
        child: ChildHandle,
    ) -> Self {
        Self {
            addr,
            run_dir,
            home,
            child,
        }
    }

    async fn kill(&self) {
        if self.child.kill(KILL_TIMEOUT).await.is_none() {
            tracing::warn!(
                pid = self.child.pid(),
                "agent process did not exit after SIGKILL"
            );
        }
    }
}

#[async_trait]
impl SandboxSession for ProcessSession {
    type Error = ProcessError;

    fn envd_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agent runs on the host, and so does everything it starts: a sandbox's port N is
    /// the host's loopback port N. It is routed only while a process of this sandbox (the
    /// agent or one of its descendants) listens on it; any other host service on that port
    /// stays out of the sandbox plane's reach. Only envd's port is elsewhere, wherever the
    /// agent bound.
    fn port_addr(&self, guest_port: u16) -> Option<SocketAddr> {
        if guest_port == ENVD_PORT {
            Some(self.addr)
        } else {
            crate::pids::tree_listens_on(self.child.pid(), guest_port)
                .then(|| SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, guest_port)))
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    fn is_alive(&self) -> bool {
        self.child.is_alive()
    }

    async fn init(&self, init: &EnvdInit) -> Result<(), ProcessError> {
        let err = |e: &dyn std::fmt::Display| ProcessError::Init(e.to_string());
        let client = EnvdClient::new(&format!("http://{}", self.addr)).map_err(|e| err(&e))?;
        tokio::time::timeout(Duration::from_secs(10), client.init(init))
            .await
            .map_err(|_| err(&"timed out"))?
            .map_err(|e| err(&e))
    }

    async fn save_continuation(&self, dir: &Path) -> Result<ContinuationSaved, ProcessError> {
        self.kill().await;
        let target = dir.join("home");
        std::fs::rename(&self.home, &target).map_err(io_err("moving", &self.home))?;
        let state = dir.join(STATE_FILE);
        std::fs::write(&state, br#"{"backend":"process","home":"home"}"#)
            .map_err(io_err("writing", &state))?;
        Ok(ContinuationSaved {
            components: vec![("process".into(), STATE_FILE.into())],
            machine: serde_json::json!({"backend": "process", "home": "home"}),
            // The home directory moved here: nothing earlier is read again.
            depends_on: Vec::new(),
        })
    }

    async fn stop(&self) -> Result<(), ProcessError> {
        self.kill().await;
        match std::fs::remove_dir_all(&self.run_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &self.run_dir)(e)),
        }
    }

    async fn exited(&self) {
        self.child.wait().await;
    }
}
