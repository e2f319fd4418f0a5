//! VM and session state that snapshots persist.
//!
//! A restored clone must not look like its siblings to the outside world: it gets its own
//! machine identifier and network MACs, and its own staging directory for per-VM files. This
//! crate holds those facts; the runtime persists them beside a snapshot and the VMM applies
//! them.

use std::path::{Path, PathBuf};

/// The identity and scratch space of one VM, as saved with (and restored from) a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSnapshotState {
    staging_dir: PathBuf,
    machine_identifier: Vec<u8>,
    network_macs: Vec<String>,
}

impl ContainerSnapshotState {
    pub fn new(
        staging_dir: impl Into<PathBuf>,
        machine_identifier: Vec<u8>,
        network_macs: Vec<String>,
    ) -> Self {
        Self {
            staging_dir: staging_dir.into(),
            machine_identifier,
            network_macs,
        }
    }

    /// Directory holding the VM's per-instance files (overlay, sockets, logs).
    pub fn staging_dir(&self) -> &Path {
        &self.staging_dir
    }

    /// Opaque bytes that identify the machine to the guest (firkin uses 16 random bytes).
    pub fn machine_identifier(&self) -> &[u8] {
        &self.machine_identifier
    }

    /// MAC addresses of the VM's network interfaces, in device order, as `02:xx:xx:xx:xx:xx`.
    pub fn network_macs(&self) -> &[String] {
        &self.network_macs
    }
}

/// A locally administered unicast MAC address derived from `seed` bytes (for example a sandbox's
/// random machine identifier): first octet `02`, the rest from the seed.
pub fn locally_administered_mac(seed: &[u8]) -> String {
    let mut octets = [0x02u8, 0, 0, 0, 0, 0];
    for (i, b) in seed.iter().take(5).enumerate() {
        octets[i + 1] = *b;
    }
    octets
        .iter()
        .map(|o| format!("{o:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_locally_administered_unicast() {
        let mac = locally_administered_mac(&[0xff, 1, 2, 3, 4, 5]);
        assert_eq!(mac, "02:ff:01:02:03:04");
        assert_eq!(locally_administered_mac(&[]), "02:00:00:00:00:00");
    }
}
