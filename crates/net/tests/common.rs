//! Shared pieces of the slot tests: the privilege check, listeners and probes inside
//! namespaces, and clean-up that runs even when a test fails.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use firkin_net::{EgressPolicy, GuestDevice, PoolConfig, Slot, links, netns};
use rtnetlink::packet_route::rule::RuleAction;

/// Tests build real namespaces and rules: they need root's CAP_NET_ADMIN and CAP_SYS_ADMIN
/// (namespaces, bind mounts), `/dev/net/tun` and the `nft` program. Without them they say so
/// and pass, so a developer's unprivileged `cargo test` stays green.
pub fn privileged() -> bool {
    match firkin_net::missing_requirements() {
        None => true,
        Some(missing) => {
            eprintln!("SKIPPED: network slot tests need {missing}");
            false
        }
    }
}

/// Serialises the tests of one binary: they share the host's forwarding switch.
pub static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A TCP listener that answers every connection with `hello <peer address>` and closes it.
/// Bound in namespace `ns` (`None`: the test's own, the root namespace).
pub async fn listen(
    ns: Option<&str>,
    addr: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let bind = move || -> std::io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let std_listener = match ns {
        Some(ns) => netns::run_in_async(ns, bind).await.unwrap().unwrap(),
        None => bind().unwrap(),
    };
    let local = std_listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    let task = tokio::spawn(async move {
        // Bounded: the test aborts the task when it ends.
        while let Ok((mut s, peer)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(format!("hello {}", peer.ip()).as_bytes()).await;
        }
    });
    (local, task)
}

/// Connects from namespace `ns` to `addr`: `Ok(greeting)` if a listener answered, `Err(why)`
/// if the connection was refused, rejected or timed out (each bounded to 2 s).
pub async fn probe(ns: &str, addr: SocketAddr) -> Result<String, String> {
    netns::run_in_async(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        if buf.is_empty() {
            return Err("closed without a greeting".into());
        }
        Ok(buf)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Connects from the test's own (root) namespace.
pub async fn probe_here(addr: SocketAddr) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        Ok(buf)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Everything a test made, removed on drop (also after a failed assertion): namespaces,
/// root-namespace links, policy-routing rules of one priority, nft tables, and the host's
/// forwarding switch put back as it was.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub rule_priority: Option<u32>,
    pub tables: Vec<String>,
    pub ip_forward: Option<String>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Cleanup {
    pub fn new() -> Self {
        let mut c = Self::default();
        c.ip_forward = netns::read_sysctl("net.ipv4.ip_forward").ok();
        c
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let links_ = std::mem::take(&mut self.links);
        let namespaces = std::mem::take(&mut self.namespaces);
        let prio = self.rule_priority;
        // Drop cannot await; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let root = links::connect(None).await.unwrap();
                for l in &links_ {
                    if let Err(e) = links::delete(&root, l).await {
                        eprintln!("cleanup: link {l}: {e}");
                    }
                }
                if let Some(p) = prio {
                    delete_rules(&root, p).await;
                }
            });
        })
        .join();
        for ns in &namespaces {
            if let Err(e) = netns::delete(ns) {
                eprintln!("cleanup: namespace {ns}: {e}");
            }
        }
        for t in &self.tables {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", t])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Some(v) = &self.ip_forward {
            let _ = netns::write_sysctl("net.ipv4.ip_forward", v);
        }
    }
}

/// Deletes the root namespace's IPv4 policy-routing rules with priority `prio`.
pub async fn delete_rules(root: &rtnetlink::Handle, prio: u32) {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::rule::RuleAttribute;
    let rules: Vec<_> = root
        .rule()
        .get(rtnetlink::IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .unwrap_or_default();
    for r in rules {
        if r.attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == prio))
        {
            let _ = root.rule().del(r).execute().await;
        }
    }
}

/// Root-namespace links whose name starts with `prefix`.
pub async fn root_links_named(prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::link::LinkAttribute;
    let root = links::connect(None).await.unwrap();
    let all: Vec<_> = root.link().get().execute().try_collect().await.unwrap();
    all.into_iter()
        .filter_map(|m| {
            m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Whether an nft table of that name exists in the root namespace.
pub fn nft_table_exists(name: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A test "internet": namespace `ns`, reached from the root namespace over veth `link` (root
/// end `host_end`/30, its end `inet_end`/30), holding `hosts` as /32s on its loopback. Traffic
/// coming in on the slot's host link `slot_if` is policy-routed by table `table`: 203.0.113.0/24
/// and `extra` go to the internet, everything else is blackholed, so no probe leaves the
/// machine even when isolation is broken.
#[derive(Debug)]
pub struct TestInternet<'a> {
    pub ns: &'a str,
    pub link: &'a str,
    pub host_end: Ipv4Addr,
    pub inet_end: Ipv4Addr,
    pub hosts: &'a [Ipv4Addr],
    pub extra: &'a [(Ipv4Addr, u8)],
    pub slot_if: &'a str,
    pub table: u32,
}

impl TestInternet<'_> {
    pub async fn build(&self) {
        let peer = format!("{}p", self.link);
        netns::create(self.ns).unwrap();
        let root = links::connect(None).await.unwrap();
        links::add_veth(&root, self.link, &peer).await.unwrap();
        links::move_to(&root, &peer, self.ns).await.unwrap();
        links::address(&root, self.link, self.host_end, 30)
            .await
            .unwrap();
        links::up(&root, self.link).await.unwrap();
        let inet = links::connect(Some(self.ns)).await.unwrap();
        links::rename(&inet, &peer, "eth0").await.unwrap();
        links::address(&inet, "eth0", self.inet_end, 30)
            .await
            .unwrap();
        links::up(&inet, "eth0").await.unwrap();
        links::up(&inet, "lo").await.unwrap();
        for ip in self.hosts {
            links::address(&inet, "lo", *ip, 32).await.unwrap();
        }
        links::default_route(&inet, self.host_end).await.unwrap();
        let via = Some(self.inet_end);
        let mut routed = vec![(Ipv4Addr::new(203, 0, 113, 0), 24)];
        routed.extend_from_slice(self.extra);
        for (dest, len) in routed {
            links::route_in_table(&root, dest, len, via, self.table)
                .await
                .unwrap();
        }
        links::route_in_table(&root, Ipv4Addr::UNSPECIFIED, 0, None, self.table)
            .await
            .unwrap();
        root.rule()
            .add()
            .v4()
            .input_interface(self.slot_if.to_owned())
            .table_id(self.table)
            .priority(self.table)
            .action(RuleAction::ToTable)
            .execute()
            .await
            .unwrap();
    }
}

/// Slot 0 of `pool` under `policy`, its guest a veth stand-in in namespace `guest_ns`.
pub async fn stand_in_slot(pool: &PoolConfig, guest_ns: &str, policy: EgressPolicy) -> Slot {
    netns::create(guest_ns).unwrap();
    let mut cfg = pool.slot(0).unwrap();
    cfg.device = GuestDevice::VethInto {
        netns: guest_ns.into(),
    };
    cfg.policy = policy;
    Slot::create(cfg).await.unwrap()
}
