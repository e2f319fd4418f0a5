//! VM tests: real QEMU microvms under TCG (or KVM where it really works).
//!
//! Need `scripts/setup-guest.sh` to have run; they fail with that instruction otherwise.
//! Run: `cargo test -p firkin-vmm --test vm -- --test-threads=2`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::*;
use firkin_vmm::{ReadyCheck, RestoreRequest, Snapshot, SnapshotKind, Vm, VmmError};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `base`'s disk as firkin-server builds it (`DEFAULT_TEMPLATE_BUDGET`): the same image
/// options find the same kept image.
const BASE_DISK_MIB: u64 = 2048;

fn restore_request(name: &str) -> RestoreRequest {
    RestoreRequest {
        run_dir: fixture()
            .dir
            .join("clones")
            .join(format!("{name}-{}", std::process::id())),
        guest_ports: vec![AGENT_PORT],
        net: firkin_vmm::NetAttach::User,
        ready: Some(agent_ready(Duration::from_secs(120))),
    }
}

#[test]
fn cold_boot_reaches_health_and_stop_cleans_up() {
    let f = fixture();
    let rt = runtime();
    rt.block_on(async {
        let req = boot_request(f, "coldboot");
        let run_dir = req.run_dir.clone();
        let start = Instant::now();
        let vm = Vm::cold_boot(req).await.expect("cold boot");
        eprintln!("cold boot to health: {:?}", start.elapsed());
        assert!(vm.is_alive());
        assert!(health(agent(&vm)).await);
        let out = sh(
            agent(&vm),
            "cat /proc/cmdline; ip -4 addr show eth0; ip route",
        );
        assert!(
            out.contains(&format!(
                "tsc_early_khz={}",
                firkin_vmm::tsc::host_tsc_khz()
            )),
            "{out}"
        );
        assert!(out.contains("10.0.2.15/24"), "{out}");
        assert!(out.contains("default via 10.0.2.2"), "{out}");
        // envd replaced init as PID 1, from the tmpfs copy.
        let out = sh(
            agent(&vm),
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; mount",
        );
        assert!(out.contains("/run/firkin/firkin-envd --guest"), "{out}");
        assert!(out.contains("/dev/vda on / type ext4 (rw"), "{out}");
        let console = std::fs::read_to_string(vm.console_log()).unwrap();
        assert!(console.contains("firkin-init:"), "console: {console}");
        let cmd = vm.command_line().unwrap();
        assert!(cmd.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        let pid = vm.pid();
        vm.stop(Duration::from_secs(10)).await.expect("stop");
        assert!(
            wait_pid_gone(pid, Duration::from_secs(5)).await,
            "QEMU {pid} survived stop"
        );
        assert!(
            !run_dir.exists(),
            "run dir {} left behind",
            run_dir.display()
        );
    });
}

#[test]
fn template_snapshot_writes_ram_state_disk_and_manifest() {
    let snap = template();
    assert_eq!(snap.kind, SnapshotKind::Template);
    let loaded = Snapshot::load(&snap.dir).unwrap();
    assert_eq!(&loaded, snap);
    for f in snap.files() {
        assert!(f.is_file(), "{} missing", f.display());
    }
    let ram = std::fs::metadata(snap.ram_path()).unwrap().len();
    assert_eq!(ram, u64::from(snap.machine.memory_mib) << 20);
    // x-ignore-shared: the device state holds no RAM pages.
    let state = std::fs::metadata(snap.state_path()).unwrap().len();
    assert!(state > 0 && state < 4 << 20, "state file is {state} bytes");
    let disk = &snap.disk_chain()[0].path;
    let perms = std::fs::metadata(disk).unwrap().permissions();
    assert!(perms.readonly(), "template disk must be read-only");
}

#[test]
fn three_concurrent_clones_are_isolated_and_leave_nothing() {
    let snap = template();
    let rt = runtime();
    rt.block_on(async {
        let reqs: Vec<_> = (0..3)
            .map(|i| restore_request(&format!("iso{i}")))
            .collect();
        let dirs: Vec<_> = reqs.iter().map(|r| r.run_dir.clone()).collect();
        let (a, b, c) = tokio::join!(
            Vm::restore(snap, reqs[0].clone()),
            Vm::restore(snap, reqs[1].clone()),
            Vm::restore(snap, reqs[2].clone()),
        );
        let vms = [
            a.expect("clone 0"),
            b.expect("clone 1"),
            c.expect("clone 2"),
        ];
        let mut ports: Vec<_> = vms.iter().map(|v| agent(v).port()).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 3, "clones share a port");
        for vm in &vms {
            eprintln!("restore timings: {:?}", vm.timings());
            assert!(health(agent(vm)).await);
            assert!(vm.run_dir().join(firkin_vmm::OVERLAY_FILE).is_file());
        }
        let out = sh(
            agent(&vms[0]),
            "echo secret-0 > /root/mine && sync && cat /root/mine",
        );
        assert_eq!(out.trim(), "secret-0");
        for vm in &vms[1..] {
            let out = sh(
                agent(vm),
                "test -e /root/mine && echo present || echo absent",
            );
            assert_eq!(out.trim(), "absent", "file leaked into another clone");
        }
        let pids: Vec<u32> = vms.iter().map(|v| v.pid()).collect();
        for vm in vms {
            vm.stop(Duration::from_secs(10)).await.expect("stop");
        }
        for pid in pids {
            assert!(
                wait_pid_gone(pid, Duration::from_secs(5)).await,
                "QEMU {pid} survived"
            );
        }
        for d in dirs {
            assert!(
                !d.exists(),
                "run dir {} (with its overlay) left behind",
                d.display()
            );
        }
        // The template is untouched by its clones.
        assert!(snap.files().iter().all(|f| f.is_file()));
    });
}

