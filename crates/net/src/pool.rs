//! Slots prepared ahead: a create takes a ready slot in O(1) and never waits for netlink or
//! nftables; a background task refills the pool one slot at a time, up to `ready` waiting and
//! `max` in existence.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::PoolConfig;
use crate::dns::DnsUpstream;
use crate::error::{At, NetError, Step};
use crate::host::HostNet;
use crate::slot::Slot;

#[derive(Debug)]
struct State {
    ready: VecDeque<Slot>,
    /// Indices of destroyed slots, oldest first. A fresh index is taken before any of these,
    /// and then the one freed longest ago, so a log's slot name points at one sandbox for as
    /// long as possible.
    free: VecDeque<u32>,
    /// The next never-used index.
    next: u32,
    /// Slots that exist or are being built (ready + handed out + creating).
    live: usize,
    closed: bool,
}

impl State {
    /// A fresh index while the range has one, else the one given back longest ago.
    fn take_index(&mut self, capacity: u64) -> Option<u32> {
        if u64::from(self.next) < capacity {
            self.next += 1;
            return Some(self.next - 1);
        }
        self.free.pop_front()
    }
}

#[derive(Debug)]
struct Inner {
    config: PoolConfig,
    /// One resolver (cache, connections) for every slot's DNS server.
    upstream: DnsUpstream,
    /// Held until shutdown: no other pool may use (or sweep) these names meanwhile.
    prefix_lock: Mutex<Option<nix::fcntl::Flock<std::fs::File>>>,
    state: Mutex<State>,
    wake: Notify,
    /// Woken whenever a slot becomes ready (tests and warm-up wait on it).
    ready: Notify,
}

