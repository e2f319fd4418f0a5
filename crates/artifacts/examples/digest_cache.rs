//! Prints what the verified-digest cache saves: the full SHA-256 of an unchanged file against
//! the cached check of the same file.
//!
//! ```text
//! cargo run --release -p firkin-artifacts --example digest_cache -- [DIR] [SIZE_MIB]
//! ```
//!
//! DIR defaults to `target/`, SIZE_MIB to 1024. The file is deleted afterwards.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use firkin_artifacts::{CacheLookup, DigestCache, hash_file};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "target".into()));
    let mib: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("digest-cache-bench.img");

    // Non-zero, non-repeating-looking content so no layer can shortcut it.
    let mut chunk = vec![0u8; 1 << 20];
    let mut f = File::create(&path)?;
    for i in 0..mib {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(j as u8);
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    drop(f);
    // Let the file age past the cache's racy window, as a sealed template has.
    std::thread::sleep(DigestCache::DEFAULT_RACY_WINDOW + Duration::from_millis(100));

    let t = Instant::now();
    let full = hash_file(&path)?;
    let full_time = t.elapsed();

    let cache = DigestCache::in_memory();
    let (first, lookup) = cache.digest(&path)?;
    assert_eq!(lookup, CacheLookup::Miss);
    assert_eq!(first, full);

    let rounds = 10_000u32;
    let t = Instant::now();
    for _ in 0..rounds {
        let (d, lookup) = cache.digest(&path)?;
        assert_eq!(lookup, CacheLookup::Hit);
        assert_eq!(d.size_bytes, full.size_bytes);
    }
    let cached = t.elapsed() / rounds;
    std::fs::remove_file(&path)?;

    let gib_s = (mib as f64 / 1024.0) / full_time.as_secs_f64();
    println!("file: {mib} MiB at {}", path.display());
    println!(
        "full SHA-256:  {:>12.3} ms  ({gib_s:.2} GiB/s)",
        full_time.as_secs_f64() * 1e3
    );
    println!(
        "cached check:  {:>12.3} µs  (mean of {rounds}, one stat each)",
        cached.as_secs_f64() * 1e6
    );
    println!(
        "speed-up:      {:>12.0}x",
        full_time.as_secs_f64() / cached.as_secs_f64()
    );
    Ok(())
}
