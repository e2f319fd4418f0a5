//! Real network slots on this machine, with a guest stand-in and a test "internet", all inside
//! namespaces the test creates. Nothing is sent off the machine: the "internet" is a namespace
//! holding documentation addresses (203.0.113.10, and a 169.254.169.254 stand-in), and the
//! slots' traffic is policy-routed into it by a table whose default route is a blackhole.
//!
//! The guest stand-in: instead of a TAP and a VM, the slot's `tap0` is one end of a veth whose
//! other end sits in a "guest" namespace configured as `firkin-init` configures a guest
//! (10.0.2.15/24, gateway 10.0.2.2). The slot's addresses, routes and nftables rules match the
//! device by name only, so the stand-in passes exactly the rules a guest behind a TAP would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{
    Cleanup, LOCK, listen, nft_table_exists, privileged, probe, probe_here, root_links_named,
};
use firkin_net::{
    EgressPolicy, GuestDevice, HostNet, PoolConfig, Slot, SlotPool, Verdict, links, netns,
};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::rule::RuleAction;

const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const ROUTE_TABLE: u32 = 7700;

/// A refused connection: the slot's or the host's `reject` answered (a listener was there, so
/// nothing else refuses), rather than a timeout or a missing route.
fn refused(got: &Result<String, String>) -> bool {
    eprintln!("probe: {got:?}");
    matches!(got, Err(e) if e.contains("refused"))
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The test "internet": namespace `fkx-inet` behind veth `fkxi` (198.51.100.1/30 on the host,
/// .2 inside), holding 203.0.113.10 and 169.254.169.254 on its loopback. Only traffic arriving
/// from the test slots' host veths is routed there (policy routing, table 7700); everything
/// else those slots send is blackholed, so a failing isolation check sends nothing out.
async fn build_internet(host_ifs: &[&str]) {
    netns::create("fkx-inet").unwrap();
    let root = links::connect(None).await.unwrap();
    links::add_veth(&root, "fkxi", "fkxip").await.unwrap();
    links::move_to(&root, "fkxip", "fkx-inet").await.unwrap();
    links::address(&root, "fkxi", Ipv4Addr::new(198, 51, 100, 1), 30)
        .await
        .unwrap();
    links::up(&root, "fkxi").await.unwrap();
    let inet = links::connect(Some("fkx-inet")).await.unwrap();
    links::rename(&inet, "fkxip", "eth0").await.unwrap();
    links::address(&inet, "eth0", Ipv4Addr::new(198, 51, 100, 2), 30)
        .await
        .unwrap();
    links::up(&inet, "eth0").await.unwrap();
    links::up(&inet, "lo").await.unwrap();
    links::address(&inet, "lo", INTERNET, 32).await.unwrap();
    links::address(&inet, "lo", METADATA, 32).await.unwrap();
    links::default_route(&inet, Ipv4Addr::new(198, 51, 100, 1))
        .await
        .unwrap();

    let via = Some(Ipv4Addr::new(198, 51, 100, 2));
    links::route_in_table(&root, Ipv4Addr::new(203, 0, 113, 0), 24, via, ROUTE_TABLE)
        .await
        .unwrap();
    links::route_in_table(&root, Ipv4Addr::new(169, 254, 0, 0), 16, via, ROUTE_TABLE)
        .await
        .unwrap();
    links::route_in_table(&root, Ipv4Addr::UNSPECIFIED, 0, None, ROUTE_TABLE)
        .await
        .unwrap();
    for ifname in host_ifs {
        root.rule()
            .add()
            .v4()
            .input_interface(*ifname)
            .table_id(ROUTE_TABLE)
            .priority(ROUTE_TABLE)
            .action(RuleAction::ToTable)
            .execute()
            .await
            .unwrap();
    }
}

/// Every IPv4 address of the root namespace (the host's).
async fn host_addresses() -> Vec<Ipv4Addr> {
    let root = links::connect(None).await.unwrap();
    let all: Vec<_> = root.address().get().execute().try_collect().await.unwrap();
    all.into_iter()
        .flat_map(|m| m.attributes)
        .filter_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        })
        .collect()
}

/// How many connections namespace `ns` tracks (its own view of `nf_conntrack`).
fn conntrack_entries(ns: &str) -> usize {
    netns::run_in(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").map(|t| t.lines().count())
    })
    .unwrap()
    .unwrap()
}

