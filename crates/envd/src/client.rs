//! A small client for envd: what the host side (and the tests and benchmarks) need to talk to
//! an agent without the Python SDK. Plain HTTP/1.1, one connection per request.

use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Request body type: anything that yields bytes.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// What went wrong talking to envd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not `http://host:port`.
    #[error("invalid envd URL '{0}'")]
    Url(String),
    /// Connecting or transferring failed.
    #[error("talking to envd at {addr}: {source}")]
    Io {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP-level failure.
    #[error("HTTP error: {0}")]
    Http(String),
    /// envd answered with an error.
    #[error("envd answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The response body.
        body: String,
    },
    /// A response could not be decoded.
    #[error("malformed response: {0}")]
    Decode(String),
    /// A request body could not be encoded.
    #[error("encoding the request: {0}")]
    Encode(String),
}

/// A body made of one buffer.
pub fn full(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Frames `message` as one Connect streaming envelope.
pub fn envelope(flags: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

/// Client for one envd.
#[derive(Debug, Clone)]
pub struct Client {
    authority: String,
    token: Option<String>,
}

/// Output of [`Client::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOutput {
    /// The process id.
    pub pid: u32,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
    /// Exit code (-1 if a signal ended it).
    pub exit_code: i32,
    /// The `end` event's status text.
    pub status: String,
}

/// A server stream of Connect envelopes.
#[derive(Debug)]
pub struct EnvelopeStream {
    body: Incoming,
    buf: BytesMut,
}

impl EnvelopeStream {
    /// The next envelope as (flags, payload); `None` when the body ends.
    pub async fn next(&mut self) -> Result<Option<(u8, Bytes)>, ClientError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len).freeze();
                    return Ok(Some((flags, payload)));
                }
            }
            match self.body.frame().await {
                None => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(ClientError::Decode("truncated envelope".into()));
                }
                Some(Err(e)) => return Err(ClientError::Http(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next JSON envelope; the end-of-stream envelope (flag 0x02) is returned as `Err`
    /// when it carries an error and ends the stream otherwise.
    pub async fn next_json(&mut self) -> Result<Option<Value>, ClientError> {
        match self.next().await? {
            None => Ok(None),
            Some((flags, payload)) => {
                let v: Value = serde_json::from_slice(&payload)
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
                if flags & 0x02 != 0 {
                    if let Some(err) = v.get("error") {
                        return Err(ClientError::Status {
                            status: StatusCode::OK,
                            body: err.to_string(),
                        });
                    }
                    return Ok(None);
                }
                Ok(Some(v))
            }
        }
    }
}

impl Client {
    /// A client for `base` (`http://host:port`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let authority = base
            .strip_prefix("http://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| ClientError::Url(base.to_owned()))?;
        Ok(Self {
            authority: authority.to_owned(),
            token: None,
        })
    }

    /// Sends `X-Access-Token` on every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sends one request and returns the response with its body unread.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let io_err = |source| ClientError::Io {
            addr: self.authority.clone(),
            source,
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(io_err)?;
        stream.set_nodelay(true).map_err(io_err)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, &self.authority);
        if let Some(t) = &self.token {
            req = req.header("x-access-token", t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::Http(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))
    }

    /// Sends a request and collects the whole response.
    pub async fn fetch(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
        let resp = self.request(method, path_and_query, headers, body).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// `GET /health`: Ok when envd answers 2xx.
    pub async fn health(&self) -> Result<(), ClientError> {
        let (status, _, body) = self
            .fetch(Method::GET, "/health", &[], full(Bytes::new()))
            .await?;
        success(status, &body)
    }

    /// Polls `/health` until it answers or `timeout` passes.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.health().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// `POST /init` with a JSON body (see the protocol reference §4.4).
    /// `POST /init` with `body`: a [`firkin_e2b_wire::EnvdInit`], or any JSON a test wants on
    /// the wire.
    pub async fn init(&self, body: &impl serde::Serialize) -> Result<(), ClientError> {
        let body = serde_json::to_string(body).map_err(|e| ClientError::Encode(e.to_string()))?;
        let (status, _, resp) = self
            .fetch(
                Method::POST,
                "/init",
                &[("content-type", "application/json")],
                full(body),
            )
            .await?;
        success(status, &resp)
    }

    /// `POST /files` (raw upload): writes `data` to `path` in the guest as `user`.
    pub async fn upload(&self, path: &str, user: &str, data: Bytes) -> Result<(), ClientError> {
        let query = format!(
            "/files?path={}&username={}",
            query_escape(path),
            query_escape(user)
        );
        let (status, _, resp) = self
            .fetch(
                Method::POST,
                &query,
                &[("content-type", "application/octet-stream")],
                full(data),
            )
            .await?;
        success(status, &resp)
    }

    /// A unary Connect call with the JSON codec; returns the status and the JSON body.
    pub async fn unary(
        &self,
        method: &str,
        message: &Value,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Value), ClientError> {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        let (status, _, body) = self
            .fetch(
                Method::POST,
                &format!("/{method}"),
                &h,
                full(message.to_string()),
            )
            .await?;
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))?
        };
        Ok((status, v))
    }

    /// Opens a server-streaming Connect call with the JSON codec.
    pub async fn server_stream(
        &self,
        method: &str,
        message: &Value,
        headers: &[(&str, &str)],
    ) -> Result<EnvelopeStream, ClientError> {
        let mut h = vec![("content-type", "application/connect+json")];
        h.extend_from_slice(headers);
        let resp = self
            .request(
                Method::POST,
                &format!("/{method}"),
                &h,
                full(envelope(0, message.to_string().as_bytes())),
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(ClientError::Status { status, body });
        }
        Ok(EnvelopeStream {
            body: resp.into_body(),
            buf: BytesMut::new(),
        })
    }

    /// Runs `/bin/bash -l -c cmd` (as `commands.run` does) and collects its output.
    pub async fn run(&self, cmd: &str) -> Result<RunOutput, ClientError> {
        self.exec("/bin/bash", &["-l", "-c", cmd], None).await
    }

    /// Starts `cmd args...` (as `user`, or the default user) without a shell and collects its
    /// output.
    pub async fn exec(
        &self,
        cmd: &str,
        args: &[&str],
        user: Option<&str>,
    ) -> Result<RunOutput, ClientError> {
        let msg = serde_json::json!({
            "process": {"cmd": cmd, "args": args},
            "stdin": false,
        });
        let auth = user.map(|u| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:"))
            )
        });
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let mut stream = self
            .server_stream("process.Process/Start", &msg, &headers)
            .await?;
        let mut out = RunOutput::default();
        let b64 = base64::engine::general_purpose::STANDARD;
        while let Some(v) = stream.next_json().await? {
            let ev = &v["event"];
            if let Some(pid) = ev["start"]["pid"].as_u64() {
                out.pid = pid as u32;
            }
            if let Some(d) = ev["data"]["stdout"].as_str() {
                out.stdout.extend(
                    b64.decode(d)
                        .map_err(|e| ClientError::Decode(e.to_string()))?,
                );
            }
            if let Some(d) = ev["data"]["stderr"].as_str() {
                out.stderr.extend(
                    b64.decode(d)
                        .map_err(|e| ClientError::Decode(e.to_string()))?,
                );
            }
            if ev.get("end").is_some() {
                out.exit_code = ev["end"]["exitCode"].as_i64().unwrap_or(0) as i32;
                out.status = ev["end"]["status"].as_str().unwrap_or("").to_owned();
            }
        }
        Ok(out)
    }
}

/// Ok for a 2xx; otherwise the status and body as an error.
/// Percent-encodes a query value; only unreserved characters and `/` stay as they are.
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn success(status: StatusCode, body: &[u8]) -> Result<(), ClientError> {
    if status.is_success() {
        Ok(())
    } else {
        Err(ClientError::Status {
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        })
    }
}
