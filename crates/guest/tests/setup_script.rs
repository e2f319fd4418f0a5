//! `scripts/setup-guest.sh` on a machine that has never seen a package it asks about.
//!
//! A fresh Debian machine has never heard of `qemu-system-x86`: `dpkg-query` exits 1 for it,
//! and under `set -o pipefail` that once ended the whole set-up silently, before apt ran.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// The body of one shell function of the script, `name() {` to the first line that is `}`.
fn shell_function(script: &str, name: &str) -> String {
    let start = script
        .find(&format!("\n{name}() {{"))
        .unwrap_or_else(|| panic!("{name}() not found in setup-guest.sh"));
    let rest = &script[start..];
    let end = rest.find("\n}\n").expect("function has no closing brace") + 3;
    rest[..end].to_string()
}

#[test]
fn installed_version_of_a_package_never_seen_is_empty_and_not_fatal() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup-guest.sh");
    let script = std::fs::read_to_string(&path).expect("read setup-guest.sh");
    let function = shell_function(&script, "installed_version");
    let probe = format!(
        "set -Eeuo pipefail\n{function}\nv=$(installed_version firkin-no-such-package-4f2a)\n\
         printf 'version=[%s]\\n' \"$v\"\n"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&probe)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "installed_version ended the script for an unknown package: {:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "version=[]");
}
