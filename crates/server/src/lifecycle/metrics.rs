//! `GET /sandboxes/{id}/metrics`: samples of the sandbox's agent, taken at E2B's cadence and
//! kept in a bounded history per sandbox, so that `start`/`end` select a time range as on E2B.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use firkin_e2b_contract::ENVD_PORT;
use firkin_e2b_wire::SandboxMetric;
use firkin_types::SandboxId;
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::app::{App, rfc3339_ms};
use crate::error::ApiError;
use crate::store::{RecordState, SandboxRecord};

/// E2B samples a sandbox every 5 s; so does firkin.
pub(crate) const METRICS_CADENCE: Duration = Duration::from_secs(5);

/// Samples kept per sandbox: one hour at the cadence, about 80 KiB, however long it lives.
const HISTORY_CAP: usize = 720;

#[derive(Debug, Deserialize)]
struct EnvdMetrics {
    ts: i64,
    cpu_count: u32,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    #[serde(default)]
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

/// The `start`/`end` query of the metrics route (unix seconds, both inclusive, as the SDK
/// sends them).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub(crate) struct MetricsRange {
    pub(crate) start: Option<i64>,
    pub(crate) end: Option<i64>,
}

impl MetricsRange {
    fn is_given(self) -> bool {
        self.start.is_some() || self.end.is_some()
    }

    fn contains(self, ts: i64) -> bool {
        self.start.is_none_or(|s| ts >= s) && self.end.is_none_or(|e| ts <= e)
    }
}

#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<SandboxMetric>,
    /// A sample is being taken: the sweep does not start another one.
    in_flight: bool,
}

#[derive(Debug, Default)]
struct Histories {
    last_sweep: Option<Instant>,
    rings: HashMap<SandboxId, Ring>,
}

/// Every sandbox's recent samples, oldest first.
#[derive(Debug, Default)]
pub(crate) struct MetricsHistory {
    inner: Mutex<Histories>,
}

fn push(ring: &mut Ring, sample: SandboxMetric) {
    // envd's clock has a one-second resolution: a second sample in the same second (a
    // request's own sample beside the sweep's) would only repeat a timestamp.
    if ring
        .samples
        .back()
        .is_some_and(|last| last.timestamp_unix >= sample.timestamp_unix)
    {
        return;
    }
    if ring.samples.len() == HISTORY_CAP {
        ring.samples.pop_front();
    }
    ring.samples.push_back(sample);
}

impl MetricsHistory {
    fn lock(&self) -> MutexGuard<'_, Histories> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a sample taken on request.
    fn record(&self, id: &SandboxId, sample: SandboxMetric) {
        let mut h = self.lock();
        push(h.rings.entry(id.clone()).or_default(), sample);
    }

    /// Ends a sweep's sample. A sandbox deleted meanwhile gets no history back.
    fn finish(&self, id: &SandboxId, sample: Option<SandboxMetric>) {
        if let Some(ring) = self.lock().rings.get_mut(id) {
            ring.in_flight = false;
            if let Some(sample) = sample {
                push(ring, sample);
            }
        }
    }

    fn is_empty(&self, id: &SandboxId) -> bool {
        self.lock()
            .rings
            .get(id)
            .is_none_or(|r| r.samples.is_empty())
    }

    fn range(&self, id: &SandboxId, range: MetricsRange) -> Vec<SandboxMetric> {
        self.lock().rings.get(id).map_or_else(Vec::new, |r| {
            r.samples
                .iter()
                .filter(|m| range.contains(m.timestamp_unix))
                .cloned()
                .collect()
        })
    }

    /// Drops a deleted sandbox's history.
    pub(crate) fn forget(&self, id: &SandboxId) {
        self.lock().rings.remove(id);
    }

    /// Whether a sweep is due (the last one is a cadence old); if so, it starts now.
    fn start_sweep(&self, now: Instant) -> bool {
        let mut h = self.lock();
        if h.last_sweep
            .is_some_and(|t| now.duration_since(t) < METRICS_CADENCE)
        {
            return false;
        }
        h.last_sweep = Some(now);
        true
    }

    /// The running sandboxes a sweep samples (each marked in flight, so that a slow agent is
    /// never asked twice at once); drops the histories of sandboxes that no longer exist.
    ///
    /// Only sandboxes whose metrics someone has asked for are sampled: a sample wakes the
    /// guest, and under TCG a wake every 5 s would cost each idle sandbox a sizeable share of
    /// its whole idle budget (~0.7 % of a core). A history therefore starts at the first
    /// metrics request, which records a sample of its own.
    fn due(&self, records: &[SandboxRecord]) -> Vec<SandboxRecord> {
        let mut h = self.lock();
        let known: HashSet<&SandboxId> = records.iter().map(|r| &r.sandbox_id).collect();
        h.rings.retain(|id, _| known.contains(id));
        let mut due = Vec::new();
        for r in records.iter().filter(|r| r.state == RecordState::Running) {
            let Some(ring) = h.rings.get_mut(&r.sandbox_id) else {
                continue;
            };
            if !ring.in_flight {
                ring.in_flight = true;
                due.push(r.clone());
            }
        }
        due
    }
}

