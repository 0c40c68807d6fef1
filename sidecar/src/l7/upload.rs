//! The request body of one outbound attempt, sent on its own task so that the response can come
//! back while the body still flows: a streaming call (gRPC bidirectional streaming, an HTTP/1.1
//! chunked exchange) sends message *n+1* only after it has read reply *n*.
//!
//! The body starts at once, or — for a request with `Expect: 100-continue` (RFC 9110 §10.1.1) —
//! only when the peer passes on the app's `100 Continue`, or when [`EXPECT_TIMEOUT`] passes
//! without an answer (as curl does when a server ignores the expectation). A final answer that
//! comes first leaves the body unread: the app's client gets it after sending no body byte.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halyard_transport::h3::error::Code;
use halyard_transport::PooledSend;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::body::Buffered;
use crate::state::Shared;

/// How long a request with `Expect: 100-continue` waits for `100 Continue` or a final answer
/// before its body is sent anyway (curl's `--expect100-timeout` default).
pub(crate) const EXPECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The request body as attempts see it.
pub(crate) enum Payload {
    /// Kept in memory: may be sent more than once.
    Replayable(Buffered),
    /// Streamed and not yet read: one attempt may send it.
    Stream(Incoming),
    /// Read by an attempt: nothing is left to send again.
    Gone,
}

impl Payload {
    /// Whether another attempt can still send the whole body.
    pub(crate) fn intact(&self) -> bool {
        !matches!(self, Payload::Gone)
    }
}

/// Why the body could not be sent.
#[derive(Debug)]
pub(crate) enum UploadError {
    /// The app's request body broke (its client went away mid-body): this side's failure.
    App(String),
    /// The stream to the peer failed or was stopped; the answer (if any) comes on the response
    /// side, so this alone fails nothing.
    Peer,
    /// The body was already read by an earlier attempt.
    Gone,
}

/// When the body of an attempt may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// At once.
    Now,
    /// After the peer's `100 Continue`, or after [`EXPECT_TIMEOUT`].
    OnContinue,
    /// Never: the stream becomes a tunnel once the peer accepts the upgrade.
    Upgrade,
}

/// The send half of one attempt and the task that streams the body on it.
pub(crate) struct Upload {
    /// Until the body starts (kept for an upgrade's tunnel).
    send: Option<PooledSend>,
    start: Start,
    done: Option<oneshot::Receiver<Result<(), UploadError>>>,
    cancel: CancellationToken,
}

impl Upload {
    /// An upload on `send`; nothing is sent before [`Upload::begin`]. It also stops at the
    /// drain deadline.
    pub(crate) fn new(shared: &Shared, send: PooledSend, start: Start) -> Self {
        Upload {
            send: Some(send),
            start,
            done: None,
            cancel: shared.hard_stop.child_token(),
        }
    }

    /// When the body may start.
    pub(crate) fn start(&self) -> Start {
        self.start
    }

