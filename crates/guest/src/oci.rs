//! Unpacking an OCI image archive into a directory: a `docker save` tar or an OCI image layout
//! tar. Layers are applied in order; whiteouts (`.wh.NAME`) delete what lower layers put at
//! `NAME`, and an opaque marker (`.wh..wh..opq`) empties a directory of lower-layer content.
//!
//! Whiteouts are applied in a first pass over each layer and its files in a second one, so that
//! a whiteout never removes a file of its own layer, whatever the order of the tar entries.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::{GuestError, Result};
use crate::{Progress, ProgressFn};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// One entry of a `docker save` `manifest.json`.
#[derive(Debug, Deserialize)]
struct DockerManifest {
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn oci_err(path: &Path, why: impl Into<String>) -> GuestError {
    GuestError::Oci {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// A relative path with no `..`, no root and no prefix, or an error naming the entry.
fn safe_relative(path: &Path, origin: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(GuestError::UnsafePath {
                    path: path.display().to_string(),
                    origin: origin.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// Unpacks the image in `archive` into `root` (which must exist and is normally empty), using
/// `scratch` for the archive's blobs. Returns the number of layers applied.
pub fn unpack_image(
    archive: &Path,
    scratch: &Path,
    root: &Path,
    progress: ProgressFn<'_>,
) -> Result<usize> {
    let blobs = scratch.join("archive");
    let _ = std::fs::remove_dir_all(&blobs);
    std::fs::create_dir_all(&blobs).map_err(GuestError::io("creating", &blobs))?;
    progress(&Progress::step(
        "oci",
        format!("reading {}", archive.display()),
    ));
    let file = File::open(archive).map_err(GuestError::io("opening", archive))?;
    let mut outer = tar::Archive::new(BufReader::new(file));
    for entry in outer
        .entries()
        .map_err(GuestError::io("reading", archive))?
    {
        let mut entry = entry.map_err(GuestError::io("reading", archive))?;
        entry
            .unpack_in(&blobs)
            .map_err(GuestError::io("unpacking", archive))?;
    }

    let layers = layer_files(archive, &blobs)?;
    let total = layers.len();
    for (i, (layer, digest)) in layers.iter().enumerate() {
        if let Some(hex) = digest {
            verify_sha256(layer, hex)?;
        }
        progress(&Progress {
            phase: "oci".into(),
            done: i as u64,
            total: Some(total as u64),
            message: format!("applying layer {}/{total}", i + 1),
        });
        apply_layer(layer, root)?;
    }
    progress(&Progress {
        phase: "oci".into(),
        done: total as u64,
        total: Some(total as u64),
        message: format!("{total} layers applied"),
    });
    let _ = std::fs::remove_dir_all(&blobs);
    Ok(total)
}

/// Layer files in order, with the expected sha256 when the archive states one.
fn layer_files(archive: &Path, blobs: &Path) -> Result<Vec<(PathBuf, Option<String>)>> {
    let index_path = blobs.join("index.json");
    if index_path.is_file() {
        let index = ImageIndex::from_file(&index_path)
            .map_err(|e| oci_err(archive, format!("index.json: {e}")))?;
        let manifest = pick_manifest(archive, blobs, &index, 0)?;
        return manifest
            .layers()
            .iter()
            .map(|l| {
                let media = l.media_type().to_string();
                if media.contains("zstd") {
                    return Err(oci_err(
                        archive,
                        format!("layer media type {media} is not supported"),
                    ));
                }
                let hex = l.digest().digest().to_string();
                let path = blobs
                    .join("blobs")
                    .join(l.digest().algorithm().to_string())
                    .join(&hex);
                let sha = (l.digest().algorithm().to_string() == "sha256").then_some(hex);
                Ok((path, sha))
            })
            .collect();
    }
    let manifest_path = blobs.join("manifest.json");
    if manifest_path.is_file() {
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(GuestError::io("reading", &manifest_path))?;
        let manifests: Vec<DockerManifest> = serde_json::from_str(&text)
            .map_err(|e| oci_err(archive, format!("manifest.json: {e}")))?;
        let first = manifests
            .into_iter()
            .next()
            .ok_or_else(|| oci_err(archive, "manifest.json lists no image"))?;
        return first
            .layers
            .iter()
            .map(|l| {
                Ok((
                    blobs.join(safe_relative(Path::new(l), "manifest.json")?),
                    None,
                ))
            })
            .collect();
    }
    Err(oci_err(
        archive,
        "neither index.json (OCI layout) nor manifest.json (docker save) found",
    ))
}

fn blob_path(blobs: &Path, d: &oci_spec::image::Descriptor) -> PathBuf {
    blobs
        .join("blobs")
        .join(d.digest().algorithm().to_string())
        .join(d.digest().digest())
}

/// The image manifest for linux/amd64 (or the only one), following nested indexes.
fn pick_manifest(
    archive: &Path,
    blobs: &Path,
    index: &ImageIndex,
    depth: usize,
) -> Result<ImageManifest> {
    if depth > 4 {
        return Err(oci_err(archive, "image indexes nested too deep"));
    }
    let manifests = index.manifests();
    let chosen = manifests
        .iter()
        .find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                p.architecture().to_string() == "amd64" && p.os().to_string() == "linux"
            })
        })
        .or_else(|| manifests.first())
        .ok_or_else(|| oci_err(archive, "index lists no manifest"))?;
    let path = blob_path(blobs, chosen);
    match chosen.media_type() {
        MediaType::ImageIndex => {
            let nested = ImageIndex::from_file(&path)
                .map_err(|e| oci_err(archive, format!("{}: {e}", path.display())))?;
            pick_manifest(archive, blobs, &nested, depth + 1)
        }
        _ => ImageManifest::from_file(&path)
            .map_err(|e| oci_err(archive, format!("{}: {e}", path.display()))),
    }
}

fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let mut f = File::open(path).map_err(GuestError::io("opening", path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(GuestError::io("hashing", path))?;
    let got = hex::encode(h.finalize());
    if got != expected {
        return Err(oci_err(
            path,
            format!("layer digest mismatch: expected sha256:{expected}, got sha256:{got}"),
        ));
    }
    Ok(())
}

/// A layer as a tar stream, gzip-inflated when it starts with the gzip magic.
fn open_layer(path: &Path) -> Result<Box<dyn Read>> {
    let mut f = File::open(path).map_err(GuestError::io("opening", path))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .map_err(GuestError::io("reading", path))?;
    f.seek(SeekFrom::Start(0))
        .map_err(GuestError::io("seeking", path))?;
    let reader = BufReader::new(f);
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(reader)))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Err(oci_err(path, "zstd-compressed layers are not supported"))
    } else {
        Ok(Box::new(reader))
    }
}

