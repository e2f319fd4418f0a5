//! The slot's DNS server: the guest's `nameserver` (10.0.2.3, what slirp offered), answering
//! on UDP and TCP port 53 of that address in the slot's namespace, resolving through one
//! upstream resolver shared by the pool, and granting the addresses of allowed domains in the
//! slot's `allow_dns` set *before* the guest sees the answer, so the connect that follows an
//! allowed lookup is let through.
//!
//! Sockets: the listening sockets are made by a thread inside the slot's namespace (a socket
//! keeps the namespace it was made in) and then served by tokio tasks on the caller's runtime;
//! the resolver's sockets are made by those tasks, on tokio's threads, in the root namespace,
//! so the guest's questions leave the host from the host's own address and not through the
//! slot's policy (a guest with no egress still resolves names).
//!
//! What is answered: A through the resolver; AAAA resolved too but answered without its AAAA
//! records (NOERROR and empty, or NXDOMAIN when the name does not exist, so a guest asking A
//! and AAAA at once hears the same about the name twice): the slot has no IPv6 route, and an
//! IPv6 address would only make the guest try a path that fails before falling back. Other
//! types of class IN are passed through; ANY, zone transfers, other opcodes and classes are
//! answered NOTIMP. Upstream NXDOMAIN and "no records" are passed on; a timeout or any other
//! failure is SERVFAIL.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError as ResolveError};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::domains::DomainSet;
use crate::nfset::SetWriter;
use crate::{firewall, netns};

/// Questions one slot may have in flight at once (UDP and TCP together). Past it, UDP
/// questions are dropped unread (the guest's resolver retries) and TCP ones wait: a guest
/// cannot make the host resolve without limit.
const MAX_IN_FLIGHT: usize = 16;
/// TCP connections one slot may hold open; more are closed at once.
const MAX_TCP: usize = 4;
/// A TCP connection with no complete question for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The whole of one question's resolution, retries included; past it the guest gets SERVFAIL
/// (its own resolver gives up after 5 s by default, so it should hear from us first).
const QUESTION_TIMEOUT: Duration = Duration::from_secs(4);
/// One upstream attempt.
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// A granted address stays in the set for its answer's TTL, within these bounds: a very short
/// TTL would expire under a connection being set up (and cost an `nft` run per lookup), a very
/// long one would keep a stale address open.
const GRANT_MIN: u32 = 60;
const GRANT_MAX: u32 = 3600;
/// The most a UDP answer may be without EDNS (RFC 1035), and the most we send with it (the
/// DNS flag day's 1232 keeps an answer in one unfragmented packet).
const UDP_PLAIN: usize = 512;
const UDP_EDNS_MAX: usize = 1232;

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the DNS resolver ({what}): {source}")]
pub struct UpstreamError {
    what: &'static str,
    #[source]
    source: ResolveError,
}

/// The upstream resolver of a pool's slots: one per pool (a cache and connection pool for all
/// of them), cheap to clone.
#[derive(Clone)]
pub struct DnsUpstream {
    resolver: Arc<TokioResolver>,
}

impl fmt::Debug for DnsUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsUpstream").finish_non_exhaustive()
    }
}

impl DnsUpstream {
    /// A resolver asking `servers` (UDP, then TCP when an answer is truncated), or the host's
    /// `/etc/resolv.conf` ones when `servers` is empty. The host's `/etc/hosts` is never used:
    /// its names are the host's business, not the guest's.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, UpstreamError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if servers.is_empty() {
            Resolver::builder(provider).map_err(|source| UpstreamError {
                what: "reading the host's resolv.conf",
                source,
            })?
        } else {
            let name_servers = servers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    // These are the operator's servers: their NXDOMAIN is the answer.
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            Resolver::builder_with_config(ResolverConfig::from_name_servers(name_servers), provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = UPSTREAM_TIMEOUT;
        opts.attempts = 2;
        opts.use_hosts_file = ResolveHosts::Never;
        // Questions arrive fully qualified; no search list or ndots applies.
        opts.ndots = 0;
        // Keep the CNAME chain in the answer, as a recursive server returns it.
        opts.preserve_intermediates = true;
        let resolver = builder.build().map_err(|source| UpstreamError {
            what: "building",
            source,
        })?;
        Ok(Self {
            resolver: Arc::new(resolver),
        })
    }
}

/// What a slot's DNS tasks share with the slot: the domain list the policy allows, and the
/// addresses already granted (with when their grant runs out), so a repeated lookup does not
/// write the set again. One lock serialises grants and policy changes, so a grant made for
/// the old policy can never land after the new policy's flush.
#[derive(Debug)]
pub(crate) struct Grants {
    netns: String,
    /// Made in the slot's namespace; writes its `allow_dns` set from any thread.
    writer: Arc<SetWriter>,
    state: Mutex<GrantState>,
}

#[derive(Debug)]
struct GrantState {
    domains: DomainSet,
    granted: HashMap<Ipv4Addr, Instant>,
    /// Netlink sequence numbers of the grants, so acknowledgements are told apart.
    seq: u32,
}

