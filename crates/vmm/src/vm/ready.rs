//! Waiting until the guest is ready for its caller, by the caller's own test.
//!
//! The VMM knows nothing of what runs in the guest; the caller says which forwarded guest port
//! to probe and how. What the VMM adds is what only it can see: QEMU dying while the caller
//! waits (reported with QEMU's stderr and the console tail) and the console tail on a timeout.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::spawn::exited_error;
use super::{Vm, log_tail};
use crate::error::{Result, VmmError};

/// One attempt of a [`ReadyCheck`]'s probe.
pub type ProbeFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

type Probe = dyn Fn(SocketAddr) -> ProbeFuture + Send + Sync;

/// How [`Vm::cold_boot`] and [`Vm::restore`] tell that the guest is ready: `probe` is called
/// with the host address forwarded to `guest_port` until it returns `true`, QEMU exits, or
/// `timeout` passes. A refused or reset connection is normal while the guest starts (QEMU's
/// user-mode network accepts on the host side first), so a probe should just return `false`
/// then; the next attempt follows 3 ms later.
#[derive(Clone)]
pub struct ReadyCheck {
    guest_port: u16,
    timeout: Duration,
    probe: Arc<Probe>,
}

impl ReadyCheck {
    pub fn new<F, Fut>(guest_port: u16, timeout: Duration, probe: F) -> Self
    where
        F: Fn(SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        Self {
            guest_port,
            timeout,
            probe: Arc::new(move |addr| Box::pin(probe(addr))),
        }
    }

    pub fn guest_port(&self) -> u16 {
        self.guest_port
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Debug for ReadyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadyCheck")
            .field("guest_port", &self.guest_port)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Refuses, before anything is started, forwards that [`Vm::forward`] could not answer for
/// unambiguously and a check on a port that is not forwarded.
pub(super) fn check_forwards(guest_ports: &[u16], ready: Option<&ReadyCheck>) -> Result<()> {
    let repeated = (1..guest_ports.len()).find(|&i| guest_ports[..i].contains(&guest_ports[i]));
    if let Some(i) = repeated {
        return Err(VmmError::DuplicateForward {
            guest_port: guest_ports[i],
        });
    }
    if let Some(ready) = ready
        && !guest_ports.contains(&ready.guest_port)
    {
        return Err(VmmError::NotForwarded {
            guest_port: ready.guest_port,
        });
    }
    Ok(())
}

impl Vm {
    /// Probes until the check passes, QEMU dies, or the check's timeout passes.
    pub(super) async fn wait_ready(&self, ready: &ReadyCheck, during: &'static str) -> Result<()> {
        let addr = self
            .forward(ready.guest_port)
            .ok_or(VmmError::NotForwarded {
                guest_port: ready.guest_port,
            })?;
        let start = Instant::now();
        let mut exit = self.child.subscribe();
        loop {
            // Bounded by what is left of the timeout, so a probe that never returns cannot hold
            // the restore past it.
            let left = ready.timeout.saturating_sub(start.elapsed());
            if let Ok(true) = tokio::time::timeout(left, (ready.probe)(addr)).await {
                return Ok(());
            }
            if let Some(info) = exit.borrow_and_update().clone() {
                return Err(exited_error(
                    &self.child,
                    info,
                    during,
                    &self.launch,
                    &self.run_dir,
                ));
            }
            if start.elapsed() > ready.timeout {
                return Err(VmmError::ReadyTimeout {
                    guest_port: ready.guest_port,
                    addr,
                    secs: ready.timeout.as_secs(),
                    console: self.launch.console_log.clone(),
                    console_tail: log_tail(&self.launch.console_log, 30),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(3)) => {}
                _ = exit.changed() => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn never(port: u16) -> ReadyCheck {
        ReadyCheck::new(port, Duration::from_secs(1), |_| async { false })
    }

    #[test]
    fn forwards_are_checked_before_anything_starts() {
        check_forwards(&[], None).unwrap();
        check_forwards(&[8080, 9000], Some(&never(9000))).unwrap();
        let err = check_forwards(&[8080, 9000, 8080], None).unwrap_err();
        assert!(
            matches!(err, VmmError::DuplicateForward { guest_port: 8080 }),
            "{err}"
        );
        let err = check_forwards(&[8080], Some(&never(9000))).unwrap_err();
        assert!(
            matches!(err, VmmError::NotForwarded { guest_port: 9000 }),
            "{err}"
        );
    }
}
