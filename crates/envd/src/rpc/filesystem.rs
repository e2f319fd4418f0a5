//! `filesystem.Filesystem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use connectrpc::{
    ConnectError, Encodable, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream,
};
use futures::StreamExt;

use super::{io_error, keepalive_interval, request_user};
use crate::fs_proto::__buffa::oneof::watch_dir_response::Event as WatchEvent;
use crate::fs_proto::{
    CreateWatcherRequest, CreateWatcherResponse, EntryInfo, EventType, FileType, Filesystem,
    FilesystemEvent, GetWatcherEventsRequest, GetWatcherEventsResponse, ListDirRequest,
    ListDirResponse, MakeDirRequest, MakeDirResponse, MoveRequest, MoveResponse, RemoveRequest,
    RemoveResponse, RemoveWatcherRequest, RemoveWatcherResponse, StatRequest, StatResponse,
    WatchDirRequest, WatchDirResponse,
};
use crate::fsops::{self, Entry, FsIdentity, Kind};
use crate::state::Envd;
use crate::users::{AccountDb, User};
use crate::watch::{EventKind, FsEvent, WatchError};

/// Implements `filesystem.Filesystem`.
#[derive(Debug)]
pub struct FilesystemService {
    envd: Arc<Envd>,
}

impl FilesystemService {
    /// Serves the filesystem of `envd`'s machine.
    pub fn new(envd: Arc<Envd>) -> Self {
        Self { envd }
    }

    fn user_and_path(
        &self,
        ctx: &RequestContext,
        raw: &str,
    ) -> Result<(User, FsIdentity, PathBuf), ConnectError> {
        let user = request_user(&self.envd, ctx)?;
        if raw.is_empty() {
            return Err(ConnectError::invalid_argument("path is required"));
        }
        let path = self.envd.resolve_path(raw, &user);
        let id = FsIdentity::of(&user, &self.envd.accounts);
        Ok((user, id, path))
    }
}

fn entry_info(e: Entry) -> EntryInfo {
    let kind = match e.kind {
        Kind::File => FileType::FILE_TYPE_FILE,
        Kind::Directory => FileType::FILE_TYPE_DIRECTORY,
        Kind::Other if e.is_symlink => FileType::FILE_TYPE_SYMLINK,
        Kind::Other => FileType::FILE_TYPE_UNSPECIFIED,
    };
    EntryInfo {
        name: e.name,
        r#type: kind.into(),
        path: e.path.display().to_string(),
        size: i64::try_from(e.size).unwrap_or(i64::MAX),
        mode: e.mode,
        permissions: e.permissions,
        owner: e.owner,
        group: e.group,
        modified_time: buffa_types::google::protobuf::Timestamp {
            seconds: e.modified.0,
            nanos: e.modified.1,
            ..Default::default()
        }
        .into(),
        symlink_target: e.symlink_target.map(|t| t.display().to_string()),
        metadata: e.metadata.into_iter().collect(),
        is_symlink: e.is_symlink,
        ..Default::default()
    }
}

async fn stat_as(
    id: FsIdentity,
    accounts: AccountDb,
    path: PathBuf,
) -> Result<EntryInfo, ConnectError> {
    let what = path.display().to_string();
    fsops::as_user(id, move || fsops::entry(&path, &accounts))
        .await
        .map(entry_info)
        .map_err(|e| io_error(&e, &what))
}

fn watch_error(e: WatchError) -> ConnectError {
    match e {
        WatchError::NotFound(_) => ConnectError::not_found(e.to_string()),
        WatchError::NotADirectory(_) | WatchError::NetworkMount(_) => {
            ConnectError::invalid_argument(e.to_string())
        }
        WatchError::PermissionDenied(_) => ConnectError::permission_denied(e.to_string()),
        WatchError::Io { .. } => ConnectError::internal(e.to_string()),
    }
}

fn event_type(kind: EventKind) -> EventType {
    match kind {
        EventKind::Create => EventType::EVENT_TYPE_CREATE,
        EventKind::Write => EventType::EVENT_TYPE_WRITE,
        EventKind::Remove => EventType::EVENT_TYPE_REMOVE,
        EventKind::Rename => EventType::EVENT_TYPE_RENAME,
        EventKind::Chmod => EventType::EVENT_TYPE_CHMOD,
    }
}

