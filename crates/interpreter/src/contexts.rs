//! Code contexts: one kernel each, found by id, with one default context per language. A
//! context's kernel sits behind an async mutex, which is what serializes its executions.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use firkin_e2b_wire::GuestState;
use serde::Serialize;
use tokio::sync::{OwnedMutexGuard, watch};

use crate::error::{KernelError, RequestError};
use crate::kernel::{Kernel, KernelOptions};
use crate::language::{self, Dialect, KernelSpec};
use crate::sandbox::{self, SandboxWatch};

/// What the service needs to start kernels.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Kernel command per canonical language name.
    pub kernels: BTreeMap<String, KernelSpec>,
    /// cwd of contexts created without one.
    pub default_cwd: PathBuf,
    pub kernel: KernelOptions,
    /// envd's sandbox state file (`None`: not in a sandbox).
    pub sandbox_state: Option<PathBuf>,
}

/// The kernel slot of a context: `None` until first started, or after a failed start.
pub type KernelSlot = Option<Kernel>;

/// One code context.
#[derive(Debug)]
pub struct Context {
    pub id: String,
    pub language: String,
    pub cwd: PathBuf,
    kernel: Arc<tokio::sync::Mutex<KernelSlot>>,
    /// Bumped by restart and remove: runs that started (or queued) before see it and end.
    cancel: watch::Sender<u64>,
}

/// A context as `/contexts` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

impl Context {
    pub fn info(&self) -> ContextInfo {
        ContextInfo {
            id: self.id.clone(),
            language: self.language.clone(),
            cwd: self.cwd.to_string_lossy().into_owned(),
        }
    }

    /// Ends the running and queued runs (they report `ContextRestarting`).
    pub fn cancel_runs(&self) {
        self.cancel.send_modify(|generation| *generation += 1);
    }

    /// Notices [`Context::cancel_runs`] calls made from now on.
    pub fn cancellation(&self) -> watch::Receiver<u64> {
        self.cancel.subscribe()
    }

    /// Waits for the context's current execution, then hands over its kernel.
    pub async fn lock(&self) -> OwnedMutexGuard<KernelSlot> {
        self.kernel.clone().lock_owned().await
    }
}

/// All contexts of the service.
#[derive(Debug)]
pub struct Contexts {
    config: ServiceConfig,
    sandbox: SandboxWatch,
    by_id: Mutex<HashMap<String, Arc<Context>>>,
    /// Canonical language → id of its default context.
    defaults: Mutex<HashMap<String, String>>,
}

