//! Admission: the capacity gates of creates (the FIFO queue, evicting warm entries when that
//! makes room) and of warm-pool refills, and the guards that give a reservation back when a
//! create fails or is cancelled.

use std::collections::VecDeque;
use std::sync::Arc;

use firkin_admission::{AdmissionDecision, ResourceBudget, plan_admission};
use tokio::sync::oneshot;

use super::{Inner, RuntimeError, RuntimeLauncher, SandboxRuntime, State, lock, stop_all};
use crate::gates::{Admission, GateError};
use crate::session::SandboxSession;

/// A create waiting in the FIFO queue; `grant` fires once capacity has been reserved for it.
pub(super) struct Waiter {
    ticket: u64,
    budget: ResourceBudget,
    grant: oneshot::Sender<()>,
}

/// Gives a reservation back on drop unless disarmed. Also wakes waiters.
pub(super) struct Held<L>
where
    L: RuntimeLauncher,
{
    inner: Arc<Inner<L>>,
    budget: ResourceBudget,
    armed: bool,
}

impl<L> Drop for Held<L>
where
    L: RuntimeLauncher,
{
    fn drop(&mut self) {
        if self.armed {
            let mut st = lock(&self.inner.state);
            if let Err(err) = st.ledger.release_active(self.budget) {
                tracing::error!(%err, "releasing an abandoned reservation");
            }
            let evicted = grant_waiters(&mut st);
            drop(st);
            stop_all(evicted);
            self.inner.refill.notify_one();
        }
    }
}

/// A place in the admission queue. Settling it (or dropping it, when the create is cancelled)
/// either withdraws it from the queue or, if capacity was granted meanwhile, takes or returns
/// that capacity, so no grant is ever lost.
struct QueueTicket<L>
where
    L: RuntimeLauncher,
{
    inner: Arc<Inner<L>>,
    ticket: u64,
    budget: ResourceBudget,
    armed: bool,
}

enum TicketOutcome {
    /// Capacity was reserved for us; the caller now owns it.
    Granted,
    /// We left the queue before any grant.
    Withdrawn,
}

impl<L> QueueTicket<L>
where
    L: RuntimeLauncher,
{
    fn settle(mut self) -> TicketOutcome {
        self.armed = false;
        let mut st = lock(&self.inner.state);
        let before = st.waiters.len();
        st.waiters.retain(|w| w.ticket != self.ticket);
        if st.waiters.len() < before {
            // Leaving may unblock those behind us.
            let evicted = grant_waiters(&mut st);
            drop(st);
            stop_all(evicted);
            TicketOutcome::Withdrawn
        } else {
            TicketOutcome::Granted
        }
    }
}

impl<L> Drop for QueueTicket<L>
where
    L: RuntimeLauncher,
{
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = lock(&self.inner.state);
        let before = st.waiters.len();
        st.waiters.retain(|w| w.ticket != self.ticket);
        if st.waiters.len() == before {
            // Granted while the create was being cancelled: give the capacity back.
            if let Err(err) = st.ledger.release_active(self.budget) {
                tracing::error!(%err, "returning a grant of a cancelled create");
            }
        }
        let evicted = grant_waiters(&mut st);
        drop(st);
        stop_all(evicted);
    }
}

impl<L> Held<L>
where
    L: RuntimeLauncher,
{
    /// An armed guard over `budget`, which the caller has already reserved.
    pub(super) fn new(inner: Arc<Inner<L>>, budget: ResourceBudget) -> Self {
        Self {
            inner,
            budget,
            armed: true,
        }
    }

    pub(super) fn disarm(mut self) {
        self.armed = false;
    }
}

/// Hands freed capacity to waiters in FIFO order, evicting warm entries where that makes the
/// head fit. Stops at the first waiter that still does not fit: later, smaller requests must not
/// overtake it.
pub(super) fn grant_waiters<S: SandboxSession>(st: &mut State<S>) -> Vec<Arc<S>> {
    let mut evicted = Vec::new();
    while let Some(head) = st.waiters.front() {
        let budget = head.budget;
        if st.ledger.check_active(budget).is_err() {
            if st.ledger.shortfall_after_evicting_warm(budget).is_some() {
                break;
            }
            evicted.extend(evict_warm_until_fits(st, budget));
        }
        if st.ledger.reserve_active(budget).is_err() {
            break;
        }
        let Some(waiter) = st.waiters.pop_front() else {
            break;
        };
        if waiter.grant.send(()).is_err() {
            // The waiter was cancelled between its timeout and ours; take the capacity back.
            let _ = st.ledger.release_active(budget);
        }
    }
    evicted
}

fn evict_warm_until_fits<S: SandboxSession>(
    st: &mut State<S>,
    budget: ResourceBudget,
) -> Vec<Arc<S>> {
    let mut evicted = Vec::new();
    while st.ledger.check_active(budget).is_err() {
        let key = st
            .warm
            .iter()
            .find(|(_, q)| !q.is_empty())
            .map(|(k, _)| k.clone());
        let Some(key) = key else { break };
        if let Some(w) = st.warm.get_mut(&key).and_then(VecDeque::pop_front) {
            if let Err(err) = st.ledger.release_warm(w.budget) {
                tracing::error!(%err, "evicting warm entry");
            }
            evicted.push(w.session);
        }
    }
    evicted
}

