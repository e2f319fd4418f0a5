//! The warm pool: checking out a ready sandbox on create, pool targets and status, and the
//! refill loop that restores entries in the background.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use firkin_artifacts::SnapshotArtifactManifest;

use super::admission::{Held, WarmAdmission, WarmRefusal, grant_waiters, into_runtime_error};
use super::{
    RuntimeError, RuntimeLauncher, SandboxRuntime, StartSandbox, StartedSandbox, TemplateSnapshot,
    Warm, lock, stop_all,
};
use crate::gates::Gates;
use crate::samples::BenchmarkSample;
use crate::session::{EnvdInit, SandboxSession};
use crate::warm_pool::WarmPoolStatus;

impl<L> SandboxRuntime<L>
where
    L: RuntimeLauncher,
{
    pub(super) async fn try_warm_checkout(
        &self,
        template: &TemplateSnapshot,
        req: &StartSandbox,
        started: Instant,
    ) -> Result<Option<StartedSandbox>, RuntimeError> {
        loop {
            let warm = {
                let mut st = lock(&self.inner.state);
                // Waiting creates have first claim on capacity; a warm checkout does not take new
                // capacity, so it may go ahead of them.
                let popped = st
                    .warm
                    .get_mut(&template.pool_key())
                    .and_then(VecDeque::pop_front);
                match popped {
                    Some(w) => match st.ledger.promote_warm(w.budget) {
                        Ok(()) => w,
                        Err(err) => {
                            tracing::error!(%err, "warm entry without warm reservation");
                            continue;
                        }
                    },
                    None => return Ok(None),
                }
            };
            let held = Held::new(Arc::clone(&self.inner), warm.budget);
            if !warm.session.is_alive() {
                drop(held);
                continue;
            }
            let checkout = started.elapsed();
            let init = EnvdInit {
                require_template_processes_only: true,
                ..req.init.clone()
            };
            if let Some(policy) = &req.network
                && let Err(err) =
                    super::apply_egress(&req.sandbox_id, warm.session.as_ref(), policy).await
            {
                let _ = warm.session.stop().await;
                drop(held);
                return Err(err);
            }
            if let Err(err) = warm.session.init(&init).await {
                tracing::warn!(%err, "warm sandbox refused /init; discarding it");
                let _ = warm.session.stop().await;
                drop(held);
                continue;
            }
            tracing::debug!(
                sandbox = %req.sandbox_id,
                checkout_ms = checkout.as_secs_f64() * 1e3,
                init_ms = (started.elapsed() - checkout).as_secs_f64() * 1e3,
                "warm checkout"
            );
            let envd_addr = warm.session.envd_addr();
            let pid = warm.session.pid();
            self.register(&req.sandbox_id, warm.session, warm.budget);
            held.disarm();
            return Ok(Some(StartedSandbox {
                sandbox_id: req.sandbox_id.clone(),
                envd_addr,
                pid,
                budget: warm.budget,
                from_warm_pool: true,
                samples: vec![
                    BenchmarkSample::latency("warm_pool_checkout", checkout),
                    BenchmarkSample::latency("sandbox_start", started.elapsed()),
                ],
            }));
        }
    }

    /// Keeps `depth` restored sandboxes of `template` ready (0 removes the target). A new build
    /// of a template replaces the pool of its earlier builds: their snapshots are pruned after
    /// a rebuild, so refilling them could only fail, and their entries can never be checked
    /// out. Call [`SandboxRuntime::run_warm_pool`] once to run the refill loop.
    pub fn set_warm_pool(&self, template: TemplateSnapshot, depth: usize) {
        let key = template.pool_key();
        let mut targets = lock(&self.inner.pool_targets);
        let superseded: Vec<PathBuf> = targets
            .iter()
            .filter(|(k, (t, _))| **k != key && t.template_id == template.template_id)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &superseded {
            targets.remove(k);
        }
        if depth == 0 {
            targets.remove(&key);
        } else {
            targets.insert(key.clone(), (template, depth));
        }
        drop(targets);
        let mut st = lock(&self.inner.state);
        let mut stale = Vec::new();
        for k in &superseded {
            for w in st.warm.remove(k).unwrap_or_default() {
                let _ = st.ledger.release_warm(w.budget);
                stale.push(w.session);
            }
        }
        let evicted = grant_waiters(&mut st);
        drop(st);
        stop_all(stale);
        stop_all(evicted);
        // Whoever sets a pool again may have fixed what failed it.
        lock(&self.inner.pool_health).nudge(&key);
        self.inner.refill.notify_one();
    }

    /// Every warm pool: its target, its ready entries and whether its refills are failing.
    pub fn warm_pools(&self) -> Vec<WarmPoolStatus> {
        let targets: Vec<(TemplateSnapshot, usize)> =
            lock(&self.inner.pool_targets).values().cloned().collect();
        let ready: Vec<usize> = {
            let st = lock(&self.inner.state);
            let alive =
                |q: &VecDeque<Warm<L::Session>>| q.iter().filter(|w| w.session.is_alive()).count();
            targets
                .iter()
                .map(|(t, _)| st.warm.get(&t.pool_key()).map_or(0, alive))
                .collect()
        };
        let health = lock(&self.inner.pool_health);
        let now = tokio::time::Instant::now();
        let mut pools: Vec<WarmPoolStatus> = targets
            .into_iter()
            .zip(ready)
            .map(|((t, target), ready)| WarmPoolStatus {
                failing: health.failure(&t.pool_key(), now),
                template_id: t.template_id,
                build_id: t.build_id,
                target,
                ready,
            })
            .collect();
        pools.sort_by(|a, b| a.template_id.cmp(&b.template_id));
        pools
    }

    /// The warm-pool refill loop: restores entries while targets are unmet, capacity is free,
    /// no create is waiting or in flight, and the warm-pool disk floor holds; a pool whose
    /// refills fail is retried with exponential backoff (1 s doubling to 5 min). Runs until the
    /// runtime is dropped by every other owner.
    pub async fn run_warm_pool(self) {
        // A dead warm entry or freed disk produces no event.
        const POLL: Duration = Duration::from_secs(5);
        let weak = Arc::downgrade(&self.inner);
        drop(self);
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let rt = SandboxRuntime { inner };
            let progressed = rt.refill_once().await;
            let notified = {
                let inner = Arc::clone(&rt.inner);
                drop(rt);
                async move {
                    let n = inner.refill.notified();
                    // Also wake when a failing pool's backoff ends. Earlier wake-ups (creates,
                    // kills) find it not yet due, so they cannot shorten its backoff.
                    let now = tokio::time::Instant::now();
                    let wait = lock(&inner.pool_health)
                        .next_due()
                        .filter(|due| *due > now)
                        .map_or(POLL, |due| (due - now).min(POLL));
                    let _ = tokio::time::timeout(wait, n).await;
                }
            };
            if !progressed {
                notified.await;
            }
        }
    }

    /// One refill step. Returns whether it restored an entry.
    pub async fn refill_once(&self) -> bool {
        let targets: Vec<(TemplateSnapshot, usize)> =
            lock(&self.inner.pool_targets).values().cloned().collect();
        lock(&self.inner.pool_health)
            .retain(|key| targets.iter().any(|(t, _)| t.pool_key() == key));
        for (template, depth) in targets {
            let key = template.pool_key();
            let due = lock(&self.inner.pool_health).is_due(&key, tokio::time::Instant::now());
            {
                let mut st = lock(&self.inner.state);
                // Drop dead entries first.
                if let Some(q) = st.warm.get_mut(&key) {
                    let (alive, dead): (VecDeque<_>, VecDeque<_>) =
                        q.drain(..).partition(|w| w.session.is_alive());
                    *q = alive;
                    let mut gone = Vec::new();
                    for d in dead {
                        let _ = st.ledger.release_warm(d.budget);
                        gone.push(d.session);
                    }
                    stop_all(gone);
                }
                let have = st.warm.get(&key).map_or(0, VecDeque::len);
                // A refill is a restore: on a small host it competes for CPU with the creates
                // in flight (a checked-out entry's /init took 45-100 ms instead of ~10 ms while
                // its replacement was being restored), so it waits until they are done.
                if have >= depth || !due || !st.waiters.is_empty() || !st.starting.is_empty() {
                    continue;
                }
            }
            let manifest =
                SnapshotArtifactManifest::base(template.template_id.as_str(), &template.descriptor);
            let mut probe = self.inner.config.disk_probe.clone();
            let mut launcher = self.inner.launcher.clone();
            let gates = Gates {
                manifest: &manifest,
                budget: template.budget,
                disk_floor: self.inner.config.warm_pool_disk_floor,
                disk_probe: &mut probe,
            };
            let outcome = gates
                .pass(
                    self.verify(&manifest, &template.integrity),
                    &mut WarmAdmission(&self.inner),
                    &mut launcher,
                )
                .await;
            match outcome {
                Ok(passed) => {
                    let session = Arc::new(passed.session);
                    session.warm_up().await;
                    lock(&self.inner.state)
                        .warm
                        .entry(key)
                        .or_default()
                        .push_back(Warm {
                            session,
                            budget: passed.held,
                        });
                    lock(&self.inner.pool_health).succeeded(&template);
                    return true;
                }
                Err(e) => match e.split_capacity() {
                    // No room, or a create arrived: not a failure of the pool.
                    Err(WarmRefusal::StoodAside | WarmRefusal::Full) => {}
                    Ok(e) => {
                        let err = into_runtime_error(e);
                        lock(&self.inner.pool_health).failed(&template, &err);
                    }
                },
            }
        }
        false
    }
}
