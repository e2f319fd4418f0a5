//! The slot's domain proxy: E2B's rule that a web connection is allowed by the name it
//! announces. For a policy with `allow_domains`, the slot's NAT prerouting sends the guest's
//! new TCP connections to ports 80 and 443 that the policy chain would not accept (not in
//! `@allow_dns`, not in an `allow` CIDR) here (see [`crate::firewall`]). The proxy reads the
//! original destination from conntrack, peeks the first bytes (at most [`PEEK_MAX`] within
//! [`PEEK_TIME`]) for the TLS ClientHello's SNI (443) or the HTTP/1 `Host` header (80), and if
//! the name matches the policy's domains connects to the original destination and splices
//! both ways; otherwise it resets the guest's connection without contacting anybody.
//!
//! The listening socket is made by a thread in the slot's namespace and served by tokio tasks
//! owned by the [`crate::Slot`], as the DNS server is. Each upstream socket is made in the
//! slot's namespace too, so it leaves through the slot's veth: the host's table (no host, no
//! other slot, no link-local) and its masquerade apply to it as to the guest's own traffic.
//! The slot's own forward chain does not see it (it is the namespace's own output), so the
//! always-denied ranges are checked here before connecting ([`Target::check`]); the redirect
//! never sends them here in the first place.
//!
//! A connection's fate is decided once, on its first message: later requests on a kept-alive
//! HTTP connection are not re-read. The name is the client's claim: a guest may announce an
//! allowed name to any address on these ports, as with E2B's proxy.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{Ipv4Net, SlotConfig};
use crate::dns::Grants;
use crate::firewall::{self, PROXY_PORT};
use crate::netns;
use crate::peek::{self, Peek};

/// The most of a connection read before its name must be known.
pub(crate) const PEEK_MAX: usize = 16 * 1024;
/// The time the guest has to send it.
pub(crate) const PEEK_TIME: Duration = Duration::from_secs(5);
/// Connecting to the original destination.
const CONNECT_TIME: Duration = Duration::from_secs(10);
/// Proxied connections one slot may hold open (peeking or spliced); past it new ones are
/// reset at once.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// Why a connection was not passed on (logged at debug level; the guest sees a reset).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no original destination: {0}")]
    NoOriginal(nix::Error),
    #[error("destination {0} is always denied")]
    Denied(SocketAddrV4),
    #[error("port {0} is not proxied")]
    Port(u16),
    #[error("nothing named within {PEEK_MAX} bytes / {PEEK_TIME:?}")]
    NoName,
    #[error("name {0:?} is not allowed")]
    NotAllowed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where upstream connections may go.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    denied: Vec<Ipv4Net>,
}

impl Target {
    pub(crate) fn new(slot: &SlotConfig) -> Self {
        Self {
            denied: firewall::always_denied(slot),
        }
    }

    /// Whether an upstream connection to `ip` may be made.
    pub(crate) fn check(&self, ip: Ipv4Addr) -> bool {
        !self.denied.iter().any(|n| n.contains(ip))
    }
}

struct Context {
    netns: String,
    grants: Arc<Grants>,
    target: Target,
}

/// A running proxy of one slot. Dropping it stops it: its tasks are aborted, and with them
/// every connection being peeked or spliced.
#[derive(Debug)]
pub(crate) struct Proxy {
    task: JoinHandle<()>,
}

