//! Checks that the host programs in [`firkin_types::HOST_TOOLS`] are there and run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use firkin_types::{HOST_TOOLS, HostTool, ToolUse};

/// Why a host tool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostToolError {
    #[error(
        "{binary} is missing ({source}); it is needed for {} and comes with the Debian package \
         {package} (scripts/setup.sh installs it)",
        needed_for.as_str()
    )]
    Missing {
        binary: String,
        package: &'static str,
        needed_for: ToolUse,
        source: std::io::Error,
    },
    #[error(
        "{binary} {args} exited with {status}: {stderr}; reinstall the Debian package {package}"
    )]
    Broken {
        binary: String,
        args: String,
        package: &'static str,
        status: String,
        stderr: String,
    },
}

impl HostToolError {
    /// The program that failed.
    pub fn binary(&self) -> &str {
        match self {
            HostToolError::Missing { binary, .. } | HostToolError::Broken { binary, .. } => binary,
        }
    }
}

/// The program firkin runs for `tool`: the override from the environment, else the name on
/// `PATH`.
pub fn program(tool: &HostTool) -> PathBuf {
    tool.env_override
        .and_then(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(tool.binary), PathBuf::from)
}

/// Runs `tool` with its version arguments; returns the first line it printed.
pub fn check(tool: &HostTool) -> Result<String, HostToolError> {
    let program = program(tool);
    let binary = program.display().to_string();
    let out = Command::new(&program)
        .args(tool.version_args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HostToolError::Missing {
            binary: binary.clone(),
            package: tool.package,
            needed_for: tool.needed_for,
            source,
        })?;
    if !out.status.success() {
        return Err(HostToolError::Broken {
            binary,
            args: tool.version_args.join(" "),
            package: tool.package,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    // Some tools (mkfs.ext4 -V) print their version on stderr.
    let text = if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
        out.stdout
    } else {
        out.stderr
    };
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// Checks every tool needed for any of `uses`, in the table's order.
pub fn check_all(uses: &[ToolUse]) -> Vec<(&'static HostTool, Result<String, HostToolError>)> {
    HOST_TOOLS
        .iter()
        .filter(|t| uses.contains(&t.needed_for))
        .map(|t| (t, check(t)))
        .collect()
}

/// A `bin` directory under `dir` of links to every program on `PATH` except `without`: a
/// machine where only that one tool is missing, which is what the tests of this check and of
/// `firkin doctor`/`serve` need to see the failure a user would.
pub fn path_without(dir: &Path, without: &str) -> std::io::Result<PathBuf> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    for entry_dir in std::env::split_paths(&path) {
        // PATH may name directories that do not exist; they hold nothing to link.
        let Ok(entries) = std::fs::read_dir(&entry_dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let link = bin.join(&name);
            // The first directory on PATH wins, as it would for the shell.
            if name == without || link.exists() {
                continue;
            }
            // A name already taken by an earlier, dangling link keeps that link: the shell
            // would not find the later one either.
            let _ = std::os::unix::fs::symlink(e.path(), link);
        }
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        let tool = HostTool {
            binary: "firkin-no-such-tool",
            package: "firkin-no-such-package",
            version_args: &["--version"],
            needed_for: ToolUse::Sandboxes,
            env_override: None,
        };
        let err = check(&tool).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, HostToolError::Missing { .. }), "{msg}");
        assert!(msg.contains("firkin-no-such-tool"), "{msg}");
        assert!(msg.contains("firkin-no-such-package"), "{msg}");
    }

    #[test]
    fn a_tool_that_fails_is_broken_not_missing() {
        let tool = HostTool {
            binary: "false",
            package: "coreutils",
            version_args: &[],
            needed_for: ToolUse::Tests,
            env_override: None,
        };
        assert!(matches!(check(&tool), Err(HostToolError::Broken { .. })));
    }
}
