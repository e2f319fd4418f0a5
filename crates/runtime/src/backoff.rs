//! Pacing and reporting of background work that keeps failing (the warm-pool refill).
//!
//! A refill that failed (a template that no longer verifies, an agent binary that cannot start,
//! a disk below its floor) nearly always fails the same way on the next attempt. Retrying every
//! few seconds forever costs a restore attempt each time on a small host and buries the log in
//! identical warnings, so a failing key is retried after a delay that doubles with each
//! consecutive failure up to a cap, and each distinct error is worth one warning per streak.
//!
//! Everything here is plain state driven by the caller's clock, so the policy is testable
//! without timers. The clock is tokio's, which tests can pause and advance.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

/// Distinct messages remembered per streak. Errors that embed something random (a run
/// directory) would otherwise grow the list without end; past this, the oldest is forgotten
/// and may be warned about again, which the backoff keeps rare.
const REMEMBERED_ERRORS: usize = 16;

/// Delays between attempts after consecutive failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay, however many failures came before.
    pub max: Duration,
}

impl BackoffPolicy {
    /// The warm-pool refill's: 1 s, doubling, at most 5 min. Five minutes bounds how long a
    /// fixed fault (freed disk, a replaced binary) goes unnoticed by a pool nobody nudges.
    pub const WARM_POOL: Self = Self {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(300),
    };

    /// The delay after the `failures`-th consecutive failure (counting from 1).
    pub fn delay(&self, failures: u32) -> Duration {
        // 2^31 s is far past any sensible cap; stopping there keeps the shift defined.
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << doublings).min(self.max)
    }
}

/// How a failure should be logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReport {
    /// A message not seen in this streak: worth a warning.
    New,
    /// A message already reported in this streak; `times` counts it, this one included.
    Repeat { times: u32 },
}

/// A streak of consecutive failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failing {
    /// The latest failure's message.
    pub error: String,
    /// When the streak began (wall clock, for status pages).
    pub since: OffsetDateTime,
    pub consecutive_failures: u32,
    last_attempt: Instant,
    next_retry: Instant,
    seen: Vec<(String, u32)>,
}

impl Failing {
    /// How long until the next attempt is due, from `now`.
    pub fn retry_in(&self, now: Instant) -> Duration {
        self.next_retry.saturating_duration_since(now)
    }
}

/// The retry state of one key: healthy, or failing with a schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retry {
    failing: Option<Failing>,
}

impl Retry {
    pub fn failing(&self) -> Option<&Failing> {
        self.failing.as_ref()
    }

