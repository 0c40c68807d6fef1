//! Enrollment and renewal rules of the CA server, as pure functions: which CSRs may be signed
//! for whom, and what a bootstrap token is and when it admits a request. The server (in the
//! sidecar crate) does the I/O around them; `now` is always passed in.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateSigningRequestParams, IsCa, PublicKey, SanType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spiffe::SpiffeId;

/// Prefix of every bootstrap token, so a leaked one is easy to find in logs and files.
pub const TOKEN_PREFIX: &str = "hyt1_";
/// Random bytes in a token (hex-encoded after the prefix).
const TOKEN_BYTES: usize = 32;

/// Why a CSR is refused. Nothing is signed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The CSR does not parse or its signature does not verify.
    #[error("CSR does not parse or its signature is wrong: {0}")]
    Malformed(String),
    /// The CSR carries a SAN other than its one URI (DNS, IP, e-mail...).
    #[error("CSR asks for a {kind} SAN: only one spiffe:// URI SAN is signed")]
    ExtraSan {
        /// The kind of SAN (`DNS`, `IP`, `e-mail`, `URI`).
        kind: &'static str,
    },
    /// The CSR has no URI SAN.
    #[error("CSR has no URI SAN: ask for exactly one spiffe:// id")]
    NoId,
    /// The URI SAN is not a valid SPIFFE id.
    #[error("CSR URI SAN is not a valid SPIFFE id: {0}")]
    BadId(#[from] crate::SpiffeIdError),
    /// The CSR asks for another id than the credential allows.
    #[error("CSR asks for {asked} but the credential is for {allowed}")]
    WrongId {
        /// The id in the CSR.
        asked: String,
        /// The id the token or client certificate is bound to.
        allowed: String,
    },
    /// The CSR asks for a CA certificate.
    #[error("CSR asks for a CA certificate (basicConstraints cA=true); leaves only")]
    CaBit,
    /// The CSR asks for certificate or CRL signing.
    #[error("CSR asks for keyCertSign or cRLSign key usage; leaves only")]
    SigningUsage,
    /// The CSR's key is not one the mesh accepts.
    #[error("CSR key is {0}: only ECDSA P-256, ECDSA P-384 and Ed25519 keys are signed")]
    WeakKey(String),
    /// The requested lifetime is longer than the CA grants.
    #[error("requested lifetime {asked_secs}s is longer than the CA's maximum {max_secs}s")]
    TooLong {
        /// Seconds asked.
        asked_secs: u64,
        /// Seconds the CA grants at most.
        max_secs: u64,
    },
}

/// A CSR that asks for exactly one SPIFFE id and nothing a leaf may not have. Only its public
/// key and id are used for signing.
#[derive(Debug)]
pub struct CheckedCsr {
    id: SpiffeId,
    public_key: PublicKey,
}

impl CheckedCsr {
    /// The id asked for.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The key to certify.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }
}

/// Checks a PEM CSR against the credential's id `allowed` (the token's binding, or the id of
/// the client certificate of a renewal).
pub fn check_csr(csr_pem: &str, allowed: &SpiffeId) -> Result<CheckedCsr, CsrError> {
    check_key_der(csr_pem)?;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    check_key(&csr.public_key)?;
    if let IsCa::Ca(_) = csr.params.is_ca {
        return Err(CsrError::CaBit);
    }
    let signing = [
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    if csr.params.key_usages.iter().any(|u| signing.contains(u)) {
        return Err(CsrError::SigningUsage);
    }
    let id = single_uri(&csr.params.subject_alt_names)?;
    if &id != allowed {
        return Err(CsrError::WrongId {
            asked: id.to_string(),
            allowed: allowed.to_string(),
        });
    }
    Ok(CheckedCsr {
        id,
        public_key: csr.public_key,
    })
}

fn single_uri(sans: &[SanType]) -> Result<SpiffeId, CsrError> {
    let mut id = None;
    for san in sans {
        let kind = match san {
            SanType::URI(u) if id.is_none() => {
                id = Some(SpiffeId::parse(u.as_str())?);
                continue;
            }
            SanType::URI(_) => "second URI",
            SanType::DnsName(_) => "DNS",
            SanType::IpAddress(_) => "IP",
            SanType::Rfc822Name(_) => "e-mail",
            _ => "other",
        };
        return Err(CsrError::ExtraSan { kind });
    }
    id.ok_or(CsrError::NoId)
}

/// Looks at the CSR's key type before anything else parses it, so a key rcgen cannot handle
/// (RSA, DSA, other curves) is named as such rather than reported as a parse failure.
fn check_key_der(csr_pem: &str) -> Result<(), CsrError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey as Spki;
    let block = ::pem::parse(csr_pem).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(block.contents())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed() {
        Ok(Spki::EC(ec)) if matches!(ec.key_size(), 256 | 384) => Ok(()),
        Ok(Spki::EC(ec)) => Err(CsrError::WeakKey(format!("EC {} bits", ec.key_size()))),
        Ok(Spki::RSA(rsa)) => Err(CsrError::WeakKey(format!("RSA {} bits", rsa.key_size()))),
        Ok(Spki::DSA(_)) => Err(CsrError::WeakKey("DSA".into())),
        Ok(_) if spki.algorithm.algorithm == x509_parser::oid_registry::OID_SIG_ED25519 => Ok(()),
        Ok(_) | Err(_) => Err(CsrError::WeakKey(spki.algorithm.algorithm.to_id_string())),
    }
}

