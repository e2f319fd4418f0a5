//! `process.Process`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use connectrpc::{
    ConnectError, Encodable, InboundStream, RequestContext, Response, ServiceRequest,
    ServiceResult, ServiceStream,
};
use futures::{Stream, StreamExt};

use super::{keepalive_interval, request_user};
use crate::process::hub::{Item, Source, Subscription};
use crate::process::{Config, DEFAULT_PATH, Proc, ProcessError, Selector, SpawnRequest};
use crate::process_proto::__buffa::oneof::process_event::{Event, data_event::Output};
use crate::process_proto::__buffa::oneof::process_input::Input;
use crate::process_proto::__buffa::oneof::process_selector::Selector as PbSelector;
use crate::process_proto::__buffa::oneof::stream_input_request::Event as InputEvent;
use crate::process_proto::process_event::{DataEvent, EndEvent, StartEvent};
use crate::process_proto::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, Process, ProcessConfig, ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector,
    SendInputRequest, SendInputResponse, SendSignalRequest, SendSignalResponse, Signal,
    StartRequest, StartResponse, StreamInputRequest, StreamInputResponse, UpdateRequest,
    UpdateResponse,
};
use crate::state::Envd;

/// Implements `process.Process`.
#[derive(Debug)]
pub struct ProcessService {
    envd: Arc<Envd>,
}

impl ProcessService {
    /// Serves processes of `envd`.
    pub fn new(envd: Arc<Envd>) -> Self {
        Self { envd }
    }

    /// The process `sel` names; a finished one only with `include_finished`.
    fn find(&self, sel: &Selector, include_finished: bool) -> Result<Arc<Proc>, ConnectError> {
        self.envd
            .processes
            .find(sel, include_finished)
            .map_err(process_error)
    }
}

fn process_error(e: ProcessError) -> ConnectError {
    match e {
        ProcessError::NotFound(_) => ConnectError::not_found(e.to_string()),
        ProcessError::Invalid(_) => ConnectError::invalid_argument(e.to_string()),
        ProcessError::Spawn { ref source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound
            | std::io::ErrorKind::PermissionDenied
            | std::io::ErrorKind::InvalidInput
            | std::io::ErrorKind::NotADirectory => ConnectError::invalid_argument(e.to_string()),
            _ => ConnectError::internal(e.to_string()),
        },
        ProcessError::Write { .. } => ConnectError::internal(e.to_string()),
    }
}

fn selector(sel: Option<&ProcessSelector>) -> Result<Selector, ConnectError> {
    match sel.and_then(|s| s.selector.as_ref()) {
        Some(PbSelector::Pid(pid)) => Ok(Selector::Pid(*pid)),
        Some(PbSelector::Tag(tag)) => Ok(Selector::Tag(tag.clone())),
        None => Err(ConnectError::invalid_argument(
            "a process selector (pid or tag) is required",
        )),
    }
}

fn event(e: Event) -> ProcessEvent {
    ProcessEvent {
        event: Some(e),
        ..Default::default()
    }
}

fn data_event(source: Source, data: &[u8]) -> ProcessEvent {
    let output = match source {
        Source::Stdout => Output::Stdout(data.to_vec()),
        Source::Stderr => Output::Stderr(data.to_vec()),
        Source::Pty => Output::Pty(data.to_vec()),
    };
    event(Event::Data(Box::new(DataEvent {
        output: Some(output),
        ..Default::default()
    })))
}

type EventStream = Pin<Box<dyn Stream<Item = ProcessEvent> + Send>>;

/// `start{pid}`, then output and keepalives, then `end`. Dropping the stream (the client went
/// away) only detaches it; the process keeps running.
fn event_stream(pid: u32, sub: Subscription, keepalive: Duration) -> EventStream {
    let start = futures::stream::once(async move {
        event(Event::Start(Box::new(StartEvent {
            pid,
            ..Default::default()
        })))
    });
    let rest = futures::stream::unfold(Some(sub), move |sub| async move {
        let mut sub = sub?;
        match tokio::time::timeout(keepalive, sub.next()).await {
            Err(_) => Some((event(Event::Keepalive(Box::default())), Some(sub))),
            Ok(Some(Item::Data(source, data))) => Some((data_event(source, &data), Some(sub))),
            Ok(Some(Item::End(end))) => Some((
                event(Event::End(Box::new(EndEvent {
                    exit_code: end.exit_code,
                    exited: end.exited,
                    status: end.status,
                    error: end.error,
                    ..Default::default()
                }))),
                None,
            )),
            Ok(None) => None,
        }
    });
    Box::pin(start.chain(rest))
}

