//! Removing a directory that may still have file systems mounted inside it.
//!
//! mmdebstrap mounts `/proc`, `/sys`, `/dev/pts` and `/dev/shm` inside the tree it builds and
//! unmounts them when it ends. A build killed in between (the server stopped, the machine
//! rebooted into the same cache, SIGKILL) leaves them mounted, and `remove_dir_all` descends
//! into mounts: it fails on `/proc` and `/sys` and deletes whatever a mounted `tmpfs` holds.
//! Every build tree is therefore removed through [`remove_tree`], which detaches the mounts
//! under it first.

use std::path::{Path, PathBuf};

/// Removes `dir` and everything in it, after detaching every mount at or below it. A `dir`
/// that does not exist is not an error.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let real = match std::fs::canonicalize(dir) {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // Without a readable mount table nothing can be mounted that we know of; the removal
    // below still refuses what it cannot delete.
    if let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") {
        for mount in mounts_under(&real, &table) {
            if let Err(err) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(mount = %mount.display(), %err, "cannot detach a mount inside a tree being removed");
            }
        }
    }
    match std::fs::remove_dir_all(&real) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The mount points in `mountinfo` (the text of `/proc/self/mountinfo`) at or below `dir`,
/// deepest first, so that each is detached before the one it sits in.
pub fn mounts_under(dir: &Path, mountinfo: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|mount| mount.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// The kernel writes space, tab, newline and backslash in mount points as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 0:5 / /c/t/b1/scratch/tree/proc rw - proc proc rw
91 22 0:6 / /c/t/b1/scratch/tree/dev/pts rw - devpts devpts rw
92 22 0:7 / /c/t/b1/scratch/tree/dev/shm rw - tmpfs tmpfs rw
93 22 0:8 / /c/t/b1/scratch/tree/dev rw - tmpfs tmpfs rw
94 22 0:9 / /c/t/b10/scratch/tree/proc rw - proc proc rw
95 22 0:10 / /c/t/b1/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_mounts_below_deepest_first_and_not_a_sibling_prefix() {
        let got = mounts_under(Path::new("/c/t/b1"), TABLE);
        let depth = |p: &PathBuf| p.components().count();
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got.windows(2).all(|w| depth(&w[0]) >= depth(&w[1])));
        assert!(!got.iter().any(|p| p.starts_with("/c/t/b10")));
        assert!(got.contains(&PathBuf::from("/c/t/b1/with space")));
        let dev = got.iter().position(|p| p.ends_with("tree/dev")).unwrap();
        let pts = got.iter().position(|p| p.ends_with("dev/pts")).unwrap();
        assert!(pts < dev);
    }

    #[test]
    fn unescapes_only_octal() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("a\\x"), "a\\x");
        assert_eq!(unescape("end\\04"), "end\\04");
    }

    #[test]
    fn removes_a_plain_tree_and_accepts_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), b"x").unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
    }

    /// Root only: a real tmpfs mounted inside the tree is detached, not emptied.
    #[test]
    fn detaches_a_real_mount_before_removing() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let mnt = tree.join("dev/shm");
        std::fs::create_dir_all(&mnt).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(mnt.join("held"), b"x").unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(mounts_under(dir.path(), &table).is_empty());
    }
}
