//! Guest mode, as PID 1 of fresh PID, mount and UTS namespaces, chrooted into a tmpfs root:
//! mounts, hostname, resolv.conf, reaping orphans without stealing exit statuses, PTYs, and the
//! SIGTERM shutdown (in a child PID namespace, `reboot(POWER_OFF)` ends just the namespace, by
//! SIGINT to its init).
//!
//! Never send `/init` a timestamp here: the realtime clock is not namespaced.

use std::io::BufRead;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use firkin_envd::client::Client;
use serde_json::json;

use crate::common::*;

/// Copies `bin` and the shared libraries `ldd` names into `root`, at their real paths.
fn install(root: &Path, bin: &Path) {
    let mut files = vec![bin.to_owned()];
    let out = Command::new("ldd").arg(bin).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    for f in files {
        let real = f.canonicalize().unwrap();
        let dst = root.join(real.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&real, &dst).unwrap();
        // The name the loader or the ELF interpreter field uses may be a link (e.g.
        // /lib64/ld-linux-x86-64.so.2); recreate it.
        let named = root.join(f.strip_prefix("/").unwrap());
        if !named.exists() {
            std::fs::create_dir_all(named.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&real, &named).unwrap();
        }
    }
}

fn stage(envd: &Path) -> tempfile::TempDir {
    let stage = tempfile::Builder::new()
        .prefix("firkin-guest-")
        .tempdir_in("/tmp")
        .unwrap();
    let root = stage.path().join("stage");
    std::fs::create_dir_all(root.join("usr")).unwrap();
    // Mirror the host's merged-/usr links so /bin/bash resolves inside the chroot.
    for link in ["bin", "lib", "lib64", "sbin"] {
        let host = Path::new("/").join(link);
        match std::fs::read_link(&host) {
            Ok(target) => {
                std::fs::create_dir_all(root.join(&target)).unwrap();
                std::os::unix::fs::symlink(target, root.join(link)).unwrap();
            }
            Err(_) => std::fs::create_dir_all(root.join(link)).unwrap(),
        }
    }
    for bin in ["bash", "sh", "sleep", "cat", "id", "tty"] {
        let path = which(bin);
        install(&root, &path);
        let at = root.join("bin").join(bin);
        if !at.exists() {
            std::os::unix::fs::symlink(path.canonicalize().unwrap(), at).unwrap();
        }
    }
    install(&root, envd);
    std::fs::copy(envd, root.join("firkin-envd")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\ntty:x:5:\nuser:x:1000:\n",
    )
    .unwrap();
    // Stands in for the VM secret QEMU's fw_cfg gives a sandbox.
    std::fs::write(root.join("secret"), format!("{SECRET}\n")).unwrap();
    std::fs::create_dir_all(root.join("root")).unwrap();
    std::fs::create_dir_all(root.join("home/user")).unwrap();
    std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
    stage
}

struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn which(bin: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} not found");
}

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn text(out: firkin_envd::client::RunOutput) -> String {
    String::from_utf8(out.stdout).unwrap()
}

