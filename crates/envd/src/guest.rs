//! Guest mode: what envd does as the first process of a sandbox VM.
//!
//! `firkin-init` (the initramfs) switches to the root disk and execs envd as PID 1. Everything
//! here is idempotent, so it is equally right when an init has already done part of it.

use std::path::Path;
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Hostname used when `/init` names none.
pub const DEFAULT_HOSTNAME: &str = "firkin";
/// The resolver QEMU's user-mode network provides.
pub const DEFAULT_NAMESERVER: &str = "10.0.2.3";

struct MountSpec {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
    mode: u32,
}

const fn spec(
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
    mode: u32,
) -> MountSpec {
    MountSpec {
        target,
        fstype,
        flags,
        data,
        mode,
    }
}

/// The kernel's own views (/proc, /sys): nothing on them is a device or runs.
const KERNEL_VIEW: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);
const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

const MOUNTS: &[MountSpec] = &[
    spec("/proc", "proc", KERNEL_VIEW, "", 0o555),
    spec("/sys", "sysfs", KERNEL_VIEW, "", 0o555),
    spec("/dev", "devtmpfs", MsFlags::MS_NOSUID, "mode=0755", 0o755),
    spec(
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
        0o755,
    ),
    spec("/dev/shm", "tmpfs", NOSUID_NODEV, "mode=1777", 0o1777),
    spec("/run", "tmpfs", NOSUID_NODEV, "mode=0755", 0o755),
    spec("/tmp", "tmpfs", NOSUID_NODEV, "mode=1777", 0o1777),
];

/// Mount points currently in use, from `/proc/self/mountinfo` (field 5).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| {
            text.lines()
                .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Where a sandbox VM's secret appears: QEMU's `-fw_cfg name=opt/firkin/secret` (the
/// `qemu_fw_cfg` module exposes it). It comes from the QEMU that runs the VM now, not from the
/// snapshot, so each restore of a template has its own, and only the host knows it.
pub const HOST_SECRET_FILE: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/firkin/secret/raw";

/// Mounts whatever of the standard pseudo filesystems is missing. Failures are logged, not
/// fatal: a half-equipped guest that answers the host beats one that is gone.
pub fn mount_filesystems() {
    for spec in MOUNTS {
        // Re-read every time: /proc itself may have just been mounted.
        if mount_points().iter().any(|m| m == spec.target) {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(spec.target) {
            tracing::warn!(target = spec.target, error = %e, "cannot create mount point");
            continue;
        }
        let data = (!spec.data.is_empty()).then_some(spec.data);
        match mount(
            Some(spec.fstype),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            data,
        ) {
            Ok(()) => {
                tracing::info!(target = spec.target, fstype = spec.fstype, "mounted");
                use std::os::unix::fs::PermissionsExt;
                if spec.fstype == "tmpfs" {
                    let _ = std::fs::set_permissions(
                        spec.target,
                        std::fs::Permissions::from_mode(spec.mode),
                    );
                }
            }
            Err(e) => tracing::warn!(target = spec.target, error = %e, "mount failed"),
        }
    }
    // devtmpfs has device nodes but none of the conventional links that udev would add;
    // shells need /dev/fd for process substitution.
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        if std::fs::symlink_metadata(link).is_err()
            && let Err(e) = std::os::unix::fs::symlink(to, link)
        {
            tracing::warn!(link, error = %e, "cannot create link");
        }
    }
}

/// Sets the kernel hostname and makes it resolve locally.
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    nix::unistd::sethostname(name)?;
    let hosts = Path::new("/etc/hosts");
    let current = std::fs::read_to_string(hosts).unwrap_or_default();
    if let Some(text) = hosts_with_own_name(&current, name) {
        std::fs::write(hosts, text)?;
    }
    Ok(())
}

/// `/etc/hosts` with `name` as the machine's own name, or `None` when it already resolves.
///
/// Debian maps its own hostname on a `127.0.1.1` line. A renamed machine replaces that line
/// rather than adding one: a warm-pool sandbox is renamed at checkout, and its pool name must
/// not linger. Other lines, including a user's own entries for the name, are kept.
fn hosts_with_own_name(current: &str, name: &str) -> Option<String> {
    let names = |l: &str| -> Vec<String> {
        l.split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    if current
        .lines()
        .any(|l| names(l).iter().skip(1).any(|h| h == name))
    {
        return None;
    }
    let mut text = String::with_capacity(current.len() + name.len() + 12);
    for line in current.lines() {
        if names(line).first().is_some_and(|a| a == "127.0.1.1") {
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    if !current
        .lines()
        .any(|l| names(l).get(1).is_some_and(|h| h == "localhost"))
    {
        text.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    }
    text.push_str(&format!("127.0.1.1\t{name}\n"));
    Some(text)
}

/// Parses a unicast MAC address written `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| format!("invalid MAC address '{text}'"))?;
        *byte =
            u8::from_str_radix(part, 16).map_err(|_| format!("invalid MAC address '{text}'"))?;
    }
    if parts.next().is_some() {
        return Err(format!("invalid MAC address '{text}'"));
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!("MAC address '{text}' is not a unicast address"));
    }
    Ok(mac)
}

