//! Request path normalization, done once per request: the same normalized path is used for
//! routing, for policy and for what is forwarded, so `//admin`, `/%61dmin` and
//! `/public/../admin` cannot slip past a rule on `/admin` (Istio CVE-2021-31920, CVE-2021-39156).
//!
//! Steps: drop any fragment; split off the query (kept as is); decode percent-encoded
//! *unreserved* characters (RFC 3986 §2.3: ALPHA DIGIT - . _ ~) and percent-encoded UTF-8 text
//! (so `/café`, `/caf%C3%A9` and `/caf%c3%a9` are one path: an app decodes them alike, so a rule
//! must see them alike), upper-case the hex of the rest; merge repeated slashes; remove dot
//! segments (RFC 3986 §5.2.4). A slash or backslash in disguise (`%2F`, `%5C`, a raw `\`, which
//! some servers take as a separator) or a bad escape makes the path unacceptable: the request is
//! refused with 400 rather than guessed at.
//!
//! Path parameters (`;` in a segment, RFC 3986 §3.3) get the same treatment as an escaped
//! slash, with a choice ([`PathParameters`]): servlet containers cut each segment at its first
//! `;` *before* resolving dot segments (Tomcat's `CoyoteAdapter` parses them off the raw URI,
//! then normalizes), so `/admin;x`, `/admin;a=1;b=2/`, `/;x/admin`, `/admin/;/x` and
//! `/public/..;/admin` all reach `/admin`'s handler there. The path routing and policy match is
//! therefore always the one with every segment's parameters removed, then dots resolved; `%3B`
//! counts as `;` too (a server that decodes before it cuts, or a client that encodes, must not
//! open a second spelling). The setting decides only what is refused and what is forwarded.

use crate::config::PathParameters;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// The path does not start with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// A `%` is not followed by two hex digits.
    #[error("bad percent-escape in path")]
    BadEscape,
    /// `%2F` or `%5C`: an escaped separator means different paths to different servers.
    #[error("escaped '/' or '\\' in path")]
    EscapedSeparator,
    /// A raw `\`: a separator to some servers, a character to others.
    #[error("'\\' in path")]
    Backslash,
    /// `;` or `%3B` in the path, under `inbound.path_parameters = "reject"`.
    #[error(
        "path parameter (';' or %3B) in path: refused, since servers resolve it differently; \
         the receiving sidecar's inbound.path_parameters = \"strip\" or \"keep\" admits them"
    )]
    Parameter,
    /// A path parameter that changes which segments the path has (`/a/..;/b`, `/a/;/..`), when
    /// parameters are forwarded (`inbound.path_parameters = "keep"`, and outbound): the app and
    /// the rules could resolve the path to different resources.
    #[error(
        "path parameter on a dot segment ('/..;', '/.;') or on an empty segment a '..' removes: \
         the path would mean one thing to the rules and another to the app"
    )]
    AmbiguousParameter,
}

/// A normalized path and the untouched query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NormalPath {
    /// The normalized path, starting with `/`, without path parameters: what routing and
    /// policy match.
    pub(crate) path: String,
    /// The normalized path with its parameters, when they are forwarded
    /// ([`PathParameters::Keep`], and outbound) and there were any.
    literal: Option<String>,
    /// The query without `?`, if any.
    pub(crate) query: Option<String>,
}

impl NormalPath {
    /// Path and query as a request target: what is forwarded.
    pub(crate) fn target(&self) -> String {
        let path = self.literal.as_deref().unwrap_or(&self.path);
        match &self.query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        }
    }
}

/// How the outbound side treats path parameters in its app's requests: routing matches the path
/// without them and they are forwarded, so the receiving sidecar, which knows its app
/// (`inbound.path_parameters`), refuses, strips or keeps them. Parameters that would change
/// which segments the path has are refused here already, as under `keep`.
pub(crate) const OUTBOUND_PARAMETERS: PathParameters = PathParameters::Keep;

