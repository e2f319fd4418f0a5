use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Once;

use base64::Engine;
use bytes::Bytes;
use firkin_envd::client::{Client, EnvelopeStream, full};
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};

/// A running agent, killed when dropped.
pub struct Agent {
    child: Child,
    pub url: String,
    /// Carries the token when the agent has one.
    pub client: Client,
    /// Never carries a token.
    pub anon: Client,
}

pub const TOKEN: &str = "test-token-0123456789";

impl Agent {
    /// Starts an agent without a token.
    pub fn start() -> Agent {
        Agent::start_with(&[])
    }

    /// Starts an agent without a token, with `extra` command-line arguments.
    pub fn start_with(extra: &[&str]) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_firkin-envd"))
            .args(["--listen", "127.0.0.1:0", "--log", "warn"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn firkin-envd");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let anon = Client::new(&url).unwrap();
        Agent {
            child,
            client: anon.clone(),
            anon,
            url,
        }
    }

    /// Starts an agent and sets [`TOKEN`] through `/init`.
    pub async fn with_token() -> Agent {
        let mut a = Agent::start();
        a.anon
            .init(&json!({"accessToken": TOKEN, "envVars": {"SANDBOX_VAR": "from-init"}}))
            .await
            .unwrap();
        a.client = a.anon.clone().with_token(TOKEN);
        a
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// CI runs as root on a throwaway machine; tests of user switching create `user` there.
pub fn ensure_user() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let exists = std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("user:"));
        if !exists {
            let st = Command::new("useradd")
                .args(["-m", "-s", "/bin/bash", "user"])
                .status()
                .unwrap();
            assert!(st.success(), "useradd failed");
        }
    });
}

/// For tests that switch users: `None` (and a note) unless this runs as root; otherwise
/// makes sure `user` exists and starts an agent with [`TOKEN`].
pub async fn root_agent() -> Option<Agent> {
    if !is_root() {
        eprintln!("skipped: needs root to switch users");
        return None;
    }
    ensure_user();
    Some(Agent::with_token().await)
}

pub fn basic(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or(""))
        .unwrap()
}

/// A fresh directory under /tmp, removed on drop.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("firkin-envd-test-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// Sends a request that must get an answer.
pub async fn send(
    c: &Client,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    c.fetch(method, path, headers, full(body)).await.unwrap()
}

/// `GET path` without a body.
pub async fn get(c: &Client, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(c, Method::GET, path, &[], Bytes::new()).await
}

/// `POST path` of raw bytes, as the SDK uploads a file.
pub async fn upload(
    c: &Client,
    path: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    let headers = [("content-type", "application/octet-stream")];
    send(c, Method::POST, path, &headers, body).await
}

/// A unary Connect call (`service/Method`) that must get an answer.
pub async fn rpc(
    c: &Client,
    method: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    c.unary(method, body, headers).await.unwrap()
}

/// Asserts that a Connect call answered `status` with the Connect error `code`.
#[track_caller]
pub fn assert_rpc_error(status: StatusCode, v: &Value, want: StatusCode, code: &str) {
    assert_eq!((status, v["code"].as_str()), (want, Some(code)), "{v}");
}

/// Opens a server-streaming Connect call that must open.
pub async fn open_stream(
    c: &Client,
    method: &str,
    msg: &Value,
    headers: &[(&str, &str)],
) -> EnvelopeStream {
    c.server_stream(method, msg, headers).await.unwrap()
}
