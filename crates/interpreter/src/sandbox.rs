//! Which sandbox the service serves, as envd publishes it after each `/init`
//! ([`GuestState`]), and what a kernel must run to catch up with a change.
//!
//! A code-interpreter template is snapshotted with this service and a warm kernel running, and
//! every sandbox is a restore of that snapshot: without this, every sandbox's kernel would
//! draw the same "random" numbers (Python's `random` and numpy's global RNG were seeded in the
//! template) and see the template's env vars. So each run first reads the state file; when it
//! names another sandbox than a kernel last saw, that kernel is reseeded (once) and given the
//! sandbox's env vars, in a silent execution (no output, no execution count) before the
//! user's code. The clock and hostname need nothing from the kernel: both are read from the
//! guest kernel each time, and envd has set them before the state's lock is free.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use firkin_e2b_wire::GuestState;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::time::Instant;

use crate::envvars;
use crate::language::Dialect;

/// Between looks at envd's set-up lock (its set-up takes tens of ms under TCG).
const LOCK_POLL: Duration = Duration::from_millis(2);
/// How long a run waits for envd's set-up before going ahead without it: a set-up that hangs
/// must not hang every run.
const SETUP_WAIT: Duration = Duration::from_secs(10);

/// The state file, read at the start of each run, and the state last waited for.
#[derive(Debug)]
pub struct SandboxWatch {
    file: Option<PathBuf>,
    seen: tokio::sync::Mutex<Option<GuestState>>,
}

impl SandboxWatch {
    /// Watches `file` (its lock is next to it, `.lock`, as envd puts it); `None` watches
    /// nothing (a service outside a sandbox).
    pub fn new(file: Option<PathBuf>) -> Self {
        Self {
            file,
            seen: tokio::sync::Mutex::new(None),
        }
    }

    /// The sandbox's state now, once envd's set-up for it is done; `None` if there is no state
    /// file (yet) or it cannot be read. A plain read: the file is small and on a tmpfs, and a
    /// blocking-pool thread would cost more to start after a restore than the read.
    pub async fn current(&self) -> Option<GuestState> {
        let file = self.file.as_deref()?;
        let state = match std::fs::read(file) {
            Ok(bytes) => match serde_json::from_slice::<GuestState>(&bytes) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "unreadable sandbox state");
                    return None;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "reading the sandbox state");
                return None;
            }
        };
        let mut seen = self.seen.lock().await;
        if seen.as_ref() != Some(&state) {
            wait_for_setup(&file.with_extension("lock")).await;
            *seen = Some(state.clone());
        }
        Some(state)
    }
}

/// Waits until envd releases the lock it took before writing the state (it releases it once
/// the guest's RNG is reseeded): a kernel reseeded before that would draw from the snapshot's
/// RNG state, the same in every clone.
async fn wait_for_setup(lock: &Path) {
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        let file = match File::open(lock) {
            Ok(f) => f,
            // No lock, no set-up to wait for (an envd that publishes none).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(lock = %lock.display(), error = %e, "opening the set-up lock");
                return;
            }
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(held) => {
                drop(held);
                return;
            }
            Err((_, Errno::EWOULDBLOCK | Errno::EINTR)) if Instant::now() < deadline => {
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err((_, e)) => {
                tracing::warn!(lock = %lock.display(), error = %e,
                    "envd's set-up did not finish; going ahead");
                return;
            }
        }
    }
}

