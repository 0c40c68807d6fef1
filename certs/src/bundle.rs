//! The trust bundle: one or more mesh roots, so a CA can rotate without an outage.

use std::path::Path;

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::revocation::DenyList;
use crate::{pem, CertError};

/// A set of trusted mesh roots, and the deny list the verifiers apply on top of them.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    deny: Option<Arc<DenyList>>,
}

impl TrustBundle {
    /// Builds a bundle from DER roots; at least one is needed.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, CertError> {
        if roots.is_empty() {
            return Err(CertError::EmptyBundle);
        }
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| CertError::BadRoot(format!("{e:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle {
            roots,
            anchors,
            deny: None,
        })
    }

    /// The same roots, with `deny` checked by every verifier built from this bundle: a leaf
    /// whose id or serial it lists is refused at the handshake.
    pub fn with_deny_list(mut self, deny: Arc<DenyList>) -> Self {
        self.deny = Some(deny);
        self
    }

    /// The deny list attached, if any.
    pub fn deny_list(&self) -> Option<&Arc<DenyList>> {
        self.deny.as_ref()
    }

    /// Parses every certificate of a PEM text as a root.
    pub fn from_pem(text: &str) -> Result<Self, CertError> {
        Self::new(pem::certs(text)?)
    }

    /// Reads a PEM bundle file.
    pub fn load(path: &Path) -> Result<Self, CertError> {
        Self::from_pem(&pem::read(path)?).map_err(|e| e.in_file(path))
    }

    /// The roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The bundle as PEM.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|r| pem::encode_cert(r)).collect()
    }

    /// One line per root for an operator: subject, expiry (RFC 2822) and the SHA-256 of its
    /// DER, hex, e.g. `CN=mesh.local root  until Fri, 28 Nov 2036 06:00:00 +0000  sha256 3f2a…`.
    pub fn describe(&self) -> Vec<String> {
        use sha2::{Digest, Sha256};
        use x509_parser::prelude::{FromDer, X509Certificate};
        self.roots
            .iter()
            .map(|der| {
                let sha: String = Sha256::digest(der.as_ref())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                match X509Certificate::from_der(der.as_ref()) {
                    Ok((_, c)) => {
                        let until = c
                            .validity()
                            .not_after
                            .to_rfc2822()
                            .unwrap_or_else(|_| c.validity().not_after.to_string());
                        format!("{}  until {until}  sha256 {sha}", c.subject())
                    }
                    Err(_) => format!("(unreadable certificate)  sha256 {sha}"),
                }
            })
            .collect()
    }

    /// Adds the roots of another bundle (for a CA rotation).
    pub fn merge(mut self, other: &TrustBundle) -> Self {
        self.roots.extend(other.roots.iter().cloned());
        self.anchors.extend(other.anchors.iter().cloned());
        self
    }
}
