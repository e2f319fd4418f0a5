//! Publishes the sandbox's [`GuestState`] for services inside it (the code interpreter), and
//! holds its lock while `/init`'s machine set-up runs.
//!
//! Why a file and a lock rather than a request to those services: envd need not know which
//! services a template runs, a service that is busy or not yet started misses nothing, and a
//! service reads the file at the start of each of its requests, so nothing it runs after a
//! create can see the template's state. The file is written before `/init` answers; the lock
//! (taken before the write) is released only once the kernel RNG has been reseeded and the
//! hostname set, so a reader that waits for it never seeds anything from the snapshot's RNG.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use firkin_e2b_wire::GuestState;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Between tries for the lock: it is held by an earlier `/init`'s set-up (tens of ms) or by a
/// reader for an instant.
const LOCK_RETRY: Duration = Duration::from_millis(2);

/// The state file, its lock and what was last written there.
#[derive(Debug)]
pub struct StatePublisher {
    file: PathBuf,
    lock: PathBuf,
    /// The bytes last written: an `/init` that changes nothing (a resume, a warm-pool check)
    /// writes nothing, so readers see no change. Starts as the empty state's: an agent that
    /// was never given a name or env vars has nothing to tell.
    last: Mutex<Option<Vec<u8>>>,
}

/// The exclusive lock, held until dropped.
#[derive(Debug)]
pub struct SetupLock {
    _held: Flock<File>,
}

impl StatePublisher {
    pub fn new(file: PathBuf, lock: PathBuf) -> Self {
        Self {
            file,
            lock,
            last: Mutex::new(serde_json::to_vec(&GuestState::default()).ok()),
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Writes the state `current` reads if it differs from what was last written, with the
    /// lock held; returns the lock (for the caller to release when its set-up is done) if it
    /// wrote. `current` is read again once the lock is held, so that of two concurrent
    /// `/init`s the one writing last writes the settings both made.
    pub async fn publish(&self, current: impl Fn() -> GuestState) -> io::Result<Option<SetupLock>> {
        let encode = |state: &GuestState| serde_json::to_vec(state).map_err(io::Error::other);
        if self.last_written().as_deref() == Some(encode(&current())?.as_slice()) {
            return Ok(None);
        }
        let lock = self.lock_exclusive().await?;
        let bytes = encode(&current())?;
        write_atomically(&self.file, &bytes)?;
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bytes);
        Ok(Some(lock))
    }

    fn last_written(&self) -> Option<Vec<u8>> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Polls rather than blocks: an earlier `/init`'s set-up may hold the lock for tens of ms,
    /// which must not stall a runtime thread.
    async fn lock_exclusive(&self) -> io::Result<SetupLock> {
        if let Some(dir) = self.lock.parent() {
            std::fs::create_dir_all(dir)?;
        }
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&self.lock)?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => return Ok(SetupLock { _held: held }),
                Err((_, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                    tokio::time::sleep(LOCK_RETRY).await;
                }
                Err((_, e)) => return Err(io::Error::from(e)),
            }
        }
    }
}

/// Readers never see a half-written file: a temporary file in the same directory, renamed.
/// Mode 0600: env vars may carry secrets, and the services that read them run as root.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn publisher(dir: &Path) -> StatePublisher {
        StatePublisher::new(dir.join("sandbox.json"), dir.join("sandbox.lock"))
    }

    fn state(name: &str) -> GuestState {
        GuestState {
            sandbox: Some(name.into()),
            env_vars: [("A".to_owned(), "1".to_owned())].into(),
        }
    }

    #[tokio::test]
    async fn writes_only_changes_and_holds_the_lock_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = publisher(dir.path());
        let lock = p.publish(|| state("a")).await.unwrap();
        assert!(lock.is_some());
        let read: GuestState = serde_json::from_slice(&std::fs::read(p.file()).unwrap()).unwrap();
        assert_eq!(read, state("a"));
        // A reader cannot take the lock shared while the set-up holds it.
        let reader = File::open(dir.path().join("sandbox.lock")).unwrap();
        let reader = match Flock::lock(reader, FlockArg::LockSharedNonblock) {
            Ok(_) => panic!("the lock was free while held"),
            Err((f, e)) => {
                assert_eq!(e, Errno::EWOULDBLOCK);
                f
            }
        };
        drop(lock);
        let shared = Flock::lock(reader, FlockArg::LockSharedNonblock).unwrap();
        drop(shared);

        assert!(
            p.publish(|| state("a")).await.unwrap().is_none(),
            "no change"
        );
        let fresh = publisher(&dir.path().join("other"));
        assert!(fresh.publish(GuestState::default).await.unwrap().is_none());
        assert!(!fresh.file().exists(), "an empty state was written");
        assert!(p.publish(|| state("b")).await.unwrap().is_some());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(p.file()).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_second_publish_waits_for_the_first_set_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = std::sync::Arc::new(publisher(dir.path()));
        let first = p.publish(|| state("a")).await.unwrap();
        let p2 = p.clone();
        let second = tokio::spawn(async move { p2.publish(|| state("b")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "took the lock the first set-up holds"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(second.is_some());
    }
}
