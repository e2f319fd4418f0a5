//! The sandbox plane: requests for a sandbox (by `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, a
//! `{port}-{id}.{domain}` host, or a signed `/files` URL's signature) are streamed to the
//! sandbox's forwarded port, both ways, with no buffering and no parsing of envd's payloads.
//! Everything else goes to the control plane.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use firkin_e2b_contract::ENVD_PORT;
use firkin_e2b_wire::file_signature::{SignedQuery, SigningOp};
use firkin_types::{PortSandboxHost, SandboxId};
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

use crate::api::BodyLimit;
use crate::app::App;
use crate::error::{ApiError, sandbox_plane_not_found, sandbox_plane_port_closed};
use crate::store::RecordState;

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    ControlPlane,
    Sandbox { id: String, port: u16 },
}

const SANDBOX_ID: &str = "e2b-sandbox-id";
const SANDBOX_PORT: &str = "e2b-sandbox-port";
/// What a request to a private sandbox's ports (not envd's) must carry.
const TRAFFIC_TOKEN: &str = "e2b-traffic-access-token";

/// Picks the target of a request. A `{port}-{id}.{domain}` host routes by itself (when a
/// domain is configured, only under that domain); otherwise the `E2b-Sandbox-*` headers do,
/// which is what happens for `localhost`, IP addresses and `sandbox.<domain>` hosts.
pub fn target(
    headers: &HeaderMap,
    host: Option<&str>,
    domain: Option<&str>,
) -> Result<Target, ApiError> {
    if let Some(h) = host.and_then(|h| PortSandboxHost::parse(h).ok())
        && domain.is_none_or(|d| h.domain.eq_ignore_ascii_case(d))
    {
        return Ok(Target::Sandbox {
            id: h.sandbox_id.into_string(),
            port: h.port,
        });
    }
    let Some(id) = headers.get(SANDBOX_ID) else {
        return Ok(Target::ControlPlane);
    };
    let id = id
        .to_str()
        .map_err(|_| ApiError::bad_request("E2b-Sandbox-Id is not ASCII"))?
        .to_owned();
    let port = match headers.get(SANDBOX_PORT) {
        None => ENVD_PORT,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| ApiError::bad_request("E2b-Sandbox-Port is not a port number"))?,
    };
    Ok(Target::Sandbox { id, port })
}