impl Proxy {
    /// Binds the proxy's port on the guest's gateway address inside the slot's namespace and
    /// serves it on the current runtime; the names allowed are those of `grants` at the time a
    /// connection's name is known.
    pub(crate) async fn start(slot: &SlotConfig, grants: Arc<Grants>) -> std::io::Result<Self> {
        let at = SocketAddr::new(slot.guest.gateway.into(), PROXY_PORT);
        let listener = netns::run_in_async(&slot.netns, move || -> std::io::Result<_> {
            let l = TcpListener::bind(at)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .await??;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let ctx = Arc::new(Context {
            netns: slot.netns.clone(),
            grants,
            target: Target::new(slot),
        });
        Ok(Self {
            task: tokio::spawn(serve(listener, ctx)),
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Context>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut open = JoinSet::new();
    loop {
        let guest = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "proxy: accept");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while open.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::debug!(slot = %ctx.netns, "proxy: too many connections, one reset");
            reset(guest);
            continue;
        };
        let ctx = Arc::clone(&ctx);
        open.spawn(async move {
            let _permit = permit;
            handle(guest, &ctx).await;
        });
    }
}

/// Closes with a RST (SO_LINGER 0), so the guest's client fails at once and sees no
/// half-open exchange.
fn reset(s: TcpStream) {
    let zero = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &zero);
    drop(s);
}

async fn handle(guest: TcpStream, ctx: &Context) {
    match decide(guest, ctx).await {
        Ok(()) => {}
        Err((Some(guest), why)) => {
            tracing::debug!(slot = %ctx.netns, %why, "proxy: connection refused");
            reset(guest);
        }
        Err((None, why)) => {
            tracing::debug!(slot = %ctx.netns, %why, "proxy: a passed connection ended");
        }
    }
}

type Outcome = Result<(), (Option<TcpStream>, Refused)>;

async fn decide(mut guest: TcpStream, ctx: &Context) -> Outcome {
    let dst = match nix::sys::socket::getsockopt(&guest, nix::sys::socket::sockopt::OriginalDst) {
        Ok(sa) => SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        ),
        Err(e) => return Err((Some(guest), Refused::NoOriginal(e))),
    };
    if !ctx.target.check(*dst.ip()) {
        return Err((Some(guest), Refused::Denied(dst)));
    }
    let parse: fn(&[u8]) -> Peek = match dst.port() {
        443 => peek::tls_sni,
        80 => peek::http_host,
        p => return Err((Some(guest), Refused::Port(p))),
    };
    let mut buf = vec![0u8; PEEK_MAX];
    let got = tokio::time::timeout(PEEK_TIME, read_name(&mut guest, &mut buf, parse)).await;
    let (name, len) = match got {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) | Err(_) => return Err((Some(guest), Refused::NoName)),
        Ok(Err(e)) => return Err((Some(guest), Refused::Io(e))),
    };
    if !ctx.grants.domains().await.matches(&name) {
        return Err((Some(guest), Refused::NotAllowed(name)));
    }
    let mut upstream = match connect(&ctx.netns, dst).await {
        Ok(s) => s,
        Err(e) => return Err((Some(guest), Refused::Io(e))),
    };
    tracing::debug!(slot = %ctx.netns, %name, %dst, "proxy: passing a connection");
    if let Err(e) = upstream.write_all(&buf[..len]).await {
        return Err((Some(guest), Refused::Io(e)));
    }
    drop(buf);
    if let Err(e) = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await {
        // A reset from either side mid-stream: the other side's socket is dropped with it.
        return Err((None, Refused::Io(e)));
    }
    Ok(())
}

/// Reads into `buf` until `parse` finds a name (`Some((name, bytes read))`), finds none, or
/// `buf` is full (`None`). Each round reads at least one byte, so it ends.
async fn read_name(
    guest: &mut TcpStream,
    buf: &mut [u8],
    parse: fn(&[u8]) -> Peek,
) -> std::io::Result<Option<(String, usize)>> {
    let mut len = 0;
    while len < buf.len() {
        let n = guest.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        match parse(&buf[..len]) {
            Peek::Name(name) => return Ok(Some((name, len))),
            Peek::Incomplete => {}
            Peek::NoName | Peek::Invalid => return Ok(None),
        }
    }
    Ok(None)
}

/// Connects to `dst` from a socket made in the slot's namespace.
async fn connect(netns: &str, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let fd = netns::run_in_async(netns, || {
        socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
    })
    .await??;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    tokio::time::timeout(CONNECT_TIME, socket.connect(dst.into()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting upstream"))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::PoolConfig;

    #[test]
    fn upstream_never_reaches_the_always_denied_ranges() {
        let slot = PoolConfig::default().slot(5).unwrap();
        let t = Target::new(&slot);
        for denied in [
            slot.host_addr,
            slot.slot_addr,
            // Another slot's and the pool's first address.
            Ipv4Addr::new(198, 18, 0, 1),
            Ipv4Addr::new(169, 254, 169, 254),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(255, 255, 255, 255),
            // The slot's own addresses towards the guest.
            slot.guest.gateway,
            slot.guest.dns,
            slot.guest.guest,
        ] {
            assert!(!t.check(denied), "{denied} passed");
        }
        for ok in [
            Ipv4Addr::new(203, 0, 113, 20),
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(8, 8, 8, 8),
        ] {
            assert!(t.check(ok), "{ok} refused");
        }
    }
}
