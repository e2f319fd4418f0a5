//! Directory watchers on inotify, for `WatchDir` (streamed) and `CreateWatcher` (polled).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::fsops::{self, FsIdentity};

/// Events a polled watcher keeps between polls; older ones are dropped beyond this.
const MAX_QUEUED: usize = 10_000;

/// The kind of change, as `filesystem.EventType` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or moved in.
    Create,
    /// Written.
    Write,
    /// Deleted.
    Remove,
    /// Moved away or renamed.
    Rename,
    /// Metadata (mode, owner, times) changed.
    Chmod,
}

/// One change below a watched directory.
#[derive(Debug, Clone)]
pub struct FsEvent {
    /// Path relative to the watched directory.
    pub name: String,
    /// What happened.
    pub kind: EventKind,
    /// Absolute path, for looking up the entry.
    pub path: PathBuf,
}

/// What can go wrong setting up a watch.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The directory does not exist.
    #[error("directory '{0}' not found")]
    NotFound(PathBuf),
    /// It exists but is not a directory.
    #[error("'{0}' is not a directory")]
    NotADirectory(PathBuf),
    /// It is on a network filesystem and the request did not allow that.
    #[error("'{0}' is on a network mount; set allow_network_mounts to watch it")]
    NetworkMount(PathBuf),
    /// The user may not read it.
    #[error("permission denied watching '{0}'")]
    PermissionDenied(PathBuf),
    /// Anything else.
    #[error("watching '{path}': {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn classify(path: &Path, e: io::Error) -> WatchError {
    match e.kind() {
        io::ErrorKind::NotFound => WatchError::NotFound(path.to_owned()),
        io::ErrorKind::NotADirectory => WatchError::NotADirectory(path.to_owned()),
        io::ErrorKind::PermissionDenied => WatchError::PermissionDenied(path.to_owned()),
        _ => WatchError::Io {
            path: path.to_owned(),
            source: e,
        },
    }
}

fn is_network_mount(path: &Path) -> bool {
    const NFS: i64 = 0x6969;
    const CIFS: i64 = 0xFF53_4D42;
    const SMB: i64 = 0x517B;
    const SMB2: i64 = 0xFE53_4D42;
    const FUSE: i64 = 0x6573_5546;
    match nix::sys::statfs::statfs(path) {
        Ok(s) => {
            let t = s.filesystem_type().0;
            [NFS, CIFS, SMB, SMB2, FUSE].contains(&t)
        }
        Err(_) => false,
    }
}

const MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR)
    .union(AddWatchFlags::IN_DONT_FOLLOW);

struct Watches {
    by_wd: HashMap<WatchDescriptor, PathBuf>,
}

/// A live inotify watch of one directory (and its subdirectories when recursive).
struct Watcher {
    inotify: Arc<AsyncFd<crate::sys::InotifyFd>>,
    root: PathBuf,
    recursive: bool,
    watches: Mutex<Watches>,
    id: FsIdentity,
}

impl Watcher {
    fn lock(&self) -> MutexGuard<'_, Watches> {
        match self.watches.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Adds watches for `dir` and, when recursive, every directory below it. With `report`,
    /// returns what it found below `dir`, in the order Go's `filepath.WalkDir` visits it
    /// (depth-first, sorted by name). Runs with the user's identity, so the kernel checks that
    /// the user may read what it watches.
    async fn add_tree(self: &Arc<Self>, dir: PathBuf, report: bool) -> io::Result<Vec<PathBuf>> {
        let me = self.clone();
        let (added, found) = fsops::as_user(self.id.clone(), move || {
            let inotify = &me.inotify.get_ref().0;
            // Only the top directory must be watchable.
            let wd = inotify.add_watch(&dir, MASK).map_err(io::Error::from)?;
            let mut added = vec![(wd, dir.clone())];
            let mut found = Vec::new();
            if !me.recursive {
                return Ok((added, found));
            }
            let mut stack = vec![sorted_children(&dir)];
            while let Some(level) = stack.last_mut() {
                let Some((path, is_dir)) = level.pop() else {
                    stack.pop();
                    continue;
                };
                if report {
                    found.push(path.clone());
                }
                if !is_dir {
                    continue;
                }
                match inotify.add_watch(&path, MASK) {
                    Ok(wd) => added.push((wd, path.clone())),
                    // Subdirectories can vanish or be unreadable.
                    Err(e) => {
                        tracing::debug!(dir = %path.display(), error = %e, "skipping subdirectory");
                        continue;
                    }
                }
                stack.push(sorted_children(&path));
            }
            Ok((added, found))
        })
        .await?;
        let mut w = self.lock();
        // A directory moved within the tree keeps its watch descriptors: this updates their paths.
        for (wd, path) in added {
            w.by_wd.insert(wd, path);
        }
        Ok(found)
    }

