//! The X.509-SVID leaf rules (SPIFFE X509-SVID §4, §5.2), checked on top of chain validation.

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a leaf certificate is not an acceptable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate.
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    /// The leaf has no URI SAN, so it names no workload.
    #[error("leaf has no URI SAN: an X.509-SVID carries exactly one spiffe:// URI")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf has {0} URI SANs: an X.509-SVID carries exactly one")]
    ManyUriSans(usize),
    /// The URI SAN is not a valid SPIFFE id.
    #[error("leaf URI SAN is not a valid SPIFFE id: {0}")]
    BadId(#[from] SpiffeIdError),
    /// The leaf says it is a CA.
    #[error("leaf is a CA certificate (basicConstraints cA=true)")]
    CaLeaf,
    /// The leaf lacks a critical key usage extension with digitalSignature.
    #[error("leaf key usage must be critical and include digitalSignature")]
    KeyUsage,
    /// The leaf may sign certificates or CRLs.
    #[error("leaf key usage includes keyCertSign or cRLSign")]
    SigningLeaf,
    /// The leaf's extended key usage lacks serverAuth or clientAuth.
    #[error("leaf extended key usage must include serverAuth and clientAuth")]
    ExtendedKeyUsage,
}

/// Checks the leaf rules and returns the SPIFFE id the leaf names.
pub fn check_leaf(der: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let id = single_uri_san(&cert)?;
    let mut key_usage_ok = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(SvidError::CaLeaf),
            ParsedExtension::KeyUsage(ku) => {
                if ku.key_cert_sign() || ku.crl_sign() {
                    return Err(SvidError::SigningLeaf);
                }
                key_usage_ok = ext.critical && ku.digital_signature();
            }
            ParsedExtension::ExtendedKeyUsage(eku) if !(eku.server_auth && eku.client_auth) => {
                return Err(SvidError::ExtendedKeyUsage)
            }
            _ => {}
        }
    }
    if !key_usage_ok {
        return Err(SvidError::KeyUsage);
    }
    Ok(id)
}

/// The SPIFFE id in the leaf's only URI SAN, without the other leaf rules (for an already verified
/// peer certificate).
pub fn leaf_id(der: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    single_uri_san(&cert)
}

/// The leaf's serial number, big-endian bytes.
pub fn serial(der: &CertificateDer<'_>) -> Result<Vec<u8>, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

fn single_uri_san(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(e.to_string()))?
        .ok_or(SvidError::NoUriSan)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next().ok_or(SvidError::NoUriSan)?;
    let more = uris.count();
    if more > 0 {
        return Err(SvidError::ManyUriSans(more + 1));
    }
    Ok(SpiffeId::parse(first)?)
}