fn remove_any(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(path).map_err(GuestError::io("removing", path))
        }
        Ok(_) => std::fs::remove_file(path).map_err(GuestError::io("removing", path)),
        Err(_) => Ok(()),
    }
}

/// Applies one layer on top of `root`.
pub fn apply_layer(layer: &Path, root: &Path) -> Result<()> {
    let origin = layer.display().to_string();
    // Pass 1: whiteouts and opaque markers, against the lower layers only.
    let mut whiteouts = Vec::new();
    let mut opaque = BTreeSet::new();
    {
        let mut ar = tar::Archive::new(open_layer(layer)?);
        for entry in ar.entries().map_err(GuestError::io("reading", layer))? {
            let entry = entry.map_err(GuestError::io("reading", layer))?;
            let path = entry.path().map_err(GuestError::io("reading", layer))?;
            let rel = safe_relative(&path, &origin)?;
            let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            if name == OPAQUE {
                opaque.insert(parent);
            } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
                whiteouts.push(parent.join(target));
            }
        }
    }
    for dir in &opaque {
        let abs = root.join(dir);
        if let Ok(rd) = std::fs::read_dir(&abs) {
            for e in rd.filter_map(|e| e.ok()) {
                remove_any(&e.path())?;
            }
        }
    }
    for w in &whiteouts {
        remove_any(&root.join(w))?;
    }

    // Pass 2: everything else.
    let mut ar = tar::Archive::new(open_layer(layer)?);
    let root_user = nix::unistd::geteuid().is_root();
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(root_user);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(root_user);
    ar.set_overwrite(true);
    for entry in ar.entries().map_err(GuestError::io("reading", layer))? {
        let mut entry = entry.map_err(GuestError::io("reading", layer))?;
        let path = entry.path().map_err(GuestError::io("reading", layer))?;
        let rel = safe_relative(&path, &origin)?;
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(WHITEOUT_PREFIX) || rel.as_os_str().is_empty() {
            continue;
        }
        let dest = root.join(&rel);
        let is_dir = entry.header().entry_type().is_dir();
        // A layer may replace a directory with a file or the other way round.
        if let Ok(meta) = std::fs::symlink_metadata(&dest)
            && !(is_dir && meta.is_dir())
        {
            remove_any(&dest)?;
        }
        entry.unpack_in(root).map_err(|e| {
            // tar's error hides the OS error in its source chain.
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            oci_err(layer, format!("unpacking {}: {e}{cause}", rel.display()))
        })?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parent_components_are_refused() {
        assert!(safe_relative(Path::new("../etc/passwd"), "t").is_err());
        assert_eq!(
            safe_relative(Path::new("./usr/bin/x"), "t").unwrap(),
            PathBuf::from("usr/bin/x")
        );
        assert_eq!(
            safe_relative(Path::new("/etc/x"), "t").unwrap(),
            PathBuf::from("etc/x")
        );
    }
}
