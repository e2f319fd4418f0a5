//! `GET /files` (download) and `POST /files` (multipart or raw upload), streamed both ways:
//! bodies pass through in chunks, so a file of any size costs a bounded amount of memory.

use std::collections::HashSet;
use std::io;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::body::BodyDataStream;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use firkin_e2b_wire::file_signature::{SignatureError, SignedQuery, SigningOp};
use futures::{Stream, StreamExt, TryStreamExt};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::fsops::{self, FsIdentity};
use crate::state::Envd;
use crate::users::{User, UserError};

/// A stalled client must not pin a file handle and a worker forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

/// Query parameters of both `/files` methods.
#[derive(Debug, Default, Deserialize)]
pub struct FileParams {
    path: Option<String>,
    username: Option<String>,
}

/// Checks the signature in a `/files` query string against `token` (E2B's formula lives in
/// `firkin_e2b_wire::file_signature`, shared with the server's routing of signed URLs).
pub fn verify_signature(query: &str, op: SigningOp, token: &str) -> Result<(), ApiError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    SignedQuery::parse(query)
        .and_then(|q| q.verify(op, token, now))
        .map_err(|e| match e {
            SignatureError::Query(_) => ApiError::bad_request(e.to_string()),
            _ => ApiError::unauthorized(e.to_string()),
        })
}

fn resolve_user(envd: &Envd, name: Option<&str>) -> Result<User, ApiError> {
    envd.resolve_user(name).map_err(|e| match e {
        UserError::NotFound(_) => ApiError::unauthorized(e.to_string()),
        UserError::Read { .. } => ApiError::internal(e.to_string()),
    })
}

/// Streams a file to the client.
pub async fn download(
    State(envd): State<Arc<Envd>>,
    Query(params): Query<FileParams>,
) -> Result<Response, ApiError> {
    let user = resolve_user(&envd, params.username.as_deref())?;
    let raw = params
        .path
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing path"))?;
    let path = envd.resolve_path(raw, &user);
    let id = FsIdentity::of(&user, &envd.accounts);
    let p = path.clone();
    let (file, len) = fsops::as_user(id, move || {
        let file = std::fs::File::open(&p)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "path is a directory",
            ));
        }
        let len = trusted_len(&file, &meta);
        Ok((file, len))
    })
    .await
    .map_err(|e| ApiError::from_io(&e, &path.display().to_string()))?;

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\', '\r', '\n'], "_"))
        .unwrap_or_default();
    let stream = read_chunks(file);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    // Without a length hyper sends the body chunked, until the file ends.
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    }
    if let Ok(v) = header::HeaderValue::from_str(&format!("inline; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok((StatusCode::OK, headers, Body::from_stream(stream)).into_response())
}

/// Bytes read from the file per blocking read of a download.
const READ_CHUNK: usize = 512 * 1024;

/// The file's content as chunks, each read on a blocking thread straight into the buffer
/// that is then sent: no intermediate buffer to copy out of (tokio's `File` keeps one), and
/// few thread hand-offs (each a guest context switch, dear under TCG).
fn read_chunks(file: std::fs::File) -> impl Stream<Item = io::Result<Bytes>> + Send {
    futures::stream::try_unfold(Some(Arc::new(file)), |file| async move {
        let Some(file) = file else {
            return Ok(None);
        };
        let reader = Arc::clone(&file);
        let chunk = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let mut buf = Vec::with_capacity(READ_CHUNK);
            // `read_to_end` fills the spare capacity without zeroing it first.
            std::io::Read::read_to_end(
                &mut std::io::Read::take(&*reader, READ_CHUNK as u64),
                &mut buf,
            )?;
            Ok(buf)
        })
        .await
        .map_err(|e| io::Error::other(format!("file reader failed: {e}")))??;
        if chunk.is_empty() {
            return Ok(None);
        }
        // A short read means the end (or a pipe-like file that paused): one more read settles it.
        Ok(Some((Bytes::from(chunk), Some(file))))
    })
}

