//! One network slot: create (undoing any leftovers of the same name first) and destroy
//! (best effort through every step, so a partial create leaves nothing behind).

use rtnetlink::Handle;

use crate::config::{EgressPolicy, GuestDevice, SlotConfig};
use crate::dns::{DnsServer, DnsUpstream};
use crate::domains::DomainSet;
use crate::error::{At, Cause, NetError, Step};
use crate::proxy::Proxy;
use crate::{firewall, links, netns, sys};

/// The MAC address of every slot's guest-facing device: locally administered, unicast. Slots
/// are separate layer-2 networks, so the same address in all of them never meets itself.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x66, 0x6b, 0x00, 0x00, 0x01];

/// The slot's ARP entry for its guest, to be put in once the guest's VMM has the TAP open
/// (opening it turns the carrier on, which flushes the TAP's entries). The host's first packet
/// to the guest then goes out at once rather than after an ARP round trip through a guest
/// restored a moment ago (under TCG, tens of milliseconds of a create). A guest that takes
/// another address announces it (`arp_notify`), which replaces the entry.
#[derive(Clone, Debug)]
pub struct GuestSeed {
    netns: String,
    guest_if: String,
    guest: std::net::Ipv4Addr,
    mac: [u8; 6],
}

impl GuestSeed {
    pub async fn apply(&self) -> Result<(), NetError> {
        let ns = self.netns.as_str();
        let inner = links::connect(Some(ns)).await.at(ns, Step::Address)?;
        links::seed_neighbour(&inner, &self.guest_if, self.guest, self.mac)
            .await
            .at(ns, Step::Address)
    }
}

/// The guest stand-in's interface name inside its namespace.
const STAND_IN_IF: &str = "eth0";

/// A prepared slot. Dropping one that was not [`Slot::destroy`]ed destroys it on a helper
/// thread, so an early return or a panic leaks no namespace, link or rule.
#[derive(Debug)]
pub struct Slot {
    config: SlotConfig,
    /// The guest's DNS server; `None` only once the slot is destroyed.
    dns: Option<DnsServer>,
    /// The domain proxy (see [`crate::proxy`]); listening in every slot, reached only while
    /// the policy has domains. `None` only once the slot is destroyed.
    proxy: Option<Proxy>,
    live: bool,
}

impl Slot {
    /// Builds the slot `config` describes, with a resolver of its own for
    /// `config.dns_upstream` (a pool shares one: [`Slot::create_with`]). Must be called on a
    /// tokio runtime, which then serves the slot's DNS until the slot is destroyed.
    pub async fn create(config: SlotConfig) -> Result<Self, NetError> {
        let upstream = DnsUpstream::new(&config.dns_upstream).at(&config.netns, Step::Dns)?;
        Self::create_with(config, upstream).await
    }

    /// Builds the slot `config` describes, its DNS server resolving through `upstream`.
    /// Anything left under its names (a crash, an interrupted create) is removed first; if a
    /// step fails, everything done so far is.
    pub async fn create_with(config: SlotConfig, upstream: DnsUpstream) -> Result<Self, NetError> {
        teardown(&config).await?;
        let built = match build(&config).await {
            Ok(()) => DnsServer::start(
                &config.netns,
                config.guest.dns,
                upstream,
                DomainSet::new(&config.policy.allow_domains),
            )
            .await
            .at(&config.netns, Step::Dns),
            Err(e) => Err(e),
        };
        let built = match built {
            Ok(dns) => Proxy::start(&config, std::sync::Arc::clone(dns.grants()))
                .await
                .map(|proxy| (dns, proxy))
                .at(&config.netns, Step::Proxy),
            Err(e) => Err(e),
        };
        match built {
            Ok((dns, proxy)) => Ok(Self {
                config,
                dns: Some(dns),
                proxy: Some(proxy),
                live: true,
            }),
            Err(e) => {
                if let Err(undo) = teardown(&config).await {
                    tracing::warn!(error = %undo, "undoing a failed slot create");
                }
                Err(e)
            }
        }
    }

    pub fn config(&self) -> &SlotConfig {
        &self.config
    }

    /// The namespace a QEMU for this slot must be started in.
    pub fn netns(&self) -> &str {
        &self.config.netns
    }

