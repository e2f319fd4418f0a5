//! `firkin template build|ls|rm` (clients of a running `firkin serve`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use firkin_server::types::{BuildStatusResponse, BuildTemplateRequest};
use http::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::Endpoint;

/// Build, list and delete templates on a running `firkin serve`.
#[derive(Debug, clap::Subcommand)]
pub enum TemplateCommand {
    /// Build (or with --force rebuild) a template and wait for it, with progress.
    ///
    /// Examples:
    ///
    ///   firkin template build base
    ///   firkin template build code-interpreter-v1
    ///   firkin template build python --cpus 2 --memory-mb 1024 --run 'apt-get install -y python3'
    ///   firkin template build base --force --json
    #[command(verbatim_doc_comment)]
    Build {
        /// Template name (lowercase letters, digits, `-`, `_`, `.`). A built-in name (`base`,
        /// `code-interpreter-v1`) without --from-* builds its built-in recipe; --cpus,
        /// --memory-mb and --disk-mb override its budget and --run adds commands after its own.
        name: String,
        /// vCPUs per sandbox.
        #[arg(long)]
        cpus: Option<u32>,
        /// Guest RAM per sandbox, in MiB.
        #[arg(long)]
        memory_mb: Option<u64>,
        /// Disk per sandbox, in MiB.
        #[arg(long)]
        disk_mb: Option<u64>,
        /// Shell command run in the template before it is snapshotted (repeatable, in order).
        #[arg(long = "run", value_name = "CMD")]
        commands: Vec<String>,
        /// Rebuild even if the template exists.
        #[arg(long)]
        force: bool,
        /// Root filesystem from a Debian suite via mmdebstrap (default: E2B's `base`, bookworm
        /// with python3, git, curl, sudo and user `user`).
        #[arg(long, value_name = "SUITE", conflicts_with_all = ["from_oci", "from_dir"])]
        from_debian: Option<String>,
        /// Extra Debian package for --from-debian (repeatable).
        #[arg(long = "package", value_name = "PKG", requires = "from_debian")]
        packages: Vec<String>,
        /// Root filesystem from an image archive (`docker save` tar or OCI layout tar).
        #[arg(long, value_name = "TAR", conflicts_with = "from_dir")]
        from_oci: Option<std::path::PathBuf>,
        /// Root filesystem from a directory (copied, never modified).
        #[arg(long, value_name = "DIR")]
        from_dir: Option<std::path::PathBuf>,
        /// Print the final build status as JSON instead of a progress bar.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List templates.
    ///
    /// Example: firkin template ls --json
    Ls {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a template and its builds (refused while sandboxes use it).
    ///
    /// Example: firkin template rm python
    Rm {
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub async fn run(cmd: TemplateCommand) -> Result<ExitCode> {
    match cmd {
        TemplateCommand::Build {
            name,
            cpus,
            memory_mb,
            disk_mb,
            commands,
            force,
            from_debian,
            packages,
            from_oci,
            from_dir,
            json,
            endpoint,
        } => {
            let from = source(from_debian, packages, from_oci, from_dir)?;
            let api = endpoint.connect()?;
            let req = match (from, firkin_server::recipes::builtin(&name)) {
                (None, Some(mut recipe)) => {
                    recipe.cpu_count = cpus.or(recipe.cpu_count);
                    recipe.memory_mb = memory_mb.or(recipe.memory_mb);
                    recipe.disk_size_mb = disk_mb.or(recipe.disk_size_mb);
                    recipe.commands.extend(commands);
                    recipe.force = force;
                    recipe
                }
                (from, _) => BuildTemplateRequest {
                    template_id: name.clone(),
                    cpu_count: cpus,
                    memory_mb,
                    disk_size_mb: disk_mb,
                    commands,
                    force,
                    from,
                    interpreter: false,
                },
            };
            let started: BuildStatusResponse = api
                .call(Method::POST, "/firkin/v1/templates", Some(&req))
                .await?;
            let bar = (!json).then(|| {
                let b = ProgressBar::new(1000);
                b.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg:30} [{bar:30}] {percent:>3}% {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.enable_steady_tick(Duration::from_millis(120));
                b
            });
            let path = format!("/firkin/v1/templates/{name}/builds/{}", started.build_id);
            let mut offset = 0;
            let last = loop {
                let s: BuildStatusResponse = api
                    .call(
                        Method::GET,
                        &format!("{path}?logsOffset={offset}"),
                        None::<&()>,
                    )
                    .await?;
                if let Some(b) = &bar {
                    for line in &s.logs {
                        b.println(format!("  {line}"));
                    }
                    b.set_message(s.phase.clone());
                    b.set_position((f64::from(s.progress) * 1000.0) as u64);
                }
                offset = s.next_logs_offset;
                if s.status != "building" {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
            };
            if let Some(b) = &bar {
                if last.status == "ready" {
                    b.finish_with_message(format!("template {name} ready"));
                } else {
                    b.abandon_with_message("build failed");
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&last)?);
            } else if last.status == "ready" {
                eprintln!("template {name} ready (build {})", last.build_id);
            }
            if last.status != "ready" {
                bail!(
                    "build {} of {name} failed: {}",
                    last.build_id,
                    last.reason.unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Ls { json, endpoint } => {
            let api = endpoint.connect()?;
            let list: Vec<Value> = api.call(Method::GET, "/templates", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<24} {:<14} {:>4} {:>8} {:>9}  {:<9} UPDATED",
                    "TEMPLATE", "BUILD", "CPUS", "MEM MiB", "DISK MiB", "STATUS"
                );
                for t in &list {
                    println!(
                        "{:<24} {:<14} {:>4} {:>8} {:>9}  {:<9} {}",
                        t["templateID"].as_str().unwrap_or(""),
                        t["buildID"].as_str().unwrap_or(""),
                        t["cpuCount"].as_u64().unwrap_or(0),
                        t["memoryMB"].as_u64().unwrap_or(0),
                        t["diskSizeMB"].as_u64().unwrap_or(0),
                        t["buildStatus"].as_str().unwrap_or(""),
                        t["updatedAt"].as_str().unwrap_or(""),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Rm { name, endpoint } => {
            let api = endpoint.connect()?;
            let _: Value = api
                .call(
                    Method::DELETE,
                    &format!("/firkin/v1/templates/{name}"),
                    None::<&()>,
                )
                .await?;
            eprintln!("template {name} deleted");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `--from-*` flags as a build source; paths are made absolute because the server resolves
/// them, not this shell.
fn source(
    debian: Option<String>,
    packages: Vec<String>,
    oci: Option<std::path::PathBuf>,
    dir: Option<std::path::PathBuf>,
) -> Result<Option<firkin_runtime::qemu::RootfsSource>> {
    use firkin_runtime::qemu::{RootfsSource, UserSpec};
    let absolute = |p: std::path::PathBuf| -> Result<std::path::PathBuf> {
        Ok(if p.is_absolute() {
            p
        } else {
            std::env::current_dir()?.join(p)
        })
    };
    Ok(match (debian, oci, dir) {
        (Some(suite), _, _) => {
            let mut all: Vec<String> = ["ca-certificates", "sudo"].map(String::from).to_vec();
            all.extend(packages);
            Some(RootfsSource::Debian {
                suite,
                packages: all,
                mirror: None,
                user: Some(UserSpec {
                    name: "user".into(),
                    uid: 1000,
                    sudo: true,
                }),
            })
        }
        (None, Some(archive), _) => Some(RootfsSource::Oci {
            archive: absolute(archive)?,
        }),
        (None, None, Some(path)) => Some(RootfsSource::Directory {
            path: absolute(path)?,
        }),
        (None, None, None) => None,
    })
}
