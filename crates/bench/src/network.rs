//! The network comparison of issue 12: the same measurements against two servers run side by
//! side, one giving sandboxes QEMU's user-mode network (slirp), one a TAP slot each, taken in
//! alternation so that the shared machine's noise falls on both alike.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::Summary;
use crate::suite::FileRun;

/// Create p50 and `commands.run` RTT p50 on TAP at most this many times user-mode's.
pub const LATENCY_RATIO_MAX: f64 = 1.05;
/// File write and read MiB/s on TAP at least this many times user-mode's.
pub const FILES_RATIO_MIN: f64 = 2.0;

/// What one server measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetworkSide {
    /// `--network` of the server: `user` or `tap`.
    pub network: String,
    /// c=1 back-to-back creates (pool depth 0: each one a restore), each killed after.
    pub create_ms: Option<Summary>,
    pub create_samples_ms: Vec<f64>,
    pub create_requested: usize,
    pub create_failed: usize,
    pub first_error: Option<String>,
    /// `commands.run("true")` through the sandbox-plane proxy.
    pub command_rtt_ms: Option<Summary>,
    /// Best of `file_rounds` per size.
    pub files: Vec<FileRun>,
}

/// User-mode vs TAP slots, measured in one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetworkComparison {
    pub user: NetworkSide,
    pub tap: NetworkSide,
    pub file_rounds: usize,
    pub notes: Vec<String>,
}

/// `tap / user`, if both are there and user's is positive.
fn ratio(user: Option<f64>, tap: Option<f64>) -> Option<f64> {
    match (user, tap) {
        (Some(u), Some(t)) if u > 0.0 => Some(t / u),
        _ => None,
    }
}

/// One row of the comparison: `(metric, user, tap, ratio, target text, met)`.
type Row = (
    String,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    String,
    Option<bool>,
);

