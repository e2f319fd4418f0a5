//! QMP over the socketpair QEMU inherits, through the `qapi` crate.

use std::time::{Duration, Instant};

use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;

use crate::error::{Result, VmmError};

type Service = qapi::futures::QapiService<qapi::futures::QmpStreamTokio<WriteHalf<UnixStream>>>;

/// A negotiated QMP connection to one QEMU.
pub struct Qmp {
    pid: u32,
    service: Service,
    events: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("pid", &self.pid).finish()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// `query-migrate` with only the fields firkin reads. The generated `qmp::MigrationInfo`
/// follows a newer QEMU schema whose required RAM statistics QEMU 7.2 does not send, so
/// decoding into it would fail on a perfectly good answer.
#[derive(Debug, Clone, serde::Serialize)]
struct QueryMigrate {}

#[derive(Debug, Clone, serde::Deserialize)]
struct MigrateInfo {
    status: Option<qmp::MigrationStatus>,
    #[serde(rename = "total-time")]
    total_time: Option<i64>,
    #[serde(rename = "error-desc")]
    error_desc: Option<String>,
    ram: Option<MigrateRam>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct MigrateRam {
    transferred: Option<u64>,
}

impl qapi::Command for QueryMigrate {
    type Ok = MigrateInfo;
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
}
impl qmp::QmpCommand for QueryMigrate {}

/// Final state of a migration, as QEMU reports it.
#[derive(Debug, Clone)]
pub struct MigrationOutcome {
    pub total_time_ms: Option<i64>,
    pub ram_transferred: Option<u64>,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities on our end of the socketpair.
    pub async fn connect(pid: u32, stream: std::os::unix::net::UnixStream) -> Result<Self> {
        let io_err = |source| VmmError::QmpIo { pid, source };
        stream.set_nonblocking(true).map_err(io_err)?;
        let stream = UnixStream::from_std(stream).map_err(io_err)?;
        let (r, w) = tokio::io::split(stream);
        let negotiation = qapi::futures::QmpStreamTokio::open_split(r, w)
            .await
            .map_err(io_err)?;
        let stream = negotiation.negotiate().await.map_err(io_err)?;
        let (service, events) = stream.spawn_tokio();
        Ok(Qmp {
            pid,
            service,
            events,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs one command, mapping QEMU's error into ours with the command's name.
    pub async fn execute<C>(&self, command: C) -> Result<C::Ok>
    where
        C: qapi::Command + qmp::QmpCommand + 'static,
    {
        let name = C::NAME;
        self.service.execute(command).await.map_err(|e| match e {
            qapi::ExecuteError::Qapi(err) => VmmError::QmpCommand {
                pid: self.pid,
                command: name,
                message: err.desc,
            },
            qapi::ExecuteError::Io(source) => VmmError::QmpIo {
                pid: self.pid,
                source,
            },
        })
    }

    /// Runs one human-monitor (HMP) command and returns what it printed. slirp's
    /// `hostfwd_add` exists only there, and reports failure as printed text
    /// rather than as a QMP error, so callers must read the output.
    pub async fn human(&self, command_line: String) -> Result<String> {
        self.execute(qmp::human_monitor_command {
            command_line,
            cpu_index: None,
        })
        .await
    }

    pub async fn stop(&self) -> Result<()> {
        self.execute(qmp::stop {}).await.map(drop)
    }

    pub async fn cont(&self) -> Result<()> {
        self.execute(qmp::cont {}).await.map(drop)
    }

    /// Asks QEMU to exit; the connection drops as it does.
    pub async fn quit(&self) -> Result<()> {
        match self.execute(qmp::quit {}).await {
            // QEMU may close the socket before or after answering.
            Ok(_) | Err(VmmError::QmpIo { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// ACPI power button.
    pub async fn system_powerdown(&self) -> Result<()> {
        self.execute(qmp::system_powerdown {}).await.map(drop)
    }

    pub async fn status(&self) -> Result<qmp::RunState> {
        Ok(self.execute(qmp::query_status {}).await?.status)
    }

    pub async fn set_ignore_shared(&self, on: bool) -> Result<()> {
        self.execute(qmp::migrate_set_capabilities {
            capabilities: vec![qmp::MigrationCapabilityStatus {
                capability: qmp::MigrationCapability::x_ignore_shared,
                state: on,
            }],
        })
        .await
        .map(drop)
    }

    pub async fn migrate(&self, uri: String) -> Result<()> {
        self.execute(qmp::migrate {
            uri: Some(uri),
            channels: None,
            detach: None,
            resume: None,
        })
        .await
        .map(drop)
    }

    pub async fn migrate_incoming(&self, uri: String) -> Result<()> {
        self.execute(qmp::migrate_incoming {
            uri: Some(uri),
            channels: None,
            exit_on_error: None,
        })
        .await
        .map(drop)
    }

    /// Polls `query-migrate` until the migration completes or fails.
    pub async fn wait_migration(
        &self,
        direction: &'static str,
        timeout: Duration,
    ) -> Result<MigrationOutcome> {
        let start = Instant::now();
        let mut delay = Duration::from_micros(500);
        loop {
            let info = self.execute(QueryMigrate {}).await?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => {
                    return Ok(MigrationOutcome {
                        total_time_ms: info.total_time,
                        ram_transferred: info.ram.and_then(|r| r.transferred),
                    });
                }
                Some(
                    s @ (qmp::MigrationStatus::failed
                    | qmp::MigrationStatus::cancelled
                    | qmp::MigrationStatus::cancelling),
                ) => {
                    return Err(VmmError::Migration {
                        pid: self.pid,
                        direction,
                        message: info.error_desc.unwrap_or_else(|| format!("status {s:?}")),
                    });
                }
                _ => {}
            }
            if start.elapsed() > timeout {
                return Err(VmmError::Timeout {
                    what: format!("migration {direction} of QEMU pid {}", self.pid),
                    ms: timeout.as_millis(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }
}