/// Converts a watch event, looking up the entry (when asked for and still there).
async fn fs_event(
    ev: FsEvent,
    include_entry: bool,
    id: &FsIdentity,
    accounts: &AccountDb,
) -> FilesystemEvent {
    let entry = if include_entry && !matches!(ev.kind, EventKind::Remove | EventKind::Rename) {
        let path = ev.path.clone();
        let accounts = accounts.clone();
        fsops::as_user(id.clone(), move || fsops::entry(&path, &accounts))
            .await
            .ok()
            .map(entry_info)
    } else {
        None
    };
    FilesystemEvent {
        name: ev.name,
        r#type: event_type(ev.kind).into(),
        entry: entry.into(),
        ..Default::default()
    }
}

/// Listing below `dir` down to `depth` levels, not descending into symlinks. The order is
/// upstream's (Go's `filepath.WalkDir`): depth-first, each directory's entries sorted by name,
/// a directory's children right after it.
fn list_tree(dir: &Path, depth: u32, accounts: &AccountDb) -> std::io::Result<Vec<Entry>> {
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    let mut out = Vec::new();
    // Each level's sorted names, reversed so the next one to visit is at the end.
    let mut stack = vec![sorted_children(dir)?];
    while let Some(level) = stack.last_mut() {
        let Some(path) = level.pop() else {
            stack.pop();
            continue;
        };
        let Ok(entry) = fsops::entry(&path, accounts) else {
            continue;
        };
        let descend = stack.len() < depth as usize && entry.kind == Kind::Directory;
        let descend = descend && !entry.is_symlink;
        out.push(entry);
        // The top level must be readable; deeper unreadable directories are skipped.
        if descend && let Ok(children) = sorted_children(&path) {
            stack.push(children);
        }
    }
    Ok(out)
}

fn sorted_children(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort_by(|a, b| b.cmp(a));
    Ok(names)
}

