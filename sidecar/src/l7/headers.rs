//! Header rules at the edges of the mesh: hop-by-hop headers (RFC 9110 §7.6.1) never cross a
//! proxy, ambiguous message framing is refused before anything is forwarded (request
//! smuggling), and no header from the app may claim an identity: the caller's identity comes
//! only from its verified certificate.

use http::header::{self, HeaderMap, HeaderName};

/// The header carrying the verified caller's SPIFFE id to the destination app.
pub(crate) const PEER_IDENTITY: &str = "x-halyard-peer-identity";
/// Set by an app's sidecar on its local reply when it could not connect to the app: the request
/// reached no app and may go to another endpoint whatever its method.
pub(crate) const APP_UNREACHED: &str = "x-halyard-app-unreached";
/// Set by an app's sidecar on a 429 of its own: which bucket refused (`decide::ratelimit::Scope`).
/// A refusal by this endpoint's share of a service-wide total may be taken to another endpoint,
/// whose share may have room.
pub(crate) const RATELIMIT_SCOPE: &str = "x-halyard-ratelimit-scope";
/// Headers the mesh sets itself; any copy from the app is removed.
const MESH_HEADERS: &[&str] = &[
    PEER_IDENTITY,
    APP_UNREACHED,
    RATELIMIT_SCOPE,
    super::upgrade::UPGRADE,
    "x-halyard-source-service",
    "x-forwarded-client-cert",
];

/// Why a request's framing is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FramingError {
    /// Both Content-Length and Transfer-Encoding (RFC 9112 §6.3: a smuggling vector).
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    /// A transfer coding other than a single final `chunked`.
    #[error("unsupported Transfer-Encoding {0:?}")]
    TransferCoding(String),
    /// Several or non-numeric Content-Length values.
    #[error("bad Content-Length {0:?}")]
    ContentLength(String),
}

/// Checks the framing headers of an HTTP/1.1 request as received from the app.
pub(crate) fn check_framing(headers: &HeaderMap) -> Result<(), FramingError> {
    let te: Vec<&str> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .collect();
    let cl: Vec<&str> = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err(FramingError::LengthAndChunked);
    }
    if !te.is_empty() {
        let joined = te.join(",");
        let codings: Vec<String> = joined
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        if codings != ["chunked"] {
            return Err(FramingError::TransferCoding(joined));
        }
    }
    match cl.as_slice() {
        [] => Ok(()),
        [one] if !one.is_empty() && one.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        many => Err(FramingError::ContentLength(many.join(","))),
    }
}

/// Removes hop-by-hop headers, those named by `Connection`, and mesh-owned headers.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::HOST,
    ] {
        headers.remove(h);
    }
    for h in ["keep-alive", "proxy-connection"] {
        headers.remove(h);
    }
    // TE may only say "trailers" across a proxy (gRPC needs it on h2).
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// Removes every header by which an app could claim an identity.
pub(crate) fn strip_identity_claims(headers: &mut HeaderMap) {
    for h in MESH_HEADERS {
        headers.remove(*h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn smuggling_framing_is_refused() {
        assert!(check_framing(&map(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&map(&[("transfer-encoding", "chunked")])).is_ok());
        let bad = [
            map(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            map(&[("transfer-encoding", "chunked, identity")]),
            map(&[("transfer-encoding", "gzip, chunked")]),
            map(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ]),
            map(&[("content-length", "5"), ("content-length", "6")]),
            map(&[("content-length", "+5")]),
        ];
        for h in bad {
            assert!(check_framing(&h).is_err(), "{h:?}");
        }
    }

    /// Hop-by-hop headers (and those `connection` names) and identity claims from the caller are
    /// one set: the headers that must not cross the proxy. Only `te: trailers` may.
    #[test]
    fn headers_that_must_not_cross_the_proxy_are_removed() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("te", "trailers, deflate"),
            ("x-halyard-peer-identity", "spiffe://evil/ns/x/sa/y"),
            ("x-forwarded-client-cert", "By=spiffe://evil"),
            ("x-user", "tester"),
        ]);
        strip_hop_by_hop(&mut h);
        strip_identity_claims(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "x-user"]);
        assert_eq!(h["te"], "trailers");
    }
}