fn request_host(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// The one service behind the listener.
pub(crate) async fn dispatch(app: Arc<App>, cp: Router, mut req: Request) -> Response {
    let tgt = target(
        req.headers(),
        request_host(&req),
        app.config.domain.as_deref(),
    );
    match tgt {
        Ok(Target::ControlPlane) if req.uri().path() == "/files" && is_signed(&req) => {
            signed_file_url(&app, req).await
        }
        Ok(Target::ControlPlane) => {
            req.extensions_mut()
                .insert(BodyLimit(app.config.body_limit));
            match cp.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
        Ok(Target::Sandbox { id, port }) => proxy(&app, req, &id, port).await,
        Err(e) => e.into_response(),
    }
}

fn is_signed(req: &Request) -> bool {
    SignedQuery::parse(req.uri().query().unwrap_or("")).is_ok_and(|q| q.is_signed())
}

/// The SDK's `download_url`/`upload_url` under `E2B_SANDBOX_URL` name no sandbox (no header, no
/// `{port}-{id}` host): only their signature says whose they are. It was made with one
/// sandbox's envd token, so the sandbox whose token reproduces it is the one to forward to,
/// where envd checks it again, expiry included.
async fn signed_file_url(app: &Arc<App>, req: Request) -> Response {
    let query = match SignedQuery::parse(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return ApiError::bad_request(e.to_string()).into_response(),
    };
    let op = SigningOp::of_method(req.method().as_str());
    let records = match app.store.sandboxes() {
        Ok(r) => r,
        Err(err) => return crate::app::store_err(err).into_response(),
    };
    // Paused ones too: the proxy resumes those that asked for it, and says "paused" otherwise.
    let owner = records
        .iter()
        .filter(|r| r.state != RecordState::Starting)
        .find(|r| query.signed_with(op, &r.access_token));
    match owner {
        Some(r) => proxy(app, req, r.sandbox_id.as_str(), ENVD_PORT).await,
        None => ApiError::unauthorized("invalid file signature: no sandbox signed this URL")
            .into_response(),
    }
}

async fn proxy(app: &Arc<App>, req: Request, raw_id: &str, port: u16) -> Response {
    let Ok(id) = SandboxId::new(raw_id) else {
        return sandbox_plane_not_found(raw_id, None);
    };
    // envd checks its own access token; every other port is the sandbox's public face, which
    // `allowPublicTraffic: false` closes to requests without the traffic token.
    if port != ENVD_PORT
        && let Some(resp) = refuse_without_traffic_token(app, &id, req.headers())
    {
        return resp;
    }
    let addr = match open_port(app, &id, port).await {
        Ok(Some(addr)) => addr,
        Ok(None) => match route_slow(app, &id, port).await {
            Ok(addr) => addr,
            Err(resp) => return resp,
        },
        Err(resp) => return resp,
    };
    forward(app, req, addr, &id, port).await
}

/// The port's loopback address, forwarded on this first request for it if need be; `None`
/// when the sandbox is not running right now.
async fn open_port(
    app: &Arc<App>,
    id: &SandboxId,
    port: u16,
) -> Result<Option<SocketAddr>, Response> {
    if let Some(addr) = app.rt.route(id, port) {
        return Ok(Some(addr));
    }
    match app.rt.open_port(id, port).await {
        Ok(addr) => Ok(addr),
        // Stopped or paused under the request: the slow path finds out which.
        Err(_) if !app.rt.is_running(id) => Ok(None),
        Err(err) => {
            tracing::warn!(sandbox = %id, port, %err, "forwarding a sandbox port failed");
            Err(crate::error::from_runtime(&err).into_response())
        }
    }
}

/// The refusal of a request to a private sandbox without its traffic token, if it is one. A
/// sandbox the store does not know passes: the route that follows answers "not found" for it.
fn refuse_without_traffic_token(
    app: &App,
    id: &SandboxId,
    headers: &HeaderMap,
) -> Option<Response> {
    let record = match app.store.sandbox(id) {
        Ok(r) => r,
        Err(err) => return Some(crate::app::store_err(err).into_response()),
    };
    let want = record.and_then(|r| r.traffic_access_token)?;
    let given = headers.get(TRAFFIC_TOKEN).map(HeaderValue::as_bytes);
    // Hashes compared, so the comparison's time says nothing about the token's prefix.
    let matches = given.is_some_and(|g| {
        use sha2::Digest;
        sha2::Sha256::digest(g) == sha2::Sha256::digest(want.as_bytes())
    });
    if matches {
        None
    } else {
        Some(
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "sandbox {id} does not allow public traffic: the request needs header \
                 {TRAFFIC_TOKEN} with the sandbox's traffic access token"
                ),
            )
            .into_response(),
        )
    }
}

/// The sandbox has no route right now: it is paused (resume it if it asked for that), being
/// paused or resumed (wait for that), gone, or running without that port.
async fn route_slow(app: &Arc<App>, id: &SandboxId, port: u16) -> Result<SocketAddr, Response> {
    // Waiting for the sandbox lock lets an in-flight pause or resume finish first.
    match app.auto_resume(id).await {
        Ok(true) => {}
        Ok(false) => {
            let paused = matches!(
                app.store.sandbox(id),
                Ok(Some(r)) if r.state == crate::store::RecordState::Paused
            );
            let detail = paused.then_some("it is paused; connect to resume it");
            return Err(sandbox_plane_not_found(id.as_str(), detail));
        }
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            return Err(sandbox_plane_not_found(id.as_str(), None));
        }
        Err(e) => return Err(e.into_response()),
    }
    match open_port(app, id, port).await? {
        Some(addr) => Ok(addr),
        // Running, but the backend has nothing to route there.
        None if app.rt.is_running(id) => {
            Err(crate::error::sandbox_plane_port_closed(id.as_str(), port))
        }
        None => Err(sandbox_plane_not_found(id.as_str(), None)),
    }
}

