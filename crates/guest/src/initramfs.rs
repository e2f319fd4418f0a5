//! The initramfs: a newc cpio archive written with the `cpio` crate, uncompressed (the kernel
//! unpacks it faster than it would inflate it, and it is read once per cold boot).
//!
//! Layout, which `firkin-init` relies on:
//!
//! ```text
//! /init                      static firkin-init
//! /firkin-envd               static firkin-envd, copied to /run/firkin/ of the root disk
//! /lib/firkin/*.ko           the virtio modules
//! /lib/firkin/modules.order  their absolute paths, in load order
//! /dev/console               so the kernel can give init a console
//! /dev /proc /sys /newroot   mount points
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use cpio::NewcBuilder;

use crate::error::{GuestError, Result};

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The static `firkin-init` binary.
    pub init: PathBuf,
    /// The static `firkin-envd` binary (or any guest agent honouring the same contract).
    pub envd: PathBuf,
    /// Kernel modules, in load order.
    pub modules: Vec<PathBuf>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

struct Writer {
    out: std::io::BufWriter<File>,
    ino: u32,
    path: PathBuf,
}

impl Writer {
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        rdev: Option<(u32, u32)>,
    ) -> Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| GuestError::TooBig {
            what: name.to_string(),
            size: data.len() as u64,
        })?;
        self.ino += 1;
        let mut b = NewcBuilder::new(name)
            .ino(self.ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(if mode & S_IFDIR != 0 { 2 } else { 1 });
        if let Some((major, minor)) = rdev {
            b = b.rdev_major(major).rdev_minor(minor);
        }
        let out = &mut self.out;
        let mut w = b.write(out, size);
        w.write_all(data)
            .and_then(|()| w.finish().map(drop))
            .map_err(GuestError::io("writing", &self.path))
    }

    fn file(&mut self, name: &str, mode: u32, src: &Path) -> Result<()> {
        let data = std::fs::read(src).map_err(GuestError::io("reading", src))?;
        self.entry(name, S_IFREG | mode, &data, None)
    }
}

/// Writes the initramfs to `out` atomically (see [`firkin_artifacts::write_atomic_with`]).
pub fn write_initramfs(spec: &InitramfsSpec, out: &Path) -> Result<()> {
    firkin_artifacts::write_atomic_with(out, |file, _| write_archive(spec, file, out))
        .map_err(GuestError::atomic(out))
}

/// The cpio archive of `spec` into `file`; errors name `out`, the file being replaced.
fn write_archive(spec: &InitramfsSpec, file: &File, out: &Path) -> Result<()> {
    let file = file.try_clone().map_err(GuestError::io("writing", out))?;
    let mut w = Writer {
        out: std::io::BufWriter::new(file),
        ino: 0,
        path: out.to_path_buf(),
    };
    for dir in ["dev", "proc", "sys", "newroot", "run", "lib", "lib/firkin"] {
        w.entry(dir, S_IFDIR | 0o755, &[], None)?;
    }
    w.entry("dev/console", S_IFCHR | 0o600, &[], Some((5, 1)))?;
    w.file("init", 0o755, &spec.init)?;
    w.file("firkin-envd", 0o755, &spec.envd)?;
    let mut order = String::new();
    for m in &spec.modules {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| GuestError::BadOption(format!("bad module path {}", m.display())))?;
        w.file(&format!("lib/firkin/{name}"), 0o644, m)?;
        order.push_str(&format!("/lib/firkin/{name}\n"));
    }
    w.entry(
        "lib/firkin/modules.order",
        S_IFREG | 0o644,
        order.as_bytes(),
        None,
    )?;
    let out_w = cpio::newc::trailer(w.out).map_err(GuestError::io("writing", out))?;
    out_w
        .into_inner()
        .map_err(|e| GuestError::io("flushing", out)(e.into_error()))?;
    Ok(())
}