    /// Replaces the guest's egress policy; new connections see it at once. Addresses granted
    /// for the old policy's domains are revoked in the same transaction, and the DNS server
    /// matches the new domains from then on. The redirect of web connections to the domain
    /// proxy is switched on (the policy has domains) or off in the same transaction, and the
    /// proxy decides by the new domains from then on, connections it already passed on
    /// excepted.
    pub async fn set_policy(&mut self, policy: EgressPolicy) -> Result<(), NetError> {
        let ruleset = firewall::policy_update(&self.config, &policy);
        let domains = DomainSet::new(&policy.allow_domains);
        match &self.dns {
            Some(dns) => dns
                .grants()
                .replace(domains, ruleset)
                .await
                .at(&self.config.netns, Step::Policy)?,
            None => {
                return Err(NetError::new(
                    &self.config.netns,
                    Step::Policy,
                    Cause::Other("the slot is destroyed".into()),
                ));
            }
        }
        self.config.policy = policy;
        Ok(())
    }

    /// Makes a slot its sandbox has left fit for the next one, instead of destroying it and
    /// building another (a namespace's creation and teardown are the dearest kernel work a
    /// create and a kill cause): `policy` in place of the last one (which revokes its DNS
    /// grants), then no tracked connection and no ARP entry of the last guest. Its VMM must
    /// have exited. The slot's addresses stay; the host keys its idle connections to a guest
    /// by sandbox, so none of them reaches the next guest.
    pub async fn reset(&mut self, policy: EgressPolicy) -> Result<(), NetError> {
        // The same policy without domains has no grants to revoke: no `nft` run needed.
        if self.config.policy != policy || !policy.allow_domains.is_empty() {
            self.set_policy(policy).await?;
        }
        let ns = self.config.netns.clone();
        netns::run_in_async(&ns, || crate::nfset::SetWriter::open()?.flush_conntrack(1))
            .await
            .at(&ns, Step::Recycle)?
            .at(&ns, Step::Recycle)?;
        let inner = links::connect(Some(&ns)).await.at(&ns, Step::Recycle)?;
        links::flush_neighbours(&inner, &self.config.guest_if)
            .await
            .at(&ns, Step::Recycle)
    }

    /// What [`GuestSeed::apply`] needs to tell the slot that its guest has NIC address `mac`.
    pub fn guest_seed(&self, mac: [u8; 6]) -> GuestSeed {
        GuestSeed {
            netns: self.config.netns.clone(),
            guest_if: self.config.guest_if.clone(),
            guest: self.config.guest.guest,
            mac,
        }
    }

    /// Removes everything of the slot; safe to call on a half-built one.
    pub async fn destroy(mut self) -> Result<(), NetError> {
        self.live = false;
        // Stopped first: their sockets hold the namespace open.
        self.proxy = None;
        self.dns = None;
        teardown(&self.config).await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.proxy = None;
        self.dns = None;
        if !self.live {
            return;
        }
        let config = self.config.clone();
        // Drop cannot await; a thread with its own runtime can, without touching the
        // caller's runtime (which may be shutting down).
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(teardown(&config))
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(slot = %self.config.netns, error = %e, "destroying a dropped slot")
            }
            Err(_) => {
                tracing::warn!(slot = %self.config.netns, "destroying a dropped slot panicked")
            }
        }
    }
}

