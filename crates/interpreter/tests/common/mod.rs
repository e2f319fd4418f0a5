//! The real service binary with real kernels, driven over HTTP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Debian's interpreter carries `python3-ipykernel`; a pyenv/venv `python3` first on PATH may not.
pub fn python() -> String {
    std::env::var("FIRKIN_TEST_PYTHON").unwrap_or_else(|_| {
        if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3".into()
        } else {
            "python3".into()
        }
    })
}

/// Whether `deno` is on PATH (JavaScript tests run only then).
pub fn have_deno() -> bool {
    Command::new("deno")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running `firkin-interpreter` on 127.0.0.1:0; SIGTERM on drop (which kills its kernels).
pub struct Service {
    child: Child,
    pub base: String,
    pub cwd: tempfile::TempDir,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Service {
    pub fn start(default_languages: &str) -> Self {
        Self::start_with(default_languages, &[])
    }

    /// With extra command-line flags for the service.
    pub fn start_with(default_languages: &str, extra: &[&str]) -> Self {
        Self::spawn(default_languages, extra, true)
    }

    /// With the service's own Python kernel command (what a sandbox runs), not the suite's
    /// `--kernel python=…`; `python3` is looked up first where [`python`] lives.
    pub fn start_builtin_python(default_languages: &str) -> Self {
        Self::spawn(default_languages, &[], false)
    }

    fn spawn(default_languages: &str, extra: &[&str], python_override: bool) -> Self {
        let cwd = tempfile::tempdir().unwrap();
        let runtime: PathBuf = cwd.path().join(".runtime");
        // FIRKIN_INTERPRETER_BIN runs the suite against another build (the static guest one).
        let bin = std::env::var_os("FIRKIN_INTERPRETER_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_firkin-interpreter")),
            PathBuf::from,
        );
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--cwd"])
            .arg(cwd.path())
            .arg("--runtime-dir")
            .arg(&runtime)
            .args(if python_override {
                vec![
                    "--kernel".to_owned(),
                    format!(
                        "python={} -m ipykernel_launcher -f {{connection_file}}",
                        python()
                    ),
                ]
            } else {
                Vec::new()
            })
            .env("PATH", {
                let python = PathBuf::from(python());
                let dir = python.parent().filter(|d| !d.as_os_str().is_empty());
                let path = std::env::var("PATH").unwrap_or_default();
                dir.map_or(path.clone(), |d| format!("{}:{path}", d.display()))
            })
            .args(["--default-languages", default_languages])
            // The host's /run is no sandbox's: only tests that name a state file read one.
            .args(if extra.contains(&"--sandbox-state") {
                &[][..]
            } else {
                &["--sandbox-state", "none"][..]
            })
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        Self {
            child,
            base: format!("http://{addr}"),
            cwd,
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    /// `POST /execute`, every line with its arrival time. Panics on a blank or non-JSON line.
    pub async fn execute(&self, body: Value) -> Execution {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/execute", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let started = Instant::now();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let bytes = body.collect().await.unwrap().to_bytes();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Execution {
                status,
                lines: vec![(started.elapsed(), value)],
            };
        }
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = &line[..line.len() - 1];
                assert!(!line.is_empty(), "blank line in the stream");
                let value: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                    panic!("not JSON: {:?}: {e}", String::from_utf8_lossy(line))
                });
                lines.push((started.elapsed(), value));
            }
        }
        assert!(
            buf.is_empty(),
            "unterminated last line {:?}",
            String::from_utf8_lossy(&buf)
        );
        Execution { status, lines }
    }

    /// Runs `code` in a context (or the default Python one).
    pub async fn run(&self, code: &str, context_id: Option<&str>) -> Execution {
        self.execute(
            json!({"code": code, "context_id": context_id, "language": null, "env_vars": null}),
        )
        .await
    }

    pub async fn create_context(&self, language: &str) -> String {
        let (status, body) = self
            .request(
                Method::POST,
                "/contexts",
                Some(json!({"language": language})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `/execute` response.
#[derive(Debug)]
pub struct Execution {
    pub status: StatusCode,
    /// The NDJSON lines; for a status other than 200, the one JSON error body.
    pub lines: Vec<(Duration, Value)>,
}

impl Execution {
    pub fn of_type(&self, ty: &str) -> Vec<&Value> {
        self.lines
            .iter()
            .map(|(_, v)| v)
            .filter(|v| v["type"] == ty)
            .collect()
    }

    /// The `text` of the main result, as the SDK's `Execution.text`.
    pub fn text(&self) -> Option<String> {
        self.of_type("result")
            .into_iter()
            .find(|r| r["is_main_result"] == true)
            .and_then(|r| r["text"].as_str().map(str::to_owned))
    }

    pub fn stdout(&self) -> String {
        self.of_type("stdout")
            .iter()
            .filter_map(|l| l["text"].as_str())
            .collect()
    }

    pub fn error(&self) -> Option<&Value> {
        let errors = self.of_type("error");
        assert!(errors.len() <= 1, "more than one error line: {errors:?}");
        errors.first().copied()
    }

    /// Asserts a well-formed end: the last line is `end_of_execution`.
    pub fn assert_ended(&self) {
        assert_eq!(self.status, StatusCode::OK);
        let last = self.lines.last().map(|(_, v)| v["type"].clone());
        assert_eq!(last, Some(json!("end_of_execution")), "{:?}", self.lines);
    }
}
