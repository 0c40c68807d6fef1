//! The route rule a flow or request takes, one function for L4 and L7: first match wins;
//! every condition present must hold. An L4 flow carries no HTTP request, so a rule with a
//! path, method or header condition cannot match it.

use halyard_registry::model::{Route, RouteMatch, RouteRule};
use http::HeaderMap;

/// The HTTP side of a request, for matching.
#[derive(Debug, Clone, Copy)]
pub struct HttpView<'a> {
    /// The normalized path (no query).
    pub path: &'a str,
    /// The method.
    pub method: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// What a rule is matched against: the calling service, and the request for L7.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The calling service (this sidecar's own).
    pub source: &'a str,
    /// The HTTP request; `None` for an L4 flow.
    pub http: Option<HttpView<'a>>,
}

impl<'a> RequestView<'a> {
    /// An L4 flow from `source`.
    pub fn flow(source: &'a str) -> Self {
        RequestView { source, http: None }
    }

    /// An L7 request from `source`.
    pub fn request(source: &'a str, http: HttpView<'a>) -> Self {
        RequestView {
            source,
            http: Some(http),
        }
    }
}

/// The first rule of `route` the flow or request matches, with its index.
pub fn select<'r>(route: &'r Route, req: RequestView<'_>) -> Option<(usize, &'r RouteRule)> {
    route
        .rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches.as_ref().is_none_or(|m| matches(m, req)))
}

fn matches(m: &RouteMatch, req: RequestView<'_>) -> bool {
    let source_ok = m
        .source_service
        .as_ref()
        .is_none_or(|s| s.as_str() == req.source);
    source_ok
        && match req.http {
            None => m.path.is_none() && m.method.is_none() && m.headers.is_empty(),
            Some(h) => http_matches(m, h),
        }
}

fn http_matches(m: &RouteMatch, req: HttpView<'_>) -> bool {
    m.path.as_ref().is_none_or(|p| p.matches(req.path))
        && m.method
            .as_ref()
            .is_none_or(|x| x.eq_ignore_ascii_case(req.method))
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

#[cfg(test)]
mod tests {
    use halyard_registry::model::{parse_documents, Object};

    use super::*;

    fn route(yaml: &str) -> Route {
        match parse_documents("test", yaml).unwrap().pop() {
            Some(Object::Route(r)) => r,
            other => panic!("not a route: {other:?}"),
        }
    }

    const RULES: &str = "kind: Route\nservice: r\nrules:\n  - match: { path: { prefix: /api } }\n    backends: [{ weight: 1 }]\n  - match: { sourceService: other }\n    backends: [{ weight: 1 }]\n  - match: { sourceService: me }\n    backends: [{ weight: 1 }]\n  - backends: [{ weight: 1 }]\n";

    #[test]
    fn a_flow_skips_rules_with_http_conditions() {
        let r = route(RULES);
        assert_eq!(select(&r, RequestView::flow("me")).map(|(i, _)| i), Some(2));
        assert_eq!(
            select(&r, RequestView::flow("third")).map(|(i, _)| i),
            Some(3)
        );
    }

    #[test]
    fn a_request_matches_its_path() {
        let r = route(RULES);
        let headers = HeaderMap::new();
        let http = |path| HttpView {
            path,
            method: "GET",
            headers: &headers,
        };
        let pick = |path| select(&r, RequestView::request("me", http(path))).map(|(i, _)| i);
        assert_eq!(pick("/api/x"), Some(0));
        assert_eq!(pick("/other"), Some(2));
    }
}