impl App {
    /// The samples of `range`; with no range, the whole history of a running sandbox (E2B's
    /// defaults: from its start until now), and nothing for a paused one.
    pub(crate) async fn metrics(
        &self,
        id: &SandboxId,
        range: MetricsRange,
    ) -> Result<Vec<SandboxMetric>, ApiError> {
        if let (Some(start), Some(end)) = (range.start, range.end)
            && start > end
        {
            return Err(ApiError::bad_request(format!(
                "start ({start}) must not be after end ({end})"
            )));
        }
        let record = self.visible(id)?;
        if record.state == RecordState::Running {
            // A sandbox created a moment ago has no sample yet: take one now rather than
            // answer with nothing until the next sweep.
            if self.metric_history.is_empty(id) {
                match self.sample(&record).await {
                    Ok(m) => self.metric_history.record(id, m),
                    Err(SampleError::NoRoute) => return Ok(Vec::new()),
                    Err(SampleError::Api(e)) => return Err(e),
                }
            }
        } else if !range.is_given() {
            return Ok(Vec::new());
        }
        Ok(self.metric_history.range(id, range))
    }

    /// One pass of the sampler, from the timeout loop's tick: every cadence, one sample of each
    /// running sandbox, taken concurrently. Nothing runs between sweeps, and nothing at all
    /// without running sandboxes.
    pub(crate) fn sample_metrics_due(self: &Arc<Self>) {
        if !self.metric_history.start_sweep(Instant::now()) {
            return;
        }
        let records = match self.store.sandboxes() {
            Ok(r) => r,
            Err(err) => {
                tracing::warn!(%err, "reading sandboxes to sample metrics");
                return;
            }
        };
        for record in self.metric_history.due(&records) {
            let app = Arc::clone(self);
            tokio::spawn(async move {
                let id = &record.sandbox_id;
                let sample = app.sample(&record).await;
                if let Err(err) = &sample {
                    // Stopping, being paused, or too busy: the next sweep tries again.
                    tracing::debug!(sandbox = %id, %err, "metrics sample skipped");
                }
                app.metric_history.finish(id, sample.ok());
            });
        }
    }

    async fn sample(&self, record: &SandboxRecord) -> Result<SandboxMetric, SampleError> {
        let Some(addr) = self.rt.route(&record.sandbox_id, ENVD_PORT) else {
            return Err(SampleError::NoRoute);
        };
        let uri = crate::upstream::guest_uri(
            addr,
            &record.sandbox_id,
            self.rt.pid(&record.sandbox_id),
            "/metrics",
        )
        .map_err(|e| ApiError::internal(format!("building the metrics request: {e}")))?;
        let req = http::Request::get(uri)
            .header("x-access-token", &record.access_token)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(format!("building the metrics request: {e}")))?;
        let unavailable = |detail: String| {
            ApiError::new(
                http::StatusCode::BAD_GATEWAY,
                format!("sandbox agent did not report metrics: {detail}"),
            )
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("status {}", resp.status())).into());
        }
        let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        let m: EnvdMetrics =
            serde_json::from_slice(&body).map_err(|e| unavailable(format!("bad JSON: {e}")))?;
        Ok(SandboxMetric {
            timestamp: rfc3339_ms(m.ts.saturating_mul(1000)),
            timestamp_unix: m.ts,
            cpu_count: m.cpu_count,
            cpu_used_pct: m.cpu_used_pct,
            mem_used: m.mem_used,
            mem_total: m.mem_total,
            mem_cache: m.mem_cache,
            disk_used: m.disk_used,
            disk_total: m.disk_total,
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum SampleError {
    /// The sandbox has no agent port right now (stopping, or being paused).
    #[error("the sandbox's agent has no route")]
    NoRoute,
    #[error(transparent)]
    Api(#[from] ApiError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: i64) -> SandboxMetric {
        SandboxMetric {
            timestamp: rfc3339_ms(ts * 1000),
            timestamp_unix: ts,
            cpu_count: 1,
            cpu_used_pct: 0.0,
            mem_used: 1,
            mem_total: 2,
            mem_cache: 0,
            disk_used: 1,
            disk_total: 2,
        }
    }

    fn stamps(v: &[SandboxMetric]) -> Vec<i64> {
        v.iter().map(|m| m.timestamp_unix).collect()
    }

    #[test]
    fn the_history_is_bounded_ordered_and_selected_by_range() {
        let h = MetricsHistory::default();
        let id = SandboxId::new("abc").unwrap_or_else(|e| panic!("{e}"));
        for ts in 0..(HISTORY_CAP as i64 + 10) {
            h.record(&id, at(ts));
        }
        // A sample in a second already sampled repeats nothing.
        h.record(&id, at(5));
        let all = h.range(&id, MetricsRange::default());
        assert_eq!(all.len(), HISTORY_CAP);
        assert_eq!(all.first().map(|m| m.timestamp_unix), Some(10));
        let some = MetricsRange {
            start: Some(100),
            end: Some(102),
        };
        assert_eq!(stamps(&h.range(&id, some)), [100, 101, 102]);
        let before = MetricsRange {
            start: None,
            end: Some(9),
        };
        assert!(h.range(&id, before).is_empty());
    }

    #[test]
    fn sweeps_keep_the_cadence_and_forget_deleted_sandboxes() {
        let h = MetricsHistory::default();
        let now = Instant::now();
        assert!(h.start_sweep(now));
        assert!(!h.start_sweep(now + METRICS_CADENCE / 2));
        assert!(h.start_sweep(now + METRICS_CADENCE));
        let id = SandboxId::new("gone").unwrap_or_else(|e| panic!("{e}"));
        h.record(&id, at(1));
        assert!(h.due(&[]).is_empty());
        // Its history went with it, and a late sample does not bring it back.
        h.finish(&id, Some(at(2)));
        assert!(h.is_empty(&id));
    }
}
