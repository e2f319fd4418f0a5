//! `firkin bench`: the numbers of BENCHMARKS.md, each next to a floor measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use firkin_bench::suite::{self, CreateRun};
use firkin_bench::{Api, BenchResults, EnvdTarget, MachineInfo, Summary};
use firkin_runtime::FirkinPaths;
use firkin_runtime::qemu::{GUEST_PORTS, envd_ready};
use firkin_vmm::{BootRequest, NetKind, RestoreRequest, Snapshot, Vm};

mod interp;
mod sides;

/// Measure create latency, time to interactive, command round trip, file throughput, memory
/// and idle CPU per sandbox, and how many idle sandboxes the host holds before a create's p50
/// doubles, against a `firkin serve` (started here unless --url is given), plus the
/// floors: a bare QEMU restore and a cold boot of the same template, and host-mode firkin-envd.
///
/// Where this host can give sandboxes TAP networks (root, /dev/net/tun, nft), it also compares
/// the two network kinds (issue 12): a `firkin serve --network user` and a `--network tap` side
/// by side, pool depth 0, measured in alternation: c=1 creates, command round trip, files.
///
/// And the code interpreter (issue 13; `--skip-interpreter` leaves it out): a server with
/// `code-interpreter-v1` (built on first use, ~10 minutes under TCG) and `base`, pool depth 0:
/// create → first `run_code("1+1")` result, `import pandas` in a fresh sandbox, the
/// `run_code` round trip next to `commands.run("true")` in the same sandbox, and idle memory
/// per sandbox of both templates.
///
/// Writes results.json and SVG charts into --out, prints the BENCHMARKS.md section, and with
/// --write-benchmarks replaces the "latest numbers" section of that file.
///
/// Examples:
///
///   firkin bench --quick
///   firkin bench --out bench-results --write-benchmarks BENCHMARKS.md
///   firkin bench --url http://127.0.0.1:3000 --api-key "$E2B_API_KEY" --skip-memory
///   firkin bench --only network --quick
///   firkin bench --only interpreter
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct BenchArgs {
    /// A running server to measure (its warm-pool setting is used as is). Default: start
    /// `firkin serve` twice here, with the warm pool off and on.
    #[arg(long)]
    url: Option<String>,
    /// API key for --url.
    #[arg(long, env = "E2B_API_KEY")]
    api_key: Option<String>,
    #[arg(long, default_value = "base")]
    template: String,
    /// Concurrency levels of the create runs (n = 10 × c each).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    concurrency: Vec<usize>,
    /// Idle sandboxes for the memory run.
    #[arg(long, default_value_t = 50)]
    memory_sandboxes: usize,
    #[arg(long)]
    skip_memory: bool,
    /// Most idle sandboxes the idle-capacity run adds (step by step, until a create's p50
    /// doubles); 0 skips it.
    #[arg(long, default_value_t = 60)]
    idle_max: usize,
    /// Idle sandboxes added per step of the idle-capacity run.
    #[arg(long, default_value_t = 10)]
    idle_step: usize,
    /// Fewer samples everywhere (a smoke run; below the protocol's n ≥ 10×c).
    #[arg(long)]
    quick: bool,
    /// Leave out the network comparison (user-mode vs TAP slots, run by default where this
    /// host can give sandboxes TAP networks).
    #[arg(long)]
    skip_network: bool,
    /// Leave out the code interpreter's rows.
    #[arg(long)]
    skip_interpreter: bool,
    /// Run only this part (and write its results).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// `--net-range` of the servers the bench starts (with `--net-prefix fkb`): apart from
    /// any other server's on this host (`firkin serve` defaults to 198.18.0.0/16; the SDK
    /// suites' servers use 198.19.0.0-198.19.254.255 in /24s below .244 and at .254).
    #[arg(long, default_value = "198.19.244.0/22")]
    net_range: String,
    /// Output directory for results.json and charts.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Replace the generated section of this BENCHMARKS.md.
    #[arg(long)]
    write_benchmarks: Option<PathBuf>,
}

/// `--net-prefix` of every server the bench starts.
const NET_PREFIX: &str = "fkb";

