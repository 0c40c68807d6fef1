//! Shutdown on SIGTERM or SIGINT, for the sidecar and for every long-running tool.

use tokio_util::sync::CancellationToken;

/// Cancels `stop` on the first SIGTERM or SIGINT, from a task that lives as long as the
/// runtime. Needs a tokio runtime with signal handling enabled.
pub fn cancel_on_signal(stop: &CancellationToken) {
    let stop = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
}

/// Resolves on the first SIGTERM or SIGINT. Without signal handlers (they could not be
/// installed) it never resolves: the process can then only be killed.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}
