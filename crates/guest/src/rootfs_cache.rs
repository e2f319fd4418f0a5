//! Finished root filesystem images, kept by what they were built from, so that a second build
//! from the same Debian source (the same template on another kind of network, a template made
//! from `base` plus commands, a rebuild after new guest binaries) copies an image instead of
//! running mmdebstrap again: minutes under load, for an identical tree.
//!
//! An entry is `<key>.img` plus `<key>.json` (its [`RootfsInfo`]); the JSON is written last, so
//! an entry without it is an interrupted copy and never used. Only Debian sources are kept: an
//! OCI archive or a directory is named by a path whose contents can change.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{GuestError, Result};
use crate::rootfs::{ImageOptions, ROOTFS_RULES_VERSION, RootfsInfo, RootfsSource, build_rootfs};
use crate::tool::run;
use crate::{Progress, ProgressFn};

/// Entries kept: `base`, the code interpreter's image and one custom source. Each is one
/// template's root filesystem (1-4 GiB, sparse); the least recently used goes first.
pub const ROOTFS_CACHE_ENTRIES: usize = 3;

/// A copy older than this was left by a process that died.
const STALE_PARTIAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// A directory of finished images.
#[derive(Debug, Clone)]
pub struct RootfsCache {
    dir: PathBuf,
    keep: usize,
}

#[derive(Serialize)]
struct KeyParts<'a> {
    rules: u32,
    firkin: &'a str,
    source: &'a RootfsSource,
    opts: &'a ImageOptions,
}

impl RootfsCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            keep: ROOTFS_CACHE_ENTRIES,
        }
    }

    /// Keeps at most `keep` entries (at least one).
    pub fn with_capacity(mut self, keep: usize) -> Self {
        self.keep = keep.max(1);
        self
    }

    /// What an image built from `source` with `opts` is kept under; `None` for sources that
    /// are not kept. Covers firkin's own rules for the tree ([`ROOTFS_RULES_VERSION`]).
    pub fn key(source: &RootfsSource, opts: &ImageOptions) -> Option<String> {
        if !matches!(source, RootfsSource::Debian { .. }) {
            return None;
        }
        let parts = KeyParts {
            rules: ROOTFS_RULES_VERSION,
            firkin: env!("CARGO_PKG_VERSION"),
            source,
            opts,
        };
        let json = serde_json::to_vec(&parts).ok()?;
        Some(hex::encode(Sha256::digest(&json)))
    }

    /// [`build_rootfs`] through the cache: a kept image is copied to `out` (sparse, a reflink
    /// where the filesystem has them); otherwise the image is built and then kept. Failing to
    /// keep one is logged, never the build's failure.
    pub fn build(
        &self,
        source: &RootfsSource,
        scratch: &Path,
        out: &Path,
        opts: &ImageOptions,
        progress: ProgressFn<'_>,
    ) -> Result<RootfsInfo> {
        let Some(key) = Self::key(source, opts) else {
            return build_rootfs(source, scratch, out, opts, progress);
        };
        if let Some(info) = self.lookup(&key) {
            progress(&Progress {
                phase: "rootfs cache".into(),
                done: 1,
                total: Some(1),
                message: format!("reusing the image built from the same source ({key:.12})"),
            });
            copy_whole(&self.image(&key), out)?;
            return Ok(RootfsInfo {
                image: out.to_owned(),
                ..info
            });
        }
        let info = build_rootfs(source, scratch, out, opts, progress)?;
        if let Err(err) = self.keep(&key, &info) {
            tracing::warn!(%err, key, "cannot keep the root filesystem image for later builds");
        }
        Ok(info)
    }

    fn image(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.img"))
    }

    fn info(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// A complete entry's info; marks it used.
    fn lookup(&self, key: &str) -> Option<RootfsInfo> {
        let info_path = self.info(key);
        let info: RootfsInfo = serde_json::from_slice(&std::fs::read(&info_path).ok()?).ok()?;
        if !self.image(key).is_file() {
            return None;
        }
        // The info file's mtime is the entry's last use, for eviction.
        if let Ok(f) = std::fs::File::options().write(true).open(&info_path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(info)
    }

    fn keep(&self, key: &str, info: &RootfsInfo) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(GuestError::io("creating", &self.dir))?;
        copy_whole(&info.image, &self.image(key))?;
        let json = serde_json::to_vec(info).map_err(|e| GuestError::Io {
            op: "encoding",
            path: self.info(key),
            source: e.into(),
        })?;
        let info_path = self.info(key);
        firkin_artifacts::write_bytes_atomic(&info_path, &json)
            .map_err(GuestError::io("writing", &info_path))?;
        self.evict();
        Ok(())
    }

    /// Removes the least recently used entries beyond the capacity, and leftovers of copies
    /// that never finished.
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut used: Vec<(SystemTime, String)> = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".json") {
                let at = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                used.push((at, key.to_owned()));
            } else if name.ends_with(".partial") {
                // Another process may be copying into its own right now; an hour-old one died.
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > STALE_PARTIAL));
                if stale {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        used.sort();
        let excess = used.len().saturating_sub(self.keep);
        for (_, key) in used.into_iter().take(excess) {
            // The marker first: an entry is never found half removed.
            let _ = std::fs::remove_file(self.info(&key));
            let _ = std::fs::remove_file(self.image(&key));
        }
    }
}

