use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::io::{read_json, write_json_atomic};

/// Size and SHA-256 of a file's whole content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size_bytes: u64,
    pub sha256_hex: String,
}

/// What identifies one version of a file without reading it.
///
/// `ctime` is the key ingredient: user space can set `mtime` to anything, but any write, truncate,
/// chmod or `utimes` moves `ctime` to "now", and nothing but the kernel sets it. So a rewrite is
/// caught even when it keeps the size and forges the mtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    pub ctime_sec: i64,
    pub ctime_nsec: i64,
}

impl FileIdentity {
    pub fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime_sec: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }

    pub fn of_path(path: &Path) -> std::io::Result<Self> {
        fs::metadata(path).map(|m| Self::of(&m))
    }

    fn ctime(&self) -> SystemTime {
        let nanos = u32::try_from(self.ctime_nsec).unwrap_or(0);
        match u64::try_from(self.ctime_sec) {
            Ok(secs) => UNIX_EPOCH + Duration::new(secs, nanos),
            Err(_) => UNIX_EPOCH,
        }
    }
}

/// Whether a digest came from the cache or from reading the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLookup {
    Hit,
    Miss,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    identity: FileIdentity,
    digest: FileDigest,
}

#[derive(Default, Serialize, Deserialize)]
struct OnDisk {
    entries: Vec<Entry>,
}

/// Digests of files already hashed, keyed by [`FileIdentity`].
///
/// Timestamps have a coarse granularity (the kernel stamps files from a clock that ticks every
/// few milliseconds), so two writes in one tick can leave identical identities. A file whose
/// `ctime` is younger than the *racy window* when hashing finishes is therefore hashed but not
/// cached, the same way git treats "racily clean" index entries. Any later rewrite of a cached
/// file lands at least a window after its cached `ctime` and so changes the identity.
#[derive(Debug)]
pub struct DigestCache {
    entries: Mutex<HashMap<(u64, u64), Entry>>,
    racy_window: Duration,
    persist_to: Option<PathBuf>,
}

impl DigestCache {
    /// The default racy window. Comfortably above any kernel timestamp granularity.
    pub const DEFAULT_RACY_WINDOW: Duration = Duration::from_secs(1);