/// The env vars a kernel started now gets from the sandbox: the valid names only, as
/// [`catch_up`] would set.
pub fn spawn_env(state: &GuestState) -> BTreeMap<String, String> {
    state
        .env_vars
        .iter()
        .filter(|(k, _)| valid_name(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn valid_name(name: &str) -> bool {
    let one = BTreeMap::from([(name.to_owned(), String::new())]);
    let ok = envvars::validate(&one).is_ok();
    if !ok {
        tracing::warn!(
            name,
            "sandbox env var name is not an identifier; not given to kernels"
        );
    }
    ok
}

/// The code that brings a kernel that last saw `applied` up to `now`, or `None` if it is up to
/// date. A kernel sees a new sandbox when the name changes: it is then reseeded. A resume
/// keeps the name, so a seed the user set survives pause and resume.
pub fn catch_up(
    dialect: Dialect,
    applied: Option<&GuestState>,
    now: &GuestState,
) -> Option<String> {
    let before = applied.map(|a| &a.env_vars);
    let set: BTreeMap<&str, &str> = now
        .env_vars
        .iter()
        .filter(|(k, v)| before.and_then(|b| b.get(*k)) != Some(*v) && valid_name(k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let unset: Vec<&str> = before
        .into_iter()
        .flat_map(|b| b.keys())
        .filter(|k| !now.env_vars.contains_key(*k) && valid_name(k))
        .map(String::as_str)
        .collect();
    let reseed = applied.and_then(|a| a.sandbox.as_ref()) != now.sandbox.as_ref();
    if set.is_empty() && unset.is_empty() && !reseed {
        return None;
    }
    Some(snippet(dialect, &set, &unset, reseed))
}

/// A JSON string literal; valid in Python, JavaScript and R too.
fn lit(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn list(names: &[&str]) -> String {
    names.iter().map(|n| lit(n)).collect::<Vec<_>>().join(", ")
}

fn snippet(dialect: Dialect, set: &BTreeMap<&str, &str>, unset: &[&str], reseed: bool) -> String {
    let mut code = String::new();
    match dialect {
        Dialect::Python => {
            code.push_str("import os as __firkin_os\n");
            if !set.is_empty() {
                let pairs: Vec<String> = set
                    .iter()
                    .map(|(k, v)| format!("{}: {}", lit(k), lit(v)))
                    .collect();
                code.push_str(&format!(
                    "__firkin_os.environ.update({{{}}})\n",
                    pairs.join(", ")
                ));
            }
            for name in unset {
                code.push_str(&format!("__firkin_os.environ.pop({}, None)\n", lit(name)));
            }
            if reseed {
                // `seed()` without an argument reads os.urandom, which envd has reseeded. numpy's
                // legacy global RNG (`np.random.random()`) only if numpy is loaded: importing it
                // here would cost a second under TCG in a kernel that never uses it.
                code.push_str(
                    "import random as __firkin_random, sys as __firkin_sys\n\
                     __firkin_random.seed()\n\
                     if \"numpy\" in __firkin_sys.modules:\n    \
                     __firkin_sys.modules[\"numpy\"].random.seed()\n\
                     del __firkin_random, __firkin_sys\n",
                );
            }
            code.push_str("del __firkin_os\n");
        }
        Dialect::Deno => {
            // V8's Math.random cannot be reseeded from script; only the env vars catch up.
            for (k, v) in set {
                code.push_str(&format!("Deno.env.set({}, {});\n", lit(k), lit(v)));
            }
            for name in unset {
                code.push_str(&format!("Deno.env.delete({});\n", lit(name)));
            }
        }
        Dialect::R => {
            if !set.is_empty() {
                let pairs: Vec<String> = set
                    .iter()
                    .map(|(k, v)| format!("{}={}", lit(k), lit(v)))
                    .collect();
                code.push_str(&format!("Sys.setenv({})\n", pairs.join(", ")));
            }
            if !unset.is_empty() {
                code.push_str(&format!("Sys.unsetenv(c({}))\n", list(unset)));
            }
            if reseed {
                // Re-initialises as if no seed had been set (from the time and pid).
                code.push_str("set.seed(NULL)\n");
            }
        }
        Dialect::Bash => {
            // The names are identifiers (`valid_name`), so they need no quoting.
            for (k, v) in set {
                code.push_str(&format!("export {k}={}\n", sh(v)));
            }
            for name in unset {
                code.push_str(&format!("unset {name}\n"));
            }
            if reseed {
                // SRANDOM (bash 5.1+) reads getrandom(2).
                code.push_str("RANDOM=$SRANDOM\n");
            }
        }
    }
    code
}

/// A single-quoted bash word.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
#[path = "sandbox_tests.rs"]
mod tests;
