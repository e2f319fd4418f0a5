use std::path::Path;

use serde::{Deserialize, Serialize};

/// Memory of one process from `/proc/<pid>/smaps_rollup`, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMemory {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub private_clean_kib: u64,
    pub private_dirty_kib: u64,
    pub shared_clean_kib: u64,
    pub shared_dirty_kib: u64,
}

impl ProcessMemory {
    pub fn private_kib(&self) -> u64 {
        self.private_clean_kib + self.private_dirty_kib
    }

    pub fn of_pid(pid: u32) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        Ok(Self::parse(&text))
    }

    pub fn parse(smaps_rollup: &str) -> Self {
        let mut m = Self::default();
        for line in smaps_rollup.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(kib) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "Rss:" => m.rss_kib = kib,
                "Pss:" => m.pss_kib = kib,
                "Private_Clean:" => m.private_clean_kib = kib,
                "Private_Dirty:" => m.private_dirty_kib = kib,
                "Shared_Clean:" => m.shared_clean_kib = kib,
                "Shared_Dirty:" => m.shared_dirty_kib = kib,
                _ => {}
            }
        }
        m
    }
}

/// `MemAvailable` from `/proc/meminfo`, in KiB.
pub fn mem_available_kib() -> std::io::Result<u64> {
    meminfo_field(Path::new("/proc/meminfo"), "MemAvailable:")
}

pub fn mem_total_kib() -> std::io::Result<u64> {
    meminfo_field(Path::new("/proc/meminfo"), "MemTotal:")
}

fn meminfo_field(path: &Path, key: &str) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("{key} missing in {}", path.display())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_rollup() {
        let text = "00400000-7ffd [rollup]\nRss:               54000 kB\nPss:               41000 kB\n\
                    Pss_Anon: 1 kB\nShared_Clean:      12000 kB\nShared_Dirty:          0 kB\n\
                    Private_Clean:       500 kB\nPrivate_Dirty:     41500 kB\n";
        let m = ProcessMemory::parse(text);
        assert_eq!(m.rss_kib, 54000);
        assert_eq!(m.pss_kib, 41000);
        assert_eq!(m.private_kib(), 42000);
    }

    #[test]
    fn reads_this_process_and_host() {
        let m = ProcessMemory::of_pid(std::process::id()).unwrap();
        assert!(m.rss_kib > 0 && m.pss_kib > 0);
        assert!(mem_available_kib().unwrap() > 0);
        assert!(mem_total_kib().unwrap() >= mem_available_kib().unwrap());
    }
}