impl Filesystem for FilesystemService {
    async fn stat<'a>(
        &'a self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StatRequest>,
    ) -> ServiceResult<impl Encodable<StatResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let (_, id, path) = self.user_and_path(&ctx, &req.path)?;
        let entry = stat_as(id, self.envd.accounts.clone(), path).await?;
        Response::ok(StatResponse {
            entry: entry.into(),
            ..Default::default()
        })
    }

    async fn make_dir<'a>(
        &'a self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MakeDirRequest>,
    ) -> ServiceResult<impl Encodable<MakeDirResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let (_, id, path) = self.user_and_path(&ctx, &req.path)?;
        let what = path.display().to_string();
        let accounts = self.envd.accounts.clone();
        let entry = fsops::as_user(id, move || {
            if std::fs::symlink_metadata(&path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists",
                ));
            }
            fsops::create_dirs(&path)?;
            fsops::entry(&path, &accounts)
        })
        .await
        .map_err(|e| io_error(&e, &what))?;
        Response::ok(MakeDirResponse {
            entry: entry_info(entry).into(),
            ..Default::default()
        })
    }

    async fn r#move<'a>(
        &'a self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MoveRequest>,
    ) -> ServiceResult<impl Encodable<MoveResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let (user, id, source) = self.user_and_path(&ctx, &req.source)?;
        if req.destination.is_empty() {
            return Err(ConnectError::invalid_argument("destination is required"));
        }
        let destination = self.envd.resolve_path(&req.destination, &user);
        let what = format!("{} -> {}", source.display(), destination.display());
        let accounts = self.envd.accounts.clone();
        let entry = fsops::as_user(id, move || {
            std::fs::symlink_metadata(&source)?;
            if let Some(parent) = destination.parent() {
                fsops::create_dirs(parent)?;
            }
            match std::fs::rename(&source, &destination) {
                Ok(()) => {}
                // Across filesystems (tmpfs /tmp to the disk) a regular file is copied.
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) && source.is_file() => {
                    std::fs::copy(&source, &destination)?;
                    std::fs::remove_file(&source)?;
                }
                Err(e) => return Err(e),
            }
            fsops::entry(&destination, &accounts)
        })
        .await
        .map_err(|e| io_error(&e, &what))?;
        Response::ok(MoveResponse {
            entry: entry_info(entry).into(),
            ..Default::default()
        })
    }

    async fn list_dir<'a>(
        &'a self,
        ctx: RequestContext,
        request: ServiceRequest<'_, ListDirRequest>,
    ) -> ServiceResult<impl Encodable<ListDirResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let (_, id, path) = self.user_and_path(&ctx, &req.path)?;
        // The SDK never sends 0 (it rejects depth < 1); older clients omit the field.
        let depth = req.depth.max(1);
        let what = path.display().to_string();
        let accounts = self.envd.accounts.clone();
        let entries = fsops::as_user(id, move || list_tree(&path, depth, &accounts))
            .await
            .map_err(|e| io_error(&e, &what))?;
        Response::ok(ListDirResponse {
            entries: entries.into_iter().map(entry_info).collect(),
            ..Default::default()
        })
    }

    async fn remove<'a>(
        &'a self,
        ctx: RequestContext,
        request: ServiceRequest<'_, RemoveRequest>,
    ) -> ServiceResult<impl Encodable<RemoveResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let (_, id, path) = self.user_and_path(&ctx, &req.path)?;
        let what = path.display().to_string();
        fsops::as_user(id, move || match std::fs::symlink_metadata(&path) {
            // Remove-all semantics, like upstream: a missing path is already removed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
        })
        .await
        .map_err(|e| io_error(&e, &what))?;
        Response::ok(RemoveResponse::default())
    }

    async fn watch_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, WatchDirRequest>,
    ) -> ServiceResult<ServiceStream<impl Encodable<WatchDirResponse> + Send + use<>>> {
        let req = request.to_owned_message();
        let (_, id, path) = self.user_and_path(&ctx, &req.path)?;
        let (rx, guard) =
            crate::watch::watch(path, req.recursive, req.allow_network_mounts, id.clone())
                .await
                .map_err(watch_error)?;
        let keepalive = keepalive_interval(&ctx);
        let include_entry = req.include_entry;
        let accounts = self.envd.accounts.clone();
        let start = futures::stream::once(async {
            Ok(WatchDirResponse {
                event: Some(WatchEvent::Start(Box::default())),
                ..Default::default()
            })
        });
        let rest = futures::stream::unfold(
            (rx, guard, id, accounts),
            move |(mut rx, guard, id, accounts)| async move {
                let event = match tokio::time::timeout(keepalive, rx.recv()).await {
                    Err(_) => WatchEvent::Keepalive(Box::default()),
                    Ok(Some(ev)) => WatchEvent::Filesystem(Box::new(
                        fs_event(ev, include_entry, &id, &accounts).await,
                    )),
                    // The watched directory is gone: end the stream.
                    Ok(None) => return None,
                };
                let msg = WatchDirResponse {
                    event: Some(event),
                    ..Default::default()
                };
                Some((Ok(msg), (rx, guard, id, accounts)))
            },
        );
        let stream: ServiceStream<WatchDirResponse> = Box::pin(start.chain(rest));
        Response::ok(stream)
    }

    async fn create_watcher<'a>(
        &'a self,
        ctx: RequestContext,
        request: ServiceRequest<'_, CreateWatcherRequest>,
    ) -> ServiceResult<impl Encodable<CreateWatcherResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let (_, id, path) = self.user_and_path(&ctx, &req.path)?;
        let watcher_id = self
            .envd
            .watchers
            .create(
                path,
                req.recursive,
                req.include_entry,
                req.allow_network_mounts,
                id,
            )
            .await
            .map_err(watch_error)?;
        Response::ok(CreateWatcherResponse {
            watcher_id,
            ..Default::default()
        })
    }

    async fn get_watcher_events<'a>(
        &'a self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, GetWatcherEventsRequest>,
    ) -> ServiceResult<impl Encodable<GetWatcherEventsResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let Some((events, include_entry, id)) = self.envd.watchers.drain(&req.watcher_id) else {
            return Err(ConnectError::not_found(format!(
                "watcher '{}' not found",
                req.watcher_id
            )));
        };
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            out.push(fs_event(ev, include_entry, &id, &self.envd.accounts).await);
        }
        Response::ok(GetWatcherEventsResponse {
            events: out,
            ..Default::default()
        })
    }

    async fn remove_watcher<'a>(
        &'a self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, RemoveWatcherRequest>,
    ) -> ServiceResult<impl Encodable<RemoveWatcherResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        if !self.envd.watchers.remove(&req.watcher_id) {
            return Err(ConnectError::not_found(format!(
                "watcher '{}' not found",
                req.watcher_id
            )));
        }
        Response::ok(RemoveWatcherResponse::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_depth_first_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["b/b2", "b/b1", "a/a1/deep", "c"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("a/f"), b"").unwrap();
        let names = |depth| {
            list_tree(dir.path(), depth, &AccountDb::default())
                .unwrap()
                .into_iter()
                .map(|e| {
                    e.path
                        .strip_prefix(dir.path())
                        .unwrap()
                        .display()
                        .to_string()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(names(1), ["a", "b", "c"]);
        assert_eq!(names(2), ["a", "a/a1", "a/f", "b", "b/b1", "b/b2", "c"]);
        assert_eq!(names(3).len(), 8);
        assert_eq!(names(3)[2], "a/a1/deep");
    }
}
