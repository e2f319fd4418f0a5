#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;

use super::*;

fn state(name: Option<&str>, vars: &[(&str, &str)]) -> GuestState {
    GuestState {
        sandbox: name.map(str::to_owned),
        env_vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

#[test]
fn an_up_to_date_kernel_runs_nothing() {
    let s = state(Some("a"), &[("K", "v")]);
    assert_eq!(catch_up(Dialect::Python, Some(&s), &s), None);
    assert_eq!(catch_up(Dialect::Python, None, &state(None, &[])), None);
}

#[test]
fn a_new_sandbox_reseeds_and_a_resume_does_not() {
    let template = state(Some("template"), &[]);
    let clone = state(Some("i8x2kq0ab"), &[]);
    let code = catch_up(Dialect::Python, Some(&template), &clone).unwrap();
    assert!(code.contains("__firkin_random.seed()"), "{code}");
    // A kernel started before any state was published is reseeded too.
    assert!(
        catch_up(Dialect::Python, None, &clone)
            .unwrap()
            .contains("seed()")
    );
    // Same name, new env var (a resume, or an /init that adds one): env only.
    let more = state(Some("i8x2kq0ab"), &[("K", "v")]);
    let code = catch_up(Dialect::Python, Some(&clone), &more).unwrap();
    assert!(!code.contains("seed"), "{code}");
    assert!(code.contains(r#"environ.update({"K": "v"})"#), "{code}");
}

#[test]
fn only_changed_vars_are_set_and_dropped_ones_unset() {
    let before = state(
        Some("a"),
        &[("KEEP", "1"), ("CHANGE", "old"), ("GONE", "x")],
    );
    let now = state(Some("a"), &[("KEEP", "1"), ("CHANGE", "new"), ("NEW", "n")]);
    let code = catch_up(Dialect::Bash, Some(&before), &now).unwrap();
    assert_eq!(code, "export CHANGE='new'\nexport NEW='n'\nunset GONE\n");
}

#[test]
fn names_that_are_not_identifiers_are_left_out() {
    let now = state(Some("a"), &[("OK", "1"), ("NOT-OK", "2"), ("A=B", "3")]);
    assert_eq!(spawn_env(&now).keys().collect::<Vec<_>>(), ["OK"]);
    let code = catch_up(Dialect::Bash, Some(&state(Some("a"), &[])), &now).unwrap();
    assert_eq!(code, "export OK='1'\n");
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn run(program: &str, flag: &str, script: &str) -> String {
    let out = Command::new(program)
        .args([flag, script])
        .env("GONE", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The template seeded `random` (and numpy, when the interpreter has it) before the snapshot:
/// the same seed again in the test stands for a second clone. After the catch-up, the draws
/// differ from the seeded ones and the env is the sandbox's.
#[test]
fn the_python_snippet_reseeds_and_sets_the_env() {
    let code = catch_up(
        Dialect::Python,
        Some(&state(Some("template"), &[("GONE", "x")])),
        &state(Some("clone"), &[("K", "it's \"q\"")]),
    )
    .unwrap();
    let script = format!(
        "import os, random\n\
         try:\n    import numpy\nexcept ImportError:\n    numpy = None\n\
         def draw():\n    \
             return (random.random(), numpy.random.random() if numpy else 0.0)\n\
         random.seed(1)\nnumpy and numpy.random.seed(1)\ntemplate = draw()\n\
         random.seed(1)\nnumpy and numpy.random.seed(1)\n\
         {code}\
         clone = draw()\n\
         print(template[0] != clone[0], numpy is None or template[1] != clone[1], \
               os.environ.get('K'), os.environ.get('GONE'), \
               [n for n in globals() if n.startswith('__firkin')])\n"
    );
    let out = run(python(), "-c", &script);
    assert_eq!(out.trim(), "True True it's \"q\" None []");
}

#[test]
fn the_bash_snippet_reseeds_and_sets_the_env() {
    let code = catch_up(
        Dialect::Bash,
        Some(&state(Some("template"), &[("GONE", "x")])),
        &state(Some("clone"), &[("K", "it's")]),
    )
    .unwrap();
    // Four draws: equal sequences after a fresh seed would happen once in 2^60.
    let script = format!(
        "draw() {{ echo $RANDOM $RANDOM $RANDOM $RANDOM; }}\n\
         RANDOM=1; a=$(draw); RANDOM=1\n{code}b=$(draw)\n\
         [ \"$a\" != \"$b\" ] && echo differ; echo \"$K|${{GONE-unset}}\"\n"
    );
    assert_eq!(run("bash", "-c", &script), "differ\nit's|unset\n");
}

#[tokio::test]
async fn the_watch_waits_for_envds_set_up_once_per_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sandbox.json");
    let lock_path = dir.path().join("sandbox.lock");
    let watch = Arc::new(SandboxWatch::new(Some(file.clone())));
    assert_eq!(watch.current().await, None, "no file yet");

    let first = state(Some("a"), &[("K", "v")]);
    std::fs::write(&file, serde_json::to_vec(&first).unwrap()).unwrap();
    let held = Flock::lock(File::create(&lock_path).unwrap(), FlockArg::LockExclusive).unwrap();
    let w = watch.clone();
    let reader = tokio::spawn(async move { w.current().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !reader.is_finished(),
        "read a state whose set-up was not done"
    );
    drop(held);
    let got = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Some(first.clone()));

    // Seen before: no waiting, even if envd holds the lock for a later /init meanwhile.
    let _held = Flock::lock(File::open(&lock_path).unwrap(), FlockArg::LockExclusive).unwrap();
    let again = tokio::time::timeout(Duration::from_secs(1), watch.current())
        .await
        .unwrap();
    assert_eq!(again, Some(first));
}

#[tokio::test]
async fn an_unreadable_state_is_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sandbox.json");
    std::fs::write(&file, b"{not json").unwrap();
    assert_eq!(SandboxWatch::new(Some(file)).current().await, None);
    assert_eq!(SandboxWatch::new(None).current().await, None);
}
