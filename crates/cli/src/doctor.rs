//! `firkin doctor`: can this host run firkin, and what will it use?

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use firkin_server::{CapacityPolicy, HostResources};
use firkin_types::Size;
use serde::Serialize;

/// Check the host: accelerator, the host programs firkin runs (QEMU, qemu-img, template
/// tools), guest assets, disk, sandbox networking, the listen port, capacity.
///
/// Exits non-zero if a check fails (warnings do not fail).
///
/// Examples:
///
///   firkin doctor
///   firkin doctor --listen 0.0.0.0:8080
///   firkin doctor --json | jq '.[] | select(.status != "ok")'
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct DoctorArgs {
    /// The address `firkin serve` will listen on.
    #[arg(long, env = "FIRKIN_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,

    #[arg(long, env = "FIRKIN_STATE_DIR")]
    state_dir: Option<PathBuf>,

    #[arg(long, env = "FIRKIN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Machine-readable output: a JSON array of {check, status, detail}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    detail: String,
}

fn check(check: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        check,
        status,
        detail: detail.into(),
    }
}

/// Hardware KVM, or TCG and why, decided by the same rule the VMs are started with
/// (`/dev/kvm` may be a software `kvm_pvm` under which a stock guest kernel never boots).
fn accelerator() -> Check {
    let d = firkin_vmm::accel::detect();
    let status = match d.accel {
        firkin_vmm::Accel::Kvm => Status::Ok,
        // TCG works, only slower: a warning, not a failure.
        firkin_vmm::Accel::Tcg => Status::Warn,
    };
    check("accelerator", status, format!("{}: {}", d.accel, d.reason))
}

/// Every host program firkin runs for sandboxes, template builds and per-sandbox networks,
/// from the one list the set-up installs and `firkin serve` checks at start. Without the
/// network tools sandboxes still run (on user-mode networking), so their absence warns.
fn host_tools() -> Vec<Check> {
    use firkin_types::ToolUse;
    firkin_guest::host_tools::check_all(&[
        ToolUse::Sandboxes,
        ToolUse::Templates,
        ToolUse::Networks,
    ])
    .into_iter()
    .map(|(tool, result)| match result {
        Ok(version) => check(tool.binary, Status::Ok, version),
        Err(err) if tool.needed_for == ToolUse::Networks => {
            check(tool.binary, Status::Warn, err.to_string())
        }
        Err(err) => check(tool.binary, Status::Fail, err.to_string()),
    })
    .collect()
}

/// The guest kernel and the static guest binaries, located exactly as `firkin serve` locates
/// them (each template build makes its own initramfs from these).
fn guest_assets(paths: &firkin_runtime::FirkinPaths) -> Vec<Check> {
    use firkin_runtime::qemu::{GuestAssets, GuestAssetsError};
    match GuestAssets::locate(paths) {
        Ok(a) => vec![
            check(
                "guest kernel",
                Status::Ok,
                format!(
                    "{} ({}, {} modules)",
                    a.kernel.version,
                    a.kernel.vmlinuz.display(),
                    a.kernel.modules.len()
                ),
            ),
            check(
                "guest binaries",
                Status::Ok,
                format!("{}, {}", a.init.display(), a.envd.display()),
            ),
            // Only code-interpreter-v1 (and recipes like it) need these: a warning, not a fail.
            match &a.interpreter {
                Ok(b) => check(
                    "code interpreter",
                    Status::Ok,
                    format!(
                        "{}, {}, {}",
                        b.interpreter.display(),
                        b.bash_kernel_wheel.display(),
                        b.deno.display()
                    ),
                ),
                Err(e) => check("code interpreter", Status::Warn, e.to_string()),
            },
        ],
        Err(e @ GuestAssetsError::Kernel { .. }) => vec![
            check("guest kernel", Status::Fail, e.to_string()),
            check(
                "guest binaries",
                Status::Warn,
                "not checked: the kernel is missing".to_owned(),
            ),
        ],
        Err(e @ GuestAssetsError::Binary { .. }) => vec![
            check("guest kernel", Status::Ok, "found".to_owned()),
            check("guest binaries", Status::Fail, e.to_string()),
        ],
    }
}

