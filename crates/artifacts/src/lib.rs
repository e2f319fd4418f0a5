//! Snapshot artifact manifests, integrity records, JSON sidecars and the verified-digest cache.
//!
//! An *artifact* is one file on disk that a restore depends on. Beside it live JSON sidecars,
//! named by replacing the artifact's extension:
//!
//! | artifact            | sidecar                        | type                          |
//! |---------------------|--------------------------------|-------------------------------|
//! | `repo-main.vz`      | `repo-main.manifest.json`      | [`SnapshotArtifactManifest`]  |
//! | `repo-main.vz`      | `repo-main.integrity.json`     | [`SnapshotArtifactIntegrity`] |
//!
//! A QEMU snapshot has several component files (RAM image, device state, disk, kernel,
//! initramfs). Its artifact is a [`SealedSnapshot`] descriptor that lists every component with its
//! size and SHA-256; the integrity sidecar covers the descriptor, and the descriptor covers the
//! components.
//!
//! Hashing a multi-GiB RAM image on every restore is not acceptable, so verification goes through
//! a [`DigestCache`] keyed by file identity: an unchanged file costs one `stat`.

mod cache;
mod integrity;
mod io;
mod manifest;
mod sealed;

pub use cache::{CacheLookup, DigestCache, FileDigest, FileIdentity, hash_file};
pub use integrity::{IntegrityError, SnapshotArtifactIntegrity};
pub use io::{AtomicWriteError, SidecarError, sidecar_path, write_atomic_with, write_bytes_atomic};
pub use manifest::{SnapshotArtifactKind, SnapshotArtifactManifest};
pub use sealed::{ComponentDigest, SealError, SealedSnapshot};
