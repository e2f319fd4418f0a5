//! A keep-alive HTTP/1.1 client for the two planes the benchmark drives: the E2B REST control
//! plane and envd behind the sandbox-plane proxy. It sends what the Python SDK sends, so the
//! numbers measure the server, not a different client.

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Buf, Bytes};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{method} {url}: {reason}")]
    Transport {
        method: Method,
        url: String,
        reason: String,
    },
    #[error("{method} {url} answered {status}: {body}")]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{url}: unexpected response: {reason}")]
    Protocol { url: String, reason: String },
}

/// A created sandbox as the create response describes it.
#[derive(Clone, Debug, Deserialize)]
pub struct Created {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "envdAccessToken", default)]
    pub envd_access_token: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    /// Control plane base URL, no trailing slash.
    api_url: String,
    /// Sandbox plane base URL (`E2B_SANDBOX_URL`), no trailing slash.
    sandbox_url: String,
    api_key: String,
}

/// Where to send envd calls: through the proxy (with routing headers) or straight to an agent.
#[derive(Clone, Debug)]
pub struct EnvdTarget {
    pub base_url: String,
    pub sandbox_id: Option<String>,
    pub access_token: Option<String>,
    /// Run commands as this user (E2B's `user=`), else the agent's default user.
    pub user: Option<String>,
}