fn disk(what: &'static str, dir: &Path, floor: Size) -> Check {
    // The directory may not exist yet: measure the filesystem that will hold it.
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    match nix::sys::statvfs::statvfs(&probe) {
        Ok(st) => {
            let free = Size::bytes(st.blocks_available().saturating_mul(st.fragment_size()));
            let gib = |s: Size| s.as_bytes() as f64 / (1u64 << 30) as f64;
            let detail = format!(
                "{:.1} GiB free at {} (floor {:.0} GiB)",
                gib(free),
                dir.display(),
                gib(floor)
            );
            let status = if free >= floor {
                Status::Ok
            } else {
                Status::Fail
            };
            check(what, status, detail)
        }
        Err(e) => check(
            what,
            Status::Fail,
            format!("statvfs({}): {e}", probe.display()),
        ),
    }
}

/// Which network sandboxes get here (what `firkin serve --network auto` picks), and the limits
/// of user-mode networking when that is what they get.
fn network() -> Check {
    match crate::network::tap_unavailable() {
        None => check(
            "network",
            Status::Ok,
            "per-sandbox networks (namespace + TAP + nftables): no sandbox reaches this host or \
             another sandbox, any guest port is reachable, egress policies are enforced",
        ),
        Some(missing) => check(
            "network",
            Status::Warn,
            format!(
                "user-mode networking only (missing: {missing}). Its limits: a sandbox can \
                 reach this host's loopback services (the firkin API and other sandboxes' \
                 forwarded ports included); guest ports are reached through host loopback \
                 forwards (at most 64 per sandbox); egress policies (allow_internet_access, \
                 network.allowOut/denyOut) are refused with 400; file transfer is slower"
            ),
        ),
    }
}

async fn port(listen: SocketAddr) -> Check {
    match std::net::TcpListener::bind(listen) {
        Ok(_) => check("listen port", Status::Ok, format!("{listen} is free")),
        Err(e) => {
            // Maybe it is firkin itself.
            let url = format!("http://{listen}/health");
            let ours = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
                let uri: http::Uri = url.parse().ok()?;
                let resp = client.get(uri).await.ok()?;
                Some(resp.status().is_success())
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(false);
            if ours {
                check(
                    "listen port",
                    Status::Warn,
                    format!("{listen}: firkin serve is already running there"),
                )
            } else {
                check(
                    "listen port",
                    Status::Fail,
                    format!("{listen} is not available: {e}"),
                )
            }
        }
    }
}

fn capacity(state: &Path) -> Check {
    let mut probe = state.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    match HostResources::probe(&probe) {
        Ok(host) => {
            let c = CapacityPolicy::default().capacity(host);
            let per = firkin_server::DEFAULT_TEMPLATE_BUDGET;
            let fit = [
                c.cpus / per.cpus.max(1),
                u32::try_from(c.memory.as_bytes() / per.memory.as_bytes().max(1))
                    .unwrap_or(u32::MAX),
                u32::try_from(c.disk.as_bytes() / per.disk.as_bytes().max(1)).unwrap_or(u32::MAX),
            ]
            .into_iter()
            .min()
            .unwrap_or(0);
            let status = if fit == 0 { Status::Fail } else { Status::Ok };
            check(
                "capacity",
                status,
                format!(
                    "{} CPUs, {} MiB RAM → {c} at default overcommit; about {fit} default sandboxes ({per} each)",
                    host.cpus,
                    host.memory.as_mib(),
                ),
            )
        }
        Err(e) => check("capacity", Status::Fail, e.to_string()),
    }
}

pub async fn run(args: DoctorArgs) -> Result<ExitCode> {
    let paths = crate::serve::resolve_paths(args.state_dir.clone(), args.cache_dir.clone())?;
    let floor = firkin_runtime::DEFAULT_RESTORE_DISK_FLOOR;
    let mut checks = vec![accelerator()];
    checks.extend(host_tools());
    checks.extend(guest_assets(&paths));
    checks.push(disk("disk (state)", paths.state_dir(), floor));
    checks.push(disk("disk (cache)", paths.cache_dir(), floor));
    checks.push(network());
    checks.push(port(args.listen).await);
    checks.push(capacity(paths.state_dir()));
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("{mark}  {:<16} {}", c.check, c.detail);
        }
        if failed {
            println!("\nSome checks failed; firkin serve will not work until they pass.");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
