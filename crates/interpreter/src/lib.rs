//! The code interpreter service on port 49999: E2B's `/execute` and `/contexts` API in front of
//! Jupyter kernels spoken to over ZeroMQ.

pub mod contexts;
pub mod envvars;
pub mod error;
pub mod execution;
pub mod http;
pub mod kernel;
pub mod language;
pub mod output;
pub mod sandbox;
pub mod service;

pub use contexts::{Contexts, ServiceConfig};
pub use kernel::KernelOptions;
pub use service::serve;