/// A part of `firkin bench` that `--only` can run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Two servers, `--network user` and `--network tap`, measured in alternation.
    Network,
    /// The code interpreter's rows (`code-interpreter-v1` next to `base`).
    Interpreter,
}

pub(crate) struct ServerProcess {
    child: tokio::process::Child,
    pub(crate) api: Api,
    state_dir: PathBuf,
}

impl ServerProcess {
    /// With `--network auto`; where that gives TAP networks, the slots get the bench's own
    /// prefix and range (apart from any other server's on this host; the bench's servers run
    /// one after another, so they share them).
    async fn start(
        template: &str,
        pool_depth: usize,
        cache: &Path,
        net_range: &str,
    ) -> Result<Self> {
        let extra = [
            "--net-prefix".to_owned(),
            NET_PREFIX.to_owned(),
            "--net-range".to_owned(),
            net_range.to_owned(),
        ];
        let s = Self::spawn(template, pool_depth, cache, &pool_depth.to_string(), &extra)?;
        s.wait_listening().await?;
        Ok(s)
    }

    /// Starts `firkin serve` with its own state dir (`bench-state-<pid>-<name>` in `cache`,
    /// log `bench-serve-<name>.log`) and `extra` arguments; does not wait for it.
    pub(crate) fn spawn(
        template: &str,
        pool_depth: usize,
        cache: &Path,
        name: &str,
        extra: &[String],
    ) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let state_dir = cache.join(format!("bench-state-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let key = format!("bench-{}-{}", std::process::id(), rand_suffix());
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(cache.join(format!("bench-serve-{name}.log")))?;
        let child = tokio::process::Command::new(exe)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--warm-pool")
            .arg(format!("{template}={pool_depth}"))
            // Idle sandboxes use no CPU; the memory run needs 50 of E2B's 2-vCPU shape on a
            // small host, which the default overcommit (16 per host CPU) would refuse.
            .arg("--cpu-overcommit")
            .arg("64")
            .args(extra)
            .env("FIRKIN_API_KEY", &key)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting firkin serve")?;
        let url = format!("http://127.0.0.1:{port}");
        let api = Api::new(&url, &url, &key);
        Ok(Self {
            child,
            api,
            state_dir,
        })
    }

    /// Waits until the server answers its status endpoint.
    async fn wait_listening(&self) -> Result<()> {
        let started = Instant::now();
        // The first start may build the template (minutes under TCG).
        while self.api.status().await.is_err() {
            if started.elapsed() > Duration::from_secs(900) {
                bail!("firkin serve did not come up within 15 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Waits until a create of `template` succeeds (the server listens while it still builds
    /// its default template), killing that sandbox; fails if the server exits first.
    pub(crate) async fn wait_creatable(&mut self, template: &str, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("firkin serve exited with {status} before `{template}` was ready");
            }
            match self.api.create(template).await {
                Ok((c, _)) => {
                    self.api.kill(&c.sandbox_id).await?;
                    return Ok(());
                }
                Err(e) if started.elapsed() > limit => {
                    bail!("`{template}` not creatable after {limit:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}")
}

fn ms(samples: &[f64]) -> Option<Summary> {
    Summary::of_ms(samples)
}

/// The newest sealed build of `template` in the cache taken on a user-mode network: the floors
/// restore and boot without a network slot, and a snapshot restores only onto its own kind.
fn template_dir(paths: &FirkinPaths, template: &str) -> Result<PathBuf> {
    let root = paths.templates_dir().join(template);
    let mut builds: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&root)
        .with_context(|| format!("no builds of {template} in {}", root.display()))?
        .flatten()
        .filter(|e| e.path().join("seal.json").is_file())
        .filter(|e| Snapshot::load(&e.path()).is_ok_and(|s| s.machine.net == NetKind::User))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    builds.sort();
    builds.pop().map(|(_, p)| p).with_context(|| {
        format!(
            "no finished user-mode build of {template} in {} (the network comparison, or \
                 `firkin serve --network user`, builds one)",
            root.display()
        )
    })
}

async fn bare_restores(dir: &Path, n: usize, scratch: &Path) -> Result<Vec<f64>> {
    let snap = Snapshot::load(dir)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let vm = Vm::restore(
            &snap,
            RestoreRequest {
                run_dir: scratch.join(format!("bare-{i}")),
                guest_ports: GUEST_PORTS.to_vec(),
                net: firkin_vmm::NetAttach::User,
                ready: Some(envd_ready(Duration::from_secs(60))),
            },
        )
        .await?;
        out.push(started.elapsed().as_secs_f64() * 1e3);
        vm.stop(Duration::from_secs(5)).await?;
    }
    Ok(out)
}

async fn cold_boots(dir: &Path, n: usize, scratch: &Path) -> Result<Vec<f64>> {
    let snap = Snapshot::load(dir)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let run = scratch.join(format!("cold-{i}"));
        std::fs::create_dir_all(&run)?;
        let disk = run.join("disk.img");
        // A private writable copy (sparse) of the template disk; not part of the timing.
        let status = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(dir.join(firkin_vmm::TEMPLATE_DISK_FILE))
            .arg(&disk)
            .status()?;
        if !status.success() {
            bail!("copying the template disk failed");
        }
        let mut perms = std::fs::metadata(&disk)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&disk, perms)?;
        let started = Instant::now();
        let vm = Vm::cold_boot(BootRequest {
            machine: snap.machine.clone(),
            run_dir: run.join("run"),
            ram_path: run.join("ram.img"),
            disk,
            guest_ports: GUEST_PORTS.to_vec(),
            net: firkin_vmm::NetAttach::User,
            ready: Some(envd_ready(Duration::from_secs(300))),
        })
        .await?;
        out.push(started.elapsed().as_secs_f64() * 1e3);
        vm.stop(Duration::from_secs(5)).await?;
        let _ = std::fs::remove_dir_all(&run);
    }
    Ok(out)
}

async fn host_envd_rtt(n: usize, user: Option<String>) -> Result<Vec<f64>> {
    let exe = std::env::current_exe()?;
    let envd = std::env::var_os("FIRKIN_ENVD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| exe.with_file_name("firkin-envd"));
    if !envd.is_file() {
        bail!(
            "host-mode floor needs {} (build it with `cargo build -p firkin-envd`, or set FIRKIN_ENVD_BIN)",
            envd.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = tokio::process::Command::new(&envd)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let api = Api::new(&url, &url, "unused");
    let target = EnvdTarget {
        base_url: url,
        sandbox_id: None,
        access_token: None,
        user,
    };
    let started = Instant::now();
    while api.run(&target, "true").await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("host-mode firkin-envd did not answer");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = suite::command_round_trips(&api, &target, 5, n).await;
    let _ = child.kill().await;
    Ok(out?)
}

/// Creates at concurrency 1 where each create waits until the pool holds an entry, so every
/// sample is a hit.
async fn pool_hits(api: &Api, template: &str, n: usize) -> Result<CreateRun> {
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut first_error = None;
    for _ in 0..n {
        let wait = Instant::now();
        loop {
            let warm = api.status().await?["warmSandboxes"].as_u64().unwrap_or(0);
            if warm > 0 || wait.elapsed() > Duration::from_secs(60) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match api.create(template).await {
            Ok((c, d)) => {
                samples.push(d.as_secs_f64() * 1e3);
                api.kill(&c.sandbox_id).await?;
            }
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    Ok(CreateRun {
        label: "c=1, warm pool on (hits)".into(),
        concurrency: 1,
        requested: n,
        succeeded: samples.len(),
        refused: 0,
        failed: n - samples.len(),
        first_error,
        wall_s: wall,
        throughput_per_s: samples.len() as f64 / wall,
        summary: ms(&samples),
        samples_ms: samples,
    })
}

async fn interactive(api: &Api, template: &str, quick: bool, res: &mut BenchResults) -> Result<()> {
    let (created, _) = api.create(template).await?;
    let mut target = api.envd(&created);
    target.user = Some("user".into());
    let rounds = if quick { 20 } else { 100 };
    let outcome = async {
        res.command_rtt_ms = ms(&suite::command_round_trips(api, &target, 5, rounds).await?);
        for size in [1, 100] {
            res.files
                .push(suite::file_throughput(api, &target, size, if quick { 1 } else { 3 }).await?);
        }
        Ok::<(), firkin_bench::ClientError>(())
    }
    .await;
    api.kill(&created.sandbox_id).await?;
    Ok(outcome?)
}

fn machine_info() -> MachineInfo {
    let mut m = MachineInfo::probe();
    let accel = firkin_vmm::accel::detect();
    m.accel = format!("{:?}", accel.accel).to_uppercase();
    m.accel_reason = accel.reason;
    m.qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "QEMU version unknown".into());
    m
}

fn log(step: &str) {
    eprintln!("bench: {step}");
}

pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    let paths = FirkinPaths::from_env()?;
    let scratch = paths
        .cache_dir()
        .join(format!("bench-scratch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut res = BenchResults {
        started_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        machine: machine_info(),
        template: args.template.clone(),
        ..BenchResults::default()
    };
    if args.quick {
        res.notes
            .push("Quick run: fewer samples than the protocol asks (n ≥ 10×c).".into());
    }

    let only_network = args.only == Some(Part::Network);
    let only_interpreter = args.only == Some(Part::Interpreter);
    if only_interpreter {
        // The header names the template the run measured.
        res.template = firkin_server::recipes::CODE_INTERPRETER_TEMPLATE.to_owned();
    }
    if args.only.is_none() {
        main_suite(&args, &paths, &mut res).await?;
    }
    if only_network || (args.only.is_none() && !args.skip_network && args.url.is_none()) {
        match crate::network::tap_unavailable() {
            None => {
                let plan = sides::Plan {
                    template: &args.template,
                    quick: args.quick,
                    cache: paths.cache_dir(),
                    net_range: &args.net_range,
                };
                match sides::compare(&plan).await {
                    Ok(cmp) => res.network = Some(cmp),
                    Err(e) if only_network => return Err(e),
                    Err(e) => res.notes.push(format!("network comparison failed: {e:#}")),
                }
            }
            Some(missing) if only_network => {
                bail!("--only network needs TAP networks on this host (missing: {missing})")
            }
            Some(missing) => res.notes.push(format!(
                "Network comparison skipped: this host cannot give sandboxes TAP networks \
                 (missing: {missing})."
            )),
        }
    }
    if only_interpreter || (args.only.is_none() && !args.skip_interpreter) {
        match interp::part(&args, &paths).await {
            Ok(run) => res.interpreter = Some(run),
            Err(e) if only_interpreter => return Err(e),
            Err(e) => res
                .notes
                .push(format!("code interpreter run failed: {e:#}")),
        }
    }
    if args.only.is_none() {
        floors(&args, &paths, &scratch, &mut res).await?;
        if args.url.is_none() && crate::network::tap_unavailable().is_none() {
            res.notes.push(
                "The floors restore and boot the template's user-mode build; the servers of the \
                 create and interactive runs used `--network auto` (TAP on this host)."
                    .into(),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let charts = res.write(&args.out)?;
    let md = res.markdown(&args.out.display().to_string());
    println!("{md}");
    for c in charts {
        eprintln!("bench: chart {}", c.display());
    }
    if let Some(path) = args.write_benchmarks {
        replace_section(&path, &md)?;
        eprintln!("bench: updated {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The main runs: creates with the pool off and on, time to interactive, command round trip,
/// files, memory, idle capacity.
async fn main_suite(args: &BenchArgs, paths: &FirkinPaths, res: &mut BenchResults) -> Result<()> {
    let scale = |full: usize, quick: usize| if args.quick { quick } else { full };
    // Pool off (or the given server as configured).
    let (server, api) = match &args.url {
        Some(url) => {
            let key = args
                .api_key
                .clone()
                .context("--url needs --api-key or E2B_API_KEY")?;
            (None, Api::new(url, url, &key))
        }
        None => {
            log("starting firkin serve with the warm pool off");
            let s =
                ServerProcess::start(&args.template, 0, paths.cache_dir(), &args.net_range).await?;
            let api = s.api.clone();
            (Some(s), api)
        }
    };
    let pool_label = if args.url.is_some() {
        "as configured"
    } else {
        "pool off"
    };
    for &c in &args.concurrency {
        let n = scale(10 * c, (2 * c).max(5));
        log(&format!("create c={c} n={n} ({pool_label})"));
        res.create.push(
            suite::create_latency(&api, &args.template, &format!("c={c}, {pool_label}"), c, n)
                .await,
        );
    }
    log("time to interactive");
    match suite::time_to_interactive(&api, &args.template, scale(20, 5)).await {
        Ok(v) => res.tti_ms = ms(&v),
        Err(e) => res.notes.push(format!("time to interactive failed: {e}")),
    }
    log("command round trip and file throughput");
    if let Err(e) = interactive(&api, &args.template, args.quick, res).await {
        res.notes.push(format!("command/file run failed: {e}"));
    }
    if !args.skip_memory {
        let n = scale(args.memory_sandboxes, 10);
        log(&format!("memory with {n} idle sandboxes"));
        let parent = server.as_ref().and_then(ServerProcess::pid);
        match suite::idle_memory(&api, &args.template, n, parent, Duration::from_secs(10)).await {
            Ok(m) => res.memory = Some(m),
            Err(e) => res.notes.push(format!("memory run failed: {e}")),
        }
    }
    let idle_max = scale(args.idle_max, args.idle_max.min(20));
    if idle_max > 0 {
        log(&format!("idle capacity: up to {idle_max} idle sandboxes"));
        let settle = Duration::from_secs(if args.quick { 3 } else { 5 });
        match firkin_bench::idle::idle_capacity(
            &api,
            &args.template,
            args.idle_step,
            idle_max,
            scale(5, 3),
            settle,
        )
        .await
        {
            Ok(r) => res.idle_capacity = Some(r),
            Err(e) => res.notes.push(format!("idle capacity run failed: {e}")),
        }
    }
    if let Some(s) = server {
        s.stop().await;
        log("starting firkin serve with the warm pool on");
        let s = ServerProcess::start(&args.template, 2, paths.cache_dir(), &args.net_range).await?;
        res.create
            .push(pool_hits(&s.api, &args.template, scale(20, 5)).await?);
        for &c in &args.concurrency {
            let n = scale(10 * c, (2 * c).max(5));
            log(&format!("create c={c} n={n} (pool on)"));
            res.create.push(
                suite::create_latency(&s.api, &args.template, &format!("c={c}, pool on"), c, n)
                    .await,
            );
        }
        s.stop().await;
    }

    Ok(())
}

/// The same-run floors: a bare QEMU restore and a cold boot of the template's user-mode build,
/// and host-mode firkin-envd. Run after the network comparison, which builds the user-mode
/// template on a host whose servers otherwise get TAP networks.
async fn floors(
    args: &BenchArgs,
    paths: &FirkinPaths,
    scratch: &Path,
    res: &mut BenchResults,
) -> Result<()> {
    let scale = |full: usize, quick: usize| if args.quick { quick } else { full };
    let dir = template_dir(paths, &args.template)?;
    log("floor: bare QEMU restores");
    res.floors.bare_restore_ms = ms(&bare_restores(&dir, scale(20, 5), scratch).await?);
    log("floor: cold boots");
    res.floors.cold_boot_ms = ms(&cold_boots(&dir, scale(5, 2), scratch).await?);
    log("floor: host-mode firkin-envd");
    let user = std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|p| p.lines().any(|l| l.starts_with("user:")))
        .then(|| "user".to_owned());
    if user.is_none() {
        res.notes.push(
            "Host-mode envd floor ran as the current user (no `user` account on the host).".into(),
        );
    }
    res.floors.host_envd_rtt_ms = ms(&host_envd_rtt(scale(100, 20), user).await?);
    Ok(())
}

const BEGIN: &str = "<!-- firkin bench: begin -->";
const END: &str = "<!-- firkin bench: end -->";

fn replace_section(path: &Path, md: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let body = format!("{BEGIN}\n{md}\n{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &text[..a], body, &text[b + END.len()..]),
        _ => format!("{text}\n{body}\n"),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