/// The size a download can announce, or `None` when the file's real length is only known
/// by reading it: procfs says 0 and sysfs 4096 whatever the content, and neither is a regular
/// file anyone writes. A wrong `Content-Length` truncates the body or breaks the connection.
fn trusted_len(file: &std::fs::File, meta: &std::fs::Metadata) -> Option<u64> {
    const PSEUDO: [i64; 8] = [
        0x9fa0,      // proc
        0x6265_6572, // sysfs
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0x6367_7270, // cgroup2
        0x0027_e0eb, // cgroup
        0x6266_7573, // bpf
    ];
    if !meta.is_file() || meta.len() == 0 {
        return None;
    }
    match nix::sys::statfs::fstatfs(file) {
        Ok(fs) if PSEUDO.contains(&fs.filesystem_type().0) => None,
        _ => Some(meta.len()),
    }
}

/// One entry of the upload answer.
#[derive(Debug, Serialize)]
struct WriteInfo {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<std::collections::BTreeMap<String, String>>,
}

/// Undoes the escaping browsers and httpx apply to a multipart `filename` (`"` as `%22`,
/// control characters as `%XX`, backslash doubled). The name is a full path here, so it is
/// never reduced to a base name.
fn unescape_filename(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '%'
            && let Some(hex) = raw.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
            && (v == b'"' || v < 0x20)
        {
            out.push(v as char);
            chars.next();
            chars.next();
            continue;
        }
        if c == '\\' && chars.peek().is_some_and(|(_, n)| *n == '\\') {
            chars.next();
        }
        out.push(c);
    }
    out
}

fn upload_metadata(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for (name, value) in headers {
        if let Some(key) = name.as_str().strip_prefix("x-metadata-") {
            if key.is_empty() {
                return Err(ApiError::bad_request("empty metadata key"));
            }
            let value = value
                .to_str()
                .map_err(|_| ApiError::bad_request(format!("metadata '{key}' is not ASCII")))?;
            out.push((key.to_ascii_lowercase(), value.to_owned()));
        }
    }
    Ok(out)
}

/// Writes uploaded files.
pub async fn upload(
    State(envd): State<Arc<Envd>>,
    Query(params): Query<FileParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut stream = body.into_data_stream();
    let written = write_upload(&envd, &params, &headers, &mut stream).await;
    if written.is_err() {
        // An answer sent while the client is still sending makes it see a broken pipe (with
        // many files, usually) instead of the error: read the rest first, as upstream does.
        discard(&mut stream).await;
    }
    Ok(axum::Json(written?).into_response())
}

/// Reads and drops what is left of a request body, until it ends or stalls.
async fn discard(stream: &mut BodyDataStream) {
    while let Ok(Some(Ok(_))) = tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await {}
}

async fn write_upload(
    envd: &Envd,
    params: &FileParams,
    headers: &HeaderMap,
    stream: &mut BodyDataStream,
) -> Result<Vec<WriteInfo>, ApiError> {
    let user = resolve_user(envd, params.username.as_deref())?;
    let metadata = upload_metadata(headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let query_path = params.path.as_deref().filter(|p| !p.is_empty());

    let written = if mime == "application/octet-stream" {
        let raw = query_path
            .ok_or_else(|| ApiError::bad_request("the path query parameter is required"))?;
        let path = envd.resolve_path(raw, &user);
        let encoding = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .trim()
            .to_ascii_lowercase();
        let body = stream.map_err(|e| io::Error::other(e.to_string()));
        match encoding.as_str() {
            "" | "identity" => write_file(envd, &user, &path, body, &metadata).await?,
            "gzip" | "x-gzip" => {
                let decoder = async_compression::tokio::bufread::GzipDecoder::new(
                    tokio_util::io::StreamReader::new(body),
                );
                let chunks = tokio_util::io::ReaderStream::with_capacity(decoder, CHUNK);
                write_file(envd, &user, &path, chunks, &metadata).await?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unsupported content encoding '{other}'"
                )));
            }
        };
        vec![write_info(&path, &metadata)]
    } else if mime.starts_with("multipart/") {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|e| ApiError::bad_request(format!("invalid multipart content type: {e}")))?;
        let mut multipart = multer::Multipart::new(stream, boundary);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid multipart body: {e}")))?
        {
            if field.name() != Some("file") {
                continue;
            }
            let raw = match query_path {
                Some(p) => p.to_owned(),
                None => field
                    .file_name()
                    .map(unescape_filename)
                    .filter(|f| !f.is_empty())
                    .ok_or_else(|| ApiError::bad_request("file part without a filename"))?,
            };
            let path = envd.resolve_path(&raw, &user);
            if !seen.insert(path.clone()) {
                return Err(ApiError::bad_request(format!(
                    "cannot upload several files to '{}' in one request",
                    path.display()
                )));
            }
            let chunks =
                field.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            write_file(envd, &user, &path, chunks, &metadata).await?;
            out.push(write_info(&path, &metadata));
        }
        if out.is_empty() {
            return Err(ApiError::bad_request("no 'file' part in the upload"));
        }
        out
    } else {
        return Err(ApiError::bad_request(format!(
            "unsupported content type '{content_type}', expected multipart/form-data or application/octet-stream"
        )));
    };
    Ok(written)
}

