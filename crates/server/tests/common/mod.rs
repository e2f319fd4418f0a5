//! A real `firkin serve` in the test process: real SQLite in a temp directory, real HTTP over
//! loopback, and sandboxes from either backend: real `firkin-envd` agents as host processes
//! (fast, for the control-plane logic) or real QEMU microVMs restored from the `base` template
//! in the shared cache (the `vm_*` tests).
//!
//! The VM tests need the guest assets (`scripts/setup-guest.sh`); a missing asset fails them
//! with that instruction, nothing is skipped. They adopt a finished `base` build from the shared
//! cache (`$FIRKIN_CACHE_DIR`, else `~/.firkin/cache`) and build it there when there is none.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use firkin_admission::{QueuePolicy, ResourceBudget};
use firkin_artifacts::DigestCache;
use firkin_runtime::{FirkinPaths, RuntimeConfig, SandboxRuntime};
use firkin_server::process::{ProcessLauncher, ProcessTemplateBuilder};
use firkin_server::qemu::QemuTemplateBuilder;
use firkin_server::types::BuildTemplateRequest;
use firkin_server::{EnsureTemplate, Server, ServerConfig, TemplateBuilder};
use firkin_types::Size;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const KEY: &str = "e2b_test_key_0123456789abcdef0123456789";

