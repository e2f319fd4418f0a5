//! QEMU `-M microvm` command lines.
//!
//! [`MachineConfig`] is everything that must be identical between the QEMU that took a snapshot
//! and the QEMU that restores it (it is stored in the snapshot); [`Launch`] is what differs per
//! process (files, ports, migration mode). [`qemu_args`] is a pure function of both.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::error::{Result, VmmError};

/// QEMU's seccomp sandbox: no obsolete syscalls, no setuid, no fork/exec, no cgroup changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The id of the guest's network backend; slirp forwards added at run time name it.
pub const NETDEV: &str = "net0";
/// fd number at which QEMU finds its end of the QMP socketpair.
pub const QMP_FD: i32 = 3;
/// fd number at which a restoring QEMU finds the device-state file.
pub const STATE_FD: i32 = 4;

/// Kernel command line used unless the caller gives one.
///
/// `tsc_early_khz` avoids a TSC calibration hang under TCG on a busy host; `panic=-1` plus
/// `-no-reboot` turns a guest panic into a QEMU exit; `quiet` keeps the (emulated, per
/// character) serial console from slowing the boot; `8250.nr_uarts=1` and `pci=off` skip probing
/// hardware a microvm does not have.
///
/// Under TCG, `tsc=reliable`: every vCPU's TSC is the host's own counter (QEMU reads it for
/// `rdtsc`), so the kernel's "TSCs unsynchronized" verdict is an artefact of emulation timing.
/// Without it the guest falls back to the jiffies clocksource: time moves in 4 ms steps and the
/// tick can never stop, ~250 timer interrupts a second per idle vCPU, which measured 5-6 % of a
/// host core per idle sandbox against 0.6 % with a TSC clocksource. Under KVM the guest picks
/// kvm-clock itself, which is stable across snapshot and migration.
pub fn default_kernel_cmdline(accel: Accel) -> String {
    let tsc = format!("tsc_early_khz={}", crate::tsc::host_tsc_khz());
    let mut words = vec![
        "console=ttyS0",
        "quiet",
        "reboot=t",
        "panic=-1",
        tsc.as_str(),
        "pci=off",
        "8250.nr_uarts=1",
        "random.trust_cpu=on",
        "firkin.root=/dev/vda",
    ];
    if accel == Accel::Tcg {
        words.push("tsc=reliable");
    }
    words.join(" ")
}

/// Machine settings a snapshot depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    pub accel: Accel,
    /// TCG translation-block cache size in MiB (`-accel tcg,tb-size=`); `None` keeps QEMU's
    /// default (1 GiB of address space, touched as code is translated).
    pub tcg_tb_size_mib: Option<u32>,
    /// `-cpu` model (`max` under TCG, `host` under KVM).
    pub cpu: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_cmdline: String,
    /// Adds a virtio-rng device fed from the host's `/dev/urandom`.
    pub rng: bool,
    /// The guest NIC's MAC address. A restored clone keeps the snapshot's MAC (it is device
    /// state); each clone has its own user-mode network, so equal MACs never meet.
    pub mac: String,
    /// Every QEMU of this machine gives its guest a fresh secret through fw_cfg
    /// ([`GUEST_SECRET_FW_CFG`]). fw_cfg contents are not migrated: a restored guest reads the
    /// restoring QEMU's secret, so it is a channel from the host to exactly one VM that no
    /// other guest can read or race. The guest must have booted with it (its fw_cfg directory
    /// is read at boot), so a snapshot records whether it had one.
    #[serde(default)]
    pub guest_secret: bool,
    /// What the guest NIC is attached to. Part of the snapshot: QEMU's migration stream
    /// carries a `slirp` section for a user-mode network, so a snapshot restores only onto
    /// the kind it was taken with. Snapshots from before this field were user-mode.
    #[serde(default)]
    pub net: NetKind,
}

/// The kind of network a machine's NIC is attached to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetKind {
    /// QEMU's user-mode network (slirp), reached through host loopback forwards.
    #[default]
    User,
    /// A TAP device prepared by the caller in a network namespace of its own.
    Tap,
}