fn write_info(path: &Path, metadata: &[(String, String)]) -> WriteInfo {
    WriteInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file",
        path: path.display().to_string(),
        metadata: (!metadata.is_empty()).then(|| metadata.iter().cloned().collect()),
    }
}

/// Creates `dir` and its missing parents for an upload by `user`.
///
/// Upstream's envd runs as root: it creates them even where the user could not (`/0/f`
/// written by `user`) and gives them to the user. Here the user creates them when it can;
/// otherwise root creates them, owned by the user, below the nearest existing ancestor, but
/// only if the user may reach into that ancestor. The ancestor is opened with the user's
/// rights and root works relative to that descriptor, so a symlink swapped in meanwhile
/// cannot send it elsewhere.
async fn create_parents(envd: &Envd, user: &User, dir: &Path) -> io::Result<()> {
    let id = FsIdentity::of(user, &envd.accounts);
    let d = dir.to_owned();
    let denied = match fsops::as_user(id.clone(), move || fsops::create_dirs(&d)).await {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => e,
        other => return other,
    };
    if !nix::unistd::geteuid().is_root() || user.uid == 0 {
        return Err(denied);
    }
    let d = dir.to_owned();
    let (ancestor, missing) = fsops::as_user(id, move || {
        let mut missing = Vec::new();
        let mut at = d.as_path();
        loop {
            // `<dir>/.` is only reachable with search permission on the directory itself.
            match nix::fcntl::open(
                &at.join("."),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => return Ok((fd, missing)),
                Err(Errno::ENOENT) => match (at.file_name(), at.parent()) {
                    (Some(name), Some(parent)) => {
                        missing.push(name.to_owned());
                        at = parent;
                    }
                    _ => return Err(io::Error::from(Errno::ENOENT)),
                },
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    })
    .await?;
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        let mut parent = ancestor;
        for name in missing.iter().rev() {
            match nix::sys::stat::mkdirat(
                &parent,
                name.as_os_str(),
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) => nix::unistd::fchownat(
                    &parent,
                    name.as_os_str(),
                    Some(uid),
                    Some(gid),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )?,
                // Made meanwhile; opening it below still refuses a symlink.
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            parent = nix::fcntl::openat(
                &parent,
                name.as_os_str(),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
        }
        Ok(())
    })
    .await
    .map_err(|e| io::Error::other(format!("worker failed: {e}")))?
}

/// Gives `path` to the uploading user. The write runs with the user's identity, so a file
/// another user owns (which the user may still write) cannot be taken over and keeps its
/// owner; upstream, running as root, would take it.
fn chown_to(path: &Path, (uid, gid): (u32, u32)) -> io::Result<()> {
    match std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        other => other,
    }
}

/// Makes the file's metadata exactly `metadata`: as upstream, an overwrite drops what an
/// earlier upload stored instead of merging into it.
fn replace_metadata(path: &Path, metadata: &[(String, String)]) -> io::Result<()> {
    for (key, _) in fsops::read_metadata(path) {
        if metadata.iter().any(|(k, _)| *k == key) {
            continue;
        }
        match xattr::remove(path, format!("{}{key}", fsops::METADATA_XATTR_PREFIX)) {
            Err(e) if e.raw_os_error() != Some(libc::ENODATA) => return Err(e),
            _ => {}
        }
    }
    if metadata.is_empty() {
        return Ok(());
    }
    fsops::write_metadata(path, metadata)
}

