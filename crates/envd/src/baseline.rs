//! Which processes a warm sandbox may hold when it is handed to a user: those of its template.
//!
//! A template build marks the processes running just before its snapshot (`/init` with
//! `markTemplateProcesses`); the mark is in the snapshot, so every restore knows its template's
//! processes. A warm-pool checkout's `/init` with `requireTemplateProcessesOnly` is refused if
//! anything else runs: an entry that ran something before its checkout is discarded, never
//! handed to the next user.

use std::collections::BTreeSet;
use std::path::Path;

/// `PF_KTHREAD` in `/proc/PID/stat`'s flags: kernel threads come and go on their own.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Every pid in `proc` (thread-group leaders; kernel threads included).
pub fn all_pids(proc: &Path) -> std::io::Result<BTreeSet<i32>> {
    Ok(std::fs::read_dir(proc)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// A process that was not there when the template was marked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Newcomer {
    pub pid: i32,
    /// `comm`, for the error message.
    pub name: String,
}

impl std::fmt::Display for Newcomer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.pid, self.name)
    }
}

/// User-space processes in `proc` that are not in `baseline` and are not `except` (envd itself).
///
/// A `stat` read costs ~0.5 ms of guest time under TCG, so pids already found to be kernel
/// threads are remembered in `kernel_threads` and not read again (a pid that left the listing
/// is forgotten, so a reused pid is read afresh). The check then costs one directory listing
/// plus a read per pid born since the last check.
pub fn newcomers(
    proc: &Path,
    baseline: &BTreeSet<i32>,
    except: i32,
    kernel_threads: &mut BTreeSet<i32>,
) -> std::io::Result<Vec<Newcomer>> {
    let pids = all_pids(proc)?;
    kernel_threads.retain(|p| pids.contains(p));
    let mut found = Vec::new();
    for pid in pids {
        if pid == except || baseline.contains(&pid) || kernel_threads.contains(&pid) {
            continue;
        }
        // A process that exited since the listing is no newcomer.
        let Ok(stat) = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")) else {
            continue;
        };
        match parse_stat(&stat) {
            Some((_, flags)) if flags & PF_KTHREAD != 0 => {
                kernel_threads.insert(pid);
            }
            Some((name, _)) => found.push(Newcomer { pid, name }),
            None => found.push(Newcomer {
                pid,
                name: "?".into(),
            }),
        }
    }
    Ok(found)
}

/// `comm` and `flags` from a `/proc/PID/stat` line. `comm` may hold spaces and parentheses,
/// so the fields are counted from its last `)`.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    // After `)`: state ppid pgrp session tty_nr tpgid flags ...
    let flags = stat
        .get(close + 1..)?
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()?;
    Some((name, flags))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_spaces_and_parens() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(line), Some(("a (b) c".into(), 4_194_560)));
        let kthread = "7 (kworker/0:1) I 2 0 0 0 -1 69238880 0 0";
        let (_, flags) = parse_stat(kthread).unwrap();
        assert_ne!(flags & PF_KTHREAD, 0);
    }

    #[test]
    fn finds_this_test_process_unless_marked() {
        let me = i32::try_from(std::process::id()).unwrap();
        let proc = Path::new("/proc");
        let baseline = all_pids(proc).unwrap();
        assert!(baseline.contains(&me));
        let mut kthreads = BTreeSet::new();
        let none = newcomers(proc, &baseline, 0, &mut kthreads).unwrap();
        assert!(none.iter().all(|n| n.pid != me));
        let empty = BTreeSet::new();
        let all = newcomers(proc, &empty, 0, &mut kthreads).unwrap();
        assert!(all.iter().any(|n| n.pid == me), "{all:?}");
        // Kernel threads are remembered, user processes never are.
        assert!(!kthreads.contains(&me));
        let again = newcomers(proc, &empty, 0, &mut kthreads).unwrap();
        assert!(again.iter().any(|n| n.pid == me), "{again:?}");
    }
}