impl std::fmt::Display for NetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetKind::User => "user-mode (slirp)",
            NetKind::Tap => "TAP",
        })
    }
}

/// Where one QEMU's NIC is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetAttach {
    /// A user-mode network; each of the request's guest ports gets a host loopback forward.
    User,
    /// The persistent TAP `ifname` in the network namespace bound at `netns` (for example
    /// `/run/netns/fk-3`); QEMU is started inside that namespace. The host reaches every guest
    /// port at `reach` (an address the namespace's NAT maps to the guest), so nothing of the
    /// VM listens on the host.
    Tap {
        netns: PathBuf,
        ifname: String,
        reach: std::net::Ipv4Addr,
    },
}

impl NetAttach {
    pub fn kind(&self) -> NetKind {
        match self {
            NetAttach::User => NetKind::User,
            NetAttach::Tap { .. } => NetKind::Tap,
        }
    }
}

/// The fw_cfg file name of the per-VM secret.
pub const GUEST_SECRET_FW_CFG: &str = "opt/firkin/secret";
/// Its length, always the same: a guest sees the size its boot-time fw_cfg directory recorded.
pub const GUEST_SECRET_LEN: usize = 64;

impl MachineConfig {
    /// Sensible defaults for a given accelerator and guest assets.
    pub fn new(accel: Accel, kernel: PathBuf, initramfs: PathBuf) -> Self {
        MachineConfig {
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accel,
            tcg_tb_size_mib: match accel {
                Accel::Tcg => Some(DEFAULT_TB_SIZE_MIB),
                Accel::Kvm => None,
            },
            cpu: match accel {
                Accel::Tcg => "max".into(),
                Accel::Kvm => "host".into(),
            },
            vcpus: 1,
            memory_mib: 512,
            kernel,
            initramfs,
            kernel_cmdline: default_kernel_cmdline(accel),
            rng: true,
            mac: "52:54:00:12:34:56".into(),
            guest_secret: true,
            net: NetKind::User,
        }
    }
}

/// Default TCG translation cache. Smaller caches save little on an idle clone (the cache is
/// touched as code is translated) but make busy guests retranslate constantly: measured on the
/// base template, `/bin/true` through the guest agent took 470 ms at 8 MiB, 37-138 ms at
/// 32 MiB and 35-40 ms at 64 MiB; Python start-up 1.7 s, 0.7 s and 0.17 s. 64 MiB is the knee.
pub const DEFAULT_TB_SIZE_MIB: u32 = 64;

/// A disk image format QEMU opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayer {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// Per-process settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// File backing guest RAM.
    pub ram_path: PathBuf,
    /// `share=on` writes guest RAM to the file (template boot); `share=off` maps it
    /// copy-on-write (clones).
    pub ram_shared: bool,
    /// The root disk as a backing chain, top (the writable one) first. Every layer is given
    /// explicitly, so the backing paths recorded inside qcow2 headers are never followed.
    pub disk: Vec<DiskLayer>,
    /// Host loopback port → guest port (user-mode network only).
    pub forwards: Vec<(u16, u16)>,
    /// The TAP the NIC opens by name, in the namespace QEMU runs in; `None`: user-mode.
    pub tap: Option<String>,
    /// Serial console log.
    pub console_log: PathBuf,
    /// Start with `-incoming defer` (then `migrate-incoming`). Such a QEMU gets no `-kernel`,
    /// `-initrd` or `-append`: the guest's kernel is in the RAM being restored.
    pub incoming: bool,
    /// Start paused (`-S`).
    pub paused: bool,
    /// The file QEMU gives the guest as its secret, when the machine has one.
    pub secret_file: Option<PathBuf>,
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| VmmError::NonUtf8Path(path.to_path_buf()))
}

/// QEMU's option parser splits on commas; a literal comma is written twice.
fn opt_path(path: &Path) -> Result<String> {
    Ok(utf8(path)?.replace(',', ",,"))
}