    /// Starts streaming `payload` on its own task (once; later calls do nothing). A kept body
    /// is copied by reference; a streamed one is taken, leaving [`Payload::Gone`].
    pub(crate) fn begin(&mut self, shared: &Arc<Shared>, payload: &mut Payload) {
        let Some(send) = self.send.take() else {
            return;
        };
        let source = match std::mem::replace(payload, Payload::Gone) {
            Payload::Replayable(b) => {
                *payload = Payload::Replayable(b.clone());
                Source::Kept(b)
            }
            Payload::Stream(body) => Source::Stream(body),
            Payload::Gone => Source::Gone,
        };
        let mut send = send;
        if source.is_empty() && finish_now(&mut send) {
            // No body (a GET, most calls): the stream's end goes out with its head, in the same
            // packet, instead of from a task of its own a moment later (a second packet, and a
            // second wake-up of the peer, per request).
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.done = Some(rx);
        let cancel = self.cancel.clone();
        shared.flows.spawn(async move {
            let _ = tx.send(run(send, source, cancel).await);
        });
    }

    /// Resolves only when the app's body broke; every other outcome shows on the response.
    pub(crate) async fn app_failure(&mut self) -> String {
        if let Some(done) = self.done.as_mut() {
            if let Ok(Err(UploadError::App(why))) = done.await {
                return why;
            }
            self.done = None;
        }
        std::future::pending().await
    }

    /// The send half, if the body never started (an upgrade becomes a tunnel on it).
    pub(crate) fn take_unstarted(&mut self) -> Option<PooledSend> {
        self.send.take()
    }

    /// Keeps the body going until the guard drops, then stops what is left of it.
    pub(crate) fn keep_going(mut self) -> DropGuard {
        if let Some(mut send) = self.send.take() {
            // A final answer came before the body was allowed to start: none will be sent.
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
        }
        // `self` drops here and cancels its token: hand the caller the live one.
        std::mem::replace(&mut self.cancel, CancellationToken::new()).drop_guard()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // An attempt given up (a retry, a timeout, the app gone) stops its body.
        if let Some(send) = self.send.as_mut() {
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
        }
        self.cancel.cancel();
    }
}

enum Source {
    Kept(Buffered),
    Stream(Incoming),
    Gone,
}

impl Source {
    /// Known to hold nothing to send: no data and no trailers.
    fn is_empty(&self) -> bool {
        match self {
            Source::Kept(b) => b.data.is_empty() && b.trailers.is_none(),
            Source::Stream(body) => hyper::body::Body::is_end_stream(body),
            Source::Gone => false,
        }
    }
}

/// Finishes the stream if that completes at once; true when it is done with, finished or
/// reset. With grease frames off (the pool's setting) h3's `finish` is quinn's synchronous
/// `finish`, so one poll always completes; `Pending` would mean a grease frame was half
/// written, and the task's own `finish` would then fail the stream — hence the assertion.
fn finish_now(send: &mut PooledSend) -> bool {
    use std::future::Future as _;
    let finished = super::poll_now(|cx| std::pin::pin!(send.finish()).poll(cx));
    match finished {
        std::task::Poll::Ready(Ok(())) => true,
        std::task::Poll::Ready(Err(_)) => {
            // As `run` does on a failed write: the response side reports the peer's answer.
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
            true
        }
        std::task::Poll::Pending => {
            debug_assert!(false, "finishing an h3 stream without grease waited");
            false
        }
    }
}

/// Sends the body and finishes the stream; on any failure or cancellation the stream is reset
/// instead, so a cut body never looks complete (QUIC finishes a dropped send stream).
async fn run(
    mut send: PooledSend,
    source: Source,
    cancel: CancellationToken,
) -> Result<(), UploadError> {
    let result = tokio::select! {
        r = write(&mut send, source) => r,
        _ = cancel.cancelled() => Err(UploadError::Peer),
    };
    if result.is_err() {
        send.stop_stream(Code::H3_REQUEST_CANCELLED);
    }
    result
}

async fn write(send: &mut PooledSend, source: Source) -> Result<(), UploadError> {
    match source {
        Source::Kept(b) => {
            if !b.data.is_empty() {
                data(send, b.data).await?;
            }
            if let Some(t) = b.trailers {
                trailers(send, t).await?;
            }
        }
        Source::Stream(mut body) => {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| UploadError::App(format!("request body: {e}")))?;
                match frame.into_data() {
                    Ok(bytes) => data(send, bytes).await?,
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            trailers(send, t).await?;
                        }
                    }
                }
            }
        }
        Source::Gone => return Err(UploadError::Gone),
    }
    send.finish().await.map_err(|_| UploadError::Peer)
}

async fn data(send: &mut PooledSend, bytes: Bytes) -> Result<(), UploadError> {
    // An empty DATA frame reads as the end of the data on h3's receiving side (0.0.8): a later
    // frame would then fail the whole connection. Nothing to send anyway.
    if bytes.is_empty() {
        return Ok(());
    }
    send.send_data(bytes).await.map_err(|_| UploadError::Peer)
}

async fn trailers(send: &mut PooledSend, t: HeaderMap) -> Result<(), UploadError> {
    send.send_trailers(t).await.map_err(|_| UploadError::Peer)
}