    /// The event name: the path relative to the root, `.` for the root itself (as Go's
    /// `filepath.Rel`).
    fn relative(&self, path: &Path) -> String {
        match path.strip_prefix(&self.root) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => path.to_string_lossy().into_owned(),
        }
    }

    /// Reads events until the watch dies, sending them to `tx`.
    async fn run(self: Arc<Self>, tx: mpsc::Sender<FsEvent>) {
        loop {
            let mut guard = match self.inotify.readable().await {
                Ok(g) => g,
                Err(_) => return,
            };
            let events =
                match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                    Ok(Ok(evs)) => evs,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "inotify read failed");
                        return;
                    }
                    Err(_would_block) => continue,
                };
            for ev in events {
                let dir = self.lock().by_wd.get(&ev.wd).cloned();
                let Some(dir) = dir else { continue };
                let path = match &ev.name {
                    Some(n) => dir.join(n),
                    None => dir.clone(),
                };
                let m = ev.mask;
                if m.contains(AddWatchFlags::IN_IGNORED) {
                    self.lock().by_wd.remove(&ev.wd);
                    if dir == self.root {
                        // The watched directory itself is gone.
                        return;
                    }
                    continue;
                }
                // The parent's watch reports a watched subdirectory's deletion or move too;
                // skip the duplicates except for the root. Like fsnotify, a subdirectory's
                // own IN_ATTRIB is reported, alongside the parent's.
                if ev.name.is_none()
                    && dir != self.root
                    && m.intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF)
                {
                    continue;
                }
                let kind = if m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                    EventKind::Create
                } else if m.contains(AddWatchFlags::IN_MODIFY) {
                    EventKind::Write
                } else if m.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
                    EventKind::Remove
                } else if m.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVE_SELF) {
                    EventKind::Rename
                } else if m.contains(AddWatchFlags::IN_ATTRIB) {
                    EventKind::Chmod
                } else {
                    continue;
                };
                // A new directory in a recursive watch is watched at once, and what it already
                // holds is reported as created (`mkdir -p`, a tree moved in), as fsnotify does.
                let mut found = Vec::new();
                if self.recursive
                    && kind == EventKind::Create
                    && m.contains(AddWatchFlags::IN_ISDIR)
                {
                    match self.add_tree(path.clone(), true).await {
                        Ok(f) => found = f,
                        Err(e) => {
                            tracing::debug!(dir = %path.display(), error = %e, "cannot watch new directory");
                        }
                    }
                }
                let events = std::iter::once((path, kind))
                    .chain(found.into_iter().map(|p| (p, EventKind::Create)));
                for (path, kind) in events {
                    let event = FsEvent {
                        name: self.relative(&path),
                        kind,
                        path,
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Starts watching `path`; events arrive on the returned channel until it is dropped or the
/// directory disappears.
pub async fn watch(
    path: PathBuf,
    recursive: bool,
    allow_network_mounts: bool,
    id: FsIdentity,
) -> Result<(mpsc::Receiver<FsEvent>, AbortOnDrop), WatchError> {
    let p = path.clone();
    let meta = fsops::as_user(id.clone(), move || std::fs::metadata(&p))
        .await
        .map_err(|e| classify(&path, e))?;
    if !meta.is_dir() {
        return Err(WatchError::NotADirectory(path));
    }
    if !allow_network_mounts && is_network_mount(&path) {
        return Err(WatchError::NetworkMount(path));
    }
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| classify(&path, e.into()))?;
    let inotify = crate::sys::async_inotify(inotify).map_err(|e| classify(&path, e))?;
    let watcher = Arc::new(Watcher {
        inotify: Arc::new(inotify),
        root: path.clone(),
        recursive,
        watches: Mutex::new(Watches {
            by_wd: HashMap::new(),
        }),
        id,
    });
    watcher
        .add_tree(path.clone(), false)
        .await
        .map_err(|e| classify(&path, e))?;
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(watcher.run(tx));
    Ok((rx, AbortOnDrop(task)))
}

/// The entries of `dir` with whether each is a directory (not following symlinks), sorted
/// by name in reverse, so popping visits them in order. Unreadable means empty.
fn sorted_children(dir: &Path) -> Vec<(PathBuf, bool)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = rd
        .flatten()
        .map(|e| (e.path(), e.file_type().is_ok_and(|t| t.is_dir())))
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out
}