fn blockdev(layers: &[DiskLayer], top: bool) -> Result<serde_json::Value> {
    let Some((layer, rest)) = layers.split_first() else {
        return Ok(serde_json::Value::Null);
    };
    let mut node = serde_json::json!({
        "driver": layer.format.as_str(),
        "file": { "driver": "file", "filename": utf8(&layer.path)? },
    });
    if top {
        node["node-name"] = "disk0".into();
        node["discard"] = "unmap".into();
    } else {
        node["read-only"] = true.into();
    }
    if layer.format == DiskFormat::Qcow2 {
        node["backing"] = blockdev(rest, false)?;
    }
    Ok(node)
}

/// The full argument list (without the program name).
pub fn qemu_args(m: &MachineConfig, l: &Launch) -> Result<Vec<OsString>> {
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));

    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    push(&["-sandbox", SANDBOX]);
    // No self-announcement after a restore: QEMU's RARPs and the gratuitous ARPs and IPv6
    // adverts it has the guest send, five rounds over a second. Neither a network slot (it is
    // told the guest's address: firkin-net's `Slot::expect_guest`) nor slirp (its ARP table is
    // in the snapshot) needs them, and each round wakes a guest that was restored a moment ago,
    // under TCG while its first request waits.
    push(&["-global", "migration.announce-rounds=0"]);
    // microvm: no PCI, no firmware option ROMs; the serial port carries the kernel console and
    // the RTC gives the guest a wall clock before its agent sets the time.
    push(&[
        "-machine",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem",
    ]);
    let accel = match (m.accel, m.tcg_tb_size_mib) {
        (Accel::Kvm, _) => "kvm".to_string(),
        // One TCG thread for all vCPUs: less memory and no cross-thread TB invalidation.
        (Accel::Tcg, Some(tb)) => format!("tcg,thread=single,tb-size={tb}"),
        (Accel::Tcg, None) => "tcg,thread=single".to_string(),
    };
    push(&["-accel", &accel]);
    push(&["-cpu", &m.cpu]);
    push(&["-smp", &m.vcpus.to_string()]);
    push(&["-m", &format!("{}M", m.memory_mib)]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
            m.memory_mib,
            opt_path(&l.ram_path)?,
            if l.ram_shared { "on" } else { "off" }
        ),
    ]);
    // A restored guest already has its kernel in RAM. Loading the kernel and initramfs again
    // would keep a private copy of both (~14 MiB + the initramfs) in every QEMU for nothing.
    if !l.incoming {
        push(&["-kernel", utf8(&m.kernel)?]);
        push(&["-initrd", utf8(&m.initramfs)?]);
        push(&["-append", &m.kernel_cmdline]);
    }

    if !l.disk.is_empty() {
        push(&["-blockdev", &blockdev(&l.disk, true)?.to_string()]);
        push(&["-device", "virtio-blk-device,drive=disk0"]);
    }

    let netdev = match (&l.tap, m.net) {
        (None, NetKind::User) => {
            let mut netdev = format!("user,id={NETDEV}");
            for (host, guest) in &l.forwards {
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
            }
            netdev
        }
        // No helper scripts: the TAP exists already, configured by whoever made it, and
        // `-sandbox spawn=deny` would refuse to run them anyway.
        (Some(tap), NetKind::Tap) if l.forwards.is_empty() => {
            format!("tap,id={NETDEV},ifname={tap},script=no,downscript=no")
        }
        (tap, kind) => {
            return Err(VmmError::NetMismatch {
                machine: kind,
                launch: if tap.is_some() {
                    NetKind::Tap
                } else {
                    NetKind::User
                },
            });
        }
    };
    push(&["-netdev", &netdev]);
    push(&[
        "-device",
        &format!("virtio-net-device,netdev={NETDEV},mac={}", m.mac),
    ]);

    if m.rng {
        push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
        push(&["-device", "virtio-rng-device,rng=rng0"]);
    }

    if m.guest_secret {
        let file = l.secret_file.as_deref().ok_or(VmmError::NoGuestSecret)?;
        push(&[
            "-fw_cfg",
            &format!("name={GUEST_SECRET_FW_CFG},file={}", opt_path(file)?),
        ]);
    }

    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", opt_path(&l.console_log)?),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&["-chardev", &format!("socket,id=qmp,fd={QMP_FD}")]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    if l.incoming {
        push(&["-incoming", "defer"]);
    }
    if l.paused {
        push(&["-S"]);
    }
    Ok(a.into_iter().map(OsString::from).collect())
}

