//! Listener glue shared by the data plane, the admin server and the sample app: an accept loop
//! that survives accept errors, and an HTTP/1.1 server whose connections end with it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long an accept loop pauses after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

static ACCEPT_WARNINGS: crate::bounds::AcceptWarnings = crate::bounds::AcceptWarnings::new();

/// Default time allowed for a request head on [`serve_http1`] servers (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The next connection on `listener` that `cap` has room for, with its place; one past the
/// cap is closed at once. `None` once `stop` is cancelled.
pub(crate) async fn accept_capped(
    listener: &TcpListener,
    stop: &CancellationToken,
    cap: &crate::bounds::ListenerCap,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    loop {
        let (tcp, peer) = accept(listener, stop, cap.what()).await?;
        if let Some(place) = cap.admit() {
            return Some((tcp, peer, place));
        }
        // The app sees a reset at once (SO_LINGER 0 never blocks a non-blocking socket).
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    }
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. An accept error (out
/// of file descriptors, say, which repeats until some close) is logged and retried after a
/// pause instead of spun on.
pub(crate) async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                // Out of file descriptors repeats until some close: warn once per burst.
                if ACCEPT_WARNINGS.should_warn(std::time::Instant::now()) {
                    let address = listener
                        .local_addr()
                        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
                    tracing::warn!(listener = what, %address, error = %e, "accept failed (out of file descriptors?): \
                        new connections wait in the kernel's backlog; retrying every 100 ms");
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `stop`, answering each request with `handle(state, req)`.
/// On `stop` every connection finishes the request in flight and closes (an idle keep-alive
/// connection at once); one still busy after `grace` is dropped, so none outlives the server.
pub async fn serve_http1<T, F, Fut, B>(
    listener: TcpListener,
    stop: CancellationToken,
    what: &str,
    grace: Duration,
    state: Arc<T>,
    handle: F,
) where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = (grace, HEADER_READ_TIMEOUT);
    serve_http1_within(listener, stop, what, limits, state, handle).await
}

/// [`serve_http1`] with `(grace, header_read_timeout)`: a connection whose request head is not
/// complete that long after the server began waiting for it (idle keep-alive time included) is
/// closed.
pub(crate) async fn serve_http1_within<T, F, Fut, B>(
    listener: TcpListener,
    stop: CancellationToken,
    what: &str,
    (grace, header_timeout): (Duration, Duration),
    state: Arc<T>,
    handle: F,
) where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conns = tokio_util::task::TaskTracker::new();
    let force = CancellationToken::new();
    while let Some((tcp, _)) = accept(&listener, &stop, what).await {
        let _ = tcp.set_nodelay(true);
        let (state, handle) = (state.clone(), handle.clone());
        let svc = hyper::service::service_fn(move |req| {
            let answer = handle(state.clone(), req);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let (stop, force) = (stop.clone(), force.clone());
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                _ = conn => {}
                _ = force.cancelled() => {}
            }
        });
    }
    conns.close();
    if tokio::time::timeout(grace, conns.wait()).await.is_err() {
        force.cancel();
        conns.wait().await;
    }
}
