//! Guest asset tests: initramfs layout, ext4 images from a directory, an OCI archive (docker
//! save and OCI layout, with whiteouts) and the Debian `base` template, checked by reading the
//! images back with debugfs. Tools come from `scripts/setup-guest.sh`; missing ones fail the
//! test with that instruction.
//!
//! Run: `cargo test -p firkin-guest --test assets`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use firkin_guest::{ImageOptions, InitramfsSpec, RootfsSource};
use sha2::{Digest, Sha256};

const SETUP: &str = "scripts/setup-guest.sh";

fn cache_dir() -> PathBuf {
    std::env::var_os("FIRKIN_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".firkin/cache"))
}

/// A fresh directory for one test under the cache (never TMPDIR).
fn work_dir(name: &str) -> PathBuf {
    let d = cache_dir()
        .join("test-runs")
        .join(format!("guest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is not installed; run {SETUP}");
}

/// `debugfs -R CMD image`, stdout.
fn debugfs(image: &Path, cmd: &str) -> String {
    require_tool("debugfs");
    let out = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn small() -> ImageOptions {
    ImageOptions {
        headroom_mib: 16,
        min_mib: 32,
        ..ImageOptions::default()
    }
}

/// A small image at `image` from `source`, with `dir/scratch` as scratch and no progress.
fn build_small(
    dir: &Path,
    source: RootfsSource,
    image: &Path,
) -> firkin_guest::Result<firkin_guest::RootfsInfo> {
    firkin_guest::build_rootfs(&source, &dir.join("scratch"), image, &small(), &mut |_| {})
}

#[test]
fn initramfs_has_init_envd_modules_and_console() {
    let dir = work_dir("initramfs");
    let init = dir.join("init-bin");
    let envd = dir.join("envd-bin");
    let m1 = dir.join("virtio.ko");
    let m2 = dir.join("virtio_blk.ko");
    std::fs::write(&init, b"INIT").unwrap();
    std::fs::write(&envd, b"ENVD").unwrap();
    std::fs::write(&m1, b"M1").unwrap();
    std::fs::write(&m2, b"M2").unwrap();
    let out = dir.join("initramfs.cpio");
    firkin_guest::write_initramfs(
        &InitramfsSpec {
            init,
            envd,
            modules: vec![m1, m2],
        },
        &out,
    )
    .unwrap();

    let mut reader = std::fs::File::open(&out).unwrap();
    let mut entries = Vec::new();
    loop {
        let mut r = cpio::NewcReader::new(reader).unwrap();
        if r.entry().is_trailer() {
            break;
        }
        let e = r.entry();
        let meta = (
            e.name().to_string(),
            e.mode(),
            e.rdev_major(),
            e.rdev_minor(),
        );
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        entries.push((meta, data));
        reader = r.finish().unwrap();
    }
    let find = |name: &str| {
        entries
            .iter()
            .find(|((n, ..), _)| n == name)
            .unwrap_or_else(|| panic!("{name} missing from initramfs"))
    };
    let ((_, mode, ..), data) = find("init");
    assert_eq!(*mode, 0o100755);
    assert_eq!(data, b"INIT");
    assert_eq!(find("firkin-envd").1, b"ENVD");
    let ((_, mode, major, minor), _) = find("dev/console");
    assert_eq!((*mode, *major, *minor), (0o020600, 5, 1));
    assert_eq!(find("lib/firkin/virtio_blk.ko").1, b"M2");
    assert_eq!(
        String::from_utf8(find("lib/firkin/modules.order").1.clone()).unwrap(),
        "/lib/firkin/virtio.ko\n/lib/firkin/virtio_blk.ko\n"
    );
    for d in ["dev", "proc", "sys", "newroot"] {
        assert_eq!(find(d).0.1 & 0o170000, 0o040000, "{d} is not a directory");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn directory_becomes_ext4_with_content_and_owners() {
    require_tool("mkfs.ext4");
    let dir = work_dir("dir");
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("home/user")).unwrap();
    std::fs::write(tree.join("home/user/hello.txt"), "hello from a directory\n").unwrap();
    std::os::unix::fs::chown(tree.join("home/user"), Some(1000), Some(1000)).unwrap();
    let image = dir.join("root.img");
    let mut reports = 0;
    let info = firkin_guest::build_rootfs(
        &RootfsSource::Directory { path: tree.clone() },
        &dir.join("scratch"),
        &image,
        &small(),
        &mut |_| reports += 1,
    )
    .unwrap();
    assert!(reports >= 2, "no progress reported");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), info.image_bytes);
    assert!(info.image_bytes >= 32 << 20);
    assert_eq!(
        debugfs(&image, "cat /home/user/hello.txt"),
        "hello from a directory\n"
    );
    let stat = debugfs(&image, "stat /home/user");
    assert!(stat.contains("User:  1000"), "{stat}");
    // The source directory is read, never modified.
    assert!(!tree.join("etc/resolv.conf").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_source_is_refused_with_its_path() {
    let dir = work_dir("bad");
    let sources = [
        (
            RootfsSource::Directory {
                path: dir.join("nope"),
            },
            "nope",
        ),
        (
            RootfsSource::Oci {
                archive: dir.join("missing.tar"),
            },
            "missing.tar",
        ),
    ];
    for (source, named) in sources {
        let err = build_small(&dir, source, &dir.join("x.img")).unwrap_err();
        assert!(err.to_string().contains(named), "{err}");
        assert!(!dir.join("x.img").exists(), "half-built image left behind");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A layer tar (optionally gzip'd) from (path, Some(content) | None for a directory).
fn layer(entries: &[(&str, Option<&str>)], gzip: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match content {
            Some(c) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(c.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, path, c.as_bytes()).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                h.set_cksum();
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
    }
    let raw = b.into_inner().unwrap();
    if gzip {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap()
    } else {
        raw
    }
}

fn layers() -> (Vec<u8>, Vec<u8>) {
    let l1 = layer(
        &[
            ("a/", None),
            ("a/file1", Some("one")),
            ("a/dir/", None),
            ("a/dir/x", Some("x")),
            ("b/", None),
            ("b/keep", Some("keep")),
            ("b/gone", Some("gone")),
            ("c/", None),
            ("c/old", Some("old")),
            ("etc/", None),
        ],
        false,
    );
    // The opaque marker comes *after* a new file of the same layer on purpose: it must only
    // hide lower layers.
    let l2 = layer(
        &[
            ("a/", None),
            ("a/new", Some("new")),
            ("a/.wh..wh..opq", Some("")),
            ("b/.wh.gone", Some("")),
            (".wh.c", Some("")),
            ("b/keep", Some("keep v2")),
        ],
        true,
    );
    (l1, l2)
}

fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, path, data).unwrap();
}

fn docker_save_archive() -> Vec<u8> {
    let (l1, l2) = layers();
    let mut b = tar::Builder::new(Vec::new());
    append(&mut b, "l1/layer.tar", &l1);
    append(&mut b, "l2/layer.tar", &l2);
    append(
        &mut b,
        "manifest.json",
        br#"[{"Config":"config.json","RepoTags":["t:latest"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
    );
    b.into_inner().unwrap()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn oci_layout_archive(corrupt: bool) -> Vec<u8> {
    let (l1, l2) = layers();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha(config)), "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar",
             "digest": format!("sha256:{}", sha(&l1)), "size": l1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             "digest": format!("sha256:{}", sha(&l2)), "size": l2.len()},
        ]
    })
    .to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", sha(manifest.as_bytes())),
                       "size": manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    })
    .to_string();
    let mut b = tar::Builder::new(Vec::new());
    append(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    append(&mut b, "index.json", index.as_bytes());
    append(
        &mut b,
        &format!("blobs/sha256/{}", sha(manifest.as_bytes())),
        manifest.as_bytes(),
    );
    append(&mut b, &format!("blobs/sha256/{}", sha(config)), config);
    let mut l1_stored = l1.clone();
    if corrupt {
        l1_stored[600] ^= 1;
    }
    append(&mut b, &format!("blobs/sha256/{}", sha(&l1)), &l1_stored);
    append(&mut b, &format!("blobs/sha256/{}", sha(&l2)), &l2);
    b.into_inner().unwrap()
}

