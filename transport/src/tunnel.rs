//! Tunnels: HTTP/3 CONNECT streams (RFC 9114 §4.4) seen as byte streams. [`Tunnel`] is the
//! client side, [`ServerTunnel`] the server side; both implement tokio's `AsyncRead` and
//! `AsyncWrite`, so a sidecar can `copy_bidirectional` them with a `TcpStream`.
//!
//! - `poll_shutdown` finishes the stream (the QUIC FIN: a TCP half-close); reading continues.
//! - [`Tunnel::abort`] resets the stream in both directions (a TCP reset); so does dropping a
//!   tunnel whose sending side was not shut down, so a crashed flow never looks complete.
//! - [`Tunnel::splice`] pipes a local stream both ways: one copy fewer than
//!   `copy_bidirectional` toward the tunnel (reads land in a buffer handed to h3 as is, see
//!   [`Tunnel::write_bytes`]), and received packets gathered into one write toward the stream.
//!   [`Tunnel::read_chunk`] gives received chunks without a copy.
//! - A write is accepted as soon as the previous one is handed to QUIC; `poll_flush` waits for
//!   the pending one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use h3::error::{Code, StreamError};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::error::TunnelError;

/// Largest slice turned into one DATA frame by a single write; bigger writes are split so a
/// sender never holds more than this beyond what QUIC has accepted.
const MAX_WRITE: usize = 256 * 1024;

pub(crate) type ClientSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub(crate) type ClientRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;
/// The send half of a server's HTTP/3 request stream.
pub type ServerSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
/// The receive half of a server's HTTP/3 request stream.
pub type ServerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

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
        }
    };
}

halves!(ClientSend, ClientRecv);
halves!(ServerSend, ServerRecv);

/// Held by every pooled stream: counts the connection's open streams, and keeps a handle of
/// the h3 connection, because h3 closes a connection when its last `SendRequest` is dropped.
/// So a connection the pool has let go of (the peer is draining) lives until its last stream
/// ends.
pub(crate) struct StreamGuard {
    counter: Arc<AtomicUsize>,
    _conn: crate::credit::SendRequest,
}

impl StreamGuard {
    pub(crate) fn new(counter: &Arc<AtomicUsize>, conn: crate::credit::SendRequest) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            counter: counter.clone(),
            _conn: conn,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The write side: at most one send in flight inside h3.
struct Writer<S: SendHalf> {
    half: Option<S>,
    pending: Option<(Op<S>, bool)>,
    finished: bool,
    error: Option<TunnelError>,
    /// Where written slices are copied; reused once h3 has released the previous chunk, so a
    /// steady stream of writes allocates nothing.
    staging: BytesMut,
}

impl<S: SendHalf> Writer<S> {
    fn new(half: S) -> Self {
        Writer {
            half: Some(half),
            pending: None,
            finished: false,
            error: None,
            staging: BytesMut::new(),
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
        self.staging.reserve(n);
        self.staging.extend_from_slice(&buf[..n]);
        let data = self.staging.split().freeze();
        ready!(self.start(cx, |h| h.send(data), false, established))?;
        Poll::Ready(Ok(n))
    }

    /// Hands `data` to h3 without copying it (the caller owns the buffer already).
    fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Option<Bytes>,
        established: bool,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx, established))?;
        if self.finished {
            return Poll::Ready(Err(TunnelError::Closed.into_io()));
        }
        match data.take() {
            Some(d) if !d.is_empty() => self.start(cx, |h| h.send(d), false, established),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>, established: bool) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx, established))?;
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        ready!(self.start(cx, SendHalf::finish, true, established))?;
        self.poll_pending(cx, established)
    }

    /// Resets the stream. A send still in flight owns the half: it gets a short grace to hand
    /// it back (dropping it instead would finish the stream, a clean EOF, not a reset).
    fn abort(&mut self, code: Code) {
        if self.finished && self.pending.is_none() {
            return;
        }
        if let Some((mut op, _)) = self.pending.take() {
            match (&mut op).now_or_never() {
                Some((half, _)) => self.half = Some(half),
                None => reset_later(op, code),
            }
        }
        if let Some(h) = self.half.as_mut() {
            h.reset(code);
        }
        self.finished = true;
        self.error.get_or_insert(TunnelError::Closed);
    }
}

