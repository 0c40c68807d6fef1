//! `Expect: 100-continue` towards the app (RFC 9110 §10.1.1): the caller's sidecar holds the
//! body back until the app says `100 Continue`, so this side must see the app's 100.
//!
//! hyper's client consumes 1xx heads without telling its user, so a request that expects
//! `100 Continue` gets a connection of its own to the app, read through [`ContinueWatch`]: the
//! first response head on it belongs to this request, and when its status is 100 the watch
//! fires. The pooled connections are not used for such requests (they are uploads; one TCP
//! connect is small beside them).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::body::ChannelBody;

/// Bytes of a status line that decide it: `HTTP/1.1 100`.
const STATUS_PREFIX: usize = 12;

/// Reads a connection and fires once if the first response head on it is `100 Continue`.
pub(crate) struct ContinueWatch<T> {
    inner: T,
    seen: [u8; STATUS_PREFIX],
    len: usize,
    fire: Option<oneshot::Sender<()>>,
}

impl<T> ContinueWatch<T> {
    /// Watches `inner`; `fire` gets `()` when the app's first head is a 100.
    pub(crate) fn new(inner: T, fire: oneshot::Sender<()>) -> Self {
        ContinueWatch {
            inner,
            seen: [0; STATUS_PREFIX],
            len: 0,
            fire: Some(fire),
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        if self.fire.is_none() {
            return;
        }
        let n = (STATUS_PREFIX - self.len).min(bytes.len());
        self.seen[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        if self.len < STATUS_PREFIX {
            return;
        }
        let fire = self.fire.take();
        if is_continue(&self.seen) {
            if let Some(fire) = fire {
                let _ = fire.send(());
            }
        }
    }
}

/// `HTTP/1.x 100` (RFC 9112 §4: `HTTP-version SP status-code`).
fn is_continue(line: &[u8; STATUS_PREFIX]) -> bool {
    line.starts_with(b"HTTP/1.") && &line[8..] == b" 100"
}

impl<T: AsyncRead + Unpin> AsyncRead for ContinueWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.fire.is_some() && matches!(polled, Poll::Ready(Ok(()))) {
            self.observe(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ContinueWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why the app was not asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    /// The app did not accept the connection within the connect timeout.
    #[error("local app did not accept the connection in time")]
    ConnectTimeout,
    /// The app refused the connection.
    #[error("local app refused the connection")]
    Refused(#[source] io::Error),
    /// The app broke the exchange after accepting.
    #[error("local app reset the request")]
    Reset(#[source] hyper::Error),
}

impl AppError {
    /// Whether the app never got the request (no connection was made).
    pub(crate) fn unreached(&self) -> bool {
        !matches!(self, AppError::Reset(_))
    }

    /// DESIGN §2: 504 when the app did not accept in time, 502 otherwise.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            AppError::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            AppError::Refused(_) | AppError::Reset(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

/// An exchange with the app on a connection of its own: the response, and the signal of the
/// app's `100 Continue`.
pub(crate) struct Expecting {
    /// Fires when the app answers `100 Continue`; dropped unfired otherwise.
    pub(crate) continued: oneshot::Receiver<()>,
    /// Sends the request and waits for the final response head.
    pub(crate) response:
        Pin<Box<dyn std::future::Future<Output = Result<Response<Incoming>, AppError>> + Send>>,
}

/// Starts `req` on a new HTTP/1.1 connection to `app` (given up after `connect_timeout`).
pub(crate) fn send(
    app: SocketAddr,
    connect_timeout: Duration,
    req: Request<ChannelBody>,
) -> Expecting {
    let (fire, continued) = oneshot::channel();
    let response = Box::pin(async move {
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(app)).await {
            Err(_) => return Err(AppError::ConnectTimeout),
            Ok(Err(e)) => return Err(AppError::Refused(e)),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(ContinueWatch::new(tcp, fire));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(AppError::Reset)?;
        // The connection serves this one request, then closes with the response's end.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app connection for an expect-continue request ended");
            }
        });
        sender.send_request(req).await.map_err(AppError::Reset)
    });
    Expecting {
        continued,
        response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(chunks: &[&[u8]]) -> bool {
        let (tx, mut rx) = oneshot::channel();
        let mut w = ContinueWatch::new((), tx);
        for c in chunks {
            w.observe(c);
        }
        rx.try_recv().is_ok()
    }

    #[test]
    fn a_100_status_line_fires_even_when_split() {
        assert!(watch(&[b"HTTP/1.1 100 Continue\r\n\r\n"]));
        assert!(watch(&[b"HTT", b"P/1.1 1", b"00 Continue\r\n\r\n"]));
        assert!(watch(&[b"HTTP/1.0 100\r\n\r\n"]));
    }

    #[test]
    fn a_final_status_first_never_fires() {
        assert!(!watch(&[b"HTTP/1.1 401 Unauthorized\r\n\r\n"]));
        // A later 100 on the same connection is not this request's.
        assert!(!watch(&[
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 100 Continue\r\n"
        ]));
    }
}
