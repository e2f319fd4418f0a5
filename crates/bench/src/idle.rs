//! What idle sandboxes cost the host in CPU, and how many it holds before creates slow down.
//!
//! An idle guest is not free: its kernel's timers, its agent and its VMM's main loop wake the
//! host. Under TCG every guest timer interrupt is emulated, so the guest's clocksource alone
//! decided between ~5 % and ~0.6 % of a core per idle sandbox.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{Api, ClientError};
use crate::stats::Summary;

/// PIDs of `qemu-system-*` processes whose parent is `parent` (or all of them).
pub fn qemu_pids(parent: Option<u32>) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter_map(|p| p.stat().ok())
        .filter(|s| s.comm.starts_with("qemu-system"))
        .filter(|s| parent.is_none_or(|p| u32::try_from(s.ppid).ok() == Some(p)))
        .filter_map(|s| u32::try_from(s.pid).ok())
        .collect()
}

/// User plus system CPU time of the processes, in seconds; processes that are gone count 0.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks = procfs::ticks_per_second() as f64;
    pids.iter()
        .filter_map(|&pid| procfs::process::Process::new(i32::try_from(pid).ok()?).ok())
        .filter_map(|p| p.stat().ok())
        .map(|s| (s.utime + s.stime) as f64 / ticks)
        .sum()
}

/// Mean share of one host core each process used over `window`, in percent.
pub async fn cpu_percent_each(pids: &[u32], window: Duration) -> f64 {
    if pids.is_empty() || window.is_zero() {
        return 0.0;
    }
    let before = cpu_seconds(pids);
    tokio::time::sleep(window).await;
    let used = cpu_seconds(pids) - before;
    100.0 * used / window.as_secs_f64() / pids.len() as f64
}

/// How many idle sandboxes the host held before a create's p50 doubled.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleCapacityRun {
    /// Create p50 with no idle sandboxes (ms).
    pub baseline_p50_ms: f64,
    /// (idle sandboxes alive, create p50 in ms) at each step.
    pub steps: Vec<(usize, f64)>,
    /// The first count at which p50 ≥ 2× baseline; `None`: not reached up to `max_idle`.
    pub doubled_at: Option<usize>,
    pub max_idle: usize,
    /// Why the run ended before `max_idle` without doubling (a refusal, an error).
    pub stopped_by: Option<String>,
}

/// p50 of `probes` sequential creates, each killed right away so only the idle ones stay.
async fn probe_p50(api: &Api, template: &str, probes: usize) -> Result<f64, ClientError> {
    let mut samples = Vec::with_capacity(probes);
    for _ in 0..probes {
        let (created, took) = api.create(template).await?;
        samples.push(took.as_secs_f64() * 1e3);
        if let Err(err) = api.kill(&created.sandbox_id).await {
            tracing::warn!(%err, "bench: kill after a probe create failed");
        }
    }
    Ok(Summary::of_ms(&samples).map_or(0.0, |s| s.p50))
}

/// Adds idle sandboxes `step` at a time (waiting `settle` after each step) up to `max_idle`,
/// measuring the create p50 at each level, until it doubles. Every sandbox it made is killed.
pub async fn idle_capacity(
    api: &Api,
    template: &str,
    step: usize,
    max_idle: usize,
    probes: usize,
    settle: Duration,
) -> Result<IdleCapacityRun, ClientError> {
    let mut run = IdleCapacityRun {
        max_idle,
        ..IdleCapacityRun::default()
    };
    run.baseline_p50_ms = probe_p50(api, template, probes).await?;
    let mut idle = Vec::new();
    let outcome = grow(
        api,
        template,
        step.max(1),
        probes,
        settle,
        &mut idle,
        &mut run,
    )
    .await;
    for id in &idle {
        if let Err(err) = api.kill(id).await {
            tracing::warn!(%err, "bench: kill of an idle sandbox failed");
        }
    }
    if let Err(e) = outcome {
        run.stopped_by = Some(e.to_string());
    }
    Ok(run)
}

async fn grow(
    api: &Api,
    template: &str,
    step: usize,
    probes: usize,
    settle: Duration,
    idle: &mut Vec<String>,
    run: &mut IdleCapacityRun,
) -> Result<(), ClientError> {
    while idle.len() < run.max_idle {
        for _ in 0..step.min(run.max_idle - idle.len()) {
            let (created, _) = api.create(template).await?;
            idle.push(created.sandbox_id);
        }
        tokio::time::sleep(settle).await;
        let p50 = probe_p50(api, template, probes).await?;
        run.steps.push((idle.len(), p50));
        if p50 >= 2.0 * run.baseline_p50_ms {
            run.doubled_at = Some(idle.len());
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_and_is_no_qemu() {
        let me = std::process::id();
        let busy_until = std::time::Instant::now() + Duration::from_millis(50);
        let mut x = 0u64;
        while std::time::Instant::now() < busy_until {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(cpu_seconds(&[me]) > 0.0);
        assert!(!qemu_pids(None).contains(&me));
        assert_eq!(
            cpu_seconds(&[u32::MAX]),
            0.0,
            "a missing process counts nothing"
        );
    }
}
