//! Filesystem work done with a user's rights, and the entry descriptions both APIs return.
//!
//! envd runs as root, but a request acting as `user` must not read or write what `user`
//! could not. Each operation runs on a blocking worker whose filesystem identity (fsuid, fsgid
//! and, through the raw system call, supplementary groups: all per-thread on Linux) is
//! switched to the user's for the duration of the closure, so the kernel does the access
//! checks and new files get the right owner.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::unistd::{Gid, Uid, setfsgid, setfsuid};

use crate::users::{AccountDb, User};

/// The identity a filesystem operation runs with.
#[derive(Debug, Clone)]
pub struct FsIdentity {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl FsIdentity {
    /// The identity of `user`, with its supplementary groups.
    pub fn of(user: &User, accounts: &AccountDb) -> Self {
        Self {
            uid: user.uid,
            gid: user.gid,
            groups: accounts.groups_of(user),
        }
    }
}

/// envd's own supplementary groups, restored after each switched operation.
fn own_groups() -> &'static [u32] {
    static GROUPS: OnceLock<Vec<u32>> = OnceLock::new();
    GROUPS.get_or_init(|| {
        nix::unistd::getgroups()
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default()
    })
}

struct Switched;

impl Switched {
    fn enter(id: &FsIdentity) -> io::Result<Option<Self>> {
        let euid = nix::unistd::geteuid();
        // Unprivileged envd (host mode) cannot switch and acts as itself; root acting as root
        // needs no switch.
        if !euid.is_root() || id.uid == 0 {
            return Ok(None);
        }
        own_groups();
        crate::sys::set_thread_groups(&id.groups)?;
        // From here on the guard restores root's identity, whatever happens next.
        let guard = Switched;
        setfsgid(Gid::from_raw(id.gid));
        setfsuid(Uid::from_raw(id.uid));
        // setfsuid reports no errors; an invalid id (-1) reads the current value back.
        if setfsuid(Uid::from_raw(u32::MAX)).as_raw() != id.uid {
            return Err(io::Error::other("cannot switch filesystem identity"));
        }
        Ok(Some(guard))
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        setfsuid(Uid::from_raw(0));
        setfsgid(Gid::from_raw(0));
        if let Err(e) = crate::sys::set_thread_groups(own_groups()) {
            tracing::error!(error = %e, "cannot restore worker groups");
        }
    }
}

/// Runs `f` on a blocking worker with the filesystem identity `id`.
pub async fn as_user<T, F>(id: FsIdentity, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let _switched = Switched::enter(&id)?;
        f()
    })
    .await
    .map_err(|e| io::Error::other(format!("worker failed: {e}")))?
}

/// Creates `dir` and its missing parents (mode 0755 before umask), as the current identity.
pub fn create_dirs(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}

/// The kind of a filesystem entry, as the protocol distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Anything else (device, socket, fifo, dangling link).
    Other,
}

/// What both the RPC `EntryInfo` and upload answers need to know about a path.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Base name.
    pub name: String,
    /// Absolute path as requested (not resolved through links).
    pub path: PathBuf,
    /// Type of the entry, or of a symlink's target.
    pub kind: Kind,
    /// Whether the path itself is a symlink.
    pub is_symlink: bool,
    /// Where a symlink finally resolves to (itself when it cannot be resolved).
    pub symlink_target: Option<PathBuf>,
    /// Size in bytes (of the link itself for symlinks).
    pub size: u64,
    /// Permission bits (of the target for symlinks).
    pub mode: u32,
    /// `ls`-style permission string in Go's `FileMode` notation, as upstream reports it.
    pub permissions: String,
    /// Owner name (or uid).
    pub owner: String,
    /// Group name (or gid).
    pub group: String,
    /// Modification time, seconds and nanoseconds since the epoch.
    pub modified: (i64, i32),
    /// `user.e2b.*` extended attributes, without the prefix.
    pub metadata: Vec<(String, String)>,
}

/// The xattr namespace upload metadata lives in.
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

fn kind_of(ft: std::fs::FileType) -> Kind {
    if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Directory
    } else {
        Kind::Other
    }
}

/// Go's `FileMode.String()`: type letters, then `rwx` triples.
pub fn go_mode_string(meta: &std::fs::Metadata) -> String {
    let ft = meta.file_type();
    let mode = meta.mode();
    let mut s = String::new();
    if ft.is_dir() {
        s.push('d');
    }
    if ft.is_symlink() {
        s.push('L');
    }
    if ft.is_block_device() || ft.is_char_device() {
        s.push('D');
    }
    if ft.is_fifo() {
        s.push('p');
    }
    if ft.is_socket() {
        s.push('S');
    }
    if mode & 0o4000 != 0 {
        s.push('u');
    }
    if mode & 0o2000 != 0 {
        s.push('g');
    }
    if ft.is_char_device() {
        s.push('c');
    }
    if mode & 0o1000 != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// Describes `path` (without following a final symlink for the entry itself).
pub fn entry(path: &Path, accounts: &AccountDb) -> io::Result<Entry> {
    let meta = std::fs::symlink_metadata(path)?;
    let is_symlink = meta.file_type().is_symlink();
    let (kind, mode, symlink_target) = if is_symlink {
        let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        match std::fs::metadata(path) {
            Ok(t) => (
                kind_of(t.file_type()),
                t.permissions().mode() & 0o777,
                Some(target),
            ),
            Err(_) => (Kind::Other, 0, Some(target)),
        }
    } else {
        (
            kind_of(meta.file_type()),
            meta.permissions().mode() & 0o777,
            None,
        )
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_owned());
    Ok(Entry {
        name,
        path: path.to_owned(),
        kind,
        is_symlink,
        symlink_target,
        size: meta.len(),
        mode,
        permissions: go_mode_string(&meta),
        owner: accounts
            .user_name(meta.uid())
            .unwrap_or_else(|| meta.uid().to_string()),
        group: accounts
            .group_name(meta.gid())
            .unwrap_or_else(|| meta.gid().to_string()),
        modified: (meta.mtime(), meta.mtime_nsec() as i32),
        metadata: read_metadata(path),
    })
}

/// Reads the `user.e2b.*` attributes of `path`; missing support means no metadata.
pub fn read_metadata(path: &Path) -> Vec<(String, String)> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names {
        let name = name.to_string_lossy();
        if let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX)
            && let Ok(Some(value)) = xattr::get(path, name.as_ref())
        {
            out.push((key.to_owned(), String::from_utf8_lossy(&value).into_owned()));
        }
    }
    out.sort();
    out
}

/// Stores upload metadata as `user.e2b.<key>` attributes.
pub fn write_metadata(path: &Path, metadata: &[(String, String)]) -> io::Result<()> {
    for (key, value) in metadata {
        xattr::set(
            path,
            format!("{METADATA_XATTR_PREFIX}{key}"),
            value.as_bytes(),
        )?;
    }
    Ok(())
}
