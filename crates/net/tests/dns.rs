//! A slot's DNS server and domain grants, for real: a guest stand-in (see `slots.rs`) asks
//! 10.0.2.3, the slot resolves through a stand-in upstream server in a test "internet"
//! namespace and opens the addresses of allowed domains. Nothing leaves the machine: the
//! upstream is 198.51.100.6 on a veth the test makes, the internet's hosts are 203.0.113.10
//! and .20 on its loopback, and the slot's traffic is policy-routed into it by a table whose
//! default route is a blackhole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::{Cleanup, LOCK, TestInternet, listen, privileged, probe, stand_in_slot};
use firkin_net::{EgressPolicy, HostNet, PoolConfig, Slot, netns};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 6);
const HOST_END: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
const GUEST_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const ROUTE_TABLE: u32 = 7701;
/// The hosts' listening port: not 80 or 443, whose connections a policy with domains hands
/// to the slot's domain proxy (`proxy.rs`); here the kernel's grants alone decide.
const WEB: u16 = 8080;
const GUEST_NS: &str = "fkd-g";
const INET_NS: &str = "fkd-inet";

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// A refused connection: the slot's `reject` answered (a listener was there, so nothing else
/// refuses), and at once rather than by a timeout.
fn refused(got: &Result<String, String>) -> bool {
    eprintln!("probe: {got:?}");
    matches!(got, Err(e) if e.contains("refused"))
}

/// The stand-in upstream's zone.
fn zone(name: &str) -> Option<Ipv4Addr> {
    match name {
        "allowed.test." | "a.b.allowed.test." => Some(ALLOWED),
        "other.test." => Some(OTHER),
        _ => None,
    }
}

/// The stand-in upstream: a UDP responder bound in namespace `ns`, answering A questions from
/// [`zone`] (TTL 300), AAAA questions for those names with ::1, NXDOMAIN for every other
/// name, and an empty NOERROR for other types.
/// Ends when the test aborts it.
async fn upstream(ns: &str, at: SocketAddr) -> tokio::task::JoinHandle<()> {
    let std_socket = netns::run_in_async(ns, move || {
        let s = UdpSocket::bind(at)?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(s)
    })
    .await
    .unwrap()
    .unwrap();
    let socket = tokio::net::UdpSocket::from_std(std_socket).unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.queries = q.queries.clone();
            if let Some(query) = q.queries.first() {
                let name = query.name().to_ascii().to_ascii_lowercase();
                match (zone(&name), query.query_type()) {
                    // Bigger than a plain UDP answer (512 bytes), within the resolver's EDNS.
                    (_, RecordType::TXT) if name == "big.test." => {
                        let strings = vec!["x".repeat(100); 8];
                        r.answers.push(Record::from_rdata(
                            query.name().clone(),
                            300,
                            RData::TXT(TXT::new(strings)),
                        ));
                    }
                    (None, _) => r.metadata.response_code = ResponseCode::NXDomain,
                    (Some(ip), RecordType::A) => {
                        r.answers.push(Record::from_rdata(
                            query.name().clone(),
                            300,
                            RData::A(A::from(ip)),
                        ));
                    }
                    // An IPv6 address the slot must not pass on (it has no IPv6 route).
                    (Some(_), RecordType::AAAA) => {
                        r.answers.push(Record::from_rdata(
                            query.name().clone(),
                            300,
                            RData::AAAA(AAAA::from(std::net::Ipv6Addr::LOCALHOST)),
                        ));
                    }
                    (Some(_), _) => {}
                }
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    })
}

/// What a guest's resolver got: the response code and the A records' addresses.
type Answer = (ResponseCode, Vec<Ipv4Addr>);

fn question(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m
}

fn parse_answer(sent: &Message, bytes: &[u8]) -> Result<Answer, String> {
    let r = Message::from_vec(bytes).map_err(|e| e.to_string())?;
    if r.metadata.id != sent.metadata.id || r.metadata.message_type != MessageType::Response {
        return Err(format!("not our answer: {r:?}"));
    }
    if let Some(v6) = r
        .answers
        .iter()
        .find(|rec| matches!(rec.data, RData::AAAA(_)))
    {
        return Err(format!("an IPv6 answer reached the guest: {v6:?}"));
    }
    let addrs = r
        .answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Ok((r.metadata.response_code, addrs))
}

