//! The target of a tunnel: `<service>:<port>`, carried in the CONNECT `:authority`
//! (RFC 9114 §4.4).

use std::fmt;
use std::str::FromStr;

use http::uri::Authority;

/// Longest service name accepted (a DNS name).
const MAX_SERVICE_LEN: usize = 253;

/// A tunnel target that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The request has no authority.
    #[error("request has no authority; expected <service>:<port>")]
    Missing,
    /// The authority has no port or a port that is not 1..=65535.
    #[error("authority {0:?} needs a port in 1..=65535")]
    BadPort(String),
    /// The service part is empty, too long or holds characters outside `[a-z0-9.-]`.
    #[error("service name {0:?} must be 1-253 characters of a-z, 0-9, '.' and '-'")]
    BadService(String),
    /// The authority carries userinfo (`user@`), which a target never has.
    #[error("authority {0:?} must not carry userinfo")]
    UserInfo(String),
}

/// A validated `<service>:<port>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    service: String,
    port: u16,
}

impl Target {
    /// A target from its parts.
    pub fn new(service: &str, port: u16) -> Result<Self, TargetError> {
        if port == 0 {
            return Err(TargetError::BadPort(format!("{service}:0")));
        }
        check_service(service)?;
        Ok(Target {
            service: service.to_owned(),
            port,
        })
    }

    /// The target of a request: accepts both the strict CONNECT form (`svc:9000`) and what
    /// the h3 client sends (`https://svc:9000/`), reading only the authority.
    pub fn from_uri(uri: &http::Uri) -> Result<Self, TargetError> {
        Target::from_authority(uri.authority().ok_or(TargetError::Missing)?)
    }

    /// The target named by an authority.
    pub fn from_authority(authority: &Authority) -> Result<Self, TargetError> {
        let text = authority.as_str();
        if text.contains('@') {
            return Err(TargetError::UserInfo(text.to_owned()));
        }
        let port = authority
            .port_u16()
            .filter(|p| *p != 0)
            .ok_or_else(|| TargetError::BadPort(text.to_owned()))?;
        Target::new(authority.host(), port)
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn check_service(service: &str) -> Result<(), TargetError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if service.is_empty() || service.len() > MAX_SERVICE_LEN || !service.chars().all(ok_char) {
        return Err(TargetError::BadService(service.to_owned()));
    }
    Ok(())
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, TargetError> {
        let authority: Authority = s.parse().map_err(|_| TargetError::BadPort(s.to_owned()))?;
        Target::from_authority(&authority)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_strict_form() {
        let strict: http::Uri = "reviews:9080".parse().unwrap();
        let want = Target::new("reviews", 9080).unwrap();
        assert_eq!(Target::from_uri(&strict).unwrap(), want);
        assert_eq!(want.to_string(), "reviews:9080");
        assert_eq!(
            "reviews.default:9080".parse::<Target>().unwrap().port(),
            9080
        );
    }

    #[test]
    fn accepts_the_h3_client_form() {
        let h3: http::Uri = "https://reviews:9080/".parse().unwrap();
        let want = Target::new("reviews", 9080).unwrap();
        assert_eq!(Target::from_uri(&h3).unwrap(), want);
    }

    #[test]
    fn rejects_malformed_authorities() {
        assert!(matches!(
            "reviews".parse::<Target>(),
            Err(TargetError::BadPort(_))
        ));
        assert!(matches!(
            "reviews:0".parse::<Target>(),
            Err(TargetError::BadPort(_))
        ));
        assert!(matches!(
            "Reviews:1".parse::<Target>(),
            Err(TargetError::BadService(_))
        ));
        assert!(matches!(
            "u@reviews:1".parse::<Target>(),
            Err(TargetError::UserInfo(_))
        ));
        let path_only: http::Uri = "/x".parse().unwrap();
        assert_eq!(Target::from_uri(&path_only), Err(TargetError::Missing));
        let long = format!("{}:1", "a".repeat(300));
        assert!(long.parse::<Target>().is_err());
    }

    /// 50 000 short random strings from an alphabet of authority characters, separators and
    /// invalid bytes; the same ones on every run.
    fn random_authorities() -> impl Iterator<Item = String> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9114);
        let alphabet = b"abcz09.-_:@[]%/?#Z \xff";
        (0..50_000).map(move |_| {
            let len = rng.random_range(0..24);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
    }

    #[test]
    fn random_authorities_never_panic() {
        for text in random_authorities() {
            let _ = text.parse::<Target>();
            if let Ok(uri) = text.parse::<http::Uri>() {
                let _ = Target::from_uri(&uri);
            }
        }
    }

    #[test]
    fn an_accepted_authority_round_trips() {
        for text in random_authorities() {
            if let Ok(target) = text.parse::<Target>() {
                assert_eq!(target.to_string().parse::<Target>().unwrap(), target);
            }
        }
    }
}