/// The host-mode agent binary built by `cargo build -p firkin-envd` (or `cargo test
/// --workspace`), or `FIRKIN_ENVD_BIN`.
pub fn envd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FIRKIN_ENVD_BIN") {
        return PathBuf::from(p);
    }
    // target/debug/deps/<test binary> -> target/debug/firkin-envd
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("firkin-envd");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p firkin-envd` (or set FIRKIN_ENVD_BIN)",
        bin.display()
    );
    bin
}

/// What runs the sandboxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `firkin-envd` as a host process per sandbox.
    Process,
    /// A QEMU microVM per sandbox, restored from the sealed `base` template.
    Qemu,
}

pub const SETUP: &str = "scripts/setup-guest.sh (it installs QEMU and mmdebstrap, builds the \
                         static guest binaries and fetches the guest kernel)";

/// The cache the VM tests share with `firkin serve` and the SDK suite: templates built once
/// are adopted by every later server.
pub fn shared_cache_dir() -> PathBuf {
    firkin_runtime::FirkinPaths::from_env()
        .expect("set HOME or FIRKIN_CACHE_DIR")
        .cache_dir()
        .to_path_buf()
}

/// One digest cache for every VM server of this test binary: each test has a fresh state
/// directory, and a fresh persistent cache would re-hash the 2.5 GiB template every time.
fn vm_digest_cache() -> Arc<DigestCache> {
    static CACHE: std::sync::OnceLock<Arc<DigestCache>> = std::sync::OnceLock::new();
    Arc::clone(CACHE.get_or_init(|| Arc::new(DigestCache::in_memory())))
}

pub fn tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,firkin_server=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub struct Options {
    pub backend: Backend,
    /// For the process backend: a guest fingerprint its template builder reports, as a QEMU
    /// builder does for its guest binaries.
    pub guest_fingerprint: Option<String>,
    pub slots: u32,
    pub max_pending: usize,
    pub queue_wait: Duration,
    pub warm: usize,
    pub body_limit: usize,
    pub build_base: bool,
    /// For the process backend: the agent binary, instead of [`envd_bin`].
    pub envd_bin: Option<PathBuf>,
    /// `ServerConfig::egress_control`. On the process backend `true` is a misconfiguration the
    /// server must survive: egress requests pass the server's checks and reach a runtime that
    /// refuses them.
    pub egress_control: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: Backend::Process,
            guest_fingerprint: None,
            slots: 16,
            max_pending: 8,
            queue_wait: Duration::from_secs(10),
            warm: 0,
            body_limit: 1024 * 1024,
            build_base: true,
            envd_bin: None,
            egress_control: false,
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: PathBuf,
    pub cache: PathBuf,
    dirs: Option<(tempfile::TempDir, tempfile::TempDir)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub fn paths_in(state: &Path, cache: &Path) -> FirkinPaths {
    FirkinPaths::new(state, cache)
}

impl Options {
    /// The defaults, on real VMs.
    pub fn vm() -> Self {
        Self {
            backend: Backend::Qemu,
            // A restore under TCG on a busy 2-core host can take seconds.
            queue_wait: Duration::from_secs(60),
            ..Self::default()
        }
    }

    pub fn on(backend: Backend) -> Self {
        match backend {
            Backend::Process => Self::default(),
            Backend::Qemu => Self::vm(),
        }
    }
}

/// Opens a server on `state`. `cache` is used by the process backend; VM servers use the
/// shared cache so that they find the guest assets and the built template.
pub fn open_server(state: &Path, cache: &Path, opts: &Options) -> Server {
    let cache = match opts.backend {
        Backend::Process => cache.to_path_buf(),
        Backend::Qemu => shared_cache_dir(),
    };
    let paths = paths_in(state, &cache);
    let budget_unit = firkin_server::DEFAULT_TEMPLATE_BUDGET;
    let capacity = ResourceBudget::new(
        budget_unit.cpus * opts.slots,
        Size::mib(budget_unit.memory.as_mib() * u64::from(opts.slots)),
        Size::mib(budget_unit.disk.as_mib() * u64::from(opts.slots)),
    );
    let mut rc = RuntimeConfig::new(capacity);
    rc.queue = QueuePolicy {
        max_pending: opts.max_pending,
    };
    rc.queue_wait = opts.queue_wait;
    // The temp directories live on whatever disk the machine has; the floors are tested in
    // the runtime.
    rc.restore_disk_floor = Size::ZERO;
    rc.warm_pool_disk_floor = Size::ZERO;
    let mut config = ServerConfig::new(paths.clone());
    config.body_limit = opts.body_limit;
    config.warm_pools = [("base".to_owned(), opts.warm)].into_iter().collect();
    config.tick = Duration::from_millis(100);
    config.egress_control = opts.egress_control;
    match opts.backend {
        Backend::Process => {
            let envd = opts.envd_bin.clone().unwrap_or_else(envd_bin);
            let launcher = ProcessLauncher::new(envd, paths.sandboxes_dir());
            let runtime = SandboxRuntime::new(
                launcher,
                rc,
                Arc::new(DigestCache::persistent(paths.digest_cache())),
            );
            let builder: Arc<dyn TemplateBuilder> = match &opts.guest_fingerprint {
                None => Arc::new(ProcessTemplateBuilder),
                Some(f) => Arc::new(Fingerprinted(f.clone())),
            };
            Server::open(config, runtime, builder).unwrap()
        }
        Backend::Qemu => {
            tracing();
            let assets = firkin_runtime::qemu::GuestAssets::locate(&paths)
                .unwrap_or_else(|e| panic!("{e} (run {SETUP})"));
            let cache = vm_digest_cache();
            let launcher =
                firkin_runtime::qemu::QemuLauncher::new(paths.sandboxes_dir(), Arc::clone(&cache))
                    .with_health_timeout(Duration::from_secs(60));
            let builder: Arc<dyn TemplateBuilder> = Arc::new(
                QemuTemplateBuilder::new(
                    assets,
                    firkin_runtime::qemu::detect_accel(),
                    Arc::clone(&cache),
                )
                .with_rootfs_cache(paths.rootfs_cache_dir()),
            );
            Server::open(config, SandboxRuntime::new(launcher, rc, cache), builder).unwrap()
        }
    }
}

/// The process builder, claiming to put the guest binaries `.0` into its templates.
struct Fingerprinted(String);

#[async_trait::async_trait]
impl TemplateBuilder for Fingerprinted {
    async fn build(
        &self,
        request: &firkin_server::TemplateBuildRequest,
        progress: &firkin_server::BuildProgress,
    ) -> Result<firkin_runtime::TemplateSnapshot, firkin_server::TemplateBuildError> {
        ProcessTemplateBuilder.build(request, progress).await
    }

    fn guest_fingerprint(&self) -> Option<String> {
        Some(self.0.clone())
    }
}

/// Makes `base` ready: adopted from the cache, or built (minutes under TCG). Serialised within
/// the test binary so that parallel VM tests on a clean machine build it once, not once each.
pub async fn ensure_base(server: &Server) {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let r = server
        .ensure_template(BuildTemplateRequest {
            template_id: "base".into(),
            ..BuildTemplateRequest::default()
        })
        .unwrap();
    if let EnsureTemplate::Building { progress, build_id } = r {
        eprintln!("building template base (build {build_id}); this takes minutes under TCG");
        progress
            .wait()
            .await
            .unwrap_or_else(|e| panic!("building base failed: {e} (run {SETUP}?)"));
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

impl TestServer {
    pub async fn start(opts: Options) -> Self {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        Self::start_in(dirs, opts).await
    }

    /// Starts on existing directories (a restart).
    pub async fn start_in(dirs: (tempfile::TempDir, tempfile::TempDir), opts: Options) -> Self {
        let server = open_server(dirs.0.path(), dirs.1.path(), &opts);
        Self::serve(server, dirs, opts).await
    }

    pub async fn serve(
        server: Server,
        dirs: (tempfile::TempDir, tempfile::TempDir),
        opts: Options,
    ) -> Self {
        let state = &dirs.0;
        let cache = server.config().paths.cache_dir().to_path_buf();
        server.add_api_key("test", KEY).unwrap();
        if opts.build_base {
            ensure_base(&server).await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        let mut me = Self {
            addr,
            state: state.path().to_path_buf(),
            cache,
            dirs: None,
            shutdown: Some(tx),
            task: Some(task),
            client: client(),
        };
        me.dirs = Some(dirs);
        me
    }

    /// Simulates a crash of the server: its task is dropped mid-flight, with no graceful
    /// shutdown (sandbox processes are left running, as if PDEATHSIG had not fired). Returns
    /// the directories for a restart.
    pub async fn crash(mut self) -> (tempfile::TempDir, tempfile::TempDir) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.shutdown.take();
        self.dirs.take().unwrap()
    }

    /// Stops serving (kills every running sandbox); the directories stay until drop.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut b = Request::builder().method(method).uri(self.url(path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .client
            .request(b.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A control-plane call with the API key.
    pub async fn api(&self, method: Method, path: &str, body: &str) -> Reply {
        self.call(
            method,
            path,
            &[("x-api-key", KEY), ("content-type", "application/json")],
            body.to_owned(),
        )
        .await
    }

    pub async fn create(&self, body: &str) -> Value {
        let r = self.api(Method::POST, "/v2/sandboxes", body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        r.json()
    }

    /// A sandbox-plane call through the proxy (header routing, like the SDK with
    /// `E2B_SANDBOX_URL`).
    /// Waits up to `limit` for the expiry loop to have killed (`None`) or paused
    /// (`Some("paused")`) sandbox `id`.
    pub async fn await_sandbox(&self, id: &str, state: Option<&str>, limit: Duration) {
        let what = format!("sandbox {id} to be {}", state.unwrap_or("gone"));
        eventually(&what, limit, async || {
            let r = self.api(Method::GET, &format!("/sandboxes/{id}"), "").await;
            match state {
                None => r.status == StatusCode::NOT_FOUND,
                Some(want) => r.status == StatusCode::OK && r.json()["state"] == want,
            }
        })
        .await;
    }

    pub async fn envd(
        &self,
        sandbox: &Value,
        method: Method,
        path: &str,
        extra: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let id = sandbox["sandboxID"].as_str().unwrap().to_owned();
        let token = sandbox["envdAccessToken"].as_str().unwrap().to_owned();
        let mut headers: Vec<(&str, &str)> = vec![
            ("e2b-sandbox-id", &id),
            ("e2b-sandbox-port", "49983"),
            ("x-access-token", &token),
        ];
        headers.extend_from_slice(extra);
        self.call(method, path, &headers, body).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// Asserts an E2B error body: JSON with integer `code` equal to the status and a message.
    pub fn assert_error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap()),
            Some("application/json")
        );
        let v = self.json();
        assert_eq!(v["code"].as_u64(), Some(u64::from(status.as_u16())), "{v}");
        v["message"].as_str().expect("message").to_owned()
    }
}

/// One Connect envelope.
pub fn envelope(flags: u8, json: &Value) -> Vec<u8> {
    let payload = serde_json::to_vec(json).unwrap();
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Splits complete envelopes off the front of `buf`.
pub fn take_envelopes(buf: &mut Vec<u8>) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        let flags = buf[0];
        let v: Value = serde_json::from_slice(&buf[5..5 + len]).unwrap();
        buf.drain(..5 + len);
        out.push((flags, v));
    }
    out
}

/// Polls until `f` is true or the deadline passes.
pub async fn eventually(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pids of processes whose command line mentions `dir`.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    firkin_server::procfs::processes_referencing(dir)
}

/// A process's command line, NULs turned into spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// The sandbox processes of a server: agents (process backend) or QEMUs (VM backend), checked
/// to be what the backend runs so that a VM test cannot pass on something else.
pub fn sandbox_processes(s: &TestServer, backend: Backend) -> Vec<u32> {
    let pids = processes_under(&s.state.join("sandboxes"));
    for &pid in &pids {
        let cmd = cmdline(pid);
        match backend {
            Backend::Qemu => assert!(cmd.contains("qemu-system"), "not a VM: {cmd}"),
            Backend::Process => assert!(cmd.contains("firkin-envd"), "not an agent: {cmd}"),
        }
    }
    pids
}
