//! The files of template builds' COPY steps (issue 14), as E2B's SDKs upload them: one tar per
//! content hash (`filesHash`, the SDK's hash of the step and the files it matched), gzip
//! without a `Content-Encoding` header by default, so the store sniffs it.
//!
//! An upload becomes `<dir>/<hash>.tar`, an uncompressed tar whose every entry was checked: a
//! relative path inside the context (no root, no `..`), a link target inside it too, and no
//! more than the byte limits allow, compressed and expanded (a small gzip can expand to
//! anything). The tar appears under its name only once complete and checked, so a half-sent
//! or refused upload is never taken for a present one.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// Largest upload accepted, as sent (the SDK's gzip).
pub const MAX_UPLOAD_BYTES: u64 = 2 << 30;
/// Largest tar an upload may expand to.
pub const MAX_EXPANDED_BYTES: u64 = 8 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BuildFilesError {
    #[error("files hash {0:?} is not a SHA-256 in lowercase hex")]
    BadHash(String),
    #[error("the upload for {hash} is larger than {limit} bytes")]
    TooLarge { hash: String, limit: u64 },
    #[error("the upload for {hash} has an entry outside the build context: {path:?}")]
    UnsafePath { hash: String, path: String },
    #[error("the upload for {hash} is not a tar (optionally gzip-compressed): {reason}")]
    NotATar { hash: String, reason: String },
    #[error("reading the upload for {hash}: {source}")]
    Body {
        hash: String,
        #[source]
        source: axum::Error,
    },
    #[error("build files i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BuildFilesError {
    /// Whether the client sent something wrong (4xx) rather than the server failing.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, BuildFilesError::Io { .. })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildFilesError + '_ {
    move |source| BuildFilesError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that `hash` names a file the way the SDK computes them.
pub fn check_hash(hash: &str) -> Result<(), BuildFilesError> {
    let ok = hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BuildFilesError::BadHash(hash.to_owned()))
    }
}

/// The directory of uploaded build files.
#[derive(Debug, Clone)]
pub struct BuildFiles {
    dir: PathBuf,
    max_upload: u64,
    max_expanded: u64,
}

