//! What a QEMU process costs in memory, from `/proc/PID/smaps_rollup`.

use procfs::FromBufRead;
use procfs::process::{Process, SmapsRollup};
use serde::Serialize;

use crate::error::{Result, VmmError};

/// Memory of one QEMU process, from `/proc/PID/smaps_rollup` (KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUsage {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_file_kib: u64,
    pub private_dirty_kib: u64,
    pub shared_clean_kib: u64,
}

impl From<&SmapsRollup> for MemoryUsage {
    fn from(rollup: &SmapsRollup) -> Self {
        // procfs reports bytes; the rollup has one map, but summing is right for any number.
        let kib = |key: &str| -> u64 {
            rollup
                .memory_map_rollup
                .iter()
                .filter_map(|m| m.extension.map.get(key))
                .sum::<u64>()
                / 1024
        };
        Self {
            rss_kib: kib("Rss"),
            pss_kib: kib("Pss"),
            pss_anon_kib: kib("Pss_Anon"),
            pss_file_kib: kib("Pss_File"),
            private_dirty_kib: kib("Private_Dirty"),
            shared_clean_kib: kib("Shared_Clean"),
        }
    }
}

/// Reads `/proc/PID/smaps_rollup`.
pub fn memory_of(pid: u32) -> Result<MemoryUsage> {
    let err = |e: procfs::ProcError| VmmError::Memory {
        pid,
        why: format!("/proc/{pid}/smaps_rollup: {e}"),
    };
    let raw = i32::try_from(pid).map_err(|e| VmmError::Memory {
        pid,
        why: e.to_string(),
    })?;
    let rollup = Process::new(raw)
        .and_then(|p| p.smaps_rollup())
        .map_err(err)?;
    Ok(MemoryUsage::from(&rollup))
}

/// Parses the text of a `smaps_rollup` file; `None` when it is not one.
pub fn parse_smaps_rollup(text: &str) -> Option<MemoryUsage> {
    SmapsRollup::from_buf_read(text.as_bytes())
        .ok()
        .map(|r| MemoryUsage::from(&r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_is_parsed() {
        let text = "55d0c0a00000-7ffd5b1fe000 ---p 00000000 00:00 0    [rollup]\n\
            Rss:               82648 kB\nPss:               80095 kB\nPss_Dirty:         40896 kB\n\
            Pss_Anon:          40896 kB\nPss_File:          39199 kB\nShared_Clean:       2000 kB\n\
            Private_Dirty:     40896 kB\n";
        let m = parse_smaps_rollup(text).unwrap_or_default();
        assert_eq!(m.rss_kib, 82648);
        assert_eq!(m.pss_kib, 80095);
        assert_eq!(m.pss_file_kib, 39199);
        assert_eq!(m.private_dirty_kib, 40896);
        assert_eq!(m.shared_clean_kib, 2000);
    }

    #[test]
    fn own_memory_is_read() {
        let m = memory_of(std::process::id()).unwrap();
        assert!(m.rss_kib > 0 && m.pss_kib > 0);
    }
}
