//! A sandbox VM's network: the NIC's attachment for a slot, and a lease that gives the slot
//! back to its pool however the VM ends.

use firkin_net::{EgressPolicy, NetError, Slot, SlotPool};
use firkin_vmm::NetAttach;

/// A slot taken from a pool for one VM. [`SlotLease::release`] gives it back once the VM has
/// exited; a lease dropped on an error path gives it back from a task (or, with no runtime
/// left, the slot destroys itself), so neither the slot nor the pool's count leaks.
#[derive(Debug)]
pub(crate) struct SlotLease {
    slot: Option<Slot>,
    pool: SlotPool,
}

impl SlotLease {
    /// A ready slot of `pool`, or one built now.
    pub async fn take(pool: &SlotPool) -> Result<Self, NetError> {
        Ok(Self {
            slot: Some(pool.take_or_create().await?),
            pool: pool.clone(),
        })
    }

    /// What a VM in this slot attaches its NIC to.
    pub fn attach(&self) -> NetAttach {
        match &self.slot {
            Some(slot) => NetAttach::Tap {
                netns: firkin_net::netns::path(slot.netns()),
                ifname: slot.config().guest_if.clone(),
                reach: slot.config().slot_addr,
            },
            None => NetAttach::User,
        }
    }

    /// The slot's ARP entry for a guest restored with NIC address `mac`, to be put in once
    /// its QEMU runs (see [`firkin_net::GuestSeed`]); `None` without a slot or for an address
    /// that does not parse.
    pub fn guest_seed(&self, mac: &str) -> Option<firkin_net::GuestSeed> {
        let slot = self.slot.as_ref()?;
        let mac = firkin_envd::guest::parse_mac(mac).ok()?;
        Some(slot.guest_seed(mac))
    }

    pub async fn set_policy(&mut self, policy: EgressPolicy) -> Result<(), NetError> {
        match self.slot.as_mut() {
            Some(slot) => slot.set_policy(policy).await,
            None => Ok(()),
        }
    }

    /// Gives the slot back to its pool, which resets it for another sandbox (or destroys it).
    /// A failure is logged: the next slot of that index removes leftovers by name before it
    /// is built.
    pub async fn release(mut self) {
        if let Some(slot) = self.slot.take() {
            give_back(&self.pool, slot).await;
        }
    }
}

async fn give_back(pool: &SlotPool, slot: Slot) {
    let name = slot.netns().to_owned();
    if let Err(err) = pool.release(slot).await {
        tracing::warn!(slot = %name, %err, "releasing a network slot");
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let pool = self.pool.clone();
                rt.spawn(async move { give_back(&pool, slot).await });
            }
            Err(_) => drop(slot),
        }
    }
}

/// The attachment of a VM with an optional lease: user-mode networking without one.
pub(crate) fn attach(lease: Option<&SlotLease>) -> NetAttach {
    lease.map_or(NetAttach::User, SlotLease::attach)
}
