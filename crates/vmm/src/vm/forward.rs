//! Host-to-guest TCP forwards added to a running VM through QMP.
//!
//! The launch forwards only the ports its caller names; anything else a guest listens on is
//! reached by asking slirp for one more forward while the VM runs (`hostfwd_add`, which QEMU
//! offers only as a human-monitor command). Forwards are not device state: a VM restored from
//! a snapshot starts with its launch's forwards only.

use std::net::{Ipv4Addr, SocketAddr};

use super::Vm;
use super::spawn::free_port;
use crate::cmdline::NETDEV;
use crate::error::{Result, VmmError};

/// Attempts at finding a free host port: another process may bind the one we probed before
/// QEMU does.
const ATTEMPTS: usize = 3;

impl Vm {
    /// Forwards a free host loopback port to `guest_port` and returns its address; the
    /// existing address if that port is forwarded already. Whether anything listens on the
    /// guest port is not checked: slirp accepts on the host side and connects to the guest
    /// per connection.
    pub async fn add_forward(&mut self, guest_port: u16) -> Result<SocketAddr> {
        // On a TAP network every port is reachable already.
        if let Some(addr) = self.forward(guest_port) {
            return Ok(addr);
        }
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let host = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let out = self
                .qmp
                .human(format!(
                    "hostfwd_add {NETDEV} tcp:{}:{}-:{guest_port}",
                    host.ip(),
                    host.port()
                ))
                .await?;
            // Success prints nothing; every failure prints why.
            if out.trim().is_empty() {
                self.forwards.push((guest_port, host));
                tracing::debug!(pid = self.pid(), guest_port, %host, "forward added");
                return Ok(host);
            }
            last = Some(VmmError::Forward {
                pid: self.pid(),
                guest_port,
                host,
                message: out.trim().to_owned(),
            });
        }
        Err(last.unwrap_or(VmmError::NoPort(std::io::Error::other(
            "no forward attempt was made",
        ))))
    }
}
