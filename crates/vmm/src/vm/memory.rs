//! What a QEMU process costs in memory, from `/proc/PID/smaps_rollup`.

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

/// Reads `/proc/PID/smaps_rollup`.
pub fn memory_of(pid: u32) -> Result<MemoryUsage> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| VmmError::Memory {
        pid,
        why: format!("{path}: {e}"),
    })?;
    Ok(parse_smaps_rollup(&text))
}

/// Parses the `Key:   N kB` lines of `smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> MemoryUsage {
    let mut m = MemoryUsage::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(v) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => m.rss_kib = v,
            "Pss:" => m.pss_kib = v,
            "Pss_Anon:" => m.pss_anon_kib = v,
            "Pss_File:" => m.pss_file_kib = v,
            "Private_Dirty:" => m.private_dirty_kib = v,
            "Shared_Clean:" => m.shared_clean_kib = v,
            _ => {}
        }
    }
    m
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
        let m = parse_smaps_rollup(text);
        assert_eq!(m.rss_kib, 82648);
        assert_eq!(m.pss_kib, 80095);
        assert_eq!(m.pss_file_kib, 39199);
        assert_eq!(m.private_dirty_kib, 40896);
        assert_eq!(m.shared_clean_kib, 2000);
    }
}
