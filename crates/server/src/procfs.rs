//! Just enough of `/proc` to recognise our own VMM processes after a crash.

use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22). Together with
/// the pid it identifies a process: a pid reused later has a later start time.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) is in parentheses and may contain spaces or ')'; fields after the last ')'
    // are plain. starttime is field 22, i.e. the 20th after comm.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is alive (not a zombie waiting to be reaped) and is the process that had
/// `start` as its start time.
pub fn is_same_process(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start) && !is_zombie(pid)
}

/// A zombie has exited already; only its parent's (or init's) `wait` is missing.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|s| s == "Z" || s == "X")
        })
        .unwrap_or(true)
}

/// SIGKILLs `pid` if it is still the process recorded with `start`. Returns whether it sent
/// the signal.
pub fn kill_if_same(pid: u32, start: u64) -> bool {
    if !is_same_process(pid, start) {
        return false;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
}

/// Processes of this user whose command line mentions `dir` (e.g. a VMM whose sockets and disks
/// live in the state directory's run directories). Used at startup, when nothing under `dir` can
/// legitimately be running: the state-directory lock proves no other server owns it.
pub fn processes_referencing(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    if needle.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let uid = nix::unistd::getuid().as_raw();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid)
        })
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// SIGKILLs `pid` (by number; for the startup sweep only).
pub fn kill_pid(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
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
