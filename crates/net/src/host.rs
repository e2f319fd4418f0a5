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

/// What this process lacks to build slots, if anything: CAP_NET_ADMIN and CAP_SYS_ADMIN
/// (namespaces, bind mounts, links, rules), `/dev/net/tun` and the `nft` program.
pub fn missing_requirements() -> Option<String> {
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    const NET_ADMIN: u64 = 1 << 12;
    const SYS_ADMIN: u64 = 1 << 21;
    let mut missing = Vec::new();
    if caps & NET_ADMIN == 0 || caps & SYS_ADMIN == 0 {
        missing.push("CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun");
    }
    let nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nft {
        missing.push("the `nft` program (Debian package nftables)");
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}
