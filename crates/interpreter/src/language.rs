//! Language names as clients spell them, and the kernel command for each.

use std::collections::BTreeMap;
use std::time::Duration;

/// How a kernel wants to be interrupted, as a kernelspec's `interrupt_mode` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptMode {
    /// `interrupt_request` on the control channel (SIGINT if that does not stop it).
    Message,
    /// SIGINT to the kernel process: IRkernel and bash_kernel do not implement the message.
    Signal,
}

/// A file a kernel loads from the service: written into the support directory (world-readable,
/// the kernel runs as the sandbox's user) before the kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupportFile {
    pub name: &'static str,
    pub contents: &'static str,
}

/// E2B's chart results: a display formatter that turns a matplotlib figure into the SDKs'
/// `e2b/chart` schema, next to its PNG.
pub const PYTHON_CHARTS: SupportFile = SupportFile {
    name: "firkin_charts.py",
    contents: include_str!("../python/firkin_charts.py"),
};

/// Loads [`PYTHON_CHARTS`] into an IPython kernel at start, by `__import__` so that no name
/// lands in the user's namespace, and takes the support directory off `sys.path` again.
const PYTHON_STARTUP: &str = "--IPKernelApp.exec_lines=\
    __import__('sys').path.insert(0, '{support_dir}'); \
    __import__('firkin_charts').register(get_ipython()); \
    __import__('sys').path.remove('{support_dir}')";

/// How to start one language's kernel.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    /// The command; `{connection_file}` is replaced by the connection file's path and
    /// `{support_dir}` by the directory holding `support_files`.
    pub argv: Vec<String>,
    /// Written into the support directory before the kernel starts.
    pub support_files: &'static [SupportFile],
    /// Added to the service's own environment.
    pub env: BTreeMap<String, String>,
    pub interrupt_mode: InterruptMode,
    /// Deno's kernel ends an interrupted run without an `error`; the service makes one up.
    pub silent_on_interrupt: bool,
    /// Deno's kernel publishes part of a run's output (its result, console output) after the
    /// run's `status: idle`, which for other kernels is the end. With `Some(quiet)` a finished
    /// run keeps taking its messages until none came for `quiet`.
    pub late_output: Option<Duration>,
}

/// How long a Deno run's output may trail its `idle` (measured: under a millisecond on a host,
/// but it lost a result or a `console.log` line in about one run in ten without a wait).
pub const DENO_LATE_OUTPUT: Duration = Duration::from_millis(200);

impl KernelSpec {
    fn new(argv: &[&str], interrupt_mode: InterruptMode) -> Self {
        Self {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: BTreeMap::new(),
            interrupt_mode,
            support_files: &[],
            silent_on_interrupt: false,
            late_output: None,
        }
    }
}

/// The kernels the service knows, keyed by canonical language name.
pub fn default_kernels() -> BTreeMap<String, KernelSpec> {
    let deno = || {
        let mut spec = KernelSpec::new(
            &["deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
            InterruptMode::Message,
        );
        // Without it Deno colours `text/plain` (`\e[33m42\e[39m`).
        spec.env.insert("NO_COLOR".into(), "1".into());
        // A sandbox may have no way out; Deno would otherwise look for a newer release.
        spec.env.insert("DENO_NO_UPDATE_CHECK".into(), "1".into());
        spec.silent_on_interrupt = true;
        spec.late_output = Some(DENO_LATE_OUTPUT);
        spec
    };
    BTreeMap::from([
        ("python".to_owned(), {
            let mut spec = KernelSpec::new(
                &[
                    "python3",
                    "-m",
                    "ipykernel_launcher",
                    "-f",
                    "{connection_file}",
                    PYTHON_STARTUP,
                ],
                InterruptMode::Message,
            );
            spec.support_files = &[PYTHON_CHARTS];
            spec
        }),
        ("javascript".to_owned(), deno()),
        ("typescript".to_owned(), deno()),
        (
            "r".to_owned(),
            KernelSpec::new(
                &[
                    "R",
                    "--slave",
                    "-e",
                    "IRkernel::main()",
                    "--args",
                    "{connection_file}",
                ],
                InterruptMode::Signal,
            ),
        ),
        (
            "bash".to_owned(),
            KernelSpec::new(
                &["python3", "-m", "bash_kernel", "-f", "{connection_file}"],
                InterruptMode::Signal,
            ),
        ),
    ])
}

/// The canonical name of a language as a client wrote it: trimmed, lowercased, aliases resolved.
pub fn canonical(name: &str) -> String {
    let name = name.trim().to_lowercase();
    match name.as_str() {
        "js" => "javascript".to_owned(),
        "ts" => "typescript".to_owned(),
        "py" | "python3" => "python".to_owned(),
        "sh" => "bash".to_owned(),
        _ => name,
    }
}

/// The snippet family used to set and restore env vars for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Python,
    Deno,
    R,
    Bash,
}

impl Dialect {
    /// The dialect for a canonical language name; `None` where per-run env vars are unsupported.
    pub fn of(language: &str) -> Option<Self> {
        match language {
            "python" => Some(Self::Python),
            "javascript" | "typescript" => Some(Self::Deno),
            "r" => Some(Self::R),
            "bash" => Some(Self::Bash),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve() {
        assert_eq!(canonical(" JS "), "javascript");
        assert_eq!(canonical("ts"), "typescript");
        assert_eq!(canonical("Python"), "python");
        assert_eq!(canonical("r"), "r");
        assert!(default_kernels().contains_key(&canonical("Bash")));
    }
}