#[test]
fn kill_9_of_a_clone_qemu_is_detected() {
    let snap = template();
    let rt = runtime();
    rt.block_on(async {
        let vm = Vm::restore(snap, restore_request("killed"))
            .await
            .expect("restore");
        let run_dir = vm.run_dir().to_path_buf();
        assert!(vm.is_alive());
        // Spawned without transparent huge pages (they cost each clone ~3.5 MiB).
        let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
        kill(Pid::from_raw(vm.pid() as i32), Signal::SIGKILL).unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), vm.exited())
            .await
            .expect("death not noticed");
        assert_eq!(exit.signal, Some(9), "{exit}");
        assert!(!vm.is_alive());
        assert!(vm.exit_info().is_some());
        // Reaped, not a zombie.
        assert!(!std::path::Path::new(&format!("/proc/{}", vm.pid())).exists());
        vm.stop(Duration::from_secs(1))
            .await
            .expect("stop after death");
        assert!(!run_dir.exists());
    });
}

/// Helper for `owner_sigkill_leaves_no_qemu`: run in a child process, restores a clone, prints
/// its QEMU pid and waits to be killed.
#[test]
#[ignore = "helper process of owner_sigkill_leaves_no_qemu, not a test by itself"]
fn helper_owner_process() {
    let dir = std::env::var("FIRKIN_TEST_SNAPSHOT").expect("FIRKIN_TEST_SNAPSHOT");
    let snap = Snapshot::load(std::path::Path::new(&dir)).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let req = RestoreRequest {
            run_dir: std::path::PathBuf::from(std::env::var("FIRKIN_TEST_RUN_DIR").unwrap()),
            guest_ports: vec![AGENT_PORT],
            net: firkin_vmm::NetAttach::User,
            ready: Some(agent_ready(Duration::from_secs(120))),
        };
        let vm = Vm::restore(&snap, req).await.expect("helper restore");
        println!("QEMU_PID={}", vm.pid());
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(vm);
    });
}