fn check_layered_tree(image: &Path) {
    let ls = |p: &str| debugfs(image, &format!("ls -l {p}"));
    assert_eq!(debugfs(image, "cat /a/new"), "new");
    let a = ls("/a");
    assert!(
        !a.contains("file1") && !a.contains(" dir"),
        "opaque dir kept lower content: {a}"
    );
    assert_eq!(debugfs(image, "cat /b/keep"), "keep v2");
    assert!(!ls("/b").contains("gone"), "whiteout ignored");
    assert!(
        !ls("/").contains(" c\n") && !ls("/").contains(" c "),
        "whited-out dir kept"
    );
    // Made bootable for QEMU's user network.
    assert_eq!(
        debugfs(image, "cat /etc/resolv.conf"),
        "nameserver 10.0.2.3\n"
    );
}

#[test]
fn docker_save_archive_layers_and_whiteouts() {
    require_tool("mkfs.ext4");
    let dir = work_dir("docker");
    let archive = dir.join("image.tar");
    std::fs::write(&archive, docker_save_archive()).unwrap();
    let image = dir.join("root.img");
    build_small(&dir, RootfsSource::Oci { archive }, &image).unwrap();
    check_layered_tree(&image);
    assert!(!dir.join("scratch").exists(), "scratch left behind");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn oci_layout_archive_layers_whiteouts_and_digests() {
    require_tool("mkfs.ext4");
    let dir = work_dir("oci");
    let archive = dir.join("image.tar");
    std::fs::write(&archive, oci_layout_archive(false)).unwrap();
    let image = dir.join("root.img");
    let source = RootfsSource::Oci {
        archive: archive.clone(),
    };
    build_small(&dir, source, &image).unwrap();
    check_layered_tree(&image);

    std::fs::write(&archive, oci_layout_archive(true)).unwrap();
    let bad = dir.join("bad.img");
    let err = build_small(&dir, RootfsSource::Oci { archive }, &bad).unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert!(!bad.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn kernel_assets_are_in_the_cache() {
    let kdir = cache_dir().join("kernel");
    let k = firkin_guest::KernelAssets::load(&kdir)
        .unwrap_or_else(|e| panic!("no guest kernel ({e}); run {SETUP}"));
    assert!(k.version.contains("cloud-amd64"), "{}", k.version);
    assert_eq!(k.modules.len(), firkin_guest::VIRTIO_MODULES.len());
    // fetch_kernel reuses the cache instead of downloading again.
    let again = firkin_guest::fetch_kernel(&kdir, &mut |_| {}).unwrap();
    assert_eq!(again, k);
}

#[test]
fn base_template_is_bookworm_with_user_python_and_sudo() {
    require_tool("mmdebstrap");
    require_tool("mkfs.ext4");
    let dir = work_dir("base");
    let image = dir.join("base.img");
    let (mut lines, mut reused) = (0, 0);
    // Through the kept images, as template builds go: `base`'s image is built once per cache
    // (by whichever comes first, this test or a template build) and checked here either way.
    // 2048 MiB: firkin-server's default template disk, so that the key is the builds' one.
    firkin_guest::RootfsCache::new(cache_dir().join("rootfs"))
        .build(
            &firkin_guest::base_template(),
            &dir.join("scratch"),
            &image,
            &ImageOptions::for_disk(2048),
            &mut |p| match p.phase.as_str() {
                "mmdebstrap" => lines += 1,
                "rootfs cache" => reused += 1,
                _ => {}
            },
        )
        .unwrap();
    assert!(
        lines > 0 || reused == 1,
        "neither mmdebstrap's progress nor the reuse was reported"
    );
    let passwd = debugfs(&image, "cat /etc/passwd");
    assert!(
        passwd.contains("user:x:1000:1000::/home/user:/bin/bash"),
        "{passwd}"
    );
    assert!(debugfs(&image, "cat /etc/group").contains("sudo:x:27:user"));
    assert_eq!(
        debugfs(&image, "cat /etc/sudoers.d/user"),
        "user ALL=(ALL:ALL) NOPASSWD: ALL\n"
    );
    assert!(debugfs(&image, "stat /home/user").contains("User:  1000"));
    assert!(debugfs(&image, "cat /usr/lib/os-release").contains("bookworm"));
    // Login shells (every SDK command) must not fork for `id -u` or `mesg`.
    let profile = debugfs(&image, "cat /etc/profile");
    assert!(profile.contains("\"${EUID:-$(id -u)}\""), "{profile}");
    assert!(
        debugfs(&image, "cat /root/.profile").contains("[ -t 0 ] && mesg n"),
        "root's .profile kept its mesg fork"
    );
    for bin in [
        "/usr/bin/python3",
        "/usr/bin/curl",
        "/usr/bin/git",
        "/usr/bin/sudo",
    ] {
        assert!(
            !debugfs(&image, &format!("stat {bin}")).is_empty(),
            "{bin} missing"
        );
    }
    assert!(!dir.join("scratch").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
