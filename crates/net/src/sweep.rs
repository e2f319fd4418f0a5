//! Leftovers of an earlier run: a server killed without its shutdown leaves its slots behind
//! (namespaces, veths, TAPs). Slot names are derived from the pool's prefix and an index, so
//! the next pool with that prefix finds them by name and removes them before it builds any.

use crate::config::PoolConfig;
use crate::error::{Cause, NetError, Step};

/// Where pools lock their prefix.
const LOCK_DIR: &str = "/run/firkin";

/// Claims `pool`'s prefix for this process (an exclusive `flock` on
/// `/run/firkin/net-<prefix>.lock`, released when the process ends however it ends), so that a
/// second server with the same prefix is refused instead of sweeping the first one's slots.
pub(crate) fn claim_prefix(
    pool: &PoolConfig,
) -> Result<nix::fcntl::Flock<std::fs::File>, NetError> {
    use nix::fcntl::{Flock, FlockArg};
    let who = format!("{}-*", pool.prefix);
    std::fs::create_dir_all(LOCK_DIR).map_err(|e| NetError::new(&who, Step::Config, e))?;
    let path = std::path::Path::new(LOCK_DIR).join(format!("net-{}.lock", pool.prefix));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| NetError::new(&who, Step::Config, e))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        NetError::new(
            &who,
            Step::Config,
            Cause::Other(format!(
                "another process holds {} ({errno}): two servers on one host need different \
                 network prefixes (`firkin serve --net-prefix`)",
                path.display()
            )),
        )
    })
}

/// Indices of the slot namespaces of `pool` that exist now.
fn leftover_indices(pool: &PoolConfig) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(crate::netns::path("")) else {
        return Vec::new();
    };
    let lead = format!("{}-", pool.prefix);
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&lead))
                .and_then(|i| i.parse::<u32>().ok())
        })
        .collect()
}

/// Removes every slot of `pool` left by an earlier run, then checks that nothing else on the
/// host uses the pool's range. Blocking: it runs before the pool exists, on a thread with a
/// runtime of its own, so that no create can race it.
pub(crate) fn sweep(pool: &PoolConfig) -> Result<usize, NetError> {
    let leftovers: Vec<_> = leftover_indices(pool)
        .into_iter()
        .filter_map(|i| pool.slot(i))
        .collect();
    let n = leftovers.len();
    let range = pool.range;
    let who = format!("{}-*", pool.prefix);
    let inner_who = who.clone();
    let done = std::thread::spawn(move || -> Result<(), NetError> {
        let who = inner_who;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::new("sweep", Step::Destroy, e))?;
        rt.block_on(async {
            for config in &leftovers {
                crate::slot::teardown(config).await?;
            }
            range_is_free(&range, &who).await
        })
    })
    .join()
    .map_err(|_| NetError::new(&who, Step::Destroy, Cause::Other("sweep panicked".into())))?;
    done?;
    if n > 0 {
        tracing::info!(slots = n, prefix = %pool.prefix, "removed network slots left by an earlier run");
    }
    Ok(n)
}

/// Refuses a range any address of this (the host's) namespace falls in once our own
/// leftovers are gone: another server or the host uses it, and slots numbered from it would
/// collide with its routes.
async fn range_is_free(range: &crate::config::Ipv4Net, who: &str) -> Result<(), NetError> {
    let root = crate::links::connect(None)
        .await
        .map_err(|e| NetError::new(who, Step::Config, e))?;
    let taken = crate::links::ipv4_addresses(&root)
        .await
        .map_err(|e| NetError::new(who, Step::Config, e))?
        .into_iter()
        .find(|(a, len)| {
            range.contains(*a)
                || crate::config::Ipv4Net::new(*a, *len)
                    .is_some_and(|n| n.contains(range.network()))
        });
    match taken {
        Some((a, len)) => Err(NetError::new(
            who,
            Step::Config,
            Cause::Other(format!(
                "the slot range {range} overlaps {a}/{len}, which this host already uses \
                 (another firkin server? give each its own `--net-range`)"
            )),
        )),
        None => Ok(()),
    }
}
