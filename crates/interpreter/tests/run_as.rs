//! Kernels as another user (what a sandbox does: the service as root, kernels as `user`). Runs
//! only as root, since only root can switch; elsewhere it returns at once, saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Service;

const NOBODY: u32 = 65534;

#[tokio::test]
async fn kernels_run_as_the_given_uid_and_gid() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let uid = NOBODY.to_string();
    let svc = Service::start_with(
        "",
        &[
            "--uid",
            &uid,
            "--gid",
            &uid,
            "--home",
            home.path().to_str().unwrap(),
        ],
    );
    // The kernel must reach its cwd (the test's directory) and connection file as nobody.
    std::fs::set_permissions(svc.cwd.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = svc
        .run(
            "import os\nprint(os.getuid(), os.getgid(), os.environ['HOME'] == os.getcwd() or os.environ['HOME'])",
            None,
        )
        .await;
    run.assert_ended();
    assert!(run.error().is_none(), "{:?}", run.lines);
    let out = run.stdout();
    assert!(out.starts_with(&format!("{NOBODY} {NOBODY} ")), "{out:?}");
    assert!(out.contains(home.path().to_str().unwrap()), "{out:?}");
}
