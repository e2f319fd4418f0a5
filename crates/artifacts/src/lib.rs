//! Snapshot artifact manifests, integrity records, JSON sidecars and the verified-digest cache.
