use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chart;
use crate::idle::IdleCapacityRun;
use crate::interpreter::InterpreterRun;
use crate::network::NetworkComparison;
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
    /// User-mode vs TAP slots (issue 12), when the run made the comparison.
    #[serde(default)]
    pub network: Option<NetworkComparison>,
    /// The code interpreter's rows (issue 13), when the run measured them.
    #[serde(default)]
    pub interpreter: Option<InterpreterRun>,
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

/// A Markdown table header: the column names and the separator line.
fn header(md: &mut String, columns: &[&str]) {
    let _ = writeln!(
        md,
        "| {} |\n|{}",
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
}

/// A table of latency summaries, one labelled row each.
fn summary_table<'a>(
    md: &mut String,
    first_column: &str,
    rows: impl Iterator<Item = (&'a str, &'a Summary)>,
) {
    header(
        md,
        &[first_column, "n", "min", "p50", "p90", "p95", "p99", "max"],
    );
    for (label, s) in rows {
        let _ = writeln!(
            md,
            "| {label} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.n, s.min, s.p50, s.p90, s.p95, s.p99, s.max
        );
    }
}

/// A target that a measured p50 stay within `factor` times its floor's, shown as both values
/// in ms with `digits` decimals and their ratio.
fn within_floor(md: &mut String, name: &str, (p50, floor): (f64, f64), digits: usize, factor: f64) {
    target(
        md,
        name,
        format!(
            "{p50:.digits$} ms vs {floor:.digits$} ms = {}",
            ratio(p50, floor)
        ),
        p50 <= factor * floor,
    );
}

