//! Typed configuration: addresses, one slot's layout, the egress policy and the pool's ranges.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// An IPv4 network in CIDR form; the address is kept as given (host bits are not cleared) so a
/// `/30`'s member addresses can be written as `198.18.0.1/30`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// `None` when `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then_some(Self { addr, prefix })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        // A shift by 32 overflows, so /0 is spelled out.
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared): what nftables matches on.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// How many addresses the network spans (2^(32-prefix)), as u64 so /0 fits.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a CIDR did not parse.
#[derive(Debug, thiserror::Error)]
#[error("not an IPv4 CIDR (a.b.c.d[/n]): {0:?}")]
pub struct BadCidr(String);

impl FromStr for Ipv4Net {
    type Err = BadCidr;

    /// `a.b.c.d/n`, or a bare address as `/32` (E2B's policies take both).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(s.to_owned());
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr = addr.parse().map_err(|_| bad())?;
        let prefix = prefix.parse().map_err(|_| bad())?;
        Self::new(addr, prefix).ok_or_else(bad)
    }
}

/// What the guest believes about its network. It is fixed at template build time and baked
/// into every snapshot's RAM, so every slot presents the *same* guest network: clones restore
/// without renumbering. The defaults are what `firkin-init` configures (slirp's layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's own address (`firkin.ip`).
    pub guest: Ipv4Addr,
    /// The guest's gateway (`firkin.gw`): the TAP's address in the slot.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// The guest's name server (its `/etc/resolv.conf`, what slirp offered): the slot carries
    /// this address next to the gateway and answers DNS on it (see [`crate::dns`]).
    pub dns: Ipv4Addr,
}

impl Default for GuestNet {
    fn default() -> Self {
        Self {
            guest: Ipv4Addr::new(10, 0, 2, 15),
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            prefix: 24,
            dns: Ipv4Addr::new(10, 0, 2, 3),
        }
    }
}

impl GuestNet {
    pub fn subnet(&self) -> Ipv4Net {
        Ipv4Net {
            addr: self.gateway,
            prefix: self.prefix,
        }
    }
}

/// What plays the guest's side of the slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestDevice {
    /// A persistent TAP that a QEMU started in the slot's namespace opens by name.
    Tap,
    /// A veth whose slot end carries the TAP's name and address and whose other end is moved
    /// into `netns` and configured as the guest configures itself. The slot's routes and
    /// firewall match the device by name only, so this exercises exactly the rules a TAP gets,
    /// without a VM or a user-space frame pump: it is the guest stand-in of tests and
    /// diagnostics.
    VethInto { netns: String },
}

/// The verdict for traffic no list matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

/// Where a guest may connect beyond the always-denied ranges (the host, other slots,
/// link-local, loopback, multicast), which no policy can open. `allow` wins over `deny`, as in
/// E2B's `allowOut`/`denyOut`; then `default` applies.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    pub allow: Vec<Ipv4Net>,
    pub deny: Vec<Ipv4Net>,
    /// Domains whose addresses are allowed (E2B's domain entries in `allowOut`): an exact name
    /// (`example.com`) or one leading wildcard (`*.example.com`, any depth of subdomain, not
    /// the apex), lowercase, without a trailing dot. An address the slot's DNS resolved for a
    /// matching name is allowed like an `allow` entry, for as long as the answer's TTL; and a
    /// TCP connection to port 443 or 80 that the CIDRs and grants do not allow passes if its
    /// TLS SNI or HTTP `Host` is a matching name (the slot's domain proxy, `proxy.rs`).
    pub allow_domains: Vec<String>,
    pub default: Verdict,
}

impl EgressPolicy {
    /// No egress at all (E2B's `allow_internet_access: false`).
    pub fn deny_all() -> Self {
        Self {
            default: Verdict::Deny,
            ..Self::default()
        }
    }
}

/// Names of one slot's kernel objects, all derived from the pool's prefix and the slot index
/// so that a crashed process's leftovers are found again by name and removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotConfig {
    pub index: u32,
    /// The namespace, bind-mounted at `/run/netns/<netns>` (so `ip netns exec` sees it too).
    pub netns: String,
    /// The host (root namespace) end of the veth pair.
    pub host_if: String,
    /// The slot end of the veth pair.
    pub slot_if: String,
    /// The guest-facing device in the slot: QEMU's `-netdev tap,ifname=` name.
    pub guest_if: String,
    /// The host end's address in the slot's /30.
    pub host_addr: Ipv4Addr,
    /// The slot end's address: the guest's traffic leaves NATed to it, and the host reaches the
    /// guest's ports through it.
    pub slot_addr: Ipv4Addr,
    pub guest: GuestNet,
    pub device: GuestDevice,
    pub policy: EgressPolicy,
    /// The pool's whole range: always denied to the guest (it holds every slot's and the
    /// host's veth addresses).
    pub range: Ipv4Net,
    /// The host-side nftables table this slot's traffic passes (see [`crate::HostNet`]).
    pub host_table: String,
    /// Where the slot's DNS server sends the guest's questions (the pool's
    /// [`PoolConfig::dns_upstream`]); only read by [`crate::Slot::create`], a pool shares one
    /// resolver among its slots.
    pub dns_upstream: Vec<SocketAddr>,
}