#[test]
fn owner_sigkill_leaves_no_qemu() {
    let snap = template();
    let run_dir = fixture().dir.join(format!("owner-{}", std::process::id()));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_owner_process",
            "--ignored",
            "--nocapture",
        ])
        .env("FIRKIN_TEST_SNAPSHOT", &snap.dir)
        .env("FIRKIN_TEST_RUN_DIR", &run_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut qemu_pid = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("QEMU_PID=") {
            qemu_pid = Some(p.trim().parse::<u32>().unwrap());
            break;
        }
    }
    let qemu_pid = qemu_pid.expect("helper never reported a QEMU pid");
    assert!(pid_alive(qemu_pid));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let _ = child.wait();
    let rt = runtime();
    let gone = rt.block_on(wait_pid_gone(qemu_pid, Duration::from_secs(10)));
    assert!(gone, "QEMU {qemu_pid} outlived its SIGKILLed owner");
    let _ = std::fs::remove_dir_all(run_dir);
}

#[test]
fn continuation_keeps_files_and_background_processes() {
    let snap = template();
    let rt = runtime();
    rt.block_on(async {
        let vm = Vm::restore(snap, restore_request("pause"))
            .await
            .expect("restore");
        let out = sh(
            agent(&vm),
            "echo kept > /root/note; setsid sleep 4242 </dev/null >/dev/null 2>&1 & echo $!",
        );
        let sleeper: u32 = out
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("pid? {out:?}"));
        let cont_dir = fixture()
            .dir
            .join(format!("continuation-{}", std::process::id()));
        let old_pid = vm.pid();
        let start = Instant::now();
        let cont = vm
            .save_continuation(&cont_dir)
            .await
            .expect("save continuation");
        eprintln!("continuation saved in {:?}", start.elapsed());
        assert!(wait_pid_gone(old_pid, Duration::from_secs(5)).await);
        assert_eq!(cont.kind, SnapshotKind::Continuation);
        assert_eq!(cont.disk_chain().len(), 2);
        for f in cont.files() {
            assert!(f.is_file(), "{} missing", f.display());
        }
        let start = Instant::now();
        let resumed = Vm::restore(
            &Snapshot::load(&cont_dir).unwrap(),
            restore_request("resume"),
        )
        .await
        .expect("resume continuation");
        eprintln!("continuation resumed in {:?}", start.elapsed());
        let out = sh(
            agent(&resumed),
            &format!("cat /root/note; cat /proc/{sleeper}/cmdline | tr '\\0' ' '"),
        );
        assert!(out.contains("kept"), "file lost: {out}");
        assert!(out.contains("sleep 4242"), "background process lost: {out}");
        // A second pause of the resumed sandbox folds the first continuation's layer into its
        // own: still one layer over the template, and the first continuation can go.
        sh(agent(&resumed), "echo later > /root/note2; sync");
        let cont2_dir = fixture()
            .dir
            .join(format!("continuation2-{}", std::process::id()));
        let cont2 = resumed
            .save_continuation(&cont2_dir)
            .await
            .expect("second pause");
        assert_eq!(cont2.disk_chain().len(), 2);
        assert_eq!(cont2.disk_chain()[1].path, snap.disk_chain()[0].path);
        std::fs::remove_dir_all(&cont_dir).unwrap();
        let again = Vm::restore(&cont2, restore_request("resume2"))
            .await
            .expect("second resume");
        let out = sh(agent(&again), "cat /root/note /root/note2");
        assert_eq!(out.trim(), "kept\nlater");
        again.stop(Duration::from_secs(10)).await.unwrap();
        let _ = std::fs::remove_dir_all(&cont2_dir);
    });
}

