//! The few system calls that have no safe wrapper in `nix`: the pre-exec hook of spawned
//! processes, kernel RNG ioctls, terminal and interface ioctls, and per-thread group lists.
//! Every `unsafe` block of the crate lives here.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Identity and session set-up a child applies between `fork` and `exec`.
#[derive(Debug, Clone)]
pub struct ChildSetup {
    /// Switch to these ids (and supplementary groups) when `Some`; requires privilege.
    pub creds: Option<Credentials>,
    /// Directory to change into after dropping privileges, so that the user's own access
    /// rights decide whether it is reachable.
    pub cwd: CString,
    /// Make fd 0 (a terminal) the controlling terminal of the new session.
    pub controlling_tty: bool,
}

/// A target identity.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Installs the pre-exec hook that starts a new session, drops privileges and changes
/// directory. Everything the hook touches is prepared here, because the hook runs in the
/// forked child of a multi-threaded process and may only make async-signal-safe calls.
pub fn configure_child(cmd: &mut Command, setup: ChildSetup) {
    let groups: Vec<libc::gid_t> = setup
        .creds
        .as_ref()
        .map(|c| c.groups.iter().map(|g| *g as libc::gid_t).collect())
        .unwrap_or_default();
    // SAFETY: the closure only issues raw system calls (setsid, ioctl, setgroups, setgid,
    // setuid, chdir) on data allocated before the fork; it allocates nothing, takes no locks
    // and touches no state shared with other threads of the parent.
    unsafe {
        cmd.pre_exec(move || {
            // A fresh session makes the child the leader of its own process group, so that
            // signals can reach everything it starts, and detaches it from envd's terminal.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if setup.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(c) = &setup.creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgid(c.gid) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setuid(c.uid) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(setup.cwd.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call;
    // the fd is borrowed, hence open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the kernel RNG, credits it as entropy, and forces the CRNG to reseed so
/// that the very next random bytes depend on it. Needs CAP_SYS_ADMIN.
pub fn add_entropy(seed: &[u8]) -> io::Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in a u32
    // buffer so that it is aligned for the kernel's reads.
    let words = seed.len().div_ceil(4);
    let mut info: Vec<u32> = vec![0; 2 + words];
    let bits = i32::try_from(seed.len().saturating_mul(8)).unwrap_or(i32::MAX);
    let size = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    info[0] = bits as u32;
    info[1] = size as u32;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` holds the header plus `size` bytes of payload, as RNDADDENTROPY expects,
    // and outlives the call; the fd is open.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the supplementary groups of the *calling thread only*. glibc's `setgroups` changes
/// every thread of the process; the raw system call does not, which is what lets a blocking
/// worker act with one user's filesystem rights while the rest of envd stays root.
pub fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    let gids: Vec<libc::gid_t> = groups.iter().map(|g| *g as libc::gid_t).collect();
    // SAFETY: the pointer and length describe a live slice of gid_t for the whole call.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, gids.len(), gids.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface up: in a fresh VM nothing else does, and services inside the
/// sandbox reach envd through `localhost`.
pub fn loopback_up() -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags of the named interface into `req`, which is live.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading the union member SIOCGIFFLAGS just wrote.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    if flags & up == up {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads `req`, which is live and names the interface.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the hardware address of interface `name` (SIOCSIFHWADDR; virtio-net allows it while the
/// link is up).
pub fn set_hw_address(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} is too long"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut addr: libc::sockaddr = {
        // SAFETY: sockaddr is plain data; all-zero is a valid value.
        unsafe { std::mem::zeroed() }
    };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    // SAFETY: SIOCSIFHWADDR reads `req`, which is live, names the interface and holds an
    // ARPHRD_ETHER address.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An inotify instance the reactor can poll.
#[derive(Debug)]
pub struct InotifyFd(pub nix::sys::inotify::Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers an owned descriptor (a PTY master) with the tokio reactor.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an OwnedFd is an open descriptor that nothing else closes, and its as_raw_fd
    // returns that same descriptor for as long as the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Registers an inotify instance with the tokio reactor.
pub fn async_inotify(
    inotify: nix::sys::inotify::Inotify,
) -> io::Result<tokio::io::unix::AsyncFd<InotifyFd>> {
    // SAFETY: Inotify owns its descriptor and never replaces it, so as_raw_fd is stable and
    // valid while the AsyncFd owns the value.
    unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(inotify)) }.map_err(io::Error::from)
}