impl NetworkComparison {
    fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = Vec::new();
        let latency = |name: &str,
                       u: &Option<Summary>,
                       t: &Option<Summary>,
                       pick: fn(&Summary) -> f64,
                       with_target: bool|
         -> Row {
            let (u, t) = (u.as_ref().map(pick), t.as_ref().map(pick));
            let r = ratio(u, t);
            if with_target {
                (
                    name.to_owned(),
                    u,
                    t,
                    r,
                    format!("≤ {LATENCY_RATIO_MAX:.2}×"),
                    r.map(|r| r <= LATENCY_RATIO_MAX),
                )
            } else {
                (name.to_owned(), u, t, r, "—".into(), None)
            }
        };
        let (u, t) = (&self.user, &self.tap);
        rows.push(latency(
            "create p50 (ms)",
            &u.create_ms,
            &t.create_ms,
            |s| s.p50,
            true,
        ));
        rows.push(latency(
            "create p99 (ms)",
            &u.create_ms,
            &t.create_ms,
            |s| s.p99,
            false,
        ));
        rows.push(latency(
            "`commands.run` RTT p50 (ms)",
            &u.command_rtt_ms,
            &t.command_rtt_ms,
            |s| s.p50,
            true,
        ));
        rows.push(latency(
            "`commands.run` RTT p99 (ms)",
            &u.command_rtt_ms,
            &t.command_rtt_ms,
            |s| s.p99,
            false,
        ));
        for f in &u.files {
            let other = t.files.iter().find(|x| x.size_mib == f.size_mib);
            for (dir, pick) in [
                (
                    "write",
                    (|x: &FileRun| x.write_mib_s) as fn(&FileRun) -> f64,
                ),
                ("read", |x: &FileRun| x.read_mib_s),
            ] {
                let (uv, tv) = (Some(pick(f)), other.map(pick));
                let r = ratio(uv, tv);
                rows.push((
                    format!("file {dir} {} MiB (MiB/s)", f.size_mib),
                    uv,
                    tv,
                    r,
                    format!("≥ {FILES_RATIO_MIN:.1}×"),
                    r.map(|r| r >= FILES_RATIO_MIN),
                ));
            }
        }
        rows
    }

    /// Whether every target row with a value was met (`None`: nothing to judge).
    pub fn targets_met(&self) -> Option<bool> {
        let verdicts: Vec<bool> = self.rows().into_iter().filter_map(|r| r.5).collect();
        (!verdicts.is_empty()).then(|| verdicts.iter().all(|&ok| ok))
    }

    /// The Markdown section: the table, the verdicts, and how the samples were taken.
    pub fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Per-sandbox networks: TAP slots vs user-mode (issue 12)\n"
        );
        let _ = writeln!(
            md,
            "Two servers side by side (`--network user`, `--network tap`, pool depth 0, so every \
             create is a restore), measured in alternation. Ratio = TAP / user-mode.\n"
        );
        let _ = writeln!(
            md,
            "| metric | user-mode (slirp) | TAP slot | ratio | target | verdict |\n|---|---|---|---|---|---|"
        );
        let num = |v: Option<f64>| v.map_or_else(|| "n/a".into(), |v| format!("{v:.1}"));
        for (name, u, t, r, target, ok) in self.rows() {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {target} | {} |",
                num(u),
                num(t),
                r.map_or_else(|| "n/a".into(), |r| format!("{r:.2}×")),
                match ok {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "—",
                }
            );
        }
        let side = |s: &NetworkSide| {
            format!(
                "{}: {}/{} creates ok{}",
                s.network,
                s.create_samples_ms.len(),
                s.create_requested,
                s.first_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(" (first error: {e})"))
            )
        };
        let _ = writeln!(
            md,
            "\n{}; {}; RTT n = {} each; files best of {} rounds.",
            side(&self.user),
            side(&self.tap),
            self.user.command_rtt_ms.as_ref().map_or(0, |s| s.n),
            self.file_rounds
        );
        let _ = writeln!(
            md,
            "\nTargets: {}.",
            match self.targets_met() {
                Some(true) => "all met",
                Some(false) => "**not all met**",
                None => "nothing measured",
            }
        );
        for n in &self.notes {
            let _ = writeln!(md, "\n> {n}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn side(network: &str, create: f64, rtt: f64, mib_s: f64) -> NetworkSide {
        NetworkSide {
            network: network.into(),
            create_ms: Summary::of_ms(&[create, create * 2.0]),
            create_samples_ms: vec![create, create * 2.0],
            create_requested: 2,
            command_rtt_ms: Summary::of_ms(&[rtt]),
            files: vec![FileRun {
                size_mib: 100,
                write_mib_s: mib_s,
                read_mib_s: mib_s * 2.0,
            }],
            ..NetworkSide::default()
        }
    }

    #[test]
    fn the_table_judges_tap_against_user_mode() {
        let cmp = NetworkComparison {
            user: side("user", 100.0, 10.0, 50.0),
            tap: side("tap", 104.0, 10.0, 150.0),
            file_rounds: 3,
            notes: vec![],
        };
        let mut md = String::new();
        cmp.markdown(&mut md);
        for line in [
            "| create p50 (ms) | 100.0 | 104.0 | 1.04× | ≤ 1.05× | met |",
            "| create p99 (ms) | 200.0 | 208.0 | 1.04× | — | — |",
            "| `commands.run` RTT p50 (ms) | 10.0 | 10.0 | 1.00× | ≤ 1.05× | met |",
            "| file write 100 MiB (MiB/s) | 50.0 | 150.0 | 3.00× | ≥ 2.0× | met |",
            "| file read 100 MiB (MiB/s) | 100.0 | 300.0 | 3.00× | ≥ 2.0× | met |",
            "Targets: all met.",
        ] {
            assert!(md.contains(line), "missing {line:?} in\n{md}");
        }
        let slow = NetworkComparison {
            tap: side("tap", 120.0, 10.0, 60.0),
            ..cmp
        };
        let mut md = String::new();
        slow.markdown(&mut md);
        assert!(md.contains("| 1.20× | ≤ 1.05× | **missed** |"), "{md}");
        assert_eq!(slow.targets_met(), Some(false));
    }
}
