//! Matching a request to a route rule: first match wins; every condition present must hold.

use halyard_registry::model::{Route, RouteMatch, RouteRule};
use http::HeaderMap;

/// What a rule is matched against.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The normalized path.
    pub path: &'a str,
    /// The method.
    pub method: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The calling service (this sidecar's own).
    pub source: &'a str,
}

/// The first rule of `route` the request matches, with its index.
pub fn select<'r>(route: &'r Route, req: RequestView<'_>) -> Option<(usize, &'r RouteRule)> {
    route
        .rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches.as_ref().is_none_or(|m| matches(m, req)))
}

fn matches(m: &RouteMatch, req: RequestView<'_>) -> bool {
    m.path.as_ref().is_none_or(|p| p.matches(req.path))
        && m.method
            .as_ref()
            .is_none_or(|x| x.eq_ignore_ascii_case(req.method))
        && m.source_service
            .as_ref()
            .is_none_or(|s| s.as_str() == req.source)
        && m.headers.iter().all(|(name, cond)| {
            let value = req.headers.get(name.as_str()).and_then(|v| v.to_str().ok());
            cond.matches(value)
        })
}

/// Methods that may be retried without an explicit opt-in (RFC 9110 §9.2.2).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method as M;
    [M::GET, M::HEAD, M::OPTIONS, M::PUT, M::DELETE, M::TRACE].contains(method)
}