/// The real thing: the Debian `base` template with the static firkin-envd as PID 1, cold
/// booted, snapshotted and restored twice; envd answers `/health` on each clone's own port.
#[test]
fn base_template_with_real_envd_boots_snapshots_and_restores() {
    let f = fixture();
    let envd = guest_bin("firkin-envd");
    assert!(
        envd.is_file(),
        "static firkin-envd missing at {}; run {SETUP}",
        envd.display()
    );
    let dir = f.dir.join("base-envd");
    std::fs::create_dir_all(&dir).unwrap();
    let initramfs = dir.join("initramfs.cpio");
    firkin_guest::write_initramfs(
        &firkin_guest::InitramfsSpec {
            init: guest_bin("firkin-init"),
            envd,
            modules: f.kernel.modules.clone(),
        },
        &initramfs,
    )
    .unwrap();
    let disk = dir.join("disk.img");
    // `base`'s image as its template builds make it, so that one mmdebstrap serves both.
    firkin_guest::RootfsCache::new(cache_dir().join("rootfs"))
        .build(
            &firkin_guest::base_template(),
            &dir.join("scratch"),
            &disk,
            &firkin_guest::ImageOptions::for_disk(BASE_DISK_MIB),
            &mut |_| {},
        )
        .unwrap_or_else(|e| {
            panic!("building base failed ({e}); is mmdebstrap installed? run {SETUP}")
        });
    let mut m = machine(f);
    m.initramfs = initramfs;
    m.memory_mib = 512;
    let rt = runtime();
    rt.block_on(async {
        let start = Instant::now();
        let vm = Vm::cold_boot(firkin_vmm::BootRequest {
            machine: m,
            run_dir: dir.join("run"),
            ram_path: dir.join("ram.img"),
            disk,
            guest_ports: vec![AGENT_PORT],
            net: firkin_vmm::NetAttach::User,
            ready: Some(agent_ready(Duration::from_secs(180))),
        })
        .await
        .expect("cold boot of base with envd");
        eprintln!("base + envd cold boot to health: {:?}", start.elapsed());
        let snap = vm
            .snapshot_template(&dir.join("snapshot"))
            .await
            .expect("snapshot");
        let (a, b) = tokio::join!(
            Vm::restore(&snap, restore_request("envd-a")),
            Vm::restore(&snap, restore_request("envd-b")),
        );
        let (a, b) = (a.expect("restore a"), b.expect("restore b"));
        assert_ne!(agent(&a), agent(&b));
        for vm in [&a, &b] {
            eprintln!("base + envd restore: {:?}", vm.timings());
            assert!(health(agent(vm)).await);
        }
        a.stop(Duration::from_secs(10)).await.unwrap();
        b.stop(Duration::from_secs(10)).await.unwrap();
    });
}

/// A guest that never passes its caller's check fails the restore after the check's timeout,
/// with the console tail, and leaves no QEMU and no run directory behind; a check on a port
/// that is not forwarded is refused before anything starts.
#[test]
fn a_guest_never_ready_times_out_with_its_console_tail() {
    let snap = template();
    let rt = runtime();
    rt.block_on(async {
        let mut req = restore_request("never-ready");
        req.ready = Some(ReadyCheck::new(
            AGENT_PORT,
            Duration::from_secs(2),
            |_| async { false },
        ));
        let run_dir = req.run_dir.clone();
        let err = Vm::restore(snap, req).await.unwrap_err();
        assert!(
            matches!(
                err,
                VmmError::ReadyTimeout {
                    guest_port: AGENT_PORT,
                    secs: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("console tail"), "{err}");
        assert!(
            !run_dir.exists(),
            "run dir {} left behind",
            run_dir.display()
        );

        let mut req = restore_request("unforwarded");
        req.guest_ports = vec![];
        let run_dir = req.run_dir.clone();
        let err = Vm::restore(snap, req).await.unwrap_err();
        assert!(
            matches!(
                err,
                VmmError::NotForwarded {
                    guest_port: AGENT_PORT
                }
            ),
            "{err}"
        );
        assert!(!run_dir.exists());
    });
}
