//! The host's TSC frequency, which the guest kernel must be told.
//!
//! Under TCG, QEMU hands the guest the host's time-stamp counter, so the guest's TSC ticks at
//! the host's rate. The guest cannot calibrate it reliably on a busy host (it can hang doing
//! so), so firkin passes `tsc_early_khz=`; a wrong value makes the guest clock run fast or slow
//! by the ratio (a fixed 2 GHz on a 2.3 GHz host made guest time gain 15 %).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Used only where the TSC cannot be read at all (not x86_64).
const FALLBACK_KHZ: u64 = 2_000_000;

/// Host TSC frequency in kHz: the kernel's value when exported, else measured once against the
/// monotonic clock over 100 ms.
pub fn host_tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(|| from_sysfs().unwrap_or_else(calibrate))
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
    fn host_tsc_is_plausible() {
        let khz = host_tsc_khz();
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
