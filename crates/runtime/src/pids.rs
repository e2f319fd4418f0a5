//! Host processes by pid: recognising our own agents and VMMs after a crash, and the restart
//! sweep that kills whatever the previous server left running and deletes its run directories.

use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use procfs::process::{Process, Stat};

fn stat(pid: u32) -> Option<Stat> {
    Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()
}

/// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat`'s `starttime`). Together
/// with the pid it identifies a process: a pid reused later has a later start time.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.starttime)
}

/// Whether `pid` is alive (not a zombie waiting to be reaped) and is the process that had
/// `start` as its start time.
pub fn is_same_process(pid: u32, start: u64) -> bool {
    // A zombie (Z) or dead (X) process has exited already; only a `wait` is missing.
    stat(pid).is_some_and(|s| s.starttime == start && !matches!(s.state, 'Z' | 'X'))
}

/// SIGKILLs `pid` if it is still the process recorded with `start`. Returns whether it sent
/// the signal.
pub fn kill_if_same(pid: u32, start: u64) -> bool {
    is_same_process(pid, start) && kill_pid(pid)
}

/// Processes of this user whose command line mentions `dir` (e.g. a VMM whose sockets and disks
/// live in the state directory's run directories). Used at startup, when nothing under `dir` can
/// legitimately be running: the state-directory lock proves no other server owns it.
pub fn processes_referencing(dir: &Path) -> Vec<u32> {
    let Some(needle) = dir.to_str().filter(|d| !d.is_empty()) else {
        return Vec::new();
    };
    let me = std::process::id();
    let uid = nix::unistd::getuid().as_raw();
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter(|p| u32::try_from(p.pid()).is_ok_and(|pid| pid != me))
        .filter(|p| p.uid().is_ok_and(|u| u == uid))
        .filter(|p| {
            p.cmdline()
                .is_ok_and(|args| args.iter().any(|a| a.contains(needle)))
        })
        .filter_map(|p| u32::try_from(p.pid()).ok())
        .collect()
}

/// Whether `root` or one of its descendants holds a TCP socket listening on `port` (any local
/// address, IPv4 or IPv6). The process backend routes a sandbox's port only then: its agent
/// runs on the host, and without this check the sandbox plane would reach any service on the
/// host's loopback for anyone who knows a sandbox id.
pub fn tree_listens_on(root: u32, port: u16) -> bool {
    use procfs::net::TcpState;
    use procfs::process::FDTarget;
    let listening: std::collections::HashSet<u64> = [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .filter_map(Result::ok)
        .flatten()
        .filter(|e| e.state == TcpState::Listen && e.local_address.port() == port)
        .map(|e| e.inode)
        .collect();
    if listening.is_empty() {
        return false;
    }
    let Ok(all) = procfs::process::all_processes() else {
        return false;
    };
    let mut children: std::collections::HashMap<i32, Vec<Process>> = Default::default();
    let mut root_proc = None;
    for p in all.filter_map(Result::ok) {
        if u32::try_from(p.pid()).is_ok_and(|pid| pid == root) {
            root_proc = Some(p);
        } else if let Ok(st) = p.stat() {
            children.entry(st.ppid).or_default().push(p);
        }
    }
    let mut todo: Vec<Process> = root_proc.into_iter().collect();
    // Bounded by the number of processes: each is visited at most once (a tree has no cycles).
    while let Some(p) = todo.pop() {
        let holds = p.fd().is_ok_and(|fds| {
            fds.filter_map(Result::ok).any(
                |fd| matches!(fd.target, FDTarget::Socket(inode) if listening.contains(&inode)),
            )
        });
        if holds {
            return true;
        }
        todo.extend(children.remove(&p.pid()).unwrap_or_default());
    }
    false
}

/// SIGKILLs `pid` (by number; for the startup sweep only).
pub fn kill_pid(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
}

/// What [`sweep_run_dirs`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunDirSweep {
    pub killed_processes: usize,
    pub removed_run_dirs: usize,
}

/// Kills every process of ours that still references `sandboxes_dir` and deletes every run
/// directory in it. Only for a server's start, with the state-directory lock held: warm-pool
/// entries and half-started sandboxes have no record, so anything running from there belongs
/// to a dead server.
pub fn sweep_run_dirs(sandboxes_dir: &Path) -> RunDirSweep {
    let mut sweep = RunDirSweep::default();
    for pid in processes_referencing(sandboxes_dir) {
        if kill_pid(pid) {
            tracing::warn!(pid, "killed a leftover sandbox process");
            sweep.killed_processes += 1;
        }
    }
    if let Ok(entries) = std::fs::read_dir(sandboxes_dir) {
        for e in entries.filter_map(Result::ok) {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), %err, "cannot remove directory");
                }
            }
            sweep.removed_run_dirs += 1;
        }
    }
    sweep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let me = std::process::id();
        let t = start_time(me);
        assert!(t.is_some());
        assert_eq!(start_time(me), t);
        assert!(t.is_some_and(|t| is_same_process(me, t)));
        assert!(t.is_some_and(|t| !is_same_process(me, t + 1)));
        assert_eq!(start_time(u32::MAX), None);
    }
}
