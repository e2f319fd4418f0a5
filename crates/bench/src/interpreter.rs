//! The code interpreter's rows (issue 13): create → first `run_code("1+1")` result, the
//! `run_code` round trip next to `commands.run("true")` in the same sandbox, `import pandas`
//! in a fresh sandbox, and idle memory per code-interpreter sandbox next to `base`'s.

use std::fmt::Write as _;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::client::{Api, ClientError, EnvdTarget};
use crate::stats::Summary;
use crate::suite::MemoryRun;

/// `run_code("1+1")` RTT p50 at most this many times `commands.run("true")`'s.
pub const RTT_RATIO_MAX: f64 = 1.5;
/// Create → first result p50 at most create p50 plus this many `run_code` RTT p50s.
pub const FIRST_RESULT_RTTS: f64 = 2.0;
/// `import pandas` in a fresh sandbox at most this long (it is imported in the snapshot).
pub const IMPORT_PANDAS_MS_MAX: f64 = 50.0;

/// What the interpreter part measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterpreterRun {
    pub template: String,
    /// `POST /v2/sandboxes` → 201 of the code-interpreter template (pool off).
    pub create_ms: Option<Summary>,
    /// From just before that create to the end of the first `run_code("1+1")` stream.
    pub first_result_ms: Option<Summary>,
    /// `run_code("import pandas")` right after that first run, in the same fresh sandbox.
    pub import_pandas_ms: Option<Summary>,
    /// `run_code("1+1")` in one sandbox, alternated with `commands.run("true")` there.
    pub run_code_rtt_ms: Option<Summary>,
    pub command_rtt_ms: Option<Summary>,
    /// Idle code-interpreter sandboxes, and `base` sandboxes measured the same way.
    pub memory: Option<MemoryRun>,
    pub base_memory: Option<MemoryRun>,
    pub notes: Vec<String>,
}

/// Per fresh sandbox: its create, create → first result, and `import pandas` after it.
#[derive(Clone, Debug, Default)]
pub struct FreshSamples {
    pub create_ms: Vec<f64>,
    pub first_result_ms: Vec<f64>,
    pub import_pandas_ms: Vec<f64>,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn unexpected(t: &EnvdTarget, reason: String) -> ClientError {
    ClientError::Protocol {
        url: t.base_url.clone(),
        reason,
    }
}

/// `n` fresh sandboxes one after another, each killed after its runs.
pub async fn fresh_sandboxes(
    api: &Api,
    template: &str,
    n: usize,
) -> Result<FreshSamples, ClientError> {
    let mut out = FreshSamples::default();
    for _ in 0..n {
        let started = Instant::now();
        let (created, create) = api.create(template).await?;
        let target = api.envd(&created);
        let runs = async {
            let (text, _) = api.run_code(&target, "1+1").await?;
            let first = started.elapsed();
            if text.as_deref() != Some("2") {
                return Err(unexpected(&target, format!("1+1 gave {text:?}")));
            }
            let (_, pandas) = api.run_code(&target, "import pandas").await?;
            Ok((first, pandas))
        }
        .await;
        api.kill(&created.sandbox_id).await?;
        let (first, pandas) = runs?;
        out.create_ms.push(ms(create));
        out.first_result_ms.push(ms(first));
        out.import_pandas_ms.push(ms(pandas));
    }
    Ok(out)
}

/// `run_code("1+1")` and `commands.run("true")` in turn against one sandbox, `n` each after
/// `warmup` discarded pairs, so the machine's noise falls on both alike.
pub async fn round_trips(
    api: &Api,
    target: &EnvdTarget,
    warmup: usize,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>), ClientError> {
    let (mut code, mut command) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..warmup + n {
        let (text, c) = api.run_code(target, "1+1").await?;
        if text.as_deref() != Some("2") {
            return Err(unexpected(target, format!("1+1 gave {text:?}")));
        }
        let (exit, r) = api.run(target, "true").await?;
        if exit != 0 {
            return Err(unexpected(target, format!("`true` exited {exit}")));
        }
        if i >= warmup {
            code.push(ms(c));
            command.push(ms(r));
        }
    }
    Ok((code, command))
}

impl InterpreterRun {
    /// Rows of the targets table: `(target, measured, met)`.
    fn targets(&self) -> Vec<(String, String, Option<bool>)> {
        let mut rows = Vec::new();
        let p50 = |s: &Option<Summary>| s.as_ref().map(|s| s.p50);
        if let (Some(code), Some(cmd)) = (p50(&self.run_code_rtt_ms), p50(&self.command_rtt_ms)) {
            rows.push((
                format!("`run_code(\"1+1\")` RTT p50 ≤ {RTT_RATIO_MAX}× `commands.run(\"true\")`"),
                format!("{code:.1} ms vs {cmd:.1} ms = {:.2}×", code / cmd),
                Some(code <= RTT_RATIO_MAX * cmd),
            ));
        }
        if let (Some(first), Some(create), Some(rtt)) = (
            p50(&self.first_result_ms),
            p50(&self.create_ms),
            p50(&self.run_code_rtt_ms),
        ) {
            let bound = create + FIRST_RESULT_RTTS * rtt;
            rows.push((
                format!("create → first result p50 ≤ create p50 + {FIRST_RESULT_RTTS}× RTT p50"),
                format!(
                    "{first:.1} ms vs {create:.1} + {FIRST_RESULT_RTTS}×{rtt:.1} = {bound:.1} ms"
                ),
                Some(first <= bound),
            ));
        }
        if let Some(pandas) = p50(&self.import_pandas_ms) {
            rows.push((
                format!("`import pandas` in a fresh sandbox p50 ≤ {IMPORT_PANDAS_MS_MAX} ms"),
                format!("{pandas:.1} ms"),
                Some(pandas <= IMPORT_PANDAS_MS_MAX),
            ));
        }
        rows
    }

