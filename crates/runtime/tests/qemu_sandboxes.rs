//! The runtime driving real QEMU microVMs restored from a real template (Debian bookworm +
//! python3 + firkin-envd), under whatever accelerator this host gets (TCG here and in CI).
//!
//! Needs the guest assets: run `scripts/setup.sh` (or `scripts/setup-guest.sh`) first. A missing
//! asset fails the test with that instruction; nothing is skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use firkin_admission::ResourceBudget;
use firkin_artifacts::DigestCache;
use firkin_envd::client::Client;
use firkin_runtime::qemu::{
    GUEST_PORTS, GuestAssets, QemuLauncher, TemplateBuild, base_template, detect_accel, envd_ready,
};
use firkin_runtime::types::{SandboxId, Size, TemplateId};
use firkin_runtime::{
    EnvdInit, FirkinPaths, RuntimeConfig, RuntimeError, SandboxRuntime, SandboxSource,
    StartSandbox, TemplateSnapshot,
};

const SETUP: &str = "scripts/setup.sh";

fn paths() -> FirkinPaths {
    FirkinPaths::from_env().expect("HOME or FIRKIN_CACHE_DIR must be set")
}

fn run_root() -> PathBuf {
    paths()
        .cache_dir()
        .join("test-runs")
        .join(format!("runtime-{}", std::process::id()))
}

/// Removes what earlier (finished) test processes left behind.
fn sweep_old_runs() {
    let Ok(entries) = std::fs::read_dir(paths().cache_dir().join("test-runs")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("runtime-")
            && pid.parse::<u32>().is_ok_and(|p| p != std::process::id())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn budget() -> ResourceBudget {
    ResourceBudget::new(1, Size::mib(512), Size::gib(2))
}

/// One template for the whole test binary, built in its own thread and runtime (a VM is bound
/// to the runtime that spawned it; only files cross over).
fn template() -> &'static TemplateSnapshot {
    static T: OnceLock<TemplateSnapshot> = OnceLock::new();
    T.get_or_init(|| {
        std::thread::spawn(|| {
            sweep_old_runs();
            let assets =
                GuestAssets::locate(&paths()).unwrap_or_else(|e| panic!("{e} (run {SETUP} first)"));
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let log = tokio::spawn(async move {
                    while let Some(ev) = rx.recv().await {
                        eprintln!("template build: {ev:?}");
                    }
                });
                let build = TemplateBuild {
                    template_id: TemplateId::new("base").unwrap(),
                    build_id: "test".into(),
                    dir: run_root().join("template"),
                    source: base_template(),
                    commands: vec!["echo prepared > /etc/firkin-prepared".into()],
                    interpreter: false,
                    budget: budget(),
                    accel: detect_accel(),
                    slots: None,
                    rootfs_cache: Some(paths().rootfs_cache_dir()),
                };
                let (snap, samples) = firkin_runtime::qemu::build_template(
                    &assets,
                    &build,
                    Arc::new(DigestCache::in_memory()),
                    tx,
                )
                .await
                .unwrap_or_else(|e| panic!("template build failed: {e} (run {SETUP} first?)"));
                let _ = log.await;
                eprintln!("template built: {samples:?}");
                snap
            })
        })
        .join()
        .expect("template build thread panicked")
    })
}

fn runtime(name: &str) -> (SandboxRuntime<QemuLauncher>, PathBuf) {
    let sandboxes = run_root().join(name);
    let cache = Arc::new(DigestCache::in_memory());
    let launcher = QemuLauncher::new(&sandboxes, Arc::clone(&cache))
        .with_health_timeout(Duration::from_secs(60));
    let mut config = RuntimeConfig::new(ResourceBudget::new(8, Size::gib(8), Size::gib(64)));
    config.queue_wait = Duration::from_secs(120);
    (SandboxRuntime::new(launcher, config, cache), sandboxes)
}

fn init(token: &str, env: &[(&str, &str)]) -> EnvdInit {
    EnvdInit {
        env_vars: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        access_token: Some(token.to_owned()),
        timestamp: Some(firkin_runtime::wall_clock_now()),
        entropy: Some("c2VlZCBieXRlcyBmb3IgdGhlIGtlcm5lbA==".into()),
        hostname: Some("sandbox".into()),
        ..EnvdInit::default()
    }
}

