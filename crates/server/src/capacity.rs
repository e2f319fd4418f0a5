//! Sizing the admission ledger from the host.

use std::path::Path;

use firkin_admission::ResourceBudget;
use firkin_types::Size;

/// How much of the host sandboxes may commit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CapacityPolicy {
    /// vCPUs per host CPU. Agent sandboxes idle most of the time; vCPUs are time-shared, so
    /// CPU is overcommitted far more than memory.
    pub cpu_overcommit: f64,
    /// Guest RAM per byte of host RAM. Clones map their template's RAM copy-on-write, so a
    /// sandbox touches much less than its nominal memory.
    pub memory_overcommit: f64,
    /// Host memory kept for the host itself, QEMU's own overhead and the page cache.
    pub memory_reserve: Size,
    /// Disk kept free under the sandboxes' quotas (the restore floor).
    pub disk_reserve: Size,
    /// Disk quota per byte of free disk. A sandbox's disk is a thin qcow2 overlay that holds
    /// only what the guest writes, so committing the whole quota up front would let a few
    /// sandboxes "fill" a disk they barely touch. The disk floor still stops restores for real
    /// when free space runs low.
    pub disk_overcommit: f64,
}

impl Default for CapacityPolicy {
    fn default() -> Self {
        Self {
            cpu_overcommit: 16.0,
            memory_overcommit: 1.5,
            memory_reserve: Size::gib(2),
            disk_reserve: firkin_runtime::DEFAULT_RESTORE_DISK_FLOOR,
            disk_overcommit: 4.0,
        }
    }
}

/// What the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostResources {
    pub cpus: u32,
    pub memory: Size,
    pub free_disk: Size,
}

#[derive(Debug, thiserror::Error)]
pub enum CapacityProbeError {
    #[error("cannot read /proc/meminfo: {0}")]
    Meminfo(#[source] procfs::ProcError),
    #[error("cannot measure free disk at {path}: {source}")]
    Disk {
        path: std::path::PathBuf,
        source: nix::Error,
    },
}

impl HostResources {
    /// Measures CPUs, `MemTotal` and the free disk of the filesystem holding `state_dir`.
    pub fn probe(state_dir: &Path) -> Result<Self, CapacityProbeError> {
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let meminfo =
            <procfs::Meminfo as procfs::Current>::current().map_err(CapacityProbeError::Meminfo)?;
        let memory = Size::bytes(meminfo.mem_total);
        let st =
            nix::sys::statvfs::statvfs(state_dir).map_err(|source| CapacityProbeError::Disk {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let free_disk = Size::bytes(st.blocks_available().saturating_mul(st.fragment_size()));
        Ok(Self {
            cpus,
            memory,
            free_disk,
        })
    }
}

fn scale(v: u64, factor: f64) -> u64 {
    let scaled = (v as f64) * factor.max(0.0);
    if scaled >= u64::MAX as f64 {
        u64::MAX
    } else {
        scaled as u64
    }
}

impl CapacityPolicy {
    /// What all sandboxes together may hold on `host`.
    pub fn capacity(&self, host: HostResources) -> ResourceBudget {
        let cpus =
            u32::try_from(scale(u64::from(host.cpus), self.cpu_overcommit)).unwrap_or(u32::MAX);
        let memory = Size::bytes(scale(host.memory.as_bytes(), self.memory_overcommit))
            .saturating_sub(self.memory_reserve);
        let disk = Size::bytes(scale(
            host.free_disk.saturating_sub(self.disk_reserve).as_bytes(),
            self.disk_overcommit,
        ));
        ResourceBudget::new(cpus.max(1), memory, disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_scales_and_reserves() {
        let host = HostResources {
            cpus: 2,
            memory: Size::gib(24),
            free_disk: Size::gib(100),
        };
        let c = CapacityPolicy::default().capacity(host);
        assert_eq!(c.cpus, 32);
        assert_eq!(c.memory, Size::gib(34));
        assert_eq!(c.disk, Size::gib(360));
        let tiny = HostResources {
            cpus: 1,
            memory: Size::gib(1),
            free_disk: Size::gib(5),
        };
        let c = CapacityPolicy::default().capacity(tiny);
        assert_eq!(c.memory, Size::ZERO);
        assert_eq!(c.disk, Size::ZERO);
    }

    #[test]
    fn probing_this_host_works() {
        let h = HostResources::probe(Path::new("/")).unwrap();
        assert!(h.cpus >= 1);
        assert!(h.memory > Size::mib(64));
    }
}
