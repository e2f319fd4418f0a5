//! firkin-init: PID 1 of the initramfs firkin writes for its guests.
//!
//! The boot contract (see `crates/guest` for the initramfs layout):
//! mount devtmpfs/proc/sysfs; load the virtio modules listed in `/lib/firkin/modules.order`;
//! configure `lo` and `eth0` for QEMU's user-mode network; mount the root disk on `/newroot`;
//! mount a tmpfs at `/newroot/run` and copy `/firkin-envd` to `/run/firkin/firkin-envd`; move
//! `/dev`, `/proc`, `/sys` into the new root; switch root; exec envd, which becomes PID 1.
//!
//! Any failure prints one clear line to the console and powers the VM off: a guest that hangs
//! would only turn into a host-side timeout with less information.
//!
//! Options come from the kernel command line (`firkin.root=/dev/vda` and friends, see
//! [`Options`]), so the host can change them without rebuilding the initramfs.

mod sys;

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};

/// Where the initramfs keeps what init hands over.
const ENVD_IN_INITRAMFS: &str = "/firkin-envd";
const MODULES_ORDER: &str = "/lib/firkin/modules.order";
const NEW_ROOT: &str = "/newroot";
/// How long to wait for a device node or network interface after its driver loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: String,
        target: String,
        source: nix::Error,
    },
    #[error("creating directory {path}: {source}")]
    Mkdir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading kernel module {path}: {source}")]
    Module { path: PathBuf, source: nix::Error },
    #[error("{what} did not appear within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("network setup: {0}")]
    Net(std::io::Error),
    #[error("copying {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("switching root to {NEW_ROOT}: {step}: {source}")]
    SwitchRoot {
        step: &'static str,
        source: nix::Error,
    },
    #[error("bad kernel command-line option {key}={value}: {why}")]
    BadOption {
        key: String,
        value: String,
        why: String,
    },
    #[error("exec {path}: {source}")]
    Exec { path: String, source: nix::Error },
}

/// Boot options, from `firkin.*` kernel command-line parameters.
#[derive(Debug, Clone)]
struct Options {
    /// `firkin.root`: the root block device.
    root: String,
    /// `firkin.rootfstype`.
    rootfstype: String,
    /// `firkin.rootflags`: data options passed to mount(2).
    rootflags: String,
    /// `firkin.iface`: the interface given the address.
    iface: String,
    /// `firkin.ip`: address/prefix; `none` skips network setup.
    ip: Option<(Ipv4Addr, u8)>,
    /// `firkin.gw`: default gateway.
    gateway: Option<Ipv4Addr>,
    /// `firkin.exec`: what to exec after switching root.
    exec: String,
    /// `firkin.arg`: arguments for `exec` (repeatable).
    args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            root: "/dev/vda".into(),
            rootfstype: "ext4".into(),
            rootflags: String::new(),
            iface: "eth0".into(),
            ip: Some((Ipv4Addr::new(10, 0, 2, 15), 24)),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            exec: "/run/firkin/firkin-envd".into(),
            args: Vec::new(),
        }
    }
}

fn parse_options(cmdline: &str) -> Result<Options, InitError> {
    let mut opts = Options::default();
    let mut args = Vec::new();
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let bad = |why: &str| InitError::BadOption {
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        match key {
            "firkin.root" => opts.root = value.to_string(),
            "firkin.rootfstype" => opts.rootfstype = value.to_string(),
            "firkin.rootflags" => opts.rootflags = value.to_string(),
            "firkin.iface" => opts.iface = value.to_string(),
            "firkin.ip" if value == "none" => opts.ip = None,
            "firkin.ip" => {
                let (addr, prefix) = value.split_once('/').unwrap_or((value, "24"));
                let addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
                let prefix: u8 = prefix.parse().map_err(|_| bad("bad prefix length"))?;
                if prefix > 32 {
                    return Err(bad("prefix length above 32"));
                }
                opts.ip = Some((addr, prefix));
            }
            "firkin.gw" if value == "none" => opts.gateway = None,
            "firkin.gw" => {
                opts.gateway = Some(value.parse().map_err(|_| bad("not an IPv4 address"))?)
            }
            "firkin.exec" => opts.exec = value.to_string(),
            "firkin.arg" => args.push(value.to_string()),
            _ => {}
        }
    }
    opts.args = if args.is_empty() {
        vec!["--guest".to_string()]
    } else {
        args
    };
    Ok(opts)
}

