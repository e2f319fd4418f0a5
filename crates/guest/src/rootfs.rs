//! Root filesystem images: ext4 made with `mkfs.ext4 -d DIR` (no loop mounts, no root needed
//! for the image itself), from a Debian suite (mmdebstrap), an OCI image archive, or a
//! directory.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{GuestError, Result};
use crate::tool::{run, run_streaming};
use crate::{Progress, ProgressFn};

/// An unprivileged user to create in a Debian template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    /// Member of `sudo` with `NOPASSWD`, as E2B's `user` is.
    pub sudo: bool,
}

/// Where a root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum RootfsSource {
    /// `mmdebstrap --variant=minbase --include=PACKAGES SUITE`.
    Debian {
        suite: String,
        packages: Vec<String>,
        /// Apt mirror; `None` uses mmdebstrap's default (deb.debian.org).
        mirror: Option<String>,
        user: Option<UserSpec>,
    },
    /// A `docker save` tar or an OCI image layout tar.
    Oci { archive: PathBuf },
    /// A directory used as is (read, never modified).
    Directory { path: PathBuf },
}

/// The default template `base`: bookworm with what E2B's base image offers and agents call by
/// name: `python` and `pip` (not only `python3`), `node` and `npm`, git, curl, wget, unzip,
/// sudo. The list is part of the template's build fingerprint, so changing it rebuilds `base`.
pub fn base_template() -> RootfsSource {
    RootfsSource::Debian {
        suite: "bookworm".into(),
        packages: [
            "python3",
            // `python` → python3; agents and E2B's examples run `python`, not `python3`.
            "python-is-python3",
            "python3-pip",
            "python3-venv",
            "nodejs",
            "npm",
            "ca-certificates",
            "curl",
            "wget",
            "unzip",
            "git",
            "sudo",
            "procps",
            "iproute2",
        ]
        .map(String::from)
        .to_vec(),
        mirror: None,
        user: Some(UserSpec {
            name: "user".into(),
            uid: 1000,
            sudo: true,
        }),
    }
}

/// The code interpreter's image (`code-interpreter-v1`, the template E2B's code interpreter
/// SDK asks for): `base` plus ipykernel and the data stack E2B's image preinstalls, IRkernel
/// (R) and bash_kernel's dependencies, all from Debian so that every version is bookworm's.
/// bash_kernel itself and Deno are not Debian packages: the set-up fetches them (pinned,
/// verified) and the build uploads them (see the recipe in `firkin-server`).
pub fn code_interpreter_template() -> RootfsSource {
    let mut source = base_template();
    if let RootfsSource::Debian { packages, .. } = &mut source {
        packages.extend(
            [
                "python3-ipykernel",
                "python3-numpy",
                "python3-pandas",
                "python3-matplotlib",
                "python3-scipy",
                "python3-requests",
                // R's kernel; it pulls in r-base-core and the R packages it needs.
                "r-cran-irkernel",
                // bash_kernel's dependencies (its wheel is installed with --no-deps).
                "python3-pexpect",
                "python3-filetype",
            ]
            .map(String::from),
        );
    }
    source
}

/// How the image is sized and labelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageOptions {
    /// Free space added on top of the content, in MiB.
    pub headroom_mib: u64,
    /// Extra fraction of the content size, in percent (ext4 metadata, journal).
    pub headroom_percent: u64,
    /// Smallest image, in MiB.
    pub min_mib: u64,
    pub label: String,
}

impl ImageOptions {
    /// A template's image: the defaults, and at least the template's disk size, so that the
    /// sandbox sees the disk it asked for. Template builds and the tests that build `base`'s
    /// image use this, so that they find each other's image in the [`crate::RootfsCache`].
    pub fn for_disk(disk_mib: u64) -> Self {
        let defaults = ImageOptions::default();
        ImageOptions {
            min_mib: defaults.min_mib.max(disk_mib),
            ..defaults
        }
    }
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            headroom_mib: 1024,
            headroom_percent: 20,
            min_mib: 128,
            label: "firkin-root".into(),
        }
    }
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsInfo {
    pub image: PathBuf,
    pub content_bytes: u64,
    pub image_bytes: u64,
}

