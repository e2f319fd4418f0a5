//! The one place this crate needs `unsafe`: making a child process die with the server.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Arranges for the child to get SIGKILL when the thread that spawns it exits (Linux
/// `PR_SET_PDEATHSIG`; see DEVELOPERS.md: spawn from a thread that lives as long as the server).
/// If the parent is already gone when the child starts, the child exits at once.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child between fork and exec. It only calls
    // `prctl` and `getppid`, which are async-signal-safe, allocates nothing and touches no
    // parent state other than the copied `parent` integer.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other(
                    "parent exited before the child started",
                ));
            }
            Ok(())
        });
    }
}
