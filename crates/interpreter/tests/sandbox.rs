//! A kernel that was running before a restore (the template's) catches up with the sandbox it
//! now serves: envd's state file names a new sandbox, and the next run sees a reseeded
//! `random` and the sandbox's env vars, without output or an execution count of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::Service;
use serde_json::json;

fn publish(file: &Path, sandbox: &str, vars: serde_json::Value) {
    // As envd writes it: a temporary file renamed over the old one.
    let tmp = file.with_extension("tmp");
    std::fs::write(
        &tmp,
        json!({"sandbox": sandbox, "envVars": vars}).to_string(),
    )
    .unwrap();
    std::fs::rename(tmp, file).unwrap();
}

fn count(run: &common::Execution) -> u64 {
    let counts = run.of_type("number_of_executions");
    assert_eq!(counts.len(), 1, "{:?}", run.lines);
    counts[0]["execution_count"].as_u64().unwrap()
}

#[tokio::test]
async fn a_new_sandbox_reseeds_the_running_kernel_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sandbox.json");
    publish(&state, "template", json!({}));
    let svc = Service::start_with("python", &["--sandbox-state", state.to_str().unwrap()]);

    // The template's warm-up seeded the kernel; every clone would draw this same number.
    let seeded = svc.run("import random; random.seed(42)", None).await;
    seeded.assert_ended();
    let first_count = count(&seeded);

    publish(&state, "clone-1", json!({"FIRKIN_SANDBOX_VAR": "clone's"}));
    let drawn = svc
        .run(
            "import os; (random.random(), os.environ.get('FIRKIN_SANDBOX_VAR'))",
            None,
        )
        .await;
    drawn.assert_ended();
    assert!(drawn.error().is_none(), "{:?}", drawn.lines);
    let text = drawn.text().unwrap();
    assert!(
        !text.starts_with("(0.6394267984578837"),
        "not reseeded: {text}"
    );
    assert!(text.ends_with(", \"clone's\")"), "{text}");
    // The catch-up was silent: no output of its own, and the user's run is the next count.
    assert_eq!(count(&drawn), first_count + 1);
    assert!(drawn.stdout().is_empty(), "{:?}", drawn.lines);

    // Once per sandbox: a seed the user sets now holds for the runs after it, and a
    // republished state with the same name (a resume) changes nothing.
    svc.run("random.seed(7)", None).await.assert_ended();
    publish(&state, "clone-1", json!({"FIRKIN_SANDBOX_VAR": "clone's"}));
    let again = svc.run("random.random()", None).await;
    assert_eq!(again.text().as_deref(), Some("0.32383276483316237"));
}

#[tokio::test]
async fn a_kernel_started_after_the_restore_gets_the_sandboxs_env() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sandbox.json");
    publish(&state, "clone-2", json!({"FIRKIN_SANDBOX_VAR": "2"}));
    let svc = Service::start_with("", &["--sandbox-state", state.to_str().unwrap()]);
    let ctx = svc.create_context("python").await;
    let run = svc
        .run(
            "import os; os.environ.get('FIRKIN_SANDBOX_VAR')",
            Some(&ctx),
        )
        .await;
    assert_eq!(run.text().as_deref(), Some("2"), "{:?}", run.lines);

    // A var the sandbox drops goes from the kernel too.
    publish(&state, "clone-2", json!({}));
    let run = svc
        .run("os.environ.get('FIRKIN_SANDBOX_VAR', 'unset')", Some(&ctx))
        .await;
    assert_eq!(run.text().as_deref(), Some("unset"), "{:?}", run.lines);
}
