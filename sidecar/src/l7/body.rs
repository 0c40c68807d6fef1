//! Bodies between hyper and h3, streamed frame by frame with backpressure: a bounded channel
//! sits between the side that reads and the side that writes, so a sidecar holds a few frames
//! per request whatever the body's size.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// Frames in flight per body.
const DEPTH: usize = 4;

/// A body error, as text (the far side of a channel cannot own the original error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BodyError(pub String);

type Item = Result<Frame<Bytes>, BodyError>;

/// A body fed through a bounded channel by another task.
#[derive(Debug)]
pub(crate) struct ChannelBody {
    rx: Option<mpsc::Receiver<Item>>,
    /// Set when the body is known to be empty or fixed.
    fixed: Option<Bytes>,
}

/// The sending side of a [`ChannelBody`].
pub(crate) type BodySender = mpsc::Sender<Item>;

impl ChannelBody {
    /// A body and the sender that feeds it.
    pub(crate) fn channel() -> (BodySender, ChannelBody) {
        let (tx, rx) = mpsc::channel(DEPTH);
        (
            tx,
            ChannelBody {
                rx: Some(rx),
                fixed: None,
            },
        )
    }

    /// [`channel`](Self::channel) whose body yields `first` before what the sender sends:
    /// data already at hand goes to the app with the head, in the same write.
    pub(crate) fn channel_after(first: Bytes) -> (BodySender, ChannelBody) {
        let (tx, mut body) = ChannelBody::channel();
        body.fixed = Some(first);
        (tx, body)
    }

    /// A body with fixed content.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> ChannelBody {
        ChannelBody {
            rx: None,
            fixed: Some(bytes.into()),
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if let Some(bytes) = self.fixed.take() {
            if !bytes.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if self.rx.is_none() {
                return Poll::Ready(None);
            }
        }
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none() && self.fixed.as_ref().is_none_or(|b| b.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.rx, &self.fixed) {
            (None, Some(b)) => SizeHint::with_exact(b.len() as u64),
            (None, None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A request body collected in memory, for retries and mirroring.
#[derive(Debug, Clone, Default)]
pub(crate) struct Buffered {
    /// The data.
    pub(crate) data: Bytes,
    /// The trailers, if any.
    pub(crate) trailers: Option<HeaderMap>,
}

/// Collects `body` if it is at most `limit` bytes; `Err` gives the body back unread when its
/// size is unknown or too big.
pub(crate) async fn buffer_small<B>(body: B, limit: u64) -> Result<Result<Buffered, BodyError>, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let known = body.is_end_stream() || body.size_hint().upper().is_some_and(|u| u <= limit);
    if !known {
        return Err(body);
    }
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => return Ok(Err(BodyError(e.to_string()))),
    };
    let trailers = collected.trailers().cloned();
    Ok(Ok(Buffered {
        data: collected.to_bytes(),
        trailers,
    }))
}

/// Turns received h3 data into `Bytes` without copying when it already is one.
pub(crate) fn to_bytes(mut buf: impl Buf) -> Bytes {
    buf.copy_to_bytes(buf.remaining())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_started_with_data_at_hand_yields_it_first_then_what_is_sent() {
        let (tx, body) = ChannelBody::channel_after(Bytes::from_static(b"head-"));
        assert!(!body.is_end_stream());
        let sender = tokio::spawn(async move {
            tx.send(Ok(Frame::data(Bytes::from_static(b"rest"))))
                .await
                .ok();
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            tx.send(Ok(Frame::trailers(t))).await.ok();
        });
        let collected = body
            .collect()
            .await
            .map_err(|e| e.0)
            .unwrap_or_else(|e| panic!("{e}"));
        sender.await.ok();
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"head-rest"));
        assert_eq!(
            trailers.and_then(|t| t.get("grpc-status").cloned()),
            Some(http::HeaderValue::from_static("0"))
        );
    }

    #[tokio::test]
    async fn an_empty_fixed_body_ends_at_once() {
        let mut body = ChannelBody::full(Bytes::new());
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }
}