/// A pool's naming and address plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Prefix of every name the pool creates (namespaces `<prefix>-<i>`, host veths
    /// `<prefix>h<i>`): at most 8 characters so interface names stay within 15.
    pub prefix: String,
    /// Carved into /30s, one per slot. Default `198.18.0.0/16`: 198.18.0.0/15 is reserved for
    /// benchmarking (RFC 2544, RFC 6890), never routed on the internet, and unlike 10/8,
    /// 172.16/12 and 192.168/16 rarely used by LANs, VPNs, Docker or Kubernetes, so the slots'
    /// routes are unlikely to shadow one of the host's. Configurable because nothing is
    /// guaranteed: a host that uses it must pick another.
    pub range: Ipv4Net,
    /// Slots kept prepared ahead.
    pub ready: usize,
    /// The most slots that may exist at once (handed out + ready).
    pub max: usize,
    pub guest: GuestNet,
    pub device: GuestDevice,
    /// The policy every fresh slot starts with.
    pub policy: EgressPolicy,
    /// Name of the host-side nftables table (`inet` family).
    pub host_table: String,
    /// The name servers every slot's DNS server asks, from the root namespace (UDP, TCP on
    /// truncation). Empty: the host's own, from `/etc/resolv.conf`.
    pub dns_upstream: Vec<SocketAddr>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            prefix: "fk".into(),
            range: Ipv4Net {
                addr: Ipv4Addr::new(198, 18, 0, 0),
                prefix: 16,
            },
            ready: 4,
            max: 256,
            guest: GuestNet::default(),
            device: GuestDevice::Tap,
            policy: EgressPolicy::default(),
            host_table: "firkin".into(),
            dns_upstream: Vec::new(),
        }
    }
}

impl PoolConfig {
    /// How many /30s the range holds.
    pub fn capacity(&self) -> u64 {
        self.range.size() / 4
    }

    /// Slot `index`'s configuration, `None` past the range or with an over-long prefix.
    pub fn slot(&self, index: u32) -> Option<SlotConfig> {
        if u64::from(index) >= self.capacity() || self.prefix.len() > 8 {
            return None;
        }
        let base = u32::from(self.range.network()).checked_add(index.checked_mul(4)?)?;
        let host_if = format!("{}h{index}", self.prefix);
        if host_if.len() > 15 {
            return None;
        }
        Some(SlotConfig {
            index,
            netns: format!("{}-{index}", self.prefix),
            host_if,
            // Inside the slot's own namespace there is nothing to collide with.
            slot_if: "veth0".into(),
            guest_if: "tap0".into(),
            host_addr: Ipv4Addr::from(base + 1),
            slot_addr: Ipv4Addr::from(base + 2),
            guest: self.guest,
            device: self.device.clone(),
            policy: self.policy.clone(),
            range: self.range,
            host_table: self.host_table.clone(),
            dns_upstream: self.dns_upstream.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let n: Ipv4Net = "203.0.113.7/24".parse().unwrap();
        assert_eq!(n.network(), Ipv4Addr::new(203, 0, 113, 0));
        assert!(n.contains(Ipv4Addr::new(203, 0, 113, 200)));
        assert!(!n.contains(Ipv4Addr::new(203, 0, 114, 1)));
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!("1.2.3.4".parse::<Ipv4Net>().unwrap().prefix(), 32);
        assert!("1.2.3.4/33".parse::<Ipv4Net>().is_err());
        assert!("nope".parse::<Ipv4Net>().is_err());
    }

    #[test]
    fn slots_get_disjoint_thirty_twos() {
        let pool = PoolConfig::default();
        assert_eq!(pool.capacity(), 16384);
        let a = pool.slot(0).unwrap();
        let b = pool.slot(1).unwrap();
        assert_eq!(a.host_addr, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(a.slot_addr, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(b.host_addr, Ipv4Addr::new(198, 18, 0, 5));
        assert_eq!(b.netns, "fk-1");
        assert_eq!(b.host_if, "fkh1");
        assert!(pool.slot(16384).is_none());
        assert!(pool.slot(16383).unwrap().host_if.len() <= 15);
    }
}
