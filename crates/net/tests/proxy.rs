//! The slot's domain proxy, for real: a guest stand-in (see `slots.rs`) connects to ports 443
//! and 80 of a test "internet" *without* asking the slot's DNS server, announcing a name in a
//! TLS ClientHello or an HTTP `Host` header, and only an allowed name gets through. Nothing
//! leaves the machine: the internet is a namespace behind veth `fkpi` (198.51.100.9/30) holding
//! 203.0.113.20 and a 169.254.169.254 stand-in on its loopback, and the slot's traffic is
//! policy-routed into it by a table whose default route is a blackhole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cleanup, LOCK, TestInternet, privileged, stand_in_slot};
use firkin_net::{EgressPolicy, HostNet, PoolConfig, Slot, netns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const HOST_END: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const INET_END: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const ROUTE_TABLE: u32 = 7702;
const SLOT_NS: &str = "fkp-0";
const GUEST_NS: &str = "fkp-g";
const INET_NS: &str = "fkp-inet";

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// What reached a recording listener: one entry per connection, its first bytes.
type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

/// Whether `got` holds a whole message: a TLS record, or an HTTP request's header section.
fn whole(got: &[u8]) -> bool {
    match got {
        [22, _, _, hi, lo, rest @ ..] => rest.len() >= usize::from(u16::from_be_bytes([*hi, *lo])),
        _ => got.ends_with(b"\r\n\r\n"),
    }
}

/// A TCP listener in `ns` (`None`: the root namespace) that records what each connection sends
/// (until it is a whole message or 200 ms pass without more, at most 64 KiB), answers
/// `hello <peer address>` and closes.
async fn recorder(ns: Option<&str>, addr: SocketAddr) -> (tokio::task::JoinHandle<()>, Seen) {
    let bind = move || -> std::io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let l = match ns {
        Some(ns) => netns::run_in_async(ns, bind).await.unwrap().unwrap(),
        None => bind().unwrap(),
    };
    let listener = tokio::net::TcpListener::from_std(l).unwrap();
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        // Bounded: the test aborts the task when it ends.
        while let Ok((mut s, peer)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while got.len() < 64 * 1024 {
                    match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                    if whole(&got) {
                        break;
                    }
                }
                record.lock().unwrap().push(got);
                let _ = s.write_all(format!("hello {}", peer.ip()).as_bytes()).await;
            });
        }
    });
    (task, seen)
}

/// Connects from the guest stand-in to `addr`, sends `payload` and reads the answer until the
/// other side closes: `Ok(answer)`, or `Err(why)` (refused, reset, closed without an answer;
/// every step bounded).
async fn send(addr: SocketAddr, payload: Vec<u8>) -> Result<String, String> {
    let got = netns::run_in_async(GUEST_NS, move || -> Result<String, String> {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        s.write_all(&payload).map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        if buf.is_empty() {
            return Err("closed without an answer".into());
        }
        Ok(buf)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    eprintln!("send to {addr}: {got:?}");
    got
}

fn be16(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap().to_be_bytes()
}

/// A minimal TLS 1.3-style ClientHello announcing `sni` (none: no server_name extension), in
/// one handshake record: what a client's first flight starts with.
fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut exts = vec![0, 43, 0, 3, 2, 3, 4]; // supported_versions: TLS 1.3
    if let Some(name) = sni {
        let mut entry = vec![0];
        entry.extend_from_slice(&be16(name.len()));
        entry.extend_from_slice(name.as_bytes());
        let mut list = be16(entry.len()).to_vec();
        list.extend_from_slice(&entry);
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&be16(list.len()));
        exts.extend_from_slice(&list);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&be16(exts.len()));
    body.extend_from_slice(&exts);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&be16(body.len()));
    hs.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&be16(hs.len()));
    record.extend_from_slice(&hs);
    record
}

fn get(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n").into_bytes()
}

fn domains(names: &[&str]) -> EgressPolicy {
    EgressPolicy {
        deny: vec!["0.0.0.0/0".parse().unwrap()],
        allow_domains: names.iter().map(|d| (*d).to_owned()).collect(),
        ..EgressPolicy::default()
    }
}

