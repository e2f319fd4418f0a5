use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use firkin_admission::ResourceBudget;
use firkin_artifacts::DigestCache;
use firkin_envd::client::Client as EnvdClient;
use firkin_guest::{ImageOptions, InitramfsSpec, Progress, RootfsSource};
use firkin_types::{Size, TemplateId};
use firkin_vmm::{AccelDecision, BootRequest, MachineConfig, Vm};
use tokio::sync::mpsc;

use crate::disk::{HostDiskProbe, check_disk_floor};
use crate::service::{TemplateSealError, TemplateSnapshot};
use crate::{DEFAULT_RESTORE_DISK_FLOOR, samples::BenchmarkSample};

use super::assets::GuestAssets;
use super::component;
use super::net::SlotLease;
use super::ready::{GUEST_PORTS, envd_addr, envd_ready};

/// What to build.
#[derive(Clone, Debug)]
pub struct TemplateBuild {
    pub template_id: TemplateId,
    pub build_id: String,
    /// An empty directory that receives the sealed snapshot.
    pub dir: PathBuf,
    pub source: RootfsSource,
    /// Shell commands run as root in the booted template, in order, before the snapshot.
    pub commands: Vec<String>,
    /// Upload the code interpreter's bundle (the service, bash_kernel's wheel, Deno) into
    /// [`INTERPRETER_UPLOAD_DIR`] in the booted template before the commands run (they install
    /// and start it).
    pub interpreter: bool,
    /// vCPUs, guest RAM and disk size of every sandbox of this template.
    pub budget: ResourceBudget,
    pub accel: AccelDecision,
    /// Network slots: the template is booted (and so snapshotted) on a TAP in one, as every
    /// sandbox of a server with slots runs. `None`: user-mode networking. A snapshot restores
    /// only onto the kind of network it was taken with.
    pub slots: Option<firkin_net::SlotPool>,
    /// Where finished root filesystem images are kept by source ([`firkin_guest::RootfsCache`]):
    /// a build from a source built before copies its image. `None`: always built.
    pub rootfs_cache: Option<PathBuf>,
}