fn check_key(key: &PublicKey) -> Result<(), CsrError> {
    let alg = key.algorithm();
    let ok = [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ];
    if ok.contains(&alg) {
        return Ok(());
    }
    Err(CsrError::WeakKey(format!("{alg:?}")))
}

/// The lifetime to grant: what was asked (or `default`), refused above `max`.
pub fn grant_ttl(
    asked: Option<Duration>,
    default: Duration,
    max: Duration,
) -> Result<Duration, CsrError> {
    match asked {
        Some(t) if t > max => Err(CsrError::TooLong {
            asked_secs: t.as_secs(),
            max_secs: max.as_secs(),
        }),
        Some(t) if !t.is_zero() => Ok(t),
        _ => Ok(default.min(max)),
    }
}

/// A bootstrap token as the workload holds it: `hyt1_` and 64 hex digits (32 random bytes).
/// The CA stores only its SHA-256 ([`BootstrapToken::hash`]).
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken(String);

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret; the hash prefix is enough to tell tokens apart.
        write!(f, "BootstrapToken({}…)", &self.hash()[..12])
    }
}

/// Why a text is not a bootstrap token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a bootstrap token: expected '{TOKEN_PREFIX}' followed by 64 hex digits")]
pub struct TokenFormatError;

impl BootstrapToken {
    /// A new random token.
    pub fn generate() -> Self {
        let bytes: [u8; TOKEN_BYTES] = rand::random();
        BootstrapToken(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
    }

    /// Parses a token (surrounding whitespace, such as a file's final newline, is ignored).
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let t = text.trim();
        let digits = t.strip_prefix(TOKEN_PREFIX).ok_or(TokenFormatError)?;
        if digits.len() != TOKEN_BYTES * 2 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenFormatError);
        }
        Ok(BootstrapToken(t.to_ascii_lowercase().replacen(
            "hyt1_",
            TOKEN_PREFIX,
            1,
        )))
    }

    /// The secret text, to hand to the workload.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token, lowercase hex: the only form the CA stores and the key it is
    /// stored under.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.0.as_bytes()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the CA stores about a token: the id it is bound to, its expiry and remaining uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRecord {
    /// The one SPIFFE id this token may enroll.
    pub id: SpiffeId,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Enrollments left.
    pub uses_left: u32,
}

/// Why a token does not admit a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token with this hash is stored (wrong, or deleted).
    #[error("unknown bootstrap token")]
    Unknown,
    /// The token is past its expiry.
    #[error("bootstrap token for {id} expired {ago_secs}s ago; create a new one")]
    Expired {
        /// The id it was bound to.
        id: String,
        /// Seconds since expiry.
        ago_secs: u64,
    },
    /// Every use of the token is spent.
    #[error("bootstrap token for {id} is used up; create a new one")]
    UsedUp {
        /// The id it was bound to.
        id: String,
    },
}

impl TokenRecord {
    /// A record for a token bound to `id`, valid for `ttl` from `now`, for `uses` enrollments.
    pub fn new(id: SpiffeId, now: SystemTime, ttl: Duration, uses: u32) -> Self {
        TokenRecord {
            id,
            expires_at: unix(now + ttl),
            uses_left: uses,
        }
    }