/// Answers with `events`, each wrapped in the call's response message.
fn respond<T: Send + 'static>(
    events: EventStream,
    wrap: fn(ProcessEvent) -> T,
) -> ServiceResult<ServiceStream<T>> {
    let stream: ServiceStream<T> = Box::pin(events.map(move |e| Ok(wrap(e))));
    Response::ok(stream)
}

impl Process for ProcessService {
    async fn list<'a>(
        &'a self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, ListRequest>,
    ) -> ServiceResult<impl Encodable<ListResponse> + Send + use<'a>> {
        let processes = self
            .envd
            .processes
            .running()
            .into_iter()
            .map(|p| ProcessInfo {
                config: ProcessConfig {
                    cmd: p.config.cmd.clone(),
                    args: p.config.args.clone(),
                    envs: p.config.envs.clone().into_iter().collect(),
                    cwd: p.config.cwd.clone(),
                    ..Default::default()
                }
                .into(),
                pid: p.pid,
                tag: p.tag.clone(),
                ..Default::default()
            })
            .collect();
        Response::ok(ListResponse {
            processes,
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, ConnectRequest>,
    ) -> ServiceResult<ServiceStream<impl Encodable<ConnectResponse> + Send + use<>>> {
        let req = request.to_owned_message();
        let proc = self.find(&selector(req.process.as_option())?, true)?;
        let events = event_stream(proc.pid, proc.hub.subscribe(), keepalive_interval(&ctx));
        respond(events, |e| ConnectResponse {
            event: e.into(),
            ..Default::default()
        })
    }

    async fn start(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StartRequest>,
    ) -> ServiceResult<ServiceStream<impl Encodable<StartResponse> + Send + use<>>> {
        let req = request.to_owned_message();
        let user = request_user(&self.envd, &ctx)?;
        let Some(config) = req.process.as_option() else {
            return Err(ConnectError::invalid_argument("process config is required"));
        };
        if config.cmd.is_empty() {
            return Err(ConnectError::invalid_argument("cmd is required"));
        }
        // Waits for an `/init`'s reseed and rename still in flight.
        drop(self.envd.machine_setup.read().await);
        let settings = self.envd.settings();
        let mut env = BTreeMap::new();
        env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
        env.insert("HOME".to_owned(), user.home.display().to_string());
        env.insert("USER".to_owned(), user.name.clone());
        env.insert("LOGNAME".to_owned(), user.name.clone());
        env.extend(settings.env_vars.clone());
        let request_envs: BTreeMap<String, String> = config
            .envs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend(request_envs.clone());

        let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => self.envd.resolve_path(c, &user),
            None => self.envd.workdir_for(&user),
        };
        let pty = req.pty.as_option().map(|p| {
            let size = p.size.as_option();
            let cols = size.map_or(80, |s| s.cols).clamp(1, u16::MAX as u32) as u16;
            let rows = size.map_or(24, |s| s.rows).clamp(1, u16::MAX as u32) as u16;
            (cols, rows)
        });
        let groups = self.envd.accounts.groups_of(&user);
        let spawn = SpawnRequest {
            config: Config {
                cmd: config.cmd.clone(),
                args: config.args.clone(),
                envs: request_envs,
                cwd: config.cwd.clone(),
            },
            user,
            groups,
            cwd,
            env,
            pty,
            // Old clients omit the field and expect stdin to stay open.
            stdin: req.stdin.unwrap_or(true),
            tag: req.tag.clone(),
            timeout: ctx.time_remaining(),
        };
        let (proc, sub) = self
            .envd
            .processes
            .spawn(&self.envd.reaper, spawn)
            .map_err(process_error)?;
        tracing::debug!(pid = proc.pid, cmd = %proc.config.cmd, "started process");
        let events = event_stream(proc.pid, sub, keepalive_interval(&ctx));
        respond(events, |e| StartResponse {
            event: e.into(),
            ..Default::default()
        })
    }

    async fn update<'a>(
        &'a self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, UpdateRequest>,
    ) -> ServiceResult<impl Encodable<UpdateResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let proc = self.find(&selector(req.process.as_option())?, false)?;
        if let Some(size) = req.pty.as_option().and_then(|p| p.size.as_option()) {
            let cols = size.cols.clamp(1, u16::MAX as u32) as u16;
            let rows = size.rows.clamp(1, u16::MAX as u32) as u16;
            proc.resize(cols, rows).map_err(process_error)?;
        }
        Response::ok(UpdateResponse::default())
    }

    async fn stream_input<'a>(
        &'a self,
        _ctx: RequestContext,
        mut requests: InboundStream<StreamInputRequest>,
    ) -> ServiceResult<impl Encodable<StreamInputResponse> + Send + use<'a>> {
        let mut target = None;
        while let Some(msg) = requests.next().await {
            let msg = msg?.to_owned_message();
            match msg.event {
                Some(InputEvent::Start(start)) => {
                    target = Some(self.find(&selector(start.process.as_option())?, false)?);
                }
                Some(InputEvent::Data(data)) => {
                    let Some(proc) = &target else {
                        return Err(ConnectError::invalid_argument(
                            "the first StreamInput message must be start",
                        ));
                    };
                    write_input(proc, data.input.as_option()).await?;
                }
                Some(InputEvent::Keepalive(_)) | None => {}
            }
        }
        Response::ok(StreamInputResponse::default())
    }

    async fn send_input<'a>(
        &'a self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, SendInputRequest>,
    ) -> ServiceResult<impl Encodable<SendInputResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let proc = self.find(&selector(req.process.as_option())?, false)?;
        write_input(&proc, req.input.as_option()).await?;
        Response::ok(SendInputResponse::default())
    }

    async fn send_signal<'a>(
        &'a self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, SendSignalRequest>,
    ) -> ServiceResult<impl Encodable<SendSignalResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let sel = selector(req.process.as_option())?;
        let signal = match req.signal.as_known() {
            Some(Signal::SIGNAL_SIGKILL) => nix::sys::signal::Signal::SIGKILL,
            Some(Signal::SIGNAL_SIGTERM) => nix::sys::signal::Signal::SIGTERM,
            _ => {
                return Err(ConnectError::invalid_argument(format!(
                    "unsupported signal {}",
                    req.signal.to_i32()
                )));
            }
        };
        let proc = self.find(&sel, false)?;
        match proc.signal(signal) {
            Ok(()) => Response::ok(SendSignalResponse::default()),
            Err(nix::errno::Errno::ESRCH) => Err(ConnectError::not_found(format!(
                "process {} already exited",
                proc.pid
            ))),
            Err(e) => Err(ConnectError::internal(format!(
                "signalling process {}: {e}",
                proc.pid
            ))),
        }
    }

    async fn close_stdin<'a>(
        &'a self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, CloseStdinRequest>,
    ) -> ServiceResult<impl Encodable<CloseStdinResponse> + Send + use<'a>> {
        let req = request.to_owned_message();
        let proc = self.find(&selector(req.process.as_option())?, false)?;
        proc.close_stdin().await.map_err(process_error)?;
        Response::ok(CloseStdinResponse::default())
    }
}

async fn write_input(
    proc: &crate::process::Proc,
    input: Option<&ProcessInput>,
) -> Result<(), ConnectError> {
    match input.and_then(|i| i.input.as_ref()) {
        Some(Input::Stdin(data)) => proc.write_input(data, false).await,
        Some(Input::Pty(data)) => proc.write_input(data, true).await,
        None => return Ok(()),
    }
    .map_err(process_error)
}
