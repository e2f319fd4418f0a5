//! Named network namespaces without forking: a namespace is created by a short-lived thread
//! that `unshare`s its network namespace and bind-mounts it at `/run/netns/<name>` (where
//! `ip netns` keeps them too), and work is done "inside" one by a fresh thread that `setns`es
//! into it and then ends, so no pooled thread (tokio's included) is ever left in a foreign
//! namespace. Sockets and child processes keep the namespace of the thread that made them,
//! which is how netlink handles and `nft` runs are aimed at a slot.
//!
//! (rtnetlink's `NetworkNamespace::add` forks the whole process instead; in a multi-threaded
//! server the child of a fork may only call async-signal-safe functions, which it does not.)

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

fn valid(name: &str) -> std::io::Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad namespace name {name:?}"),
        ));
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has entered namespace `name`, and waits for it.
pub fn run_in<T, F>(name: &str, f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    valid(name)?;
    let ns = File::open(path(name))?;
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(f())
        })?
        .join()
        .map_err(|_| std::io::Error::other("thread in namespace panicked"))?
}

/// [`run_in`] without blocking the async caller: the thread reports through a channel.
pub async fn run_in_async<T, F>(name: &str, f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    valid(name)?;
    let ns = File::open(path(name))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            let out = nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .map(|()| f());
            // The receiver only goes away if the caller was cancelled; nothing to report then.
            let _ = tx.send(out);
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("thread in namespace panicked"))?
}

/// Creates namespace `name` (an error if it exists). Its loopback is left down: nothing in a
/// slot listens on it.
pub fn create(name: &str) -> std::io::Result<()> {
    valid(name)?;
    std::fs::create_dir_all(NETNS_DIR)?;
    let target = path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)?;
    let bind = target.clone();
    let mounted = std::thread::Builder::new()
        .name(format!("netns-new-{name}"))
        .spawn(move || -> nix::Result<()> {
            // Only this thread moves; the process keeps its namespace.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &bind,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        })?
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?;
    if let Err(e) = mounted {
        let _ = std::fs::remove_file(&target);
        return Err(e.into());
    }
    Ok(())
}

/// Removes namespace `name`; absent is fine. The kernel frees it (and every interface and
/// nftables table in it) once no process or open file holds it any more.
pub fn delete(name: &str) -> std::io::Result<()> {
    valid(name)?;
    let target = path(name);
    match nix::mount::umount2(&target, MntFlags::MNT_DETACH) {
        // EINVAL: the file is there but not a mount point (a create interrupted between the
        // two steps); ENOENT: nothing there.
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a sysctl of the calling thread's network namespace (`/proc/sys/net` is per
/// namespace, resolved by the thread that opens it).
pub fn write_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(path, value)
}

pub fn read_sysctl(key: &str) -> std::io::Result<String> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}