/// Normalizes a request target (`/a/b?x=1`), treating path parameters as `params` says.
pub(crate) fn normalize(target: &str, params: PathParameters) -> Result<NormalPath, PathError> {
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path)?;
    if !decoded.split('/').any(|seg| param_start(seg).is_some()) {
        return Ok(NormalPath {
            path: remove_dots(&decoded),
            literal: None,
            query,
        });
    }
    let matched = remove_dots(&strip_parameters(&decoded));
    let literal = match params {
        PathParameters::Reject => return Err(PathError::Parameter),
        PathParameters::Strip => None,
        PathParameters::Keep => Some(unambiguous(remove_dots(&decoded), &matched)?),
    };
    Ok(NormalPath {
        path: matched,
        literal,
        query,
    })
}

/// Where a segment's parameters start: its first `;` or `%3B` (the decoded path has upper-case
/// hex, and every `%` in it starts an escape, so the match cannot straddle two escapes).
fn param_start(segment: &str) -> Option<usize> {
    [segment.find(';'), segment.find("%3B")]
        .into_iter()
        .flatten()
        .min()
}

/// The segment without its parameters.
fn segment_name(segment: &str) -> &str {
    param_start(segment).map_or(segment, |at| &segment[..at])
}

/// The path with every segment cut at its first parameter, as a servlet container does.
fn strip_parameters(path: &str) -> String {
    let names: Vec<&str> = path.split('/').map(segment_name).collect();
    names.join("/")
}

/// `literal` (dots resolved with the parameters in place) if its segments, without their
/// parameters, are those of `matched` (parameters removed, then dots resolved). They differ when
/// a parameter makes a dot segment look like a name (`/a/..;/b`, `/.;/b`) or a name that a `..`
/// removes instead of the one before it (`/a/;/..`): then the app could resolve the forwarded
/// path to another resource than the one the rules matched.
fn unambiguous(literal: String, matched: &str) -> Result<String, PathError> {
    let names = literal
        .split('/')
        .map(segment_name)
        .filter(|s| !s.is_empty());
    if names.eq(matched.split('/').filter(|s| !s.is_empty())) {
        Ok(literal)
    } else {
        Err(PathError::AmbiguousParameter)
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Escaped bytes of 0x80 and above, decoded once the run of escapes ends.
    let mut high: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            push_high(&mut out, &mut high);
            // Everything up to the next escape, as it came: `%` is ASCII, so the slice ends on
            // a character boundary and non-ASCII text (sent raw by some clients) stays intact.
            let run = path[i..].find('%').map_or(path.len(), |n| i + n);
            out.push_str(&path[i..run]);
            i = run;
            continue;
        }
        let (Some(h), Some(l)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = h * 16 + l;
        i += 3;
        if c >= 0x80 {
            high.push(c);
            continue;
        }
        push_high(&mut out, &mut high);
        match c {
            b'/' | b'\\' => return Err(PathError::EscapedSeparator),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(c as char)
            }
            _ => out.push_str(&format!("%{c:02X}")),
        }
    }
    push_high(&mut out, &mut high);
    Ok(out)
}

/// Appends escaped high bytes: as text where they are valid UTF-8, else escaped again
/// (upper-case hex), byte by byte.
fn push_high(out: &mut String, high: &mut Vec<u8>) {
    let mut rest = high.as_slice();
    while !rest.is_empty() {
        let valid = match std::str::from_utf8(rest) {
            Ok(text) => text.len(),
            Err(e) => e.valid_up_to(),
        };
        let (text, tail) = rest.split_at(valid);
        if let Ok(text) = std::str::from_utf8(text) {
            out.push_str(text);
        }
        if let Some((&b, after)) = tail.split_first() {
            out.push_str(&format!("%{b:02X}"));
            rest = after;
        } else {
            rest = tail;
        }
    }
    high.clear();
}

