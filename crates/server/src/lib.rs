//! firkin serve: the E2B-compatible control plane and sandbox-plane proxy, with SQLite state and admission.