    /// Whether the token admits one more enrollment at `now`.
    pub fn admit(&self, now: SystemTime) -> Result<(), TokenError> {
        let now = unix(now);
        if now >= self.expires_at {
            return Err(TokenError::Expired {
                id: self.id.to_string(),
                ago_secs: now - self.expires_at,
            });
        }
        if self.uses_left == 0 {
            return Err(TokenError::UsedUp {
                id: self.id.to_string(),
            });
        }
        Ok(())
    }

    /// The record after one use.
    pub fn spent(&self) -> TokenRecord {
        TokenRecord {
            uses_left: self.uses_left.saturating_sub(1),
            ..self.clone()
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MeshCa, TrustDomain};
    use rcgen::{CertificateParams, KeyPair};

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://mesh.test/ns/default/sa/{sa}")).unwrap()
    }

    fn csr(params: CertificateParams, key: &KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn params_for(uri: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p
    }

    #[test]
    fn a_good_csr_is_checked_and_signed() {
        let (_key, pem) = crate::workload::generate_csr(&id("a")).unwrap();
        let checked = check_csr(&pem, &id("a")).unwrap();
        let ca = MeshCa::create(&TrustDomain::new("mesh.test").unwrap()).unwrap();
        let chain = ca.sign_checked(&checked, Duration::from_secs(10)).unwrap();
        assert_eq!(crate::pem::certs(&chain).unwrap().len(), 1);
    }

    #[test]
    fn csrs_asking_for_more_than_their_credential_are_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (_k, other) = crate::workload::generate_csr(&id("b")).unwrap();
        assert!(matches!(
            check_csr(&other, &id("a")),
            Err(CsrError::WrongId { .. })
        ));
        let mut extra = params_for(id("a").as_str());
        extra
            .subject_alt_names
            .push(SanType::DnsName("evil.example".try_into().unwrap()));
        assert_eq!(
            check_csr(&csr(extra, &key), &id("a")).unwrap_err(),
            CsrError::ExtraSan { kind: "DNS" }
        );
        let mut ca_bit = params_for(id("a").as_str());
        ca_bit.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        assert_eq!(
            check_csr(&csr(ca_bit, &key), &id("a")).unwrap_err(),
            CsrError::CaBit
        );
        let none = CertificateParams::default();
        assert_eq!(
            check_csr(&csr(none, &key), &id("a")).unwrap_err(),
            CsrError::NoId
        );
        assert!(matches!(
            check_csr("garbage", &id("a")),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn an_rsa_key_is_refused_as_weak() {
        // rcgen's ring backend cannot make RSA keys: openssl makes the CSR.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rsa.csr");
        let status = std::process::Command::new("openssl")
            .args(["req", "-new", "-newkey", "rsa:1024", "-nodes", "-keyout"])
            .arg(dir.path().join("rsa.key"))
            .args(["-subj", "/CN=x", "-addext"])
            .arg(format!("subjectAltName=URI:{}", id("a")))
            .arg("-out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let pem = std::fs::read_to_string(out).unwrap();
        assert!(matches!(
            check_csr(&pem, &id("a")),
            Err(CsrError::WeakKey(_))
        ));
    }

    #[test]
    fn lifetimes_are_granted_up_to_the_maximum() {
        let (d, m) = (Duration::from_secs(86_400), Duration::from_secs(86_400));
        assert_eq!(grant_ttl(None, d, m), Ok(d));
        assert_eq!(
            grant_ttl(Some(Duration::from_secs(10)), d, m),
            Ok(Duration::from_secs(10))
        );
        assert!(matches!(
            grant_ttl(Some(Duration::from_secs(90_000)), d, m),
            Err(CsrError::TooLong { .. })
        ));
    }

    #[test]
    fn tokens_parse_hash_and_expire() {
        let t = BootstrapToken::generate();
        assert_eq!(
            BootstrapToken::parse(&format!("{}\n", t.secret())),
            Ok(t.clone())
        );
        assert_eq!(t.hash().len(), 64);
        assert!(!format!("{t:?}").contains(&t.secret()[5..]));
        assert!(BootstrapToken::parse("hyt1_abc").is_err());
        assert!(BootstrapToken::parse("").is_err());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let rec = TokenRecord::new(id("a"), now, Duration::from_secs(3600), 1);
        assert_eq!(rec.admit(now), Ok(()));
        assert!(matches!(
            rec.admit(now + Duration::from_secs(3600)),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            rec.spent().admit(now),
            Err(TokenError::UsedUp { .. })
        ));
    }
}
