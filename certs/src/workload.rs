//! The workload side: a key and CSR made locally, and the current leaf held in a resolver that
//! can be swapped while connections are open.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::SpiffeId;
use crate::{pem, svid, tls, CertError};

/// Makes a fresh ECDSA P-256 key and a CSR asking for `id`. The key stays with the caller.
pub fn generate_csr(id: &SpiffeId) -> Result<(KeyPair, String), CertError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// A workload's certificate chain and key, checked against the X.509-SVID rules.
#[derive(Clone)]
pub struct WorkloadIdentity {
    id: SpiffeId,
    certified: Arc<CertifiedKey>,
    /// The key as PKCS#8 DER, for the SPIFFE Workload API (`x509_svid_key`). Never printed.
    pkcs8_key: Arc<[u8]>,
    serial: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    /// Builds an identity from a PEM chain (leaf first) and a PEM PKCS#8 key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let chain = pem::certs(cert_pem)?;
        let key = pem::key(key_pem)?;
        let pkcs8_key: Arc<[u8]> = key.secret_der().into();
        let id = svid::check_leaf(&chain[0])?;
        let (serial, not_before, not_after) = validity(&chain[0])?;
        let provider = tls::provider();
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch,
            e => CertError::Tls(e),
        })?;
        Ok(WorkloadIdentity {
            id,
            certified: Arc::new(certified),
            pkcs8_key,
            serial,
            not_before,
            not_after,
        })
    }

    /// Reads `cert` and `key` files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CertError> {
        let cert_pem = pem::read(cert)?;
        let key_pem = pem::read(key)?;
        Self::from_pem(&cert_pem, &key_pem).map_err(|e| e.in_file(cert))
    }

    /// The SPIFFE id of the leaf.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate chain, DER, leaf first, then the intermediates that issued it.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The private key as unencrypted PKCS#8 DER (RFC 5208), the form the SPIFFE Workload API
    /// hands to workloads (`X509SVID.x509_svid_key`). Keep it out of logs.
    pub fn pkcs8_key(&self) -> &[u8] {
        &self.pkcs8_key
    }

    /// The leaf's serial number, big-endian bytes.
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Seconds until the leaf expires (negative once expired), for the expiry gauge.
    pub fn seconds_to_expiry(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }
}

fn validity(der: &CertificateDer<'_>) -> Result<(Vec<u8>, SystemTime, SystemTime), CertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| svid::SvidError::Malformed(e.to_string()))?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok((
        cert.raw_serial().to_vec(),
        to_system(cert.validity().not_before),
        to_system(cert.validity().not_after),
    ))
}

/// Serves the current leaf to rustls on both sides of a handshake. [`CertResolver::swap`]
/// replaces it: handshakes that start afterwards use the new leaf, and connections already
/// established keep the keys they negotiated.
pub struct CertResolver {
    current: RwLock<WorkloadIdentity>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("current", &self.current().id)
            .finish()
    }
}

impl CertResolver {
    /// A resolver serving `identity`.
    pub fn new(identity: WorkloadIdentity) -> Arc<Self> {
        Arc::new(CertResolver {
            current: RwLock::new(identity),
        })
    }

    /// The identity in use now.
    pub fn current(&self) -> WorkloadIdentity {
        // A poisoned lock only means a writer panicked mid-swap of a plain value: the value is
        // still a complete identity, so keep serving it.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the leaf. The new one must name the same SPIFFE id.
    pub fn swap(&self, identity: WorkloadIdentity) -> Result<(), CertError> {
        let mut guard = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if guard.id != identity.id {
            return Err(CertError::IdChanged {
                old: guard.id.to_string(),
                new: identity.id.to_string(),
            });
        }
        *guard = identity;
        Ok(())
    }

    fn certified(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.certified.clone(),
            Err(p) => p.into_inner().certified.clone(),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
