//! The scenarios. Each returns raw samples and a summary; the caller decides what to compare.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::client::{Api, ClientError, EnvdTarget};
use crate::idle::{cpu_percent_each, qemu_pids};
use crate::mem::{ProcessMemory, mem_available_kib};
use crate::stats::Summary;

/// One closed-loop create run at a fixed concurrency (create-delete mode: each worker deletes
/// the sandbox it created after timing the create, so about `concurrency` are alive at once).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateRun {
    pub label: String,
    pub concurrency: usize,
    pub requested: usize,
    pub succeeded: usize,
    /// Fast refusals (429): counted, not failures.
    pub refused: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub wall_s: f64,
    pub throughput_per_s: f64,
    pub summary: Option<Summary>,
    pub samples_ms: Vec<f64>,
}

impl CreateRun {
    pub fn success_rate(&self) -> f64 {
        if self.requested == 0 {
            0.0
        } else {
            self.succeeded as f64 / self.requested as f64
        }
    }
}

pub async fn create_latency(
    api: &Api,
    template: &str,
    label: &str,
    concurrency: usize,
    n: usize,
) -> CreateRun {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = Arc::clone(&sem);
        let api = api.clone();
        let template = template.to_owned();
        tasks.push(tokio::spawn(async move {
            let _p = permit.acquire_owned().await;
            let out = api.create(&template).await;
            if let Ok((created, _)) = &out
                && let Err(err) = api.kill(&created.sandbox_id).await
            {
                tracing::warn!(%err, "bench: kill after create failed");
            }
            out.map(|(_, d)| d)
        }));
    }
    let mut samples = Vec::new();
    let (mut refused, mut failed, mut first_error) = (0, 0, None);
    for t in tasks {
        match t.await {
            Ok(Ok(d)) => samples.push(d.as_secs_f64() * 1e3),
            Ok(Err(ClientError::Status { status, .. })) if status.as_u16() == 429 => refused += 1,
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    CreateRun {
        label: label.to_owned(),
        concurrency,
        requested: n,
        succeeded: samples.len(),
        refused,
        failed,
        first_error,
        wall_s: wall,
        throughput_per_s: samples.len() as f64 / wall.max(1e-9),
        summary: Summary::of_ms(&samples),
        samples_ms: samples,
    }
}

/// Time to interactive: create, then `commands.run("true")`, sequentially, `n` times.
pub async fn time_to_interactive(
    api: &Api,
    template: &str,
    n: usize,
) -> Result<Vec<f64>, ClientError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let (created, _) = api.create(template).await?;
        let target = api.envd(&created);
        let run = api.run(&target, "true").await;
        let elapsed = started.elapsed();
        api.kill(&created.sandbox_id).await?;
        let (code, _) = run?;
        if code != 0 {
            return Err(ClientError::Protocol {
                url: target.base_url,
                reason: format!("`true` exited {code}"),
            });
        }
        out.push(elapsed.as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// `n` sequential `commands.run("true")` round trips against one agent, after `warmup`
/// discarded ones.
pub async fn command_round_trips(
    api: &Api,
    target: &EnvdTarget,
    warmup: usize,
    n: usize,
) -> Result<Vec<f64>, ClientError> {
    for _ in 0..warmup {
        api.run(target, "true").await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (code, d) = api.run(target, "true").await?;
        if code != 0 {
            return Err(ClientError::Protocol {
                url: target.base_url.clone(),
                reason: format!("`true` exited {code}"),
            });
        }
        out.push(d.as_secs_f64() * 1e3);
    }
    Ok(out)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRun {
    pub size_mib: usize,
    pub write_mib_s: f64,
    pub read_mib_s: f64,
}

/// Writes then reads back a file of `size_mib`, best of `rounds`.
pub async fn file_throughput(
    api: &Api,
    target: &EnvdTarget,
    size_mib: usize,
    rounds: usize,
) -> Result<FileRun, ClientError> {
    let data: Bytes = (0..size_mib << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let path = format!("/tmp/firkin-bench-{size_mib}m.bin");
    let (mut best_w, mut best_r) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds.max(1) {
        best_w = best_w.min(api.upload(target, &path, data.clone()).await?);
        let (len, d) = api.download(target, &path).await?;
        if len != data.len() {
            return Err(ClientError::Protocol {
                url: target.base_url.clone(),
                reason: format!("read back {len} bytes of {}", data.len()),
            });
        }
        best_r = best_r.min(d);
    }
    let mib = size_mib as f64;
    Ok(FileRun {
        size_mib,
        write_mib_s: mib / best_w.as_secs_f64(),
        read_mib_s: mib / best_r.as_secs_f64(),
    })
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryRun {
    pub sandboxes: usize,
    pub pss_mib_per_sandbox: f64,
    pub private_mib_per_sandbox: f64,
    pub rss_mib_per_sandbox: f64,
    pub mem_available_delta_mib_per_sandbox: f64,
    /// Σpss / Σrss over the sandbox VMMs: below 1 means pages are shared between clones.
    pub sharing_ratio: f64,
    pub processes_measured: usize,
    /// Mean share of one host core each idle sandbox's VMM used over `cpu_window_s`, in
    /// percent (from the VMMs' user+system time).
    #[serde(default)]
    pub idle_cpu_percent_per_sandbox: f64,
    #[serde(default)]
    pub cpu_window_s: f64,
}

/// Creates `n` sandboxes, lets them settle, and measures what they cost the host: memory, and
/// CPU over a further `settle` window.
pub async fn idle_memory(
    api: &Api,
    template: &str,
    n: usize,
    server_pid: Option<u32>,
    settle: Duration,
) -> Result<MemoryRun, ClientError> {
    let io = |e: std::io::Error| ClientError::Protocol {
        url: "/proc".into(),
        reason: e.to_string(),
    };
    let before_pids = qemu_pids(server_pid);
    tokio::time::sleep(settle).await;
    let before = mem_available_kib().map_err(io)?;
    let mut created = Vec::with_capacity(n);
    let mut result = Ok(());
    for _ in 0..n {
        match api.create(template).await {
            Ok((c, _)) => created.push(c),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    tokio::time::sleep(settle).await;
    let after = mem_available_kib().map_err(io)?;
    let pids: Vec<u32> = qemu_pids(server_pid)
        .into_iter()
        .filter(|p| !before_pids.contains(p))
        .collect();
    let mems: Vec<ProcessMemory> = pids
        .iter()
        .filter_map(|p| ProcessMemory::of_pid(*p).ok())
        .collect();
    let idle_cpu = cpu_percent_each(&pids, settle).await;
    for c in &created {
        let _ = api.kill(&c.sandbox_id).await;
    }
    result?;
    let count = mems.len().max(1) as f64;
    let sum = |f: fn(&ProcessMemory) -> u64| mems.iter().map(f).sum::<u64>() as f64;
    let (pss, rss) = (sum(|m| m.pss_kib), sum(|m| m.rss_kib));
    Ok(MemoryRun {
        sandboxes: created.len(),
        pss_mib_per_sandbox: pss / count / 1024.0,
        private_mib_per_sandbox: sum(ProcessMemory::private_kib) / count / 1024.0,
        rss_mib_per_sandbox: rss / count / 1024.0,
        mem_available_delta_mib_per_sandbox: before.saturating_sub(after) as f64
            / created.len().max(1) as f64
            / 1024.0,
        sharing_ratio: if rss > 0.0 { pss / rss } else { 0.0 },
        processes_measured: mems.len(),
        idle_cpu_percent_per_sandbox: idle_cpu,
        cpu_window_s: settle.as_secs_f64(),
    })
}
