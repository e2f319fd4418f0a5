//! Validated value types shared by every firkin crate: sizes, ids, the sandbox host grammar.
//!
//! Nothing here does I/O. Every constructor that takes outside input validates it, so a value of
//! one of these types is known good wherever it travels.

mod host;
mod host_tools;
mod id;
mod size;

pub use host::{HostParseError, PortSandboxHost};
pub use host_tools::{HOST_TOOLS, HostTool, ToolUse, host_tools_for};
pub use id::{IdError, SandboxId, TemplateId};
pub use size::Size;