    pub fn in_memory() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            racy_window: Self::DEFAULT_RACY_WINDOW,
            persist_to: None,
        }
    }

    /// A cache that survives restarts in a JSON file. A missing or unreadable file starts an
    /// empty cache: the cache only ever saves work, so losing it costs time, not correctness.
    pub fn persistent(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut entries = HashMap::new();
        match read_json::<OnDisk>(&path) {
            Ok(on_disk) => {
                for e in on_disk.entries {
                    entries.insert((e.identity.dev, e.identity.ino), e);
                }
            }
            Err(crate::SidecarError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(%err, "ignoring unreadable digest cache"),
        }
        Self {
            entries: Mutex::new(entries),
            racy_window: Self::DEFAULT_RACY_WINDOW,
            persist_to: Some(path),
        }
    }

    pub fn with_racy_window(mut self, window: Duration) -> Self {
        self.racy_window = window;
        self
    }

    /// The process-wide in-memory cache used when a caller does not bring its own.
    pub fn global() -> &'static DigestCache {
        static GLOBAL: OnceLock<DigestCache> = OnceLock::new();
        GLOBAL.get_or_init(DigestCache::in_memory)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file's digest: from the cache when its identity is unchanged (one `stat`), otherwise
    /// by reading and hashing it (and caching the result when that is safe).
    pub fn digest(&self, path: &Path) -> std::io::Result<(FileDigest, CacheLookup)> {
        let identity = FileIdentity::of_path(path)?;
        if let Some(entry) = self.lock().get(&(identity.dev, identity.ino))
            && entry.identity == identity
        {
            return Ok((entry.digest.clone(), CacheLookup::Hit));
        }

        let mut file = File::open(path)?;
        let before = FileIdentity::of(&file.metadata()?);
        let digest = hash_reader(&mut file)?;
        let after = FileIdentity::of(&file.metadata()?);
        let settled = SystemTime::now()
            .duration_since(after.ctime())
            .is_ok_and(|age| age >= self.racy_window);
        if before == after && settled && digest.size_bytes == after.size {
            self.insert(Entry {
                identity: after,
                digest: digest.clone(),
            });
        }
        Ok((digest, CacheLookup::Miss))
    }

    /// Drops whatever is cached for the file at `path` (for example before deliberately
    /// rewriting it in place).
    pub fn forget(&self, path: &Path) {
        if let Ok(id) = FileIdentity::of_path(path) {
            let removed = self.lock().remove(&(id.dev, id.ino)).is_some();
            if removed {
                self.save();
            }
        }
    }

    fn insert(&self, entry: Entry) {
        self.lock()
            .insert((entry.identity.dev, entry.identity.ino), entry);
        self.save();
    }

    fn save(&self) {
        let Some(path) = &self.persist_to else {
            return;
        };
        let on_disk = OnDisk {
            entries: self.lock().values().cloned().collect(),
        };
        if let Err(err) = write_json_atomic(path, &on_disk) {
            tracing::warn!(%err, "could not persist digest cache");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Entry>> {
        // A panic while holding this lock cannot leave a half-updated entry (inserts are single
        // map operations), so a poisoned lock is safe to keep using.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Streams a file through SHA-256 without caching.
pub fn hash_file(path: &Path) -> std::io::Result<FileDigest> {
    hash_reader(&mut File::open(path)?)
}

fn hash_reader(reader: &mut impl Read) -> std::io::Result<FileDigest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size_bytes = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size_bytes += n as u64;
    }
    Ok(FileDigest {
        size_bytes,
        sha256_hex: hex::encode(hasher.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settle() {
        std::thread::sleep(Duration::from_millis(30));
    }

    #[test]
    fn unchanged_file_hits_the_cache() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.img");
        fs::write(&p, b"hello")?;
        settle();
        let cache = DigestCache::in_memory().with_racy_window(Duration::from_millis(10));
        let (d1, l1) = cache.digest(&p)?;
        let (d2, l2) = cache.digest(&p)?;
        assert_eq!(l1, CacheLookup::Miss);
        assert_eq!(l2, CacheLookup::Hit);
        assert_eq!(d1, d2);
        assert_eq!(
            d1.sha256_hex,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        Ok(())
    }

    #[test]
    fn same_size_rewrite_invalidates() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.img");
        fs::write(&p, b"aaaa")?;
        settle();
        let cache = DigestCache::in_memory().with_racy_window(Duration::from_millis(10));
        let (before, _) = cache.digest(&p)?;
        assert_eq!(cache.digest(&p)?.1, CacheLookup::Hit);
        settle();
        fs::write(&p, b"bbbb")?;
        let (after, lookup) = cache.digest(&p)?;
        assert_eq!(lookup, CacheLookup::Miss);
        assert_eq!(after.size_bytes, before.size_bytes);
        assert_ne!(after.sha256_hex, before.sha256_hex);
        Ok(())
    }

    #[test]
    fn racily_fresh_files_are_not_cached() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.img");
        fs::write(&p, b"fresh")?;
        let cache = DigestCache::in_memory().with_racy_window(Duration::from_secs(3600));
        assert_eq!(cache.digest(&p)?.1, CacheLookup::Miss);
        assert_eq!(cache.digest(&p)?.1, CacheLookup::Miss);
        assert!(cache.is_empty());
        Ok(())
    }

    #[test]
    fn persistent_cache_survives_reopen_and_ignores_garbage() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.img");
        let cache_file = dir.path().join("digests.json");
        fs::write(&p, b"persist me")?;
        settle();
        {
            let cache =
                DigestCache::persistent(&cache_file).with_racy_window(Duration::from_millis(10));
            assert_eq!(cache.digest(&p)?.1, CacheLookup::Miss);
        }
        let reopened = DigestCache::persistent(&cache_file);
        assert_eq!(reopened.digest(&p)?.1, CacheLookup::Hit);

        fs::write(&cache_file, b"{ not json")?;
        let garbage = DigestCache::persistent(&cache_file);
        assert!(garbage.is_empty());
        assert_eq!(garbage.digest(&p)?.1, CacheLookup::Miss);
        Ok(())
    }

    #[test]
    fn forget_drops_the_entry() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.img");
        fs::write(&p, b"x")?;
        settle();
        let cache = DigestCache::in_memory().with_racy_window(Duration::from_millis(10));
        cache.digest(&p)?;
        assert_eq!(cache.len(), 1);
        cache.forget(&p);
        assert!(cache.is_empty());
        Ok(())
    }
}