/// The neighbour entries of link `ifname` in namespace `ns`, as `ip neigh` prints them.
fn neighbours(ns: &str, ifname: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-4", "neigh", "show", "dev", ifname])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn test_pool(prefix: &str, range: &str, table: &str) -> PoolConfig {
    PoolConfig {
        prefix: prefix.into(),
        range: range.parse().unwrap(),
        host_table: table.into(),
        ..PoolConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reaches_the_internet_and_nothing_of_the_host_or_other_slots() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    for ns in ["fkx-0", "fkx-1", "fkx-ga", "fkx-gb", "fkx-inet"] {
        clean.namespaces.push(ns.into());
    }
    for l in ["fkxh0", "fkxh1", "fkxh0p", "fkxh1p", "fkxi"] {
        clean.links.push(l.into());
    }
    clean.rule_priority = Some(ROUTE_TABLE);
    clean.tables.push("firkin-test".into());

    let pool = test_pool("fkx", "198.18.250.0/24", "firkin-test");
    let host = HostNet::ensure(&pool).unwrap();
    netns::create("fkx-ga").unwrap();
    netns::create("fkx-gb").unwrap();
    let mut cfg_a = pool.slot(0).unwrap();
    cfg_a.device = GuestDevice::VethInto {
        netns: "fkx-ga".into(),
    };
    let mut cfg_b = pool.slot(1).unwrap();
    cfg_b.device = GuestDevice::VethInto {
        netns: "fkx-gb".into(),
    };
    let slot_b_addr = cfg_b.slot_addr;
    let started = std::time::Instant::now();
    let mut a = Slot::create(cfg_a.clone()).await.unwrap();
    eprintln!("one slot created in {:?}", started.elapsed());
    let b = Slot::create(cfg_b).await.unwrap();
    build_internet(&["fkxh0", "fkxh1"]).await;

    let (internet, t) = listen(Some("fkx-inet"), sa(INTERNET, 0)).await;
    clean.tasks.push(t);
    let (metadata, t) = listen(Some("fkx-inet"), sa(METADATA, 0)).await;
    clean.tasks.push(t);
    let (guest_b, t) = listen(Some("fkx-gb"), sa(Ipv4Addr::new(10, 0, 2, 15), 0)).await;
    clean.tasks.push(t);
    let mut host_listeners = Vec::new();
    for ip in host_addresses().await {
        let (addr, t) = listen(None, sa(ip, 0)).await;
        clean.tasks.push(t);
        host_listeners.push(addr);
    }
    assert!(
        host_listeners
            .iter()
            .any(|a| a.ip() == IpAddr::V4(cfg_a.host_addr))
    );

    // Out through both NATs: the internet sees the host's address on that link.
    assert_eq!(
        probe("fkx-ga", internet).await,
        Ok("hello 198.51.100.1".into())
    );
    // No address of the host, on any interface, loopback included.
    for addr in &host_listeners {
        let got = probe("fkx-ga", *addr).await;
        assert!(refused(&got), "guest reached host listener {addr}: {got:?}");
    }
    // The guest's own 127.0.0.1 is its loopback, not the host's.
    let host_lo = host_listeners
        .iter()
        .find(|a| a.ip().is_loopback())
        .unwrap();
    assert!(probe("fkx-ga", *host_lo).await.is_err());
    // The host reaches a guest's port through the slot's address (the sandbox plane's path)...
    assert_eq!(
        probe_here(sa(slot_b_addr, guest_b.port())).await,
        Ok("hello 198.18.250.5".into())
    );
    // ...but another slot's guest cannot.
    let got = probe("fkx-ga", sa(slot_b_addr, guest_b.port())).await;
    assert!(refused(&got), "guest reached another slot's guest: {got:?}");
    // Link-local metadata: routed to the stand-in like the internet, and still refused.
    let got = probe("fkx-ga", metadata).await;
    assert!(refused(&got), "guest reached 169.254.169.254: {got:?}");

    // A policy applied at run time.
    let deny = EgressPolicy {
        deny: vec!["203.0.113.0/24".parse().unwrap()],
        ..EgressPolicy::default()
    };
    a.set_policy(deny).await.unwrap();
    assert!(refused(&probe("fkx-ga", internet).await));
    // Per slot: the other is unaffected.
    assert!(probe("fkx-gb", internet).await.is_ok());
    // Allow wins over deny-all, as in E2B.
    let only = EgressPolicy {
        allow: vec!["203.0.113.10".parse().unwrap()],
        default: Verdict::Deny,
        ..EgressPolicy::default()
    };
    a.set_policy(only).await.unwrap();
    assert!(probe("fkx-ga", internet).await.is_ok());
    a.set_policy(EgressPolicy::deny_all()).await.unwrap();
    assert!(probe("fkx-ga", internet).await.is_err());

    // Recycled for the next sandbox: the pool's default policy back, and nothing of the last
    // guest remembered (the connections it made are tracked for minutes after they close).
    assert!(conntrack_entries("fkx-0") > 0);
    assert!(!neighbours("fkx-0", "tap0").is_empty());
    a.reset(EgressPolicy::default()).await.unwrap();
    assert_eq!(conntrack_entries("fkx-0"), 0);
    assert_eq!(neighbours("fkx-0", "tap0"), "");
    assert_eq!(
        probe("fkx-ga", internet).await,
        Ok("hello 198.51.100.1".into())
    );
    // A reset to a policy that is not the slot's applies it.
    a.reset(EgressPolicy::deny_all()).await.unwrap();
    assert!(probe("fkx-ga", internet).await.is_err());

    a.destroy().await.unwrap();
    b.destroy().await.unwrap();
    host.remove().unwrap();
    // Destroy is idempotent: again on nothing is fine.
    Slot::create(cfg_a.clone())
        .await
        .unwrap()
        .destroy()
        .await
        .unwrap();
    assert!(!netns::exists("fkx-0") && !netns::exists("fkx-1"));
    assert_eq!(root_links_named("fkxh").await, Vec::<String>::new());
    assert!(!nft_table_exists("firkin-test"));

    drop(clean);
    for ns in ["fkx-ga", "fkx-gb", "fkx-inet"] {
        assert!(!netns::exists(ns), "{ns} left behind");
    }
    assert_eq!(root_links_named("fkx").await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_slots_ready_and_leaves_nothing() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    for i in 0..4 {
        clean.namespaces.push(format!("fky-{i}"));
        clean.links.push(format!("fkyh{i}"));
        clean.links.push(format!("fkyh{i}p"));
    }
    clean.tables.push("firkin-test-pool".into());
    let config = PoolConfig {
        ready: 2,
        max: 3,
        ..test_pool("fky", "198.18.251.0/24", "firkin-test-pool")
    };
    let pool = SlotPool::start(config).unwrap();
    assert!(
        pool.wait_ready(2, Duration::from_secs(30)).await,
        "pool never filled"
    );

    let first = pool.take().expect("a ready slot");
    // A real TAP, in the slot's namespace, ready for a QEMU started there.
    let inner = links::connect(Some(first.netns())).await.unwrap();
    assert!(links::index(&inner, "tap0").await.unwrap().is_some());
    // Every slot's gateway has the one MAC a restored guest's ARP cache already holds.
    let shown = std::process::Command::new("ip")
        .args(["-n", first.netns(), "link", "show", "tap0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("02:66:6b:00:00:01"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
    assert!(
        pool.wait_ready(2, Duration::from_secs(30)).await,
        "pool never refilled"
    );
    let second = pool.take().expect("a second ready slot");
    // Three exist (two out, one ready): the bound stops the refill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.ready(), 1);
    assert_ne!(first.netns(), second.netns());

    pool.release(first).await.unwrap();
    assert!(
        pool.wait_ready(2, Duration::from_secs(30)).await,
        "release did not free room"
    );
    pool.release(second).await.unwrap();
    // A slot still out at shutdown keeps the host table; its release, the last, removes it.
    let held = pool.take().expect("a ready slot to hold across shutdown");
    pool.shutdown().await.unwrap();
    assert!(
        nft_table_exists("firkin-test-pool"),
        "removed under a live slot"
    );
    pool.release(held).await.unwrap();
    assert_eq!(root_links_named("fkyh").await, Vec::<String>::new());
    for i in 0..4 {
        assert!(!netns::exists(&format!("fky-{i}")));
    }
    assert!(!nft_table_exists("firkin-test-pool"));

    // A server killed without its shutdown leaves its slots; the next pool of the prefix
    // removes them before it builds any.
    let config = PoolConfig {
        ready: 0,
        max: 3,
        ..test_pool("fky", "198.18.251.0/24", "firkin-test-pool")
    };
    let crashed = SlotPool::start(config.clone()).unwrap();
    let left = crashed.take_or_create().await.unwrap();
    let left_name = left.netns().to_owned();
    std::mem::forget(left);
    assert!(netns::exists(&left_name));
    // While a pool holds the prefix, another is refused rather than sweeping its slots.
    let err = SlotPool::start(config.clone()).unwrap_err();
    assert!(err.to_string().contains("--net-prefix"), "{err}");
    assert!(netns::exists(&left_name));
    // A shut-down pool gives its prefix up (a killed process's lock goes with it).
    crashed.shutdown().await.unwrap();
    // Another prefix on the same addresses is refused: its routes would collide.
    let err = SlotPool::start(PoolConfig {
        ready: 0,
        ..test_pool("fkz", "198.18.251.0/24", "firkin-test-pool-z")
    })
    .unwrap_err();
    assert!(err.to_string().contains("--net-range"), "{err}");
    let next = SlotPool::start(config).unwrap();
    assert!(!netns::exists(&left_name), "{left_name} was not swept");
    assert_eq!(root_links_named("fkyh").await, Vec::<String>::new());
    next.shutdown().await.unwrap();
    assert!(!nft_table_exists("firkin-test-pool"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_fails_half_way_leaves_nothing_and_names_its_step() {
    let _serial = LOCK.lock().await;
    if !privileged() {
        return;
    }
    let mut clean = Cleanup::new();
    clean.namespaces.push("fkz-0".into());
    clean.links.push("fkzh0".into());
    clean.links.push("fkzh0p".into());
    let mut cfg = test_pool("fkz", "198.18.252.0/24", "firkin-test-fail")
        .slot(0)
        .unwrap();
    // Longer than IFNAMSIZ: the namespace and the veth exist by the time the TAP fails.
    cfg.guest_if = "a-name-too-long-for-linux".into();
    let err = Slot::create(cfg).await.unwrap_err();
    assert_eq!(err.step, firkin_net::Step::CreateTap, "{err}");
    assert_eq!(err.slot, "fkz-0");
    assert!(!netns::exists("fkz-0"));
    assert_eq!(root_links_named("fkzh").await, Vec::<String>::new());
}
