//! `firkin serve`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use firkin_artifacts::DigestCache;
use firkin_runtime::{FirkinPaths, RuntimeConfig, SandboxRuntime};
use firkin_server::{
    ApiKeySetup, BuildProgress, CapacityPolicy, EnsureTemplate, HostResources, Server,
    ServerConfig, TemplateBuilder,
};
use firkin_types::Size;
use indicatif::{ProgressBar, ProgressStyle};

/// Which VM backend runs sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// QEMU microVMs restored from template snapshots.
    Qemu,
    /// Host processes, NO ISOLATION: each sandbox is a `firkin-envd` on this machine running
    /// as your user. For developing and testing firkin itself only.
    Process,
}

/// Serve the E2B API and the sandbox proxy on one address.
///
/// The first start creates an API key, prints it and saves it (mode 0600) in the state
/// directory for the `firkin` client commands; set FIRKIN_API_KEY to choose your own. The
/// default template `base` is built on first use. Running sandboxes stop with the server;
/// paused ones stay paused and resumable.
///
/// Examples:
///
///   firkin serve
///   firkin serve --listen 0.0.0.0:3000 --domain sandbox.example.com
///   FIRKIN_API_KEY=$(openssl rand -hex 24) firkin serve --warm-pool base=4,python=1
///   firkin serve --cpu-overcommit 4 --memory-overcommit 1.0 --queue 16
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    /// Address to listen on (control plane and sandbox plane).
    #[arg(long, env = "FIRKIN_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,

    /// Sandbox backend.
    #[arg(long, value_enum, env = "FIRKIN_BACKEND", default_value_t = Backend::Qemu)]
    backend: Backend,

    /// State directory: database, run directories, paused sandboxes [default: ~/.firkin/state].
    #[arg(long, env = "FIRKIN_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Cache directory: guest kernel, templates [default: ~/.firkin/cache].
    #[arg(long, env = "FIRKIN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Domain for `{port}-{sandboxID}.{domain}` host routing (wildcard DNS and TLS in front);
    /// also returned to SDKs as the sandbox domain. `localhost` makes `get_host()` names reach
    /// sandboxes from a browser on this machine (`http://49999-<id>.localhost:3000/`).
    #[arg(long, env = "FIRKIN_DOMAIN")]
    domain: Option<String>,

    /// vCPUs sandboxes may commit per host CPU.
    #[arg(long, env = "FIRKIN_CPU_OVERCOMMIT", default_value_t = 16.0)]
    cpu_overcommit: f64,

    /// Guest RAM sandboxes may commit per byte of host RAM (clones share template pages).
    #[arg(long, env = "FIRKIN_MEMORY_OVERCOMMIT", default_value_t = 1.5)]
    memory_overcommit: f64,

    /// Disk quota sandboxes may commit per byte of free disk (their overlays are thin).
    #[arg(long, env = "FIRKIN_DISK_OVERCOMMIT", default_value_t = 4.0)]
    disk_overcommit: f64,

    /// Host RAM kept out of the sandboxes' capacity, in MiB.
    #[arg(long, env = "FIRKIN_MEMORY_RESERVE_MIB", default_value_t = 2048)]
    memory_reserve_mib: u64,

    /// Free disk that must remain before a sandbox starts, in GiB.
    #[arg(long, env = "FIRKIN_DISK_FLOOR_GIB", default_value_t = 10)]
    disk_floor_gib: u64,

    /// Creates that may wait for capacity; past this they get 429 at once.
    #[arg(long, env = "FIRKIN_QUEUE", default_value_t = 64)]
    queue: usize,

    /// Seconds a create waits for capacity before it gets 503.
    #[arg(long, env = "FIRKIN_QUEUE_WAIT_SECS", default_value_t = 30)]
    queue_wait_secs: u64,

    /// Restored sandboxes kept ready per template, e.g. `base=2,python=1` [default: base=1].
    #[arg(
        long = "warm-pool",
        value_name = "TEMPLATE=DEPTH",
        env = "FIRKIN_WARM_POOL",
        value_delimiter = ','
    )]
    warm_pool: Vec<String>,

    /// Longest lifetime a sandbox may ask for, in seconds.
    #[arg(long, env = "FIRKIN_MAX_TIMEOUT_SECS", default_value_t = 86_400)]
    max_timeout_secs: u64,

    /// Do not build the default template `base` at start.
    #[arg(long)]
    no_default_template: bool,

    /// A built-in template to have ready before the banner, besides `base`
    /// (`code-interpreter-v1`): adopted from the cache or built now, one build at a time.
    /// Repeatable. Without it a built-in template is built on its first create.
    #[arg(long = "template", value_name = "NAME")]
    templates: Vec<String>,

    #[command(flatten)]
    net: crate::network::NetworkArgs,

    /// Agent binary for `--backend process` [default: `firkin-envd` next to this binary, else
    /// on PATH].
    #[arg(long, env = "FIRKIN_ENVD_BIN")]
    envd_bin: Option<PathBuf>,
}

