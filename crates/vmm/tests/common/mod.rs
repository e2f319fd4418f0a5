//! Shared fixture for the VM tests: real kernel, real firkin-init, a tiny busybox root disk
//! and a throwaway guest agent (busybox httpd with a CGI that runs POSTed shell), so these
//! tests exercise the VMM independently of envd's progress.
//!
//! The assets come from `scripts/setup-guest.sh`; when they are missing the tests fail and say
//! so (they never skip).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use firkin_guest::{ImageOptions, InitramfsSpec, KernelAssets};
use firkin_vmm::{Accel, BootRequest, MachineConfig, ReadyCheck, Snapshot, Vm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SETUP: &str = "scripts/setup-guest.sh (as root; it installs QEMU, busybox-static and \
                         e2fsprogs, builds the static guest binaries and fetches the kernel)";

pub fn cache_dir() -> PathBuf {
    std::env::var_os("FIRKIN_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".firkin/cache")
        })
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn guest_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("x86_64-unknown-linux-gnu/guest").join(name)
}

fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} is missing at {}; run {SETUP}",
        path.display()
    );
}

pub fn tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "firkin_vmm=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The test agent, run as `/run/firkin/firkin-envd --guest` (PID 1 after switch_root).
const AGENT: &str = r#"#!/bin/sh
# Throwaway firkin test agent: /health and /cgi-bin/sh (runs the POSTed script).
trap 'sync; poweroff -f' TERM
mkdir -p /run/www/cgi-bin
: > /run/www/health
cat > /run/www/cgi-bin/sh <<'EOS'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
head -c "$CONTENT_LENGTH" > /tmp/.cgi.$$
sh /tmp/.cgi.$$ 2>&1
rm -f /tmp/.cgi.$$
EOS
chmod +x /run/www/cgi-bin/sh
httpd -p 49983 -h /run/www
echo "agent: ready"
while :; do wait; sleep 1; done
"#;

const APPLETS: &[&str] = &[
    "sh", "httpd", "head", "rm", "mkdir", "cat", "sleep", "echo", "ls", "poweroff", "sync",
    "setsid", "ps", "printf", "chmod", "kill", "test", "[", "ip", "mount", "uname", "pidof", "tr",
];

/// The guest port both the test agent and the real firkin-envd listen on.
pub const AGENT_PORT: u16 = 49983;

/// One `GET /health` of the agent behind `addr`; `true` on a 2xx answer. A refused or reset
/// connection is normal while the guest starts.
pub async fn health(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.") && head[9] == b'2')
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

/// Ready when the agent answers `/health`.
pub fn agent_ready(timeout: Duration) -> ReadyCheck {
    ReadyCheck::new(AGENT_PORT, timeout, health)
}

/// The host address forwarded to the agent.
pub fn agent(vm: &Vm) -> SocketAddr {
    vm.forward(AGENT_PORT).expect("the agent port is forwarded")
}

pub struct Fixture {
    pub dir: PathBuf,
    pub kernel: KernelAssets,
    pub initramfs: PathBuf,
    pub disk_template: PathBuf,
}

/// Kernel + initramfs + a pristine tiny root disk, built once per test binary.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        tracing();
        let cache = cache_dir();
        let kernel = KernelAssets::load(&cache.join("kernel"))
            .unwrap_or_else(|e| panic!("guest kernel not found ({e}); run {SETUP}"));
        let init = guest_bin("firkin-init");
        require(&init, "static firkin-init");
        require(Path::new("/bin/busybox"), "busybox-static (/bin/busybox)");
        require(
            Path::new("/usr/bin/qemu-system-x86_64"),
            "qemu-system-x86_64",
        );

        let runs = cache.join("test-runs");
        // Left-overs of earlier, killed test runs.
        if let Ok(rd) = std::fs::read_dir(&runs) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = runs.join(format!("vmm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let agent = dir.join("agent.sh");
        std::fs::write(&agent, AGENT).unwrap();
        let initramfs = dir.join("initramfs.cpio");
        firkin_guest::write_initramfs(
            &InitramfsSpec {
                init,
                envd: agent,
                modules: kernel.modules.clone(),
            },
            &initramfs,
        )
        .unwrap();

        let tree = dir.join("tree");
        for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "run"] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(a)).unwrap();
        }
        let disk_template = dir.join("tiny.img");
        firkin_guest::dir_to_ext4(
            &tree,
            &disk_template,
            &ImageOptions {
                headroom_mib: 32,
                min_mib: 64,
                ..ImageOptions::default()
            },
            &mut |_| {},
        )
        .unwrap();
        Fixture {
            dir,
            kernel,
            initramfs,
            disk_template,
        }
    })
}

pub fn machine(f: &Fixture) -> MachineConfig {
    let mut m = MachineConfig::new(Accel::Tcg, f.kernel.vmlinuz.clone(), f.initramfs.clone());
    m.memory_mib = 256;
    m
}

/// Boot request for a fresh copy of the tiny disk under `name`.
pub fn boot_request(f: &Fixture, name: &str) -> BootRequest {
    let base = f.dir.join(name);
    std::fs::create_dir_all(&base).unwrap();
    let disk = base.join("disk.img");
    std::fs::copy(&f.disk_template, &disk).unwrap();
    BootRequest {
        machine: machine(f),
        run_dir: base.join("run"),
        ram_path: base.join("ram.img"),
        disk,
        guest_ports: vec![AGENT_PORT],
        net: firkin_vmm::NetAttach::User,
        ready: Some(agent_ready(Duration::from_secs(180))),
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A template snapshot of the tiny guest, taken once per test binary.
pub fn template() -> &'static Snapshot {
    static T: OnceLock<Snapshot> = OnceLock::new();
    T.get_or_init(|| {
        let f = fixture();
        let rt = runtime();
        rt.block_on(async {
            let req = boot_request(f, "template");
            let out = f.dir.join("template/snapshot");
            let vm = Vm::cold_boot(req).await.expect("template cold boot");
            vm.snapshot_template(&out).await.expect("template snapshot")
        })
    })
}

/// Runs a shell script in the guest through the test agent; returns its output.
pub fn sh(addr: SocketAddr, script: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /cgi-bin/sh HTTP/1.0\r\nContent-Length: {}\r\n\r\n{script}",
        script.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "agent answered {head:?}"
    );
    body.to_string()
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes (its parent just has not reaped it yet).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub async fn wait_pid_gone(pid: u32, timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if !pid_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !pid_alive(pid)
}
