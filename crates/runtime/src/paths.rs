use std::path::{Path, PathBuf};

/// Where firkin keeps its files.
///
/// - *state*: what cannot be rebuilt: the database, sandbox run directories, paused sandboxes.
///   `$FIRKIN_STATE_DIR`, else `~/.firkin/state`.
/// - *cache*: what can be rebuilt from a recipe: kernels, initramfs, template snapshots.
///   `$FIRKIN_CACHE_DIR`, else `~/.firkin/cache`.
///
/// Never under `TMPDIR`: a paused sandbox or a template must survive a reboot and a tmp cleaner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirkinPaths {
    state: PathBuf,
    cache: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("neither {var} nor HOME is set; set {var} to the directory firkin should use")]
    NoHome { var: &'static str },
    #[error("{var}={value:?} is not an absolute path")]
    NotAbsolute { var: &'static str, value: PathBuf },
}

impl FirkinPaths {
    pub fn new(state: impl Into<PathBuf>, cache: impl Into<PathBuf>) -> Self {
        Self {
            state: state.into(),
            cache: cache.into(),
        }
    }

    /// Resolves from `FIRKIN_STATE_DIR`, `FIRKIN_CACHE_DIR` and `HOME`.
    pub fn from_env() -> Result<Self, PathsError> {
        Self::from_lookup(|k| std::env::var_os(k).map(PathBuf::from))
    }

    fn from_lookup(get: impl Fn(&str) -> Option<PathBuf>) -> Result<Self, PathsError> {
        let resolve = |var: &'static str, leaf: &str| -> Result<PathBuf, PathsError> {
            if let Some(p) = get(var).filter(|p| !p.as_os_str().is_empty()) {
                return if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(PathsError::NotAbsolute { var, value: p })
                };
            }
            let home = get("HOME")
                .filter(|h| h.is_absolute())
                .ok_or(PathsError::NoHome { var })?;
            Ok(home.join(".firkin").join(leaf))
        };
        Ok(Self {
            state: resolve("FIRKIN_STATE_DIR", "state")?,
            cache: resolve("FIRKIN_CACHE_DIR", "cache")?,
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.state.join("firkin.db")
    }

    /// Persisted verified-digest cache.
    pub fn digest_cache(&self) -> PathBuf {
        self.state.join("digest-cache.json")
    }

    /// Per-sandbox run directories (overlay, QMP socket, console log).
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state.join("sandboxes")
    }

    /// Continuation snapshots (paused sandboxes).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.state.join("snapshots")
    }

    /// Built templates: `<cache>/templates/<template>/<build>/`.
    pub fn templates_dir(&self) -> PathBuf {
        self.cache.join("templates")
    }

    /// Finished root filesystem images by source (`firkin_guest::RootfsCache`).
    pub fn rootfs_cache_dir(&self) -> PathBuf {
        self.cache.join("rootfs")
    }

    /// Guest kernel, modules, initramfs and static guest binaries.
    pub fn guest_dir(&self) -> PathBuf {
        self.cache.join("guest")
    }
}

/// A new run directory's path under `root` (a launcher's `sandboxes/`): this process's pid, the
/// time and a counter, so that no two launches of one server share a name.
pub(crate) fn unique_run_dir(root: &Path, prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    root.join(format!("{prefix}-{}-{nanos:08x}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<PathBuf> {
        let map: HashMap<String, PathBuf> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), PathBuf::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_live_under_home() {
        let p = FirkinPaths::from_lookup(lookup(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(p.state_dir(), Path::new("/home/u/.firkin/state"));
        assert_eq!(p.cache_dir(), Path::new("/home/u/.firkin/cache"));
        assert_eq!(p.database(), Path::new("/home/u/.firkin/state/firkin.db"));
    }

    #[test]
    fn env_vars_win_exactly() {
        let p = FirkinPaths::from_lookup(lookup(&[
            ("HOME", "/home/u"),
            ("FIRKIN_STATE_DIR", "/srv/state"),
            ("FIRKIN_CACHE_DIR", "/srv/cache"),
            ("TMPDIR", "/tmp"),
        ]))
        .unwrap();
        assert_eq!(p.state_dir(), Path::new("/srv/state"));
        assert_eq!(p.templates_dir(), Path::new("/srv/cache/templates"));
    }

    #[test]
    fn missing_home_and_relative_paths_are_errors() {
        assert!(matches!(
            FirkinPaths::from_lookup(lookup(&[])),
            Err(PathsError::NoHome { .. })
        ));
        assert!(matches!(
            FirkinPaths::from_lookup(lookup(&[("FIRKIN_STATE_DIR", "rel"), ("HOME", "/h")])),
            Err(PathsError::NotAbsolute { .. })
        ));
    }
}
