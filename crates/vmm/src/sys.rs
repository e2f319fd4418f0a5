//! The few operations that need `unsafe`: the code run between fork and exec, and reading the TSC.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Lowest fd number the pre-fork duplicates get, above every target number we use, so that
/// `dup2` in the child can never overwrite a source that is still needed.
const HIGH_FD: RawFd = 64;

/// Duplicates `fd` to a number ≥ [`HIGH_FD`], close-on-exec.
fn dup_high(fd: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a valid open fd returns a new fd that nobody else owns,
    // so wrapping it in an OwnedFd is sound.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above; `new` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Arranges for the child to get SIGKILL when the thread that forks it exits, to run without
/// transparent huge pages, and to inherit each `(fd, number)` at exactly that number.
///
/// The caller must fork from a thread that outlives the child (see `process::spawner`): Linux
/// delivers the parent-death signal when the forking *thread* exits. The only `pre_exec`
/// of the VMM, the runtime and the server: every child process they start (QEMU, host-mode
/// agents) goes through `process::spawn`.
pub(crate) fn configure_child(
    cmd: &mut Command,
    inherit: Vec<(OwnedFd, RawFd)>,
    netns: Option<OwnedFd>,
) -> io::Result<()> {
    let parent = std::process::id() as libc::pid_t;
    let high: Vec<(OwnedFd, RawFd)> = inherit
        .iter()
        .map(|(fd, target)| Ok((dup_high(fd)?, *target)))
        .collect::<io::Result<_>>()?;
    drop(inherit);
    let pairs: Vec<(RawFd, RawFd)> = high.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
    let netns_fd: Option<RawFd> = netns.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, setns, dup2); it allocates nothing
    // (`pairs` was built before the fork) and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            // Keep the duplicates alive (and so valid) until the child has copied them.
            let _keep = (&high, &netns);
            // Only the child moves into the sandbox's network namespace: its sockets and the
            // TAP it opens by name are the namespace's. The fd was opened (close-on-exec)
            // before the fork, so nothing is looked up here.
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // QEMU asks for huge pages on its TCG translation cache and small ROM blocks
            // (ACPI tables), which rounds each up to 2 MiB: ~3.5 MiB more per idle clone for
            // ~3% faster creates and commands (measured side by side; DEVELOPERS.md). Density
            // wins. Best effort: a kernel without the flag still runs QEMU. The runtime's
            // host-mode agents (the process backend, for tests) come through here too.
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
            // The parent may have died between fork and prctl; then nobody would kill us.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited before exec"));
            }
            for &(src, target) in &pairs {
                // dup2 clears close-on-exec on the target, so exactly these fds are inherited.
                if libc::dup2(src, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Reads the time-stamp counter.
#[cfg(target_arch = "x86_64")]
pub(crate) fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no memory effects and every x86_64 CPU has it
    // (user-space access is disabled only by CR4.TSD, which Linux does not set for processes
    // that haven't asked for it).
    unsafe { std::arch::x86_64::_rdtsc() }
}