    /// The Markdown section.
    pub fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Code interpreter (`{}`, issue 13)\n",
            self.template
        );
        let _ = writeln!(md, "| ms | n | p50 | p95 | max |\n|---|---|---|---|---|");
        for (name, s) in [
            ("create", &self.create_ms),
            (
                "create → first `run_code(\"1+1\")` result",
                &self.first_result_ms,
            ),
            (
                "`import pandas`, second run in a fresh sandbox",
                &self.import_pandas_ms,
            ),
            ("`run_code(\"1+1\")` round trip", &self.run_code_rtt_ms),
            (
                "`commands.run(\"true\")` round trip, same sandbox",
                &self.command_rtt_ms,
            ),
        ] {
            if let Some(s) = s {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {:.1} | {:.1} | {:.1} |",
                    s.n, s.p50, s.p95, s.max
                );
            }
        }
        let rows = self.targets();
        if !rows.is_empty() {
            let _ = writeln!(md, "\n| target | measured | verdict |\n|---|---|---|");
            for (target, measured, ok) in rows {
                let verdict = match ok {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "—",
                };
                let _ = writeln!(md, "| {target} | {measured} | {verdict} |");
            }
        }
        let mem_rows: Vec<(&str, &MemoryRun)> = [
            (self.template.as_str(), self.memory.as_ref()),
            ("base", self.base_memory.as_ref()),
        ]
        .into_iter()
        .filter_map(|(name, m)| m.map(|m| (name, m)))
        .collect();
        if !mem_rows.is_empty() {
            let _ = writeln!(
                md,
                "\n| idle sandboxes | n | QEMU PSS | private | RSS | MemAvailable Δ | idle CPU |\n\
                 |---|---|---|---|---|---|---|"
            );
            for (name, m) in mem_rows {
                let _ = writeln!(
                    md,
                    "| `{name}` | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} % |",
                    m.sandboxes,
                    m.pss_mib_per_sandbox,
                    m.private_mib_per_sandbox,
                    m.rss_mib_per_sandbox,
                    m.mem_available_delta_mib_per_sandbox,
                    m.idle_cpu_percent_per_sandbox
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(md, "\n> {n}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(p50: f64) -> Option<Summary> {
        Summary::of_ms(&[p50])
    }

    #[test]
    fn the_targets_are_judged_on_p50s() {
        let run = InterpreterRun {
            template: "code-interpreter-v1".into(),
            create_ms: at(1000.0),
            first_result_ms: at(1150.0),
            import_pandas_ms: at(60.0),
            run_code_rtt_ms: at(100.0),
            command_rtt_ms: at(80.0),
            ..InterpreterRun::default()
        };
        let verdicts: Vec<Option<bool>> = run.targets().into_iter().map(|r| r.2).collect();
        // 100/80 = 1.25 ≤ 1.5; 1150 ≤ 1000 + 2×100; 60 > 50.
        assert_eq!(verdicts, [Some(true), Some(true), Some(false)]);
        let mut md = String::new();
        run.markdown(&mut md);
        assert!(
            md.contains(
                "| `import pandas` in a fresh sandbox p50 ≤ 50 ms | 60.0 ms | **missed** |"
            ),
            "{md}"
        );
        assert!(
            md.contains("1150.0 ms vs 1000.0 + 2×100.0 = 1200.0 ms"),
            "{md}"
        );
    }

    #[test]
    fn missing_measurements_leave_their_rows_out() {
        let run = InterpreterRun {
            run_code_rtt_ms: at(100.0),
            ..InterpreterRun::default()
        };
        assert!(run.targets().is_empty());
    }
}
