//! Running the host tools guest assets are made with (apt-get, dpkg-deb, mmdebstrap, mkfs.ext4).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{GuestError, Result};

fn render(tool: &str, args: &[&OsStr]) -> String {
    std::iter::once(tool.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `tool args` in `cwd`, returning stdout; a non-zero exit is an error carrying stderr.
pub(crate) fn run(tool: &str, args: &[&OsStr], cwd: Option<&Path>) -> Result<String> {
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(Stdio::null());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    tracing::debug!(cmd = %render(tool, args), "running");
    let out = cmd.output().map_err(|source| GuestError::ToolMissing {
        tool: tool.to_string(),
        source,
    })?;
    if !out.status.success() {
        return Err(GuestError::Tool {
            tool: tool.to_string(),
            args: render(tool, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], but hands every stderr line to `on_line` as it arrives (tools such as
/// mmdebstrap report progress there). The last lines are kept for the error message.
pub(crate) fn run_streaming(
    tool: &str,
    args: &[&OsStr],
    on_line: &mut dyn FnMut(&str),
) -> Result<()> {
    tracing::debug!(cmd = %render(tool, args), "running");
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| GuestError::ToolMissing {
            tool: tool.to_string(),
            source,
        })?;
    let mut tail: Vec<String> = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
            tail.push(line);
            if tail.len() > 30 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|source| GuestError::ToolMissing {
        tool: tool.to_string(),
        source,
    })?;
    if !status.success() {
        return Err(GuestError::Tool {
            tool: tool.to_string(),
            args: render(tool, args),
            status: status.to_string(),
            stderr: tail.join("\n"),
        });
    }
    Ok(())
}
