use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chart;
use crate::idle::IdleCapacityRun;
use crate::stats::Summary;
use crate::suite::{CreateRun, FileRun, MemoryRun};

/// The machine the numbers came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_gib: f64,
    pub accel: String,
    pub accel_reason: String,
    pub kernel: String,
    pub qemu: String,
}

impl MachineInfo {
    /// Reads CPU, cores, RAM and kernel from the host; accel and QEMU are filled by the caller.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|r| r.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mem_total_gib = crate::mem::mem_total_kib().unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Self {
            cpu_model,
            cores,
            mem_total_gib,
            kernel,
            ..Self::default()
        }
    }
}

/// Everything one `firkin bench` run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BenchResults {
    pub started_at: String,
    pub machine: MachineInfo,
    pub template: String,
    pub create: Vec<CreateRun>,
    pub tti_ms: Option<Summary>,
    pub command_rtt_ms: Option<Summary>,
    pub files: Vec<FileRun>,
    pub memory: Option<MemoryRun>,
    #[serde(default)]
    pub idle_capacity: Option<IdleCapacityRun>,
    pub floors: Floors,
    pub notes: Vec<String>,
}

/// The same-run baselines every product figure is divided by.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Floors {
    /// A bare QEMU restore of the same snapshot answering on its forwarded port, no control plane.
    pub bare_restore_ms: Option<Summary>,
    /// A cold boot of the same template to envd answering.
    pub cold_boot_ms: Option<Summary>,
    /// `commands.run("true")` against host-mode firkin-envd.
    pub host_envd_rtt_ms: Option<Summary>,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "n/a".into()
    }
}

fn row(label: &str, s: &Summary) -> String {
    format!(
        "| {label} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        s.n, s.min, s.p50, s.p90, s.p95, s.p99, s.max
    )
}

/// A pass/fail line against a target.
fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