    /// Whether an attempt may be made at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.failing.as_ref().is_none_or(|f| f.next_retry <= now)
    }

    /// When the next attempt is due, if the key is failing.
    pub fn next_retry(&self) -> Option<Instant> {
        self.failing.as_ref().map(|f| f.next_retry)
    }

    /// Records an attempt made at `now` that failed with `error`, schedules the next one and
    /// says how to log this failure.
    pub fn failed(
        &mut self,
        policy: &BackoffPolicy,
        error: String,
        now: Instant,
        wall: OffsetDateTime,
    ) -> FailureReport {
        let f = self.failing.get_or_insert_with(|| Failing {
            error: String::new(),
            since: wall,
            consecutive_failures: 0,
            last_attempt: now,
            next_retry: now,
            seen: Vec::new(),
        });
        f.consecutive_failures = f.consecutive_failures.saturating_add(1);
        f.last_attempt = now;
        f.next_retry = now + policy.delay(f.consecutive_failures);
        let report = match f.seen.iter_mut().find(|(e, _)| *e == error) {
            Some((_, times)) => {
                *times = times.saturating_add(1);
                FailureReport::Repeat { times: *times }
            }
            None => {
                if f.seen.len() == REMEMBERED_ERRORS {
                    f.seen.remove(0);
                }
                f.seen.push((error.clone(), 1));
                FailureReport::New
            }
        };
        f.error = error;
        report
    }

    /// Records a success; returns the streak it ended, if any.
    pub fn succeeded(&mut self) -> Option<Failing> {
        self.failing.take()
    }

    /// Something changed that may have fixed the fault (the pool was set again): bring the next
    /// attempt forward, but to no earlier than half the current delay after the last attempt.
    /// However often it is nudged, a key that keeps failing is still retried at exponentially
    /// growing intervals.
    pub fn nudge(&mut self, policy: &BackoffPolicy) {
        if let Some(f) = &mut self.failing {
            let half = policy.delay(f.consecutive_failures) / 2;
            f.next_retry = f.next_retry.min(f.last_attempt + half);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const P: BackoffPolicy = BackoffPolicy::WARM_POOL;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn delays_double_from_one_second_to_the_cap() {
        let delays: Vec<u64> = (1..=11).map(|n| P.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(P.delay(0), secs(1));
        assert_eq!(P.delay(u32::MAX), secs(300));
    }

    #[test]
    fn a_failing_key_is_not_due_until_its_delay_has_passed() {
        let t0 = Instant::now();
        let wall = OffsetDateTime::UNIX_EPOCH;
        let mut r = Retry::default();
        assert!(r.is_due(t0));
        assert_eq!(r.next_retry(), None);
        let mut at = t0;
        for n in 1..=4u32 {
            r.failed(&P, "boom".into(), at, wall);
            let delay = P.delay(n);
            assert!(!r.is_due(at));
            assert!(!r.is_due(at + delay - Duration::from_millis(1)));
            assert!(r.is_due(at + delay));
            assert_eq!(r.next_retry(), Some(at + delay));
            assert_eq!(r.failing().unwrap().retry_in(at), delay);
            assert_eq!(r.failing().unwrap().consecutive_failures, n);
            at += delay;
        }
        assert_eq!(
            r.failing().unwrap().since,
            wall,
            "the streak keeps its start"
        );
    }

    #[test]
    fn each_distinct_error_is_new_once_per_streak() {
        let t = Instant::now();
        let wall = OffsetDateTime::UNIX_EPOCH;
        let mut r = Retry::default();
        let mut fail = |e: &str| r.failed(&P, e.into(), t, wall);
        assert_eq!(fail("a"), FailureReport::New);
        assert_eq!(fail("a"), FailureReport::Repeat { times: 2 });
        assert_eq!(fail("b"), FailureReport::New);
        assert_eq!(fail("a"), FailureReport::Repeat { times: 3 });
        assert_eq!(fail("b"), FailureReport::Repeat { times: 2 });
        assert_eq!(r.failing().unwrap().error, "b");
        assert_eq!(r.failing().unwrap().consecutive_failures, 5);

        let ended = r.succeeded().unwrap();
        assert_eq!(ended.consecutive_failures, 5);
        assert!(r.is_due(t) && r.failing().is_none());
        assert_eq!(r.succeeded(), None, "only one recovery per streak");
        // A new streak warns again, and starts over at the shortest delay.
        assert_eq!(r.failed(&P, "a".into(), t, wall), FailureReport::New);
        assert_eq!(r.next_retry(), Some(t + secs(1)));
    }

    #[test]
    fn errors_past_the_remembered_limit_are_forgotten_oldest_first() {
        let t = Instant::now();
        let wall = OffsetDateTime::UNIX_EPOCH;
        let mut r = Retry::default();
        for i in 0..=REMEMBERED_ERRORS {
            assert_eq!(r.failed(&P, format!("e{i}"), t, wall), FailureReport::New);
        }
        assert_eq!(r.failed(&P, "e0".into(), t, wall), FailureReport::New);
        let last = format!("e{REMEMBERED_ERRORS}");
        assert_eq!(
            r.failed(&P, last, t, wall),
            FailureReport::Repeat { times: 2 }
        );
    }

    #[test]
    fn nudges_bring_a_retry_forward_but_keep_it_exponential() {
        let t0 = Instant::now();
        let wall = OffsetDateTime::UNIX_EPOCH;
        let mut healthy = Retry::default();
        healthy.nudge(&P);
        assert_eq!(healthy, Retry::default(), "nothing to bring forward");

        // Nudged after every failure, the gaps between attempts are half the delays: still
        // doubling, still capped.
        let mut r = Retry::default();
        let mut at = t0;
        let mut gaps = Vec::new();
        for _ in 0..12 {
            r.failed(&P, "boom".into(), at, wall);
            r.nudge(&P);
            r.nudge(&P);
            let next = r.next_retry().unwrap();
            gaps.push((next - at).as_millis());
            at = next;
        }
        assert_eq!(
            gaps,
            [
                500, 1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 150_000, 150_000,
                150_000
            ]
        );
    }

    #[test]
    fn a_nudge_never_postpones_a_retry() {
        let t0 = Instant::now();
        let mut r = Retry::default();
        r.failed(&P, "boom".into(), t0, OffsetDateTime::UNIX_EPOCH);
        r.nudge(&P);
        let nudged = r.next_retry().unwrap();
        r.nudge(&P);
        assert_eq!(r.next_retry(), Some(nudged));
        assert!(nudged <= t0 + P.delay(1));
    }
}
