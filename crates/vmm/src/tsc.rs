//! The host's TSC frequency, which the guest kernel must be told.
//!
//! Under TCG, QEMU hands the guest the host's time-stamp counter, so the guest's TSC ticks at
//! the host's rate. The guest cannot calibrate it reliably on a busy host (it can hang doing
//! so), so firkin passes `tsc_early_khz=`; a wrong value makes the guest clock run fast or slow
//! by the ratio (a fixed 2 GHz on a 2.3 GHz host made guest time gain 15 %).

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Used only where the TSC cannot be read at all (not x86_64).
const FALLBACK_KHZ: u64 = 2_000_000;

/// Where a measured frequency is kept for the rest of the boot (a tmpfs: the TSC's rate is fixed
/// until the host reboots).
const REMEMBERED: &str = "/run/firkin-tsc-khz";

/// Host TSC frequency in kHz: the kernel's value when exported, else measured against the
/// monotonic clock and remembered for the rest of the boot.
///
/// Remembered because the value is part of the kernel command line, which a template's build
/// fingerprint covers: a measurement rounds to whole MHz and on this kind of host lands on
/// either side of a boundary (2595 or 2596 MHz), so each process measuring afresh made every
/// other `firkin serve` start reject its cached templates and build them again.
pub fn host_tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(|| {
        from_sysfs().unwrap_or_else(|| remembered(Path::new(REMEMBERED), calibrate))
    })
}

/// The value kept at `path`, else `measure()`'s, kept there for the next process (if the file
/// can be written; a process that cannot, e.g. without write access to `/run`, still gets a
/// value). Between two processes measuring at once, the file's content wins for both.
fn remembered(path: &Path, measure: impl FnOnce() -> u64) -> u64 {
    let read = || {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|k| *k > 0)
    };
    if let Some(khz) = read() {
        return khz;
    }
    let khz = measure();
    if let Err(err) = firkin_artifacts::write_bytes_atomic(path, khz.to_string().as_bytes()) {
        tracing::debug!(path = %path.display(), %err, "not remembering the TSC frequency");
    }
    read().unwrap_or(khz)
}

fn from_sysfs() -> Option<u64> {
    std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|k| *k > 0)
}

#[cfg(target_arch = "x86_64")]
fn calibrate() -> u64 {
    use crate::sys::rdtsc as _rdtsc;
    let best = (0..3)
        .filter_map(|_| {
            let t0 = Instant::now();
            let c0 = _rdtsc();
            std::thread::sleep(Duration::from_millis(100));
            let c1 = _rdtsc();
            let secs = t0.elapsed().as_secs_f64();
            (c1 > c0 && secs > 0.0).then(|| (c1 - c0) as f64 / secs / 1000.0)
        })
        .fold(f64::NAN, f64::min);
    if best.is_finite() && best > 100_000.0 {
        // Whole MHz: the measurement is not more precise than that.
        ((best / 1000.0).round() as u64) * 1000
    } else {
        FALLBACK_KHZ
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn calibrate() -> u64 {
    FALLBACK_KHZ
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measurement_is_remembered_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("khz");
        assert_eq!(remembered(&path, || 2_595_000), 2_595_000);
        // A later process measures nothing and gets the first value, whatever it would measure.
        assert_eq!(remembered(&path, || panic!("measured again")), 2_595_000);
        // Nowhere to keep it: still a value.
        assert_eq!(
            remembered(&dir.path().join("no/such/dir/khz"), || 2_596_000),
            2_596_000
        );
    }

    #[test]
    fn host_tsc_is_plausible() {
        let khz = host_tsc_khz();
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
