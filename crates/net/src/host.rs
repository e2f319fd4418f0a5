//! The host's share of every slot: IP forwarding and the pool's table in the root namespace.

use crate::config::PoolConfig;
use crate::error::{At, NetError, Step};
use crate::{firewall, netns};

/// The host side of a pool. Call [`HostNet::ensure`] before creating slots (forwarding and the
/// isolation rules must exist before any guest sends a packet) and [`HostNet::remove`] once
/// the pool's last slot is gone.
#[derive(Debug, Clone)]
pub struct HostNet {
    table: String,
}

impl HostNet {
    /// Turns on IPv4 forwarding in the calling thread's (the root) namespace and (re)writes the
    /// pool's table. Forwarding is host-wide: a host firewall with a drop policy on forward
    /// must let the slots' traffic pass.
    pub fn ensure(pool: &PoolConfig) -> Result<Self, NetError> {
        let who = format!("{}-*", pool.prefix);
        netns::write_sysctl("net.ipv4.ip_forward", "1").at(&who, Step::Sysctl)?;
        firewall::apply(&firewall::host_ruleset(pool)).at(&who, Step::Firewall)?;
        Ok(Self {
            table: pool.host_table.clone(),
        })
    }

    /// Deletes the pool's table (absent is fine). Forwarding is left on: something else on the
    /// host may rely on it by now.
    pub fn remove(&self) -> Result<(), NetError> {
        firewall::apply(&firewall::remove_table(&self.table)).at(&self.table, Step::Destroy)
    }
}