impl<L> SandboxRuntime<L>
where
    L: RuntimeLauncher,
{
    /// waiting in the FIFO queue.
    async fn admit(&self, budget: ResourceBudget) -> Result<Held<L>, RuntimeError> {
        let held = |inner: &Arc<Inner<L>>| Held {
            inner: Arc::clone(inner),
            budget,
            armed: true,
        };
        let (ticket, rx) = {
            let mut st = lock(&self.inner.state);
            let decision = plan_admission(
                &st.ledger,
                budget,
                st.waiters.len(),
                self.inner.config.queue,
            );
            match decision {
                AdmissionDecision::Admit => {
                    st.ledger
                        .reserve_active(budget)
                        .map_err(RuntimeError::Oversized)?;
                    return Ok(held(&self.inner));
                }
                AdmissionDecision::AdmitAfterEvictingWarm => {
                    let evicted = evict_warm_until_fits(&mut st, budget);
                    st.ledger
                        .reserve_active(budget)
                        .map_err(RuntimeError::Oversized)?;
                    drop(st);
                    stop_all(evicted);
                    return Ok(held(&self.inner));
                }
                AdmissionDecision::RejectOversized(e) => return Err(RuntimeError::Oversized(e)),
                AdmissionDecision::RejectQueueFull { max_pending } => {
                    return Err(RuntimeError::QueueFull { max_pending });
                }
                AdmissionDecision::Queue { position } => {
                    let (tx, rx) = oneshot::channel();
                    let ticket = st.next_ticket;
                    st.next_ticket += 1;
                    st.waiters.push_back(Waiter {
                        ticket,
                        budget,
                        grant: tx,
                    });
                    tracing::info!(position, %budget, "create queued for capacity");
                    (ticket, rx)
                }
            }
        };
        let ticket = QueueTicket {
            inner: Arc::clone(&self.inner),
            ticket,
            budget,
            armed: true,
        };
        let wait = self.inner.config.queue_wait;
        let granted = matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())));
        match ticket.settle() {
            TicketOutcome::Granted => Ok(held(&self.inner)),
            TicketOutcome::Withdrawn if granted => Ok(held(&self.inner)),
            TicketOutcome::Withdrawn => Err(RuntimeError::QueueTimeout { waited: wait }),
        }
    }
}

/// The capacity gate of creates and resumes: the runtime's FIFO admission queue.
pub(super) struct QueueAdmission<'r, L: RuntimeLauncher>(pub(super) &'r SandboxRuntime<L>);

#[async_trait::async_trait]
impl<L> Admission for QueueAdmission<'_, L>
where
    L: RuntimeLauncher,
{
    type Held = Held<L>;
    type Error = RuntimeError;

    async fn admit(&mut self, budget: ResourceBudget) -> Result<Held<L>, RuntimeError> {
        self.0.admit(budget).await
    }

    fn release(&mut self, held: Held<L>) {
        // Dropping an armed guard gives the reservation back and grants waiters.
        drop(held);
    }
}

/// Why a refill took no warm reservation.
#[derive(Debug)]
pub(super) enum WarmRefusal {
    /// A create is waiting or in flight: refills stand aside (see `refill_once`).
    StoodAside,
    Full,
}

/// The capacity gate of warm-pool refills: a warm reservation, evicted first when a create
/// needs the room.
pub(super) struct WarmAdmission<'r, L: RuntimeLauncher>(pub(super) &'r Inner<L>);

#[async_trait::async_trait]
impl<L> Admission for WarmAdmission<'_, L>
where
    L: RuntimeLauncher,
{
    type Held = ResourceBudget;
    type Error = WarmRefusal;

    async fn admit(&mut self, budget: ResourceBudget) -> Result<ResourceBudget, WarmRefusal> {
        let mut st = lock(&self.0.state);
        if !st.waiters.is_empty() || !st.starting.is_empty() {
            return Err(WarmRefusal::StoodAside);
        }
        st.ledger
            .reserve_warm(budget)
            .map_err(|_| WarmRefusal::Full)?;
        Ok(budget)
    }

    fn release(&mut self, budget: ResourceBudget) {
        let evicted = {
            let mut st = lock(&self.0.state);
            let _ = st.ledger.release_warm(budget);
            grant_waiters(&mut st)
        };
        stop_all(evicted);
    }
}

/// A gate's refusal as the runtime reports it.
pub(super) fn into_runtime_error<E>(e: GateError<RuntimeError, E>) -> RuntimeError
where
    E: std::error::Error + Send + Sync + 'static,
{
    match e {
        GateError::Integrity { artifact, source } => RuntimeError::Integrity { artifact, source },
        GateError::Disk { floor, error } => RuntimeError::Disk(error.as_capacity_error(floor)),
        GateError::Capacity(c) => c,
        GateError::Launch(error) => RuntimeError::Launch(Box::new(error)),
    }
}