fn warm_pools(specs: &[String]) -> Result<BTreeMap<String, usize>> {
    if specs.is_empty() {
        return Ok(BTreeMap::from([("base".to_owned(), 1)]));
    }
    specs
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let (t, d) = s
                .split_once('=')
                .ok_or_else(|| anyhow!("--warm-pool {s:?}: expected TEMPLATE=DEPTH"))?;
            let depth = d
                .trim()
                .parse::<usize>()
                .with_context(|| format!("--warm-pool {s:?}: depth is not a number"))?;
            Ok((t.trim().to_owned(), depth))
        })
        .collect()
}

fn envd_binary(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("firkin-envd")))
        .filter(|p| p.is_file())
    {
        return sibling;
    }
    PathBuf::from("firkin-envd")
}

pub fn resolve_paths(state: Option<PathBuf>, cache: Option<PathBuf>) -> Result<FirkinPaths> {
    let defaults = FirkinPaths::from_env();
    let pick = |given: Option<PathBuf>, fallback: Option<PathBuf>, what: &str| -> Result<PathBuf> {
        match given {
            Some(p) if p.is_absolute() => Ok(p),
            Some(p) => Ok(std::env::current_dir()?.join(p)),
            None => fallback.ok_or_else(|| {
                anyhow!("cannot find a {what} directory: set HOME or pass --{what}-dir")
            }),
        }
    };
    let (ds, dc) = match &defaults {
        Ok(p) => (
            Some(p.state_dir().to_path_buf()),
            Some(p.cache_dir().to_path_buf()),
        ),
        Err(_) => (None, None),
    };
    Ok(FirkinPaths::new(
        pick(state, ds, "state")?,
        pick(cache, dc, "cache")?,
    ))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop firkin with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Refuses to start without a program every create needs (a server that starts and then fails
/// every create helps nobody); warns when template builds will fail.
fn check_host_tools() -> Result<()> {
    use firkin_types::ToolUse;
    for (_, result) in firkin_guest::host_tools::check_all(&[ToolUse::Sandboxes]) {
        if let Err(err) = result {
            bail!("cannot serve sandboxes: {err}");
        }
    }
    for (_, result) in firkin_guest::host_tools::check_all(&[ToolUse::Templates]) {
        if let Err(err) = result {
            tracing::warn!(%err, "template builds will fail");
        }
    }
    Ok(())
}

pub async fn run(args: ServeArgs) -> Result<()> {
    if args.backend == Backend::Qemu {
        check_host_tools()?;
    }
    let paths = resolve_paths(args.state_dir.clone(), args.cache_dir.clone())?;
    std::fs::create_dir_all(paths.state_dir())
        .with_context(|| format!("creating {}", paths.state_dir().display()))?;
    let host = HostResources::probe(paths.state_dir())?;
    let policy = CapacityPolicy {
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
        memory_reserve: Size::mib(args.memory_reserve_mib),
        disk_reserve: Size::gib(args.disk_floor_gib),
        disk_overcommit: args.disk_overcommit,
    };
    let capacity = policy.capacity(host);
    tracing::info!(
        host_cpus = host.cpus,
        host_memory_mib = host.memory.as_mib(),
        free_disk_gib = host.free_disk.as_bytes() >> 30,
        %capacity,
        "capacity"
    );
    let mut rc = RuntimeConfig::new(capacity);
    rc.queue = firkin_admission::QueuePolicy {
        max_pending: args.queue,
    };
    rc.queue_wait = Duration::from_secs(args.queue_wait_secs);
    rc.restore_disk_floor = Size::gib(args.disk_floor_gib);
    rc.warm_pool_disk_floor = rc.warm_pool_disk_floor.max(rc.restore_disk_floor);
    let cache = Arc::new(DigestCache::persistent(paths.digest_cache()));

    let mut config = ServerConfig::new(paths.clone());
    config.domain = args.domain.clone();
    config.max_timeout = Duration::from_secs(args.max_timeout_secs.max(1));
    config.warm_pools = warm_pools(&args.warm_pool)?;

    let mut slots = None;
    let server = match args.backend {
        Backend::Process => {
            tracing::warn!(
                "--backend process: sandboxes are plain processes on this host with NO isolation"
            );
            let launcher = firkin_server::process::ProcessLauncher::new(
                envd_binary(args.envd_bin.clone()),
                paths.sandboxes_dir(),
            );
            let builder: Arc<dyn TemplateBuilder> =
                Arc::new(firkin_server::process::ProcessTemplateBuilder);
            Server::open(config, SandboxRuntime::new(launcher, rc, cache), builder)?
        }
        Backend::Qemu => {
            let accel = firkin_runtime::qemu::detect_accel();
            tracing::info!(accel = ?accel.accel, reason = %accel.reason, "accelerator");
            let assets = firkin_runtime::qemu::GuestAssets::locate(&paths)
                .context("locating guest assets (kernel, firkin-init, firkin-envd)")?;
            let mut launcher =
                firkin_runtime::qemu::QemuLauncher::new(paths.sandboxes_dir(), Arc::clone(&cache));
            let mut builder =
                firkin_server::qemu::QemuTemplateBuilder::new(assets, accel, Arc::clone(&cache))
                    .with_rootfs_cache(paths.rootfs_cache_dir());
            slots = crate::network::start(&args.net)?;
            if let Some(pool) = &slots {
                launcher = launcher.with_slots(pool.clone());
                builder = builder.with_slots(pool.clone());
                config.egress_control = true;
            }
            let builder: Arc<dyn TemplateBuilder> = Arc::new(builder);
            Server::open(config, SandboxRuntime::new(launcher, rc, cache), builder)?
        }
    };
    let recovery = server.recovery();
    if !recovery.removed_sandboxes.is_empty() || recovery.killed_processes > 0 {
        tracing::warn!(
            removed = recovery.removed_sandboxes.len(),
            killed = recovery.killed_processes,
            "sandboxes that were running when firkin last stopped are gone"
        );
    }
    if recovery.kept_paused > 0 {
        tracing::info!(paused = recovery.kept_paused, "paused sandboxes kept");
    }

    let env_key = std::env::var("FIRKIN_API_KEY").ok();
    let key = server.ensure_api_key(env_key.as_deref())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "listening on {} (is another server using it? `firkin doctor` checks)",
                args.listen
            )
        })?;
    let local = listener.local_addr()?;

    let mut wanted: Vec<String> = Vec::new();
    if !args.no_default_template {
        wanted.push(firkin_server::app::DEFAULT_TEMPLATE.to_owned());
    }
    for t in &args.templates {
        if !wanted.contains(t) {
            wanted.push(t.clone());
        }
    }
    let mut recipes = wanted
        .iter()
        .map(|name| {
            firkin_server::recipes::builtin(name).ok_or_else(|| {
                anyhow!(
                    "--template {name}: not a built-in template (built-ins: {}); build others \
                     with `firkin template build`",
                    firkin_server::recipes::BUILTIN_TEMPLATES.join(", ")
                )
            })
        })
        .collect::<Result<std::collections::VecDeque<_>>>()?;
    // Templates that are there (or adoptable) are verified before serving; at the first that
    // needs a build the rest wait for it, since two builds at once only slow each other down.
    let mut building = None;
    while let Some(recipe) = recipes.pop_front() {
        let name = recipe.template_id.clone();
        match server.ensure_template(recipe)? {
            EnsureTemplate::Building { build_id, progress } => {
                building = Some((name, build_id, progress));
                break;
            }
            ready => {
                if let EnsureTemplate::Adopted { build_id } = ready {
                    tracing::info!(template = %name, %build_id, "using a cached build");
                }
                verify_before_serving(&server, &name).await;
            }
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            _ = stop_rx => {}
        }
    };
    let server_handle = server.templates();
    let serving = tokio::spawn(server.serve(listener, shutdown));
    tracing::info!(%local, "listening");

    while let Some((name, build_id, progress)) = building.take() {
        tracing::info!(template = %name, %build_id, "building a built-in template (first start)");
        if let Err(reason) = follow_build(&progress).await {
            let _ = stop_tx.send(());
            let _ = serving.await;
            bail!("building the template {name} failed: {reason}\n(run `firkin doctor`)");
        }
        while let Some(recipe) = recipes.pop_front() {
            let name = recipe.template_id.clone();
            match server_handle.ensure(recipe)? {
                EnsureTemplate::Building { build_id, progress } => {
                    building = Some((name, build_id, progress));
                    break;
                }
                EnsureTemplate::Adopted { build_id } => {
                    tracing::info!(template = %name, %build_id, "using a cached build");
                }
                EnsureTemplate::Ready => {}
            }
        }
    }
    print_banner(local, &key);
    let served = serving
        .await
        .map_err(|e| anyhow!("the server task failed: {e}"));
    // The sandboxes stopped with the server and gave their slots back; what the pool still
    // holds (ready slots, the host table) goes now.
    if let Some(pool) = slots
        && let Err(err) = pool.shutdown().await
    {
        tracing::warn!(%err, "removing the network slots");
    }
    served??;
    Ok(())
}

