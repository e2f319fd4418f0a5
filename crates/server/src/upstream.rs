//! The HTTP client that reaches guests (the sandbox-plane proxy, metrics), with its idle
//! connections kept per sandbox instance.
//!
//! A guest port's address is not the guest's alone: a network slot's address goes to the next
//! sandbox once the last one is gone (the pool recycles slots), and under user-mode
//! networking a freed loopback port can be forwarded again for another sandbox. hyper keeps
//! idle connections by URI authority, so an authority made of the address alone would hand a
//! kept-alive connection to the last guest to a request meant for the next one (which resets
//! it, and the request fails). Each URI therefore names the sandbox and its VMM's pid in a host
//! name, `{a}-{b}-{c}-{d}.{id}-{pid}.guest.invalid`, which [`GuestResolver`] turns back into
//! the address without any lookup. The `Host` header the guest sees is the client's own.

use std::future::{Ready, ready};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Uri;
use firkin_types::SandboxId;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;

/// The suffix every guest host name ends in (`.invalid` never resolves anywhere else).
const SUFFIX: &str = "guest.invalid";

pub(crate) type GuestClient = Client<HttpConnector<GuestResolver>, Body>;

/// The client: HTTP/1.1, no Nagle, 5 s to connect, idle connections dropped after 30 s.
pub(crate) fn http_client() -> GuestClient {
    let mut connector = HttpConnector::new_with_resolver(GuestResolver);
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// The URI of `path_and_query` on a guest port reached at `addr`, for sandbox `id` whose VMM
/// is `pid` (`None` when the backend has no process of its own). An address that is not IPv4
/// is used as it is (no per-sandbox key; firkin's routes are all IPv4).
pub(crate) fn guest_uri(
    addr: SocketAddr,
    id: &SandboxId,
    pid: Option<u32>,
    path_and_query: &str,
) -> Result<Uri, axum::http::uri::InvalidUri> {
    let host = match addr {
        SocketAddr::V4(v4) => {
            let [a, b, c, d] = v4.ip().octets();
            format!(
                "{a}-{b}-{c}-{d}.{id}-{}.{SUFFIX}:{}",
                pid.unwrap_or(0),
                v4.port()
            )
        }
        SocketAddr::V6(_) => addr.to_string(),
    };
    format!("http://{host}{path_and_query}").parse()
}

/// Resolves the host names [`guest_uri`] makes, and nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GuestResolver;

fn parse(name: &str) -> Option<Ipv4Addr> {
    let (ip, rest) = name.split_once('.')?;
    if !rest.ends_with(SUFFIX) {
        return None;
    }
    ip.replace('-', ".").parse().ok()
}

impl tower::Service<Name> for GuestResolver {
    type Response = std::iter::Once<SocketAddr>;
    type Error = io::Error;
    type Future = Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        ready(match parse(name.as_str()) {
            // The connector puts the URI's port on it.
            Some(ip) => Ok(std::iter::once(SocketAddr::from((ip, 0)))),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{}' is not a guest address", name.as_str()),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_uri_names_its_sandbox_and_resolves_to_its_address() {
        let id = SandboxId::new("i8x2kq0ab").unwrap();
        let addr: SocketAddr = "198.18.0.6:8000".parse().unwrap();
        let uri = guest_uri(addr, &id, Some(4242), "/a?b=c").unwrap();
        assert_eq!(
            uri.to_string(),
            "http://198-18-0-6.i8x2kq0ab-4242.guest.invalid:8000/a?b=c"
        );
        assert_eq!(
            parse(uri.host().unwrap()),
            Some(Ipv4Addr::new(198, 18, 0, 6))
        );
        // The next sandbox at the same address gets another authority, so another pool key.
        let next = guest_uri(addr, &SandboxId::new("zz").unwrap(), Some(4243), "/").unwrap();
        assert_ne!(uri.authority(), next.authority());
    }

    #[test]
    fn only_guest_names_resolve() {
        assert_eq!(parse("example.com"), None);
        assert_eq!(parse("1-2-3-4.x-1.example.com"), None);
        assert_eq!(parse("1-2-3.x-1.guest.invalid"), None);
        assert_eq!(
            parse("127-0-0-1.x-1.guest.invalid"),
            Some(Ipv4Addr::LOCALHOST)
        );
    }
}