/// How long an abort waits for a blocked send before giving up on the reset.
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn reset_later<S: SendHalf>(op: Op<S>, code: Code) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Ok((mut half, _)) = tokio::time::timeout(ABORT_GRACE, op).await {
                half.reset(code);
            }
        });
    }
}

impl<S: SendHalf> Drop for Writer<S> {
    fn drop(&mut self) {
        // A tunnel dropped before its FIN was sent ended abnormally: tell the peer with a reset
        // (RFC 9114 §4.1.1) rather than let quinn finish the stream as if all was sent.
        if !self.finished {
            self.abort(Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// The read side: the current chunk and whether the peer finished.
struct Reader<R> {
    half: R,
    chunk: Bytes,
    eof: bool,
    /// An error met while gathering more chunks, reported after the bytes before it.
    error: Option<TunnelError>,
}

impl<R> Reader<R> {
    fn new(half: R) -> Self {
        Reader {
            half,
            chunk: Bytes::new(),
            eof: false,
            error: None,
        }
    }
}

impl<R: RecvHalf> Reader<R> {
    /// Makes `chunk` non-empty unless the peer has finished.
    fn poll_fill(&mut self, cx: &mut Context<'_>, established: bool) -> Poll<io::Result<()>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e.into_io()));
        }
        while self.chunk.is_empty() && !self.eof {
            match ready!(self.half.poll_chunk(cx)) {
                Ok(Some(chunk)) => self.chunk = chunk,
                Ok(None) => self.eof = true,
                Err(e) => return Poll::Ready(Err(TunnelError::from_h3(&e, established).into_io())),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The next received chunk as h3 delivered it (no copy); `None` at the peer's FIN.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        established: bool,
    ) -> Poll<io::Result<Option<Bytes>>> {
        ready!(self.poll_fill(cx, established))?;
        if self.chunk.is_empty() {
            return Poll::Ready(Ok(None));
        }
        Poll::Ready(Ok(Some(std::mem::take(&mut self.chunk))))
    }

    /// Fills `buf` with every chunk already received, waiting only for the first: QUIC
    /// delivers packet-sized chunks, and one read per packet would mean one write per packet
    /// downstream.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        established: bool,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_fill(cx, established))?;
        loop {
            let n = self.chunk.len().min(buf.remaining());
            buf.put_slice(&self.chunk[..n]);
            self.chunk.advance(n);
            if buf.remaining() == 0 || self.eof || !self.chunk.is_empty() {
                return Poll::Ready(Ok(()));
            }
            match self.half.poll_chunk(cx) {
                Poll::Ready(Ok(Some(chunk))) => self.chunk = chunk,
                Poll::Ready(Ok(None)) => self.eof = true,
                Poll::Ready(Err(e)) => self.error = Some(TunnelError::from_h3(&e, established)),
                Poll::Pending => {}
            }
            if self.chunk.is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Largest read from a local stream per send in [`Tunnel::splice`], and largest gather of
/// received chunks per write, bytes.
const SPLICE_BUF: usize = 256 * 1024;
/// First buffer of a flow's direction, bytes; a read that fills its buffer doubles the next one,
/// up to [`SPLICE_BUF`]. Buffers grow with the data a flow carries, not with the flow: with
/// 256 KiB per direction from the start, 10,000 idle flows took ~1.5 GiB per sidecar. A flow
/// still at this size holds no buffer while it waits (an interactive or idle flow); shrinking
/// a grown buffer whenever a read would wait cost 10-16 % more CPU per byte with 8 bulk flows,
/// so a flow keeps what it grew to.
const SPLICE_START: usize = 4 * 1024;

/// The read half of a local stream a tunnel is spliced with ([`Tunnel::splice`]): an
/// `AsyncRead` that may also say when a read would not wait, so that a flow between bursts
/// holds no buffer (a buffer has to be handed to `poll_read` before any byte can arrive).
///
/// Implemented for tokio's TCP read halves (readiness from the reactor) and for
/// [`tokio::io::ReadHalf`] (no readiness: [`LocalRead::readable`] resolves at once and the
/// buffer is taken before the read, as a plain `AsyncRead` needs).
pub trait LocalRead: AsyncRead + Unpin {
    /// Whether [`LocalRead::readable`] reports readiness; when `false`, a flow keeps its
    /// buffer between reads (giving it back would only allocate a new one per read).
    const READINESS: bool = false;

    /// Resolves when a read would probably not wait (readiness may be spurious: the read
    /// that follows may still wait). Errors are the socket's.
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

impl LocalRead for tokio::net::tcp::ReadHalf<'_> {
    const READINESS: bool = true;

    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::ReadHalf::readable(self)
    }
}

impl LocalRead for tokio::net::tcp::OwnedReadHalf {
    const READINESS: bool = true;

    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::OwnedReadHalf::readable(self)
    }
}

impl<T: AsyncRead> LocalRead for tokio::io::ReadHalf<T> {}

/// Local stream → tunnel: each read lands in a buffer that is then handed to h3 as is. While
/// a flow's buffer is still the first size ([`SPLICE_START`]: it has carried only small
/// reads) and its stream reports readiness, the flow waits for readable bytes holding no
/// buffer; a flow whose reads grew the
/// buffer keeps it (bulk flows wait often and briefly: see [`SPLICE_START`]).
async fn pump_up<S: SendHalf, R: LocalRead>(
    writer: &mut Writer<S>,
    mut from: R,
) -> io::Result<u64> {
    let mut buf = BytesMut::new();
    let mut size = SPLICE_START;
    let mut total = 0u64;
    loop {
        if R::READINESS && size == SPLICE_START {
            // Drops the handle on the last allocation (h3 frees it once the chunk is sent).
            buf = BytesMut::new();
            from.readable().await?;
        }
        // Reclaims the previous allocation once h3 has released the last chunk.
        buf.reserve(size);
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            std::future::poll_fn(|cx| writer.poll_shutdown(cx, false)).await?;
            return Ok(total);
        }
        total += n as u64;
        if buf.capacity() == buf.len() {
            size = size.saturating_mul(2).min(SPLICE_BUF);
        }
        let mut data = Some(buf.split().freeze());
        std::future::poll_fn(|cx| writer.poll_write_bytes(cx, &mut data, false)).await?;
    }
}

/// Tunnel → local stream: every chunk already received is gathered into one write. No buffer
/// is made before the first chunk arrives, and a flow whose buffer is still the first size
/// gives it back whenever it has to wait for the peer (as [`pump_up`] does).
async fn pump_down<R: RecvHalf, W: AsyncWrite + Unpin>(
    reader: &mut Reader<R>,
    mut to: W,
) -> io::Result<u64> {
    let mut buf: Vec<u8> = Vec::new();
    let mut size = SPLICE_START;
    let mut total = 0u64;
    loop {
        let ready = std::future::poll_fn(|cx| Poll::Ready(reader.poll_fill(cx, true))).await;
        match ready {
            Poll::Ready(r) => r?,
            Poll::Pending => {
                if size == SPLICE_START {
                    buf = Vec::new();
                }
                std::future::poll_fn(|cx| reader.poll_fill(cx, true)).await?;
            }
        }
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let mut read = ReadBuf::new(&mut buf[..size]);
        std::future::poll_fn(|cx| reader.poll_read(cx, &mut read, true)).await?;
        let n = read.filled().len();
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == size {
            size = size.saturating_mul(2).min(SPLICE_BUF);
        }
    }
}

/// Re-labels an error of the sending direction once the tunnel is known to be established.
fn relabel(e: io::Error, established: bool) -> io::Error {
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<TunnelError>())
        .cloned();
    match inner {
        Some(TunnelError::Reset { code, .. }) => TunnelError::Reset { code, established }.into_io(),
        Some(TunnelError::ConnectionLost {
            reason,
            peer_restarted,
            ..
        }) => TunnelError::ConnectionLost {
            reason,
            established,
            peer_restarted,
        }
        .into_io(),
        _ => e,
    }
}

type ResponseOp = BoxFuture<'static, (ClientRecv, Result<http::Response<()>, StreamError>)>;

/// Where the client is in reading the CONNECT response.
// `Open` is the steady state; boxing it would cost an indirection on every read.
#[allow(clippy::large_enum_variant)]
enum Response {
    Waiting(ResponseOp),
    Open(Reader<ClientRecv>),
    Failed(TunnelError),
}

/// Drives a client's CONNECT response; Ready(Ok) once the tunnel is established.
fn poll_response(
    response: &mut Response,
    status: &mut Option<StatusCode>,
    cx: &mut Context<'_>,
) -> Poll<Result<StatusCode, TunnelError>> {
    if let Response::Waiting(op) = response {
        let (recv, result) = ready!(op.as_mut().poll(cx));
        *response = match result {
            Ok(resp) if resp.status().is_success() => {
                *status = Some(resp.status());
                Response::Open(Reader::new(recv))
            }
            Ok(resp) => Response::Failed(TunnelError::Status {
                status: resp.status(),
            }),
            Err(e) => Response::Failed(TunnelError::from_h3(&e, false)),
        };
    }
    match (&*response, *status) {
        (Response::Failed(e), _) => Poll::Ready(Err(e.clone())),
        (_, Some(status)) => Poll::Ready(Ok(status)),
        _ => Poll::Ready(Err(TunnelError::Closed)),
    }
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

    /// A tunnel over a request stream whose 2xx response head has already been received: an
    /// HTTP upgrade carried over HTTP/3 (the sidecar's WebSocket path) switches to raw bytes
    /// both ways once the head is in.
    pub(crate) fn opened(
        send: ClientSend,
        recv: ClientRecv,
        status: StatusCode,
        guard: Option<StreamGuard>,
    ) -> Self {
        Tunnel {
            writer: Writer::new(send),
            response: Response::Open(Reader::new(recv)),
            status: Some(status),
            _guard: guard,
        }
    }

    fn established(&self) -> bool {
        self.status.is_some()
    }

    /// Drives the response; Ready(Ok) once the tunnel is established.
    fn poll_status(&mut self, cx: &mut Context<'_>) -> Poll<Result<StatusCode, TunnelError>> {
        poll_response(&mut self.response, &mut self.status, cx)
    }

    /// Waits for the peer's answer to the CONNECT: the 2xx status, or why the tunnel failed.
    pub async fn status(&mut self) -> Result<StatusCode, TunnelError> {
        std::future::poll_fn(|cx| self.poll_status(cx)).await
    }

    /// Sends `data` without copying it (AsyncWrite copies each slice once more).
    pub async fn write_bytes(&mut self, data: Bytes) -> io::Result<()> {
        let established = self.established();
        let mut data = Some(data);
        std::future::poll_fn(|cx| self.writer.poll_write_bytes(cx, &mut data, established)).await
    }

    /// The next received chunk without copying it; `None` once the peer finished. Waits for
    /// the response first.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        self.status().await.map_err(TunnelError::into_io)?;
        match &mut self.response {
            Response::Open(reader) => std::future::poll_fn(|cx| reader.poll_chunk(cx, true)).await,
            _ => Err(TunnelError::Closed.into_io()),
        }
    }

    /// Pipes a local stream (`from` its read half, `to` its write half) through the tunnel both
    /// ways until both directions have finished (see the module notes on copies).
    /// The first bytes go out before the response arrives. EOF on either
    /// side is passed on as a half-close; on error the tunnel is aborted. Returns the bytes
    /// sent and received.
    pub async fn splice<R, W>(&mut self, from: R, to: W) -> io::Result<(u64, u64)>
    where
        R: LocalRead,
        W: AsyncWrite + Unpin,
    {
        let (writer, response, status) = (&mut self.writer, &mut self.response, &mut self.status);
        let down = async {
            std::future::poll_fn(|cx| poll_response(response, status, cx))
                .await
                .map_err(TunnelError::into_io)?;
            match response {
                Response::Open(reader) => pump_down(reader, to).await,
                _ => Err(TunnelError::Closed.into_io()),
            }
        };
        let result = tokio::try_join!(pump_up(writer, from), down);
        if result.is_err() {
            self.abort();
        }
        let established = self.established();
        result.map_err(|e| relabel(e, established))
    }

    /// Resets the stream both ways (RFC 9114 §4.1.1: abort with H3_REQUEST_CANCELLED), the
    /// equivalent of a TCP reset.
    pub fn abort(&mut self) {
        self.writer.abort(Code::H3_REQUEST_CANCELLED);
        // Dropping the receive half makes quinn send STOP_SENDING. h3-quinn 0.0.10 panics on
        // an explicit stop_sending while a read is in flight, which h3 may have started.
        self.response = Response::Failed(TunnelError::Closed);
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
    /// `None` after an abort.
    reader: Option<Reader<ServerRecv>>,
}

impl std::fmt::Debug for ServerTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTunnel").finish_non_exhaustive()
    }
}

impl ServerTunnel {
    /// The tunnel over a request stream whose 2xx response head has been sent: the send and
    /// receive halves of `h3::server::RequestStream::split`. Used for CONNECT, and for an HTTP
    /// upgrade carried over HTTP/3 once the app has switched protocols.
    pub fn new(send: ServerSend, recv: ServerRecv) -> Self {
        ServerTunnel {
            writer: Writer::new(send),
            reader: Some(Reader::new(recv)),
        }
    }