impl BenchResults {
    /// Writes `results.json` and the SVG charts into `dir`; returns the chart paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("results.json"), json)?;
        let mut charts = Vec::new();
        let mut series: Vec<(String, Vec<f64>)> = self
            .create
            .iter()
            .filter(|r| !r.samples_ms.is_empty())
            .map(|r| (r.label.clone(), r.samples_ms.clone()))
            .collect();
        if let Some(f) = &self.floors.bare_restore_ms {
            series.push((
                format!("bare QEMU restore floor (p50 {:.0} ms)", f.p50),
                vec![f.min, f.p50, f.p95, f.max],
            ));
        }
        if !series.is_empty() {
            let p = dir.join("create-latency-cdf.svg");
            chart::latency_cdf(&p, "POST /v2/sandboxes → 201, by concurrency", &series)
                .map_err(std::io::Error::other)?;
            charts.push(p);
        }
        if let Some(m) = &self.memory {
            let p = dir.join("memory-per-sandbox.svg");
            chart::bars(
                &p,
                &format!("host memory per idle sandbox ({} sandboxes)", m.sandboxes),
                "MiB",
                &[
                    ("QEMU PSS".into(), m.pss_mib_per_sandbox),
                    ("QEMU private".into(), m.private_mib_per_sandbox),
                    ("QEMU RSS".into(), m.rss_mib_per_sandbox),
                    (
                        "MemAvailable delta".into(),
                        m.mem_available_delta_mib_per_sandbox,
                    ),
                ],
            )
            .map_err(std::io::Error::other)?;
            charts.push(p);
        }
        Ok(charts)
    }

    /// The "latest numbers" section of BENCHMARKS.md.
    pub fn markdown(&self, chart_dir: &str) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "Run started {}; template `{}`.\n",
            self.started_at, self.template
        );
        let _ = writeln!(
            md,
            "Machine: {} ({} cores), {:.1} GiB RAM, kernel {}, accelerator **{}** ({}), {}.\n",
            m.cpu_model, m.cores, m.mem_total_gib, m.kernel, m.accel, m.accel_reason, m.qemu
        );

        let _ = writeln!(
            md,
            "### Create latency (`POST /v2/sandboxes` → full 201 body), ms\n"
        );
        let _ = writeln!(
            md,
            "| run | n | min | p50 | p90 | p95 | p99 | max |\n|---|---|---|---|---|---|---|---|"
        );
        for r in &self.create {
            if let Some(s) = &r.summary {
                let _ = writeln!(md, "{}", row(&r.label, s));
            }
        }
        if let Some(f) = &self.floors.bare_restore_ms {
            let _ = writeln!(md, "{}", row("floor: bare QEMU restore", f));
        }
        if let Some(f) = &self.floors.cold_boot_ms {
            let _ = writeln!(md, "{}", row("floor: cold boot", f));
        }
        let _ = writeln!(
            md,
            "\n| run | success | refused (429) | failed | throughput /s |\n|---|---|---|---|---|"
        );
        for r in &self.create {
            let _ = writeln!(
                md,
                "| {} | {}/{} ({:.0} %) | {} | {} | {:.1} |",
                r.label,
                r.succeeded,
                r.requested,
                r.success_rate() * 100.0,
                r.refused,
                r.failed,
                r.throughput_per_s
            );
        }
        let _ = writeln!(
            md,
            "\n![create latency CDF]({chart_dir}/create-latency-cdf.svg)\n"
        );

        let _ = writeln!(md, "### Against the targets\n");
        let _ = writeln!(md, "| target | measured | verdict |\n|---|---|---|");
        let pool_off_c1 = self
            .create
            .iter()
            .find(|r| r.concurrency == 1 && r.label.contains("pool off"));
        let pool_on_c1 = self
            .create
            .iter()
            .find(|r| r.concurrency == 1 && r.label.contains("pool on"));
        if let (Some(r), Some(f)) = (
            pool_off_c1.and_then(|r| r.summary.as_ref()),
            &self.floors.bare_restore_ms,
        ) {
            let _ = writeln!(
                md,
                "| create p50 ≤ 1.25× bare-QEMU floor, pool off | {:.1} ms vs {:.1} ms = {} | {} |",
                r.p50,
                f.p50,
                ratio(r.p50, f.p50),
                verdict(r.p50 <= 1.25 * f.p50)
            );
        }
        if let Some(r) = pool_on_c1.and_then(|r| r.summary.as_ref()) {
            let _ = writeln!(
                md,
                "| create p50 ≤ 20 ms on a warm-pool hit | {:.1} ms | {} |",
                r.p50,
                verdict(r.p50 <= 20.0)
            );
        }
        if let Some(r) = self.create.iter().find(|r| r.concurrency == 50) {
            let ok_all = r.failed == 0;
            let tail = r.summary.as_ref().map(|s| (s.p99, s.p50));
            let _ = writeln!(
                md,
                "| c=50: 100 % success or fast 429s | {} ok, {} refused, {} failed | {} |",
                r.succeeded,
                r.refused,
                r.failed,
                verdict(ok_all)
            );
            if let Some((p99, p50)) = tail {
                let _ = writeln!(
                    md,
                    "| c=50: p99 ≤ 4× p50 | p99 {p99:.1} / p50 {p50:.1} = {} | {} |",
                    ratio(p99, p50),
                    verdict(p99 <= 4.0 * p50)
                );
            }
        }
        if let (Some(c), Some(h)) = (&self.command_rtt_ms, &self.floors.host_envd_rtt_ms) {
            let _ = writeln!(
                md,
                "| command round trip p50 ≤ 2× host-mode envd | {:.2} ms vs {:.2} ms = {} | {} |",
                c.p50,
                h.p50,
                ratio(c.p50, h.p50),
                verdict(c.p50 <= 2.0 * h.p50)
            );
        }
        if let Some(mem) = &self.memory {
            let per = mem
                .pss_mib_per_sandbox
                .max(mem.mem_available_delta_mib_per_sandbox);
            let _ = writeln!(
                md,
                "| ≤ 40 MiB host memory per idle sandbox | PSS {:.1} MiB, MemAvailable Δ {:.1} MiB | {} |",
                mem.pss_mib_per_sandbox,
                mem.mem_available_delta_mib_per_sandbox,
                verdict(per <= 40.0)
            );
            let _ = writeln!(
                md,
                "| ≤ 1 % of a host core per idle sandbox | {:.2} % ({} VMMs over {:.0} s) | {} |",
                mem.idle_cpu_percent_per_sandbox,
                mem.processes_measured,
                mem.cpu_window_s,
                verdict(mem.idle_cpu_percent_per_sandbox <= 1.0)
            );
        }
        if let (Some(r), Some(c)) = (&self.floors.bare_restore_ms, &self.floors.cold_boot_ms) {
            let _ = writeln!(
                md,
                "| restore ≥ 10× faster than cold boot | {:.1} ms vs {:.1} ms = {} faster | {} |",
                r.p50,
                c.p50,
                ratio(c.p50, r.p50),
                verdict(c.p50 >= 10.0 * r.p50)
            );
        }

        let _ = writeln!(md, "\n### Interactive use\n");
        let _ = writeln!(
            md,
            "| measure | n | min | p50 | p90 | p95 | p99 | max |\n|---|---|---|---|---|---|---|---|"
        );
        if let Some(s) = &self.tti_ms {
            let _ = writeln!(md, "{}", row("time to interactive (create + `true`)", s));
        }
        if let Some(s) = &self.command_rtt_ms {
            let _ = writeln!(md, "{}", row("`commands.run(\"true\")` via proxy", s));
        }
        if let Some(s) = &self.floors.host_envd_rtt_ms {
            let _ = writeln!(md, "{}", row("floor: host-mode envd", s));
        }
        if !self.files.is_empty() {
            let _ = writeln!(
                md,
                "\n| file size | write MiB/s | read MiB/s |\n|---|---|---|"
            );
            for f in &self.files {
                let _ = writeln!(
                    md,
                    "| {} MiB | {:.0} | {:.0} |",
                    f.size_mib, f.write_mib_s, f.read_mib_s
                );
            }
        }
        if let Some(mem) = &self.memory {
            let _ = writeln!(md, "\n### Memory with {} idle sandboxes\n", mem.sandboxes);
            let _ = writeln!(
                md,
                "| QEMU PSS | QEMU private | QEMU RSS | MemAvailable Δ | Σpss/Σrss |\n|---|---|---|---|---|\n| {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} |",
                mem.pss_mib_per_sandbox,
                mem.private_mib_per_sandbox,
                mem.rss_mib_per_sandbox,
                mem.mem_available_delta_mib_per_sandbox,
                mem.sharing_ratio
            );
            let _ = writeln!(
                md,
                "\n![memory per sandbox]({chart_dir}/memory-per-sandbox.svg)"
            );
            let _ = writeln!(
                md,
                "\nIdle CPU: {:.2} % of one host core per sandbox (the VMMs' user+system time over {:.0} s).",
                mem.idle_cpu_percent_per_sandbox, mem.cpu_window_s
            );
        }
        if let Some(cap) = &self.idle_capacity {
            let _ = writeln!(md, "\n### Idle sandboxes before a create's p50 doubles\n");
            let held = match (cap.doubled_at, &cap.stopped_by) {
                (Some(n), _) => format!("p50 doubled at **{n}** idle sandboxes"),
                (None, Some(why)) => format!(
                    "not doubled up to {} idle sandboxes; stopped: {why}",
                    cap.steps.last().map_or(0, |s| s.0)
                ),
                (None, None) => format!("not doubled up to {} idle sandboxes", cap.max_idle),
            };
            let _ = writeln!(
                md,
                "Create p50 with none idle: {:.1} ms; {held}.\n\n| idle sandboxes | create p50 (ms) |\n|---|---|",
                cap.baseline_p50_ms
            );
            for (n, p50) in &cap.steps {
                let _ = writeln!(md, "| {n} | {p50:.1} |");
            }
        }
        for n in &self.notes {
            let _ = writeln!(md, "\n> {n}");
        }
        md
    }
}
