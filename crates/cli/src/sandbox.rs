//! `firkin sandbox ls|create|exec|kill` (clients of a running `firkin serve`).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Result, anyhow};
use http::Method;
use serde_json::{Value, json};

use crate::client::Endpoint;

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Query percent-encoding of the SDK's metadata filter (each key/value quoted, joined as a form,
/// quoted again by the HTTP layer).
fn quote(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Create, list, pause, resume, run commands in and kill sandboxes on a running `firkin serve`.
#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// List sandboxes.
    ///
    /// Examples:
    ///
    ///   firkin sandbox ls
    ///   firkin sandbox ls --state paused --metadata user=alice --json
    #[command(verbatim_doc_comment)]
    Ls {
        /// Only sandboxes in this state (running or paused).
        #[arg(long)]
        state: Option<String>,
        /// Only sandboxes with this metadata (repeatable).
        #[arg(long, value_parser = key_value, value_name = "KEY=VALUE")]
        metadata: Vec<(String, String)>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Create a sandbox and print its id.
    ///
    /// Examples:
    ///
    ///   firkin sandbox create
    ///   firkin sandbox create --template python --timeout 3600 --env DEBUG=1 --metadata user=alice
    ///   ID=$(firkin sandbox create --json | jq -r .sandboxID)
    #[command(verbatim_doc_comment)]
    Create {
        #[arg(long, default_value = "base")]
        template: String,
        /// Lifetime in seconds.
        #[arg(long)]
        timeout: Option<i64>,
        #[arg(long, value_parser = key_value, value_name = "KEY=VALUE")]
        metadata: Vec<(String, String)>,
        #[arg(long, value_parser = key_value, value_name = "KEY=VALUE")]
        env: Vec<(String, String)>,
        /// Pause instead of kill when the lifetime ends.
        #[arg(long)]
        auto_pause: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Run a shell command in a sandbox; exits with the command's exit code.
    ///
    /// Examples:
    ///
    ///   firkin sandbox exec i8x2kq0ab -- uname -a
    ///   firkin sandbox exec i8x2kq0ab --env N=3 -- 'for i in $(seq $N); do echo $i; done'
    #[command(verbatim_doc_comment)]
    Exec {
        id: String,
        #[arg(long, value_parser = key_value, value_name = "KEY=VALUE")]
        env: Vec<(String, String)>,
        /// The command (joined with spaces and run by `bash -l -c`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Pause a running sandbox (its memory and disk are saved; it stops using capacity).
    ///
    /// Example: firkin sandbox pause i8x2kq0ab
    Pause {
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Resume a paused sandbox (no-op for a running one).
    ///
    /// Example: firkin sandbox resume i8x2kq0ab --timeout 600
    Resume {
        id: String,
        /// New lifetime in seconds.
        #[arg(long)]
        timeout: Option<i64>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Kill sandboxes (running or paused).
    ///
    /// Example: firkin sandbox kill i8x2kq0ab j9y3lr1bc
    Kill {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub async fn run(cmd: SandboxCommand) -> Result<ExitCode> {
    match cmd {
        SandboxCommand::Ls {
            state,
            metadata,
            json,
            endpoint,
        } => {
            let api = endpoint.connect()?;
            let mut query = vec!["limit=100".to_owned()];
            if let Some(s) = state {
                query.push(format!("state={}", quote(&s)));
            }
            if !metadata.is_empty() {
                let form: Vec<String> = metadata
                    .iter()
                    .map(|(k, v)| format!("{}={}", quote(&quote(k)), quote(&quote(v))))
                    .collect();
                query.push(format!("metadata={}", quote(&form.join("&"))));
            }
            let mut all: Vec<Value> = Vec::new();
            let mut next: Option<String> = None;
            loop {
                let mut q = query.clone();
                if let Some(t) = &next {
                    q.push(format!("nextToken={}", quote(t)));
                }
                let (page, token) = api
                    .list_page(&format!("/v2/sandboxes?{}", q.join("&")))
                    .await?;
                all.extend(page);
                match token {
                    Some(t) if !t.is_empty() => next = Some(t),
                    _ => break,
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<22} {:<16} {:<8} {:<26} {:<26} METADATA",
                    "SANDBOX", "TEMPLATE", "STATE", "STARTED", "ENDS"
                );
                for s in &all {
                    println!(
                        "{:<22} {:<16} {:<8} {:<26} {:<26} {}",
                        s["sandboxID"].as_str().unwrap_or(""),
                        s["templateID"].as_str().unwrap_or(""),
                        s["state"].as_str().unwrap_or(""),
                        s["startedAt"].as_str().unwrap_or(""),
                        s["endAt"].as_str().unwrap_or(""),
                        s["metadata"],
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Create {
            template,
            timeout,
            metadata,
            env,
            auto_pause,
            json,
            endpoint,
        } => {
            let api = endpoint.connect()?;
            let mut body = json!({
                "templateID": template,
                "metadata": metadata.into_iter().collect::<BTreeMap<_, _>>(),
                "envVars": env.into_iter().collect::<BTreeMap<_, _>>(),
            });
            if let Some(t) = timeout {
                body["timeout"] = t.into();
            }
            if auto_pause {
                body["autoPause"] = true.into();
            }
            let created: Value = api.call(Method::POST, "/v2/sandboxes", Some(&body)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                println!(
                    "{}",
                    created["sandboxID"]
                        .as_str()
                        .ok_or_else(|| anyhow!("the server answered without a sandboxID"))?
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Exec {
            id,
            env,
            command,
            endpoint,
        } => {
            let api = endpoint.connect()?;
            let code = api.exec(&id, &command.join(" "), &env).await?;
            Ok(ExitCode::from(
                u8::try_from(code.clamp(0, 255)).unwrap_or(1),
            ))
        }
        SandboxCommand::Pause { id, endpoint } => {
            let api = endpoint.connect()?;
            let _: Value = api
                .call(
                    Method::POST,
                    &format!("/sandboxes/{id}/pause"),
                    Some(&json!({})),
                )
                .await?;
            eprintln!("paused {id}");
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Resume {
            id,
            timeout,
            endpoint,
        } => {
            let api = endpoint.connect()?;
            let mut body = json!({});
            if let Some(t) = timeout {
                body["timeout"] = t.into();
            }
            let _: Value = api
                .call(
                    Method::POST,
                    &format!("/v2/sandboxes/{id}/connect"),
                    Some(&body),
                )
                .await?;
            eprintln!("{id} is running");
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Kill { ids, endpoint } => {
            let api = endpoint.connect()?;
            let mut failed = false;
            for id in ids {
                match api
                    .call::<Value>(Method::DELETE, &format!("/sandboxes/{id}"), None::<&()>)
                    .await
                {
                    Ok(_) => eprintln!("killed {id}"),
                    Err(e) => {
                        eprintln!("firkin: {e:#}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
