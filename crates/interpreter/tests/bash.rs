//! The service against bash_kernel (PyPI only: the code-interpreter template installs the
//! set-up's pinned wheel; the host has no bash_kernel). Ignored by default: run with
//! `FIRKIN_TEST_PYTHON=<a python with bash_kernel and ipykernel> cargo test -p
//! firkin-interpreter --test bash -- --ignored`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Service, python};
use serde_json::json;

/// bash_kernel's `kernel_info_reply` has no `language_info.version`, so the protocol crate
/// drops it as a bad message: the kernel must still be taken as ready (on its `idle` for the
/// request), not time out.
#[tokio::test]
#[ignore = "needs bash_kernel, which only the code-interpreter template installs"]
async fn bash_keeps_state() {
    let kernel = format!("bash={} -m bash_kernel -f {{connection_file}}", python());
    let svc = Service::start_with("bash", &["--kernel", &kernel]);
    let bash = |code: &str| json!({"code": code, "language": "bash"});
    let r = svc.execute(bash("X=21")).await;
    r.assert_ended();
    assert!(r.error().is_none(), "{:?}", r.lines);
    let r = svc.execute(bash("echo $((X*2))")).await;
    r.assert_ended();
    assert_eq!(r.stdout(), "42\n");
}
