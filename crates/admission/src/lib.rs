//! Capacity accounting: resource budgets, the active/warm capacity ledger and admission
//! planning.
//!
//! This crate does no I/O and holds no locks. The runtime wraps a [`CapacityLedger`] in whatever
//! synchronisation it needs; everything here is plain arithmetic that can be tested exhaustively.
//!
//! Two kinds of reservation share one capacity:
//! - *active*: a sandbox a user asked for and is using;
//! - *warm*: a sandbox restored ahead of demand, sitting in a warm pool.
//!
//! Warm reservations are second-class: admission may evict them to make room for an active
//! request ([`CapacityLedger::shortfall_after_evicting_warm`]), never the other way round.

use std::fmt;

use firkin_types::Size;
use serde::{Deserialize, Serialize};

/// CPUs, memory and disk. Used both for capacities and for what one sandbox asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceBudget {
    pub cpus: u32,
    pub memory: Size,
    pub disk: Size,
}

impl ResourceBudget {
    pub const ZERO: ResourceBudget = ResourceBudget {
        cpus: 0,
        memory: Size::ZERO,
        disk: Size::ZERO,
    };

    pub const fn new(cpus: u32, memory: Size, disk: Size) -> Self {
        Self { cpus, memory, disk }
    }

    pub const fn cpus(&self) -> u32 {
        self.cpus
    }

    pub const fn memory(&self) -> Size {
        self.memory
    }

    pub const fn disk(&self) -> Size {
        self.disk
    }

    pub const fn is_zero(&self) -> bool {
        self.cpus == 0 && self.memory.is_zero() && self.disk.is_zero()
    }

    pub const fn saturating_add(self, other: Self) -> Self {
        Self {
            cpus: self.cpus.saturating_add(other.cpus),
            memory: self.memory.saturating_add(other.memory),
            disk: self.disk.saturating_add(other.disk),
        }
    }

    pub const fn saturating_sub(self, other: Self) -> Self {
        Self {
            cpus: self.cpus.saturating_sub(other.cpus),
            memory: self.memory.saturating_sub(other.memory),
            disk: self.disk.saturating_sub(other.disk),
        }
    }

    /// The first resource (CPU, then memory, then disk) for which `self` exceeds `available`.
    pub fn first_shortfall(&self, available: &ResourceBudget) -> Option<CapacityError> {
        if self.cpus > available.cpus {
            return Some(CapacityError::Cpu {
                requested: self.cpus,
                available: available.cpus,
            });
        }
        if self.memory > available.memory {
            return Some(CapacityError::Memory {
                requested: self.memory,
                available: available.memory,
            });
        }
        if self.disk > available.disk {
            return Some(CapacityError::Disk {
                requested: self.disk,
                available: available.disk,
            });
        }
        None
    }

    /// Whether every component of `self` fits into `other`.
    pub fn fits_within(&self, other: &ResourceBudget) -> bool {
        self.first_shortfall(other).is_none()
    }
}

impl fmt::Display for ResourceBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cpu, {} memory, {} disk",
            self.cpus, self.memory, self.disk
        )
    }
}

/// A request does not fit. Resources are checked in the order CPU, memory, disk, and the first
/// that falls short is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("insufficient cpu: requested {requested}, available {available}")]
    Cpu { requested: u32, available: u32 },
    #[error("insufficient memory: requested {requested}, available {available}")]
    Memory { requested: Size, available: Size },
    #[error("insufficient disk: requested {requested}, available {available}")]
    Disk { requested: Size, available: Size },
}

/// Which pool of reservations an operation touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationKind {
    Active,
    Warm,
}

impl fmt::Display for ReservationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReservationKind::Active => "active",
            ReservationKind::Warm => "warm",
        })
    }
}

