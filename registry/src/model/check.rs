//! Leaf validators: names, labels, durations, percentages, HTTP tokens, paths.
//!
//! Each returns the parsed value or a [`ValidationError`] carrying the field path it was given.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::ValidationError;

/// Longest DNS-1123 label.
const MAX_LABEL: usize = 63;
/// Longest label value, label key and endpoint id.
const MAX_ID: usize = 253;

/// Joins a field name onto a path: `rules[1]` + `backends` = `rules[1].backends`.
pub(crate) fn field(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}.{name}")
    }
}

/// Indexes a path: `rules` + 1 = `rules[1]`.
pub(crate) fn index(base: &str, i: usize) -> String {
    format!("{base}[{i}]")
}

/// Checks a DNS-1123 label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub(crate) fn dns_label(path: &str, s: &str) -> Result<(), ValidationError> {
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ok_ends = !s.starts_with('-') && !s.ends_with('-');
    if s.is_empty() || s.len() > MAX_LABEL || !ok_chars || !ok_ends {
        return Err(ValidationError::at(
            path,
            format!(
                "{s:?} is not a DNS-1123 label: 1-63 lowercase letters, digits or '-', \
                 starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Checks an identifier usable as one key segment (endpoint ids, sidecar ids).
pub(crate) fn key_segment(path: &str, s: &str) -> Result<(), ValidationError> {
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if s.is_empty() || s.len() > MAX_ID || !ok_chars || s.starts_with('.') {
        return Err(ValidationError::at(
            path,
            format!(
                "{s:?} is not a valid id: 1-253 letters, digits, '-', '_', '.' or ':', \
                 not starting with '.'"
            ),
        ));
    }
    Ok(())
}

fn label_text(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let inner_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    let ends_ok = s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    s.len() <= MAX_ID && inner_ok && ends_ok
}

/// Checks a label map (endpoint labels, subset selectors).
pub(crate) fn labels(
    path: &str,
    map: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ValidationError> {
    for (k, v) in &map {
        let here = field(path, k);
        if !label_text(k, false) {
            return Err(ValidationError::at(
                here,
                format!("label key {k:?} must be letters, digits, '-', '_', '.', '/', starting and ending alphanumeric"),
            ));
        }
        if !label_text(v, true) {
            return Err(ValidationError::at(
                here,
                format!("label value {v:?} must be empty or letters, digits, '-', '_', '.', starting and ending alphanumeric"),
            ));
        }
    }
    Ok(map)
}

/// Parses a positive duration such as `500ms` or `2s`.
pub(crate) fn duration(path: &str, s: &str) -> Result<Duration, ValidationError> {
    let d = humantime::parse_duration(s).map_err(|e| {
        ValidationError::at(
            path,
            format!("{s:?} is not a duration ({e}); write e.g. 500ms, 2s, 1m"),
        )
    })?;
    if d.is_zero() {
        return Err(ValidationError::at(path, "duration must be positive"));
    }
    Ok(d)
}

/// Checks a percentage: a finite number from 0 to 100.
pub(crate) fn percent(path: &str, p: f64) -> Result<Percent, ValidationError> {
    if !p.is_finite() || !(0.0..=100.0).contains(&p) {
        return Err(ValidationError::at(
            path,
            format!("{p} is not a percentage: expected 0 to 100"),
        ));
    }
    Ok(Percent(p))
}

/// Checks a port number: 1-65535.
pub(crate) fn port(path: &str, p: u16) -> Result<u16, ValidationError> {
    if p == 0 {
        return Err(ValidationError::at(
            path,
            "port 0 is not valid: expected 1-65535",
        ));
    }
    Ok(p)
}

/// Checks an HTTP method: an uppercase token such as `GET`.
pub(crate) fn method(path: &str, m: &str) -> Result<String, ValidationError> {
    let ok = !m.is_empty() && m.len() <= 32 && m.chars().all(|c| c.is_ascii_uppercase());
    if !ok {
        return Err(ValidationError::at(
            path,
            format!("{m:?} is not an HTTP method: expected uppercase letters such as GET or POST"),
        ));
    }
    Ok(m.to_owned())
}

/// Checks an HTTP header name: a lowercase token.
pub(crate) fn header_name(path: &str, h: &str) -> Result<String, ValidationError> {
    let ok = !h.is_empty()
        && h.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "!#$%&'*+-.^_`|~".contains(c));
    if !ok {
        return Err(ValidationError::at(
            path,
            format!("{h:?} is not a header name: expected a lowercase token such as x-user"),
        ));
    }
    Ok(h.to_owned())
}

/// Checks a header value: visible ASCII, spaces and tabs, no CR or LF.
pub(crate) fn header_value(path: &str, v: &str) -> Result<String, ValidationError> {
    if v.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ValidationError::at(
            path,
            "header value must not contain control characters (CR, LF, ...)",
        ));
    }
    Ok(v.to_owned())
}

/// Checks a URL path: starts with `/`, no whitespace or fragment.
pub(crate) fn url_path(path: &str, p: &str) -> Result<String, ValidationError> {
    if !p.starts_with('/')
        || p.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(ValidationError::at(
            path,
            format!("{p:?} is not a path: expected it to start with '/' and hold no spaces or '#'"),
        ));
    }
    Ok(p.to_owned())
}

/// A percentage from 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percent(f64);

impl Percent {
    /// The percentage, 0 to 100.
    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether a uniform sample in `[0, 1)` falls inside this percentage.
    pub fn hits(self, sample: f64) -> bool {
        sample * 100.0 < self.0
    }
}

impl serde::Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 {
            s.serialize_u64(self.0 as u64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for good in ["a", "reviews", "a-b", "x1", &"a".repeat(63)] {
            assert!(dns_label("n", good).is_ok(), "{good}");
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert_eq!(dns_label("n", bad).unwrap_err().path, "n", "{bad}");
        }
    }

    #[test]
    fn a_duration_is_a_positive_amount_with_a_unit() {
        assert_eq!(duration("t", "500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("t", "2s").unwrap(), Duration::from_secs(2));
        assert!(duration("t", "0s").is_err());
        assert!(duration("t", "soon").is_err());
    }

    #[test]
    fn a_percent_lies_within_0_to_100() {
        assert!(percent("p", 100.0).is_ok());
        assert!(percent("p", 100.5).is_err());
        assert!(percent("p", -1.0).is_err());
        assert!(percent("p", f64::NAN).is_err());
    }

    #[test]
    fn a_percent_hits_samples_below_its_share() {
        assert!(Percent(10.0).hits(0.05) && !Percent(10.0).hits(0.2));
    }
}
