//! The in-sandbox agent of firkin, wire-compatible with E2B's envd.
//!
//! It serves the Connect RPC `process.Process` and `filesystem.Filesystem` services and the
//! plain-HTTP endpoints of the E2B envd protocol (see the protocol reference, §3-§5 and §8).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used
)]
mod generated {
    connectrpc::include_generated!();
}
pub use generated::{filesystem as fs_proto, process as process_proto};

pub mod baseline;
pub mod client;
pub mod fsops;
pub mod guest;
pub mod http;
pub mod process;
pub mod reaper;
pub mod rpc;
pub mod sandbox_state;
pub mod server;
pub mod state;
pub mod sys;
pub mod users;
pub mod watch;
