//! The host programs firkin runs, and the Debian packages that provide them.
//!
//! This table is the one list: `firkin doctor` checks it, `firkin serve` refuses to start without
//! the tools sandboxes need, and the set-up script installs the packages it names and then
//! verifies every binary through `firkin-guest host-tools check`. A program firkin starts that is
//! not listed here is a bug: a fresh machine would get a server that starts and then fails.

/// What a host tool is needed for, which decides how hard its absence fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ToolUse {
    /// Every sandbox create, restore and pause: without it `firkin serve` cannot work at all.
    Sandboxes,
    /// Template builds and the guest kernel download (including the default template's first
    /// build): a server with only cached templates still serves.
    Templates,
    /// A network of its own per sandbox (`firkin serve --network tap`): without it a server
    /// falls back to user-mode networking (`--network auto`) or refuses to start (`tap`).
    Networks,
    /// Only the test suites (fixtures of the VM tests).
    Tests,
}

impl ToolUse {
    /// Lower case, for messages and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolUse::Sandboxes => "sandboxes",
            ToolUse::Templates => "templates",
            ToolUse::Networks => "networks",
            ToolUse::Tests => "tests",
        }
    }
}

/// One program firkin runs on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTool {
    /// The program's file name, looked up on `PATH` (unless `env_override` names it).
    pub binary: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
    /// Arguments that make it print its version and exit 0 (proof that it runs, not only that a
    /// file of that name exists).
    pub version_args: &'static [&'static str],
    /// What needs it.
    pub needed_for: ToolUse,
    /// An environment variable that, when set, names the program to run instead.
    pub env_override: Option<&'static str>,
}

/// Every host program firkin or its tests run.
pub const HOST_TOOLS: &[HostTool] = &[
    HostTool {
        binary: "qemu-system-x86_64",
        package: "qemu-system-x86",
        version_args: &["--version"],
        needed_for: ToolUse::Sandboxes,
        env_override: Some("FIRKIN_QEMU"),
    },
    HostTool {
        binary: "qemu-img",
        package: "qemu-utils",
        version_args: &["--version"],
        needed_for: ToolUse::Sandboxes,
        env_override: None,
    },
    HostTool {
        binary: "mmdebstrap",
        package: "mmdebstrap",
        version_args: &["--version"],
        needed_for: ToolUse::Templates,
        env_override: None,
    },
    HostTool {
        binary: "mkfs.ext4",
        package: "e2fsprogs",
        version_args: &["-V"],
        needed_for: ToolUse::Templates,
        env_override: None,
    },
    HostTool {
        binary: "apt-get",
        package: "apt",
        version_args: &["--version"],
        needed_for: ToolUse::Templates,
        env_override: None,
    },
    HostTool {
        binary: "dpkg-deb",
        package: "dpkg",
        version_args: &["--version"],
        needed_for: ToolUse::Templates,
        env_override: None,
    },
    // firkin-net's firewall (`nft -j -f -`, once per slot preparation or policy change).
    HostTool {
        binary: "nft",
        package: "nftables",
        version_args: &["--version"],
        needed_for: ToolUse::Networks,
        env_override: None,
    },
    // The code interpreter's (`firkin-interpreter`) tests run a real Jupyter kernel: Debian's
    // ipykernel. Named by path because that is where apt installs it; a pyenv or venv `python3`
    // earlier on PATH would lack the module (FIRKIN_TEST_PYTHON picks another interpreter).
    HostTool {
        binary: "/usr/bin/python3",
        package: "python3-ipykernel",
        version_args: &[
            "-c",
            "import ipykernel; print('ipykernel', ipykernel.__version__)",
        ],
        needed_for: ToolUse::Tests,
        env_override: Some("FIRKIN_TEST_PYTHON"),
    },
    HostTool {
        binary: "busybox",
        package: "busybox-static",
        version_args: &["--help"],
        needed_for: ToolUse::Tests,
        env_override: None,
    },
];

/// The tools needed for `use_` (and only those).
pub fn host_tools_for(use_: ToolUse) -> impl Iterator<Item = &'static HostTool> {
    HOST_TOOLS.iter().filter(move |t| t.needed_for == use_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_is_listed_once_with_a_package() {
        let mut names: Vec<_> = HOST_TOOLS.iter().map(|t| t.binary).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), HOST_TOOLS.len());
        assert!(HOST_TOOLS.iter().all(|t| !t.package.is_empty()));
        assert_eq!(host_tools_for(ToolUse::Sandboxes).count(), 2);
    }
}
