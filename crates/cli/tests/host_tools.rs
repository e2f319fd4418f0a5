//! `firkin doctor` and `firkin serve` on a machine where one host program (`qemu-img`) is
//! missing: doctor fails naming it and its package; serve refuses to start, at once, in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use firkin_guest::host_tools::path_without;
use support::free_port;

mod support;

fn firkin(dir: &Path, path: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_firkin"));
    cmd.env("PATH", path)
        .env("FIRKIN_STATE_DIR", dir.join("state"))
        .env("FIRKIN_CACHE_DIR", dir.join("cache"))
        .env("FIRKIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env_remove("FIRKIN_QEMU")
        .stdin(Stdio::null());
    cmd
}

/// `firkin doctor --json` with `PATH` set to `path`: whether it passed, and its `qemu-img` check.
fn doctor_qemu_img(dir: &Path, path: &Path) -> (bool, serde_json::Value) {
    let out = firkin(dir, path)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "qemu-img")
        .unwrap_or_else(|| panic!("no qemu-img check in {checks}"))
        .clone();
    (out.status.success(), check)
}

#[test]
fn doctor_fails_naming_the_missing_tool_and_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, check) = doctor_qemu_img(dir.path(), &path_without(dir.path(), "qemu-img").unwrap());
    assert!(!ok, "doctor passed without qemu-img");
    assert_eq!(check["status"], "fail");
    let detail = check["detail"].as_str().unwrap();
    assert!(detail.contains("qemu-utils"), "{detail}");

    // The same machine with qemu-img: that check passes.
    let full = std::env::var_os("PATH").unwrap();
    let (_, check) = doctor_qemu_img(dir.path(), Path::new(&full));
    assert_eq!(check["status"], "ok", "{check}");
}

#[test]
fn serve_refuses_to_start_without_a_tool_creates_need() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_without(dir.path(), "qemu-img").unwrap();
    let began = Instant::now();
    let out = firkin(dir.path(), &path)
        .args(["serve", "--no-default-template"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let took = began.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started without qemu-img");
    assert!(
        took < Duration::from_secs(2),
        "serve took {took:?} to refuse"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(lines[0].contains("qemu-img"), "{stderr}");
    assert!(lines[0].contains("qemu-utils"), "{stderr}");
}
