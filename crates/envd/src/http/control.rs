//! `/health`, `/init`, `/envs` and `/metrics`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use firkin_e2b_wire::{EnvdInit, GuestState};

use super::{ApiError, ENVD_VERSION};
use crate::state::{Envd, Mode};

/// Always 204 and never behind the token: the host polls it to learn that the guest is up.
pub(super) async fn health() -> Response {
    (StatusCode::NO_CONTENT, [("x-envd-version", ENVD_VERSION)]).into_response()
}

/// Configures the agent. The token gate in front of it has already checked that a request
/// replacing an existing token carries that token.
pub(super) async fn init(State(envd): State<Arc<Envd>>, body: Bytes) -> Result<Response, ApiError> {
    let req: EnvdInit = if body.iter().all(u8::is_ascii_whitespace) {
        EnvdInit::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid /init body: {e}")))?
    };

    // Validate everything before changing anything, so a bad request changes nothing.
    let timestamp = req
        .timestamp
        .as_deref()
        .map(|t| {
            OffsetDateTime::parse(t, &Rfc3339)
                .map_err(|e| ApiError::bad_request(format!("invalid timestamp '{t}': {e}")))
        })
        .transpose()?;
    let entropy = req
        .entropy
        .as_deref()
        .map(|e| {
            base64::engine::general_purpose::STANDARD
                .decode(e.trim())
                .map_err(|err| ApiError::bad_request(format!("invalid entropy base64: {err}")))
        })
        .transpose()?;
    if let Some(user) = req.default_user.as_deref().filter(|u| !u.is_empty()) {
        envd.accounts
            .by_name(user)
            .map_err(|e| ApiError::bad_request(format!("invalid defaultUser: {e}")))?;
    }
    if let Some(name) = req.hostname.as_deref()
        && (name.is_empty() || name.len() > 64 || name.contains(['/', '\0', ' ']))
    {
        return Err(ApiError::bad_request(format!("invalid hostname '{name}'")));
    }

    let mac = req
        .mac_address
        .as_deref()
        .map(|m| {
            crate::guest::parse_mac(m)
                .map_err(|e| ApiError::bad_request(format!("invalid macAddress: {e}")))
        })
        .transpose()?;

    if req.require_template_processes_only {
        require_template_processes_only(&envd)?;
    }
    if req.mark_template_processes && envd.mode == Mode::Guest {
        let pids = crate::baseline::all_pids(std::path::Path::new("/proc"))
            .map_err(|e| ApiError::internal(format!("listing /proc: {e}")))?;
        tracing::info!(processes = pids.len(), "template processes marked");
        envd.mark_template_processes(pids);
    }

    if let Some(ts) = timestamp {
        apply_timestamp(&envd, ts);
    }
    let seed = entropy.filter(|s| !s.is_empty());
    let setup = seed.is_some() || req.hostname.is_some() || mac.is_some();
    // Taken before the settings change, so that the state published below is released to
    // readers only once this set-up is done.
    let guard = if setup {
        Some(Arc::clone(&envd.machine_setup).write_owned().await)
    } else {
        None
    };

    let hostname = req.hostname.clone();
    envd.update_settings(|s| {
        s.env_vars.extend(req.env_vars);
        if let Some(token) = req.access_token {
            s.access_token = (!token.is_empty()).then_some(token);
        }
        if let Some(user) = req.default_user.filter(|u| !u.is_empty()) {
            s.default_user = user;
        }
        if let Some(dir) = req.default_workdir {
            s.default_workdir = (!dir.is_empty()).then(|| PathBuf::from(dir));
        }
        if let Some(name) = &hostname {
            s.hostname = Some(name.clone());
        }
    });
    let current = || {
        let s = envd.settings();
        GuestState {
            sandbox: s.hostname,
            env_vars: s.env_vars,
        }
    };
    let published = match &envd.sandbox_state {
        Some(publisher) => publisher.publish(current).await.unwrap_or_else(|e| {
            tracing::warn!(file = %publisher.file().display(), error = %e,
                "cannot publish the sandbox state");
            None
        }),
        None => None,
    };

    if let Some(guard) = guard {
        // The first reseed and rename after a restore cost ~40 ms each of guest CPU under TCG
        // (kernel RNG mixing, an ext4 write of /etc/hosts), which a create would wait for. They
        // and the MAC change finish in the background instead, under `machine_setup`, which
        // every process start waits for (and under the published state's lock, which services
        // inside the sandbox wait for).
        let mode = envd.mode;
        envd.run_setup(move || {
            if let Some(seed) = seed {
                feed_entropy(mode, &seed);
            }
            if let Some(name) = hostname {
                rename(mode, &name);
            }
            if let Some(mac) = mac {
                readdress(mode, mac);
            }
            drop(published);
            drop(guard);
        });
    }
    if req.mark_template_processes {
        // The last request of a template build: its snapshot follows.
        envd.forget_host_secret();
    }
    Ok((
        StatusCode::NO_CONTENT,
        [
            ("x-envd-version", ENVD_VERSION),
            ("cache-control", "no-store"),
        ],
    )
        .into_response())
}

