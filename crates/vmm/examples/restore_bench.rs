//! Measures cold boot and restore to envd-ready, and QEMU memory per idle clone, on the test
//! fixture (tiny busybox guest). Not a test: numbers go to BENCHMARKS.md.
//!
//! `cargo run --release -p firkin-vmm --example restore_bench -- [RESTORES] [COLD_BOOTS]`
//!
//! Environment: `FIRKIN_BENCH_TB=default|MiB` (TCG tb-size), `FIRKIN_BENCH_MEM=MiB`,
//! `FIRKIN_BENCH_RNG=0`, `FIRKIN_BENCH_CPU=model`,
//! `FIRKIN_BENCH_DISK=raw image` and `FIRKIN_BENCH_INITRAMFS=path` (boot another guest).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use firkin_vmm::{MemoryUsage, RestoreRequest, Vm};

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let restores: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let cold: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let f = common::fixture();
    let mut machine = common::machine(f);
    if let Ok(tb) = std::env::var("FIRKIN_BENCH_TB") {
        machine.tcg_tb_size_mib = if tb == "default" {
            None
        } else {
            Some(tb.parse().unwrap())
        };
    }
    if let Ok(m) = std::env::var("FIRKIN_BENCH_MEM") {
        machine.memory_mib = m.parse().unwrap();
    }
    if std::env::var("FIRKIN_BENCH_RNG").is_ok_and(|v| v == "0") {
        machine.rng = false;
    }
    if let Ok(c) = std::env::var("FIRKIN_BENCH_CPU") {
        machine.cpu = c;
    }
    // Another guest (e.g. the Debian `base` image with the real firkin-envd).
    if let Ok(i) = std::env::var("FIRKIN_BENCH_INITRAMFS") {
        machine.initramfs = i.into();
    }
    let disk = std::env::var_os("FIRKIN_BENCH_DISK").map(std::path::PathBuf::from);
    let boot_request = |name: &str| {
        let mut req = common::boot_request(f, name);
        if let Some(d) = &disk {
            std::fs::copy(d, &req.disk).unwrap();
        }
        req.machine = machine.clone();
        req
    };
    println!(
        "machine: tb-size={:?} MiB, memory={} MiB, rng={}, cpu={}",
        machine.tcg_tb_size_mib, machine.memory_mib, machine.rng, machine.cpu
    );
    let rt = common::runtime();
    rt.block_on(async {
        let mut cold_ms = Vec::new();
        for i in 0..cold {
            let req = boot_request(&format!("bench-cold-{i}"));
            let t = Instant::now();
            let vm = Vm::cold_boot(req).await.expect("cold boot");
            cold_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            vm.stop(Duration::from_secs(10)).await.unwrap();
        }
        let req = boot_request("bench-template");
        let vm = Vm::cold_boot(req).await.expect("template boot");
        // Let the guest settle before snapshotting, as a template build would.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let snap = vm
            .snapshot_template(&f.dir.join("bench-template/snapshot"))
            .await
            .expect("snapshot");

        let mut restore_ms = Vec::new();
        for i in 0..restores {
            let req = RestoreRequest {
                run_dir: f.dir.join(format!("bench-clone-{i}")),
                guest_ports: vec![common::AGENT_PORT],
                net: firkin_vmm::NetAttach::User,
                ready: Some(common::agent_ready(Duration::from_secs(60))),
            };
            let t = Instant::now();
            let vm = Vm::restore(&snap, req).await.expect("restore");
            restore_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            if i == 0 {
                println!("restore command line: {}", vm.command_line().unwrap());
                println!("phases of the first restore: {:?}", vm.timings());
            }
            vm.stop(Duration::from_secs(10)).await.unwrap();
        }

        // Memory: three idle clones side by side.
        let mut clones = Vec::new();
        for i in 0..3 {
            let req = RestoreRequest {
                run_dir: f.dir.join(format!("bench-mem-{i}")),
                guest_ports: vec![common::AGENT_PORT],
                net: firkin_vmm::NetAttach::User,
                ready: Some(common::agent_ready(Duration::from_secs(60))),
            };
            clones.push(Vm::restore(&snap, req).await.expect("restore"));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mems: Vec<MemoryUsage> = clones.iter().map(|c| c.memory().unwrap()).collect();
        if let Some(hold) = std::env::var("FIRKIN_BENCH_HOLD_SECS").ok().and_then(|s| s.parse().ok()) {
            let pids: Vec<u32> = clones.iter().map(|c| c.pid()).collect();
            println!("holding idle clones {pids:?} for {hold} s");
            tokio::time::sleep(Duration::from_secs(hold)).await;
        }
        for vm in clones {
            vm.stop(Duration::from_secs(10)).await.unwrap();
        }

        let sort = |v: &mut Vec<f64>| v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        sort(&mut cold_ms);
        sort(&mut restore_ms);
        if !cold_ms.is_empty() {
            println!(
                "cold boot to envd-ready: n={} p50={:.0} ms p95={:.0} ms",
                cold_ms.len(),
                pct(&cold_ms, 0.5),
                pct(&cold_ms, 0.95)
            );
        }
        println!(
            "restore to envd-ready:   n={} p50={:.0} ms p95={:.0} ms min={:.0} ms",
            restore_ms.len(),
            pct(&restore_ms, 0.5),
            pct(&restore_ms, 0.95),
            restore_ms[0]
        );
        if !cold_ms.is_empty() {
            println!("ratio cold/restore (p50): {:.1}x", pct(&cold_ms, 0.5) / pct(&restore_ms, 0.5));
        }
        for (i, m) in mems.iter().enumerate() {
            println!(
                "idle clone {i}: PSS {:.1} MiB (anon {:.1}, file {:.1}), private dirty {:.1} MiB, RSS {:.1} MiB",
                m.pss_kib as f64 / 1024.0,
                m.pss_anon_kib as f64 / 1024.0,
                m.pss_file_kib as f64 / 1024.0,
                m.private_dirty_kib as f64 / 1024.0,
                m.rss_kib as f64 / 1024.0
            );
        }
    });
}