fn status_of(r: Result<impl std::fmt::Debug, firkin_envd::client::ClientError>) -> u16 {
    match r {
        Err(firkin_envd::client::ClientError::Status { status, .. }) => status.as_u16(),
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

/// Without the right token: `/envs`, `/init` and a process start get 401; `/health` answers.
async fn assert_gated(client: &Client) {
    let wrong = client.clone().with_token("not-the-token");
    for c in [client, &wrong] {
        c.health().await.unwrap();
        let (status, _, _) = get(c, "/envs").await;
        assert_eq!(status.as_u16(), 401);
        assert_eq!(
            status_of(c.init(&json!({"accessToken": "mine"})).await),
            401
        );
        assert!(
            c.run("true").await.is_err(),
            "a process started without the token"
        );
    }
}

/// A template build marks its processes; a checkout is refused while anything else runs,
/// including a daemon that left envd's process table.
async fn check_template_processes(host: &Client) {
    host.init(&json!({"markTemplateProcesses": true}))
        .await
        .unwrap();
    host.init(&json!({"requireTemplateProcessesOnly": true}))
        .await
        .unwrap();
    // A subshell that backgrounds `sleep` and exits: the sleep is reparented to PID 1.
    host.run("(sleep 300 </dev/null >/dev/null 2>&1 &)")
        .await
        .unwrap();
    let refused = host
        .init(&json!({"requireTemplateProcessesOnly": true, "accessToken": "x"}))
        .await;
    match refused {
        Err(firkin_envd::client::ClientError::Status { status, body }) => {
            assert_eq!(status.as_u16(), 409, "{body}");
            assert!(body.contains("sleep"), "{body}");
        }
        other => panic!("checkout with a daemon running was accepted: {other:?}"),
    }
    // A refused /init changed nothing: the secret still opens it, not the token it carried.
    host.run(
        "for p in /proc/[0-9]*; do \
         [ \"$(cat $p/comm 2>/dev/null)\" = sleep ] && kill ${p#/proc/}; done; true",
    )
    .await
    .unwrap();
    for _ in 0..100 {
        if host
            .init(&json!({"requireTemplateProcessesOnly": true}))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("still refused after the daemon was killed");
}

#[tokio::test]
async fn guest_mode_as_pid1_in_namespaces() {
    if !is_root() {
        eprintln!("skipped: guest mode needs root (namespaces, mounts)");
        return;
    }
    // FIRKIN_ENVD_GUEST_BIN runs the same checks against another build, e.g. the static
    // guest binary.
    let bin = std::env::var_os("FIRKIN_ENVD_GUEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_firkin-envd")));
    let stage = stage(&bin);
    let root = stage.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let script = format!(
        "set -e; mount -t tmpfs -o size=256m,mode=0755 tmpfs '{root}'; cp -a '{stage}/.' '{root}/'; \
         exec chroot '{root}' /firkin-envd --guest --listen 127.0.0.1:0 \
         --host-secret-file /secret --log info",
        root = root.display(),
        stage = stage.path().join("stage").display(),
    );
    let mut ns = Command::new("unshare")
        .args([
            "--fork",
            // If the test fails midway, killing unshare takes the namespace down with it.
            "--kill-child",
            "--pid",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = ns.stdout.take().unwrap();
    let mut ns = KillOnDrop(Some(ns));
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();
    let anon = Client::new(&url).unwrap();
    anon.wait_healthy(Duration::from_secs(10)).await.unwrap();
    assert_gated(&anon).await;
    // The host's secret opens it until /init sets the sandbox's token.
    let host = anon.clone().with_token(SECRET);
    assert_eq!(
        text(host.run("echo via secret").await.unwrap()),
        "via secret\n"
    );
    check_template_processes(&host).await;
    // A restore as a clone sees it: the VM's secret changes under an agent whose template build
    // ended with the mark. It answers to the new secret only, though it had read the old one.
    const RESTORED: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    let rotate = format!("printf %s {RESTORED} > /secret");
    let out = host
        .exec("/bin/bash", &["-c", &rotate], Some("root"))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    host.init(&json!({"markTemplateProcesses": true}))
        .await
        .unwrap();
    assert_gated(&host).await;
    let host = anon.clone().with_token(RESTORED);
    host.init(&json!({"accessToken": TOKEN})).await.unwrap();
    assert_gated(&host).await;
    let c = anon.clone().with_token(TOKEN);

    assert_eq!(
        text(c.run("id -un; pwd").await.unwrap()),
        "user\n/home/user\n",
        "the default user is `user` when it exists"
    );

    let mounts = text(c.run("cat /proc/self/mountinfo").await.unwrap());
    for (target, fstype) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/run", "tmpfs"),
        ("/tmp", "tmpfs"),
    ] {
        assert!(
            mounts.lines().any(|l| {
                let f: Vec<_> = l.split(' ').collect();
                f.get(4) == Some(&target)
                    && l.split(" - ").nth(1).is_some_and(|r| r.starts_with(fstype))
            }),
            "{target} ({fstype}) not mounted:\n{mounts}"
        );
    }
    assert!(mounts.contains("ptmxmode=666"), "{mounts}");
    assert_eq!(
        text(c.run("cat /proc/sys/kernel/hostname").await.unwrap()),
        "firkin\n"
    );
    assert_eq!(
        text(c.run("cat /etc/resolv.conf").await.unwrap()),
        "nameserver 10.0.2.3\n"
    );
    assert!(text(c.run("cat /etc/hosts").await.unwrap()).contains("firkin"));
    assert_eq!(
        text(c.run("echo $(</proc/1/comm)").await.unwrap()),
        "firkin-envd\n"
    );

    // Orphans (the backgrounded sleeps) are reparented to envd; reaping them must not steal
    // the exit statuses of envd's own children.
    let runs = (0..16).map(|i| {
        let c = c.clone();
        async move {
            (
                i,
                c.run(&format!("sleep 0.2 & sleep 0.1 & exit {i}"))
                    .await
                    .unwrap(),
            )
        }
    });
    for (i, out) in futures::future::join_all(runs).await {
        assert_eq!(out.exit_code, i, "exit status of run {i}: {out:?}");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let states = text(
        c.run("for f in /proc/[0-9]*/stat; do read -r l < $f && echo \"${l##*) }\"; done")
            .await
            .unwrap(),
    );
    let zombies: Vec<_> = states.lines().filter(|l| l.starts_with('Z')).collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");

    // PTYs work on the fresh devpts instance.
    let mut s = open_stream(
        &c,
        "process.Process/Start",
        &json!({"process": {"cmd": "/bin/tty"}, "pty": {"size": {"cols": 80, "rows": 24}}}),
        &[],
    )
    .await;
    let mut pty = vec![];
    while let Some(v) = s.next_json().await.unwrap() {
        pty.extend(unb64(&v["event"]["data"]["pty"]));
    }
    assert!(
        String::from_utf8_lossy(&pty).starts_with("/dev/pts/"),
        "{pty:?}"
    );

    c.init(&json!({"hostname": "renamed"})).await.unwrap();
    assert_eq!(
        text(c.run("cat /proc/sys/kernel/hostname").await.unwrap()),
        "renamed\n"
    );

    // envd (PID 1 inside), as seen from here.
    let ns_pid = ns.0.as_ref().unwrap().id();
    let children =
        std::fs::read_to_string(format!("/proc/{ns_pid}/task/{ns_pid}/children")).unwrap();
    let init_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();

    process_start_waits_for_machine_setup(&c, init_pid).await;

    // A long-running process, then SIGTERM to envd (PID 1 inside).
    let mut long = open_stream(
        &c,
        "process.Process/Start",
        &json!({"process": {"cmd": "/bin/sleep", "args": ["300"]}}),
        &[],
    )
    .await;
    long.next_json().await.unwrap();
    let mut ns = ns.0.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            if let Some(st) = ns.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = ns.kill();
        None
    })
    .await
    .unwrap()
    .expect("namespace did not shut down within 10 s");
    // unshare re-raises the signal that ended its child: SIGINT is what reboot(POWER_OFF)
    // delivers to the init of a child PID namespace.
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
}

/// `/init` answers before its rename is done, and a process start waits for it. Made
/// deterministic by turning the guest's `/etc/hosts` into a FIFO: the set-up thread's rename
/// blocks on it (after `sethostname`, which is why the output alone proves nothing) until this
/// test plays the other end.
async fn process_start_waits_for_machine_setup(c: &Client, envd_pid: i32) {
    let hosts = PathBuf::from(format!("/proc/{envd_pid}/root/etc/hosts"));
    let _ = std::fs::remove_file(&hosts);
    nix::unistd::mkfifo(&hosts, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();

    tokio::time::timeout(
        Duration::from_secs(10),
        c.init(&json!({"hostname": "held"})),
    )
    .await
    .expect("/init waited for its rename")
    .unwrap();
    let started = {
        let c = c.clone();
        tokio::spawn(async move { c.run("cat /proc/sys/kernel/hostname").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !started.is_finished(),
        "a process ran while /init's rename was still in flight"
    );

    // Play the other end: the rename reads the old hosts, then writes the new one.
    let fifo = hosts.clone();
    let (done, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let res = (|| -> std::io::Result<String> {
            std::fs::write(&fifo, "127.0.0.1\tlocalhost\n")?;
            std::fs::read_to_string(&fifo)
        })();
        let _ = done.send(res);
    });
    let written = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the rename never touched /etc/hosts")
        .unwrap();
    assert_eq!(written, "127.0.0.1\tlocalhost\n127.0.1.1\theld\n");

    let out = tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the process never started after the rename finished")
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "held\n");
    std::fs::remove_file(&hosts).unwrap();
    std::fs::write(&hosts, &written).unwrap();
}
