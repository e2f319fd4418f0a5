//! A small client of the firkin REST API and of envd through the proxy, for the `template` and
//! `sandbox` commands.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the server is and how to authenticate, shared by the client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// Control-plane URL.
    #[arg(
        long,
        env = "E2B_API_URL",
        default_value = "http://127.0.0.1:3000",
        global = true
    )]
    pub api_url: String,

    /// Sandbox-plane URL (defaults to the control-plane URL: one listener serves both).
    #[arg(long, env = "E2B_SANDBOX_URL", global = true)]
    pub sandbox_url: Option<String>,

    /// API key [default: $E2B_API_KEY, else the key `firkin serve` saved in the state
    /// directory].
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,

    /// State directory, to find the saved API key.
    #[arg(long, env = "FIRKIN_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    api_url: String,
    sandbox_url: String,
    key: String,
}

impl Endpoint {
    pub fn connect(&self) -> Result<Api> {
        let key = match &self.api_key {
            Some(k) if !k.is_empty() => k.clone(),
            _ => {
                let state = match &self.state_dir {
                    Some(d) => d.clone(),
                    None => firkin_runtime::FirkinPaths::from_env()?
                        .state_dir()
                        .to_path_buf(),
                };
                firkin_server::auth::read_key_file(&state).ok_or_else(|| {
                    anyhow!(
                        "no API key: set E2B_API_KEY (or --api-key); `firkin serve` printed one \
                         at its first start and saved it in {}",
                        firkin_server::auth::key_file(&state).display()
                    )
                })?
            }
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let api_url = self.api_url.trim_end_matches('/').to_owned();
        Ok(Api {
            client: Client::builder(TokioExecutor::new()).build(connector),
            sandbox_url: self
                .sandbox_url
                .as_deref()
                .unwrap_or(&api_url)
                .trim_end_matches('/')
                .to_owned(),
            api_url,
            key,
        })
    }
}

impl Api {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes)> {
        let url = format!("{}{path}", self.api_url);
        let req = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header("x-api-key", &self.key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .with_context(|| format!("building {method} {url}"))?;
        let resp = self
            .client
            .request(req)
            .await
            .with_context(|| format!("{method} {url}: is `firkin serve` running there?"))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer of {method} {url}"))?
            .to_bytes();
        Ok((status, headers, bytes))
    }

    fn error_of(method: &Method, path: &str, status: StatusCode, bytes: &[u8]) -> anyhow::Error {
        let message = serde_json::from_slice::<Value>(bytes)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
        anyhow!("{method} {path}: {status}: {message}")
    }

    /// One page of a list, and the token of the next one.
    pub async fn list_page(&self, path: &str) -> Result<(Vec<Value>, Option<String>)> {
        let (status, headers, bytes) = self.send(Method::GET, path, None).await?;
        if !status.is_success() {
            return Err(Self::error_of(&Method::GET, path, status, &bytes));
        }
        let page = serde_json::from_slice(&bytes)
            .with_context(|| format!("GET {path}: unexpected answer"))?;
        let next = headers
            .get("x-next-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((page, next))
    }

    /// Sends a request and decodes a successful JSON answer; an error answer becomes an error
    /// carrying the server's message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, _, bytes) = self.send(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(Self::error_of(&method, path, status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{method} {path}: unexpected answer"))
    }

    /// Runs `/bin/bash -l -c CMD` in a sandbox through the proxy, streaming its output to ours.
    /// Returns the exit code.
    pub async fn exec(
        &self,
        sandbox_id: &str,
        cmd: &str,
        envs: &[(String, String)],
    ) -> Result<i32> {
        use std::io::Write;
        let info: Value = self
            .call(
                Method::GET,
                &format!("/sandboxes/{sandbox_id}"),
                None::<&()>,
            )
            .await?;
        let token = info["envdAccessToken"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let envs: serde_json::Map<String, Value> = envs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let payload = serde_json::to_vec(&serde_json::json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": envs},
            "stdin": false,
        }))?;
        let mut body = vec![0u8];
        body.extend_from_slice(&u32::try_from(payload.len())?.to_be_bytes());
        body.extend_from_slice(&payload);
        let url = format!("{}/process.Process/Start", self.sandbox_url);
        let req = Request::post(&url)
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .header("e2b-sandbox-id", sandbox_id)
            .header("e2b-sandbox-port", "49983")
            .header("x-access-token", token)
            .body(Full::new(Bytes::from(body)))?;
        let resp = self
            .client
            .request(req)
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let mut stream = resp.into_body();
        if !status.is_success() {
            let bytes = stream.collect().await?.to_bytes();
            bail!(
                "starting the command: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut buf: Vec<u8> = Vec::new();
        let mut exit = None;
        while let Some(frame) = stream.frame().await {
            let frame = frame.context("reading the command's output")?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                let flags = buf[0];
                let msg: Value = serde_json::from_slice(&buf[5..5 + len])
                    .context("the agent sent a malformed message")?;
                buf.drain(..5 + len);
                if flags & 2 != 0 {
                    if let Some(err) = msg.get("error") {
                        bail!("the agent reported: {err}");
                    }
                    continue;
                }
                let ev = &msg["event"];
                if let Some(out) = ev["data"]["stdout"].as_str() {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&b64.decode(out)?)?;
                    o.flush()?;
                }
                if let Some(err) = ev["data"]["stderr"].as_str() {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&b64.decode(err)?)?;
                    e.flush()?;
                }
                if ev["end"].is_object() {
                    exit = Some(ev["end"]["exitCode"].as_i64().unwrap_or(0));
                }
            }
        }
        let code =
            exit.ok_or_else(|| anyhow!("the command's stream ended without an exit status"))?;
        Ok(i32::try_from(code).unwrap_or(1))
    }
}
