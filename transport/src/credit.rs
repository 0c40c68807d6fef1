//! h3's QUIC connection with a deadline on stream credit.
//!
//! A QUIC peer allows a number of concurrent bidirectional streams and raises it with
//! MAX_STREAMS as streams end (RFC 9000 §4.6); quinn announces new credit only in steps of an
//! eighth of the limit and only once a stream is fully closed on its side, so the open-stream
//! count the pool keeps is not the credit the peer has granted. quinn does not expose that
//! credit, and `open_bi` waits for it without limit. The [`Opener`] gives h3 the same streams
//! but fails an open that found no credit within the wait with [`NoCredit`]; h3 hands that
//! error back from `send_request` as `StreamError::Undefined` without touching the
//! connection, and nothing was sent. The pool then tries another connection.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming};

/// h3's handle for sending requests on a pooled connection.
pub(crate) type SendRequest = h3::client::SendRequest<Opener, Bytes>;

/// No stream credit arrived from the peer within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no stream credit from the peer within {0:?}")]
pub(crate) struct NoCredit(pub(crate) Duration);

impl NoCredit {
    /// Whether h3's error is an open that ran out of credit.
    pub(crate) fn in_h3(e: &h3::error::StreamError) -> bool {
        matches!(e, h3::error::StreamError::Undefined { 0: inner, .. } if inner.is::<NoCredit>())
    }
}

/// An h3-quinn connection whose request opener gives up on stream credit after `wait`.
pub(crate) struct Connection {
    inner: h3_quinn::Connection,
    wait: Duration,
}

impl Connection {
    pub(crate) fn new(quic: quinn::Connection, wait: Duration) -> Self {
        Connection {
            inner: h3_quinn::Connection::new(quic),
            wait,
        }
    }
}

/// Opens request streams for h3's `SendRequest`; each clone (one per request) has its own
/// deadline, started when an open first finds no credit.
pub(crate) struct Opener {
    inner: h3_quinn::OpenStreams,
    wait: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Clone for Opener {
    fn clone(&self) -> Self {
        Opener {
            inner: self.inner.clone(),
            wait: self.wait,
            deadline: None,
        }
    }
}

impl quic::OpenStreams<Bytes> for Opener {
    type BidiStream = h3_quinn::BidiStream<Bytes>;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        if let Poll::Ready(opened) = self.inner.poll_open_bidi(cx) {
            self.deadline = None;
            return Poll::Ready(opened);
        }
        let wait = self.wait;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
        ready!(deadline.as_mut().poll(cx));
        self.deadline = None;
        // quinn allocates a stream only when it has credit, so the open given up here used none.
        Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(NoCredit(wait)))))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.inner.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.inner, code, reason);
    }
}

impl quic::OpenStreams<Bytes> for Connection {
    type BidiStream = h3_quinn::BidiStream<Bytes>;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        self.inner.poll_open_bidi(cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.inner.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.inner, code, reason);
    }
}

impl quic::Connection<Bytes> for Connection {
    type RecvStream = h3_quinn::RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_recv(&mut self.inner, cx)
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_bidi(&mut self.inner, cx)
    }

    fn opener(&self) -> Self::OpenStreams {
        Opener {
            inner: quic::Connection::<Bytes>::opener(&self.inner),
            wait: self.wait,
            deadline: None,
        }
    }
}