/// Giving back more than is held. This is always a bookkeeping bug in the caller; the ledger
/// refuses it instead of letting a counter wrap or silently clamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot release {released} of {kind} capacity: only {held} is reserved")]
pub struct ReleaseError {
    pub kind: ReservationKind,
    pub released: ResourceBudget,
    pub held: ResourceBudget,
}

/// Total capacity with its active and warm reservations.
///
/// Invariant: `active + warm <= capacity` component-wise, except after
/// [`CapacityLedger::set_capacity`] shrinks capacity below what is held (then nothing new is
/// admitted until enough is released).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacityLedger {
    capacity: ResourceBudget,
    active: ResourceBudget,
    warm: ResourceBudget,
}

impl CapacityLedger {
    pub fn new(capacity: ResourceBudget) -> Self {
        Self {
            capacity,
            active: ResourceBudget::ZERO,
            warm: ResourceBudget::ZERO,
        }
    }

    pub fn capacity(&self) -> ResourceBudget {
        self.capacity
    }

    pub fn active(&self) -> ResourceBudget {
        self.active
    }

    pub fn warm(&self) -> ResourceBudget {
        self.warm
    }

    /// Capacity not held by any reservation.
    pub fn available(&self) -> ResourceBudget {
        self.capacity
            .saturating_sub(self.active)
            .saturating_sub(self.warm)
    }

    /// Changes the total, for example after the host's memory was re-measured.
    pub fn set_capacity(&mut self, capacity: ResourceBudget) {
        self.capacity = capacity;
    }

    /// Would `budget` fit now, as an active reservation?
    pub fn check_active(&self, budget: ResourceBudget) -> Result<(), CapacityError> {
        budget
            .first_shortfall(&self.available())
            .map_or(Ok(()), Err)
    }

    pub fn reserve_active(&mut self, budget: ResourceBudget) -> Result<(), CapacityError> {
        self.check_active(budget)?;
        self.active = self.active.saturating_add(budget);
        Ok(())
    }

    pub fn release_active(&mut self, budget: ResourceBudget) -> Result<(), ReleaseError> {
        self.active = checked_release(ReservationKind::Active, self.active, budget)?;
        Ok(())
    }

    pub fn reserve_warm(&mut self, budget: ResourceBudget) -> Result<(), CapacityError> {
        budget
            .first_shortfall(&self.available())
            .map_or(Ok(()), Err)?;
        self.warm = self.warm.saturating_add(budget);
        Ok(())
    }

    pub fn release_warm(&mut self, budget: ResourceBudget) -> Result<(), ReleaseError> {
        self.warm = checked_release(ReservationKind::Warm, self.warm, budget)?;
        Ok(())
    }

    /// Moves a warm reservation to active (a warm-pool checkout). Nothing new is taken from the
    /// free capacity, so this cannot fail for lack of capacity; it fails only if `budget` is not
    /// actually held as warm.
    pub fn promote_warm(&mut self, budget: ResourceBudget) -> Result<(), ReleaseError> {
        self.warm = checked_release(ReservationKind::Warm, self.warm, budget)?;
        self.active = self.active.saturating_add(budget);
        Ok(())
    }

    /// What an active request would still lack if every warm reservation were evicted; `None`
    /// means evicting warm entries can make it fit.
    pub fn shortfall_after_evicting_warm(&self, budget: ResourceBudget) -> Option<CapacityError> {
        let without_warm = self.capacity.saturating_sub(self.active);
        budget.first_shortfall(&without_warm)
    }
}

fn checked_release(
    kind: ReservationKind,
    held: ResourceBudget,
    released: ResourceBudget,
) -> Result<ResourceBudget, ReleaseError> {
    if released.fits_within(&held) {
        Ok(held.saturating_sub(released))
    } else {
        Err(ReleaseError {
            kind,
            released,
            held,
        })
    }
}

/// How a request that may have to wait is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Requests allowed to wait for capacity at once; past this, refuse immediately.
    pub max_pending: usize,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self { max_pending: 64 }
    }
}

