//! `firkin bench`'s code-interpreter part (issue 13): one `firkin serve` (pool depth 0, so
//! every create is a restore) that has both `code-interpreter-v1` and `base`, measured with the
//! same client and the same pieces as the main runs (`suite::idle_memory`, `Api::run`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use firkin_bench::interpreter::{self, InterpreterRun};
use firkin_bench::{Api, Summary};
use firkin_runtime::FirkinPaths;
use firkin_server::recipes::CODE_INTERPRETER_TEMPLATE;

use super::ServerProcess;

/// How long the server may take to have both templates creatable: a first build of the code
/// interpreter's takes ~10 minutes under TCG, `base`'s a few more.
const READY_LIMIT: Duration = Duration::from_secs(1800);
/// Settle time of the memory runs, as in the main suite.
const SETTLE: Duration = Duration::from_secs(10);

/// What the part needs from `firkin bench`'s arguments.
pub struct Plan<'a> {
    pub quick: bool,
    pub skip_memory: bool,
    pub cache: &'a Path,
    pub net_range: &'a str,
    /// A running server to measure instead of one started here.
    pub api: Option<Api>,
}

fn log(step: &str) {
    eprintln!("bench: interpreter: {step}");
}

/// The part as `firkin bench`'s arguments ask for it: against `--url`, or a server started here.
pub async fn part(args: &super::BenchArgs, paths: &FirkinPaths) -> Result<InterpreterRun> {
    let api = match &args.url {
        Some(url) => {
            let key = args
                .api_key
                .clone()
                .context("--url needs --api-key or E2B_API_KEY")?;
            Some(Api::new(url, url, &key))
        }
        None => None,
    };
    let plan = Plan {
        quick: args.quick,
        skip_memory: args.skip_memory,
        cache: paths.cache_dir(),
        net_range: &args.net_range,
        api,
    };
    measure(&plan).await
}

async fn measure(plan: &Plan<'_>) -> Result<InterpreterRun> {
    let mut server = None;
    let api = match &plan.api {
        Some(api) => api.clone(),
        None => {
            log("starting firkin serve (pool depth 0)");
            let extra = [
                "--net-prefix".to_owned(),
                super::NET_PREFIX.to_owned(),
                "--net-range".to_owned(),
                plan.net_range.to_owned(),
            ];
            let s = ServerProcess::spawn("base", 0, plan.cache, "interpreter", &extra)?;
            if let Err(e) = s.wait_listening().await {
                s.stop().await;
                return Err(e);
            }
            let api = s.api.clone();
            server = Some(s);
            api
        }
    };
    let out = match &mut server {
        Some(s) => {
            log(&format!(
                "waiting until `{CODE_INTERPRETER_TEMPLATE}` is creatable (a first build takes \
                 ~10 minutes under TCG; log: bench-serve-interpreter.log in the cache dir)"
            ));
            match s
                .wait_creatable(CODE_INTERPRETER_TEMPLATE, READY_LIMIT)
                .await
            {
                Ok(()) => run(&api, plan, s.pid()).await,
                Err(e) => Err(e),
            }
        }
        None => run(&api, plan, None).await,
    };
    if let Some(s) = server {
        s.stop().await;
    }
    out
}

async fn run(api: &Api, plan: &Plan<'_>, server_pid: Option<u32>) -> Result<InterpreterRun> {
    let scale = |full: usize, quick: usize| if plan.quick { quick } else { full };
    let template = CODE_INTERPRETER_TEMPLATE;
    let mut res = InterpreterRun {
        template: template.to_owned(),
        ..InterpreterRun::default()
    };
    let n = scale(20, 5);
    log(&format!(
        "{n} fresh sandboxes: create, first run_code(\"1+1\"), import pandas"
    ));
    let fresh = interpreter::fresh_sandboxes(api, template, n).await?;
    res.create_ms = Summary::of_ms(&fresh.create_ms);
    res.first_result_ms = Summary::of_ms(&fresh.first_result_ms);
    res.import_pandas_ms = Summary::of_ms(&fresh.import_pandas_ms);

    let rounds = scale(100, 20);
    log(&format!(
        "run_code(\"1+1\") and commands.run(\"true\") in turn, {rounds} each"
    ));
    let (created, _) = api.create(template).await?;
    let mut target = api.envd(&created);
    // As the main suite's round trip: commands as `user`, the SDK's default.
    target.user = Some("user".into());
    let trips = interpreter::round_trips(api, &target, 5, rounds).await;
    api.kill(&created.sandbox_id).await?;
    let (code, command) = trips?;
    res.run_code_rtt_ms = Summary::of_ms(&code);
    res.command_rtt_ms = Summary::of_ms(&command);

    if !plan.skip_memory {
        let n = scale(10, 4);
        for (name, slot) in [(template, &mut res.memory), ("base", &mut res.base_memory)] {
            log(&format!("memory with {n} idle `{name}` sandboxes"));
            match firkin_bench::suite::idle_memory(api, name, n, server_pid, SETTLE).await {
                Ok(m) => *slot = Some(m),
                Err(e) => res
                    .notes
                    .push(format!("memory run of `{name}` failed: {e}")),
            }
        }
    }
    res.notes.push(format!(
        "Create → first result and `import pandas`: {n} fresh sandboxes one after another, each \
         killed after its two runs; `import pandas` is each one's second run. Round trips: one \
         sandbox, `run_code(\"1+1\")` and `commands.run(\"true\")` (as `user`) in turn, after 5 \
         discarded pairs.",
        n = fresh.create_ms.len()
    ));
    Ok(res)
}