/// Gives the guest's Ethernet interface the address `mac`. Clones of one snapshot start with the
/// template's address; this makes each its own. `arp_notify` makes the kernel announce the new
/// address with a gratuitous ARP, which QEMU's user-mode network learns from, so traffic to the
/// guest (envd's forwarded port included) keeps flowing.
pub fn set_mac(mac: [u8; 6]) -> std::io::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n != "lo"
                && std::fs::read_to_string(format!("/sys/class/net/{n}/type"))
                    .is_ok_and(|t| t.trim() == "1")
        })
        .collect();
    names.sort();
    let Some(name) = names.first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no Ethernet interface",
        ));
    };
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/arp_notify"), "1")?;
    crate::sys::set_hw_address(name, mac)
}

/// Writes `/etc/resolv.conf` when it is missing or empty (a disk image built without network
/// configuration), pointing at QEMU's resolver.
pub fn ensure_resolv_conf() -> std::io::Result<()> {
    let path = Path::new("/etc/resolv.conf");
    let empty = match std::fs::read_to_string(path) {
        Ok(text) => text.trim().is_empty(),
        Err(_) => true,
    };
    if empty {
        // A dangling symlink (to systemd-resolved's file, say) would make the write fail.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(path)?;
        }
        std::fs::write(path, format!("nameserver {DEFAULT_NAMESERVER}\n"))?;
    }
    Ok(())
}

/// Everything guest mode sets up before serving.
pub fn prepare() {
    mount_filesystems();
    if let Err(e) = set_hostname(DEFAULT_HOSTNAME) {
        tracing::warn!(error = %e, "cannot set hostname");
    }
    if let Err(e) = ensure_resolv_conf() {
        tracing::warn!(error = %e, "cannot write /etc/resolv.conf");
    }
    if let Err(e) = crate::sys::loopback_up() {
        tracing::warn!(error = %e, "cannot bring up lo");
    }
}

/// Stops every process, flushes and freezes the disks, and powers the VM off. Only returns
/// (with the error) when it could not power off.
///
/// Does nothing but `sync` unless envd is PID 1: under another init, that init owns the
/// shutdown, and on a host started with `--guest` by mistake, `reboot()` would power off the
/// host itself. (PID 1 of a child PID namespace is safe: there `reboot()` only ends the
/// namespace, which is what the namespace test relies on.)
pub async fn power_off(reaper: &crate::reaper::Reaper) -> std::io::Error {
    nix::unistd::sync();
    if std::process::id() != 1 {
        return std::io::Error::other("not PID 1: leaving the shutdown to the init");
    }
    // As PID 1, kill(-1) reaches every process but envd itself.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    for _ in 0..20 {
        reaper.reap_ready();
        if !has_other_processes() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    tokio::time::sleep(Duration::from_millis(50)).await;
    reaper.reap_ready();
    nix::unistd::sync();
    for target in ["/tmp", "/run", "/dev/shm"] {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    }
    if let Err(e) = mount::<str, str, str, str>(
        None,
        "/",
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    ) {
        tracing::warn!(error = %e, "cannot remount / read-only");
    }
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e.into(),
    }
}

fn has_other_processes() -> bool {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(Result::ok).any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.chars().all(|c| c.is_ascii_digit()) && name != me && !is_kernel_thread(&name)
            })
        })
        .unwrap_or(false)
}

fn is_kernel_thread(pid: &str) -> bool {
    // Kernel threads have an empty command line.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::{hosts_with_own_name, parse_mac};

    #[test]
    fn macs_parse_and_multicast_is_refused() {
        assert_eq!(
            parse_mac("02:aB:00:12:34:ff"),
            Ok([0x02, 0xab, 0x00, 0x12, 0x34, 0xff])
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    const DEBIAN: &str =
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tfirkin\n";

    #[test]
    fn a_new_name_replaces_the_own_name_line() {
        let once = hosts_with_own_name(DEBIAN, "warm-1").unwrap();
        let twice = hosts_with_own_name(&once, "sbx42").unwrap();
        assert_eq!(
            twice,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tsbx42\n"
        );
        assert!(!twice.contains("warm-1"));
    }

    #[test]
    fn a_name_that_resolves_changes_nothing() {
        assert_eq!(hosts_with_own_name(DEBIAN, "firkin"), None);
        let custom = "127.0.0.1 localhost\n10.1.2.3 db sbx42 # mine\n";
        assert_eq!(hosts_with_own_name(custom, "sbx42"), None);
    }

    #[test]
    fn user_entries_survive_and_localhost_is_added_when_missing() {
        let custom = "10.1.2.3 db\n127.0.1.1 old\n";
        let out = hosts_with_own_name(custom, "new").unwrap();
        assert_eq!(
            out,
            "10.1.2.3 db\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tnew\n"
        );
        assert_eq!(
            hosts_with_own_name("", "a").unwrap(),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\ta\n"
        );
    }
}
