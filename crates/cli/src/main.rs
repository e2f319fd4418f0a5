//! `firkin`: run the server, check the host, manage templates and sandboxes.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod client;
mod doctor;
mod logging;
mod network;
mod sandbox;
mod serve;
mod template;

/// Self-hosted sandboxes for AI agents that the official E2B SDKs drive unchanged.
///
/// Start the server, point the SDK at it, create sandboxes:
///
///   firkin serve
///   export E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3000
///   export E2B_API_KEY=<the key firkin serve printed>
///   python -c 'from e2b import Sandbox; print(Sandbox.create().commands.run("uname -a").stdout)'
#[derive(Debug, Parser)]
#[command(name = "firkin", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Log filter (tracing syntax), e.g. `info`, `firkin_server=debug`.
    #[arg(long, env = "FIRKIN_LOG", default_value = "info", global = true)]
    log: String,

    /// Log format on stderr: `auto` is text, coloured only on a terminal (and never with
    /// NO_COLOR set); `text` is never coloured; `json` is one JSON object per line.
    #[arg(
        long,
        value_enum,
        env = "FIRKIN_LOG_FORMAT",
        default_value_t = logging::LogFormat::Auto,
        global = true
    )]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve(serve::ServeArgs),
    Doctor(doctor::DoctorArgs),
    #[command(subcommand)]
    Template(template::TemplateCommand),
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !cli.log.contains("qapi")
        && let Ok(quiet) = "qapi=error".parse()
    {
        // The QMP client warns "QAPI stream closed" whenever a VM quits and closes its socket,
        // which is how every sandbox stop ends, not a fault.
        filter = filter.add_directive(quiet);
    }
    logging::init(filter, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            let err = anyhow::Error::new(err).context("cannot start the async runtime");
            logging::fatal(cli.log_format, &err);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            logging::fatal(cli.log_format, &err);
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Serve(args) => serve::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Doctor(args) => doctor::run(args).await,
        Command::Template(cmd) => template::run(cmd).await,
        Command::Sandbox(cmd) => sandbox::run(cmd).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
