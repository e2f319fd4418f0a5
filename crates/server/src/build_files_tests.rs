#![allow(clippy::unwrap_used)]

use std::io::Write as _;

use super::*;

const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A tar of `(path, contents)`; raw names, so that unsafe ones can be written.
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        h.set_entry_type(tar::EntryType::Regular);
        // `set_path` refuses `..`; an attacker's tar is not made with it.
        let name = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn store() -> (tempfile::TempDir, BuildFiles) {
    let dir = tempfile::tempdir().unwrap();
    let files = BuildFiles::new(dir.path().join("files"));
    (dir, files)
}

fn names(files: &BuildFiles, hash: &str) -> Vec<(String, u32)> {
    let mut a = tar::Archive::new(std::fs::File::open(files.path(hash).unwrap()).unwrap());
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.header().mode().unwrap(),
            )
        })
        .collect()
}

fn leftovers(files: &BuildFiles) -> Vec<String> {
    std::fs::read_dir(&files.dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn gzip_and_plain_uploads_are_kept_as_plain_tars_with_their_modes() {
    let (_d, files) = store();
    let tar = tar_of(&[("app/main.py", b"print(1)\n"), ("./app/README", b"hi")]);
    assert!(!files.contains(HASH).unwrap());
    files
        .receive(HASH, axum::body::Body::from(gzip(&tar)))
        .await
        .unwrap();
    assert!(files.contains(HASH).unwrap());
    assert_eq!(
        names(&files, HASH),
        [("app/main.py".into(), 0o640), ("app/README".into(), 0o640)]
    );
    let other = "f".repeat(64);
    files
        .receive(&other, axum::body::Body::from(tar))
        .await
        .unwrap();
    assert_eq!(names(&files, &other).len(), 2);
    let mut left = leftovers(&files);
    left.sort();
    assert_eq!(left, [format!("{HASH}.tar"), format!("{other}.tar")]);
}

#[tokio::test]
async fn escaping_paths_are_refused_and_leave_nothing() {
    for bad in ["../etc/passwd", "/etc/passwd", "a/../../b"] {
        let (_d, files) = store();
        let err = files
            .receive(
                HASH,
                axum::body::Body::from(tar_of(&[("ok", b"1"), (bad, b"x")])),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, BuildFilesError::UnsafePath { .. }),
            "{bad}: {err}"
        );
        assert!(err.is_client_error());
        assert!(!files.contains(HASH).unwrap(), "{bad}");
        assert!(
            leftovers(&files).is_empty(),
            "{bad}: {:?}",
            leftovers(&files)
        );
    }
    // Climbing back inside is fine.
    let (_d, files) = store();
    files
        .receive(HASH, axum::body::Body::from(tar_of(&[("a/../b", b"x")])))
        .await
        .unwrap();
}

#[tokio::test]
async fn links_out_of_the_context_are_refused() {
    let (_d, files) = store();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "dir/link", "../../outside").unwrap();
    let err = files
        .receive(HASH, axum::body::Body::from(b.into_inner().unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, BuildFilesError::UnsafePath { .. }), "{err}");

    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "dir/link", "../sibling").unwrap();
    b.append_link(&mut h, "abs", "/usr/bin/python3").unwrap();
    files
        .receive(HASH, axum::body::Body::from(b.into_inner().unwrap()))
        .await
        .unwrap();
}

#[tokio::test]
async fn oversized_uploads_and_gzip_bombs_are_refused() {
    let (_d, files) = store();
    let files = files.with_limits(1024, 1 << 20);
    let big = tar_of(&[("big", &[7u8; 4096])]);
    let err = files
        .receive(HASH, axum::body::Body::from(big))
        .await
        .unwrap_err();
    assert!(matches!(err, BuildFilesError::TooLarge { .. }), "{err}");

    // 4 MiB of zeros gzip to a few KiB: under the upload limit, over the expansion one.
    let files = files.with_limits(1 << 20, 1 << 20);
    let bomb = gzip(&tar_of(&[("zeros", &vec![0u8; 4 << 20])]));
    assert!(bomb.len() < 1 << 20);
    let err = files
        .receive(HASH, axum::body::Body::from(bomb))
        .await
        .unwrap_err();
    assert!(matches!(err, BuildFilesError::TooLarge { .. }), "{err}");
    assert!(leftovers(&files).is_empty(), "{:?}", leftovers(&files));
}

#[tokio::test]
async fn garbage_and_bad_hashes_are_client_errors() {
    let (_d, files) = store();
    let err = files
        .receive(HASH, axum::body::Body::from(vec![1u8; 1000]))
        .await
        .unwrap_err();
    assert!(matches!(err, BuildFilesError::NotATar { .. }), "{err}");
    for bad in ["", "ABC", "../x", &"g".repeat(64), &"A".repeat(64)] {
        assert!(matches!(
            files.contains(bad),
            Err(BuildFilesError::BadHash(_))
        ));
    }
}
