//! E2B control-plane routes firkin does not implement yet, answered with 501 and E2B's
//! `{"code","message"}` JSON naming the feature.
//!
//! A client (or an SDK newer than the one we test) calling a real E2B route must learn that the
//! feature is missing, not get a bare 404 "no such endpoint" it would read as a missing sandbox
//! or a mistyped URL: the SDK turns 404 into `SandboxNotFoundException` or `False` on several
//! calls (e.g. `delete_snapshot`). E2B's own spec lists 501 "not implemented by this deployment"
//! as a response. Paths that are in no E2B spec keep the router's 404.
//!
//! The list is E2B's published OpenAPI (`e2b-dev/runtime:spec/openapi.yml`, 2026-12) plus the
//! documented lifecycle events API, minus what [`super::router`] implements. When a feature
//! lands, its rows move from here to the router; README's status list names the same features.
//! Path parameters use the router's names where a prefix is shared (`{id}` under
//! `/sandboxes/`), because the router refuses two names for one segment.

use std::sync::Arc;

use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::{MethodFilter, on};

use crate::app::App;
use crate::error::ApiError;

/// One E2B route firkin answers with 501.
#[derive(Debug, Clone)]
pub struct Unsupported {
    pub method: Method,
    /// In the router's syntax (`{param}`).
    pub path: &'static str,
    /// What the message names: "<feature> is not supported by firkin yet".
    pub feature: &'static str,
}

const fn row(method: Method, path: &'static str, feature: &'static str) -> Unsupported {
    Unsupported {
        method,
        path,
        feature,
    }
}

const FORK: &str = "sandbox fork";
const SNAPSHOTS: &str = "named snapshots";
const LOGS: &str = "sandbox logs";
const BULK_METRICS: &str = "metrics of several sandboxes in one call";
const TEMPLATE_BUILDS: &str =
    "building templates through E2B's API (use `firkin template build` or /firkin/v1/templates)";
const TEMPLATE_BUILDS_LIST: &str = "listing a template's builds";
const TEMPLATE_DELETE: &str =
    "deleting templates and snapshots through E2B's API (use `firkin template rm`)";
const TEMPLATE_UPDATE: &str = "updating a template's visibility";
const TEMPLATE_TAGS: &str = "template tags";
const TEMPLATE_ALIASES: &str = "template alias lookup";
const VOLUMES: &str = "volumes";
const SECRETS: &str = "secrets";
const TEAMS: &str = "teams";
const TEAM_METRICS: &str = "team metrics";
const API_KEYS: &str = "API key management (firkin takes its key from FIRKIN_API_KEY)";
const EVENTS: &str = "lifecycle events";
const WEBHOOKS: &str = "lifecycle webhooks";
const ADMIN: &str = "cluster administration";

