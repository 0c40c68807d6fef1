//! Header-section limits on the app sides of L7, derived from the one setting
//! `transport.max_field_section_size` (bytes as RFC 9114 §4.2.2 counts them: name + value + 32
//! per field), so that the app-facing server, the framing guard and the clients to the local
//! app accept what HTTP/3 between the sidecars carries, and an oversized section fails only
//! the request it belongs to:
//!
//! - a request over the limit: 431 from the calling sidecar (hyper past its buffer, h2 past
//!   its header list size, the pool's own check below that), never sent to the peer;
//! - a response over the limit (the caller's advertised limit, or what the app client buffers):
//!   502 from the answering sidecar on that request's stream, never a connection error.

use bytes::Bytes;
use halyard_transport::h3::error::StreamError;
use http::header::HeaderValue;
use http::{Response, StatusCode};

/// Room for the request or status line beside the header fields in an HTTP/1.1 head.
const LINE_ROOM: usize = 8 * 1024;
/// hyper refuses to buffer less than this.
const HYPER_MIN_BUFFER: usize = 8 * 1024;

/// The read buffer of hyper's HTTP/1.1 server and client, in bytes: an HTTP/1.1 field line
/// (`name: value\r\n`) is 28 bytes shorter than its HTTP/3 size, so every head whose section
/// is within the limit fits, with room for its first line. A head between the limit and this
/// buffer is refused by the exact check (the pool's, or h3's for responses).
pub(crate) fn h1_buffer(max_field_section_size: u64) -> usize {
    usize::try_from(max_field_section_size)
        .unwrap_or(usize::MAX)
        .saturating_add(LINE_ROOM)
        .max(HYPER_MIN_BUFFER)
}

/// The longest head the framing guard follows before handing the rest to hyper unjudged.
/// hyper stops reading a head once its buffer passes [`h1_buffer`], but one read may land up
/// to the buffer's capacity past it (the buffer grows by doubling), so the guard judges every
/// head up to twice that: nothing hyper can still parse skips the framing checks.
pub(crate) fn guard_head(max_field_section_size: u64) -> usize {
    h1_buffer(max_field_section_size).saturating_mul(2)
}

/// Streams an app may have open at once on one h2 connection (SETTINGS_MAX_CONCURRENT_STREAMS,
/// RFC 9113 §6.5.2); a HEADERS frame past it is refused with RST_STREAM REFUSED_STREAM.
pub(crate) const H2_MAX_STREAMS: u32 = 200;
/// Streams the app opened and reset before the sidecar took them up, held at once (rapid
/// reset, CVE-2023-44487): past it h2 ends the connection with GOAWAY ENHANCE_YOUR_CALM.
pub(crate) const H2_PENDING_RESETS: usize = 20;
/// Streams the sidecar resets for the app's protocol errors on one connection before it ends
/// the connection with GOAWAY ENHANCE_YOUR_CALM (malformed-request floods). CONTINUATION
/// floods are ended by h2 itself: a header block of more CONTINUATION frames than the header
/// list size allows (at the max frame size) is a GOAWAY ENHANCE_YOUR_CALM.
pub(crate) const H2_LOCAL_RESETS: usize = 1024;

/// The app-facing h2 server's abuse bounds, set explicitly so they stay what README says.
pub(crate) fn h2_bounds<'a, 'b, E>(
    b: &'b mut hyper_util::server::conn::auto::Http2Builder<'a, E>,
) -> &'b mut hyper_util::server::conn::auto::Http2Builder<'a, E> {
    b.max_concurrent_streams(H2_MAX_STREAMS)
        .max_pending_accept_reset_streams(H2_PENDING_RESETS)
        .max_local_error_reset_streams(H2_LOCAL_RESETS)
}

/// SETTINGS_MAX_HEADER_LIST_SIZE for h2 (RFC 9113 §6.5.2: the same name + value + 32 rule).
pub(crate) fn h2_header_list(max_field_section_size: u64) -> u32 {
    u32::try_from(max_field_section_size).unwrap_or(u32::MAX)
}

/// Whether an h3 send failed because the section is over the peer's
/// SETTINGS_MAX_FIELD_SECTION_SIZE. h3 checks before writing, so nothing of that section went
/// out and the stream can still carry another response.
pub(crate) fn too_big(e: &StreamError) -> bool {
    matches!(e, StreamError::HeaderTooBig { .. })
}

/// Whether the local app's response head was larger than the app client buffers.
pub(crate) fn app_head_too_big(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Answers 502 on a request stream whose response head was refused for its size (see
/// [`too_big`]); true when the answer went out in full.
pub(crate) async fn bad_gateway<S>(
    send: &mut halyard_transport::h3::server::RequestStream<S, Bytes>,
    refused: &StreamError,
) -> bool
where
    S: halyard_transport::h3::quic::SendStream<Bytes>,
{
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp.headers_mut()
        .insert("x-halyard-local-reply", HeaderValue::from_static("1"));
    let why = format!("response header section refused: {refused}\n");
    send.send_response(resp).await.is_ok()
        && send.send_data(Bytes::from(why)).await.is_ok()
        && send.finish().await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_h1_buffer_holds_any_head_within_the_limit() {
        // One 60 KiB cookie: 60 KiB + 6 + 32 as HTTP/3 counts it, 60 KiB + 10 on the wire.
        let limit = 96 * 1024;
        assert!(h1_buffer(limit) >= limit as usize + LINE_ROOM);
    }

    #[test]
    fn the_h1_buffer_never_goes_below_hypers_minimum() {
        assert_eq!(h1_buffer(0), HYPER_MIN_BUFFER);
    }

    #[test]
    fn the_guard_follows_every_head_hyper_may_parse() {
        assert_eq!(guard_head(96 * 1024), 2 * h1_buffer(96 * 1024));
    }

    #[test]
    fn an_h2_header_list_size_saturates() {
        assert_eq!(h2_header_list(u64::MAX), u32::MAX);
        assert_eq!(h2_header_list(98_304), 98_304);
    }
}
