//! The warm pools' health: which pools' refills are failing, with what, and when each is
//! retried (see [`crate::backoff`]), and how their failures and recoveries are logged.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use firkin_types::TemplateId;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::backoff::{BackoffPolicy, FailureReport, Retry};
use crate::service::TemplateSnapshot;

/// One warm pool, for status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmPoolStatus {
    pub template_id: TemplateId,
    pub build_id: String,
    /// Entries the pool is meant to hold.
    pub target: usize,
    /// Entries it holds now.
    pub ready: usize,
    /// Set while its refills are failing.
    pub failing: Option<WarmPoolFailure>,
}

/// Why a warm pool is not being refilled, and when it is tried again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmPoolFailure {
    /// The latest refill's error.
    pub error: String,
    /// When the refills started failing.
    pub since: OffsetDateTime,
    pub consecutive_failures: u32,
    /// How long until the next refill attempt.
    pub next_retry_in: Duration,
}

/// Retry state of every warm pool, by pool key (the template's descriptor).
#[derive(Debug)]
pub(crate) struct PoolHealth {
    policy: BackoffPolicy,
    pools: HashMap<PathBuf, Retry>,
}

impl Default for PoolHealth {
    fn default() -> Self {
        Self {
            policy: BackoffPolicy::WARM_POOL,
            pools: HashMap::new(),
        }
    }
}

impl PoolHealth {
    /// Whether the pool at `key` may be refilled now (it is not waiting out a backoff).
    pub(crate) fn is_due(&self, key: &Path, now: Instant) -> bool {
        self.pools.get(key).is_none_or(|r| r.is_due(now))
    }

