//! Which accelerator QEMU gets, decided honestly.
//!
//! `/dev/kvm` existing is not enough: nested set-ups such as `kvm_pvm` expose a `/dev/kvm` on
//! which a stock guest kernel never boots. Hardware KVM is therefore chosen only when a hardware
//! KVM module (`kvm_intel`/`kvm_amd`) is loaded, or the CPU advertises `vmx`/`svm`, *and*
//! `/dev/kvm` opens read-write. Everything else gets TCG, with the reason in words.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator: slow, but runs everywhere.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator chosen and why, for `firkin doctor` and the logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// What the host told us; gathered by [`detect`], decided by [`decide`] (kept apart so the
/// decision can be tested with any host's facts).
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// Loaded modules: `/proc/modules` (empty when the kernel has no module support) and the
    /// names under `/sys/module` (built-in modules appear only there).
    pub modules: Vec<String>,
    /// The first CPU's flags from `/proc/cpuinfo`.
    pub cpu_flags: Vec<String>,
    /// `Ok(())` when `/dev/kvm` opened read-write, else why not.
    pub dev_kvm: Result<(), String>,
}

/// Reads the host facts.
pub fn gather() -> HostFacts {
    use procfs::Current;
    let sys_modules = fs::read_dir("/sys/module")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let proc_modules = procfs::KernelModules::current()
        .map(|m| m.0.into_keys().collect::<Vec<_>>())
        .unwrap_or_default();
    let cpu_flags = procfs::CpuInfo::current()
        .ok()
        .and_then(|info| {
            let flags = info.flags(0)?;
            Some(flags.into_iter().map(str::to_owned).collect())
        })
        .unwrap_or_default();
    let dev_kvm = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/kvm"))
    {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    HostFacts {
        modules: proc_modules.into_iter().chain(sys_modules).collect(),
        cpu_flags,
        dev_kvm,
    }
}

/// Gathers the host facts and decides. `FIRKIN_ACCEL=tcg` forces TCG (for comparisons);
/// `FIRKIN_ACCEL=kvm` cannot force KVM on a host that fails the checks.
pub fn detect() -> AccelDecision {
    let decision = decide(&gather());
    if std::env::var("FIRKIN_ACCEL").is_ok_and(|v| v.eq_ignore_ascii_case("tcg"))
        && decision.accel == Accel::Kvm
    {
        return AccelDecision {
            accel: Accel::Tcg,
            reason: format!(
                "FIRKIN_ACCEL=tcg (KVM would have been used: {})",
                decision.reason
            ),
        };
    }
    decision
}

/// The decision rule, on gathered facts.
pub fn decide(facts: &HostFacts) -> AccelDecision {
    let loaded = |name: &str| facts.modules.iter().any(|m| m == name);
    let hw_module = ["kvm_intel", "kvm_amd"].into_iter().find(|m| loaded(m));
    let cpu_flag = facts
        .cpu_flags
        .iter()
        .map(String::as_str)
        .find(|f| *f == "vmx" || *f == "svm");
    let other_kvm: Vec<&str> = ["kvm_pvm", "kvm"]
        .into_iter()
        .filter(|m| loaded(m))
        .collect();

    let tcg = |why: String| AccelDecision {
        accel: Accel::Tcg,
        reason: format!("using TCG (software emulation): {why}"),
    };
    let evidence = match (hw_module, cpu_flag) {
        (Some(m), _) => format!("{m} is loaded"),
        (None, Some(f)) => format!("the CPU has the {f} flag"),
        (None, None) => {
            let extra = if other_kvm.is_empty() {
                String::new()
            } else {
                format!(
                    " (/dev/kvm is provided by {}, which is not hardware KVM)",
                    other_kvm.join(", ")
                )
            };
            return tcg(format!(
                "no kvm_intel/kvm_amd module and no vmx/svm CPU flag{extra}"
            ));
        }
    };
    match &facts.dev_kvm {
        Ok(()) => AccelDecision {
            accel: Accel::Kvm,
            reason: format!("using KVM: {evidence} and /dev/kvm opens read-write"),
        },
        Err(e) => tcg(format!("{evidence}, but /dev/kvm cannot be opened: {e}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn facts(modules: &[&str], flags: &str, kvm: Result<(), &str>) -> HostFacts {
        HostFacts {
            modules: modules.iter().map(|s| s.to_string()).collect(),
            cpu_flags: format!("fpu vme {flags} sse2")
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            dev_kvm: kvm.map_err(str::to_string),
        }
    }

    #[test]
    fn kvm_pvm_is_not_hardware_kvm() {
        let d = decide(&facts(&["kvm", "kvm_pvm", "virtio_blk"], "", Ok(())));
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("kvm_pvm"), "{}", d.reason);
    }

    #[test]
    fn kvm_intel_module_with_openable_dev_kvm_means_kvm() {
        let d = decide(&facts(&["kvm_intel", "kvm"], "", Ok(())));
        assert_eq!(d.accel, Accel::Kvm);
        assert!(d.reason.contains("kvm_intel"), "{}", d.reason);
    }

    #[test]
    fn cpu_flag_counts_when_modules_are_built_in() {
        let d = decide(&facts(&[], "vmx", Ok(())));
        assert_eq!(d.accel, Accel::Kvm);
        let d = decide(&facts(&["kvm_amd"], "", Ok(())));
        assert_eq!(d.accel, Accel::Kvm);
    }

    #[test]
    fn unopenable_dev_kvm_means_tcg_with_the_error() {
        let d = decide(&facts(&[], "svm", Err("Permission denied (os error 13)")));
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("Permission denied"), "{}", d.reason);
    }

    #[test]
    fn module_name_must_match_exactly() {
        // "kvm_intel_foo" is not kvm_intel, and a flag inside another word is not a flag.
        let d = decide(&facts(&["kvm_intel_foo"], "vmxx", Ok(())));
        assert_eq!(d.accel, Accel::Tcg);
    }

    #[test]
    fn this_machine_decides_something_with_a_reason() {
        let d = detect();
        assert!(!d.reason.is_empty());
    }
}
