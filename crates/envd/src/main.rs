//! `firkin-envd`: the in-sandbox agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use firkin_envd::state::{Envd, Mode};
use firkin_envd::users::AccountDb;
use tokio::signal::unix::{SignalKind, signal};

/// The firkin sandbox agent, wire-compatible with E2B's envd.
///
/// Serves the Connect RPC `process.Process` and `filesystem.Filesystem` services and the plain
/// HTTP endpoints (/files, /health, /init, /envs, /metrics) that the E2B SDKs use.
///
/// Host mode (the default) serves the machine it runs on, for tests and development. Guest mode
/// (--guest) runs as PID 1 of a sandbox VM: it mounts /proc, /sys, /dev and friends, sets the
/// hostname, reaps orphans and powers the VM off on SIGTERM, SIGINT or SIGPWR.
#[derive(Debug, Parser)]
#[command(name = "firkin-envd", version, about, long_about)]
struct Cli {
    /// Run as the agent of a sandbox VM (PID 1 after switch_root).
    #[arg(long)]
    guest: bool,

    /// Address to listen on. Port 0 picks a free port; the bound address is printed on
    /// stdout as `listening on http://ADDR`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Default user for requests that name none [default: host mode: the user running envd;
    /// guest mode: `user` if it exists, else root].
    #[arg(long, value_name = "NAME")]
    user: Option<String>,

    /// Default working directory [default: the default user's home].
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,

    /// A file holding the host's secret for this VM: until `/init` sets an access token, every
    /// request but /health must carry it in X-Access-Token [default: guest mode: the secret
    /// QEMU's fw_cfg gives the VM; host mode: none, and requests need no token until /init].
    #[arg(long, value_name = "FILE")]
    host_secret_file: Option<PathBuf>,

    /// Where to publish the sandbox's name and env vars after each `/init` that changes them,
    /// for services inside the sandbox (the code interpreter); its lock goes next to it, as
    /// `.lock` [default: guest mode: /run/firkin/sandbox.json; host mode: nowhere].
    #[arg(long, value_name = "FILE", env = "FIRKIN_SANDBOX_STATE")]
    sandbox_state: Option<PathBuf>,

    /// Log filter (tracing-subscriber syntax), e.g. `info` or `firkin_envd=debug`.
    #[arg(long, env = "FIRKIN_ENVD_LOG", default_value = "info")]
    log: String,
}

/// envd's port inside the sandbox, fixed by the E2B SDKs.
const GUEST_PORT: u16 = 49983;

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Escape codes only for a person at a terminal: not in a pipe, and never in guest mode,
        // where stderr is the serial console (a tty) that QEMU writes to the host's console.log.
        .with_ansi(!cli.guest && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mode = if cli.guest { Mode::Guest } else { Mode::Host };
    if mode == Mode::Guest {
        install_pid1_panic_hook();
        firkin_envd::guest::prepare();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run(cli, mode));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "envd failed");
        if mode == Mode::Guest && std::process::id() == 1 {
            // PID 1 exiting panics the kernel; power off cleanly instead so the host sees
            // an orderly VM exit.
            let reaper = firkin_envd::reaper::Reaper::default();
            let err = runtime.block_on(firkin_envd::guest::power_off(&reaper));
            tracing::error!(error = %err, "power off failed");
        }
    }
    result
}

/// With `panic = "abort"` (the `guest` profile) any panic ends the process, and PID 1 ending
/// panics the kernel. Power the VM off cleanly instead, so the host sees an orderly exit and the
/// disk is synced. (Unwinding builds let tokio contain a panicking task, so no hook there.)
fn install_pid1_panic_hook() {
    #[cfg(panic = "abort")]
    {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            if std::process::id() == 1 {
                nix::unistd::sync();
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            }
        }));
    }
}

async fn run(cli: Cli, mode: Mode) -> Result<()> {
    let reaper = firkin_envd::reaper::Reaper::start().context("installing SIGCHLD handler")?;
    let accounts = AccountDb::default();
    let user = match (&cli.user, mode) {
        (Some(name), _) => accounts
            .by_name(name)
            .with_context(|| format!("default user '{name}'"))?,
        (None, Mode::Guest) => accounts
            .by_name("user")
            .or_else(|_| accounts.by_uid(0))
            .context("no 'user' and no root in /etc/passwd")?,
        (None, Mode::Host) => {
            let uid = nix::unistd::geteuid().as_raw();
            accounts
                .by_uid(uid)
                .with_context(|| format!("uid {uid} has no /etc/passwd entry; pass --user"))?
        }
    };
    let listen = cli.listen.unwrap_or_else(|| match mode {
        Mode::Guest => SocketAddr::from(([0, 0, 0, 0], GUEST_PORT)),
        Mode::Host => SocketAddr::from(([127, 0, 0, 1], GUEST_PORT)),
    });
    let envd = Arc::new(
        Envd::new(
            mode,
            accounts,
            user.name.clone(),
            cli.workdir.clone(),
            reaper.clone(),
        )
        .with_host_secret(cli.host_secret_file.clone().or_else(|| {
            (mode == Mode::Guest).then(|| PathBuf::from(firkin_envd::guest::HOST_SECRET_FILE))
        }))
        .with_sandbox_state(cli.sandbox_state.clone().or_else(|| {
            (mode == Mode::Guest).then(|| PathBuf::from(firkin_e2b_wire::SANDBOX_STATE_FILE))
        })),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%bound, ?mode, default_user = %user.name, "envd {} ready", firkin_envd::http::ENVD_VERSION);
    println!("listening on http://{bound}");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut pwr = signal(SignalKind::from_raw(libc::SIGPWR))?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
            _ = pwr.recv() => tracing::info!("SIGPWR"),
        }
    };
    let app = firkin_envd::http::router(envd.clone());
    firkin_envd::server::serve(listener, app, shutdown).await?;

    envd.processes.kill_all();
    if mode == Mode::Guest {
        let err = firkin_envd::guest::power_off(&reaper).await;
        // Not PID 1 (started under another init) or not allowed: just exit.
        tracing::warn!(error = %err, "not powering off");
    }
    Ok(())
}