async fn build(c: &SlotConfig) -> Result<(), NetError> {
    let ns = c.netns.as_str();
    let name = ns.to_owned();
    tokio::task::spawn_blocking(move || netns::create(&name))
        .await
        .map_err(|e| Cause::Other(e.to_string()))
        .at(ns, Step::CreateNamespace)?
        .at(ns, Step::CreateNamespace)?;

    let root = links::connect(None).await.at(ns, Step::EnterNamespace)?;
    // The peer's name only has to be unique in the root namespace until it moves.
    let peer = format!("{}p", c.host_if);
    links::add_veth(&root, &c.host_if, &peer)
        .await
        .at(ns, Step::CreateVeth)?;
    links::move_to(&root, &peer, ns)
        .await
        .at(ns, Step::MoveIntoNamespace)?;
    links::address(&root, &c.host_if, c.host_addr, 30)
        .await
        .at(ns, Step::Address)?;
    links::up(&root, &c.host_if).await.at(ns, Step::LinkUp)?;

    let inner = links::connect(Some(ns))
        .await
        .at(ns, Step::EnterNamespace)?;
    links::rename(&inner, &peer, &c.slot_if)
        .await
        .at(ns, Step::MoveIntoNamespace)?;
    links::address(&inner, &c.slot_if, c.slot_addr, 30)
        .await
        .at(ns, Step::Address)?;
    links::up(&inner, &c.slot_if).await.at(ns, Step::LinkUp)?;
    links::up(&inner, "lo").await.at(ns, Step::LinkUp)?;

    match &c.device {
        GuestDevice::Tap => {
            let tap = c.guest_if.clone();
            netns::run_in_async(ns, move || sys::create_persistent_tap(&tap))
                .await
                .at(ns, Step::CreateTap)?
                .at(ns, Step::CreateTap)?;
        }
        GuestDevice::VethInto { netns: guest_ns } => {
            stand_in(c, &inner, guest_ns).await?;
        }
    }
    // Every slot's gateway has the same MAC address, as it has the same IP address: a guest
    // restored into another slot than the one its snapshot was taken in (every clone, every
    // resume) keeps its ARP entries for 10.0.2.2 and 10.0.2.3, and with a new MAC behind
    // them its packets would be dropped until those entries expired (tens of seconds).
    links::set_mac(&inner, &c.guest_if, GATEWAY_MAC)
        .await
        .at(ns, Step::Address)?;
    links::address(&inner, &c.guest_if, c.guest.gateway, c.guest.prefix)
        .await
        .at(ns, Step::Address)?;
    // The guest's name server: a /32 next to the gateway, so the guest's ARP for it is
    // answered on the same link and the DNS server can bind it.
    links::address(&inner, &c.guest_if, c.guest.dns, 32)
        .await
        .at(ns, Step::Address)?;
    links::up(&inner, &c.guest_if).await.at(ns, Step::LinkUp)?;
    links::default_route(&inner, c.host_addr)
        .await
        .at(ns, Step::Route)?;

    netns::run_in_async(ns, || {
        netns::write_sysctl("net.ipv4.ip_forward", "1")?;
        // The slot has no IPv6; without this its links send router solicitations and MLD
        // reports, and each one wakes the guest behind the TAP. A host without IPv6 has no
        // such switch, which is as good.
        match netns::write_sysctl("net.ipv6.conf.all.disable_ipv6", "1") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    })
    .await
    .at(ns, Step::Sysctl)?
    .at(ns, Step::Sysctl)?;
    let ruleset = firewall::slot_ruleset(c);
    netns::run_in_async(ns, move || firewall::apply(&ruleset))
        .await
        .at(ns, Step::Firewall)?
        .at(ns, Step::Firewall)?;
    Ok(())
}

/// The guest's side as a veth into `guest_ns`, configured as `firkin-init` configures a guest.
async fn stand_in(c: &SlotConfig, inner: &Handle, guest_ns: &str) -> Result<(), NetError> {
    let ns = c.netns.as_str();
    let peer = format!("{}g", c.host_if);
    links::add_veth(inner, &c.guest_if, &peer)
        .await
        .at(ns, Step::GuestStandIn)?;
    links::move_to(inner, &peer, guest_ns)
        .await
        .at(ns, Step::GuestStandIn)?;
    let guest = links::connect(Some(guest_ns))
        .await
        .at(ns, Step::GuestStandIn)?;
    links::rename(&guest, &peer, STAND_IN_IF)
        .await
        .at(ns, Step::GuestStandIn)?;
    links::address(&guest, STAND_IN_IF, c.guest.guest, c.guest.prefix)
        .await
        .at(ns, Step::GuestStandIn)?;
    links::up(&guest, STAND_IN_IF)
        .await
        .at(ns, Step::GuestStandIn)?;
    links::up(&guest, "lo").await.at(ns, Step::GuestStandIn)?;
    links::default_route(&guest, c.guest.gateway)
        .await
        .at(ns, Step::GuestStandIn)?;
    Ok(())
}

/// Removes the host veth (its peer goes with it) and the namespace (and with it the TAP and the
/// slot's table). Every step runs even if an earlier one failed; the first error is returned.
pub(crate) async fn teardown(c: &SlotConfig) -> Result<(), NetError> {
    let ns = c.netns.as_str();
    let mut first: Option<NetError> = None;
    let mut keep = |r: Result<(), NetError>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    match links::connect(None).await {
        Ok(root) => {
            keep(links::delete(&root, &c.host_if).await.at(ns, Step::Destroy));
            // An interrupted create may have left the peer in the root namespace.
            keep(
                links::delete(&root, &format!("{}p", c.host_if))
                    .await
                    .at(ns, Step::Destroy),
            );
        }
        Err(e) => keep(Err(e).at(ns, Step::Destroy)),
    }
    if netns::exists(ns) {
        // A TAP is deleted explicitly in case a process still holds the namespace open.
        match links::connect(Some(ns)).await {
            Ok(inner) => keep(
                links::delete(&inner, &c.guest_if)
                    .await
                    .at(ns, Step::Destroy),
            ),
            Err(e) => keep(Err(e).at(ns, Step::Destroy)),
        }
    }
    let name = ns.to_owned();
    keep(
        tokio::task::spawn_blocking(move || netns::delete(&name))
            .await
            .map_err(|e| Cause::Other(e.to_string()))
            .and_then(|r| r.map_err(Cause::Io))
            .at(ns, Step::Destroy),
    );
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
