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
}

/// A normalized path and the untouched query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NormalPath {
    /// The normalized path, starting with `/`.
    pub(crate) path: String,
    /// The query without `?`, if any.
    pub(crate) query: Option<String>,
}

impl NormalPath {
    /// Path and query as a request target.
    pub(crate) fn target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Normalizes a request target (`/a/b?x=1`).
pub(crate) fn normalize(target: &str) -> Result<NormalPath, PathError> {
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path)?;
    Ok(NormalPath {
        path: remove_dots(&decoded),
        query,
    })
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
