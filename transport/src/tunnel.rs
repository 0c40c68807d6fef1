//! Tunnels: HTTP/3 CONNECT streams (RFC 9114 §4.4) seen as byte streams. [`Tunnel`] is the
//! client side, [`ServerTunnel`] the server side; both implement tokio's `AsyncRead` and
//! `AsyncWrite`, so a sidecar can `copy_bidirectional` them with a `TcpStream`.
//!
//! - `poll_shutdown` finishes the stream (the QUIC FIN: a TCP half-close); reading continues.
//! - [`Tunnel::abort`] resets the stream in both directions (a TCP reset).
//! - A write is accepted as soon as the previous one is handed to QUIC; `poll_flush` waits for
//!   the pending one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::future::BoxFuture;
use h3::error::{Code, StreamError};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::TunnelError;

/// Largest slice turned into one DATA frame by a single write; bigger writes are split so a
/// sender never holds more than this beyond what QUIC has accepted.
const MAX_WRITE: usize = 256 * 1024;

pub(crate) type ClientSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub(crate) type ClientRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;
pub(crate) type ServerSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub(crate) type ServerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

type Op<S> = BoxFuture<'static, (S, Result<(), StreamError>)>;

/// The sending half of an h3 request stream, client or server.
pub(crate) trait SendHalf: Send + Sized + 'static {
    fn send(self, data: Bytes) -> Op<Self>;
    fn finish(self) -> Op<Self>;
    fn reset(&mut self, code: Code);
}

/// The receiving half of an h3 request stream, client or server.
pub(crate) trait RecvHalf: Send + 'static {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
    fn stop(&mut self, code: Code);
}

