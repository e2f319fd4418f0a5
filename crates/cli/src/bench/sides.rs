//! `firkin bench`'s network comparison (issue 12): two `firkin serve`s side by side, one with
//! `--network user`, one with `--network tap`, each with its warm pool off (every create is a
//! restore), measured in alternation (user, tap, user, tap, …) so that the shared machine's
//! noise falls on both alike.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use firkin_bench::network::{NetworkComparison, NetworkSide};
use firkin_bench::suite::{self, FileRun};
use firkin_bench::{Api, EnvdTarget, Summary};

use super::ServerProcess;

/// How long a server may take to have the template creatable: the user-mode server builds its
/// own `base` the first time (a template is tied to its network kind), minutes under TCG.
const READY_LIMIT: Duration = Duration::from_secs(1500);

/// What the comparison needs from `firkin bench`'s arguments.
pub struct Plan<'a> {
    pub template: &'a str,
    pub quick: bool,
    /// The cache dir both servers share (templates are built once per network kind).
    pub cache: &'a Path,
    /// `--net-range` of the TAP server (prefix `fkb`): apart from any other server's on this
    /// host.
    pub net_range: &'a str,
}

fn log(step: &str) {
    eprintln!("bench: network: {step}");
}

/// Starts both servers, waits until both can create `template`, measures, and stops them.
pub async fn compare(plan: &Plan<'_>) -> Result<NetworkComparison> {
    let extra = |mode: &str, prefix: &str| {
        vec![
            "--network".to_owned(),
            mode.to_owned(),
            "--net-prefix".to_owned(),
            prefix.to_owned(),
            "--net-range".to_owned(),
            plan.net_range.to_owned(),
        ]
    };
    log("starting `firkin serve --network user` and `--network tap` (pool depth 0)");
    let mut user = ServerProcess::spawn(
        plan.template,
        0,
        plan.cache,
        "net-user",
        &extra("user", super::NET_PREFIX),
    )?;
    let mut tap = match ServerProcess::spawn(
        plan.template,
        0,
        plan.cache,
        "net-tap",
        &extra("tap", super::NET_PREFIX),
    ) {
        Ok(s) => s,
        Err(e) => {
            user.stop().await;
            return Err(e);
        }
    };
    log(&format!(
        "waiting until both can create `{}` (the user-mode server may build it first; logs: \
         bench-serve-net-*.log in the cache dir)",
        plan.template
    ));
    let ready = tokio::try_join!(
        user.wait_creatable(plan.template, READY_LIMIT),
        tap.wait_creatable(plan.template, READY_LIMIT)
    );
    let out = match ready {
        Ok(_) => Ok(measure(&user.api, &tap.api, plan).await),
        Err(e) => Err(e),
    };
    // Stopped gracefully on every path: the TAP server removes its slots on the way out.
    user.stop().await;
    tap.stop().await;
    out
}

fn side(network: &str) -> NetworkSide {
    NetworkSide {
        network: network.into(),
        ..NetworkSide::default()
    }
}

async fn measure(user: &Api, tap: &Api, plan: &Plan<'_>) -> NetworkComparison {
    let apis = [user, tap];
    let mut sides = [side("user"), side("tap")];
    let n = if plan.quick { 10 } else { 20 };
    log(&format!("c=1 creates, n={n} each, alternating"));
    for _ in 0..n {
        for (api, s) in apis.iter().zip(sides.iter_mut()) {
            s.create_requested += 1;
            match api.create(plan.template).await {
                Ok((c, d)) => {
                    s.create_samples_ms.push(d.as_secs_f64() * 1e3);
                    if let Err(e) = api.kill(&c.sandbox_id).await {
                        s.first_error.get_or_insert(format!("kill: {e}"));
                    }
                }
                Err(e) => {
                    s.create_failed += 1;
                    s.first_error.get_or_insert(e.to_string());
                }
            }
        }
    }
    for s in &mut sides {
        s.create_ms = Summary::of_ms(&s.create_samples_ms);
    }
    let file_rounds = if plan.quick { 2 } else { 3 };
    let mut notes = Vec::new();
    log("command round trips and file throughput, alternating");
    if let Err(e) = interactive(apis, &mut sides, plan, file_rounds).await {
        notes.push(format!("network comparison: command/file run failed: {e}"));
    }
    let [user, tap] = sides;
    NetworkComparison {
        user,
        tap,
        file_rounds,
        notes,
    }
}

/// One sandbox on each server, alive together; RTTs in chunks of 10 and file rounds taken
/// in turn.
async fn interactive(
    apis: [&Api; 2],
    sides: &mut [NetworkSide; 2],
    plan: &Plan<'_>,
    file_rounds: usize,
) -> Result<()> {
    let mut targets: Vec<(String, EnvdTarget)> = Vec::new();
    let mut made = Ok(());
    for api in apis {
        match api.create(plan.template).await {
            Ok((c, _)) => {
                let mut t = api.envd(&c);
                t.user = Some("user".into());
                targets.push((c.sandbox_id, t));
            }
            Err(e) => {
                made = Err(e);
                break;
            }
        }
    }
    let outcome = match made {
        Ok(()) => interactive_runs(apis, &targets, sides, plan.quick, file_rounds).await,
        Err(e) => Err(e),
    };
    for (api, (id, _)) in apis.iter().zip(&targets) {
        let _ = api.kill(id).await;
    }
    Ok(outcome?)
}

async fn interactive_runs(
    apis: [&Api; 2],
    targets: &[(String, EnvdTarget)],
    sides: &mut [NetworkSide; 2],
    quick: bool,
    file_rounds: usize,
) -> Result<(), firkin_bench::ClientError> {
    const CHUNK: usize = 10;
    let rounds = if quick { 20 } else { 100 };
    let mut rtts = [Vec::new(), Vec::new()];
    for (i, (api, (_, t))) in apis.iter().zip(targets).enumerate() {
        rtts[i].extend(suite::command_round_trips(api, t, 5, 0).await?);
    }
    for _ in 0..rounds / CHUNK {
        for (i, (api, (_, t))) in apis.iter().zip(targets).enumerate() {
            rtts[i].extend(suite::command_round_trips(api, t, 0, CHUNK).await?);
        }
    }
    for (s, r) in sides.iter_mut().zip(&rtts) {
        s.command_rtt_ms = Summary::of_ms(r);
    }
    for size in [1, 100] {
        let mut best: [Option<FileRun>; 2] = [None, None];
        for _ in 0..file_rounds {
            for (i, (api, (_, t))) in apis.iter().zip(targets).enumerate() {
                let run = suite::file_throughput(api, t, size, 1).await?;
                best[i] = Some(match best[i].take() {
                    Some(b) => FileRun {
                        size_mib: size,
                        write_mib_s: b.write_mib_s.max(run.write_mib_s),
                        read_mib_s: b.read_mib_s.max(run.read_mib_s),
                    },
                    None => run,
                });
            }
        }
        for (s, b) in sides.iter_mut().zip(best) {
            s.files.extend(b);
        }
    }
    Ok(())
}
