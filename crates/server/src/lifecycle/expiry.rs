//! The background side of sandbox lifetimes: timeouts, VMs that exit on their own, records
//! the runtime no longer backs, and the shutdown of the server.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use firkin_types::SandboxId;

use crate::app::{App, now_ms};
use crate::store::{RecordState, SandboxRecord};

/// How long a shutdown spends pausing auto-pause sandboxes.
const SHUTDOWN_PAUSE_LIMIT: Duration = Duration::from_secs(30);

impl App {
    /// One pass of the timeout loop: kill (or pause) every running sandbox past its end.
    pub(crate) fn expire_due(self: &Arc<Self>) {
        let due = match self.store.expired(now_ms()) {
            Ok(d) => d,
            Err(err) => {
                tracing::error!(%err, "reading expired sandboxes");
                return;
            }
        };
        for (raw, auto_pause) in due {
            let Ok(id) = SandboxId::new(&raw) else {
                continue;
            };
            if !self
                .expiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.clone())
            {
                continue;
            }
            let app = Arc::clone(self);
            tokio::spawn(async move {
                app.expire(&id, auto_pause).await;
                app.expiring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
            });
        }
    }

    async fn expire(&self, id: &SandboxId, auto_pause: bool) {
        let _guard = self.locks.lock(id).await;
        let Ok(Some(record)) = self.store.sandbox(id) else {
            return;
        };
        // set_timeout may have moved the end while we waited for the lock.
        if record.state != RecordState::Running || record.end_ms > now_ms() {
            return;
        }
        if auto_pause {
            tracing::info!(sandbox = %id, "timeout: pausing");
            match self.pause_locked(&record).await {
                Ok(()) => return,
                Err(err) if err.status == http::StatusCode::NOT_FOUND => return,
                Err(err) => {
                    tracing::warn!(sandbox = %id, %err, "timeout pause failed; killing instead");
                }
            }
        } else {
            tracing::info!(sandbox = %id, "timeout: killing");
        }
        self.kill_locked(&record).await;
    }

    // ------------------------------------------------------------------ exits

    /// A sandbox's VM died on its own: forget the sandbox.
    pub(crate) async fn on_exit(&self, id: &SandboxId, reason: &str) {
        let _guard = self.locks.lock(id).await;
        let Ok(Some(record)) = self.store.sandbox(id) else {
            return;
        };
        if record.state == RecordState::Running && !self.rt.is_running(id) {
            tracing::warn!(sandbox = %id, %reason, "sandbox VM exited; removing the sandbox");
            self.forget(id);
        }
    }

    /// Removes records of running sandboxes the runtime no longer has, and stale `starting`
    /// records (whose create task is gone: a create holds the sandbox lock throughout).
    pub(crate) fn reconcile(&self) {
        let records = match self.store.sandboxes() {
            Ok(r) => r,
            Err(err) => {
                tracing::error!(%err, "reconcile: reading sandboxes");
                return;
            }
        };
        let stale = |r: &SandboxRecord| match r.state {
            RecordState::Running => !self.rt.is_running(&r.sandbox_id),
            RecordState::Starting => true,
            RecordState::Paused => false,
        };
        for r in records {
            // Checked again under the lock below: this first look is only to skip the rest.
            if !stale(&r) {
                continue;
            }
            // Busy sandboxes are being changed right now; look again next time.
            let Some(_guard) = self.locks.try_lock(&r.sandbox_id) else {
                continue;
            };
            let Ok(Some(now)) = self.store.sandbox(&r.sandbox_id) else {
                continue;
            };
            if stale(&now) {
                tracing::warn!(sandbox = %r.sandbox_id, state = now.state.as_str(), "removing a sandbox the runtime does not have");
                if now.state == RecordState::Running {
                    // Make sure nothing is left in the runtime either.
                    let rt = Arc::clone(&self.rt);
                    let id = r.sandbox_id.clone();
                    tokio::spawn(async move {
                        let _ = rt.kill(&id).await;
                    });
                }
                self.forget(&r.sandbox_id);
            }
        }
        self.idempotency.expire();
    }

    /// Stops every VM. Sandboxes that asked to be paused on timeout are paused (so a restart
    /// or upgrade of the server does not lose them), within a bounded time; the others are gone
    /// afterwards. Paused ones stay.
    pub(crate) async fn shutdown(&self) {
        let pausable: Vec<SandboxRecord> = self
            .store
            .sandboxes()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.state == RecordState::Running && r.auto_pause)
            .collect();
        if !pausable.is_empty() {
            tracing::info!(
                n = pausable.len(),
                "pausing auto-pause sandboxes before stopping"
            );
            let pauses = pausable.iter().map(|r| async move {
                let _guard = self.locks.lock(&r.sandbox_id).await;
                if let Err(err) = self.pause_locked(r).await {
                    tracing::warn!(sandbox = %r.sandbox_id, %err, "could not pause at shutdown");
                }
            });
            if tokio::time::timeout(SHUTDOWN_PAUSE_LIMIT, futures::future::join_all(pauses))
                .await
                .is_err()
            {
                tracing::warn!("pausing at shutdown took too long; stopping the rest");
            }
        }
        self.rt.shutdown().await;
        if let Ok(records) = self.store.sandboxes() {
            for r in records.iter().filter(|r| r.state != RecordState::Paused) {
                self.forget(&r.sandbox_id);
            }
        }
    }
}

/// Starts the loops that drive lifetimes: the timeout tick (with a reconcile every 20 ticks,
/// and the metrics sweep at its own cadence) and the reaction to VMs that exit.
pub(crate) fn spawn_background(app: &Arc<App>) -> Vec<tokio::task::JoinHandle<()>> {
    app.rt.spawn_warm_pool();
    let ticker = {
        let app = Arc::clone(app);
        tokio::spawn(async move {
            let mut n: u64 = 0;
            let mut tick = tokio::time::interval(app.config.tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                app.expire_due();
                app.sample_metrics_due();
                n += 1;
                if n.is_multiple_of(20) {
                    app.reconcile();
                }
            }
        })
    };
    let exits = {
        let app = Arc::clone(app);
        let mut rx = app.rt.exits();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(exit) => app.on_exit(&exit.sandbox_id, &exit.reason).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "missed sandbox exit events; reconciling");
                        app.reconcile();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    };
    vec![ticker, exits]
}
