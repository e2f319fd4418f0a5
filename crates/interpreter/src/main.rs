//! `firkin-interpreter`: the code interpreter service a code-interpreter sandbox runs on port
//! 49999.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Parser;
use firkin_interpreter::language::{KernelSpec, default_kernels};
use firkin_interpreter::{KernelOptions, ServiceConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// E2B-compatible code interpreter: `/execute` and `/contexts` in front of Jupyter kernels.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        default_value = "0.0.0.0:49999",
        env = "FIRKIN_INTERPRETER_LISTEN"
    )]
    listen: SocketAddr,
    /// Working directory of contexts created without one.
    #[arg(long, default_value = "/home/user")]
    cwd: PathBuf,
    /// Directory for the kernels' connection files.
    #[arg(long, default_value = "/tmp/firkin-interpreter")]
    runtime_dir: PathBuf,
    /// Run kernels as this uid (with --gid); default: the service's own.
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    /// Run kernels as this gid (with --uid).
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    /// HOME for the kernels; default: the service's.
    #[arg(long)]
    home: Option<PathBuf>,
    /// USER and LOGNAME for the kernels (the name of --uid); default: the service's.
    #[arg(long)]
    user: Option<String>,
    /// Replace a language's kernel command: `LANG=ARGV`, ARGV split on whitespace, with
    /// `{connection_file}` standing for the connection file. Repeatable.
    #[arg(long = "kernel", value_name = "LANG=ARGV")]
    kernels: Vec<String>,
    /// Languages whose default context (and kernel) is started at once; others start on
    /// first use.
    #[arg(long, value_delimiter = ',', default_value = "python,javascript")]
    default_languages: Vec<String>,
    /// envd's sandbox state file: read before each run, so that kernels running since a
    /// template's snapshot are reseeded and get the sandbox's env vars in each clone. `none`
    /// outside a sandbox.
    #[arg(long, value_name = "FILE", default_value = firkin_e2b_wire::SANDBOX_STATE_FILE)]
    sandbox_state: PathBuf,
}

fn kernels(overrides: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, KernelSpec>> {
    let mut kernels = default_kernels();
    for o in overrides {
        let Some((lang, argv)) = o.split_once('=') else {
            bail!("--kernel {o:?}: expected LANG=ARGV");
        };
        let argv: Vec<String> = argv.split_whitespace().map(str::to_owned).collect();
        if argv.is_empty() {
            bail!("--kernel {o:?}: empty command");
        }
        let lang = firkin_interpreter::language::canonical(lang);
        match kernels.get_mut(&lang) {
            Some(spec) => spec.argv = argv,
            None => bail!("--kernel {o:?}: unknown language {lang:?}"),
        }
    }
    Ok(kernels)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    // `--default-languages ''` means none.
    args.default_languages.retain(|l| !l.trim().is_empty());
    let config = ServiceConfig {
        kernels: kernels(&args.kernels)?,
        default_cwd: args.cwd,
        kernel: KernelOptions {
            runtime_dir: args.runtime_dir,
            run_as: args.uid.zip(args.gid),
            home: args.home,
            user: args.user,
        },
        sandbox_state: (args.sandbox_state != Path::new("none")).then_some(args.sandbox_state),
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // On stdout, so that whoever started us with port 0 learns the port.
    println!("listening on {addr}");
    tracing::info!(%addr, "code interpreter listening");
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    firkin_interpreter::serve(listener, config, &args.default_languages, shutdown)
        .await
        .context("serving HTTP")
}