    /// The earliest time a failing pool is due again.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.pools.values().filter_map(Retry::next_retry).min()
    }

    pub(crate) fn failed(&mut self, template: &TemplateSnapshot, err: &dyn fmt::Display) {
        let policy = self.policy;
        let retry = self.pools.entry(template.descriptor.clone()).or_default();
        let now = Instant::now();
        let report = retry.failed(&policy, err.to_string(), now, OffsetDateTime::now_utc());
        let Some(f) = retry.failing() else { return };
        let retry_in = f.retry_in(now);
        let (template, build) = (&template.template_id, &template.build_id);
        match report {
            FailureReport::New => tracing::warn!(
                %template, %build, err = %f.error, failures = f.consecutive_failures, ?retry_in,
                "warm pool refill failed; retrying with backoff (repeats of this error are logged at debug)"
            ),
            FailureReport::Repeat { times } => tracing::debug!(
                %template, %build, err = %f.error, times, failures = f.consecutive_failures,
                ?retry_in, "warm pool refill failed again"
            ),
        }
    }

    pub(crate) fn succeeded(&mut self, template: &TemplateSnapshot) {
        let Some(ended) = self
            .pools
            .get_mut(&template.descriptor)
            .and_then(Retry::succeeded)
        else {
            return;
        };
        self.pools.remove(&template.descriptor);
        let failing_s = (OffsetDateTime::now_utc() - ended.since).as_seconds_f64();
        tracing::info!(
            template = %template.template_id,
            build = %template.build_id,
            failures = ended.consecutive_failures,
            failing_s,
            "warm pool refill recovered"
        );
    }

    /// The pool was set again: retry a failing refill sooner (within the backoff's bounds).
    pub(crate) fn nudge(&mut self, key: &Path) {
        let policy = self.policy;
        if let Some(r) = self.pools.get_mut(key) {
            r.nudge(&policy);
        }
    }

    /// Forgets pools that are no longer targeted.
    pub(crate) fn retain(&mut self, mut targeted: impl FnMut(&Path) -> bool) {
        self.pools.retain(|key, _| targeted(key));
    }

    pub(crate) fn failure(&self, key: &Path, now: Instant) -> Option<WarmPoolFailure> {
        let f = self.pools.get(key)?.failing()?;
        Some(WarmPoolFailure {
            error: f.error.clone(),
            since: f.since,
            consecutive_failures: f.consecutive_failures,
            next_retry_in: f.retry_in(now),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The refill loop's backoff and status as the runtime reports them, against a launcher
    //! double whose restores fail until told otherwise. The real launchers' failures are
    //! exercised by the server's tests.
    use std::io::Write;
    use std::sync::{Arc, Mutex, PoisonError};

    use firkin_admission::ResourceBudget;

    use super::*;
    use crate::SandboxRuntime;
    use crate::testing::{FakeLauncher, runtime, template, unit};

    fn only_pool(rt: &SandboxRuntime<FakeLauncher>) -> WarmPoolStatus {
        let pools = rt.warm_pools();
        assert_eq!(pools.len(), 1, "{pools:?}");
        pools.into_iter().next().unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_refill_backs_off_and_shows_in_status() {
        let dir = tempfile::tempdir().unwrap();
        let t = template(dir.path(), "b1");
        let launcher = FakeLauncher::default();
        launcher.fail_with(Some("qemu died"));
        let rt = runtime(launcher.clone(), 4);
        rt.set_warm_pool(t.clone(), 2);
        let pool = only_pool(&rt);
        assert_eq!(
            (pool.template_id.as_str(), pool.build_id.as_str()),
            ("base", "b1")
        );
        assert_eq!((pool.target, pool.ready, pool.failing), (2, 0, None));

        let started = OffsetDateTime::now_utc();
        assert!(!rt.refill_once().await);
        assert_eq!(launcher.attempts(), 1);
        assert_eq!(rt.capacity().warm, ResourceBudget::ZERO, "reservation kept");
        let failing = only_pool(&rt).failing.expect("the pool is failing");
        assert!(failing.error.contains("qemu died"), "{}", failing.error);
        assert_eq!(failing.consecutive_failures, 1);
        assert_eq!(failing.next_retry_in, secs(1));
        assert!(failing.since >= started - time::Duration::seconds(1));

        // Creates and kills wake the loop far more often than the backoff allows.
        assert!(!rt.refill_once().await);
        assert_eq!(launcher.attempts(), 1, "retried before its backoff ended");
        tokio::time::advance(secs(1)).await;
        assert!(!rt.refill_once().await);
        assert_eq!(launcher.attempts(), 2);
        let failing = only_pool(&rt).failing.unwrap();
        assert_eq!(
            (failing.consecutive_failures, failing.next_retry_in),
            (2, secs(2))
        );
        tokio::time::advance(secs(1)).await;
        assert!(!rt.refill_once().await);
        assert_eq!(launcher.attempts(), 2, "the second delay is 2 s");
        assert_eq!(only_pool(&rt).failing.unwrap().next_retry_in, secs(1));

        // Setting the pool again brings the retry forward to half the delay, no further.
        rt.set_warm_pool(t.clone(), 2);
        assert!(!rt.refill_once().await);
        assert_eq!(launcher.attempts(), 3);
        let failing = only_pool(&rt).failing.unwrap();
        assert_eq!(
            (failing.consecutive_failures, failing.next_retry_in),
            (3, secs(4))
        );
        rt.set_warm_pool(t.clone(), 2);
        assert_eq!(only_pool(&rt).failing.unwrap().next_retry_in, secs(2));
        assert!(!rt.refill_once().await);
        assert_eq!(launcher.attempts(), 3);

        launcher.fail_with(None);
        tokio::time::advance(secs(2)).await;
        assert!(rt.refill_once().await);
        let pool = only_pool(&rt);
        assert_eq!((pool.ready, pool.failing), (1, None), "recovered");
        assert!(rt.refill_once().await, "no backoff once it works");
        assert_eq!(only_pool(&rt).ready, 2);
        assert_eq!(launcher.attempts(), 5);
    }

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self, level: &str, message: &str) -> usize {
            let all = self.0.lock().unwrap().clone();
            String::from_utf8(all)
                .unwrap()
                .lines()
                .filter(|l| l.contains(level) && l.contains(message))
                .count()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_distinct_error_is_warned_once_and_the_recovery_logged() {
        let logs = Captured::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let dir = tempfile::tempdir().unwrap();
        let launcher = FakeLauncher::default();
        let rt = runtime(launcher.clone(), 4);
        rt.set_warm_pool(template(dir.path(), "b1"), 1);
        let attempt = async |error: Option<&str>| {
            launcher.fail_with(error);
            // Past the cap: every call is due.
            tokio::time::advance(BackoffPolicy::WARM_POOL.max).await;
            rt.refill_once().await
        };
        for _ in 0..3 {
            assert!(!attempt(Some("disk full")).await);
        }
        assert!(!attempt(Some("qemu died")).await);
        assert!(!attempt(Some("disk full")).await);
        assert_eq!(launcher.attempts(), 5);
        assert_eq!(logs.lines("WARN", "warm pool refill failed"), 2);
        assert_eq!(logs.lines("WARN", "disk full"), 1);
        assert_eq!(logs.lines("WARN", "qemu died"), 1);
        assert_eq!(logs.lines("DEBUG", "warm pool refill failed again"), 3);
        assert_eq!(logs.lines("DEBUG", "times=3"), 1);
        assert_eq!(logs.lines("INFO", "recovered"), 0);
        assert!(attempt(None).await);
        assert_eq!(logs.lines("INFO", "warm pool refill recovered"), 1);
        assert_eq!(logs.lines("INFO", "failures=5"), 1);
    }

    #[tokio::test]
    async fn a_new_build_replaces_the_pool_of_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (template(dir.path(), "b1"), template(dir.path(), "b2"));
        let launcher = FakeLauncher::default();
        let rt = runtime(launcher.clone(), 4);
        rt.set_warm_pool(old.clone(), 1);
        assert!(rt.refill_once().await);
        assert_eq!(rt.capacity().warm, unit());

        rt.set_warm_pool(new.clone(), 1);
        let pool = only_pool(&rt);
        assert_eq!((pool.build_id.as_str(), pool.ready), ("b2", 0));
        assert_eq!(
            rt.capacity().warm,
            ResourceBudget::ZERO,
            "old entry evicted"
        );
        assert!(rt.refill_once().await);
        assert!(!rt.refill_once().await, "only the new build is refilled");
        assert_eq!(rt.capacity().warm_sandboxes, 1);

        rt.set_warm_pool(new, 0);
        assert!(rt.warm_pools().is_empty());
    }
}