/// Hashes `template` into the digest cache before serving, so that the first create does not
/// pay for it (a template adopted into a new state directory has never been hashed here).
async fn verify_before_serving(server: &Server, template: &str) {
    let began = std::time::Instant::now();
    match server.verify_template(template).await {
        Ok(_) => tracing::info!(
            template,
            ms = began.elapsed().as_millis() as u64,
            "template verified"
        ),
        // Creates from it will fail the same check and say so; other templates still work.
        Err(err) => tracing::error!(%err, "a template does not verify"),
    }
}

/// Shows a build's progress until it ends: as a progress bar on a terminal, else as log lines
/// (indicatif draws nothing off a terminal, its `println` included). Phases are log lines too.
pub async fn follow_build(progress: &BuildProgress) -> Result<(), String> {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:30} [{bar:30}] {percent:>3}% {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut shown = 0;
    loop {
        let s = progress.snapshot();
        for line in s.logs.iter().skip(shown) {
            if bar.is_hidden() {
                tracing::info!(%line, "template build");
            } else {
                bar.println(format!("  {line}"));
            }
        }
        shown = s.logs.len();
        bar.set_message(s.phase.clone());
        bar.set_position((f64::from(s.fraction) * 1000.0) as u64);
        if let Some(done) = s.done {
            match &done {
                Ok(()) => bar.finish_with_message("template ready"),
                Err(_) => bar.abandon_with_message("build failed"),
            }
            return done;
        }
        progress.changed().await;
    }
}

fn print_banner(local: SocketAddr, key: &ApiKeySetup) {
    let host = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    let url = match host {
        IpAddr::V6(ip) => format!("http://[{ip}]:{}", local.port()),
        IpAddr::V4(ip) => format!("http://{ip}:{}", local.port()),
    };
    let key_line = match key {
        ApiKeySetup::Generated(k) => {
            format!("export E2B_API_KEY={k}   # new key, shown once; also saved for the firkin CLI")
        }
        ApiKeySetup::Existing(Some(k)) => format!("export E2B_API_KEY={k}"),
        ApiKeySetup::Existing(None) => {
            "export E2B_API_KEY=<the key printed at the first start>".to_owned()
        }
        ApiKeySetup::FromEnv => "export E2B_API_KEY=\"$FIRKIN_API_KEY\"".to_owned(),
    };
    println!(
        "\nfirkin is ready on {url}\n\nPoint the E2B SDK at it:\n\n  export E2B_API_URL={url}\n  \
         export E2B_SANDBOX_URL={url}\n  {key_line}\n\n  python -c 'from e2b import Sandbox; \
         print(Sandbox.create().commands.run(\"echo hello\").stdout)'\n"
    );
}