macro_rules! halves {
    ($send:ty, $recv:ty) => {
        impl SendHalf for $send {
            fn send(mut self, data: Bytes) -> Op<Self> {
                Box::pin(async move {
                    let r = self.send_data(data).await;
                    (self, r)
                })
            }
            fn finish(mut self) -> Op<Self> {
                Box::pin(async move {
                    let r = <$send>::finish(&mut self).await;
                    (self, r)
                })
            }
            fn reset(&mut self, code: Code) {
                self.stop_stream(code);
            }
        }

        impl RecvHalf for $recv {
            fn poll_chunk(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<Bytes>, StreamError>> {
                // The buffers h3 yields are `Bytes`: copy_to_bytes hands them over without a copy.
                self.poll_recv_data(cx)
                    .map_ok(|b| b.map(|mut b| b.copy_to_bytes(b.remaining())))
            }
            fn stop(&mut self, code: Code) {
                self.stop_sending(code);
            }
        }
    };
}

halves!(ClientSend, ClientRecv);
halves!(ServerSend, ServerRecv);

/// Counts the open streams of a pooled connection; decrements when dropped.
#[derive(Debug)]
pub(crate) struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    pub(crate) fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        StreamGuard(counter.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The write side: at most one send in flight inside h3.
struct Writer<S> {
    half: Option<S>,
    pending: Option<(Op<S>, bool)>,
    finished: bool,
    error: Option<TunnelError>,
}

impl<S: SendHalf> Writer<S> {
    fn new(half: S) -> Self {
        Writer {
            half: Some(half),
            pending: None,
            finished: false,
            error: None,
        }
    }

    /// Drives the send in flight, if any, to completion.
    fn poll_pending(&mut self, cx: &mut Context<'_>, established: bool) -> Poll<io::Result<()>> {
        if let Some((op, finishing)) = self.pending.as_mut() {
            let finishing = *finishing;
            let (half, result) = ready!(op.as_mut().poll(cx));
            self.pending = None;
            self.half = Some(half);
            if let Err(e) = result {
                self.error = Some(TunnelError::from_h3(&e, established));
            } else if finishing {
                self.finished = true;
            }
        }
        match &self.error {
            Some(e) => Poll::Ready(Err(e.clone().into_io())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn start(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(S) -> Op<S>,
        finishing: bool,
        established: bool,
    ) -> Poll<io::Result<()>> {
        let Some(half) = self.half.take() else {
            return Poll::Ready(Err(TunnelError::Closed.into_io()));
        };
        self.pending = Some((op(half), finishing));
        // Poll once at once: QUIC usually takes the data synchronously, so no task hop.
        match self.poll_pending(cx, established) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        established: bool,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx, established))?;
        if self.finished {
            return Poll::Ready(Err(TunnelError::Closed.into_io()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_WRITE);
        let data = Bytes::copy_from_slice(&buf[..n]);
        ready!(self.start(cx, |h| h.send(data), false, established))?;
        Poll::Ready(Ok(n))
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>, established: bool) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx, established))?;
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        ready!(self.start(cx, SendHalf::finish, true, established))?;
        self.poll_pending(cx, established)
    }

    fn abort(&mut self, code: Code) {
        self.pending = None;
        if let Some(h) = self.half.as_mut() {
            h.reset(code);
        }
        self.finished = true;
        self.error.get_or_insert(TunnelError::Closed);
    }
}

/// The read side: the current chunk and whether the peer finished.
struct Reader<R> {
    half: R,
    chunk: Bytes,
    eof: bool,
}

impl<R: RecvHalf> Reader<R> {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        established: bool,
    ) -> Poll<io::Result<()>> {
        while self.chunk.is_empty() && !self.eof {
            match ready!(self.half.poll_chunk(cx)) {
                Ok(Some(chunk)) => self.chunk = chunk,
                Ok(None) => self.eof = true,
                Err(e) => return Poll::Ready(Err(TunnelError::from_h3(&e, established).into_io())),
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        buf.put_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

type ResponseOp = BoxFuture<'static, (ClientRecv, Result<http::Response<()>, StreamError>)>;

/// Where the client is in reading the CONNECT response.
enum Response {
    Waiting(ResponseOp),
    Open(Reader<ClientRecv>),
    Failed(TunnelError),
}

/// The client side of a CONNECT tunnel. Writable at once: the first bytes follow the request
/// headers without waiting for the response. The response is awaited on the first read or by
/// [`Tunnel::status`]; a non-2xx answer is then [`TunnelError::Status`] (and the read fails
/// with an `io::Error` of kind `ConnectionRefused` wrapping it).
pub struct Tunnel {
    writer: Writer<ClientSend>,
    response: Response,
    status: Option<StatusCode>,
    _guard: Option<StreamGuard>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    pub(crate) fn new(send: ClientSend, mut recv: ClientRecv, guard: Option<StreamGuard>) -> Self {
        // The pitfall noted in the design: receiving data before the response makes h3 take the
        // response headers for trailers and close the connection, so the response comes first.
        let op: ResponseOp = Box::pin(async move {
            let r = recv.recv_response().await;
            (recv, r)
        });
        Tunnel {
            writer: Writer::new(send),
            response: Response::Waiting(op),
            status: None,
            _guard: guard,
        }
    }

    fn established(&self) -> bool {
        self.status.is_some()
    }

    /// Drives the response; Ready(Ok) once the tunnel is established.
    fn poll_status(&mut self, cx: &mut Context<'_>) -> Poll<Result<StatusCode, TunnelError>> {
        if let Response::Waiting(op) = &mut self.response {
            let (recv, result) = ready!(op.as_mut().poll(cx));
            self.response = match result {
                Ok(resp) if resp.status().is_success() => {
                    self.status = Some(resp.status());
                    Response::Open(Reader {
                        half: recv,
                        chunk: Bytes::new(),
                        eof: false,
                    })
                }
                Ok(resp) => Response::Failed(TunnelError::Status {
                    status: resp.status(),
                }),
                Err(e) => Response::Failed(TunnelError::from_h3(&e, false)),
            };
        }
        match (&self.response, self.status) {
            (Response::Failed(e), _) => Poll::Ready(Err(e.clone())),
            (_, Some(status)) => Poll::Ready(Ok(status)),
            _ => Poll::Ready(Err(TunnelError::Closed)),
        }
    }

    /// Waits for the peer's answer to the CONNECT: the 2xx status, or why the tunnel failed.
    pub async fn status(&mut self) -> Result<StatusCode, TunnelError> {
        std::future::poll_fn(|cx| self.poll_status(cx)).await
    }

    /// Resets the stream both ways (RFC 9114 §4.1.1: abort with H3_REQUEST_CANCELLED), the
    /// equivalent of a TCP reset.
    pub fn abort(&mut self) {
        self.writer.abort(Code::H3_REQUEST_CANCELLED);
        if let Response::Open(r) = &mut self.response {
            r.half.stop(Code::H3_REQUEST_CANCELLED);
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_status(cx)).map_err(TunnelError::into_io)?;
        match &mut this.response {
            Response::Open(reader) => reader.poll_read(cx, buf, true),
            _ => Poll::Ready(Err(TunnelError::Closed.into_io())),
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let established = self.established();
        self.get_mut().writer.poll_write(cx, buf, established)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let established = self.established();
        self.get_mut().writer.poll_pending(cx, established)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let established = self.established();
        self.get_mut().writer.poll_shutdown(cx, established)
    }
}

/// The server side of an accepted CONNECT tunnel (the 200 has been sent).
pub struct ServerTunnel {
    writer: Writer<ServerSend>,
    reader: Reader<ServerRecv>,
}

impl std::fmt::Debug for ServerTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTunnel").finish_non_exhaustive()
    }
}

impl ServerTunnel {
    pub(crate) fn new(send: ServerSend, recv: ServerRecv) -> Self {
        ServerTunnel {
            writer: Writer::new(send),
            reader: Reader {
                half: recv,
                chunk: Bytes::new(),
                eof: false,
            },
        }
    }

    /// Resets the stream both ways, the equivalent of a TCP reset (e.g. the local app reset
    /// its connection).
    pub fn abort(&mut self) {
        self.writer.abort(Code::H3_REQUEST_CANCELLED);
        self.reader.half.stop(Code::H3_REQUEST_CANCELLED);
    }
}

impl AsyncRead for ServerTunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().reader.poll_read(cx, buf, true)
    }
}

impl AsyncWrite for ServerTunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().writer.poll_write(cx, buf, true)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().writer.poll_pending(cx, true)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().writer.poll_shutdown(cx, true)
    }
}