impl Contexts {
    pub fn new(config: ServiceConfig) -> Self {
        Self {
            sandbox: SandboxWatch::new(config.sandbox_state.clone()),
            config,
            by_id: Mutex::new(HashMap::new()),
            defaults: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    fn by_id(&self) -> MutexGuard<'_, HashMap<String, Arc<Context>>> {
        // Maps stay consistent across a panic elsewhere: every update is a single insert/remove.
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn defaults(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.defaults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The canonical name of `language`, if a kernel is configured for it.
    pub fn language(&self, language: &str) -> Result<String, RequestError> {
        let canonical = language::canonical(language);
        if self.config.kernels.contains_key(&canonical) {
            Ok(canonical)
        } else {
            Err(RequestError::UnknownLanguage {
                language: language.to_owned(),
                known: self
                    .config
                    .kernels
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }

    /// A new context whose kernel starts on first use (see [`Contexts::ensure_started`]).
    fn insert(&self, language: String, cwd: Option<PathBuf>) -> Arc<Context> {
        let ctx = Arc::new(Context {
            id: uuid::Uuid::new_v4().to_string(),
            language,
            cwd: cwd.unwrap_or_else(|| self.config.default_cwd.clone()),
            kernel: Arc::new(tokio::sync::Mutex::new(None)),
            cancel: watch::Sender::new(0),
        });
        self.by_id().insert(ctx.id.clone(), ctx.clone());
        ctx
    }

    /// Creates a context and starts its kernel; on failure the context is not kept.
    pub async fn create(
        &self,
        language: Option<&str>,
        cwd: Option<PathBuf>,
    ) -> Result<Arc<Context>, RequestError> {
        let language = self.language(language.unwrap_or("python"))?;
        let ctx = self.insert(language, cwd);
        let mut slot = ctx.lock().await;
        if let Err(e) = self.ensure_started(&ctx, &mut slot).await {
            self.by_id().remove(&ctx.id);
            return Err(e.into());
        }
        drop(slot);
        Ok(ctx)
    }

    /// The default context of `language`, made now if there is none (its kernel starts when
    /// first locked and ensured).
    pub fn default_for(&self, language: &str) -> Result<Arc<Context>, RequestError> {
        let language = self.language(language)?;
        let mut defaults = self.defaults();
        if let Some(ctx) = defaults.get(&language).and_then(|id| self.get(id)) {
            return Ok(ctx);
        }
        let ctx = self.insert(language.clone(), None);
        defaults.insert(language, ctx.id.clone());
        Ok(ctx)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.by_id().get(id).cloned()
    }

    pub fn find(&self, id: &str) -> Result<Arc<Context>, RequestError> {
        self.get(id)
            .ok_or_else(|| RequestError::UnknownContext(id.to_owned()))
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        let mut all: Vec<ContextInfo> = self.by_id().values().map(|c| c.info()).collect();
        all.sort_by(|a, b| (&a.language, &a.id).cmp(&(&b.language, &b.id)));
        all
    }

    /// Forgets the context. Its kernel is killed now if idle, else as soon as its run has noticed
    /// the cancellation.
    pub fn remove(&self, id: &str) -> Result<(), RequestError> {
        let ctx = self
            .by_id()
            .remove(id)
            .ok_or_else(|| RequestError::UnknownContext(id.to_owned()))?;
        self.defaults().retain(|_, v| v != id);
        ctx.cancel_runs();
        if let Ok(mut slot) = ctx.kernel.try_lock() {
            slot.take();
        }
        Ok(())
    }

    /// Forgets every context, killing the idle kernels now (busy ones go when their run ends).
    pub fn shutdown(&self) {
        let ids: Vec<String> = self.by_id().keys().cloned().collect();
        for id in ids {
            let _ = self.remove(&id);
        }
    }

    /// A fresh kernel for the context, once the running execution (if any) has been cancelled.
    pub async fn restart(&self, id: &str) -> Result<(), RequestError> {
        let ctx = self.find(id)?;
        ctx.cancel_runs();
        let mut slot = ctx.lock().await;
        // The old kernel goes first: two interpreters with a data stack loaded may not fit.
        slot.take();
        self.ensure_started(&ctx, &mut slot).await?;
        Ok(())
    }

    /// Starts the context's kernel if it has none or it has died, and brings it up to date with
    /// the sandbox it serves (see [`crate::sandbox`]): every run goes through here first.
    pub async fn ensure_started<'a>(
        &self,
        ctx: &Context,
        slot: &'a mut KernelSlot,
    ) -> Result<&'a mut Kernel, KernelError> {
        let sandbox = self.sandbox.current().await;
        if slot.as_ref().is_some_and(|k| !k.is_alive()) {
            tracing::warn!(context = %ctx.id, language = %ctx.language, "kernel died; restarting");
            slot.take();
        }
        if slot.is_none() {
            let spec =
                self.config
                    .kernels
                    .get(&ctx.language)
                    .ok_or_else(|| KernelError::NoKernel {
                        language: ctx.language.clone(),
                    })?;
            // The sandbox's env vars under the spec's own, which the kernel needs as they are.
            let mut spec = spec.clone();
            if let Some(state) = &sandbox {
                let mut env = sandbox::spawn_env(state);
                env.append(&mut spec.env);
                spec.env = env;
            }
            let mut kernel =
                Kernel::start(&ctx.language, &spec, &ctx.cwd, &self.config.kernel).await?;
            if let Some(state) = &sandbox {
                kernel.set_sandbox(state.clone());
            }
            *slot = Some(kernel);
        }
        let kernel = slot.as_mut().ok_or_else(|| KernelError::Dead {
            language: ctx.language.clone(),
        })?;
        if let Some(state) = sandbox {
            catch_up(ctx, kernel, state).await?;
        }
        Ok(kernel)
    }

    /// Creates the default contexts of `languages` and starts their kernels in the background;
    /// an `/execute` arriving meanwhile waits for its kernel rather than failing.
    pub fn start_defaults(self: &Arc<Self>, languages: &[String]) {
        for language in languages {
            let ctx = match self.default_for(language) {
                Ok(ctx) => ctx,
                Err(e) => {
                    tracing::warn!(%language, error = %e, "no default context");
                    continue;
                }
            };
            let this = self.clone();
            // Take the lock before returning, so that no execution overtakes the start.
            let Ok(mut slot) = ctx.kernel.clone().try_lock_owned() else {
                continue;
            };
            tokio::spawn(async move {
                match this.ensure_started(&ctx, &mut slot).await {
                    Ok(_) => tracing::info!(language = %ctx.language, context = %ctx.id,
                        "default context ready"),
                    Err(e) => tracing::warn!(language = %ctx.language, error = %e,
                        "default context's kernel did not start; will retry on first use"),
                }
            });
        }
    }
}

/// Runs what `kernel` needs to serve the sandbox `state` describes, once: a silent execution,
/// so the user sees no output and no execution count for it.
async fn catch_up(
    ctx: &Context,
    kernel: &mut Kernel,
    state: GuestState,
) -> Result<(), KernelError> {
    if kernel.sandbox() == Some(&state) {
        return Ok(());
    }
    let code = Dialect::of(&ctx.language)
        .and_then(|dialect| sandbox::catch_up(dialect, kernel.sandbox(), &state));
    if let Some(code) = code {
        let started = std::time::Instant::now();
        kernel.execute_quietly(&code).await?;
        tracing::info!(context = %ctx.id, language = %ctx.language,
            sandbox = state.sandbox.as_deref().unwrap_or(""),
            ms = started.elapsed().as_millis() as u64, "kernel caught up with its sandbox");
    }
    kernel.set_sandbox(state);
    Ok(())
}
