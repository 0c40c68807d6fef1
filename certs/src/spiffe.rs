//! SPIFFE identifiers, parsed by the rules of the SPIFFE-ID standard (§2).
//!
//! A [`SpiffeId`] can only exist in a valid form: `spiffe://<trust-domain>/<path>` with a lowercase
//! trust domain of at most 255 bytes, a non-empty path of non-empty segments without `.` or `..`,
//! no query, fragment, port or userinfo, and at most 2048 bytes in all.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE id accepted, in bytes (SPIFFE-ID §2.3).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes (SPIFFE-ID §2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE id or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string is empty.
    #[error("empty SPIFFE id")]
    Empty,
    /// The id is longer than 2048 bytes.
    #[error("SPIFFE id is {0} bytes, the limit is 2048")]
    TooLong(usize),
    /// The scheme is not `spiffe://`.
    #[error("SPIFFE id must start with 'spiffe://'")]
    Scheme,
    /// The trust domain is empty.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is {0} bytes, the limit is 255")]
    TrustDomainTooLong(usize),
    /// The trust domain has a character outside `[a-z0-9.-_]`.
    #[error(
        "trust domain has {0:?}: only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar(char),
    /// The authority carries a port (`:`).
    #[error("SPIFFE id must not carry a port")]
    Port,
    /// The authority carries userinfo (`@`).
    #[error("SPIFFE id must not carry userinfo")]
    UserInfo,
    /// There is a query part (`?`).
    #[error("SPIFFE id must not have a query")]
    Query,
    /// There is a fragment (`#`).
    #[error("SPIFFE id must not have a fragment")]
    Fragment,
    /// The path is empty: a workload id needs at least one segment.
    #[error("SPIFFE id has an empty path: a workload id needs a path such as /ns/NS/sa/SA")]
    EmptyPath,
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("SPIFFE id has an empty path segment")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("SPIFFE id path segment {0:?} is not allowed")]
    DotSegment(String),
    /// A path segment has a character outside `[A-Za-z0-9.-_]`.
    #[error("SPIFFE id path has {0:?}: only letters, digits, '.', '-' and '_' are allowed")]
    PathChar(char),
}

/// A trust domain: the authority part of a SPIFFE id, e.g. `mesh.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A validated SPIFFE id, e.g. `spiffe://mesh.local/ns/default/sa/reviews`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole id as text; `td_end` marks where the trust domain ends. Shared: an id is
    /// cloned into pool keys, request records and peer descriptions on every request, and
    /// a clone is then a reference count, not an allocation.
    text: std::sync::Arc<str>,
    td_end: usize,
}

impl TrustDomain {
    /// Parses a trust domain name (no scheme, no path).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        check_trust_domain(name)?;
        Ok(TrustDomain(name.to_owned()))
    }

    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() || path == "/" {
        return Err(SpiffeIdError::EmptyPath);
    }
    // `path` starts with '/', so the first split element is empty and skipped.
    for seg in path.split('/').skip(1) {
        if seg.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment(seg.to_owned()));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::PathChar(c));
        }
    }
    Ok(())
}

impl SpiffeId {
    /// Parses a SPIFFE id.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        let td_len = rest.find('/').unwrap_or(rest.len());
        check_trust_domain(&rest[..td_len])?;
        check_path(&rest[td_len..])?;
        Ok(SpiffeId {
            text: s.into(),
            td_end: "spiffe://".len() + td_len,
        })
    }

    /// Builds `spiffe://<td>/ns/<namespace>/sa/<account>`.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        account: &str,
    ) -> Result<Self, SpiffeIdError> {
        SpiffeId::parse(&format!("spiffe://{td}/ns/{namespace}/sa/{account}"))
    }

    /// The trust domain name.
    pub fn trust_domain_str(&self) -> &str {
        &self.text["spiffe://".len()..self.td_end]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.text[self.td_end..]
    }

    /// The namespace of an id of the form `/ns/<ns>/sa/<sa>`.
    pub fn namespace(&self) -> Option<&str> {
        self.ns_sa().map(|(ns, _)| ns)
    }

    /// The service account of an id of the form `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<&str> {
        self.ns_sa().map(|(_, sa)| sa)
    }

    fn ns_sa(&self) -> Option<(&str, &str)> {
        let mut it = self.path().split('/').skip(1);
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.text)
    }
}

/// Serialized as its text (`spiffe://td/path`).
impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Parsed from its text by the SPIFFE-ID rules; an invalid id is a deserialization error.
impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        SpiffeId::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/reviews").unwrap();
        assert_eq!(id.trust_domain_str(), "mesh.local");
        assert_eq!(id.path(), "/ns/default/sa/reviews");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("reviews"));
        assert_eq!(id.to_string(), "spiffe://mesh.local/ns/default/sa/reviews");
        let other = SpiffeId::parse("spiffe://a_b-c.d/x").unwrap();
        assert_eq!(other.namespace(), None);
    }

    #[test]
    fn refuses_bad_ids() {
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", SpiffeIdError::Empty),
            ("http://td/x", SpiffeIdError::Scheme),
            ("SPIFFE://td/x", SpiffeIdError::Scheme),
            ("spiffe:///x", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://td", SpiffeIdError::EmptyPath),
            ("spiffe://td/", SpiffeIdError::EmptyPath),
            ("spiffe://td//x", SpiffeIdError::EmptySegment),
            ("spiffe://td/x/", SpiffeIdError::EmptySegment),
            ("spiffe://td/./x", SpiffeIdError::DotSegment(".".into())),
            ("spiffe://td/x/..", SpiffeIdError::DotSegment("..".into())),
            ("spiffe://td/x?a=b", SpiffeIdError::Query),
            ("spiffe://td/x#f", SpiffeIdError::Fragment),
            ("spiffe://td:443/x", SpiffeIdError::Port),
            ("spiffe://u@td/x", SpiffeIdError::UserInfo),
            ("spiffe://Mesh.local/x", SpiffeIdError::TrustDomainChar('M')),
            ("spiffe://td/x%20y", SpiffeIdError::PathChar('%')),
            (&long_path, SpiffeIdError::TooLong(long_path.len())),
            (&long_td, SpiffeIdError::TrustDomainTooLong(256)),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
        }
    }
}
