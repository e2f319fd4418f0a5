//! What can fail, and with which input.

use std::path::PathBuf;

/// Starting, talking to or stopping a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no free ports for the {language} kernel: {source}")]
    Ports {
        language: String,
        #[source]
        source: jupyter_zmq_client::RuntimeError,
    },
    #[error("writing the connection file {path}: {source}")]
    ConnectionFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the kernel support file {path}: {source}")]
    SupportFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handing the connection file {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("no kernel is configured for {language}")]
    NoKernel { language: String },
    #[error("the {language} kernel's argv is empty")]
    EmptyArgv { language: String },
    #[error("spawning the {language} kernel `{program}` in {cwd}: {source}")]
    Spawn {
        language: String,
        program: String,
        cwd: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to the {language} kernel's {channel} channel: {source}")]
    Connect {
        language: String,
        channel: &'static str,
        #[source]
        source: jupyter_zmq_client::RuntimeError,
    },
    #[error("sending {msg_type} to the {language} kernel: {source}")]
    Send {
        language: String,
        msg_type: &'static str,
        #[source]
        source: jupyter_zmq_client::RuntimeError,
    },
    #[error("the {language} kernel exited before it was ready ({status})")]
    ExitedEarly { language: String, status: String },
    #[error("the {language} kernel did not answer kernel_info within {secs} s")]
    NotReady { language: String, secs: u64 },
    #[error("the {language} kernel has exited")]
    Dead { language: String },
}

/// A request the service cannot serve as asked.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("context {0} not found")]
    UnknownContext(String),
    #[error("language {language:?} has no kernel configured (known: {known})")]
    UnknownLanguage { language: String, known: String },
    #[error("give either context_id or language, not both")]
    ContextAndLanguage,
    #[error("env var name {0:?} is not a valid identifier")]
    EnvName(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}