    /// Sends `data` without copying it.
    pub async fn write_bytes(&mut self, data: Bytes) -> io::Result<()> {
        let mut data = Some(data);
        std::future::poll_fn(|cx| self.writer.poll_write_bytes(cx, &mut data, true)).await
    }

    /// The next received chunk without copying it; `None` once the peer finished.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let reader = self
            .reader
            .as_mut()
            .ok_or_else(|| TunnelError::Closed.into_io())?;
        std::future::poll_fn(|cx| reader.poll_chunk(cx, true)).await
    }

    /// Pipes a local stream through the tunnel both ways, as [`Tunnel::splice`] does.
    pub async fn splice<R, W>(&mut self, from: R, to: W) -> io::Result<(u64, u64)>
    where
        R: LocalRead,
        W: AsyncWrite + Unpin,
    {
        let reader = self
            .reader
            .as_mut()
            .ok_or_else(|| TunnelError::Closed.into_io())?;
        let result = tokio::try_join!(pump_up(&mut self.writer, from), pump_down(reader, to));
        if result.is_err() {
            self.abort();
        }
        result.map_err(|e| relabel(e, true))
    }

    /// Resets the stream both ways, the equivalent of a TCP reset (e.g. the local app reset
    /// its connection).
    pub fn abort(&mut self) {
        self.writer.abort(Code::H3_REQUEST_CANCELLED);
        // See Tunnel::abort: dropping the receive half stops it safely.
        self.reader = None;
    }
}