/// Copies `from` to `to` through a sibling `.partial` file and a rename, so that `to` exists
/// only complete (as [`build_rootfs`] promises of its image, and the cache of its entries).
fn copy_whole(from: &Path, to: &Path) -> Result<()> {
    let name = to
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    let partial = to.with_file_name(format!(".{name}.{}.partial", std::process::id()));
    let copied = copy_sparse(from, &partial)
        .and_then(|()| std::fs::rename(&partial, to).map_err(GuestError::io("renaming", &partial)));
    if copied.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    copied
}

/// Copies an image keeping its holes (an ext4 image is mostly unwritten space), as a reflink
/// where the filesystem shares extents.
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    run(
        "cp",
        &[
            "--sparse=always".as_ref(),
            "--reflink=auto".as_ref(),
            "--".as_ref(),
            from.as_os_str(),
            to.as_os_str(),
        ],
        None,
    )
    .map(|_| ())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn debian(packages: &[&str]) -> RootfsSource {
        RootfsSource::Debian {
            suite: "bookworm".into(),
            packages: packages.iter().map(|p| (*p).to_owned()).collect(),
            mirror: None,
            user: None,
        }
    }

    #[test]
    fn keys_follow_source_and_options_and_skip_path_sources() {
        let opts = ImageOptions::default();
        let a = RootfsCache::key(&debian(&["curl"]), &opts).unwrap();
        assert_eq!(
            Some(&a),
            RootfsCache::key(&debian(&["curl"]), &opts).as_ref()
        );
        assert_ne!(
            Some(&a),
            RootfsCache::key(&debian(&["wget"]), &opts).as_ref()
        );
        let bigger = ImageOptions {
            headroom_mib: 2048,
            ..ImageOptions::default()
        };
        assert_ne!(
            Some(&a),
            RootfsCache::key(&debian(&["curl"]), &bigger).as_ref()
        );
        let dir = RootfsSource::Directory {
            path: "/tmp".into(),
        };
        assert_eq!(RootfsCache::key(&dir, &opts), None);
    }

    /// A kept entry: an image with a hole, and its info.
    fn put(cache: &RootfsCache, key: &str) {
        std::fs::create_dir_all(&cache.dir).unwrap();
        let f = std::fs::File::create(cache.image(key)).unwrap();
        f.set_len(64 << 20).unwrap();
        std::fs::write(
            cache.info(key),
            serde_json::to_vec(&RootfsInfo {
                image: "/elsewhere/disk.img".into(),
                content_bytes: 1,
                image_bytes: 64 << 20,
            })
            .unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn an_entry_is_used_only_when_complete_and_copied_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(dir.path().join("rootfs"));
        put(&cache, "k");
        std::fs::remove_file(cache.info("k")).unwrap();
        assert!(
            cache.lookup("k").is_none(),
            "an image without its info is a partial copy"
        );
        put(&cache, "k");
        let info = cache.lookup("k").unwrap();
        assert_eq!(info.image_bytes, 64 << 20);
        let out = dir.path().join("disk.img");
        copy_whole(&cache.image("k"), &out).unwrap();
        let mut beside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        beside.sort();
        assert_eq!(beside, ["disk.img", "rootfs"], "a partial copy was left");
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "the copy filled its holes");
    }

    #[test]
    fn eviction_drops_the_least_recently_used_and_stale_partials() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(dir.path()).with_capacity(2);
        for key in ["old", "mid", "new"] {
            put(&cache, key);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Using "old" makes "mid" the least recently used.
        cache.lookup("old").unwrap();
        let dead = dir.path().join(".x.img.1.partial");
        let fresh = dir.path().join(".y.img.2.partial");
        std::fs::write(&dead, b"").unwrap();
        std::fs::write(&fresh, b"").unwrap();
        let two_hours_ago = SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&dead)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        cache.evict();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".y.img.2.partial",
                "new.img",
                "new.json",
                "old.img",
                "old.json"
            ]
        );
    }
}
