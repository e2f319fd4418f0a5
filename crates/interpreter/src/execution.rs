//! One `/execute`: kernel messages in, NDJSON lines out, with the deadline and the client's
//! departure both turned into an interrupt that leaves the kernel usable.

use std::collections::BTreeMap;
use std::time::Duration;

use jupyter_protocol::{ExecutionState, JupyterMessageContent, Media, ReplyStatus, Stdio};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::envvars;
use crate::kernel::Kernel;
use crate::kernel::router::From;
use crate::language::Dialect;
use crate::output::{OutputLine, ResultData};

/// After an interrupt request, how long before SIGINT is tried as well.
const SIGINT_AFTER: Duration = Duration::from_secs(1);
/// After an interrupt, how long before the kernel is taken as stuck (and restarted by the caller).
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
/// After idle, how long to wait for the `execute_reply` (which says whether the run was aborted).
const REPLY_GRACE: Duration = Duration::from_secs(1);

/// What the user asked to run.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub code: String,
    pub env_vars: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
}

/// How a run left its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Idle and usable.
    Idle,
    /// The process is gone.
    Died,
    /// Did not go idle after an interrupt and SIGINT; the caller should restart it.
    Stuck,
    /// The context is being restarted or removed; its kernel is about to go anyway.
    Cancelled,
}

/// Why a run is being interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    ClientGone,
    Deadline,
}

/// Runs `req` on `kernel`, sending the lines to `out` as they happen. A closed `out` means
/// the client left: the run is interrupted, but the kernel is still waited for (and per-run env
/// vars restored) so the next run on the context starts clean.
pub async fn run(
    kernel: &mut Kernel,
    req: RunRequest,
    out: mpsc::Sender<OutputLine>,
    cancel: watch::Receiver<u64>,
) -> Outcome {
    let dialect = Dialect::of(kernel.language());
    let env_dialect = dialect.filter(|_| !req.env_vars.is_empty());
    if let Some(d) = env_dialect
        && let Err(e) = kernel
            .execute_quietly(&envvars::set_snippet(d, &req.env_vars))
            .await
    {
        let _ = out
            .send(OutputLine::error("EnvVarsError", e.to_string()))
            .await;
        let _ = out.send(OutputLine::EndOfExecution).await;
        return if kernel.is_alive() {
            Outcome::Idle
        } else {
            Outcome::Died
        };
    }
    let outcome = stream(kernel, &req, &out, cancel).await;
    if outcome == Outcome::Idle
        && let Some(d) = env_dialect
        && let Err(e) = kernel
            .execute_quietly(&envvars::restore_snippet(d, &req.env_vars))
            .await
    {
        tracing::warn!(error = %e, "restoring env vars after a run");
    }
    outcome
}