/// Stops the watch (and closes its inotify instance) when the consumer goes away, instead of
/// at the next event.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A watcher whose events are collected for polling.
#[derive(Debug)]
struct Polled {
    events: Arc<Mutex<VecDeque<FsEvent>>>,
    include_entry: bool,
    id: FsIdentity,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watchers created with `CreateWatcher`, by id.
#[derive(Debug, Default)]
pub struct WatcherTable {
    watchers: Mutex<HashMap<String, Polled>>,
}

impl WatcherTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Polled>> {
        match self.watchers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Starts a polled watcher and returns its id.
    pub async fn create(
        &self,
        path: PathBuf,
        recursive: bool,
        include_entry: bool,
        allow_network_mounts: bool,
        id: FsIdentity,
    ) -> Result<String, WatchError> {
        let (mut rx, watch_task) = watch(path, recursive, allow_network_mounts, id.clone()).await?;
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let _watch = watch_task;
            while let Some(ev) = rx.recv().await {
                let mut q = match sink.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                if q.len() >= MAX_QUEUED {
                    q.pop_front();
                }
                q.push_back(ev);
            }
        });
        let watcher_id = random_id();
        self.lock().insert(
            watcher_id.clone(),
            Polled {
                events,
                include_entry,
                id,
                task,
            },
        );
        Ok(watcher_id)
    }

    /// Takes the events collected since the last poll, with whether entries were requested
    /// and the identity to look them up with. `None` for an unknown id.
    pub fn drain(&self, watcher_id: &str) -> Option<(Vec<FsEvent>, bool, FsIdentity)> {
        let w = self.lock();
        let polled = w.get(watcher_id)?;
        let mut q = match polled.events.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        Some((
            q.drain(..).collect(),
            polled.include_entry,
            polled.id.clone(),
        ))
    }

    /// Stops a watcher; false if the id is unknown.
    pub fn remove(&self, watcher_id: &str) -> bool {
        self.lock().remove(watcher_id).is_some()
    }
}

fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> FsIdentity {
        let db = crate::users::AccountDb::default();
        let user = db
            .by_uid(nix::unistd::geteuid().as_raw())
            .unwrap_or(crate::users::User {
                name: "me".into(),
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                home: "/".into(),
                shell: String::new(),
            });
        FsIdentity::of(&user, &db)
    }

    #[tokio::test]
    async fn reports_recursive_events_with_relative_names() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rx, _task) = watch(dir.path().to_owned(), true, false, me())
            .await
            .unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let ev = rx.recv().await.unwrap();
        assert_eq!((ev.name.as_str(), ev.kind), ("sub", EventKind::Create));
        // Give the watcher a moment to add the new directory before writing into it.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        std::fs::write(dir.path().join("sub/f"), b"x").unwrap();
        let ev = rx.recv().await.unwrap();
        assert_eq!((ev.name.as_str(), ev.kind), ("sub/f", EventKind::Create));
    }

    #[tokio::test]
    async fn reports_what_a_directory_moved_in_holds() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("t/b")).unwrap();
        std::fs::write(outside.path().join("t/a"), b"").unwrap();
        std::fs::write(outside.path().join("t/b/c"), b"").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut rx, _task) = watch(dir.path().to_owned(), true, false, me())
            .await
            .unwrap();
        std::fs::rename(outside.path().join("t"), dir.path().join("t")).unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            let ev = rx.recv().await.unwrap();
            got.push((ev.name, ev.kind));
        }
        let want: Vec<_> = ["t", "t/a", "t/b", "t/b/c"]
            .into_iter()
            .map(|n| (n.to_owned(), EventKind::Create))
            .collect();
        assert_eq!(got, want);
        // The tree is watched: a change inside it is reported under its new name.
        std::fs::write(dir.path().join("t/b/d"), b"").unwrap();
        let ev = rx.recv().await.unwrap();
        assert_eq!((ev.name.as_str(), ev.kind), ("t/b/d", EventKind::Create));
    }

    #[tokio::test]
    async fn rejects_missing_and_non_directories() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            watch(dir.path().join("nope"), false, false, me()).await,
            Err(WatchError::NotFound(_))
        ));
        assert!(matches!(
            watch(file, false, false, me()).await,
            Err(WatchError::NotADirectory(_))
        ));
    }
}