impl BuildFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_upload: MAX_UPLOAD_BYTES,
            max_expanded: MAX_EXPANDED_BYTES,
        }
    }

    /// Other byte limits (tests).
    pub fn with_limits(mut self, max_upload: u64, max_expanded: u64) -> Self {
        self.max_upload = max_upload;
        self.max_expanded = max_expanded;
        self
    }

    /// The checked tar of `hash`.
    pub fn path(&self, hash: &str) -> Result<PathBuf, BuildFilesError> {
        check_hash(hash)?;
        Ok(self.dir.join(format!("{hash}.tar")))
    }

    /// Whether the files of `hash` were uploaded (and passed the checks).
    pub fn contains(&self, hash: &str) -> Result<bool, BuildFilesError> {
        Ok(self.path(hash)?.is_file())
    }

    /// Receives an upload: spooled to disk within the upload limit, then checked and written
    /// out uncompressed under its hash. Returns the tar's size.
    pub async fn receive(
        &self,
        hash: &str,
        body: axum::body::Body,
    ) -> Result<u64, BuildFilesError> {
        let target = self.path(hash)?;
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(io(&self.dir))?;
        let unique = format!("{}.{}", std::process::id(), rand::random::<u32>());
        let spool = self.dir.join(format!(".{hash}.{unique}.upload"));
        let partial = self.dir.join(format!(".{hash}.{unique}.partial"));
        let result = async {
            self.spool(hash, body, &spool).await?;
            let (this, owned_hash, spooled, checked) = (
                self.clone(),
                hash.to_owned(),
                spool.clone(),
                partial.clone(),
            );
            let size =
                tokio::task::spawn_blocking(move || this.check(&owned_hash, &spooled, &checked))
                    .await
                    .map_err(|e| BuildFilesError::Io {
                        path: target.clone(),
                        source: std::io::Error::other(e),
                    })??;
            tokio::fs::rename(&partial, &target)
                .await
                .map_err(io(&target))?;
            Ok(size)
        }
        .await;
        let _ = tokio::fs::remove_file(&spool).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result
    }

    async fn spool(
        &self,
        hash: &str,
        body: axum::body::Body,
        spool: &Path,
    ) -> Result<(), BuildFilesError> {
        let mut file = tokio::fs::File::create(spool).await.map_err(io(spool))?;
        let mut stream = body.into_data_stream();
        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| BuildFilesError::Body {
                hash: hash.to_owned(),
                source,
            })?;
            received += chunk.len() as u64;
            if received > self.max_upload {
                return Err(BuildFilesError::TooLarge {
                    hash: hash.to_owned(),
                    limit: self.max_upload,
                });
            }
            file.write_all(&chunk).await.map_err(io(spool))?;
        }
        file.flush().await.map_err(io(spool))?;
        Ok(())
    }

    /// Reads the spooled upload (gzip or not), checks every entry and writes the plain tar
    /// to `partial`.
    fn check(&self, hash: &str, spool: &Path, partial: &Path) -> Result<u64, BuildFilesError> {
        let not_a_tar = |reason: String| BuildFilesError::NotATar {
            hash: hash.to_owned(),
            reason,
        };
        let mut file = std::fs::File::open(spool).map_err(io(spool))?;
        let mut magic = [0u8; 2];
        let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
        let file = std::fs::File::open(spool).map_err(io(spool))?;
        let reader: Box<dyn Read> = if gzip {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            Box::new(file)
        };
        // Counts what the decoder hands out, so a gzip bomb stops at the limit.
        let mut archive = tar::Archive::new(Limited {
            inner: reader,
            left: self.max_expanded,
        });
        let out = std::fs::File::create(partial).map_err(io(partial))?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(out));
        let entries = archive
            .entries()
            .map_err(|e| classify(e, hash, self.max_expanded, &not_a_tar))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| classify(e, hash, self.max_expanded, &not_a_tar))?;
            let path = entry
                .path()
                .map_err(|e| not_a_tar(e.to_string()))?
                .into_owned();
            let unsafe_path = |p: &Path| BuildFilesError::UnsafePath {
                hash: hash.to_owned(),
                path: p.display().to_string(),
            };
            let Some(clean) = normalized(&path) else {
                return Err(unsafe_path(&path));
            };
            if clean.as_os_str().is_empty() {
                // The context directory itself: the COPY's destination, made by the build.
                continue;
            }
            let kind = entry.header().entry_type();
            if (kind.is_hard_link() || kind.is_symlink())
                && let Some(target) = entry.link_name().map_err(|e| not_a_tar(e.to_string()))?
            {
                // A hard link names a member; a relative symlink resolves from its
                // directory. Either way it must stay in the context; an absolute symlink
                // points into the guest's own tree, which the build may do anyway.
                let resolved = if kind.is_hard_link() {
                    target.to_path_buf()
                } else if target.is_absolute() {
                    PathBuf::new()
                } else {
                    clean.parent().unwrap_or(Path::new("")).join(&target)
                };
                if normalized(&resolved).is_none() {
                    return Err(unsafe_path(&target));
                }
            }
            let mut header = entry.header().clone();
            let link = entry
                .link_name()
                .map_err(|e| not_a_tar(e.to_string()))?
                .map(|t| t.into_owned());
            let appended = match link {
                // `append_link` writes a long target in full, where the header holds 100 bytes.
                Some(target) if kind.is_hard_link() || kind.is_symlink() => {
                    builder.append_link(&mut header, &clean, target)
                }
                _ => builder.append_data(&mut header, &clean, &mut entry),
            };
            appended.map_err(|e| classify(e, hash, self.max_expanded, &not_a_tar))?;
        }
        let out = builder
            .into_inner()
            .map_err(io(partial))?
            .into_inner()
            .map_err(|e| BuildFilesError::Io {
                path: partial.to_owned(),
                source: e.into_error(),
            })?;
        out.sync_all().map_err(io(partial))?;
        let size = out.metadata().map_err(io(partial))?.len();
        Ok(size)
    }
}

/// `path` with `.` and `..` resolved, if it is relative and never climbs above where it
/// starts (an empty result is the context itself).
fn normalized(path: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// The error of reading the archive: the expansion limit if that is what stopped it.
fn classify(
    e: std::io::Error,
    hash: &str,
    limit: u64,
    not_a_tar: &dyn Fn(String) -> BuildFilesError,
) -> BuildFilesError {
    if e.kind() == std::io::ErrorKind::FileTooLarge
        || e.get_ref()
            .is_some_and(|inner| inner.is::<ExpansionLimit>())
    {
        BuildFilesError::TooLarge {
            hash: hash.to_owned(),
            limit,
        }
    } else {
        not_a_tar(e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the upload expands beyond its limit")]
struct ExpansionLimit;

struct Limited<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One byte more would be over: find out whether there is one.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    ExpansionLimit,
                )),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[path = "build_files_tests.rs"]
mod tests;
