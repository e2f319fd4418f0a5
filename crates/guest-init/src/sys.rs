//! The network ioctls firkin-init needs and `nix` does not wrap.
//!
//! Configuring an address, bringing a link up and adding the default route with three classic
//! `SIOC*` ioctls keeps PID 1 free of a netlink stack; each call here passes a fully
//! initialised, correctly sized struct that lives for the whole call.
#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// The kernel's `struct rtentry` (`<linux/route.h>`); glibc's `libc` crate does not export it.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn inet_socket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes and plain old data; this is the
    // documented way of handing an IPv4 address to the SIOC* ioctls.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(
    fd: &OwnedFd,
    request: libc::c_ulong,
    arg: *mut libc::c_void,
    what: &str,
) -> io::Result<()> {
    // SAFETY: every caller passes a pointer to a live, initialised struct of the type the
    // request expects (ifreq or rtentry), which outlives this call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(())
}

/// Sets `IFF_UP` on `name`.
pub fn link_up(name: &str) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut req = ifreq(name)?;
    let ptr = std::ptr::addr_of_mut!(req).cast();
    ioctl(
        &fd,
        libc::SIOCGIFFLAGS,
        ptr,
        &format!("SIOCGIFFLAGS {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    let ptr = std::ptr::addr_of_mut!(req).cast();
    ioctl(
        &fd,
        libc::SIOCSIFFLAGS,
        ptr,
        &format!("SIOCSIFFLAGS {name}"),
    )
}

/// Assigns `addr/prefix` to `name`.
pub fn set_ipv4(name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    let ptr = std::ptr::addr_of_mut!(req).cast();
    ioctl(
        &fd,
        libc::SIOCSIFADDR,
        ptr,
        &format!("SIOCSIFADDR {name} {addr}"),
    )?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
    let ptr = std::ptr::addr_of_mut!(req).cast();
    ioctl(
        &fd,
        libc::SIOCSIFNETMASK,
        ptr,
        &format!("SIOCSIFNETMASK {name} /{prefix}"),
    )
}

/// Adds `default via gateway`.
pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_tos: 0,
        rt_class: 0,
        rt_pad4: [0; 3],
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    ioctl(
        &fd,
        libc::SIOCADDRT,
        std::ptr::addr_of_mut!(rt).cast(),
        &format!("SIOCADDRT default via {gateway}"),
    )
}