/// The rules of the slot's redirect chain, as `nft` lists them.
fn redirect_rules() -> Vec<serde_json::Value> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", SLOT_NS, "nft", "-j", "list", "chain"])
        .args(["inet", "firkin", "domain_redirect"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule").cloned())
        .collect()
}

/// Whether any rule of the redirect chain DNATs (to the proxy).
fn redirects() -> bool {
    redirect_rules()
        .iter()
        .any(|r| r.to_string().contains("\"dnat\""))
}

async fn setup(clean: &mut Cleanup, policy: EgressPolicy) -> (Slot, HostNet) {
    for ns in [SLOT_NS, GUEST_NS, INET_NS] {
        clean.namespaces.push(ns.into());
    }
    for l in ["fkph0", "fkph0p", "fkpi"] {
        clean.links.push(l.into());
    }
    clean.rule_priority = Some(ROUTE_TABLE);
    clean.tables.push("firkin-test-proxy".into());
    let pool = PoolConfig {
        prefix: "fkp".into(),
        range: "198.18.252.0/24".parse().unwrap(),
        host_table: "firkin-test-proxy".into(),
        // Never asked: the tests resolve nothing.
        dns_upstream: vec![sa(INET_END, 53)],
        ..PoolConfig::default()
    };
    let host = HostNet::ensure(&pool).unwrap();

    TestInternet {
        ns: INET_NS,
        link: "fkpi",
        host_end: HOST_END,
        inet_end: INET_END,
        hosts: &[SERVER, METADATA],
        // Were isolation broken, link-local would reach the stand-in rather than anything real.
        extra: &[(Ipv4Addr::new(169, 254, 0, 0), 16)],
        slot_if: "fkph0",
        table: ROUTE_TABLE,
    }
    .build()
    .await;

    let slot = stand_in_slot(&pool, GUEST_NS, policy).await;
    (slot, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connections_pass_by_the_name_they_announce() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    let (mut slot, host) = setup(&mut clean, domains(&["allowed.test"])).await;
    let (t, tls_seen) = recorder(Some(INET_NS), sa(SERVER, 443)).await;
    clean.tasks.push(t);
    let (t, http_seen) = recorder(Some(INET_NS), sa(SERVER, 80)).await;
    clean.tasks.push(t);
    let (t, other_seen) = recorder(Some(INET_NS), sa(SERVER, 8443)).await;
    clean.tasks.push(t);
    let greeting = format!("hello {HOST_END}");
    assert!(redirects(), "{:?}", redirect_rules());

    // TLS: the allowed SNI reaches the server, with the ClientHello intact and from the host's
    // masqueraded address (the upstream left through the slot's veth and the host's NAT).
    let hello = client_hello(Some("allowed.test"));
    assert_eq!(
        send(sa(SERVER, 443), hello.clone()).await,
        Ok(greeting.clone())
    );
    assert_eq!(*tls_seen.lock().unwrap(), vec![hello]);
    // Case and a trailing dot do not matter; another name, no name, or no TLS do.
    assert!(
        send(sa(SERVER, 443), client_hello(Some("ALLOWED.test.")))
            .await
            .is_ok()
    );
    assert!(
        send(sa(SERVER, 443), client_hello(Some("other.test")))
            .await
            .is_err()
    );
    assert!(
        send(sa(SERVER, 443), client_hello(Some("a.allowed.test")))
            .await
            .is_err()
    );
    assert!(send(sa(SERVER, 443), client_hello(None)).await.is_err());
    assert!(send(sa(SERVER, 443), get("allowed.test")).await.is_err());
    assert_eq!(
        tls_seen.lock().unwrap().len(),
        2,
        "a refused name got through"
    );

    // HTTP: the Host header decides the same way.
    let req = get("allowed.test");
    assert_eq!(
        send(sa(SERVER, 80), req.clone()).await,
        Ok(greeting.clone())
    );
    assert_eq!(*http_seen.lock().unwrap(), vec![req]);
    assert!(send(sa(SERVER, 80), get("other.test")).await.is_err());
    assert!(
        send(sa(SERVER, 80), b"GET / HTTP/1.0\r\n\r\n".to_vec())
            .await
            .is_err()
    );
    assert!(
        send(
            sa(SERVER, 80),
            b"GET http://other.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".to_vec()
        )
        .await
        .is_err()
    );
    assert_eq!(
        http_seen.lock().unwrap().len(),
        1,
        "a refused name got through"
    );

    // Other ports are the kernel's alone: refused by the policy, name or not.
    let got = send(sa(SERVER, 8443), client_hello(Some("allowed.test"))).await;
    assert!(matches!(&got, Err(e) if e.contains("refused")), "{got:?}");
    assert!(other_seen.lock().unwrap().is_empty());

    // A refusal is quick (a reset once the name is read), not a timeout.
    let t = Instant::now();
    assert!(
        send(sa(SERVER, 443), client_hello(Some("other.test")))
            .await
            .is_err()
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "slow refusal: {:?}",
        t.elapsed()
    );

    // The cost of the proxy: the same exchange through it, and direct (an allow CIDR for the
    // server keeps the redirect from touching it).
    const ROUNDS: u32 = 20;
    let hello = client_hello(Some("allowed.test"));
    let t = Instant::now();
    for _ in 0..ROUNDS {
        assert!(send(sa(SERVER, 443), hello.clone()).await.is_ok());
    }
    let proxied = t.elapsed() / ROUNDS;
    let mut direct_policy = domains(&["allowed.test"]);
    direct_policy.allow = vec![format!("{SERVER}/32").parse().unwrap()];
    slot.set_policy(direct_policy).await.unwrap();
    let before = tls_seen.lock().unwrap().len();
    let t = Instant::now();
    for _ in 0..ROUNDS {
        assert!(send(sa(SERVER, 443), hello.clone()).await.is_ok());
    }
    let direct = t.elapsed() / ROUNDS;
    // Direct, even a name that is not allowed passes: the CIDR allows the address.
    assert!(
        send(sa(SERVER, 443), client_hello(Some("other.test")))
            .await
            .is_ok()
    );
    assert_eq!(tls_seen.lock().unwrap().len(), before + ROUNDS as usize + 1);
    eprintln!(
        "connect + ClientHello + answer + close, from a fresh thread in the guest's namespace: \
         through the proxy {proxied:?}, direct {direct:?}"
    );

    // Without domains, no redirect at all: the kernel refuses.
    slot.set_policy(EgressPolicy::deny_all()).await.unwrap();
    assert!(!redirects(), "{:?}", redirect_rules());
    assert!(redirect_rules().is_empty(), "{:?}", redirect_rules());
    let got = send(sa(SERVER, 443), client_hello(Some("allowed.test"))).await;
    assert!(matches!(&got, Err(e) if e.contains("refused")), "{got:?}");
    let got = send(sa(SERVER, 80), get("allowed.test")).await;
    assert!(matches!(&got, Err(e) if e.contains("refused")), "{got:?}");
    // And back on with the domains; the new domain list decides.
    slot.set_policy(domains(&["*.allowed.test"])).await.unwrap();
    assert!(redirects());
    assert!(send(sa(SERVER, 80), get("allowed.test")).await.is_err());
    assert_eq!(
        send(sa(SERVER, 80), get("www.allowed.test")).await,
        Ok(greeting.clone())
    );

    slot.destroy().await.unwrap();
    host.remove().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_name_never_opens_the_host_or_link_local() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    let (slot, host) = setup(&mut clean, domains(&["allowed.test"])).await;
    let host_addr = slot.config().host_addr;
    let slot_addr = slot.config().slot_addr;
    // Listeners where an allowed name must not get: the host's end of the slot's veth, the
    // slot's own veth address, and the metadata stand-in. Each answers from where it is.
    let mut seen = Vec::new();
    for (ns, ip) in [
        (None, host_addr),
        (Some(SLOT_NS), slot_addr),
        (Some(INET_NS), METADATA),
    ] {
        for port in [443, 80] {
            let (t, s) = recorder(ns, sa(ip, port)).await;
            clean.tasks.push(t);
            seen.push((ip, port, s));
        }
    }
    assert!(common::probe_here(sa(host_addr, 443)).await.is_ok());
    // An address of the host outside the pool's range (the test internet's veth end): not
    // always-denied, so the redirect sends it to the proxy, whose upstream socket leaves
    // through the slot's veth and meets the host's input chain.
    let (t, host_other) = recorder(None, sa(HOST_END, 443)).await;
    clean.tasks.push(t);
    let got = send(sa(HOST_END, 443), client_hello(Some("allowed.test"))).await;
    assert!(got.is_err(), "the host's {HOST_END} reached: {got:?}");
    assert!(host_other.lock().unwrap().is_empty());

    for ip in [host_addr, slot_addr, METADATA] {
        let got = send(sa(ip, 443), client_hello(Some("allowed.test"))).await;
        assert!(got.is_err(), "{ip}:443 reached: {got:?}");
        let got = send(sa(ip, 80), get("allowed.test")).await;
        assert!(got.is_err(), "{ip}:80 reached: {got:?}");
    }
    // The host's listener answered the test itself once; nothing else ever reached them.
    for (ip, port, s) in &seen {
        let expected = usize::from(*ip == host_addr && *port == 443);
        assert_eq!(s.lock().unwrap().len(), expected, "{ip}:{port} was reached");
    }
    // While the same name to the internet passes: the refusals above are the destination's.
    let (t, _) = recorder(Some(INET_NS), sa(SERVER, 443)).await;
    clean.tasks.push(t);
    assert!(
        send(sa(SERVER, 443), client_hello(Some("allowed.test")))
            .await
            .is_ok()
    );

    slot.destroy().await.unwrap();
    host.remove().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_bounded_in_number_and_time() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    let (slot, host) = setup(&mut clean, domains(&["allowed.test"])).await;
    let (t, seen) = recorder(Some(INET_NS), sa(SERVER, 443)).await;
    clean.tasks.push(t);
    let hello = client_hello(Some("allowed.test"));
    // The proxy's limit (256) of connections that send a few bytes of a ClientHello and stop,
    // then one more with a whole allowed ClientHello: reset at once, the limit is full; then
    // the stalled ones are reset when their 5 s to name a server run out, and a new one passes.
    let (stalled, extra, waited) = netns::run_in_async(GUEST_NS, move || {
        let to = sa(SERVER, 443);
        let mut stalled = Vec::new();
        for _ in 0..256 {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            s.write_all(&hello[..10]).unwrap();
            stalled.push(s);
        }
        // Let the proxy accept them all before the extra one.
        std::thread::sleep(Duration::from_millis(500));
        let extra = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(&hello)?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok(buf)
        })();
        let started = Instant::now();
        let first = &mut stalled[0];
        first
            .set_read_timeout(Some(Duration::from_secs(8)))
            .unwrap();
        let mut buf = [0u8; 16];
        let ended = first.read(&mut buf);
        (
            stalled.len(),
            extra.map_err(|e| e.to_string()),
            (started.elapsed(), ended.map_err(|e| e.kind())),
        )
    })
    .await
    .unwrap();
    eprintln!("stalled {stalled}; extra: {extra:?}; first stalled ended after {waited:?}");
    assert!(extra.is_err(), "the 257th connection was served: {extra:?}");
    let (after, ended) = waited;
    // Reset (or closed) by the proxy, within its 5 s (less the time spent above), not by the
    // test's 8 s read timeout.
    assert!(
        matches!(ended, Err(std::io::ErrorKind::ConnectionReset) | Ok(0)),
        "{ended:?}"
    );
    assert!(after < Duration::from_secs(6), "{after:?}");
    assert!(seen.lock().unwrap().is_empty());
    // Some time for the proxy to drop the others, then there is room again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        send(sa(SERVER, 443), client_hello(Some("allowed.test")))
            .await
            .is_ok()
    );
    assert_eq!(seen.lock().unwrap().len(), 1);

    slot.destroy().await.unwrap();
    host.remove().unwrap();
}