/// Why granting resolved addresses or a policy change failed.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("entering the slot's namespace: {0}")]
    Namespace(#[from] std::io::Error),
    #[error("nftables: {0}")]
    Nft(#[from] nftables::helper::NftablesError),
    #[error("writing the allow_dns set over netlink: {0}")]
    Netlink(std::io::Error),
    #[error("the set writer's thread: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Grants {
    fn new(netns: &str, domains: DomainSet, writer: SetWriter) -> Self {
        Self {
            netns: netns.to_owned(),
            writer: Arc::new(writer),
            state: Mutex::new(GrantState {
                domains,
                granted: HashMap::new(),
                seq: 0,
            }),
        }
    }

    /// Applies `ruleset` (the policy swap, which also flushes the set) and switches to
    /// `domains`, forgetting every grant.
    pub(crate) async fn replace(
        &self,
        domains: DomainSet,
        ruleset: nftables::schema::Nftables<'static>,
    ) -> Result<(), GrantError> {
        let mut st = self.state.lock().await;
        netns::run_in_async(&self.netns, move || firewall::apply(&ruleset)).await??;
        st.domains = domains;
        st.granted.clear();
        Ok(())
    }

    /// The domains allowed now (the proxy asks when a connection's name is known).
    pub(crate) async fn domains(&self) -> DomainSet {
        self.state.lock().await.domains.clone()
    }

    /// Grants `addrs` (with their TTLs) if `name` is allowed; an address granted with at least
    /// half its new time still left is skipped, and with nothing left to grant nothing runs.
    async fn grant(&self, name: &str, addrs: &[(Ipv4Addr, u32)]) -> Result<(), GrantError> {
        if addrs.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        if !st.domains.matches(name) {
            return Ok(());
        }
        let now = Instant::now();
        let need: Vec<(Ipv4Addr, u32)> = addrs
            .iter()
            .map(|(a, ttl)| (*a, (*ttl).clamp(GRANT_MIN, GRANT_MAX)))
            .filter(|(a, secs)| {
                st.granted
                    .get(a)
                    .is_none_or(|until| *until < now + Duration::from_secs(u64::from(*secs / 2)))
            })
            .collect();
        st.granted.retain(|_, until| *until > now);
        if need.is_empty() {
            return Ok(());
        }
        st.seq = st.seq.wrapping_add(1);
        let (writer, seq, list) = (Arc::clone(&self.writer), st.seq, need.clone());
        let started = Instant::now();
        // A netlink round trip: short, but a blocking receive, so off the async threads.
        tokio::task::spawn_blocking(move || writer.grant(&list, seq))
            .await?
            .map_err(GrantError::Netlink)?;
        tracing::debug!(slot = %self.netns, %name, addresses = need.len(),
            took = ?started.elapsed(), "granted resolved addresses");
        for (a, secs) in need {
            st.granted
                .insert(a, now + Duration::from_secs(u64::from(secs)));
        }
        Ok(())
    }
}

/// Everything one question needs.
#[derive(Debug)]
struct Context {
    upstream: DnsUpstream,
    grants: Arc<Grants>,
    in_flight: Arc<Semaphore>,
}

/// A running DNS server of one slot. Dropping it stops it: its tasks are aborted, and with
/// them every question in flight and every open TCP connection (they live in the tasks'
/// [`JoinSet`]s).
#[derive(Debug)]
pub(crate) struct DnsServer {
    tasks: Vec<JoinHandle<()>>,
    grants: Arc<Grants>,
}

impl DnsServer {
    /// Binds `addr:53` (UDP and TCP) inside namespace `netns` and serves it on the current
    /// runtime. The address must already be on one of the namespace's interfaces.
    pub(crate) async fn start(
        netns: &str,
        addr: Ipv4Addr,
        upstream: DnsUpstream,
        domains: DomainSet,
    ) -> std::io::Result<Self> {
        let at = SocketAddr::new(IpAddr::V4(addr), 53);
        let (udp, tcp, writer) = netns::run_in_async(netns, move || -> std::io::Result<_> {
            let udp = UdpSocket::bind(at)?;
            udp.set_nonblocking(true)?;
            let tcp = TcpListener::bind(at)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp, SetWriter::open()?))
        })
        .await??;
        // Registered with the reactor of the runtime we are on; the namespace stays the slot's.
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let grants = Arc::new(Grants::new(netns, domains, writer));
        let ctx = Arc::new(Context {
            upstream,
            grants: Arc::clone(&grants),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        });
        let tasks = vec![
            tokio::spawn(serve_udp(udp, Arc::clone(&ctx))),
            tokio::spawn(serve_tcp(tcp, ctx)),
        ];
        Ok(Self { tasks, grants })
    }

    pub(crate) fn grants(&self) -> &Arc<Grants> {
        &self.grants
    }

    pub(crate) fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_udp(socket: tokio::net::UdpSocket, ctx: Arc<Context>) {
    let socket = Arc::new(socket);
    let mut questions = JoinSet::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // Not fatal (an ICMP error for an earlier reply can surface here); a short
                // pause keeps an error that repeats from spinning.
                tracing::debug!(error = %e, "dns: udp receive");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while questions.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&ctx.in_flight).try_acquire_owned() else {
            tracing::debug!(%peer, "dns: too many questions in flight, one dropped");
            continue;
        };
        let question = buf[..len].to_vec();
        let (socket, ctx) = (Arc::clone(&socket), Arc::clone(&ctx));
        questions.spawn(async move {
            let _permit = permit;
            if let Some(reply) = answer(&question, &ctx, Some(UDP_PLAIN)).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                tracing::debug!(error = %e, "dns: udp send");
            }
        });
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, ctx: Arc<Context>) {
    let connections = Arc::new(Semaphore::new(MAX_TCP));
    let mut open = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "dns: tcp accept");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while open.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            continue;
        };
        let ctx = Arc::clone(&ctx);
        open.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(stream, &ctx).await {
                tracing::debug!(error = %e, "dns: tcp connection");
            }
        });
    }
}

