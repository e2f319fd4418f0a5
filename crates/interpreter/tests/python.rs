//! The service against a real ipykernel (Debian's `python3-ipykernel`), over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::Service;
use hyper::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn state_persists_between_runs() {
    let svc = Service::start("python");
    let first = svc.run("x = 21", None).await;
    first.assert_ended();
    assert!(first.error().is_none(), "{:?}", first.lines);
    assert_eq!(first.of_type("number_of_executions").len(), 1);
    let second = svc.run("x * 2", None).await;
    second.assert_ended();
    let main = second.of_type("result");
    assert_eq!(main.len(), 1, "{:?}", second.lines);
    assert_eq!(main[0]["text"], "42");
    assert_eq!(main[0]["is_main_result"], true);
}

#[tokio::test]
async fn contexts_are_isolated_and_listed() {
    let svc = Service::start("python");
    let a = svc.create_context("python").await;
    let b = svc.create_context("py").await;
    svc.run("x = 'a'", Some(&a)).await.assert_ended();
    svc.run("x = 'b'", Some(&b)).await.assert_ended();
    assert_eq!(svc.run("x", Some(&a)).await.text().as_deref(), Some("a"));
    assert_eq!(svc.run("x", Some(&b)).await.text().as_deref(), Some("b"));
    let default = svc.run("x", None).await;
    assert_eq!(default.error().unwrap()["name"], "NameError");

    let (status, list) = svc.request(Method::GET, "/contexts", None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&a.as_str()) && ids.contains(&b.as_str()),
        "{list}"
    );
    for c in list.as_array().unwrap() {
        assert_eq!(c["language"], "python");
        assert_eq!(c["cwd"], svc.cwd.path().to_str().unwrap());
    }

    let (status, _) = svc
        .request(Method::DELETE, &format!("/contexts/{a}"), None)
        .await;
    assert!(status.is_success());
    let gone = svc.execute(json!({"code": "x", "context_id": a})).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn restart_forgets_state() {
    let svc = Service::start("python");
    let ctx = svc.create_context("python").await;
    svc.run("x = 21", Some(&ctx)).await.assert_ended();
    let (status, _) = svc
        .request(Method::POST, &format!("/contexts/{ctx}/restart"), None)
        .await;
    assert!(status.is_success(), "{status}");
    let after = svc.run("x", Some(&ctx)).await;
    after.assert_ended();
    assert_eq!(after.error().unwrap()["name"], "NameError");
    // Usable after the restart.
    assert_eq!(
        svc.run("1 + 1", Some(&ctx)).await.text().as_deref(),
        Some("2")
    );
}

#[tokio::test]
async fn output_streams_while_the_code_runs() {
    let svc = Service::start("python");
    let code = "import time\nfor i in range(4):\n    print(f'line {i}', flush=True)\n    time.sleep(0.4)\n";
    let run = svc.run(code, None).await;
    run.assert_ended();
    let stdout: Vec<_> = run
        .lines
        .iter()
        .filter(|(_, v)| v["type"] == "stdout")
        .collect();
    assert_eq!(stdout.len(), 4, "{:?}", run.lines);
    for (i, (_, line)) in stdout.iter().enumerate() {
        assert_eq!(line["text"], format!("line {i}\n"));
        assert!(line["timestamp"].is_string());
    }
    // Each line arrived about when it was printed, not all at the end.
    let first = stdout[0].0;
    let last = stdout[3].0;
    assert!(
        last - first >= Duration::from_millis(1000),
        "{first:?} .. {last:?}"
    );
    let end = run.lines.last().unwrap().0;
    assert!(
        end - first >= Duration::from_millis(1400),
        "{first:?} .. end {end:?}"
    );
}

#[tokio::test]
async fn an_error_is_reported_once_with_its_traceback() {
    let svc = Service::start("python");
    let run = svc.run("1/0", None).await;
    run.assert_ended();
    let err = run.error().expect("an error line");
    assert_eq!(err["name"], "ZeroDivisionError");
    assert_eq!(err["value"], "division by zero");
    assert!(
        err["traceback"]
            .as_str()
            .unwrap()
            .contains("ZeroDivisionError")
    );
    assert!(run.text().is_none());
}

#[tokio::test]
async fn a_client_timeout_interrupts_and_the_context_survives() {
    let svc = Service::start("python");
    svc.run("x = 1", None).await.assert_ended();
    let started = Instant::now();
    // What the SDK does with `timeout=3`: it gives up on the response after 3 s.
    let gave_up =
        tokio::time::timeout(Duration::from_secs(3), svc.run("while True: pass", None)).await;
    assert!(gave_up.is_err(), "an endless loop finished");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The kernel was interrupted (not restarted: `x` is still there) and answers promptly.
    let next_started = Instant::now();
    let next = svc.run("x + 1", None).await;
    next.assert_ended();
    assert_eq!(next.text().as_deref(), Some("2"));
    assert!(
        next_started.elapsed() < Duration::from_secs(3),
        "{:?}",
        next_started.elapsed()
    );
}

#[tokio::test]
async fn the_timeout_field_interrupts_and_the_context_survives() {
    let svc = Service::start("python");
    svc.run("x = 1", None).await.assert_ended();
    let started = Instant::now();
    let run = svc
        .execute(json!({"code": "while True: pass", "timeout": 3}))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    run.assert_ended();
    assert_eq!(run.error().unwrap()["name"], "TimeoutError");
    assert_eq!(svc.run("x + 1", None).await.text().as_deref(), Some("2"));
}

