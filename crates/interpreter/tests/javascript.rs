//! The service against Deno's Jupyter kernel. Deno is not a Debian package and the set-up does
//! not put it on the host, so these are ignored by default: `cargo test -p firkin-interpreter
//! -- --ignored` runs them where `deno` is on PATH (and fails where it is not).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Service, have_deno};
use serde_json::json;

#[tokio::test]
#[ignore = "needs deno on PATH, which the set-up does not install on the host"]
async fn javascript_and_typescript_keep_state() {
    assert!(have_deno(), "deno is not on PATH");
    let svc = Service::start("python,javascript");
    let js = |code: &str| json!({"code": code, "language": "js"});
    svc.execute(js("let x = 21;")).await.assert_ended();
    let r = svc.execute(js("x * 2")).await;
    r.assert_ended();
    assert_eq!(r.text().as_deref(), Some("42"));

    let ts = |code: &str| json!({"code": code, "language": "ts"});
    svc.execute(ts("const y: number = 20;"))
        .await
        .assert_ended();
    let r = svc.execute(ts("y + 1")).await;
    assert_eq!(r.text().as_deref(), Some("21"));

    let err = svc.execute(js("throw new Error('boom')")).await;
    err.assert_ended();
    assert_eq!(err.error().unwrap()["name"], "Error");

    let env = svc
        .execute(
            json!({"code": "Deno.env.get('FIRKIN_T')", "language": "javascript",
            "env_vars": {"FIRKIN_T": "v"}}),
        )
        .await;
    // Deno (2.9) shows a string result as JavaScript would write it.
    assert_eq!(env.text().as_deref(), Some("\"v\""));
    let after = svc.execute(js("Deno.env.get('FIRKIN_T') ?? 'unset'")).await;
    assert_eq!(after.text().as_deref(), Some("\"unset\""));
}

#[tokio::test]
#[ignore = "needs deno on PATH, which the set-up does not install on the host"]
async fn an_interrupted_deno_run_reports_an_error() {
    assert!(have_deno(), "deno is not on PATH");
    let svc = Service::start("javascript");
    let started = std::time::Instant::now();
    let run = svc
        .execute(json!({"code": "while (true) {}", "language": "js", "timeout": 2}))
        .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    run.assert_ended();
    assert_eq!(run.error().unwrap()["name"], "TimeoutError");
    let next = svc
        .execute(json!({"code": "1 + 1", "language": "js"}))
        .await;
    assert_eq!(next.text().as_deref(), Some("2"));
}

/// Deno publishes a run's result and console output after the run's `idle`; none of it may be
/// lost (without waiting for it, about one run in ten lost its output).
#[tokio::test]
#[ignore = "needs deno on PATH, which the set-up does not install on the host"]
async fn output_that_trails_the_end_of_a_deno_run_is_kept() {
    assert!(have_deno(), "deno is not on PATH");
    let svc = Service::start("javascript");
    let js = |code: &str| json!({"code": code, "language": "javascript"});
    svc.execute(js("let x = 21;")).await.assert_ended();
    for i in 0..40 {
        let r = svc.execute(js("x * 2")).await;
        r.assert_ended();
        assert_eq!(r.text().as_deref(), Some("42"), "run {i}");
        let r = svc.execute(js(&format!("console.log({i})"))).await;
        r.assert_ended();
        assert_eq!(r.stdout(), format!("{i}\n"), "run {i}");
    }
}
