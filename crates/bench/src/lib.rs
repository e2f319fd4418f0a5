//! `firkin bench`: create latency, time to interactive, command round trip, file throughput,
//! memory and idle CPU per sandbox, each reported next to a floor measured in the same run.
//!
//! The machine this runs on is shared and noisy, so absolute numbers drift between runs; the
//! ratios to same-run floors are what the targets are stated in.

pub mod chart;
pub mod client;
pub mod idle;
pub mod interpreter;
pub mod mem;
pub mod network;
pub mod report;
pub mod stats;
pub mod suite;

pub use client::{Api, ClientError, Created, EnvdTarget};
pub use report::{BenchResults, Floors, MachineInfo};
pub use stats::Summary;
