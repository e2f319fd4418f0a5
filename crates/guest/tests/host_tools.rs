//! The set-up's final check (`scripts/setup-guest.sh --verify`, which runs `firkin-guest
//! host-tools check`) fails, naming the tool and its package, when a host program is absent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use firkin_guest::host_tools::path_without;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn verify(path: &Path) -> (bool, String) {
    let out = Command::new("/bin/bash")
        .arg(repo().join("scripts/setup-guest.sh"))
        .arg("--verify")
        .env("PATH", path)
        .env("FIRKIN_GUEST_TOOL", env!("CARGO_BIN_EXE_firkin-guest"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_final_check_fails_naming_a_missing_tool_and_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = verify(&path_without(dir.path(), "qemu-img").unwrap());
    assert!(!ok, "the check passed without qemu-img:\n{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL line:\n{text}"));
    assert!(line.contains("qemu-img"), "{line}");
    assert!(line.contains("qemu-utils"), "{line}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("FAIL")).count(),
        1,
        "{text}"
    );
}

#[test]
fn the_final_check_passes_on_a_set_up_machine() {
    let path = std::env::var_os("PATH").unwrap();
    let (ok, text) = verify(Path::new(&path));
    assert!(ok, "the set-up left a tool missing:\n{text}");
}