/// One row of the targets table: what was asked, what was measured, and whether it was met.
fn target(md: &mut String, target: &str, measured: String, ok: bool) {
    let _ = writeln!(md, "| {target} | {measured} | {} |", verdict(ok));
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
        // A network-only run (`--only network`) has none of the main sections.
        let main_run = !self.create.is_empty() || self.command_rtt_ms.is_some();
        if main_run {
            self.create_section(&mut md, chart_dir);
            self.targets_section(&mut md);
            self.interactive_section(&mut md);
        }
        if let Some(mem) = &self.memory {
            let _ = writeln!(md, "\n### Memory with {} idle sandboxes\n", mem.sandboxes);
            header(
                &mut md,
                &[
                    "QEMU PSS",
                    "QEMU private",
                    "QEMU RSS",
                    "MemAvailable Δ",
                    "Σpss/Σrss",
                ],
            );
            let _ = writeln!(
                md,
                "| {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} |",
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
            idle_capacity_section(&mut md, cap);
        }
        if let Some(net) = &self.network {
            net.markdown(&mut md);
        }
        if let Some(interpreter) = &self.interpreter {
            interpreter.markdown(&mut md);
        }
        for n in &self.notes {
            let _ = writeln!(md, "\n> {n}");
        }
        md
    }

    fn create_section(&self, md: &mut String, chart_dir: &str) {
        let _ = writeln!(
            md,
            "### Create latency (`POST /v2/sandboxes` → full 201 body), ms\n"
        );
        let runs = self
            .create
            .iter()
            .filter_map(|r| Some((r.label.as_str(), r.summary.as_ref()?)));
        let floors = [
            ("floor: bare QEMU restore", &self.floors.bare_restore_ms),
            ("floor: cold boot", &self.floors.cold_boot_ms),
        ]
        .into_iter()
        .filter_map(|(label, f)| Some((label, f.as_ref()?)));
        summary_table(md, "run", runs.chain(floors));
        md.push('\n');
        header(
            md,
            &["run", "success", "refused (429)", "failed", "throughput /s"],
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
    }

    fn targets_section(&self, md: &mut String) {
        let _ = writeln!(md, "### Against the targets\n");
        header(md, &["target", "measured", "verdict"]);
        let c1 = |pool: &str| {
            self.create
                .iter()
                .find(|r| r.concurrency == 1 && r.label.contains(pool))
                .and_then(|r| r.summary.as_ref())
        };
        if let (Some(r), Some(f)) = (c1("pool off"), &self.floors.bare_restore_ms) {
            within_floor(
                md,
                "create p50 ≤ 1.25× bare-QEMU floor, pool off",
                (r.p50, f.p50),
                1,
                1.25,
            );
        }
        if let Some(r) = c1("pool on") {
            target(
                md,
                "create p50 ≤ 20 ms on a warm-pool hit",
                format!("{:.1} ms", r.p50),
                r.p50 <= 20.0,
            );
        }
        if let Some(r) = self.create.iter().find(|r| r.concurrency == 50) {
            target(
                md,
                "c=50: 100 % success or fast 429s",
                format!(
                    "{} ok, {} refused, {} failed",
                    r.succeeded, r.refused, r.failed
                ),
                r.failed == 0,
            );
            if let Some(s) = &r.summary {
                target(
                    md,
                    "c=50: p99 ≤ 4× p50",
                    format!(
                        "p99 {:.1} / p50 {:.1} = {}",
                        s.p99,
                        s.p50,
                        ratio(s.p99, s.p50)
                    ),
                    s.p99 <= 4.0 * s.p50,
                );
            }
        }
        if let (Some(c), Some(h)) = (&self.command_rtt_ms, &self.floors.host_envd_rtt_ms) {
            within_floor(
                md,
                "command round trip p50 ≤ 2× host-mode envd",
                (c.p50, h.p50),
                2,
                2.0,
            );
        }
        if let Some(mem) = &self.memory {
            let per = mem
                .pss_mib_per_sandbox
                .max(mem.mem_available_delta_mib_per_sandbox);
            target(
                md,
                "≤ 40 MiB host memory per idle sandbox",
                format!(
                    "PSS {:.1} MiB, MemAvailable Δ {:.1} MiB",
                    mem.pss_mib_per_sandbox, mem.mem_available_delta_mib_per_sandbox
                ),
                per <= 40.0,
            );
            target(
                md,
                "≤ 1 % of a host core per idle sandbox",
                format!(
                    "{:.2} % ({} VMMs over {:.0} s)",
                    mem.idle_cpu_percent_per_sandbox, mem.processes_measured, mem.cpu_window_s
                ),
                mem.idle_cpu_percent_per_sandbox <= 1.0,
            );
        }
        if let (Some(r), Some(c)) = (&self.floors.bare_restore_ms, &self.floors.cold_boot_ms) {
            target(
                md,
                "restore ≥ 10× faster than cold boot",
                format!(
                    "{:.1} ms vs {:.1} ms = {} faster",
                    r.p50,
                    c.p50,
                    ratio(c.p50, r.p50)
                ),
                c.p50 >= 10.0 * r.p50,
            );
        }
    }

    fn interactive_section(&self, md: &mut String) {
        let _ = writeln!(md, "\n### Interactive use\n");
        let rows = [
            ("time to interactive (create + `true`)", &self.tti_ms),
            ("`commands.run(\"true\")` via proxy", &self.command_rtt_ms),
            ("floor: host-mode envd", &self.floors.host_envd_rtt_ms),
        ]
        .into_iter()
        .filter_map(|(label, s)| Some((label, s.as_ref()?)));
        summary_table(md, "measure", rows);
        if !self.files.is_empty() {
            md.push('\n');
            header(md, &["file size", "write MiB/s", "read MiB/s"]);
            for f in &self.files {
                let _ = writeln!(
                    md,
                    "| {} MiB | {:.0} | {:.0} |",
                    f.size_mib, f.write_mib_s, f.read_mib_s
                );
            }
        }
    }
}

/// How many idle sandboxes the host held before a create's p50 doubled.
fn idle_capacity_section(md: &mut String, cap: &IdleCapacityRun) {
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
        "Create p50 with none idle: {:.1} ms; {held}.\n",
        cap.baseline_p50_ms
    );
    header(md, &["idle sandboxes", "create p50 (ms)"]);
    for (n, p50) in &cap.steps {
        let _ = writeln!(md, "| {n} | {p50:.1} |");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn summary(p50: f64) -> Summary {
        Summary {
            n: 10,
            min: p50 / 2.0,
            mean: p50,
            p50,
            p90: p50 * 1.5,
            p95: p50 * 1.8,
            p99: p50 * 2.0,
            max: p50 * 3.0,
        }
    }

    fn create_run(label: &str, concurrency: usize, p50: f64) -> CreateRun {
        CreateRun {
            label: label.into(),
            concurrency,
            requested: 20,
            succeeded: 18,
            refused: 2,
            failed: 0,
            first_error: None,
            wall_s: 2.0,
            throughput_per_s: 9.0,
            summary: Some(summary(p50)),
            samples_ms: vec![p50],
        }
    }

    fn full() -> BenchResults {
        BenchResults {
            started_at: "2026-01-01T00:00:00Z".into(),
            template: "base".into(),
            create: vec![
                create_run("c=1, pool off", 1, 100.0),
                create_run("c=1, pool on", 1, 10.0),
                create_run("c=50, pool off", 50, 300.0),
            ],
            tti_ms: Some(summary(120.0)),
            command_rtt_ms: Some(summary(2.0)),
            files: vec![FileRun {
                size_mib: 16,
                write_mib_s: 200.0,
                read_mib_s: 300.0,
            }],
            memory: Some(MemoryRun {
                sandboxes: 10,
                pss_mib_per_sandbox: 30.0,
                private_mib_per_sandbox: 25.0,
                rss_mib_per_sandbox: 60.0,
                mem_available_delta_mib_per_sandbox: 35.0,
                sharing_ratio: 0.5,
                processes_measured: 10,
                idle_cpu_percent_per_sandbox: 0.6,
                cpu_window_s: 10.0,
            }),
            idle_capacity: Some(IdleCapacityRun {
                baseline_p50_ms: 100.0,
                steps: vec![(10, 120.0), (20, 210.0)],
                doubled_at: Some(20),
                max_idle: 60,
                stopped_by: None,
            }),
            floors: Floors {
                bare_restore_ms: Some(summary(90.0)),
                cold_boot_ms: Some(summary(2000.0)),
                host_envd_rtt_ms: Some(summary(1.5)),
            },
            notes: vec!["a note".into()],
            ..BenchResults::default()
        }
    }

    #[test]
    fn markdown_of_a_full_run() {
        let md = full().markdown("charts");
        if let Ok(path) = std::env::var("FIRKIN_BENCH_MD_OUT") {
            std::fs::write(path, &md).unwrap();
        }
        for line in [
            "| run | n | min | p50 | p90 | p95 | p99 | max |\n|---|---|---|---|---|---|---|---|",
            "| c=1, pool off | 10 | 50.0 | 100.0 | 150.0 | 180.0 | 200.0 | 300.0 |",
            "| floor: cold boot | 10 | 1000.0 | 2000.0 |",
            "| c=50, pool off | 18/20 (90 %) | 2 | 0 | 9.0 |",
            "| create p50 ≤ 1.25× bare-QEMU floor, pool off | 100.0 ms vs 90.0 ms = 1.11× | met |",
            "| create p50 ≤ 20 ms on a warm-pool hit | 10.0 ms | met |",
            "| c=50: p99 ≤ 4× p50 | p99 600.0 / p50 300.0 = 2.00× | met |",
            "| command round trip p50 ≤ 2× host-mode envd | 2.00 ms vs 1.50 ms = 1.33× | met |",
            "| ≤ 40 MiB host memory per idle sandbox | PSS 30.0 MiB, MemAvailable Δ 35.0 MiB | met |",
            "| restore ≥ 10× faster than cold boot | 90.0 ms vs 2000.0 ms = 22.22× faster | met |",
            "| ≤ 1 % of a host core per idle sandbox | 0.60 % (10 VMMs over 10 s) | met |",
            "Create p50 with none idle: 100.0 ms; p50 doubled at **20** idle sandboxes.",
            "| 20 | 210.0 |",
            "| 16 MiB | 200 | 300 |",
            "![memory per sandbox](charts/memory-per-sandbox.svg)",
            "\n> a note\n",
        ] {
            assert!(md.contains(line), "missing {line:?} in\n{md}");
        }
    }
}