/// Whether a failed upstream request means nothing listens on the port. slirp accepts a
/// forwarded connection on the host before it connects to the guest, and closes it when the
/// guest refuses, so a closed guest port shows as a connection that ends before any response
/// rather than as a refused connect (which is what a host port shows). Depending on when the
/// close lands, hyper reports it as an incomplete message, a canceled request or a reset.
fn port_closed(err: &hyper_util::client::legacy::Error) -> bool {
    if err.is_connect() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        // Closed before the request was written (canceled) or before any response came.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). Never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// The `Upgrade` protocol of a request asking to switch protocols (WebSocket), if any.
fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

async fn forward(
    app: &Arc<App>,
    mut req: Request,
    addr: SocketAddr,
    id: &SandboxId,
    port: u16,
) -> Response {
    let upgrade = upgrade_of(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    // Only the path and query of the client's request are used: an absolute-form request
    // (`GET http://elsewhere/ HTTP/1.1`) cannot steer the proxy anywhere else.
    let Ok(uri) = crate::upstream::guest_uri(addr, id, app.rt.pid(id), &path) else {
        return ApiError::bad_request("invalid request path").into_response();
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // 100-continue was already answered to the client by this server.
    parts.headers.remove(header::EXPECT);
    if let Some(proto) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let upstream = Request::from_parts(parts, body);

    let resp = match app.client.request(upstream).await {
        Ok(r) => r,
        Err(err) => {
            if port_closed(&err) {
                tracing::debug!(sandbox = %id, port, %err, "sandbox port refused the connection");
                return sandbox_plane_port_closed(id.as_str(), port);
            }
            tracing::warn!(sandbox = %id, port, %err, "proxying to sandbox failed");
            // The sandbox may have died under the request.
            if !app.rt.is_running(id) {
                return sandbox_plane_not_found(id.as_str(), None);
            }
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("error talking to sandbox {id} port {port}: {err}"),
            )
            .into_response();
        }
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let mut resp = resp;
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (parts, _) = resp.into_parts();
        let sandbox = id.to_string();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((c, u)) => {
                    let mut c = TokioIo::new(c);
                    let mut u = TokioIo::new(u);
                    if let Err(err) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        tracing::debug!(%sandbox, %err, "upgraded connection ended");
                    }
                }
                Err(err) => tracing::debug!(%sandbox, %err, "protocol upgrade failed"),
            }
        });
        return Response::from_parts(parts, Body::empty());
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn headers_route_on_localhost_and_ips() {
        let h = headers(&[(SANDBOX_ID, "abc123"), (SANDBOX_PORT, "49999")]);
        for host in [
            "localhost:3000",
            "127.0.0.1:3000",
            "[::1]:3000",
            "sandbox.example.com",
        ] {
            assert_eq!(
                target(&h, Some(host), None).unwrap(),
                Target::Sandbox {
                    id: "abc123".into(),
                    port: 49999
                },
                "{host}"
            );
        }
        let h = headers(&[(SANDBOX_ID, "abc123")]);
        assert_eq!(
            target(&h, Some("localhost"), None).unwrap(),
            Target::Sandbox {
                id: "abc123".into(),
                port: ENVD_PORT
            }
        );
    }

    #[test]
    fn port_id_hosts_route_by_themselves() {
        let t = target(
            &HeaderMap::new(),
            Some("49983-abc.sb.example.com:443"),
            None,
        )
        .unwrap();
        assert_eq!(
            t,
            Target::Sandbox {
                id: "abc".into(),
                port: 49983
            }
        );
        // With a domain configured, only hosts under it.
        let t = target(
            &HeaderMap::new(),
            Some("49983-abc.other.com"),
            Some("sb.example.com"),
        )
        .unwrap();
        assert_eq!(t, Target::ControlPlane);
        let t = target(
            &HeaderMap::new(),
            Some("49983-abc.SB.example.com"),
            Some("sb.example.com"),
        )
        .unwrap();
        assert!(matches!(t, Target::Sandbox { .. }));
    }

    #[test]
    fn everything_else_is_the_control_plane() {
        assert_eq!(
            target(&HeaderMap::new(), Some("localhost:3000"), None).unwrap(),
            Target::ControlPlane
        );
        assert_eq!(
            target(&HeaderMap::new(), Some("api.example.com"), None).unwrap(),
            Target::ControlPlane
        );
        assert_eq!(
            target(&HeaderMap::new(), None, None).unwrap(),
            Target::ControlPlane
        );
    }

    #[test]
    fn bad_ports_are_refused() {
        for p in ["0", "70000", "x", "-1"] {
            let mut h = headers(&[(SANDBOX_ID, "abc")]);
            h.insert(SANDBOX_PORT, HeaderValue::from_static(p));
            assert!(target(&h, Some("localhost"), None).is_err(), "{p}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("x-access-token", "tok"),
            ("content-type", "application/connect+json"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-access-token") && h.contains_key("content-type"));
    }
}
