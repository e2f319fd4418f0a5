//! VM and session state that snapshots persist.
