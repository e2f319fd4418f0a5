//! Links, addresses and routes over rtnetlink, aimed at a namespace by where the netlink
//! socket was opened.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns;

/// A netlink handle whose socket lives in namespace `ns` (`None`: the caller's own). The
/// socket is opened by a thread inside the namespace and keeps it; the connection task runs
/// on the caller's runtime until the handle is dropped.
pub async fn connect(ns: Option<&str>) -> std::io::Result<Handle> {
    let (conn, handle, _) = match ns {
        None => rtnetlink::new_connection()?,
        Some(ns) => {
            let rt = tokio::runtime::Handle::current();
            netns::run_in_async(ns, move || {
                // The tokio socket registers with the reactor of the runtime entered here.
                let _entered = rt.enter();
                rtnetlink::new_connection()
            })
            .await??
        }
    };
    tokio::spawn(conn);
    Ok(handle)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The index of link `name`, `None` if there is none.
pub async fn index(h: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(found) => Ok(found.map(|m| m.header.index)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn need(h: &Handle, name: &str) -> Result<u32, rtnetlink::Error> {
    index(h, name)
        .await?
        .ok_or_else(|| rtnetlink::Error::InvalidNla(format!("no link {name}")))
}

/// Deletes link `name`; absent is fine (a veth takes its peer with it).
pub async fn delete(h: &Handle, name: &str) -> Result<(), rtnetlink::Error> {
    let Some(i) = index(h, name).await? else {
        return Ok(());
    };
    match h.link().del(i).execute().await {
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

pub async fn add_veth(h: &Handle, name: &str, peer: &str) -> Result<(), rtnetlink::Error> {
    h.link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
}

/// Moves link `name` into namespace `ns`.
pub async fn move_to(h: &Handle, name: &str, ns: &str) -> Result<(), crate::error::Cause> {
    let i = need(h, name).await?;
    let file = std::fs::File::open(netns::path(ns))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(i)
                .setns_by_fd(file.as_raw_fd())
                .build(),
        )
        .execute()
        .await?;
    // The fd only has to stay open until the kernel has acted on the request.
    drop(file);
    Ok(())
}

pub async fn rename(h: &Handle, from: &str, to: &str) -> Result<(), rtnetlink::Error> {
    let i = need(h, from).await?;
    h.link()
        .set(LinkUnspec::new_with_index(i).name(to).build())
        .execute()
        .await
}

/// Sets link `name`'s MAC address.
pub async fn set_mac(h: &Handle, name: &str, mac: [u8; 6]) -> Result<(), rtnetlink::Error> {
    let i = need(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(i).address(mac.to_vec()).build())
        .execute()
        .await
}

/// Forgets every IPv4 neighbour (ARP) entry of link `name`: a recycled slot's next guest
/// has another MAC address than its last one, and frames sent to the old one would be
/// dropped by the guest's NIC until the entry went stale.
pub async fn flush_neighbours(h: &Handle, name: &str) -> Result<(), rtnetlink::Error> {
    let Some(i) = index(h, name).await? else {
        return Ok(());
    };
    let mut found = Vec::new();
    let mut msgs = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(msg) = msgs.try_next().await? {
        if msg.header.ifindex == i {
            found.push(msg);
        }
    }
    for msg in found {
        match h.neighbours().del(msg).execute().await {
            // Gone meanwhile (expired, or the link's own flush).
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Records that `ip` on link `name` is at `mac` (state STALE: used at once, confirmed by the
/// traffic that follows or re-probed later), replacing any entry for it. A received
/// gratuitous ARP for `ip` still replaces it.
pub async fn seed_neighbour(
    h: &Handle,
    name: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(), rtnetlink::Error> {
    let i = need(h, name).await?;
    h.neighbours()
        .add(i, IpAddr::V4(ip))
        .link_layer_address(&mac)
        .state(NeighbourState::Stale)
        .replace()
        .execute()
        .await
}

pub async fn up(h: &Handle, name: &str) -> Result<(), rtnetlink::Error> {
    let i = need(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(i).up().build())
        .execute()
        .await
}

/// Puts `addr/prefix` on `name`, replacing it if present (so a retried step is harmless).
pub async fn address(
    h: &Handle,
    name: &str,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), rtnetlink::Error> {
    let i = need(h, name).await?;
    h.address()
        .add(i, IpAddr::V4(addr), prefix)
        .replace()
        .execute()
        .await
}

/// Every IPv4 address of the namespace as (address, prefix length).
pub async fn ipv4_addresses(h: &Handle) -> Result<Vec<(Ipv4Addr, u8)>, rtnetlink::Error> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut out = Vec::new();
    let mut msgs = h.address().get().execute();
    while let Some(msg) = msgs.try_next().await? {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(a)) = attr {
                out.push((*a, msg.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Default route via `gateway` in the main table.
pub async fn default_route(h: &Handle, gateway: Ipv4Addr) -> Result<(), rtnetlink::Error> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .build();
    h.route().add(route).replace().execute().await
}

/// Route `dest/prefix` via `gateway` in `table` (tests build policy-routed "internets").
pub async fn route_in_table(
    h: &Handle,
    dest: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    table: u32,
) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dest, prefix)
        .table_id(table);
    b = match gateway {
        Some(gw) => b.gateway(gw),
        // No next hop: drop whatever else would be routed by this table.
        None => b.kind(RouteType::BlackHole),
    };
    h.route().add(b.build()).replace().execute().await
}