/// What to do with an active request right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdmissionDecision {
    /// It fits in free capacity.
    Admit,
    /// It fits once warm-pool entries holding `warm_to_evict` (at least) are evicted.
    AdmitAfterEvictingWarm,
    /// It cannot fit now but could later; wait at this 1-based queue position.
    Queue { position: usize },
    /// It can never fit, even on an empty host.
    RejectOversized(CapacityError),
    /// It would have to wait but the queue is full.
    RejectQueueFull { max_pending: usize },
}

/// Decides the fate of an active request given the ledger and how many requests already wait.
pub fn plan_admission(
    ledger: &CapacityLedger,
    budget: ResourceBudget,
    pending: usize,
    policy: QueuePolicy,
) -> AdmissionDecision {
    if let Some(err) = budget.first_shortfall(&ledger.capacity()) {
        return AdmissionDecision::RejectOversized(err);
    }
    // Waiting requests come first: a newcomer that happens to fit must not overtake them,
    // or a stream of small requests could starve a large one forever.
    if pending == 0 {
        if ledger.check_active(budget).is_ok() {
            return AdmissionDecision::Admit;
        }
        if ledger.shortfall_after_evicting_warm(budget).is_none() {
            return AdmissionDecision::AdmitAfterEvictingWarm;
        }
    }
    if pending >= policy.max_pending {
        return AdmissionDecision::RejectQueueFull {
            max_pending: policy.max_pending,
        };
    }
    AdmissionDecision::Queue {
        position: pending + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> CapacityLedger {
        CapacityLedger::new(ResourceBudget::new(8, Size::gib(64), Size::gib(512)))
    }

    fn small() -> ResourceBudget {
        ResourceBudget::new(2, Size::gib(8), Size::gib(64))
    }

    #[test]
    fn reserve_and_release_round_trip() {
        let mut l = host();
        assert_eq!(l.reserve_active(small()), Ok(()));
        assert_eq!(l.active(), small());
        assert_eq!(
            l.available(),
            ResourceBudget::new(6, Size::gib(56), Size::gib(448))
        );
        assert_eq!(l.release_active(small()), Ok(()));
        assert_eq!(l.active(), ResourceBudget::ZERO);
    }

    #[test]
    fn cpu_is_checked_first() {
        let mut l = host();
        let err = l.reserve_active(ResourceBudget::new(9, Size::tib(1), Size::tib(9)));
        assert_eq!(
            err,
            Err(CapacityError::Cpu {
                requested: 9,
                available: 8
            })
        );
        assert_eq!(l.active(), ResourceBudget::ZERO);
    }

    #[test]
    fn memory_is_checked_before_disk() {
        let mut l = host();
        let err = l.reserve_active(ResourceBudget::new(1, Size::gib(65), Size::tib(9)));
        assert_eq!(
            err,
            Err(CapacityError::Memory {
                requested: Size::gib(65),
                available: Size::gib(64)
            })
        );
    }

    #[test]
    fn disk_is_checked_last() {
        let mut l = host();
        let err = l.reserve_active(ResourceBudget::new(1, Size::gib(1), Size::gib(513)));
        assert_eq!(
            err,
            Err(CapacityError::Disk {
                requested: Size::gib(513),
                available: Size::gib(512)
            })
        );
    }

    #[test]
    fn warm_reservations_reduce_what_active_can_take() {
        let mut l = host();
        for _ in 0..3 {
            assert_eq!(l.reserve_warm(small()), Ok(()));
        }
        assert_eq!(l.reserve_active(small()), Ok(()));
        assert_eq!(
            l.reserve_active(small()),
            Err(CapacityError::Cpu {
                requested: 2,
                available: 0
            })
        );
        assert_eq!(l.shortfall_after_evicting_warm(small()), None);
    }

    #[test]
    fn release_more_than_reserved_is_refused_and_changes_nothing() {
        let mut l = host();
        assert_eq!(l.reserve_active(small()), Ok(()));
        let before = l.clone();
        let err = l.release_active(ResourceBudget::new(3, Size::gib(8), Size::gib(64)));
        assert!(matches!(
            err,
            Err(ReleaseError {
                kind: ReservationKind::Active,
                ..
            })
        ));
        assert_eq!(l, before);
        // A component-wise partial overrelease (memory only) is refused too.
        assert!(
            l.release_active(ResourceBudget::new(1, Size::gib(9), Size::ZERO))
                .is_err()
        );
        assert_eq!(l, before);
    }

    #[test]
    fn ledger_never_underflows_on_repeated_release() {
        let mut l = host();
        assert_eq!(l.reserve_warm(small()), Ok(()));
        assert_eq!(l.release_warm(small()), Ok(()));
        assert!(l.release_warm(small()).is_err());
        assert_eq!(l.warm(), ResourceBudget::ZERO);
        assert!(l.release_active(small()).is_err());
        assert_eq!(l.active(), ResourceBudget::ZERO);
        assert_eq!(l.available(), l.capacity());
    }

    #[test]
    fn promote_moves_warm_to_active_without_new_capacity() {
        let mut l = host();
        for _ in 0..4 {
            assert_eq!(l.reserve_warm(small()), Ok(()));
        }
        assert_eq!(l.available().cpus, 0);
        assert_eq!(l.promote_warm(small()), Ok(()));
        assert_eq!(l.active(), small());
        assert_eq!(l.warm().cpus, 6);
        let mut empty = host();
        assert!(empty.promote_warm(small()).is_err());
        assert_eq!(empty.active(), ResourceBudget::ZERO);
    }

    #[test]
    fn shrinking_capacity_below_holdings_saturates_available() {
        let mut l = host();
        assert_eq!(l.reserve_active(small()), Ok(()));
        l.set_capacity(ResourceBudget::new(1, Size::gib(1), Size::gib(1)));
        assert_eq!(l.available(), ResourceBudget::ZERO);
        assert!(
            l.reserve_active(ResourceBudget::new(1, Size::ZERO, Size::ZERO))
                .is_err()
        );
    }

    #[test]
    fn admission_plans() {
        let policy = QueuePolicy { max_pending: 2 };
        let mut l = host();
        assert_eq!(
            plan_admission(&l, small(), 0, policy),
            AdmissionDecision::Admit
        );
        let huge = ResourceBudget::new(16, Size::gib(1), Size::gib(1));
        assert!(matches!(
            plan_admission(&l, huge, 0, policy),
            AdmissionDecision::RejectOversized(CapacityError::Cpu { .. })
        ));
        for _ in 0..4 {
            assert_eq!(l.reserve_active(small()), Ok(()));
        }
        assert_eq!(
            plan_admission(&l, small(), 0, policy),
            AdmissionDecision::Queue { position: 1 }
        );
        assert_eq!(
            plan_admission(&l, small(), 1, policy),
            AdmissionDecision::Queue { position: 2 }
        );
        assert_eq!(
            plan_admission(&l, small(), 2, policy),
            AdmissionDecision::RejectQueueFull { max_pending: 2 }
        );
    }

    #[test]
    fn newcomers_do_not_overtake_waiters() {
        let policy = QueuePolicy::default();
        let l = host();
        assert_eq!(
            plan_admission(&l, small(), 3, policy),
            AdmissionDecision::Queue { position: 4 }
        );
    }

    #[test]
    fn warm_entries_can_be_evicted_for_active_requests() {
        let policy = QueuePolicy::default();
        let mut l = host();
        for _ in 0..4 {
            assert_eq!(l.reserve_warm(small()), Ok(()));
        }
        assert_eq!(
            plan_admission(&l, small(), 0, policy),
            AdmissionDecision::AdmitAfterEvictingWarm
        );
    }
}