fn start(id: &str, source: SandboxSource, token: &str) -> StartSandbox {
    StartSandbox {
        sandbox_id: SandboxId::new(id).unwrap(),
        source,
        init: init(token, &[("FIRKIN_TEST_VAR", id)]),
        network: None,
    }
}

/// A runtime of its own (run directories under `name`) with one sandbox `id` restored from the
/// shared template.
async fn one_sandbox(
    name: &str,
    id: &str,
    token: &str,
) -> (SandboxRuntime<QemuLauncher>, PathBuf, SandboxId) {
    let (rt, sandboxes) = runtime(name);
    rt.start(start(
        id,
        SandboxSource::Template(template().clone()),
        token,
    ))
    .await
    .unwrap();
    (rt, sandboxes, SandboxId::new(id).unwrap())
}

async fn sh(rt: &SandboxRuntime<QemuLauncher>, id: &str, token: &str, cmd: &str) -> (i32, String) {
    sh_as(rt, id, token, None, cmd).await
}

/// `cmd` under bash in the sandbox as `user` (the agent's default user if `None`): its exit
/// code and trimmed stdout.
async fn sh_as(
    rt: &SandboxRuntime<QemuLauncher>,
    id: &str,
    token: &str,
    user: Option<&str>,
    cmd: &str,
) -> (i32, String) {
    let addr = rt
        .route(&SandboxId::new(id).unwrap(), 49983)
        .expect("sandbox is routable");
    let client = Client::new(&format!("http://{addr}"))
        .unwrap()
        .with_token(token);
    let out = client
        .exec("/bin/bash", &["-c", cmd], user)
        .await
        .unwrap_or_else(|e| panic!("{cmd:?} in {id}: {e}"));
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// QEMU processes whose command line mentions `dir` (their run directory is under it).
fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_concurrent_sandboxes_compute_and_are_isolated() {
    let t = template().clone();
    let (rt, sandboxes) = runtime("three");
    let ids = ["sbxa", "sbxb", "sbxc"];
    let (a, b, c) = tokio::join!(
        rt.start(start(ids[0], SandboxSource::Template(t.clone()), "tok-a")),
        rt.start(start(ids[1], SandboxSource::Template(t.clone()), "tok-b")),
        rt.start(start(ids[2], SandboxSource::Template(t.clone()), "tok-c")),
    );
    for s in [&a, &b, &c] {
        let s = s.as_ref().expect("restore");
        assert!(!s.from_warm_pool);
    }
    assert_eq!(qemus_under(&sandboxes).len(), 3);

    let tokens = ["tok-a", "tok-b", "tok-c"];
    for (id, tok) in ids.iter().zip(tokens) {
        assert_eq!(
            sh(&rt, id, tok, "python3 -c 'print(6*7)'").await,
            (0, "42".to_owned())
        );
        // /init reached the agent: env var, prepared template, clock.
        assert_eq!(sh(&rt, id, tok, "echo $FIRKIN_TEST_VAR").await.1, *id);
        assert_eq!(
            sh(&rt, id, tok, "cat /etc/firkin-prepared").await.1,
            "prepared"
        );
        let guest_now: i64 = sh(&rt, id, tok, "date +%s").await.1.parse().unwrap();
        let host_now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            (guest_now - host_now).abs() < 30,
            "guest clock {guest_now} vs host {host_now}"
        );
    }
    // The agent now demands the token.
    let addr = rt.route(&SandboxId::new("sbxa").unwrap(), 49983).unwrap();
    let anonymous = Client::new(&format!("http://{addr}")).unwrap();
    assert!(
        anonymous.run("true").await.is_err(),
        "request without token accepted"
    );

    assert_eq!(
        sh(
            &rt,
            "sbxa",
            "tok-a",
            "echo only-in-a > /tmp/marker && echo ok"
        )
        .await
        .1,
        "ok"
    );
    assert_eq!(
        sh(&rt, "sbxa", "tok-a", "cat /tmp/marker").await.1,
        "only-in-a"
    );
    for (id, tok) in [("sbxb", "tok-b"), ("sbxc", "tok-c")] {
        assert_eq!(
            sh(&rt, id, tok, "test -e /tmp/marker; echo $?").await.1,
            "1"
        );
    }
    // Clones got fresh entropy: their RNG output differs.
    let r1 = sh(&rt, "sbxb", "tok-b", "head -c16 /dev/urandom | od -An -tx1")
        .await
        .1;
    let r2 = sh(&rt, "sbxc", "tok-c", "head -c16 /dev/urandom | od -An -tx1")
        .await
        .1;
    assert_ne!(r1, r2);
    // Clones got their own MAC addresses, none of them the template's, and still answer.
    let mut macs = Vec::new();
    for (id, tok) in ids.iter().zip(tokens) {
        macs.push(sh(&rt, id, tok, "cat /sys/class/net/eth0/address").await.1);
    }
    macs.push("52:54:00:12:34:56".to_owned()); // the template's, firkin-vmm's default
    macs.sort();
    macs.dedup();
    assert_eq!(macs.len(), 4, "{macs:?}");

    for id in ids {
        rt.kill(&SandboxId::new(id).unwrap()).await.unwrap();
    }
    assert!(qemus_under(&sandboxes).is_empty(), "QEMU left running");
    assert!(
        dir_is_empty(&sandboxes),
        "run dirs or overlays left in {}",
        sandboxes.display()
    );
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_keep_files_and_processes() {
    let (rt, sandboxes, id) = one_sandbox("pause", "sbxp", "tok-p").await;
    sh(&rt, "sbxp", "tok-p", "echo kept > /home/user/note").await;
    let pid = sh(
        &rt,
        "sbxp",
        "tok-p",
        "setsid sleep 3600 >/dev/null 2>&1 < /dev/null & echo $!",
    )
    .await
    .1;
    assert!(!pid.is_empty());

    let snap_dir = run_root().join("pause-snapshot");
    let paused = rt.pause(&id, &snap_dir).await.expect("pause");
    assert!(!rt.is_running(&id));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    assert!(qemus_under(&sandboxes).is_empty());

    let resumed = rt
        .start(start(
            "sbxp",
            SandboxSource::Continuation(paused.clone()),
            "tok-p",
        ))
        .await
        .expect("resume");
    assert!(!resumed.from_warm_pool);
    assert_eq!(
        sh(&rt, "sbxp", "tok-p", "cat /home/user/note").await.1,
        "kept"
    );
    assert_eq!(
        sh(
            &rt,
            "sbxp",
            "tok-p",
            &format!("kill -0 {pid} && echo alive")
        )
        .await
        .1,
        "alive"
    );
    // And it keeps working as a normal sandbox: pause it again and resume.
    rt.kill(&id).await.unwrap();
    assert!(dir_is_empty(&sandboxes));

    // A tampered continuation is refused before anything starts.
    let ram = snap_dir.join("ram.img");
    flip_byte(&ram, 4096 * 10 + 7);
    let err = rt
        .start(start("sbxp", SandboxSource::Continuation(paused), "tok-p"))
        .await
        .expect_err("tampered continuation must be refused");
    assert!(matches!(err, RuntimeError::Integrity { .. }), "{err}");
    assert!(qemus_under(&sandboxes).is_empty());
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
}

fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flipped_byte_in_the_template_ram_image_blocks_the_restore() {
    let t = template().clone();
    // A private copy of the template whose RAM image differs by one bit; the other components
    // are links to the shared template (verification follows them).
    let copy = run_root().join("tampered-template");
    std::fs::create_dir_all(&copy).unwrap();
    let src = t.descriptor.parent().unwrap();
    for entry in std::fs::read_dir(src).unwrap().flatten() {
        let name = entry.file_name();
        let dst = copy.join(&name);
        if name == "ram.img" {
            std::fs::copy(entry.path(), &dst).unwrap();
        } else if entry.path().is_file() {
            std::os::unix::fs::symlink(entry.path(), &dst).unwrap();
        }
    }
    flip_byte(&copy.join("ram.img"), 1 << 20);
    let tampered = TemplateSnapshot {
        descriptor: copy.join("seal.json"),
        ..t
    };
    let (rt, sandboxes) = runtime("tampered");
    let err = rt
        .start(start("sbxt", SandboxSource::Template(tampered), "tok"))
        .await
        .expect_err("tampered RAM image must be refused");
    let text = err.to_string();
    assert!(matches!(err, RuntimeError::Integrity { .. }), "{text}");
    assert!(
        text.contains("ram"),
        "error should name the component: {text}"
    );
    assert!(qemus_under(&sandboxes).is_empty(), "something was launched");
    assert!(dir_is_empty(&sandboxes));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    let _ = std::fs::remove_dir_all(&copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_reported_gone_and_cleaned_up() {
    let t = template().clone();
    let (rt, sandboxes) = runtime("killed");
    let mut exits = rt.exits();
    let s = rt
        .start(start("sbxk", SandboxSource::Template(t), "tok-k"))
        .await
        .unwrap();
    let pid = s.pid.expect("qemu pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), exits.recv())
        .await
        .expect("exit reported")
        .unwrap();
    assert_eq!(exit.sandbox_id.as_str(), "sbxk");
    assert!(!rt.is_running(&exit.sandbox_id));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    // The dead VM's run directory is removed in the background.
    for _ in 0..100 {
        if dir_is_empty(&sandboxes) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dir_is_empty(&sandboxes), "run dir of a dead VM left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_hit_skips_the_restore_and_still_configures_the_agent() {
    let t = template().clone();
    let (rt, sandboxes) = runtime("warm");
    rt.set_warm_pool(t.clone(), 1);
    assert!(rt.refill_once().await, "warm entry restored");
    assert_eq!(rt.capacity().warm, budget());
    let s = rt
        .start(start("sbxw", SandboxSource::Template(t.clone()), "tok-w"))
        .await
        .unwrap();
    assert!(s.from_warm_pool);
    assert_eq!(
        sh(&rt, "sbxw", "tok-w", "echo $FIRKIN_TEST_VAR").await.1,
        "sbxw"
    );
    assert_eq!(rt.capacity().warm, ResourceBudget::ZERO);
    rt.set_warm_pool(t, 0);
    rt.shutdown().await;
    assert!(qemus_under(&sandboxes).is_empty());
}

/// Host loopback ports forwarded to envd (guest port 49983) by QEMUs whose run directory is
/// under `dir`: every sandbox, warm-pool entry and restore in progress there.
fn envd_forwards_under(dir: &Path) -> Vec<u16> {
    let needle = dir.to_string_lossy().into_owned();
    let mut ports = Vec::new();
    for pid in qemus_under(dir) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(&needle) {
            continue;
        }
        for fwd in cmdline.split("hostfwd=tcp:127.0.0.1:").skip(1) {
            if let Some((port, rest)) = fwd.split_once("-:")
                && rest.starts_with("49983")
            {
                ports.push(port.parse().unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// Run inside a sandbox as `user`: for each port on the host's loopback (the guest's gateway
/// 10.0.2.2 under user-mode networking), the HTTP status of `/envs`, of an `/init` that tries
/// to set a token, and of a Connect process start that would leave a mark in /tmp.
const PROBE: &str = r#"
import json, struct, sys, urllib.request, urllib.error
def status(req):
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:
        return repr(e)
out = {}
for port in sys.argv[1:]:
    base = "http://10.0.2.2:%s" % port
    start = json.dumps({"process": {"cmd": "/bin/sh",
                                    "args": ["-c", "echo taken > /tmp/taken-over"]}}).encode()
    out[port] = [
        status(urllib.request.Request(base + "/envs")),
        status(urllib.request.Request(base + "/init", data=b'{"accessToken":"stolen"}',
                                      headers={"content-type": "application/json"})),
        status(urllib.request.Request(base + "/process.Process/Start",
                                      data=struct.pack(">BI", 0, len(start)) + start,
                                      headers={"content-type": "application/connect+json",
                                               "connect-protocol-version": "1"})),
    ]
print(json.dumps(out))
"#;

/// A guest that scans its gateway's ports finds no agent it can use: other sandboxes, a
/// warm-pool entry waiting for the next user and a restore that has not had its `/init` yet all
/// answer 401 to anything without their own token; the warm entry is still handed out clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_answers_another_guest_without_its_token() {
    let t = template().clone();
    let (rt, sandboxes) = runtime("gate");
    let (a, b) = tokio::join!(
        rt.start(start("sbxga", SandboxSource::Template(t.clone()), "tok-ga")),
        rt.start(start("sbxgb", SandboxSource::Template(t.clone()), "tok-gb")),
    );
    a.unwrap();
    b.unwrap();
    rt.set_warm_pool(t.clone(), 1);
    assert!(rt.refill_once().await, "warm entry restored");
    // A restore that has not been told anything yet: restored, its agent answering /health.
    let snapshot = firkin_vmm::Snapshot::load(t.descriptor.parent().unwrap()).unwrap();
    let pending = firkin_vmm::Vm::restore(
        &snapshot,
        firkin_vmm::RestoreRequest {
            run_dir: sandboxes.join("pending"),
            guest_ports: GUEST_PORTS.to_vec(),
            net: firkin_vmm::NetAttach::User,
            ready: Some(envd_ready(Duration::from_secs(60))),
        },
    )
    .await
    .unwrap();

    let ports = envd_forwards_under(&sandboxes);
    assert_eq!(
        ports.len(),
        4,
        "two sandboxes, a warm entry, a pending restore"
    );
    let script = format!(
        "cat > /tmp/probe.py <<'PY'\n{PROBE}\nPY\npython3 /tmp/probe.py {}",
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (code, out) = sh(&rt, "sbxga", "tok-ga", &script).await;
    assert_eq!(code, 0, "{out}");
    let seen: BTreeMap<String, Vec<serde_json::Value>> = serde_json::from_str(&out).unwrap();
    for port in &ports {
        assert_eq!(
            seen[&port.to_string()],
            vec![401, 401, 401],
            "port {port} answered a guest without its token: {seen:?}"
        );
    }

    // Nothing ran in the warm entry: the next create gets it, clean.
    let w = rt
        .start(start("sbxgw", SandboxSource::Template(t.clone()), "tok-gw"))
        .await
        .unwrap();
    assert!(w.from_warm_pool);
    assert_eq!(
        sh(&rt, "sbxgw", "tok-gw", "test -e /tmp/taken-over; echo $?")
            .await
            .1,
        "1"
    );
    assert_eq!(
        sh(&rt, "sbxgb", "tok-gb", "test -e /tmp/taken-over; echo $?")
            .await
            .1,
        "1"
    );
    pending.stop(Duration::from_secs(5)).await.unwrap();
    rt.set_warm_pool(t, 0);
    rt.shutdown().await;
    assert!(qemus_under(&sandboxes).is_empty(), "QEMU left running");
}

/// `cmd` in the sandbox as root; its stdout. It must succeed.
async fn root_sh(rt: &SandboxRuntime<QemuLauncher>, id: &str, token: &str, cmd: &str) -> String {
    let (code, out) = sh_as(rt, id, token, Some("root"), cmd).await;
    assert_eq!(code, 0, "{cmd:?} in {id} exited {code}: {out}");
    out
}

fn host_now_ns() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos()
}

/// The guest's wall clock, read between two readings of the host's, is the host's ±50 ms.
async fn assert_guest_clock_is_the_hosts(
    rt: &SandboxRuntime<QemuLauncher>,
    id: &str,
    token: &str,
    when: &str,
) {
    const SLACK_NS: i128 = 50_000_000;
    let before = host_now_ns();
    let guest: i128 = root_sh(rt, id, token, "date +%s%N").await.parse().unwrap();
    let after = host_now_ns();
    assert!(
        guest >= before - SLACK_NS && guest <= after + SLACK_NS,
        "{when}: guest clock {guest} outside host [{before}, {after}] ± 50 ms \
         (off by {} ms)",
        (guest - (before + after) / 2) / 1_000_000
    );
}

/// Guest time under the accelerator this host has: a restored sandbox shows the host's wall
/// clock, even though its template snapshot was taken earlier; so does a resumed one whose
/// snapshot's clock was three hours behind; monotonic time never goes back across pause and
/// resume; `sleep 1` takes a second; and the clock has sub-microsecond resolution (a TSC or
/// kvm-clock clocksource, not jiffies' 4 ms steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_time_is_the_hosts_and_fine_grained_across_restore_and_resume() {
    let (rt, sandboxes, id) = one_sandbox("time", "sbxt", "tok-t").await;
    assert_guest_clock_is_the_hosts(&rt, "sbxt", "tok-t", "after a restore").await;

    let source = root_sh(
        &rt,
        "sbxt",
        "tok-t",
        "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
    )
    .await;
    assert!(
        source == "tsc" || source == "kvm-clock",
        "clocksource {source}"
    );
    // The clock's steps. A jiffies clock moves in 4 ms steps, every step a multiple of them. A
    // TSC clock moves by whatever time passed: its steps between back-to-back reads are as
    // short as the reads themselves and are not multiples of any tick. The reads come from
    // `starmap`, which calls `perf_counter_ns` from C with no Python bytecode in between (a
    // Python loop under TCG takes longer than 1 µs per turn and would hide the clock's
    // resolution behind the interpreter's). Reports the smallest positive step, and how many
    // distinct values steps take modulo 1 µs (1 for a microsecond-resolution clock).
    let clock = root_sh(
        &rt,
        "sbxt",
        "tok-t",
        "python3 -c 'import time, itertools\nf=time.perf_counter_ns\n\
         t=list(itertools.starmap(f, itertools.repeat((), 50000)))\n\
         d=[b-a for a, b in zip(t, t[1:]) if b>a]\n\
         print(min(d), len(set(x%1000 for x in d)), time.clock_getres(time.CLOCK_MONOTONIC))'",
    )
    .await;
    let mut fields = clock.split_whitespace();
    let smallest: u64 = fields.next().unwrap().parse().unwrap();
    let residues: usize = fields.next().unwrap().parse().unwrap();
    let getres: f64 = fields.next().unwrap().parse().unwrap();
    eprintln!(
        "guest clock: smallest perf_counter_ns step {smallest} ns, {residues} residues mod 1 µs, clock_getres {getres}"
    );
    assert!(getres <= 1e-6, "clock_getres(CLOCK_MONOTONIC) = {getres} s");
    assert!(
        residues > 100,
        "perf_counter_ns steps take only {residues} values modulo 1 µs: a coarse clock"
    );
    assert!(smallest < 1_000, "perf_counter_ns steps by {smallest} ns");
    let slept: f64 = root_sh(
        &rt,
        "sbxt",
        "tok-t",
        "python3 -c 'import time\nt=time.monotonic()\ntime.sleep(1)\nprint(time.monotonic()-t)'",
    )
    .await
    .parse()
    .unwrap();
    assert!((0.95..=1.05).contains(&slept), "sleep 1 took {slept} s");
    // And the guest's clock runs at the host's rate: over 10 s of host time, the guest's
    // monotonic clock advances by the same amount ±5 %. Each guest reading is bracketed by two
    // host readings, so the guest's interval must lie within the brackets' spread.
    let mono = "python3 -c 'import time; print(time.clock_gettime_ns(time.CLOCK_MONOTONIC))'";
    let (b1, g1, a1) = (
        std::time::Instant::now(),
        root_sh(&rt, "sbxt", "tok-t", mono)
            .await
            .parse::<u64>()
            .unwrap(),
        std::time::Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (b2, g2, a2) = (
        std::time::Instant::now(),
        root_sh(&rt, "sbxt", "tok-t", mono)
            .await
            .parse::<u64>()
            .unwrap(),
        std::time::Instant::now(),
    );
    let guest = (g2 - g1) as f64 / 1e9;
    let (shortest, longest) = ((b2 - a1).as_secs_f64(), (a2 - b1).as_secs_f64());
    assert!(
        guest >= shortest * 0.95 && guest <= longest * 1.05,
        "the guest's clock advanced {guest:.3} s while the host's advanced {shortest:.3}-{longest:.3} s"
    );

    // A snapshot whose clock is hours off: set the guest three hours back, then pause.
    root_sh(
        &rt,
        "sbxt",
        "tok-t",
        "date -s @$(( $(date +%s) - 10800 )) >/dev/null",
    )
    .await;
    let mono_before: u128 = root_sh(&rt, "sbxt", "tok-t", mono).await.parse().unwrap();
    let snap_dir = run_root().join("time-snapshot");
    let paused = rt.pause(&id, &snap_dir).await.expect("pause");
    tokio::time::sleep(Duration::from_secs(2)).await;
    rt.start(start("sbxt", SandboxSource::Continuation(paused), "tok-t"))
        .await
        .expect("resume");
    assert_guest_clock_is_the_hosts(&rt, "sbxt", "tok-t", "after a resume").await;
    let mono_after: u128 = root_sh(&rt, "sbxt", "tok-t", mono).await.parse().unwrap();
    assert!(
        mono_after > mono_before,
        "monotonic clock went back across pause/resume: {mono_before} -> {mono_after}"
    );
    rt.kill(&id).await.unwrap();
    assert!(dir_is_empty(&sandboxes));
}