impl Inner {
    // The lock is never held across an await, so a panic elsewhere cannot leave it
    // half-updated; a poisoned lock is taken over as it is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A pool of prepared slots. [`SlotPool::shutdown`] destroys what it still holds.
#[derive(Debug, Clone)]
pub struct SlotPool {
    inner: Arc<Inner>,
    host: HostNet,
}

/// How long the refill waits after a failed create before trying again: a failing host
/// (no CAP_NET_ADMIN, no `nft`) must not spin.
const RETRY: Duration = Duration::from_secs(2);

impl SlotPool {
    /// Removes what an earlier run with the same prefix left, sets up the host side and starts
    /// filling the pool in the background.
    pub fn start(config: PoolConfig) -> Result<Self, NetError> {
        let lock = crate::sweep::claim_prefix(&config)?;
        crate::sweep::sweep(&config)?;
        let upstream = DnsUpstream::new(&config.dns_upstream)
            .at(&format!("{}-*", config.prefix), Step::Dns)?;
        let host = HostNet::ensure(&config)?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                ready: VecDeque::with_capacity(config.ready),
                free: VecDeque::new(),
                next: 0,
                live: 0,
                closed: false,
            }),
            config,
            upstream,
            prefix_lock: Mutex::new(Some(lock)),
            wake: Notify::new(),
            ready: Notify::new(),
        });
        tokio::spawn(refill(Arc::clone(&inner)));
        Ok(Self { inner, host })
    }

    /// A ready slot, if one is; never waits.
    pub fn take(&self) -> Option<Slot> {
        let slot = self.inner.lock().ready.pop_front();
        self.inner.wake.notify_one();
        slot
    }

    /// A ready slot, or one built now when none is (a burst of creates outran the refill, or
    /// the pool keeps none ready). Fails when the pool is shut down or at its `max`.
    pub async fn take_or_create(&self) -> Result<Slot, NetError> {
        if let Some(slot) = self.take() {
            return Ok(slot);
        }
        let index = {
            let mut st = self.inner.lock();
            let why = if st.closed {
                Some("the pool is shut down")
            } else if st.live >= self.inner.config.max {
                Some("the pool is at its maximum number of slots")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(NetError::new(
                    format!("{}-*", self.inner.config.prefix),
                    crate::error::Step::Config,
                    crate::error::Cause::Other(why.into()),
                ));
            }
            st.live += 1;
            match st.take_index(self.inner.config.capacity()) {
                Some(i) => i,
                None => {
                    st.live -= 1;
                    return Err(NetError::new(
                        format!("{}-*", self.inner.config.prefix),
                        crate::error::Step::Config,
                        crate::error::Cause::Other("the pool's range is used up".into()),
                    ));
                }
            }
        };
        let made = match self.inner.config.slot(index) {
            Some(config) => Slot::create_with(config, self.inner.upstream.clone()).await,
            None => Err(NetError::new(
                format!("{}-{index}", self.inner.config.prefix),
                crate::error::Step::Config,
                crate::error::Cause::Other("the pool's range has no room for it".into()),
            )),
        };
        if made.is_err() {
            let mut st = self.inner.lock();
            st.live = st.live.saturating_sub(1);
            st.free.push_back(index);
        }
        made
    }

    /// How many slots are ready.
    pub fn ready(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// Waits until at least `n` slots are ready, or `timeout` passes; returns whether they are.
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiting = self.inner.ready.notified();
            if self.ready() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                return self.ready() >= n;
            }
        }
    }

    /// Takes back a slot that was handed out (its VMM has exited). It is reset
    /// ([`Slot::reset`]) and made ready again, so a steady stream of creates and kills builds
    /// and tears down no namespace at all. One that cannot be reset, or that comes back after
    /// shutdown, is destroyed and its index freed.
    pub async fn release(&self, mut slot: Slot) -> Result<(), NetError> {
        if !self.inner.lock().closed {
            match slot.reset(self.inner.config.policy.clone()).await {
                Ok(()) => {
                    let late = {
                        let mut st = self.inner.lock();
                        if st.closed {
                            Some(slot)
                        } else {
                            st.ready.push_back(slot);
                            None
                        }
                    };
                    match late {
                        Some(s) => slot = s,
                        None => {
                            self.inner.ready.notify_waiters();
                            return Ok(());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(slot = %slot.netns(), error = %e, "recycling a network slot failed; destroying it");
                }
            }
        }
        let index = slot.config().index;
        let mut done = slot.destroy().await;
        let last_after_shutdown = {
            let mut st = self.inner.lock();
            st.live = st.live.saturating_sub(1);
            st.free.push_back(index);
            st.closed && st.live == 0
        };
        self.inner.wake.notify_one();
        // `shutdown` leaves the host table to the last slot out when sessions still held
        // some; without this a stopped server's table stayed until the next start swept it.
        if last_after_shutdown && let Err(e) = self.host.remove() {
            done = done.and(Err(e));
        }
        done
    }

    /// Stops the refill and destroys every ready slot; the host table goes too once no slot of
    /// the pool is left.
    pub async fn shutdown(&self) -> Result<(), NetError> {
        let drained: Vec<Slot> = {
            let mut st = self.inner.lock();
            st.closed = true;
            st.ready.drain(..).collect()
        };
        self.inner.wake.notify_one();
        let mut first = None;
        for slot in drained {
            let r = slot.destroy().await;
            let mut st = self.inner.lock();
            st.live = st.live.saturating_sub(1);
            drop(st);
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        if self.inner.lock().live == 0
            && let Err(e) = self.host.remove()
        {
            first.get_or_insert(e);
        }
        // Slots still handed out are their sessions' to destroy; the names are free again.
        self.inner
            .prefix_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        first.map_or(Ok(()), Err)
    }
}

/// What the refill should do next.
enum Next {
    Build(u32),
    Wait,
    Stop,
}

fn next(inner: &Inner) -> Next {
    let mut st = inner.lock();
    if st.closed {
        return Next::Stop;
    }
    let creating_allowed = st.live < inner.config.max;
    // `live` counts handed-out slots too; only the ready ones count against `ready`.
    if st.ready.len() >= inner.config.ready || !creating_allowed {
        return Next::Wait;
    }
    let Some(index) = st.take_index(inner.config.capacity()) else {
        return Next::Wait;
    };
    st.live += 1;
    Next::Build(index)
}

async fn refill(inner: Arc<Inner>) {
    loop {
        match next(&inner) {
            Next::Stop => return,
            Next::Wait => inner.wake.notified().await,
            Next::Build(index) => {
                let made = match inner.config.slot(index) {
                    Some(config) => Slot::create_with(config, inner.upstream.clone()).await,
                    None => Err(NetError::new(
                        format!("{}-{index}", inner.config.prefix),
                        crate::error::Step::Config,
                        crate::error::Cause::Other("the pool's range has no room for it".into()),
                    )),
                };
                match made {
                    Ok(slot) => {
                        // Shutdown may have drained while this one was built: then it is
                        // destroyed here rather than left behind.
                        let late = {
                            let mut st = inner.lock();
                            if st.closed {
                                st.live = st.live.saturating_sub(1);
                                Some(slot)
                            } else {
                                st.ready.push_back(slot);
                                None
                            }
                        };
                        match late {
                            Some(slot) => {
                                if let Err(e) = slot.destroy().await {
                                    tracing::warn!(error = %e, "destroying a slot built during shutdown");
                                }
                                return;
                            }
                            None => inner.ready.notify_waiters(),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "preparing a network slot");
                        {
                            let mut st = inner.lock();
                            st.live = st.live.saturating_sub(1);
                            st.free.push_back(index);
                        }
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        }
    }
}