/// Every E2B route answered with 501, one row per method and path.
pub const ROUTES: &[Unsupported] = &[
    // Sandboxes: persistence, logs.
    row(Method::POST, "/sandboxes/{id}/fork", FORK),
    row(Method::POST, "/sandboxes/{id}/snapshots", SNAPSHOTS),
    row(Method::GET, "/snapshots", SNAPSHOTS),
    row(Method::GET, "/sandboxes/{id}/logs", LOGS),
    row(Method::GET, "/v2/sandboxes/{id}/logs", LOGS),
    row(Method::GET, "/sandboxes/metrics", BULK_METRICS),
    // Templates: E2B's build protocols (v1, v2, v3), tags, aliases, updates.
    row(Method::POST, "/v3/templates", TEMPLATE_BUILDS),
    row(Method::POST, "/v2/templates", TEMPLATE_BUILDS),
    row(Method::POST, "/templates", TEMPLATE_BUILDS),
    row(Method::POST, "/templates/{templateID}", TEMPLATE_BUILDS),
    row(
        Method::POST,
        "/templates/{templateID}/builds/{buildID}",
        TEMPLATE_BUILDS,
    ),
    row(
        Method::POST,
        "/v2/templates/{templateID}/builds/{buildID}",
        TEMPLATE_BUILDS,
    ),
    row(
        Method::GET,
        "/templates/{templateID}/builds/{buildID}/status",
        TEMPLATE_BUILDS,
    ),
    row(
        Method::GET,
        "/templates/{templateID}/builds/{buildID}/logs",
        TEMPLATE_BUILDS,
    ),
    row(Method::GET, "/templates/{templateID}", TEMPLATE_BUILDS_LIST),
    row(Method::DELETE, "/templates/{templateID}", TEMPLATE_DELETE),
    row(Method::PATCH, "/templates/{templateID}", TEMPLATE_UPDATE),
    row(Method::PATCH, "/v2/templates/{templateID}", TEMPLATE_UPDATE),
    row(Method::POST, "/templates/tags", TEMPLATE_TAGS),
    row(Method::DELETE, "/templates/tags", TEMPLATE_TAGS),
    row(Method::GET, "/templates/{templateID}/tags", TEMPLATE_TAGS),
    row(Method::GET, "/templates/aliases/{alias}", TEMPLATE_ALIASES),
    // Volumes and secrets.
    row(Method::GET, "/volumes", VOLUMES),
    row(Method::POST, "/volumes", VOLUMES),
    row(Method::GET, "/volumes/{volumeID}", VOLUMES),
    row(Method::DELETE, "/volumes/{volumeID}", VOLUMES),
    row(Method::GET, "/secrets", SECRETS),
    row(Method::POST, "/secrets", SECRETS),
    row(Method::GET, "/secrets/{secretID}", SECRETS),
    row(Method::POST, "/secrets/{secretID}", SECRETS),
    row(Method::DELETE, "/secrets/{secretID}", SECRETS),
    // Teams and API keys.
    row(Method::GET, "/teams", TEAMS),
    row(Method::GET, "/teams/{teamID}/metrics", TEAM_METRICS),
    row(Method::GET, "/teams/{teamID}/metrics/max", TEAM_METRICS),
    row(Method::GET, "/api-keys", API_KEYS),
    row(Method::POST, "/api-keys", API_KEYS),
    row(Method::PATCH, "/api-keys/{apiKeyID}", API_KEYS),
    row(Method::DELETE, "/api-keys/{apiKeyID}", API_KEYS),
    // Lifecycle events and webhooks (E2B's documented events API).
    row(Method::GET, "/events/sandboxes", EVENTS),
    row(Method::GET, "/events/sandboxes/{sandboxID}", EVENTS),
    row(Method::GET, "/events/webhooks", WEBHOOKS),
    row(Method::POST, "/events/webhooks", WEBHOOKS),
    row(Method::GET, "/events/webhooks/{webhookID}", WEBHOOKS),
    row(Method::PATCH, "/events/webhooks/{webhookID}", WEBHOOKS),
    row(Method::DELETE, "/events/webhooks/{webhookID}", WEBHOOKS),
    // Cluster administration: firkin is one machine, configured on its command line.
    row(Method::GET, "/nodes", ADMIN),
    row(Method::GET, "/nodes/{nodeID}", ADMIN),
    row(Method::POST, "/nodes/{nodeID}", ADMIN),
    row(Method::GET, "/admin/sandboxes/running-counts", ADMIN),
    row(Method::POST, "/admin/teams/{teamID}/sandboxes/kill", ADMIN),
    row(Method::POST, "/admin/teams/{teamID}/builds/cancel", ADMIN),
    row(Method::POST, "/admin/teams/{teamID}/api-keys", ADMIN),
    row(
        Method::DELETE,
        "/admin/teams/{teamID}/api-keys/{apiKeyID}",
        ADMIN,
    ),
    row(Method::GET, "/clusters/{clusterID}/rigs", ADMIN),
    row(
        Method::PUT,
        "/clusters/{clusterID}/rigs/{rigID}/capacity",
        ADMIN,
    ),
    row(
        Method::GET,
        "/clusters/{clusterID}/rigs/{rigID}/instances",
        ADMIN,
    ),
    row(
        Method::GET,
        "/clusters/{clusterID}/rigs/{rigID}/errors",
        ADMIN,
    ),
    row(
        Method::DELETE,
        "/clusters/{clusterID}/rigs/instances/{instanceID}",
        ADMIN,
    ),
];

/// The 501 one row answers.
pub fn not_supported(route: &Unsupported) -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{} {}: {} is not supported by firkin yet",
            route.method, route.path, route.feature
        ),
    )
}

/// Adds every row of [`ROUTES`] to `router` (rows of one path share its method router, beside
/// the methods firkin implements there).
pub(super) fn add(mut router: Router<Arc<App>>) -> Router<Arc<App>> {
    for route in ROUTES {
        // Every row uses a standard method, which always converts; a row that did not would
        // fall back to the router's 404/405 and fail the test that walks this table.
        let Ok(filter) = MethodFilter::try_from(route.method.clone()) else {
            continue;
        };
        router = router.route(
            route.path,
            on(filter, move || async move { not_supported(route) }),
        );
    }
    router
}