/// Creates (as `user`) the parent directories and the file, then writes `body` into it.
async fn write_file<S>(
    envd: &Envd,
    user: &User,
    path: &Path,
    body: S,
    metadata: &[(String, String)],
) -> Result<(), ApiError>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    let what = path.display().to_string();
    let id = FsIdentity::of(user, &envd.accounts);
    let p: PathBuf = path.to_owned();
    let meta = metadata.to_vec();
    let owner = (user.uid, user.gid);
    if let Some(parent) = path.parent() {
        create_parents(envd, user, parent)
            .await
            .map_err(|e| ApiError::from_io(&e, &what))?;
    }
    let file = fsops::as_user(id, move || {
        let existed = match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    "path is a directory",
                ));
            }
            Ok(_) => true,
            Err(_) => false,
        };
        // Upstream chowns an existing file before truncating it and a new one after
        // creating it; watchers see the same CHMOD event at the same place in the sequence.
        if existed {
            chown_to(&p, owner)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)?;
        if !existed {
            chown_to(&p, owner)?;
        }
        replace_metadata(&p, &meta)?;
        Ok(file)
    })
    .await
    .map_err(|e| ApiError::from_io(&e, &what))?;

    copy_into(file, body, &what).await
}

/// Bytes handed to one blocking write: large enough that the thread hand-off is rare (each
/// costs the guest a context switch, dear under TCG), small enough to bound an upload's memory.
const BATCH: usize = 512 * 1024;

/// Writes `body` into `file` as it arrives: its chunks are written as they are, without
/// being copied into a buffer first (each copy of a large upload costs the guest a visible
/// share of the transfer under TCG), a batch at a time on a blocking thread while the next
/// batch is received.
async fn copy_into<S>(file: std::fs::File, mut body: S, what: &str) -> Result<(), ApiError>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    let file = Arc::new(file);
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0usize;
    let mut in_flight: Option<tokio::task::JoinHandle<io::Result<()>>> = None;
    loop {
        let next = match tokio::time::timeout(IDLE_TIMEOUT, body.next()).await {
            Ok(Some(Ok(chunk))) => Some(chunk),
            Ok(None) => None,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!(
                    "reading upload body for {what}: {e}"
                )));
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("upload of {what} stalled"),
                ));
            }
        };
        let done = next.is_none();
        if let Some(chunk) = next {
            batched += chunk.len();
            batch.push(chunk);
        }
        if batched >= BATCH || (done && !batch.is_empty()) {
            if let Some(write) = in_flight.take() {
                finish_write(write, what).await?;
            }
            let (file, chunks) = (Arc::clone(&file), std::mem::take(&mut batch));
            batched = 0;
            in_flight = Some(tokio::task::spawn_blocking(move || {
                chunks.iter().try_for_each(|c| (&*file).write_all(c))
            }));
        }
        if done {
            break;
        }
    }
    match in_flight {
        Some(write) => finish_write(write, what).await,
        None => Ok(()),
    }
}

async fn finish_write(
    write: tokio::task::JoinHandle<io::Result<()>>,
    what: &str,
) -> Result<(), ApiError> {
    write
        .await
        .map_err(|e| ApiError::internal(format!("writing {what}: worker failed: {e}")))?
        .map_err(|e| ApiError::from_io(&e, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_files_announce_no_length() {
        let len = |path: &str| {
            let file = std::fs::File::open(path).unwrap();
            trusted_len(&file, &file.metadata().unwrap())
        };
        assert_eq!(len("/proc/self/status"), None);
        assert_eq!(len("/sys/devices/system/cpu/online"), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(len(path.to_str().unwrap()), None);
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(len(path.to_str().unwrap()), Some(5));
    }

    #[test]
    fn unescapes_httpx_filenames() {
        assert_eq!(unescape_filename("/tmp/a%22b"), "/tmp/a\"b");
        assert_eq!(unescape_filename("/tmp/a\\\\b"), "/tmp/a\\b");
        assert_eq!(unescape_filename("/tmp/x/y.txt"), "/tmp/x/y.txt");
        assert_eq!(unescape_filename("/tmp/100%"), "/tmp/100%");
    }
}