/// Merges repeated slashes and resolves `.` and `..` (never above the root).
fn remove_dots(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        match seg {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normalization under the default setting (path parameters refused).
    fn normalize(target: &str) -> Result<NormalPath, PathError> {
        super::normalize(target, PathParameters::default())
    }

    /// The path matched and the target forwarded under `params`.
    fn both(target: &str, params: PathParameters) -> (String, String) {
        both_or_err(target, params).unwrap()
    }

    fn both_or_err(target: &str, params: PathParameters) -> Result<(String, String), PathError> {
        super::normalize(target, params).map(|n| (n.path.clone(), n.target()))
    }

    /// Every spelling of a path parameter an app may resolve to `/admin` (or below it).
    const ADMIN_WITH_PARAMETERS: [&str; 16] = [
        "/admin;x",
        "/admin;",
        "/admin;jsessionid=1/users",
        "/admin%3Bx",
        "/admin%3bx",
        "/admin/;/x",
        "/;x/admin",
        "/..;/admin",
        "/public/..;/admin",
        "/public/.%2E;x/admin",
        "/public/..%3B/admin",
        "/public;x/../admin",
        "/admin;a=1;b=2/",
        "/%61dmin;x",
        "//admin;x",
        "/.;/admin",
    ];

    #[test]
    fn path_parameters_are_refused_by_default() {
        for p in ADMIN_WITH_PARAMETERS {
            assert_eq!(normalize(p), Err(PathError::Parameter), "{p}");
        }
        // In the query, `;` is the app's business.
        assert_eq!(n("/a?x=1;y=%3B"), "/a?x=1;y=%3B");
    }

    #[test]
    fn stripped_parameters_leave_the_path_a_servlet_container_resolves() {
        for (raw, want) in [
            ("/admin;x", "/admin"),
            ("/admin;", "/admin"),
            ("/admin;jsessionid=1/users", "/admin/users"),
            ("/admin%3Bx", "/admin"),
            ("/admin%3bx", "/admin"),
            ("/admin/;/x", "/admin/x"),
            ("/;x/admin", "/admin"),
            ("/..;/admin", "/admin"),
            ("/public/..;/admin", "/admin"),
            ("/public/.%2E;x/admin", "/admin"),
            ("/public/..%3B/admin", "/admin"),
            ("/public;x/../admin", "/admin"),
            ("/admin;a=1;b=2/", "/admin/"),
            ("/%61dmin;x", "/admin"),
            ("//admin;x", "/admin"),
            ("/.;/admin", "/admin"),
        ] {
            let (path, target) = both(raw, PathParameters::Strip);
            assert_eq!((path.as_str(), target.as_str()), (want, want), "{raw}");
        }
        // An escaped slash is refused, inside parameters too.
        let refused = super::normalize("/a;x%2Fb", PathParameters::Strip);
        assert_eq!(refused, Err(PathError::EscapedSeparator));
        let (path, target) = both("/admin;x?q=;1", PathParameters::Strip);
        assert_eq!((path.as_str(), target.as_str()), ("/admin", "/admin?q=;1"));
    }

    #[test]
    fn kept_parameters_are_forwarded_and_matched_without_them() {
        for (raw, matched, forwarded) in [
            ("/admin;x", "/admin", "/admin;x"),
            ("/admin;", "/admin", "/admin;"),
            (
                "/admin;jsessionid=1/users",
                "/admin/users",
                "/admin;jsessionid=1/users",
            ),
            ("/admin%3bx", "/admin", "/admin%3Bx"),
            ("/admin;a=1;b=2/", "/admin/", "/admin;a=1;b=2/"),
            ("/admin/;/x", "/admin/x", "/admin/;/x"),
            ("/;x/admin", "/admin", "/;x/admin"),
            ("/public;x/../admin", "/admin", "/admin"),
            ("/%61dmin;x=%62", "/admin", "/admin;x=b"),
            ("/a;v=1/./b;w=2?q=1", "/a/b", "/a;v=1/b;w=2?q=1"),
            ("/a;v=1//b", "/a/b", "/a;v=1/b"),
            ("/;jsessionid=1", "/", "/;jsessionid=1"),
            ("/app/;jsessionid=1", "/app/", "/app/;jsessionid=1"),
        ] {
            let got = both(raw, PathParameters::Keep);
            assert_eq!(got, (matched.to_owned(), forwarded.to_owned()), "{raw}");
        }
    }

    #[test]
    fn kept_parameters_that_change_the_segments_are_refused() {
        for raw in [
            "/..;/admin",
            "/public/..;/admin",
            "/public/.%2E;x/admin",
            "/public/..%3B/admin",
            "/.;/admin",
            "/a/;/..",
            "/a/b/;x/../../c",
        ] {
            let got = super::normalize(raw, PathParameters::Keep);
            assert_eq!(got, Err(PathError::AmbiguousParameter), "{raw}");
        }
    }

    #[test]
    fn every_setting_matches_one_path_without_parameters() {
        for raw in ADMIN_WITH_PARAMETERS
            .iter()
            .chain(&["/a;b/c%3Bd/e", "/x/y"])
        {
            let stripped = both(raw, PathParameters::Strip).0;
            assert!(
                !stripped.contains(';') && !stripped.contains("%3B"),
                "{raw}"
            );
            for params in [PathParameters::Reject, PathParameters::Keep] {
                if let Ok(n) = super::normalize(raw, params) {
                    assert_eq!(n.path, stripped, "{raw} {params:?}");
                }
            }
        }
    }

    #[test]
    fn a_forwarded_target_normalizes_to_itself_in_every_setting() {
        let params = [
            PathParameters::Reject,
            PathParameters::Strip,
            PathParameters::Keep,
        ];
        for raw in ADMIN_WITH_PARAMETERS.iter().chain(&["/a;v=1/./b;w=2?q=;"]) {
            for p in params {
                if let Ok(once) = both_or_err(raw, p) {
                    assert_eq!(both(&once.1, p), once, "{raw} {p:?}");
                }
            }
        }
    }

    #[test]
    fn escaped_and_raw_utf8_text_are_one_path() {
        // A deny on "/café" must hold for every spelling an app decodes to it.
        for raw in ["/caf\u{e9}", "/caf%C3%A9", "/caf%c3%a9", "/ca%66%C3%A9"] {
            assert_eq!(normalize(raw).unwrap().path, "/caf\u{e9}", "{raw}");
        }
    }

    #[test]
    fn escaped_bytes_that_are_not_utf8_stay_escaped() {
        assert_eq!(normalize("/a%c3/b%FF%fe").unwrap().path, "/a%C3/b%FF%FE");
        assert_eq!(normalize("/%C3%A9%C3").unwrap().path, "/\u{e9}%C3");
    }

    #[test]
    fn a_raw_backslash_is_refused() {
        assert_eq!(normalize("/a\\b/c"), Err(PathError::Backslash));
    }

    #[test]
    fn raw_non_ascii_text_passes_unchanged() {
        // Found by the normalize_path fuzz target: bytes DB A9 came out as "Û©".
        assert_eq!(normalize("/\u{6e9}///.").unwrap().path, "/\u{6e9}/");
        assert_eq!(normalize("/caf\u{e9}/%61").unwrap().path, "/caf\u{e9}/a");
    }

    #[test]
    fn a_normalized_target_normalizes_to_itself() {
        for raw in [
            "/\u{6e9}///.",
            "//a/./b/../c?x=%2F",
            "/%7e%41/%25",
            "/..",
            "/a/",
        ] {
            let once = normalize(raw).unwrap().target();
            assert_eq!(normalize(&once).unwrap().target(), once, "{raw}");
        }
    }

    fn n(p: &str) -> String {
        normalize(p).unwrap().target()
    }

    #[test]
    fn bypass_attempts_normalize_to_the_same_path() {
        for p in [
            "/admin",
            "//admin",
            "/%61dmin",
            "/public/../admin",
            "/./admin",
            "///admin#frag",
            "/%61%64min",
        ] {
            assert_eq!(n(p), "/admin", "{p}");
        }
        assert_eq!(n("/a/b/../../../admin"), "/admin");
        assert_eq!(n("/api/v1/?q=%2F"), "/api/v1/?q=%2F");
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(n("/a%7e"), "/a~");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/.."), "/");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EscapedSeparator));
        assert_eq!(normalize("/a%5cb"), Err(PathError::EscapedSeparator));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
    }
}