/// Progress of a build, for progress bars and build logs.
#[derive(Clone, Debug, PartialEq)]
pub enum BuildEvent {
    /// A new phase started; `fraction` is the share of the whole build done so far.
    Phase { name: String, fraction: f32 },
    /// A line of output (tool output, prepare-command output).
    Log(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateBuildError {
    #[error("not enough free disk to build a template: {0}")]
    Disk(String),
    #[error("building the root filesystem failed: {0}")]
    Rootfs(#[source] firkin_guest::GuestError),
    #[error("writing the initramfs failed: {0}")]
    Initramfs(#[source] firkin_guest::GuestError),
    #[error("the template VM failed: {0}")]
    Vm(Box<firkin_vmm::VmmError>),
    #[error("prepare command {index} ({command:?}) failed: {reason}")]
    Prepare {
        index: usize,
        command: String,
        reason: String,
    },
    #[error(transparent)]
    MissingInterpreter(#[from] super::assets::MissingInterpreterBundle),
    #[error("uploading {what} into the template failed: {reason}")]
    Upload { what: String, reason: String },
    #[error("marking the template's processes failed: {0}")]
    Mark(String),
    #[error("preparing the template's network slot failed: {0}")]
    Net(#[source] Box<firkin_net::NetError>),
    #[error("a build task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("describing the template's machine failed: {0}")]
    Machine(#[source] serde_json::Error),
    #[error("sealing the template snapshot failed: {0}")]
    Seal(#[from] TemplateSealError),
    #[error("template build i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<firkin_vmm::VmmError> for TemplateBuildError {
    fn from(e: firkin_vmm::VmmError) -> Self {
        TemplateBuildError::Vm(Box::new(e))
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Builds, boots, prepares, snapshots and seals a template. On failure nothing sealed is left
/// in `build.dir` (a partial directory is removed), so a failed build can never be restored.
pub async fn build_template(
    assets: &GuestAssets,
    build: &TemplateBuild,
    cache: Arc<DigestCache>,
    events: mpsc::UnboundedSender<BuildEvent>,
) -> Result<(TemplateSnapshot, Vec<BenchmarkSample>), TemplateBuildError> {
    let result = build_inner(assets, build, cache, &events).await;
    if result.is_err() {
        let _ = firkin_guest::remove_tree(&build.dir);
    }
    result
}

fn phase(events: &mpsc::UnboundedSender<BuildEvent>, name: &str, fraction: f32) {
    tracing::info!(phase = name, "template build");
    let _ = events.send(BuildEvent::Phase {
        name: name.to_owned(),
        fraction,
    });
}

async fn build_inner(
    assets: &GuestAssets,
    build: &TemplateBuild,
    cache: Arc<DigestCache>,
    events: &mpsc::UnboundedSender<BuildEvent>,
) -> Result<(TemplateSnapshot, Vec<BenchmarkSample>), TemplateBuildError> {
    let started = Instant::now();
    let dir = &build.dir;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TemplateBuildError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Before minutes of root filesystem work, not after.
    let uploads = if build.interpreter {
        assets
            .interpreter()?
            .uploads()
            .into_iter()
            .map(|(path, guest)| (path.to_path_buf(), guest))
            .collect()
    } else {
        Vec::new()
    };
    for (path, _) in &uploads {
        tokio::fs::metadata(path).await.map_err(io(path))?;
    }
    check_disk_floor(&mut HostDiskProbe, dir, DEFAULT_RESTORE_DISK_FLOOR)
        .map_err(|e| TemplateBuildError::Disk(e.to_string()))?;

    // 1. Root filesystem (blocking: mmdebstrap, tar, mkfs.ext4).
    phase(events, "root filesystem", 0.0);
    let disk = dir.join(firkin_vmm::TEMPLATE_DISK_FILE);
    let opts = image_options(build.budget.disk);
    {
        let (source, scratch, out, ev, kept) = (
            build.source.clone(),
            dir.join("scratch"),
            disk.clone(),
            events.clone(),
            build.rootfs_cache.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut last = Instant::now() - Duration::from_secs(1);
            let mut report = |p: &Progress| {
                // Tools can print thousands of lines; a line every 200 ms is plenty for humans.
                if last.elapsed() >= Duration::from_millis(200) && !p.message.is_empty() {
                    last = Instant::now();
                    let _ = ev.send(BuildEvent::Log(format!("{}: {}", p.phase, p.message)));
                }
            };
            match kept {
                Some(dir) => firkin_guest::RootfsCache::new(dir).build(
                    &source,
                    &scratch,
                    &out,
                    &opts,
                    &mut report,
                ),
                None => firkin_guest::build_rootfs(&source, &scratch, &out, &opts, &mut report),
            }
        })
        .await
        .map_err(TemplateBuildError::Task)?
        .map_err(TemplateBuildError::Rootfs)?;
    }

    // 2. Initramfs with this machine's kernel modules and guest binaries.
    phase(events, "initramfs", 0.45);
    let initramfs = dir.join("initramfs.cpio");
    firkin_guest::write_initramfs(
        &InitramfsSpec {
            init: assets.init.clone(),
            envd: assets.envd.clone(),
            modules: assets.kernel.modules.clone(),
        },
        &initramfs,
    )
    .map_err(TemplateBuildError::Initramfs)?;

    // 3. Cold boot.
    phase(events, "booting the template", 0.5);
    let mut machine = MachineConfig::new(
        build.accel.accel,
        assets.kernel.vmlinuz.clone(),
        initramfs.clone(),
    );
    machine.vcpus = build.budget.cpus.max(1);
    machine.memory_mib = u32::try_from(build.budget.memory.as_mib())
        .unwrap_or(u32::MAX)
        .max(128);
    let boot_started = Instant::now();
    let slot = match &build.slots {
        Some(pool) => {
            machine.net = firkin_vmm::NetKind::Tap;
            Some(
                SlotLease::take(pool)
                    .await
                    .map_err(|e| TemplateBuildError::Net(Box::new(e)))?,
            )
        }
        None => None,
    };
    let vm = Vm::cold_boot(BootRequest {
        machine,
        run_dir: dir.join("run"),
        ram_path: dir.join(firkin_vmm::RAM_FILE),
        disk: disk.clone(),
        guest_ports: GUEST_PORTS.to_vec(),
        net: super::net::attach(slot.as_ref()),
        ready: Some(envd_ready(BOOT_TIMEOUT)),
    })
    .await?;
    let boot_time = boot_started.elapsed();
    let _ = events.send(BuildEvent::Log(format!(
        "envd answered {:.1} s after QEMU started",
        boot_time.as_secs_f64()
    )));

    // 4. Prepare commands, as root, through envd.
    let envd = envd_addr(&vm).map_err(TemplateBuildError::Vm)?;
    let mut client =
        EnvdClient::new(&format!("http://{envd}")).map_err(|e| TemplateBuildError::Prepare {
            index: 0,
            command: String::new(),
            reason: e.to_string(),
        })?;
    // The template's agent answers only to this VM's secret, so only this builder can drive it.
    if let Some(secret) = vm.guest_secret() {
        client = client.with_token(secret.to_owned());
    }
    if !uploads.is_empty() {
        phase(events, "uploading the code interpreter", 0.52);
    }
    for (path, guest) in uploads {
        // Read one at a time: Deno alone is ~100 MB.
        let bytes = tokio::fs::read(&path).await.map_err(io(&path))?;
        let (size, began) = (bytes.len(), Instant::now());
        client
            .upload(&guest, "root", bytes.into())
            .await
            .map_err(|e| TemplateBuildError::Upload {
                what: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let _ = events.send(BuildEvent::Log(format!(
            "uploaded {guest} ({:.1} MiB) in {:.1} s",
            size as f64 / (1024.0 * 1024.0),
            began.elapsed().as_secs_f64()
        )));
    }
    let total = build.commands.len().max(1) as f32;
    for (index, command) in build.commands.iter().enumerate() {
        phase(
            events,
            &format!("prepare {}/{}", index + 1, build.commands.len()),
            0.55 + 0.3 * index as f32 / total,
        );
        let fail = |reason: String| TemplateBuildError::Prepare {
            index: index + 1,
            command: command.clone(),
            reason,
        };
        let out = client
            .exec("/bin/bash", &["-l", "-c", command], Some("root"))
            .await
            .map_err(|e| fail(e.to_string()))?;
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            let _ = events.send(BuildEvent::Log(line.to_owned()));
        }
        if out.exit_code != 0 {
            let tail: String = String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(fail(format!("exit code {}: {tail}", out.exit_code)));
        }
    }
    // Whatever the guest still caches is in the RAM image and stays consistent with the disk,
    // but a synced page cache makes clones start with less dirty state to write back.
    let _ = client.exec("/bin/sync", &[], Some("root")).await;
    // What runs now is the template's own; a warm clone running anything else at its checkout
    // is discarded.
    client
        .init(&crate::EnvdInit {
            mark_template_processes: true,
            ..crate::EnvdInit::default()
        })
        .await
        .map_err(|e| TemplateBuildError::Mark(e.to_string()))?;

    // 5. Snapshot into the build directory.
    phase(events, "snapshot", 0.88);
    let snap = vm.snapshot_template(dir).await;
    if let Some(lease) = slot {
        lease.release().await;
    }
    let snap = snap?;
    let _ = firkin_guest::remove_tree(&dir.join("scratch"));

    // 6. Seal. Waiting out the digest cache's racy window first means the hashes computed here
    // are cached, so the first create does not hash the RAM image and disk again.
    phase(events, "sealing", 0.93);
    tokio::time::sleep(DigestCache::DEFAULT_RACY_WINDOW + Duration::from_millis(50)).await;
    let machine_json = serde_json::to_value(&snap.machine).map_err(TemplateBuildError::Machine)?;
    let snapshot = TemplateSnapshot::seal(
        dir.clone(),
        build.template_id.clone(),
        build.build_id.clone(),
        build.budget,
        &[
            (component::VM, firkin_vmm::SNAPSHOT_JSON),
            (component::RAM, firkin_vmm::RAM_FILE),
            (component::STATE, firkin_vmm::STATE_FILE),
            (component::DISK, firkin_vmm::TEMPLATE_DISK_FILE),
        ],
        machine_json,
        Arc::clone(&cache),
    )
    .await?;
    phase(events, "ready", 1.0);
    let samples = vec![
        BenchmarkSample::latency("cold_template_boot", boot_time),
        BenchmarkSample::latency("cold_template_build", started.elapsed()),
    ];
    Ok((snapshot, samples))
}

/// The image gets the content plus headroom; a requested disk size larger than that is used
/// as the minimum size instead, so the sandbox sees the disk it asked for.
fn image_options(disk: Size) -> ImageOptions {
    ImageOptions::for_disk(disk.as_mib())
}
