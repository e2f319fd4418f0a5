//! The crate's one `unsafe`: the TUN ioctls. Linux creates TAP devices only through
//! `/dev/net/tun` (`tun` refuses rtnetlink's `newlink`), and nix wraps ioctls as unsafe
//! functions over a raw pointer.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

// _IOW('T', 202, int) and _IOW('T', 203, int), as <linux/if_tun.h> defines them: the size in
// the code is an int's although TUNSETIFF reads a `struct ifreq`.
nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tunsetpersist,
    nix::request_code_write!(b'T', 203, std::mem::size_of::<libc::c_int>())
);

/// Creates a persistent TAP named `name` (no packet-info header, as QEMU expects) in the
/// calling thread's network namespace. It outlives the fd and stays until deleted (or its
/// namespace goes), so a QEMU started later attaches to it by name.
pub(crate) fn create_persistent_tap(name: &str) -> std::io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is plain old data (arrays and a union of integers and pointers) for
    // which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // IFF_TAP | IFF_NO_PI fit in a c_short (0x0002 | 0x1000).
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: the fd is an open /dev/net/tun; `req` is a valid, NUL-terminated ifreq that lives
    // across the call, and TUNSETIFF only reads it (and writes the chosen name back into it).
    unsafe { tunsetiff(tun.as_raw_fd(), &req) }.map_err(std::io::Error::from)?;
    // SAFETY: the fd is attached to the TAP just created; TUNSETPERSIST takes an int by value.
    unsafe { tunsetpersist(tun.as_raw_fd(), 1) }.map_err(std::io::Error::from)?;
    Ok(())
}