/// Builds `out` (an ext4 image) from `source`, using `scratch` (created, then removed) for
/// intermediate trees. `out` appears only when complete.
pub fn build_rootfs(
    source: &RootfsSource,
    scratch: &Path,
    out: &Path,
    opts: &ImageOptions,
    progress: ProgressFn<'_>,
) -> Result<RootfsInfo> {
    crate::remove_tree(scratch).map_err(GuestError::io("removing", scratch))?;
    std::fs::create_dir_all(scratch).map_err(GuestError::io("creating", scratch))?;
    let result = source_tree(source, scratch, progress)
        .and_then(|tree| dir_to_ext4(&tree, out, opts, progress));
    if let Err(err) = crate::remove_tree(scratch) {
        tracing::warn!(scratch = %scratch.display(), %err, "cannot remove a build's scratch tree");
    }
    result
}

/// The finished tree `source` gives: a directory source as it is, the others built under
/// `scratch`.
fn source_tree(source: &RootfsSource, scratch: &Path, progress: ProgressFn<'_>) -> Result<PathBuf> {
    Ok(match source {
        RootfsSource::Directory { path } => path.clone(),
        RootfsSource::Debian {
            suite,
            packages,
            mirror,
            user,
        } => {
            let tree = scratch.join("tree");
            mmdebstrap(
                suite,
                packages,
                mirror.as_deref(),
                user.as_ref(),
                &tree,
                progress,
            )?;
            finish_tree(&tree)?;
            quicken_login_scripts(&tree)?;
            let_pip_install(&tree)?;
            tree
        }
        RootfsSource::Oci { archive } => {
            let tree = scratch.join("tree");
            std::fs::create_dir_all(&tree).map_err(GuestError::io("creating", &tree))?;
            crate::oci::unpack_image(archive, scratch, &tree, progress)?;
            finish_tree(&tree)?;
            tree
        }
    })
}

/// Version of what firkin does to a tree on top of its source ([`finish_tree`],
/// [`quicken_login_scripts`]). Template build fingerprints include it, so that a cached build
/// made under older rules is rebuilt rather than adopted.
pub const ROOTFS_RULES_VERSION: u32 = 3;

/// Debian 12 marks its Python "externally managed" (PEP 668): `pip install x` refuses with
/// `externally-managed-environment` unless given `--break-system-packages`. E2B's base image
/// lets `pip install x` work, agents (and E2B's own examples) call it that way, and a sandbox is
/// a throwaway VM whose system Python nothing else depends on, so the guard protects nothing
/// here. pip's own configuration switch says so for every user and every venv-less pip (as
/// `user`, pip then installs into `~/.local`). Only Debian trees we build ourselves get it, and
/// an existing `/etc/pip.conf` is left alone.
fn let_pip_install(tree: &Path) -> Result<()> {
    let path = tree.join("etc/pip.conf");
    if std::fs::symlink_metadata(&path).is_ok() {
        return Ok(());
    }
    let text = "# firkin: let `pip install` work on Debian's externally managed Python, as it does\n\
                # in E2B's base image (a sandbox's system Python belongs to its user).\n\
                [global]\nbreak-system-packages = true\n";
    std::fs::write(&path, text).map_err(GuestError::io("writing", &path))
}

/// The E2B SDK runs every command as `bash -l -c CMD`, so a login shell's start-up is paid on
/// each `commands.run`. Debian's `/etc/profile` forks `id -u` and root's `~/.profile` forks
/// `mesg n`; under TCG each fork+exec costs ~45 ms, which made `commands.run("true")` 139 ms
/// (user) and 174 ms (root) instead of 89 ms. Bash already knows its effective uid, and `mesg`
/// only matters on a terminal, so both are rewritten to skip the fork, keeping their meaning
/// (dash and other shells still take the `id -u` fallback). Only Debian trees we build
/// ourselves are touched; a file that does not hold the exact stock line is left alone.
fn quicken_login_scripts(tree: &Path) -> Result<()> {
    let rules: [(&str, &str, &str); 2] = [
        ("etc/profile", "\"$(id -u)\"", "\"${EUID:-$(id -u)}\""),
        (
            "root/.profile",
            "\nmesg n 2> /dev/null || true",
            "\n[ -t 0 ] && mesg n 2> /dev/null || true",
        ),
    ];
    for (rel, stock, quick) in rules {
        let path = tree.join(rel);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(GuestError::io("reading", &path)(e)),
        };
        if text.contains(stock) {
            std::fs::write(&path, text.replace(stock, quick))
                .map_err(GuestError::io("writing", &path))?;
        }
    }
    Ok(())
}

