//! Every sandbox and template life-cycle operation, as `impl App` blocks cut by concern. The
//! HTTP layer ([`crate::api`]) extracts and maps; these modules decide and change state.

mod control;
mod create;
pub(crate) mod expiry;
mod metrics;
mod network;
pub(crate) use metrics::{MetricsHistory, MetricsRange};
pub(crate) mod recovery;
pub(crate) mod templates;
