//! HTTP/1.1 Upgrade (RFC 9110 §7.8) across the mesh, for WebSocket (RFC 6455) on an `http` port:
//! an app can serve pages and a socket on one port.
//!
//! HTTP/3 has no Upgrade (RFC 9114 §4.5); RFC 9220 carries WebSocket as an extended CONNECT with
//! `:protocol websocket`. The h3 library under the mesh knows only the `webtransport` and
//! `connect-udp` protocols, so the sidecars carry the upgrade the same way with a mesh header
//! instead of the pseudo-header:
//!
//! 1. The client's sidecar sends the upgrade request as an HTTP/3 request that keeps its method,
//!    path and end-to-end headers, plus `x-halyard-upgrade: websocket`; routing, policy and
//!    telemetry apply to it as to any request. It sends no body and keeps the stream open.
//! 2. The app's sidecar makes the HTTP/1.1 upgrade request to the app. If the app switches
//!    (101), it answers 200 with the app's headers and `x-halyard-upgrade: websocket`, and the
//!    stream's DATA frames carry the WebSocket bytes both ways (RFC 9220 §3 does the same).
//!    Any other answer (a 426, a 403, a page) goes back as an ordinary response.
//! 3. The client's sidecar answers its app 101 with the app's headers, and splices the upgraded
//!    connection to the stream.
//!
//! Only `websocket` is carried. Any other `Upgrade` (e.g. `h2c`, RFC 7540 §3.2, removed by RFC
//! 9113) is declined as RFC 9110 §7.8 allows: the header is dropped and the request is served
//! as HTTP/1.1.

use http::header::{self, HeaderMap, HeaderValue};

/// The mesh header that marks an upgrade between sidecars (request and accepting response).
pub(crate) const UPGRADE: &str = "x-halyard-upgrade";

/// The one protocol the mesh upgrades to.
pub(crate) const WEBSOCKET: &str = "websocket";

/// Whether an app's HTTP/1.1 request asks to switch to WebSocket: `Connection` names `upgrade`
/// and `Upgrade` lists `websocket` first (RFC 6455 §4.1).
pub(crate) fn wants_websocket(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case(WEBSOCKET));
    connection_upgrade && websocket
}

/// Whether a request or response between sidecars carries the WebSocket upgrade mark.
pub(crate) fn marked(headers: &HeaderMap) -> bool {
    headers
        .get(UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(WEBSOCKET.as_bytes()))
}

/// Sets the mesh mark (after the hop-by-hop headers were removed).
pub(crate) fn mark(headers: &mut HeaderMap) {
    headers.insert(UPGRADE, HeaderValue::from_static(WEBSOCKET));
}

/// Turns marked headers back into HTTP/1.1 upgrade headers, for the app on either side.
pub(crate) fn unmark(headers: &mut HeaderMap) {
    headers.remove(UPGRADE);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(WEBSOCKET));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_websocket_upgrade_is_recognized_in_any_case() {
        let h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(wants_websocket(&h));
    }

    #[test]
    fn other_upgrades_are_not_carried() {
        for h in [
            headers(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
            ]),
            headers(&[("upgrade", "websocket")]),
            headers(&[("connection", "upgrade")]),
            headers(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]),
        ] {
            assert!(!wants_websocket(&h), "{h:?}");
        }
    }

    #[test]
    fn the_mark_round_trips_to_upgrade_headers() {
        let mut h = HeaderMap::new();
        mark(&mut h);
        assert!(marked(&h));
        unmark(&mut h);
        assert!(!marked(&h));
        assert!(wants_websocket(&h));
    }
}