/// Questions on one TCP connection, one after the other, each a 2-byte length and a message.
async fn serve_connection(mut stream: tokio::net::TcpStream, ctx: &Context) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            // Closed by the guest, or idle: both end the connection quietly.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let mut question = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut question)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let permit = ctx
            .in_flight
            .acquire()
            .await
            .map_err(|_| std::io::Error::other("dns server stopped"))?;
        let reply = answer(&question, ctx, None).await;
        drop(permit);
        let Some(reply) = reply else { return Ok(()) };
        let Ok(n) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        stream.write_all(&n.to_be_bytes()).await?;
        stream.write_all(&reply).await?;
    }
}

/// The reply to one wire-format question, `None` when it is not even a DNS header (nothing to
/// reply to). `udp_limit`: the size a UDP reply must fit (raised by the question's EDNS), past
/// which the reply is truncated and the guest retries over TCP.
async fn answer(question: &[u8], ctx: &Context, udp_limit: Option<usize>) -> Option<Vec<u8>> {
    let request = match Message::from_vec(question) {
        Ok(m) => m,
        Err(_) => {
            // A readable query header gets FORMERR; less than that, or a response (the QR
            // bit), is noise: answering a response could start a loop.
            let id = u16::from_be_bytes([*question.first()?, *question.get(1)?]);
            if question.get(2)? & 0x80 != 0 {
                return None;
            }
            let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return reply.to_vec().ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let (code, answers) = resolve(&request, ctx).await;
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    reply.queries = request.queries.clone();
    reply.answers = answers;
    let bytes = reply.to_vec().ok()?;
    let limit = match udp_limit {
        None => return Some(bytes),
        Some(plain) => request.edns.as_ref().map_or(plain, |e| {
            usize::from(e.max_payload()).clamp(plain, UDP_EDNS_MAX)
        }),
    };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    reply.truncate().to_vec().ok()
}

/// The response code and answer records for `request`, granting allowed addresses first.
async fn resolve(request: &Message, ctx: &Context) -> (ResponseCode, Vec<Record>) {
    if request.metadata.op_code != OpCode::Query {
        return (ResponseCode::NotImp, Vec::new());
    }
    let [query] = request.queries.as_slice() else {
        return (ResponseCode::FormErr, Vec::new());
    };
    if query.query_class() != DNSClass::IN {
        return (ResponseCode::NotImp, Vec::new());
    }
    let rtype = query.query_type();
    if matches!(rtype, RecordType::ANY | RecordType::AXFR | RecordType::IXFR) {
        return (ResponseCode::NotImp, Vec::new());
    }
    let name = query.name().clone();
    let looked_up = tokio::time::timeout(
        QUESTION_TIMEOUT,
        ctx.upstream.resolver.lookup(name.clone(), rtype),
    )
    .await;
    let answers = match looked_up {
        Err(_) => return (ResponseCode::ServFail, Vec::new()),
        Ok(Ok(lookup)) => lookup
            .answers()
            .iter()
            .filter(|r| r.record_type() != RecordType::AAAA)
            .cloned()
            .collect::<Vec<_>>(),
        Ok(Err(ResolveError::Dns(DnsError::NoRecordsFound(none)))) => {
            let code = match none.response_code {
                ResponseCode::NXDomain => ResponseCode::NXDomain,
                _ => ResponseCode::NoError,
            };
            return (code, Vec::new());
        }
        Ok(Err(e)) => {
            tracing::debug!(%name, error = %e, "dns: upstream failed");
            return (ResponseCode::ServFail, Vec::new());
        }
    };
    let addrs: Vec<(Ipv4Addr, u32)> = answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect();
    if let Err(e) = ctx.grants.grant(&name.to_ascii(), &addrs).await {
        // The guest would be told an address it may not connect to: say the lookup failed.
        tracing::warn!(slot = %ctx.grants.netns, %name, error = %e, "dns: granting resolved addresses");
        return (ResponseCode::ServFail, Vec::new());
    }
    (ResponseCode::NoError, answers)
}
