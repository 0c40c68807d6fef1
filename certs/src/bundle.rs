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
    /// Per root (same order): the trust domain its URI SAN names (`spiffe://<td>`), if any.
    /// A root that names one vouches for that trust domain's ids only (SPIFFE federation:
    /// another cluster's root in this bundle lets its workloads in, and no others).
    domains: Vec<Option<crate::spiffe::TrustDomain>>,
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
        let domains = roots
            .iter()
            .map(|r| crate::ca::root_trust_domain(r))
            .collect();
        Ok(TrustBundle {
            roots,
            anchors,
            domains,
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

    /// The trust domain of the root behind `anchor` (one of [`TrustBundle::anchors`]), if its
    /// certificate names one.
    pub(crate) fn anchor_domain(
        &self,
        anchor: &TrustAnchor<'_>,
    ) -> Option<&crate::spiffe::TrustDomain> {
        let at = self.anchors.iter().position(|a| {
            a.subject == anchor.subject
                && a.subject_public_key_info == anchor.subject_public_key_info
        })?;
        self.domains.get(at)?.as_ref()
    }

    /// The roots by the trust domain they vouch for: those naming one under it, those naming
    /// none under `own` (SPIFFE federation: one bundle per trust domain).
    pub fn roots_by_domain(
        &self,
        own: &crate::spiffe::TrustDomain,
    ) -> std::collections::BTreeMap<crate::spiffe::TrustDomain, Vec<CertificateDer<'static>>> {
        let mut out: std::collections::BTreeMap<_, Vec<_>> = std::collections::BTreeMap::new();
        for (root, td) in self.roots.iter().zip(&self.domains) {
            out.entry(td.clone().unwrap_or_else(|| own.clone()))
                .or_default()
                .push(root.clone());
        }
        out
    }

    /// The trust domains the roots name, once each, in order.
    pub fn trust_domains(&self) -> Vec<crate::spiffe::TrustDomain> {
        let mut out: Vec<crate::spiffe::TrustDomain> = Vec::new();
        for td in self.domains.iter().flatten() {
            if !out.contains(td) {
                out.push(td.clone());
            }
        }
        out
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
        self.domains.extend(other.domains.iter().cloned());
        self
    }
}
