//! Per-run env vars: a snippet that sets them (remembering what was there) before the user's
//! code, and one that puts the old values back after. Both run as silent executions in the
//! kernel itself, because the user's code reads the environment of the kernel process, which
//! only code inside it can change.

use std::collections::BTreeMap;

use crate::error::RequestError;
use crate::language::Dialect;

/// Refuses names that a shell or `os.environ` would mangle; checked for every dialect so that
/// a run behaves the same whatever its language.
pub fn validate(vars: &BTreeMap<String, String>) -> Result<(), RequestError> {
    for name in vars.keys() {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(RequestError::EnvName(name.clone()));
        }
    }
    Ok(())
}

/// A JSON string literal; valid as a Python, JavaScript and R string literal too.
fn lit(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A single-quoted bash word.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Code that saves the current values of `vars`' names and then sets them.
pub fn set_snippet(dialect: Dialect, vars: &BTreeMap<String, String>) -> String {
    let names = |f: &dyn Fn(&str) -> String| vars.keys().map(|k| f(k)).collect::<Vec<_>>();
    let pairs = |sep: &str| {
        vars.iter()
            .map(|(k, v)| format!("{}{sep}{}", lit(k), lit(v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match dialect {
        Dialect::Python => format!(
            "import os as __firkin_os\n\
             __firkin_saved_env = {{k: __firkin_os.environ.get(k) for k in [{}]}}\n\
             __firkin_os.environ.update({{{}}})\n",
            names(&lit).join(", "),
            pairs(": ")
        ),
        Dialect::Deno => format!(
            "globalThis.__firkinSavedEnv = Object.fromEntries([{}].map((k) => [k, Deno.env.get(k)]));\n\
             for (const [k, v] of Object.entries({{{}}})) Deno.env.set(k, v);\n",
            names(&lit).join(", "),
            pairs(": ")
        ),
        Dialect::R => format!(
            ".firkin_saved_env <- Sys.getenv(c({}), unset = NA)\nSys.setenv({})\n",
            names(&lit).join(", "),
            vars.iter()
                .map(|(k, v)| format!("{}={}", lit(k), lit(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Dialect::Bash => vars
            .iter()
            .map(|(k, v)| {
                format!(
                    "if [ -n \"${{{k}+x}}\" ]; then __firkin_had_{k}=1; __firkin_old_{k}=\"${k}\"; \
                     else __firkin_had_{k}=0; fi; export {k}={}\n",
                    sh(v)
                )
            })
            .collect(),
    }
}

/// Code that puts back what [`set_snippet`] saved.
pub fn restore_snippet(dialect: Dialect, vars: &BTreeMap<String, String>) -> String {
    match dialect {
        Dialect::Python => "for __firkin_k, __firkin_v in __firkin_saved_env.items():\n    \
             if __firkin_v is None:\n        __firkin_os.environ.pop(__firkin_k, None)\n    \
             else:\n        __firkin_os.environ[__firkin_k] = __firkin_v\n\
             del __firkin_saved_env, __firkin_k, __firkin_v, __firkin_os\n"
            .to_owned(),
        Dialect::Deno => "for (const [k, v] of Object.entries(globalThis.__firkinSavedEnv ?? {})) {\n  \
             if (v === undefined) Deno.env.delete(k); else Deno.env.set(k, v);\n}\n\
             delete globalThis.__firkinSavedEnv;\n"
            .to_owned(),
        Dialect::R => "for (.firkin_k in names(.firkin_saved_env)) {\n  \
             .firkin_v <- .firkin_saved_env[[.firkin_k]]\n  \
             if (is.na(.firkin_v)) Sys.unsetenv(.firkin_k) else do.call(Sys.setenv, setNames(list(.firkin_v), .firkin_k))\n}\n\
             rm(.firkin_saved_env, .firkin_k, .firkin_v)\n"
            .to_owned(),
        Dialect::Bash => vars
            .keys()
            .map(|k| {
                format!(
                    "if [ \"$__firkin_had_{k}\" = 1 ]; then export {k}=\"$__firkin_old_{k}\"; \
                     else unset {k}; fi; unset __firkin_had_{k} __firkin_old_{k}\n"
                )
            })
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs set, a print of the vars, restore, and a print again, in one interpreter.
    fn round_trip(program: &str, flag: &str, dialect: Dialect, print: &str) -> String {
        let v = vars(&[("FIRKIN_A", "it's $HOME \"q\""), ("FIRKIN_B", "new")]);
        let script = format!(
            "{}{print}\n{}{print}\n",
            set_snippet(dialect, &v),
            restore_snippet(dialect, &v)
        );
        let out = Command::new(program)
            .args([flag, &script])
            .env_remove("FIRKIN_A")
            .env("FIRKIN_B", "old")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn bash_snippets_set_and_restore() {
        let out = round_trip(
            "bash",
            "-c",
            Dialect::Bash,
            r#"echo "${FIRKIN_A-unset}|$FIRKIN_B""#,
        );
        assert_eq!(out, "it's $HOME \"q\"|new\nunset|old\n");
    }

    #[test]
    fn python_snippets_set_and_restore() {
        let python = if std::path::Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let out = round_trip(
            python,
            "-c",
            Dialect::Python,
            "import os; print(os.environ.get('FIRKIN_A', 'unset') + '|' + os.environ['FIRKIN_B'])",
        );
        assert_eq!(out, "it's $HOME \"q\"|new\nunset|old\n");
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn names_must_be_identifiers() {
        assert!(validate(&vars(&[("A_1", "x"), ("_b", "")])).is_ok());
        for bad in ["1A", "A-B", "", "A B", "A=B"] {
            assert!(validate(&vars(&[(bad, "x")])).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_quoted() {
        let v = vars(&[("K", "it's \"q\"\n")]);
        assert!(set_snippet(Dialect::Bash, &v).contains(r"export K='it'\''s "));
        assert!(set_snippet(Dialect::Python, &v).contains(r#""K": "it's \"q\"\n""#));
    }
}
