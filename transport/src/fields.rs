//! The size of a header section as HTTP/3 counts it against SETTINGS_MAX_FIELD_SECTION_SIZE,
//! so that a sender can refuse a section before anything reaches the peer.
//!
//! ```text
//! //= https://www.rfc-editor.org/rfc/rfc9114#section-4.2.2
//! //# The size of a field list is calculated based on the uncompressed size of fields,
//! //# including the length of the name and value in bytes plus an overhead of 32 bytes
//! //# for each field.
//! ```
//!
//! Pseudo-header fields count like any other field: they are part of the section the peer
//! decodes. The pseudo-header fields are those h3 puts on the wire for the message.

use http::{HeaderMap, Method, StatusCode};

/// Bytes added to each field's name and value (RFC 9114 §4.2.2).
const FIELD_OVERHEAD: u64 = 32;

/// The size of one field line: name + value + 32 bytes.
fn field(name: &str, value: &[u8]) -> u64 {
    name.len() as u64 + value.len() as u64 + FIELD_OVERHEAD
}

/// The size of the regular fields of a section (no pseudo-header fields), in bytes.
pub fn header_fields_size(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| field(name.as_str(), value.as_bytes()))
        .sum()
}

/// The size of a request's header section in bytes: `:method`, `:scheme` (https when the URI
/// has none), `:authority` (when present), `:path` (`/` when empty) and every header field, as
/// h3 sends them.
pub fn request_section_size(request: &http::Request<()>) -> u64 {
    let uri = request.uri();
    let method = request.method();
    let path = match uri.path_and_query() {
        Some(p) if !(p.path().is_empty() && method != Method::OPTIONS) => p.as_str(),
        _ => "/",
    };
    let scheme = uri.scheme_str().unwrap_or("https");
    let authority = uri
        .authority()
        .map_or(0, |a| field(":authority", a.as_str().as_bytes()));
    field(":method", method.as_str().as_bytes())
        + field(":scheme", scheme.as_bytes())
        + authority
        + field(":path", path.as_bytes())
        + header_fields_size(request.headers())
}

/// The size of a response's header section in bytes: `:status` and every header field.
pub fn response_section_size(status: StatusCode, headers: &HeaderMap) -> u64 {
    field(":status", status.as_str().as_bytes()) + header_fields_size(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_counts_name_value_and_32_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", "abc".parse().unwrap());
        headers.append("cookie", "de".parse().unwrap());
        assert_eq!(header_fields_size(&headers), (6 + 3 + 32) + (6 + 2 + 32));
    }

    #[test]
    fn a_request_counts_its_pseudo_header_fields() {
        let request = http::Request::get("https://reviews:9080/a?b")
            .body(())
            .unwrap();
        let pseudo = (7 + 3 + 32) + (7 + 5 + 32) + (10 + 12 + 32) + (5 + 4 + 32);
        assert_eq!(request_section_size(&request), pseudo);
    }

    #[test]
    fn a_connect_request_is_counted_as_h3_sends_it() {
        let request = http::Request::connect("reviews:9080").body(()).unwrap();
        // h3 sends :scheme https and :path / with a CONNECT too.
        let pseudo = (7 + 7 + 32) + (7 + 5 + 32) + (10 + 12 + 32) + (5 + 1 + 32);
        assert_eq!(request_section_size(&request), pseudo);
    }

    #[test]
    fn a_response_counts_its_status() {
        let mut headers = HeaderMap::new();
        headers.insert("set-cookie", "a=1".parse().unwrap());
        let size = response_section_size(StatusCode::OK, &headers);
        assert_eq!(size, (7 + 3 + 32) + (10 + 3 + 32));
    }
}
