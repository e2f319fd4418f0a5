//! The service as a whole: contexts, defaults started, HTTP served until shutdown.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::contexts::{Contexts, ServiceConfig};
use crate::http;

/// Serves on `listener` until `shutdown` resolves; then every kernel is killed (each kernel's
/// process group goes when its context is dropped).
pub async fn serve(
    listener: TcpListener,
    config: ServiceConfig,
    default_languages: &[String],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let contexts = Arc::new(Contexts::new(config));
    contexts.start_defaults(default_languages);
    let app = http::router(contexts.clone());
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .into_future();
    // A streaming `/execute` of an endless loop would hold a graceful shutdown forever.
    let grace = async move {
        let _ = stop_rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let served = tokio::select! {
        r = server => r,
        () = grace => Ok(()),
    };
    contexts.shutdown();
    served
}

/// How long running executions may go on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
