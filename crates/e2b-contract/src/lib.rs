//! What the firkin runtime promises the E2B API layer: start requests, prepared templates, sandbox records, ports.