async fn stream(
    kernel: &mut Kernel,
    req: &RunRequest,
    out: &mpsc::Sender<OutputLine>,
    mut cancel: watch::Receiver<u64>,
) -> Outcome {
    let send = |line| async move {
        // A departed client is noticed through `out.closed()`; nothing to do here.
        let _ = out.send(line).await;
    };
    let mut pending = match kernel.execute(&req.code, false).await {
        Ok(p) => p,
        Err(e) => {
            send(OutputLine::error("UnexpectedEndOfExecution", e.to_string())).await;
            send(OutputLine::UnexpectedEndOfExecution).await;
            return Outcome::Died;
        }
    };
    let deadline = req.timeout.map(|t| Instant::now() + t);
    let mut errored = false;
    let mut stopped: Option<(Stop, Instant)> = None;
    let mut sigint_sent = false;
    let mut replied = false;
    let mut reply_error = None;
    let mut idle_at: Option<Instant> = None;
    // Set once the run is over for a kernel whose output may trail its end: the run ends when
    // this passes without a message.
    let mut quiet_until: Option<Instant> = None;
    let late_output = kernel.late_output();
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        let stop_at = stopped.map(|(_, at)| at);
        tokio::select! {
            biased;
            next = pending.rx.recv() => {
                let Some(routed) = next else {
                    if !errored {
                        send(OutputLine::error("UnexpectedEndOfExecution",
                            "the kernel exited during the execution")).await;
                    }
                    send(OutputLine::UnexpectedEndOfExecution).await;
                    return Outcome::Died;
                };
                let date = routed.msg.header.date.to_rfc3339();
                if let (Some(_), Some(quiet)) = (quiet_until, late_output) {
                    quiet_until = Some(Instant::now() + quiet);
                }
                let mut finished = false;
                match (routed.from, routed.msg.content) {
                    (From::IoPub, JupyterMessageContent::ExecuteInput(i)) => {
                        send(OutputLine::NumberOfExecutions { execution_count: i.execution_count.0 }).await;
                    }
                    (From::IoPub, JupyterMessageContent::StreamContent(s)) => {
                        send(match s.name {
                            Stdio::Stdout => OutputLine::Stdout { text: s.text, timestamp: date },
                            Stdio::Stderr => OutputLine::Stderr { text: s.text, timestamp: date },
                        }).await;
                    }
                    (From::IoPub, JupyterMessageContent::DisplayData(d)) => {
                        send(OutputLine::Result(Box::new(ResultData::from_bundle(bundle(&d.data), false)))).await;
                    }
                    (From::IoPub, JupyterMessageContent::ExecuteResult(r)) => {
                        send(OutputLine::Result(Box::new(ResultData::from_bundle(bundle(&r.data), true)))).await;
                    }
                    (From::IoPub, JupyterMessageContent::ErrorOutput(e)) if !errored => {
                        errored = true;
                        send(OutputLine::Error {
                            name: e.ename,
                            value: e.evalue,
                            traceback: e.traceback.join("\n"),
                        }).await;
                    }
                    (From::Shell, JupyterMessageContent::ExecuteReply(r)) => {
                        replied = true;
                        match (r.status, r.error) {
                            // Nothing more comes for an aborted request.
                            (ReplyStatus::Aborted, _) if !errored => {
                                errored = true;
                                send(OutputLine::error("ExecutionAborted", "the execution was aborted")).await;
                            }
                            (ReplyStatus::Error, Some(e)) => reply_error = Some(*e),
                            _ => {}
                        }
                        finished = idle_at.is_some();
                    }
                    (From::IoPub, JupyterMessageContent::Status(s))
                        if s.execution_state == ExecutionState::Idle =>
                    {
                        finished = replied;
                        idle_at = Some(Instant::now());
                    }
                    _ => {}
                }
                if finished {
                    match late_output {
                        None => break,
                        Some(quiet) => quiet_until = Some(Instant::now() + quiet),
                    }
                }
            }
            () = tokio::time::sleep_until(quiet_until.unwrap_or(far)), if quiet_until.is_some() => break,
            // Idle and the reply travel on different sockets; the reply tells an aborted run apart.
            () = tokio::time::sleep_until(idle_at.unwrap_or(far) + REPLY_GRACE), if idle_at.is_some() && quiet_until.is_none() => break,
            Ok(()) = cancel.changed() => {
                kernel.interrupt().await;
                if !errored {
                    send(OutputLine::error("ContextRestarting", "the context is being restarted or removed")).await;
                }
                send(OutputLine::EndOfExecution).await;
                return Outcome::Cancelled;
            }
            () = out.closed(), if stopped.is_none() => {
                tracing::info!(language = %kernel.language(), "client left; interrupting");
                kernel.interrupt().await;
                stopped = Some((Stop::ClientGone, Instant::now()));
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && stopped.is_none() => {
                let secs = req.timeout.map_or(0.0, |t| t.as_secs_f64());
                tracing::info!(language = %kernel.language(), secs, "execution timed out; interrupting");
                errored = true;
                send(OutputLine::error("TimeoutError", format!("execution timed out after {secs} s"))).await;
                kernel.interrupt().await;
                stopped = Some((Stop::Deadline, Instant::now()));
            }
            () = tokio::time::sleep_until(stop_at.unwrap_or(far) + SIGINT_AFTER), if stop_at.is_some() && !sigint_sent => {
                kernel.sigint();
                sigint_sent = true;
            }
            () = tokio::time::sleep_until(stop_at.unwrap_or(far) + GIVE_UP_AFTER), if stop_at.is_some() => {
                tracing::warn!(language = %kernel.language(), why = ?stopped.map(|(s, _)| s),
                    "kernel did not stop after an interrupt");
                send(OutputLine::error("UnexpectedEndOfExecution",
                    "the kernel did not stop after an interrupt; restarting it")).await;
                send(OutputLine::UnexpectedEndOfExecution).await;
                return Outcome::Stuck;
            }
        }
    }
    if !errored && let Some(e) = reply_error {
        // A kernel that reported its error only in the reply.
        errored = true;
        send(OutputLine::Error {
            name: e.ename,
            value: e.evalue,
            traceback: e.traceback.join("\n"),
        })
        .await;
    }
    if stopped.is_some() && !errored && kernel.silent_on_interrupt() {
        // Deno stops without saying so; the SDK should still see why.
        send(OutputLine::error(
            "KeyboardInterrupt",
            "the execution was interrupted",
        ))
        .await;
    }
    send(OutputLine::EndOfExecution).await;
    Outcome::Idle
}

/// The MIME type → value map of a bundle, as it went over the wire.
fn bundle(media: &Media) -> Map<String, Value> {
    match serde_json::to_value(media) {
        Ok(Value::Object(m)) => m,
        Ok(_) | Err(_) => Map::new(),
    }
}
