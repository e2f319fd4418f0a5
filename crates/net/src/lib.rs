//! Network slots: one network namespace per sandbox, holding the TAP its QEMU uses (the guest
//! keeps its template address, the same in every slot), a veth pair to the host with a unique
//! /30, NAT both ways and nftables isolation (no host, no other slot, no link-local; an egress
//! policy swapped at run time), prepared ahead in a [`SlotPool`].
//!
//! Not yet wired into the runtime (issue 12, item 1).

pub mod config;
mod dns;
mod domains;
pub mod error;
mod firewall;
mod host;
pub mod links;
pub mod netns;
mod nfset;
mod peek;
mod pool;
mod proxy;
mod slot;
mod sweep;
mod sys;

pub use config::{EgressPolicy, GuestDevice, GuestNet, Ipv4Net, PoolConfig, SlotConfig, Verdict};
pub use dns::{DnsUpstream, GrantError, UpstreamError};
pub use domains::DomainSet;
pub use error::{Cause, NetError, Step};
pub use host::{HostNet, missing_requirements};
pub use pool::SlotPool;
pub use slot::{GuestSeed, Slot};

/// Changes whenever what a guest sees of its slot changes (addresses, the gateway's MAC): a
/// template snapshotted in a slot of another recipe may hold ARP entries or settings that no
/// longer fit, so template builds include it in their fingerprint.
pub const SLOT_RECIPE: u32 = 2;