impl AsyncRead for ServerTunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().reader.as_mut() {
            Some(reader) => reader.poll_read(cx, buf, true),
            None => Poll::Ready(Err(TunnelError::Closed.into_io())),
        }
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// A local stream whose bytes arrive when the test says, with readiness, and which counts
    /// the reads handed a buffer while nothing was there to read.
    #[derive(Default)]
    struct Arrivals {
        queue: Mutex<VecDeque<Vec<u8>>>,
        notify: tokio::sync::Notify,
        reads_that_waited: AtomicUsize,
        closed: std::sync::atomic::AtomicBool,
    }

    struct Local(Arc<Arrivals>);

    impl AsyncRead for Local {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut queue = self.0.queue.lock().map_err(|_| io::ErrorKind::Other)?;
            match queue.pop_front() {
                Some(bytes) => {
                    buf.put_slice(&bytes);
                    Poll::Ready(Ok(()))
                }
                None if self.0.closed.load(Ordering::SeqCst) => Poll::Ready(Ok(())),
                None => {
                    self.0.reads_that_waited.fetch_add(1, Ordering::SeqCst);
                    let waker = cx.waker().clone();
                    let arrivals = self.0.clone();
                    drop(queue);
                    tokio::spawn(async move {
                        arrivals.notify.notified().await;
                        waker.wake();
                    });
                    Poll::Pending
                }
            }
        }
    }

    impl LocalRead for Local {
        const READINESS: bool = true;

        fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
            let arrivals = self.0.clone();
            async move {
                loop {
                    let notified = arrivals.notify.notified();
                    let ready = arrivals.closed.load(Ordering::SeqCst)
                        || arrivals.queue.lock().map(|q| !q.is_empty()).unwrap_or(true);
                    if ready {
                        return Ok(());
                    }
                    notified.await;
                }
            }
        }
    }

    impl Arrivals {
        fn push(&self, bytes: &[u8]) {
            if let Ok(mut queue) = self.queue.lock() {
                queue.push_back(bytes.to_vec());
            }
            self.notify.notify_waiters();
        }
    }

    #[tokio::test]
    async fn a_flow_between_small_messages_waits_holding_no_buffer() {
        // The buffer is taken right before a read: no read may be handed one while nothing
        // has arrived, so an idle interactive flow holds none.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut writer = Writer::new(Channel(tx));
        let arrivals = Arc::new(Arrivals::default());
        let pump = tokio::spawn({
            let arrivals = arrivals.clone();
            async move { pump_up(&mut writer, Local(arrivals)).await }
        });
        for message in [&b"hello"[..], b"world", b"!"] {
            tokio::task::yield_now().await;
            arrivals.push(message);
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        }
        arrivals.closed.store(true, Ordering::SeqCst);
        arrivals.notify.notify_waiters();
        let total = pump.await.ok().and_then(|r| r.ok());
        assert_eq!(total, Some(11));
        let mut sent = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            sent.extend_from_slice(&chunk);
        }
        assert_eq!(sent, b"helloworld!");
        assert_eq!(arrivals.reads_that_waited.load(Ordering::SeqCst), 0);
    }

    /// A send half that passes what it is given on.
    struct Channel(tokio::sync::mpsc::UnboundedSender<Bytes>);

    impl SendHalf for Channel {
        fn send(self, data: Bytes) -> Op<Self> {
            let _ = self.0.send(data);
            Box::pin(std::future::ready((self, Ok(()))))
        }
        fn finish(self) -> Op<Self> {
            Box::pin(std::future::ready((self, Ok(()))))
        }
        fn reset(&mut self, _code: Code) {}
    }

    #[tokio::test]
    async fn a_tcp_flow_waits_on_readiness_and_ends_at_eof() {
        // The TCP read half's readiness path on a real socket: each message is passed on once
        // it arrives (the pump waits in between), and the peer's FIN ends the pump.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            let mut writer = Writer::new(Channel(tx));
            let (read, _write) = accepted.split();
            pump_up(&mut writer, read).await
        });
        let within = std::time::Duration::from_secs(10);
        for message in [&b"first"[..], b"second"] {
            tokio::io::AsyncWriteExt::write_all(&mut app, message)
                .await
                .unwrap();
            let got = tokio::time::timeout(within, rx.recv()).await.unwrap();
            assert_eq!(got.as_deref(), Some(message));
        }
        tokio::io::AsyncWriteExt::shutdown(&mut app).await.unwrap();
        let total = tokio::time::timeout(within, pump).await.unwrap().unwrap();
        assert_eq!(total.unwrap(), 11);
    }
}