/// Renders arguments as one shell-quoted line, for logs and reports.
pub fn render(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| {
            let s = a.to_string_lossy();
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn machine() -> MachineConfig {
        MachineConfig::new(Accel::Tcg, "/k/vmlinuz".into(), "/k/initrd".into())
    }

    fn launch() -> Launch {
        Launch {
            ram_path: "/run/vm1/ram".into(),
            ram_shared: false,
            disk: vec![
                DiskLayer {
                    path: "/run/vm1/overlay.qcow2".into(),
                    format: DiskFormat::Qcow2,
                },
                DiskLayer {
                    path: "/t/disk.img".into(),
                    format: DiskFormat::Raw,
                },
            ],
            forwards: vec![(40001, 8080), (40002, 9000)],
            tap: None,
            console_log: "/run/vm1/console.log".into(),
            incoming: true,
            paused: false,
            secret_file: Some("/run/vm1/secret".into()),
        }
    }

    fn args(m: &MachineConfig, l: &Launch) -> Vec<String> {
        qemu_args(m, l)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn hardening_and_lifetime_flags_are_always_there() {
        let a = args(&machine(), &launch());
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(a.iter().any(|x| x == flag), "missing {flag}");
        }
        assert_eq!(value_of(&a, "-sandbox"), vec![SANDBOX]);
        assert_eq!(value_of(&a, "-mon"), vec!["chardev=qmp,mode=control"]);
    }

    #[test]
    fn clone_ram_is_private_and_template_ram_is_shared() {
        let a = args(&machine(), &launch());
        let obj = value_of(&a, "-object");
        assert!(
            obj.contains(&"memory-backend-file,id=mem,size=512M,mem-path=/run/vm1/ram,share=off")
        );
        let mut l = launch();
        l.ram_shared = true;
        let a = args(&machine(), &l);
        assert!(
            value_of(&a, "-object")
                .iter()
                .any(|o| o.ends_with("share=on"))
        );
        assert!(value_of(&a, "-machine")[0].contains("memory-backend=mem"));
    }

    #[test]
    fn tcg_is_single_threaded_with_a_bounded_cache() {
        let a = args(&machine(), &launch());
        assert_eq!(value_of(&a, "-accel"), vec!["tcg,thread=single,tb-size=64"]);
        let mut m = machine();
        m.accel = Accel::Kvm;
        let a = args(&m, &launch());
        assert_eq!(value_of(&a, "-accel"), vec!["kvm"]);
    }

    #[test]
    fn forwards_bind_loopback_only() {
        let a = args(&machine(), &launch());
        assert_eq!(
            value_of(&a, "-netdev"),
            vec![
                "user,id=net0,hostfwd=tcp:127.0.0.1:40001-:8080,hostfwd=tcp:127.0.0.1:40002-:9000"
            ]
        );
    }

    #[test]
    fn a_tap_machine_opens_its_tap_and_refuses_forwards_or_a_mismatch() {
        let mut m = machine();
        m.net = NetKind::Tap;
        let mut l = launch();
        l.forwards.clear();
        l.tap = Some("tap0".into());
        assert_eq!(
            value_of(&args(&m, &l), "-netdev"),
            vec!["tap,id=net0,ifname=tap0,script=no,downscript=no"]
        );
        l.forwards = vec![(40001, 8080)];
        assert!(matches!(
            qemu_args(&m, &l),
            Err(VmmError::NetMismatch { .. })
        ));
        // A user-mode snapshot cannot be restored onto a TAP, nor the other way round.
        let err = qemu_args(
            &machine(),
            &Launch {
                forwards: Vec::new(),
                ..l.clone()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                VmmError::NetMismatch {
                    machine: NetKind::User,
                    launch: NetKind::Tap
                }
            ),
            "{err}"
        );
        l.tap = None;
        l.forwards.clear();
        assert!(matches!(
            qemu_args(&m, &l),
            Err(VmmError::NetMismatch { .. })
        ));
    }

    #[test]
    fn disk_chain_is_explicit_and_lower_layers_read_only() {
        let a = args(&machine(), &launch());
        let bd: serde_json::Value = serde_json::from_str(value_of(&a, "-blockdev")[0]).unwrap();
        assert_eq!(bd["driver"], "qcow2");
        assert_eq!(bd["node-name"], "disk0");
        assert_eq!(bd["file"]["filename"], "/run/vm1/overlay.qcow2");
        assert_eq!(bd["backing"]["driver"], "raw");
        assert_eq!(bd["backing"]["read-only"], true);
        assert_eq!(bd["backing"]["file"]["filename"], "/t/disk.img");
        assert_eq!(value_of(&a, "-device")[0], "virtio-blk-device,drive=disk0");
    }

    #[test]
    fn single_raw_disk_has_no_backing() {
        let mut l = launch();
        l.disk = vec![DiskLayer {
            path: "/t/disk.img".into(),
            format: DiskFormat::Raw,
        }];
        let a = args(&machine(), &l);
        let bd: serde_json::Value = serde_json::from_str(value_of(&a, "-blockdev")[0]).unwrap();
        assert_eq!(bd["driver"], "raw");
        assert!(bd.get("backing").is_none());
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut l = launch();
        l.ram_path = "/a,b/ram".into();
        l.console_log = "/a,b/console.log".into();
        let a = args(&machine(), &l);
        assert!(value_of(&a, "-object")[0].contains("mem-path=/a,,b/ram,"));
        assert!(value_of(&a, "-chardev")[0].ends_with("path=/a,,b/console.log"));
    }

    #[test]
    fn incoming_and_paused_flags() {
        let mut l = launch();
        let a = args(&machine(), &l);
        assert_eq!(value_of(&a, "-incoming"), vec!["defer"]);
        assert!(!a.iter().any(|x| x == "-S"));
        assert!(
            value_of(&a, "-kernel").is_empty(),
            "a restore needs no kernel"
        );
        l.incoming = false;
        l.paused = true;
        let a = args(&machine(), &l);
        assert!(value_of(&a, "-incoming").is_empty());
        assert_eq!(value_of(&a, "-kernel"), vec!["/k/vmlinuz"]);
        assert!(a.iter().any(|x| x == "-S"));
    }

    #[test]
    fn default_cmdline_has_the_tcg_fixes() {
        for accel in [Accel::Tcg, Accel::Kvm] {
            let c = default_kernel_cmdline(accel);
            assert!(c.contains(&format!("tsc_early_khz={}", crate::tsc::host_tsc_khz())));
            assert!(c.contains("panic=-1"));
            assert!(c.contains("console=ttyS0"));
        }
        // Emulated vCPUs read the host's TSC: without this the guest keeps time with jiffies.
        assert!(default_kernel_cmdline(Accel::Tcg).contains("tsc=reliable"));
        // KVM guests use kvm-clock; a real host's TSC verdict is the kernel's to make.
        assert!(!default_kernel_cmdline(Accel::Kvm).contains("tsc=reliable"));
    }

    #[test]
    fn render_quotes_what_a_shell_would_split() {
        let r = render(
            Path::new("/usr/bin/qemu"),
            &["-append".into(), "console=ttyS0 quiet".into()],
        );
        assert_eq!(r, "/usr/bin/qemu -append 'console=ttyS0 quiet'");
    }
}
