//! Waiting for envd's `GET /health` through the host forward.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

/// One `GET /health`; `Ok(true)` on a 2xx answer.
///
/// A refused or reset connection is normal while the guest boots: QEMU's user-mode network
/// accepts on the host side first and only then finds nobody listening in the guest.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        let conn = tokio::spawn(conn);
        let req = http::Request::get("/health")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let res = sender.send_request(req).await.ok();
        conn.abort();
        res.map(|r| r.status().is_success())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