/// 409 if a process runs that the template did not have: one envd started and that is still
/// running, or (in a sandbox) any user-space process outside the template's marked set.
fn require_template_processes_only(envd: &Envd) -> Result<(), ApiError> {
    let conflict = |what: String| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("processes started before this /init are running: {what}"),
        )
    };
    let running = envd.processes.running();
    if !running.is_empty() {
        return Err(conflict(format!("{} started through envd", running.len())));
    }
    if envd.mode == Mode::Guest {
        let me = i32::try_from(std::process::id()).unwrap_or(1);
        let mut kernel_threads = envd
            .kernel_threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = crate::baseline::newcomers(
            std::path::Path::new("/proc"),
            &envd.template_processes(),
            me,
            &mut kernel_threads,
        )
        .map_err(|e| ApiError::internal(format!("listing /proc: {e}")))?;
        if !found.is_empty() {
            let names: Vec<String> = found.iter().map(ToString::to_string).collect();
            return Err(conflict(names.join(", ")));
        }
    }
    Ok(())
}

/// Moves the clock forward to `ts` unless a newer timestamp was already applied: `/init` is
/// retried, and a late retry must not turn the clock back.
fn apply_timestamp(envd: &Envd, ts: OffsetDateTime) {
    let newer = envd.update_settings(|s| {
        if s.last_timestamp.is_some_and(|last| ts <= last) {
            false
        } else {
            s.last_timestamp = Some(ts);
            true
        }
    });
    if !newer {
        tracing::debug!(%ts, "ignoring stale /init timestamp");
        return;
    }
    if envd.mode != Mode::Guest {
        tracing::debug!(%ts, "host mode: not setting the clock");
        return;
    }
    let nanos = ts.unix_timestamp_nanos();
    let spec = nix::sys::time::TimeSpec::new(
        i64::try_from(nanos.div_euclid(1_000_000_000)).unwrap_or(i64::MAX),
        i64::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
    );
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec) {
        Ok(()) => tracing::info!(%ts, "clock set"),
        Err(e) => tracing::warn!(%ts, error = %e, "cannot set clock"),
    }
}

fn feed_entropy(mode: Mode, seed: &[u8]) {
    if mode == Mode::Host && !nix::unistd::geteuid().is_root() {
        tracing::warn!("host mode without root: ignoring /init entropy");
        return;
    }
    match crate::sys::add_entropy(seed) {
        Ok(()) => tracing::info!("kernel RNG reseeded"),
        Err(e) => tracing::warn!(error = %e, "cannot reseed kernel RNG"),
    }
}

fn readdress(mode: Mode, mac: [u8; 6]) {
    if mode != Mode::Guest {
        tracing::info!("host mode: not changing the MAC address");
        return;
    }
    match crate::guest::set_mac(mac) {
        Ok(()) => tracing::debug!(?mac, "MAC address set"),
        Err(e) => tracing::warn!(error = %e, "cannot set the MAC address"),
    }
}

fn rename(mode: Mode, name: &str) {
    if mode != Mode::Guest {
        tracing::info!(hostname = name, "host mode: not changing the hostname");
        return;
    }
    if let Err(e) = crate::guest::set_hostname(name) {
        tracing::warn!(hostname = name, error = %e, "cannot set hostname");
    }
}

/// The sandbox-wide environment, for services inside the sandbox (the code interpreter).
pub(super) async fn envs(State(envd): State<Arc<Envd>>) -> Response {
    axum::Json(envd.settings().env_vars).into_response()
}

#[derive(Debug, Serialize)]
struct Metrics {
    ts: i64,
    cpu_count: usize,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    mem_cache: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    disk_used: u64,
    disk_total: u64,
}

/// CPU counters from the previous `/metrics` call: usage is reported over the interval since.
static CPU_SAMPLE: Mutex<Option<(u64, u64)>> = Mutex::new(None);

fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

fn cpu_used_pct() -> f64 {
    let Some(now) = cpu_times() else { return 0.0 };
    let mut last = match CPU_SAMPLE.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let prev = last.replace(now);
    let (t0, i0) = prev.unwrap_or_default();
    let dt = now.0.saturating_sub(t0);
    let di = now.1.saturating_sub(i0);
    if dt == 0 {
        return 0.0;
    }
    ((dt - di.min(dt)) as f64 / dt as f64 * 10000.0).round() / 100.0
}

fn meminfo() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = get("MemTotal");
    let available = get("MemAvailable");
    let cache = get("Cached") + get("Buffers");
    (total, total.saturating_sub(available), cache)
}

/// CPU, memory and disk usage (snake_case keys, as upstream's envd answers).
pub(super) async fn metrics() -> Response {
    let (mem_total, mem_used, mem_cache) = meminfo();
    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs("/") {
        Ok(s) => {
            let frag = s.fragment_size();
            (
                s.blocks() * frag,
                s.blocks().saturating_sub(s.blocks_free()) * frag,
            )
        }
        Err(_) => (0, 0),
    };
    let m = Metrics {
        ts: OffsetDateTime::now_utc().unix_timestamp(),
        cpu_count: std::thread::available_parallelism().map_or(1, usize::from),
        cpu_used_pct: cpu_used_pct(),
        mem_total,
        mem_used,
        mem_cache,
        mem_total_mib: mem_total / (1024 * 1024),
        mem_used_mib: mem_used / (1024 * 1024),
        disk_used,
        disk_total,
    };
    axum::Json(m).into_response()
}