fn log(msg: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "firkin-init: {msg}");
}

fn mkdir(path: &str) -> Result<(), InitError> {
    fs::create_dir_all(path).map_err(|source| InitError::Mkdir {
        path: path.into(),
        source,
    })
}

fn mount_fs(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    mkdir(target)?;
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| InitError::Mount {
        what: fstype.into(),
        target: target.into(),
        source,
    })
}

/// Makes sure fds 0-2 point at the console even if the kernel could not open one for us.
fn ensure_console() {
    if let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::IntoRawFd;
        let fd = f.into_raw_fd();
        if fd == 0 {
            // stdin was closed, so stdout and stderr are too: fill them in order.
            for _ in 0..2 {
                if let Ok(f) = fs::OpenOptions::new().write(true).open("/dev/console") {
                    let _ = f.into_raw_fd();
                }
            }
        } else {
            let _ = nix::unistd::close(fd);
        }
    }
}

fn load_modules() -> Result<usize, InitError> {
    let order = match fs::read_to_string(MODULES_ORDER) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(InitError::Read {
                path: MODULES_ORDER.into(),
                source,
            });
        }
    };
    let mut loaded = 0;
    for line in order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = PathBuf::from(line);
        let file = fs::File::open(&path).map_err(|source| InitError::Read {
            path: path.clone(),
            source,
        })?;
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            // Built in or already loaded: either way the driver is there.
            Err(nix::Error::EEXIST) => {}
            Err(source) => return Err(InitError::Module { path, source }),
        }
    }
    Ok(loaded)
}