/// Files every firkin guest needs and images often lack: DNS for QEMU's user-mode network,
/// a hostname, `/etc/hosts`, and the mount points envd and init use.
fn finish_tree(tree: &Path) -> Result<()> {
    let write = |rel: &str, text: &str| {
        let p = tree.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(GuestError::io("creating", parent))?;
        }
        // A dangling symlink (e.g. resolv.conf → systemd-resolved) would send the write
        // outside the tree; replace it with a file.
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&p).map_err(GuestError::io("removing", &p))?;
        }
        std::fs::write(&p, text).map_err(GuestError::io("writing", &p))
    };
    write("etc/resolv.conf", "nameserver 10.0.2.3\n")?;
    write("etc/hostname", "firkin\n")?;
    write(
        "etc/hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tfirkin\n",
    )?;
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        let p = tree.join(dir);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::create_dir_all(&p).map_err(GuestError::io("creating", &p))?;
        }
    }
    Ok(())
}

fn mmdebstrap(
    suite: &str,
    packages: &[String],
    mirror: Option<&str>,
    user: Option<&UserSpec>,
    tree: &Path,
    progress: ProgressFn<'_>,
) -> Result<()> {
    let mut args: Vec<OsString> = vec![
        "--variant=minbase".into(),
        // Documentation and translations only cost image size.
        "--dpkgopt=path-exclude=/usr/share/man/*".into(),
        "--dpkgopt=path-exclude=/usr/share/doc/*".into(),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright".into(),
        "--dpkgopt=path-exclude=/usr/share/locale/*".into(),
        "--dpkgopt=path-exclude=/usr/share/info/*".into(),
    ];
    if !packages.is_empty() {
        if let Some(bad) = packages
            .iter()
            .find(|p| p.is_empty() || p.contains([',', ' ']))
        {
            return Err(GuestError::BadOption(format!("bad package name {bad:?}")));
        }
        args.push(format!("--include={}", packages.join(",")).into());
    }
    if let Some(u) = user {
        if u.name.is_empty()
            || !u
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(GuestError::BadOption(format!("bad user name {:?}", u.name)));
        }
        let groups = if u.sudo { " -G sudo" } else { "" };
        args.push(
            format!(
                "--customize-hook=chroot \"$1\" useradd -m -u {uid} -U -s /bin/bash{groups} {name}",
                uid = u.uid,
                name = u.name
            )
            .into(),
        );
        if u.sudo {
            args.push(
                format!(
                    "--customize-hook=echo '{name} ALL=(ALL:ALL) NOPASSWD: ALL' > \"$1/etc/sudoers.d/{name}\" && chmod 0440 \"$1/etc/sudoers.d/{name}\"",
                    name = u.name
                )
                .into(),
            );
        }
    }
    args.push(suite.into());
    args.push(tree.into());
    if let Some(m) = mirror {
        args.push(m.into());
    }
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let mut lines = 0u64;
    progress(&Progress::step("mmdebstrap", format!("mmdebstrap {suite}")));
    run_streaming("mmdebstrap", &refs, &mut |line| {
        lines += 1;
        progress(&Progress {
            phase: "mmdebstrap".into(),
            done: lines,
            total: None,
            message: line.to_string(),
        });
    })
}