/// Asks `server` from namespace `ns`, over UDP or TCP, bounded to 3 s.
async fn ask(
    ns: &str,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    tcp: bool,
) -> Result<Answer, String> {
    let q = question(name, rtype);
    let reply = exchange(ns, server, q.clone(), tcp).await?;
    parse_answer(&q, &reply)
}

/// Sends `q` to `server` from namespace `ns` and returns the reply's bytes.
async fn exchange(ns: &str, server: SocketAddr, q: Message, tcp: bool) -> Result<Vec<u8>, String> {
    netns::run_in_async(ns, move || -> Result<Vec<u8>, String> {
        let wire = q.to_vec().map_err(|e| e.to_string())?;
        let limit = Some(Duration::from_secs(3));
        if tcp {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(limit).map_err(|e| e.to_string())?;
            let len = u16::try_from(wire.len()).map_err(|e| e.to_string())?;
            s.write_all(&len.to_be_bytes()).map_err(|e| e.to_string())?;
            s.write_all(&wire).map_err(|e| e.to_string())?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            Ok(buf)
        } else {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(limit).map_err(|e| e.to_string())?;
            s.send_to(&wire, server).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 4096];
            let (n, _) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n);
            Ok(buf)
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// An A question to the guest's name server over UDP.
async fn resolve(name: &str) -> Result<Answer, String> {
    let got = ask(GUEST_NS, sa(GUEST_DNS, 53), name, RecordType::A, false).await;
    eprintln!("resolve {name}: {got:?}");
    got
}

/// The slot's `allow_dns` set as `nft` lists it: (address, timeout in seconds).
fn granted(ns: &str) -> Vec<(Ipv4Addr, u64)> {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "-j", "list", "set", "inet", "firkin",
        ])
        .arg("allow_dns")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let set = json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("set"))
        .unwrap();
    let Some(elems) = set.get("elem").and_then(|e| e.as_array()) else {
        return Vec::new();
    };
    elems
        .iter()
        .map(|e| {
            let e = &e["elem"];
            (
                e["val"].as_str().unwrap().parse().unwrap(),
                e["timeout"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn deny_all_but(domains: &[&str]) -> EgressPolicy {
    EgressPolicy {
        deny: vec!["0.0.0.0/0".parse().unwrap()],
        allow_domains: domains.iter().map(|d| (*d).to_owned()).collect(),
        ..EgressPolicy::default()
    }
}

/// Slot `fkd-0` with its guest stand-in in `fkd-g`, the internet namespace with the upstream
/// and listeners on port [`WEB`] of both hosts. Everything is registered in `clean` first.
async fn setup(clean: &mut Cleanup, policy: EgressPolicy) -> (Slot, HostNet) {
    for ns in ["fkd-0", GUEST_NS, INET_NS] {
        clean.namespaces.push(ns.into());
    }
    for l in ["fkdh0", "fkdh0p", "fkdi"] {
        clean.links.push(l.into());
    }
    clean.rule_priority = Some(ROUTE_TABLE);
    clean.tables.push("firkin-test-dns".into());

    let pool = PoolConfig {
        prefix: "fkd".into(),
        range: "198.18.253.0/24".parse().unwrap(),
        host_table: "firkin-test-dns".into(),
        dns_upstream: vec![sa(UPSTREAM, 53)],
        ..PoolConfig::default()
    };
    let host = HostNet::ensure(&pool).unwrap();

    // The internet: its veth end is the upstream's address; the hosts sit on its loopback.
    TestInternet {
        ns: INET_NS,
        link: "fkdi",
        host_end: HOST_END,
        inet_end: UPSTREAM,
        hosts: &[ALLOWED, OTHER],
        extra: &[],
        slot_if: "fkdh0",
        table: ROUTE_TABLE,
    }
    .build()
    .await;
    clean.tasks.push(upstream(INET_NS, sa(UPSTREAM, 53)).await);
    for ip in [ALLOWED, OTHER] {
        let (_, t) = listen(Some(INET_NS), sa(ip, WEB)).await;
        clean.tasks.push(t);
    }

    let slot = stand_in_slot(&pool, GUEST_NS, policy).await;
    (slot, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guests_name_server_answers_and_opens_allowed_domains_only() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    let (mut slot, host) = setup(&mut clean, deny_all_but(&["allowed.test"])).await;

    // (b) Before any lookup, the policy refuses both hosts, at once.
    let started = Instant::now();
    assert!(refused(&probe(GUEST_NS, sa(ALLOWED, WEB)).await));
    assert!(refused(&probe(GUEST_NS, sa(OTHER, WEB)).await));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refusals were slow"
    );

    // (a) The guest's name server answers through the upstream, although the policy denies
    // every address: its questions leave from the host, not through the slot's policy.
    assert_eq!(
        resolve("other.test").await,
        Ok((ResponseCode::NoError, vec![OTHER]))
    );
    // A lookup of a name that is not allowed opens nothing.
    assert!(refused(&probe(GUEST_NS, sa(OTHER, WEB)).await));
    assert_eq!(
        resolve("nope.test").await,
        Ok((ResponseCode::NXDomain, vec![]))
    );
    let first = Instant::now();
    assert_eq!(
        resolve("allowed.test").await,
        Ok((ResponseCode::NoError, vec![ALLOWED]))
    );
    let first = first.elapsed();
    // (b) The answer's address is open as soon as the guest has the answer.
    assert_eq!(
        probe(GUEST_NS, sa(ALLOWED, WEB)).await,
        Ok(format!("hello {HOST_END}"))
    );
    assert!(refused(&probe(GUEST_NS, sa(OTHER, WEB)).await));
    // In the set for the answer's TTL (300 s, within the 60 s..1 h clamp), and alone.
    assert_eq!(granted(slot.netns()), vec![(ALLOWED, 300)]);
    // Over TCP too; AAAA is answered without addresses (the slot has no IPv6) but keeps
    // NXDOMAIN; mixed case matches.
    assert_eq!(
        ask(
            GUEST_NS,
            sa(GUEST_DNS, 53),
            "Allowed.TEST",
            RecordType::A,
            true
        )
        .await,
        Ok((ResponseCode::NoError, vec![ALLOWED]))
    );
    assert_eq!(
        ask(
            GUEST_NS,
            sa(GUEST_DNS, 53),
            "nope.test",
            RecordType::A,
            true
        )
        .await,
        Ok((ResponseCode::NXDomain, vec![]))
    );
    assert_eq!(
        ask(
            GUEST_NS,
            sa(GUEST_DNS, 53),
            "allowed.test",
            RecordType::AAAA,
            false
        )
        .await,
        Ok((ResponseCode::NoError, vec![]))
    );
    assert_eq!(
        ask(
            GUEST_NS,
            sa(GUEST_DNS, 53),
            "nope.test",
            RecordType::AAAA,
            false
        )
        .await,
        Ok((ResponseCode::NXDomain, vec![]))
    );

    // An answer too big for plain UDP is truncated there, and whole over TCP.
    let big = question("big.test", RecordType::TXT);
    let udp = exchange(GUEST_NS, sa(GUEST_DNS, 53), big.clone(), false)
        .await
        .and_then(|b| Message::from_vec(&b).map_err(|e| e.to_string()))
        .unwrap();
    assert!(udp.metadata.truncation, "{udp:?}");
    assert!(udp.answers.is_empty());
    let tcp = exchange(GUEST_NS, sa(GUEST_DNS, 53), big, true)
        .await
        .and_then(|b| Message::from_vec(&b).map_err(|e| e.to_string()))
        .unwrap();
    assert!(!tcp.metadata.truncation);
    assert!(
        matches!(tcp.answers.as_slice(), [r] if matches!(&r.data, RData::TXT(t) if t.txt_data.len() == 8)),
        "{tcp:?}"
    );

    // The cost of a grant: the same (now cached) answer after the grants were flushed, which
    // runs `nft`, against once more, which finds the grant and runs nothing.
    slot.set_policy(deny_all_but(&["allowed.test"]))
        .await
        .unwrap();
    assert!(
        refused(&probe(GUEST_NS, sa(ALLOWED, WEB)).await),
        "a policy change kept an old grant"
    );
    assert_eq!(granted(slot.netns()), vec![]);
    let mut granting = Duration::ZERO;
    let mut skipping = Duration::ZERO;
    const ROUNDS: u32 = 20;
    for _ in 0..ROUNDS {
        slot.set_policy(deny_all_but(&["allowed.test"]))
            .await
            .unwrap();
        let t = Instant::now();
        assert_eq!(
            resolve("allowed.test").await,
            Ok((ResponseCode::NoError, vec![ALLOWED]))
        );
        granting += t.elapsed();
        let t = Instant::now();
        assert_eq!(
            resolve("allowed.test").await,
            Ok((ResponseCode::NoError, vec![ALLOWED]))
        );
        skipping += t.elapsed();
    }
    eprintln!(
        "first lookup (upstream + grant) {first:?}; cached answer with a grant {:?}, \
         without {:?}: a grant costs ~{:?}",
        granting / ROUNDS,
        skipping / ROUNDS,
        (granting.saturating_sub(skipping)) / ROUNDS
    );
    assert!(probe(GUEST_NS, sa(ALLOWED, WEB)).await.is_ok());

    // (c) A wildcard covers any depth below, not the apex.
    slot.set_policy(deny_all_but(&["*.allowed.test"]))
        .await
        .unwrap();
    assert!(refused(&probe(GUEST_NS, sa(ALLOWED, WEB)).await));
    assert_eq!(
        resolve("allowed.test").await,
        Ok((ResponseCode::NoError, vec![ALLOWED]))
    );
    assert!(
        refused(&probe(GUEST_NS, sa(ALLOWED, WEB)).await),
        "*.allowed.test opened the apex"
    );
    assert_eq!(
        resolve("a.b.allowed.test").await,
        Ok((ResponseCode::NoError, vec![ALLOWED]))
    );
    assert!(probe(GUEST_NS, sa(ALLOWED, WEB)).await.is_ok());

    // (d) A policy without the domain revokes its grant, and a new lookup does not bring it
    // back; the new policy's domain works.
    slot.set_policy(deny_all_but(&["other.test"]))
        .await
        .unwrap();
    assert!(refused(&probe(GUEST_NS, sa(ALLOWED, WEB)).await));
    assert_eq!(
        resolve("a.b.allowed.test").await,
        Ok((ResponseCode::NoError, vec![ALLOWED]))
    );
    assert!(refused(&probe(GUEST_NS, sa(ALLOWED, WEB)).await));
    assert!(refused(&probe(GUEST_NS, sa(OTHER, WEB)).await));
    assert_eq!(
        resolve("other.test").await,
        Ok((ResponseCode::NoError, vec![OTHER]))
    );
    assert!(probe(GUEST_NS, sa(OTHER, WEB)).await.is_ok());

    slot.destroy().await.unwrap();
    host.remove().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_reaches_nothing_else_of_the_slot() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    let (slot, host) = setup(&mut clean, EgressPolicy::default()).await;
    let ns = slot.netns().to_owned();

    // Listeners in the slot's namespace where the guest must not get: DNS on the gateway's
    // address (UDP and TCP), and another port of the DNS address. Were the firewall open,
    // they would answer.
    clean.tasks.push(upstream(&ns, sa(GATEWAY, 53)).await);
    let (_, t) = listen(Some(&ns), sa(GATEWAY, 53)).await;
    clean.tasks.push(t);
    let (_, t) = listen(Some(&ns), sa(GUEST_DNS, 8053)).await;
    clean.tasks.push(t);
    // The same listeners answer from inside the slot: the refusals below are the firewall's.
    assert!(
        ask(&ns, sa(GATEWAY, 53), "allowed.test", RecordType::A, false)
            .await
            .is_ok()
    );
    assert!(probe(&ns, sa(GUEST_DNS, 8053)).await.is_ok());

    assert!(refused(&probe(GUEST_NS, sa(GATEWAY, 53)).await));
    assert!(refused(&probe(GUEST_NS, sa(GUEST_DNS, 8053)).await));
    let got = ask(
        GUEST_NS,
        sa(GATEWAY, 53),
        "allowed.test",
        RecordType::A,
        false,
    )
    .await;
    assert!(got.is_err(), "the guest got DNS from the gateway: {got:?}");
    // While its name server works, and the default policy lets it out.
    assert_eq!(
        resolve("allowed.test").await,
        Ok((ResponseCode::NoError, vec![ALLOWED]))
    );
    assert!(probe(GUEST_NS, sa(OTHER, WEB)).await.is_ok());

    slot.destroy().await.unwrap();
    host.remove().unwrap();
    drop(clean);
    for ns in ["fkd-0", GUEST_NS, INET_NS] {
        assert!(!netns::exists(ns), "{ns} left behind");
    }
}