fn wait_for(path: &Path, what: &str) -> Result<(), InitError> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(InitError::Timeout {
                what: what.to_string(),
                secs: DEVICE_WAIT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn setup_network(opts: &Options) -> Result<(), InitError> {
    sys::link_up("lo").map_err(InitError::Net)?;
    let Some((addr, prefix)) = opts.ip else {
        return Ok(());
    };
    wait_for(
        &Path::new("/sys/class/net").join(&opts.iface),
        &format!("network interface {}", opts.iface),
    )?;
    sys::set_ipv4(&opts.iface, addr, prefix).map_err(InitError::Net)?;
    sys::link_up(&opts.iface).map_err(InitError::Net)?;
    if let Some(gw) = opts.gateway {
        sys::add_default_route(gw).map_err(InitError::Net)?;
    }
    Ok(())
}

fn mount_root(opts: &Options) -> Result<(), InitError> {
    wait_for(Path::new(&opts.root), &format!("root device {}", opts.root))?;
    mkdir(NEW_ROOT)?;
    let data = (!opts.rootflags.is_empty()).then_some(opts.rootflags.as_str());
    mount(
        Some(opts.root.as_str()),
        NEW_ROOT,
        Some(opts.rootfstype.as_str()),
        MsFlags::empty(),
        data,
    )
    .map_err(|source| InitError::Mount {
        what: format!("{} ({})", opts.root, opts.rootfstype),
        target: NEW_ROOT.into(),
        source,
    })
}

fn install_envd() -> Result<(), InitError> {
    let run = format!("{NEW_ROOT}/run");
    mount_fs(
        "tmpfs",
        &run,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    let dir = format!("{run}/firkin");
    mkdir(&dir)?;
    let to = PathBuf::from(format!("{dir}/firkin-envd"));
    let copy_err = |source| InitError::Copy {
        from: ENVD_IN_INITRAMFS.into(),
        to: to.clone(),
        source,
    };
    fs::copy(ENVD_IN_INITRAMFS, &to).map_err(copy_err)?;
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).map_err(copy_err)?;
    Ok(())
}

/// Frees the initramfs' memory: after the switch it is unreachable but still held in RAM.
fn clean_initramfs() {
    for path in [ENVD_IN_INITRAMFS, "/init"] {
        let _ = fs::remove_file(path);
    }
    let _ = fs::remove_dir_all("/lib");
}

fn switch_root() -> Result<(), InitError> {
    for fs_dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{fs_dir}");
        mkdir(&target)?;
        mount(
            Some(fs_dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|source| InitError::Mount {
            what: format!("{fs_dir} (move)"),
            target: target.clone(),
            source,
        })?;
    }
    clean_initramfs();
    let step = |step: &'static str| move |source| InitError::SwitchRoot { step, source };
    nix::unistd::chdir(NEW_ROOT).map_err(step("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("move mount"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

fn exec(opts: &Options) -> InitError {
    let to_c = |s: &str| CString::new(s.as_bytes()).unwrap_or_default();
    let path = to_c(&opts.exec);
    let mut argv = vec![path.clone()];
    argv.extend(opts.args.iter().map(|a| to_c(a)));
    let env = [
        c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        c"HOME=/root".to_owned(),
        c"TERM=linux".to_owned(),
    ];
    match nix::unistd::execve(&path, &argv, &env) {
        Ok(never) => match never {},
        Err(source) => InitError::Exec {
            path: opts.exec.clone(),
            source,
        },
    }
}

fn run() -> Result<std::convert::Infallible, InitError> {
    let start = Instant::now();
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    ensure_console();
    mount_fs(
        "proc",
        "/proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    mount_fs(
        "sysfs",
        "/sys",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    // Terminals and POSIX shared memory are expected by the processes envd starts.
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|source| InitError::Read {
        path: "/proc/cmdline".into(),
        source,
    })?;
    let opts = parse_options(&cmdline)?;
    let modules = load_modules()?;
    setup_network(&opts)?;
    mount_root(&opts)?;
    install_envd()?;
    switch_root()?;
    log(&format!(
        "{modules} modules, network and root ready in {} ms; exec {}",
        start.elapsed().as_millis(),
        opts.exec
    ));
    Err(exec(&opts))
}

fn main() {
    let err = match run() {
        Ok(never) => match never {},
        Err(err) => err,
    };
    log(&format!("FATAL: {err}; powering off"));
    nix::unistd::sync();
    // With `-no-reboot` QEMU exits on power-off; if the power-off itself fails, returning from
    // PID 1 panics the kernel, which `panic=-1` turns into a reboot and so an exit as well.
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    log(&format!("power-off failed: {e}"));
    std::process::exit(1);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_the_command_line_says_nothing() {
        let o = parse_options("console=ttyS0 quiet").unwrap();
        assert_eq!(o.root, "/dev/vda");
        assert_eq!(o.ip, Some((Ipv4Addr::new(10, 0, 2, 15), 24)));
        assert_eq!(o.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(o.exec, "/run/firkin/firkin-envd");
        assert_eq!(o.args, vec!["--guest"]);
    }

    #[test]
    fn options_override_defaults() {
        let o = parse_options(
            "firkin.root=/dev/vdb firkin.ip=192.168.7.2/16 firkin.gw=none firkin.exec=/bin/sh firkin.arg=-c firkin.arg=true",
        )
        .unwrap();
        assert_eq!(o.root, "/dev/vdb");
        assert_eq!(o.ip, Some((Ipv4Addr::new(192, 168, 7, 2), 16)));
        assert_eq!(o.gateway, None);
        assert_eq!(o.exec, "/bin/sh");
        assert_eq!(o.args, vec!["-c", "true"]);
    }

    #[test]
    fn bad_address_is_refused_with_its_value() {
        let err = parse_options("firkin.ip=10.0.2.300/24").unwrap_err();
        assert!(err.to_string().contains("10.0.2.300/24"), "{err}");
        let err = parse_options("firkin.ip=10.0.2.3/33").unwrap_err();
        assert!(err.to_string().contains("above 32"), "{err}");
    }
}
