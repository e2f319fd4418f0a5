//! Integration tests: each test starts a real `firkin-envd --listen 127.0.0.1:0` in host mode
//! and talks to it over HTTP/1.1 like the SDK does.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod filesystem_rpc;
mod guest_ns;
mod http_api;
mod process_rpc;
mod robustness;
