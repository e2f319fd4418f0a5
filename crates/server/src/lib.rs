//! `firkin serve`: the E2B-compatible control plane and the sandbox-plane proxy, on one
//! listener, with SQLite state, API keys, timeouts, warm pools and crash recovery.
//!
//! - Control plane: E2B's REST API (`/v2/sandboxes`, `/sandboxes/{id}/…`, `/templates`) and
//!   firkin's template builds (`/firkin/v1/templates`). Every error is `{"code","message"}`
//!   JSON with an explicit `Should-Retry`.
//! - Sandbox plane: requests carrying `E2b-Sandbox-Id`/`E2b-Sandbox-Port` (or a
//!   `{port}-{id}.{domain}` host) are streamed to the sandbox's port; a gone sandbox gets
//!   E2B's 502 "was not found".
//! - State: `<state>/firkin.db` ([`store`]); the state directory is locked while a server runs.
//!   On start, records of sandboxes whose VM died with the previous server are removed, paused
//!   sandboxes stay resumable, and leftovers (run directories, half-written snapshots,
//!   interrupted builds) are cleaned up.
//!
//! The server drives a [`firkin_runtime::SandboxRuntime`] of any launcher; template builds go
//! through a [`TemplateBuilder`]. [`process`] adapts the runtime's launcher without isolation, for
//! development and tests.
//!
//! Cut by resource, as Firecracker's API server is: [`api`] extracts requests and maps records to
//! E2B's DTOs, one module per resource; `lifecycle` holds the operations as `impl App` blocks
//! (create, control of one sandbox, expiry and exits, restart recovery, templates); [`store`] has
//! one module per table.

pub mod api;
pub mod app;
pub mod auth;
pub mod build_files;
pub mod capacity;
pub mod egress;
pub mod error;
mod lifecycle;
pub mod orchestrator;
pub mod process;
pub mod proxy;
pub mod qemu;
pub mod recipes;
pub mod server;
pub mod store;
pub mod templates;
pub mod types;
mod upstream;

/// Host processes by pid (the runtime's): recorded sandboxes' identity and the restart sweep.
pub use firkin_runtime::pids as procfs;

pub use app::{CLIENT_ID, DEFAULT_TEMPLATE_BUDGET, ENVD_VERSION, ServerConfig};
pub use capacity::{CapacityPolicy, HostResources};
pub use error::ApiError;
pub use server::{ApiKeySetup, EnsureTemplate, RecoveryReport, Server, ServerError, Templates};
pub use store::{Store, StoreError};
pub use templates::{
    BuildProgress, TemplateBuildError, TemplateBuildRequest, TemplateBuilder, TemplateManifest,
};