#[tokio::test]
async fn env_vars_hold_for_one_run_only() {
    let svc = Service::start("python");
    svc.run("import os; os.environ['KEEP'] = 'old'", None)
        .await
        .assert_ended();
    let run = svc
        .execute(json!({
            "code": "import os\nprint(os.environ.get('FIRKIN_T'), os.environ.get('KEEP'))",
            "context_id": null, "language": "python",
            "env_vars": {"FIRKIN_T": "it's \"set\"", "KEEP": "new"},
        }))
        .await;
    run.assert_ended();
    assert_eq!(run.stdout(), "it's \"set\" new\n");
    let after = svc
        .run(
            "import os\nprint(os.environ.get('FIRKIN_T'), os.environ.get('KEEP'))",
            None,
        )
        .await;
    assert_eq!(after.stdout(), "None old\n");

    let bad = svc
        .execute(json!({"code": "1", "env_vars": {"NOT-A-NAME": "x"}}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_context_and_language_are_refused() {
    let svc = Service::start("python");
    let (status, body) = svc
        .request(
            Method::POST,
            "/execute",
            Some(json!({"code": "1", "context_id": "nope", "language": null, "env_vars": null})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], 404);
    assert!(body["message"].as_str().unwrap().contains("nope"));
    let (status, _) = svc
        .request(Method::POST, "/contexts/nope/restart", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = svc.request(Method::DELETE, "/contexts/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = svc
        .request(
            Method::POST,
            "/contexts",
            Some(json!({"language": "cobol"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = svc.request(Method::GET, "/health", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn display_data_maps_to_result_fields() {
    let svc = Service::start("python");
    let run = svc
        .run(
            "from IPython.display import HTML, Markdown, display\n\
             display(Markdown('*m*'))\n\
             HTML('<b>x</b>')",
            None,
        )
        .await;
    run.assert_ended();
    let results = run.of_type("result");
    assert_eq!(results.len(), 2, "{:?}", run.lines);
    assert_eq!(results[0]["markdown"], "*m*");
    assert_eq!(results[0]["is_main_result"], false);
    assert_eq!(results[1]["html"], "<b>x</b>");
    assert_eq!(results[1]["is_main_result"], true);
    assert!(results[1]["text"].is_string());

    let json_run = svc
        .run(
            "from IPython.display import JSON\nJSON({'a': [1, 2]})",
            None,
        )
        .await;
    assert_eq!(json_run.of_type("result")[0]["json"], json!({"a": [1, 2]}));
}

#[tokio::test]
async fn executions_in_one_context_are_serialized() {
    let svc = Service::start("python");
    svc.run("log = []", None).await.assert_ended();
    let slow = "import time\nlog.append('slow start'); time.sleep(1); log.append('slow end')";
    let fast = "log.append('fast')";
    let (a, b) = tokio::join!(svc.run(slow, None), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        svc.run(fast, None).await
    });
    a.assert_ended();
    b.assert_ended();
    let log = svc.run("log", None).await;
    assert_eq!(
        log.text().as_deref(),
        Some("['slow start', 'slow end', 'fast']")
    );
}

#[tokio::test]
async fn env_vars_are_restored_after_a_failed_run() {
    let svc = Service::start("python");
    let failed = svc
        .execute(json!({"code": "raise ValueError('no')", "env_vars": {"FIRKIN_T": "x"}}))
        .await;
    failed.assert_ended();
    assert_eq!(failed.error().unwrap()["name"], "ValueError");
    let after = svc
        .run("import os\nprint(os.environ.get('FIRKIN_T'))", None)
        .await;
    assert_eq!(after.stdout(), "None\n", "{:?}", after.lines);
}

#[tokio::test]
async fn a_dead_kernel_ends_the_run_and_the_context_comes_back() {
    let svc = Service::start("python");
    let ctx = svc.create_context("python").await;
    svc.run("x = 1", Some(&ctx)).await.assert_ended();
    let died = svc.run("import os\nos._exit(3)", Some(&ctx)).await;
    assert_eq!(died.status, StatusCode::OK);
    assert_eq!(died.error().unwrap()["name"], "UnexpectedEndOfExecution");
    assert_eq!(
        died.lines.last().unwrap().1["type"],
        "unexpected_end_of_execution"
    );
    // A fresh kernel: usable, and without the old state.
    let next = svc.run("'x' in dir()", Some(&ctx)).await;
    next.assert_ended();
    assert_eq!(next.text().as_deref(), Some("False"));
}

#[tokio::test]
async fn restart_cancels_the_running_execution() {
    let svc = Service::start("python");
    let ctx = svc.create_context("python").await;
    let started = Instant::now();
    let (run, restarted) = tokio::join!(svc.run("while True: pass", Some(&ctx)), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        svc.request(Method::POST, &format!("/contexts/{ctx}/restart"), None)
            .await
    });
    assert!(restarted.0.is_success(), "{restarted:?}");
    run.assert_ended();
    assert_eq!(run.error().unwrap()["name"], "ContextRestarting");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let next = svc.run("1 + 1", Some(&ctx)).await;
    assert_eq!(next.text().as_deref(), Some("2"));
}

#[tokio::test]
async fn the_builtin_python_kernel_has_the_chart_formatter_and_no_extra_names() {
    let svc = Service::start_builtin_python("python");
    let r = svc
        .run(
            "ip = get_ipython()\n\
             print(ip.display_formatter.active_types[-1], \
             'e2b/chart' in ip.display_formatter.formatters, \
             [n for n in dir() if 'firkin' in n or n == 'sys'], \
             any('support' in p for p in __import__('sys').path))",
            None,
        )
        .await;
    r.assert_ended();
    assert!(r.error().is_none(), "{:?}", r.lines);
    assert_eq!(r.stdout(), "e2b/chart True [] False\n");
}