impl Api {
    pub fn new(api_url: &str, sandbox_url: &str, api_key: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            client,
            api_url: api_url.trim_end_matches('/').to_owned(),
            sandbox_url: sandbox_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
        }
    }

    /// Sends one request and reads the whole answer, timed from just before the request to the
    /// last byte of the body, so every caller measures the same span.
    async fn send(
        &self,
        method: Method,
        url: String,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Reply, ClientError> {
        let transport = |e: &dyn std::fmt::Display| ClientError::Transport {
            method: method.clone(),
            url: url.clone(),
            reason: e.to_string(),
        };
        let mut req = Request::builder().method(method.clone()).uri(&url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(body)).map_err(|e| transport(&e))?;
        let started = Instant::now();
        let resp = self.client.request(req).await.map_err(|e| transport(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(&e))?
            .to_bytes();
        let elapsed = started.elapsed();
        Ok(Reply {
            method,
            url,
            status,
            body,
            elapsed,
        })
    }

    fn cp_headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("X-API-KEY", self.api_key.clone()),
            ("Content-Type", "application/json".into()),
        ]
    }

    /// `POST /v2/sandboxes`, timed from just before the request to the full 201 body.
    pub async fn create(&self, template: &str) -> Result<(Created, Duration), ClientError> {
        let url = format!("{}/v2/sandboxes", self.api_url);
        let body = serde_json::json!({"templateID": template, "metadata": {}, "envVars": {}});
        let reply = self
            .send(
                Method::POST,
                url,
                &self.cp_headers(),
                Bytes::from(body.to_string()),
            )
            .await?
            .expect(&[StatusCode::CREATED])?;
        Ok((reply.json()?, reply.elapsed))
    }

    pub async fn kill(&self, sandbox_id: &str) -> Result<(), ClientError> {
        let url = format!("{}/sandboxes/{sandbox_id}", self.api_url);
        self.send(Method::DELETE, url, &self.cp_headers(), Bytes::new())
            .await?
            .expect(&[StatusCode::NO_CONTENT, StatusCode::NOT_FOUND])?;
        Ok(())
    }

    /// `GET /firkin/v1/status`, as JSON.
    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}/firkin/v1/status", self.api_url);
        self.send(Method::GET, url, &self.cp_headers(), Bytes::new())
            .await?
            .expect(&[StatusCode::OK])?
            .json()
    }

    /// The sandbox-plane target of a created sandbox.
    pub fn envd(&self, created: &Created) -> EnvdTarget {
        EnvdTarget {
            base_url: self.sandbox_url.clone(),
            sandbox_id: Some(created.sandbox_id.clone()),
            access_token: created.envd_access_token.clone(),
            user: None,
        }
    }

    fn envd_headers(t: &EnvdTarget, content_type: &str) -> Vec<(&'static str, String)> {
        Self::port_headers(t, ENVD_PORT, content_type)
    }

    /// Headers for a request to `port` of the target's sandbox (envd's token included, as the
    /// SDKs send it to the code interpreter too).
    fn port_headers(t: &EnvdTarget, port: u16, content_type: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![("Content-Type", content_type.to_owned())];
        if let Some(id) = &t.sandbox_id {
            h.push(("E2b-Sandbox-Id", id.clone()));
            h.push(("E2b-Sandbox-Port", port.to_string()));
        }
        if let Some(tok) = &t.access_token {
            h.push(("X-Access-Token", tok.clone()));
        }
        if let Some(user) = &t.user {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            h.push(("Authorization", format!("Basic {basic}")));
        }
        h
    }

    /// What `sandbox.commands.run(cmd)` does: `Process.Start` with `/bin/bash -l -c cmd`,
    /// reading the stream to its end. Returns the exit code and the elapsed time.
    pub async fn run(&self, t: &EnvdTarget, cmd: &str) -> Result<(i32, Duration), ClientError> {
        let url = format!("{}/process.Process/Start", t.base_url);
        let msg = serde_json::json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]},
            "stdin": false,
        })
        .to_string();
        let mut frame = Vec::with_capacity(msg.len() + 5);
        frame.push(0u8);
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(msg.as_bytes());
        let mut headers = Self::envd_headers(t, "application/connect+json");
        headers.push(("Connect-Protocol-Version", "1".into()));
        let reply = self
            .send(Method::POST, url, &headers, Bytes::from(frame))
            .await?
            .expect(&[StatusCode::OK])?;
        let exit = parse_process_stream(reply.body).map_err(|reason| ClientError::Protocol {
            url: reply.url,
            reason,
        })?;
        Ok((exit, reply.elapsed))
    }

    /// What `e2b_code_interpreter`'s `sandbox.run_code(code)` does: `POST /execute` on the
    /// code interpreter's port, reading the NDJSON stream to its end. Returns the main
    /// result's text (if any) and the elapsed time; an error in the code is an error here.
    pub async fn run_code(
        &self,
        t: &EnvdTarget,
        code: &str,
    ) -> Result<(Option<String>, Duration), ClientError> {
        let url = format!("{}/execute", t.base_url);
        let body = serde_json::json!({
            "code": code, "context_id": null, "language": null, "env_vars": null,
        });
        let headers = Self::port_headers(t, INTERPRETER_PORT, "application/json");
        let reply = self
            .send(Method::POST, url, &headers, Bytes::from(body.to_string()))
            .await?
            .expect(&[StatusCode::OK])?;
        let text = parse_execution(&reply.body).map_err(|reason| ClientError::Protocol {
            url: reply.url.clone(),
            reason,
        })?;
        Ok((text, reply.elapsed))
    }

    /// `files.write` as raw octet-stream; returns elapsed time.
    pub async fn upload(
        &self,
        t: &EnvdTarget,
        path: &str,
        data: Bytes,
    ) -> Result<Duration, ClientError> {
        let url = format!("{}/files?path={}", t.base_url, encode(path));
        let headers = Self::envd_headers(t, "application/octet-stream");
        let reply = self
            .send(Method::POST, url, &headers, data)
            .await?
            .expect(&[StatusCode::OK])?;
        Ok(reply.elapsed)
    }

    /// `files.read` of `path`; returns the byte count and elapsed time.
    pub async fn download(
        &self,
        t: &EnvdTarget,
        path: &str,
    ) -> Result<(usize, Duration), ClientError> {
        let url = format!("{}/files?path={}", t.base_url, encode(path));
        let headers = Self::envd_headers(t, "application/octet-stream");
        let reply = self
            .send(Method::GET, url, &headers, Bytes::new())
            .await?
            .expect(&[StatusCode::OK])?;
        Ok((reply.body.len(), reply.elapsed))
    }
}

/// One whole answer, with what is needed to name the request in an error.
struct Reply {
    method: Method,
    url: String,
    status: StatusCode,
    body: Bytes,
    elapsed: Duration,
}

