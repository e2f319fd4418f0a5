//! Built-in template recipes, by name: what `firkin serve` builds on the first create that asks
//! for one, and what `firkin template build NAME` builds without `--from-*`.
//!
//! A recipe is an ordinary [`BuildTemplateRequest`], so it goes through the same build,
//! fingerprint and adoption as any other: changing a recipe here rebuilds that template (and
//! only it) on the next request.

use firkin_e2b_wire::DEFAULT_TEMPLATE;
use firkin_runtime::qemu::{INTERPRETER_UPLOAD_DIR, code_interpreter_template};

use crate::types::BuildTemplateRequest;

/// The template E2B's code interpreter SDK (`e2b_code_interpreter.Sandbox`) creates by
/// default.
pub const CODE_INTERPRETER_TEMPLATE: &str = "code-interpreter-v1";

/// Every built-in name, for help texts and errors.
pub const BUILTIN_TEMPLATES: [&str; 2] = [DEFAULT_TEMPLATE, CODE_INTERPRETER_TEMPLATE];

/// RAM of a code interpreter sandbox: the kernel with numpy, pandas and matplotlib imported
/// holds ~150 MiB, and user code loads data frames on top; `base`'s 512 MiB would leave little.
const CODE_INTERPRETER_MEMORY_MIB: u64 = 1024;

/// The built-in recipe called `name`, if there is one.
pub fn builtin(name: &str) -> Option<BuildTemplateRequest> {
    match name {
        // Exactly what `firkin serve` always asked for: the same request keeps the same
        // fingerprint, so existing `base` builds stay adopted.
        DEFAULT_TEMPLATE => Some(BuildTemplateRequest {
            template_id: DEFAULT_TEMPLATE.to_owned(),
            ..BuildTemplateRequest::default()
        }),
        CODE_INTERPRETER_TEMPLATE => Some(code_interpreter()),
        _ => None,
    }
}

fn code_interpreter() -> BuildTemplateRequest {
    BuildTemplateRequest {
        template_id: CODE_INTERPRETER_TEMPLATE.to_owned(),
        memory_mb: Some(CODE_INTERPRETER_MEMORY_MIB),
        from: Some(code_interpreter_template()),
        interpreter: true,
        commands: code_interpreter_commands(),
        ..BuildTemplateRequest::default()
    }
}

/// Runs one execution on the service and fails unless it ended without an error and printed
/// `expect` on stdout: `check LANGUAGE_OR_CONTEXT_JSON CODE EXPECT`. A shell function for the
/// warm-up commands below, which are each one `bash -l -c`.
const CHECK_EXECUTE: &str = r#"check() {
  out=$(curl -sS --max-time 900 -H 'content-type: application/json' \
    -d "{$1,\"code\":\"$2\"}" http://127.0.0.1:49999/execute) || return 1
  printf '%s\n' "$out"
  ! printf '%s' "$out" | grep -q '"type":"error"' &&
    printf '%s' "$out" | grep -q '"type":"end_of_execution"' &&
    printf '%s' "$out" | grep -qF "\"text\":\"$3"
}"#;

/// The service runs as root (it must set each kernel's uid) and its kernels as `user` in
/// `/home/user`, as in E2B's image. It is started here, so that it and warm kernels (every
/// language but TypeScript) are in the snapshot: a sandbox's first `run_code` then pays neither
/// a kernel's start-up nor the data stack's imports, which take seconds under TCG.
fn code_interpreter_commands() -> Vec<String> {
    let d = INTERPRETER_UPLOAD_DIR;
    vec![
        // The bundle the build uploaded: the service, Deno (JavaScript, TypeScript) and
        // bash_kernel, which is only on PyPI: installed offline from the wheel the set-up
        // fetched and verified, its dependencies (pexpect, filetype) from Debian.
        [
            format!("install -m 0755 {d}/firkin-interpreter /usr/local/bin/firkin-interpreter"),
            format!("install -m 0755 {d}/deno /usr/local/bin/deno"),
            format!(
                "python3 -m pip install --no-index --no-deps --break-system-packages \
                 --no-cache-dir --root-user-action=ignore {d}/bash_kernel-*.whl"
            ),
            format!("rm -rf {d}"),
            "deno --version".to_owned(),
            "python3 -c 'import bash_kernel.kernel'".to_owned(),
        ]
        .join(" && "),
        // Tracebacks reach the SDK as text (`ExecutionError.traceback`); ANSI colour codes in
        // them are noise to an agent reading them.
        [
            "install -d -o user -g user /home/user/.ipython /home/user/.ipython/profile_default",
            "printf '%s\\n' \"c.InteractiveShell.colors = 'NoColor'\" \
             > /home/user/.ipython/profile_default/ipython_kernel_config.py",
            "chown user:user /home/user/.ipython/profile_default/ipython_kernel_config.py",
        ]
        .join(" && "),
        // `setsid` and the redirections detach it from envd's process, whose end the build
        // waits for.
        "cd / && setsid /usr/local/bin/firkin-interpreter --uid 1000 --gid 1000 \
         --home /home/user --user user --cwd /home/user --default-languages python,javascript \
         >/var/log/firkin-interpreter.log 2>&1 </dev/null &"
            .to_owned(),
        // Warm: the first execution waits for the default kernel, and pyplot's import builds
        // matplotlib's font cache (in ~/.cache, so clones have it). A failed import fails the
        // build rather than leaving a template whose first run fails.
        [
            "for _ in $(seq 600); do curl -sf http://127.0.0.1:49999/health >/dev/null && break; sleep 0.5; done",
            "out=$(curl -sS --fail --max-time 900 -H 'content-type: application/json' \
             -d '{\"code\":\"import numpy, pandas, matplotlib, matplotlib.pyplot\"}' \
             http://127.0.0.1:49999/execute)",
            "printf '%s\\n' \"$out\"",
            "! printf '%s' \"$out\" | grep -q '\"type\":\"error\"'",
            "printf '%s' \"$out\" | grep -q '\"type\":\"end_of_execution\"'",
        ]
        .join(" && "),
        // The other languages' default contexts, warm in the snapshot as Python's is:
        // JavaScript (E2B's second default context), R and bash. A kernel start costs seconds
        // under TCG; warm, a sandbox's first `run_code` pays none, and the build fails if a
        // kernel cannot start. Not TypeScript: it is a second Deno kernel (~200 MiB resident,
        // measured), which with all the others warm would leave a 1 GiB sandbox ~190 MiB free.
        format!(
            r#"{CHECK_EXECUTE}
check '"language":"javascript"' 'console.log(6 * 7)' 42 &&
  check '"language":"r"' 'cat(6 * 7)' 42 &&
  check '"language":"bash"' 'echo $((6 * 7))' 42"#
        ),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base_is_the_request_serve_always_made() {
        assert_eq!(
            builtin("base").unwrap(),
            BuildTemplateRequest {
                template_id: "base".into(),
                ..BuildTemplateRequest::default()
            }
        );
    }

    #[test]
    fn the_code_interpreter_installs_and_starts_the_service() {
        let r = builtin(CODE_INTERPRETER_TEMPLATE).unwrap();
        assert!(r.interpreter);
        assert_eq!(r.memory_mb, Some(1024));
        assert!(r.commands[0].contains(INTERPRETER_UPLOAD_DIR));
        assert!(r.commands[0].contains("--no-index --no-deps"));
        assert!(
            r.commands
                .iter()
                .any(|c| c.contains("setsid /usr/local/bin/firkin-interpreter"))
        );
        assert!(builtin("no-such-template").is_none());
    }
}