/// Bytes a tree occupies (file sizes rounded up to 4 KiB blocks, plus one block per inode).
pub fn tree_size(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(GuestError::io("listing", &d))? {
            let e = e.map_err(GuestError::io("listing", &d))?;
            let meta = e
                .path()
                .symlink_metadata()
                .map_err(GuestError::io("inspecting", e.path()))?;
            total += 4096;
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                total += meta.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok(total)
}

/// Makes an ext4 image of `dir` at `out`, sized content + headroom.
pub fn dir_to_ext4(
    dir: &Path,
    out: &Path,
    opts: &ImageOptions,
    progress: ProgressFn<'_>,
) -> Result<RootfsInfo> {
    if !dir.is_dir() {
        return Err(GuestError::BadOption(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let content = tree_size(dir)?;
    let mib = 1024 * 1024;
    let size = (content + content * opts.headroom_percent / 100 + opts.headroom_mib * mib)
        .div_ceil(mib)
        .max(opts.min_mib)
        * mib;
    progress(&Progress {
        phase: "mkfs.ext4".into(),
        done: 0,
        total: Some(size),
        message: format!("{} MiB content → {} MiB image", content / mib, size / mib),
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(GuestError::io("creating", parent))?;
    }
    firkin_artifacts::write_atomic_with(out, |file, tmp| {
        file.set_len(size).map_err(GuestError::io("sizing", tmp))?;
        let s = |x: &'static str| OsStr::new(x);
        let label = OsString::from(&opts.label);
        run(
            "mkfs.ext4",
            &[
                s("-q"),
                s("-F"),
                s("-L"),
                &label,
                // No reserved blocks (there is no root daemon to protect), files owned as in the
                // tree, and no discards on a file we just created sparse.
                s("-m"),
                s("0"),
                s("-E"),
                s("nodiscard"),
                s("-d"),
                dir.as_os_str(),
                tmp.as_os_str(),
            ],
            None,
        )?;
        Ok(())
    })
    .map_err(GuestError::atomic(out))?;
    progress(&Progress {
        phase: "mkfs.ext4".into(),
        done: size,
        total: Some(size),
        message: format!("{} ready", out.display()),
    });
    Ok(RootfsInfo {
        image: out.to_path_buf(),
        content_bytes: content,
        image_bytes: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOCK_PROFILE: &str = "if [ \"$(id -u)\" -eq 0 ]; then\n  PATH=\"/usr/sbin\"\nfi\nif [ \"${PS1-}\" ]; then\n  if [ \"$(id -u)\" -eq 0 ]; then\n    PS1='# '\n  fi\nfi\n";
    const STOCK_ROOT_PROFILE: &str =
        "if [ \"$BASH\" ]; then\n  . ~/.bashrc\nfi\n\nmesg n 2> /dev/null || true\n";

    fn tree_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn login_scripts_lose_their_forks() {
        let dir = tree_with(&[
            ("etc/profile", STOCK_PROFILE),
            ("root/.profile", STOCK_ROOT_PROFILE),
        ]);
        quicken_login_scripts(dir.path()).unwrap();
        let profile = std::fs::read_to_string(dir.path().join("etc/profile")).unwrap();
        assert!(!profile.contains("[ \"$(id -u)\""), "{profile}");
        assert_eq!(profile.matches("\"${EUID:-$(id -u)}\"").count(), 2);
        let root = std::fs::read_to_string(dir.path().join("root/.profile")).unwrap();
        assert!(
            root.ends_with("\n[ -t 0 ] && mesg n 2> /dev/null || true\n"),
            "{root}"
        );
    }

    #[test]
    fn login_scripts_behave_as_before_in_bash_and_sh() {
        let dir = tree_with(&[("etc/profile", STOCK_PROFILE)]);
        quicken_login_scripts(dir.path()).unwrap();
        let profile = dir.path().join("etc/profile");
        for shell in ["bash", "sh"] {
            let out = std::process::Command::new(shell)
                .arg("-c")
                .arg(format!(". {} && echo \"$PATH\"", profile.display()))
                .output()
                .unwrap();
            assert!(out.status.success(), "{shell}: {out:?}");
            let is_root = nix::unistd::geteuid().is_root();
            let path = String::from_utf8_lossy(&out.stdout);
            assert_eq!(path.trim() == "/usr/sbin", is_root, "{shell}: {path}");
        }
    }

    #[test]
    fn pip_may_install_and_an_existing_config_stays() {
        let dir = tree_with(&[("etc/hostname", "x\n")]);
        let_pip_install(dir.path()).unwrap();
        let conf = std::fs::read_to_string(dir.path().join("etc/pip.conf")).unwrap();
        assert!(
            conf.contains("[global]\nbreak-system-packages = true\n"),
            "{conf}"
        );
        let mine = "[global]\nindex-url = http://mirror\n";
        let dir = tree_with(&[("etc/pip.conf", mine)]);
        let_pip_install(dir.path()).unwrap();
        let after = std::fs::read_to_string(dir.path().join("etc/pip.conf")).unwrap();
        assert_eq!(after, mine);
    }

    #[test]
    fn other_trees_are_left_alone() {
        let custom = "# my own profile\nexport A=1\n";
        let dir = tree_with(&[("etc/profile", custom)]);
        quicken_login_scripts(dir.path()).unwrap();
        let after = std::fs::read_to_string(dir.path().join("etc/profile")).unwrap();
        assert_eq!(after, custom);
        // A tree without the files at all is fine too.
        let empty = tempfile::tempdir().unwrap();
        quicken_login_scripts(empty.path()).unwrap();
    }
}
