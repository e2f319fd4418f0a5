//! `firkin-guest`: makes guest assets from the command line (used by `scripts/setup-guest.sh`
//! and handy when debugging a template; the `firkin` CLI wraps the same library calls).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use firkin_guest::{ImageOptions, InitramfsSpec, KernelAssets, Progress, RootfsSource};
use firkin_types::{HOST_TOOLS, ToolUse};

#[derive(Parser)]
#[command(about = "Fetch the guest kernel and build initramfs and root filesystem images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download Debian's linux-image-cloud-amd64 into DIR (reuses a previous download).
    Kernel {
        /// Kernel directory, normally $FIRKIN_CACHE_DIR/kernel.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write an initramfs holding firkin-init, firkin-envd and the kernel's virtio modules.
    Initramfs {
        /// Kernel directory written by `kernel`.
        #[arg(long)]
        kernel_dir: PathBuf,
        /// Static firkin-init binary.
        #[arg(long)]
        init: PathBuf,
        /// Static firkin-envd binary.
        #[arg(long)]
        envd: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Build an ext4 root filesystem image.
    Rootfs {
        /// `base` (the default Debian template), `dir:PATH` or `oci:ARCHIVE`.
        #[arg(long, default_value = "base")]
        source: String,
        /// Scratch directory (removed afterwards); must not be under TMPDIR-cleaned space.
        #[arg(long)]
        scratch: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Free space on top of the content, MiB.
        #[arg(long, default_value_t = 1024)]
        headroom_mib: u64,
    },
    /// The host programs firkin runs (one list, shared with `firkin doctor` and `firkin serve`).
    #[command(subcommand)]
    HostTools(HostToolsCmd),
}

#[derive(Subcommand)]
enum HostToolsCmd {
    /// Print the Debian packages that provide the tools, one per line (for apt-get).
    Packages {
        /// Which uses to include.
        #[arg(long = "for", value_enum, value_delimiter = ',', default_values_t = ALL_USES)]
        uses: Vec<Use>,
    },
    /// Run every tool with its version arguments; exit 1 naming each one missing or broken.
    Check {
        /// Which uses to include.
        #[arg(long = "for", value_enum, value_delimiter = ',', default_values_t = ALL_USES)]
        uses: Vec<Use>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Use {
    Sandboxes,
    Templates,
    Networks,
    Tests,
}

const ALL_USES: [Use; 4] = [Use::Sandboxes, Use::Templates, Use::Networks, Use::Tests];

impl From<Use> for ToolUse {
    fn from(u: Use) -> Self {
        match u {
            Use::Sandboxes => ToolUse::Sandboxes,
            Use::Templates => ToolUse::Templates,
            Use::Networks => ToolUse::Networks,
            Use::Tests => ToolUse::Tests,
        }
    }
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(ToolUse::from(*self).as_str())
    }
}

fn host_tools(cmd: HostToolsCmd) -> Result<ExitCode> {
    match cmd {
        HostToolsCmd::Packages { uses } => {
            let uses: Vec<ToolUse> = uses.into_iter().map(ToolUse::from).collect();
            let mut packages: Vec<&str> = HOST_TOOLS
                .iter()
                .filter(|t| uses.contains(&t.needed_for))
                .map(|t| t.package)
                .collect();
            packages.dedup();
            for p in packages {
                println!("{p}");
            }
            Ok(ExitCode::SUCCESS)
        }
        HostToolsCmd::Check { uses } => {
            let uses: Vec<ToolUse> = uses.into_iter().map(ToolUse::from).collect();
            let mut failed = false;
            for (tool, result) in firkin_guest::host_tools::check_all(&uses) {
                match result {
                    Ok(version) => println!("ok    {:<20} {version}", tool.binary),
                    Err(err) => {
                        failed = true;
                        println!("FAIL  {:<20} {err}", tool.binary);
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn print_progress(p: &Progress) {
    match p.total {
        Some(t) => eprintln!("[{}] {}/{} {}", p.phase, p.done, t, p.message),
        None => eprintln!("[{}] {}", p.phase, p.message),
    }
}

fn main() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        // Escape codes only for a person at a terminal, not in a serial console or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().cmd {
        Cmd::HostTools(cmd) => return host_tools(cmd),
        Cmd::Kernel { dir } => {
            let k = firkin_guest::fetch_kernel(&dir, &mut print_progress)?;
            println!("{}", k.vmlinuz.display());
        }
        Cmd::Initramfs {
            kernel_dir,
            init,
            envd,
            out,
        } => {
            let k = KernelAssets::load(&kernel_dir).with_context(|| {
                format!(
                    "no kernel in {}; run `firkin-guest kernel` first",
                    kernel_dir.display()
                )
            })?;
            firkin_guest::write_initramfs(
                &InitramfsSpec {
                    init,
                    envd,
                    modules: k.modules,
                },
                &out,
            )?;
            println!("{}", out.display());
        }
        Cmd::Rootfs {
            source,
            scratch,
            out,
            headroom_mib,
        } => {
            let src = if source == "base" {
                firkin_guest::base_template()
            } else if let Some(p) = source.strip_prefix("dir:") {
                RootfsSource::Directory { path: p.into() }
            } else if let Some(p) = source.strip_prefix("oci:") {
                RootfsSource::Oci { archive: p.into() }
            } else {
                anyhow::bail!("unknown source {source:?}: use base, dir:PATH or oci:ARCHIVE");
            };
            let opts = ImageOptions {
                headroom_mib,
                ..ImageOptions::default()
            };
            let info =
                firkin_guest::build_rootfs(&src, &scratch, &out, &opts, &mut print_progress)?;
            println!("{} ({} MiB)", info.image.display(), info.image_bytes >> 20);
        }
    }
    Ok(ExitCode::SUCCESS)
}