impl Reply {
    /// The reply itself when its status is one of `ok`, else a status error carrying the body.
    fn expect(self, ok: &[StatusCode]) -> Result<Self, ClientError> {
        if ok.contains(&self.status) {
            Ok(self)
        } else {
            Err(ClientError::Status {
                method: self.method,
                url: self.url,
                status: self.status,
                body: String::from_utf8_lossy(&self.body).into_owned(),
            })
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol {
            url: self.url.clone(),
            reason: e.to_string(),
        })
    }
}

fn encode(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// envd's port, fixed by the E2B SDKs.
const ENVD_PORT: u16 = 49983;
/// The code interpreter's port, fixed by `e2b_code_interpreter`.
const INTERPRETER_PORT: u16 = 49999;

/// Reads an `/execute` NDJSON stream: the main result's text, or why the run failed (an
/// `error` line, or no `end_of_execution`).
fn parse_execution(body: &[u8]) -> Result<Option<String>, String> {
    let mut text = None;
    let mut ended = false;
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| format!("bad NDJSON line: {e}"))?;
        match v["type"].as_str() {
            Some("result") if v["is_main_result"] == true => {
                text = v["text"].as_str().map(str::to_owned);
            }
            Some("error") => return Err(format!("{}: {}", v["name"], v["value"])),
            Some("end_of_execution") => ended = true,
            _ => {}
        }
    }
    if !ended {
        return Err("no end_of_execution".into());
    }
    Ok(text)
}

/// Reads Connect envelopes of a `Process.Start` stream; returns the `end` event's exit code.
fn parse_process_stream(mut body: Bytes) -> Result<i32, String> {
    let mut exit = None;
    let mut saw_start = false;
    while body.remaining() >= 5 {
        let flags = body.get_u8();
        let len = body.get_u32() as usize;
        if body.remaining() < len {
            return Err("truncated envelope".into());
        }
        let payload = body.split_to(len);
        let v: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|e| format!("bad JSON in stream: {e}"))?;
        if flags & 0x02 != 0 {
            if let Some(err) = v.get("error") {
                return Err(format!("stream ended with error {err}"));
            }
            break;
        }
        let event = &v["event"];
        if event.get("start").is_some() {
            saw_start = true;
        }
        if let Some(end) = event.get("end") {
            exit = Some(
                end.get("exitCode")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0) as i32,
            );
        }
        if let Some(data) = event
            .get("data")
            .and_then(|d| d.get("stderr"))
            .and_then(|s| s.as_str())
            && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data)
        {
            tracing::debug!(stderr = %String::from_utf8_lossy(&bytes), "process stderr");
        }
    }
    if !saw_start {
        return Err("no start event".into());
    }
    exit.ok_or_else(|| "no end event".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn env(flags: u8, v: serde_json::Value) -> Vec<u8> {
        let s = v.to_string();
        let mut out = vec![flags];
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn parses_a_process_stream() {
        let mut b = env(0, serde_json::json!({"event":{"start":{"pid":7}}}));
        b.extend(env(
            0,
            serde_json::json!({"event":{"end":{"exitCode":3,"exited":true}}}),
        ));
        b.extend(env(2, serde_json::json!({})));
        assert_eq!(parse_process_stream(Bytes::from(b)), Ok(3));
        let no_end = env(0, serde_json::json!({"event":{"start":{"pid":7}}}));
        assert!(parse_process_stream(Bytes::from(no_end)).is_err());
    }

    #[test]
    fn parses_an_execution_stream() {
        let ok = b"{\"type\":\"number_of_executions\",\"execution_count\":1}\n\
                   {\"type\":\"result\",\"is_main_result\":true,\"text\":\"2\"}\n\
                   {\"type\":\"end_of_execution\"}\n";
        assert_eq!(parse_execution(ok), Ok(Some("2".into())));
        let failed = b"{\"type\":\"error\",\"name\":\"NameError\",\"value\":\"x\"}\n\
                       {\"type\":\"end_of_execution\"}\n";
        assert!(parse_execution(failed).unwrap_err().contains("NameError"));
        assert!(parse_execution(b"").is_err(), "no end");
    }

    #[test]
    fn percent_encodes_paths() {
        assert_eq!(encode("/tmp/a b"), "%2Ftmp%2Fa%20b");
    }
}
