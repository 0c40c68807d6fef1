//! The mesh CA: a self-signed ECDSA P-256 root, or an intermediate chained to one, that signs
//! workload CSRs into X.509-SVID leaves.
//!
//! Recommended layout: the root stays offline (`halyard ca init`) and signs one intermediate per
//! CA server (`halyard ca intermediate`); a CA server's `ca.crt` then holds the intermediate
//! followed by the root, and the leaves it signs are served with the intermediate behind them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pem::{read, write_atomic};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::{workload, CertError, TrustBundle};

/// Default lifetime of a workload leaf.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime the CA grants a leaf.
pub const MAX_LEAF_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Default lifetime of an intermediate made by [`MeshCa::intermediate`].
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Lifetime of a new root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// How far back a leaf's notBefore is set, to absorb clock skew between machines.
const BACKDATE: Duration = Duration::from_secs(60);

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA key file (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";

/// A mesh certificate authority.
pub struct MeshCa {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    cert_pem: String,
    /// The signing certificate's parents, nearest first, ending with the root; empty for a root.
    parents: Vec<CertificateDer<'static>>,
    key_pem: String,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

/// A signed leaf and, where it was made here, its key.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// The SPIFFE id the leaf carries.
    pub id: SpiffeId,
    /// The leaf, PEM.
    pub cert_pem: String,
    /// The leaf's private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl MeshCa {
    /// Creates a new root for a trust domain.
    pub fn create(trust_domain: &TrustDomain) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = signing_params(trust_domain, "Halyard mesh CA", ROOT_TTL)?;
        let cert = params.self_signed(&key)?;
        Ok(MeshCa {
            trust_domain: trust_domain.clone(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            parents: Vec::new(),
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Creates an intermediate CA signed by this one, valid for `ttl` (capped at this CA's own
    /// expiry), for one CA server: its key is made here, so run this where the server will run
    /// or copy the result over a trusted channel.
    pub fn intermediate(&self, name: &str, ttl: Duration) -> Result<MeshCa, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = signing_params(&self.trust_domain, name, ttl)?;
        params.not_after = params.not_after.min(self.not_after);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut parents = vec![self.cert.clone()];
        parents.extend(self.parents.iter().cloned());
        Ok(MeshCa {
            trust_domain: self.trust_domain.clone(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            parents,
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA from `DIR/ca.crt` and `DIR/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if !cert_path.exists() || !key_path.exists() {
            return Err(CertError::NoCa(dir.to_owned()));
        }
        check_key_mode(&key_path)?;
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        Self::from_pem(&cert_pem, &key_pem).map_err(|e| e.in_file(&cert_path))
    }

    /// Builds the CA from its certificate and key, PEM. `cert_pem` holds the signing certificate
    /// first, then (for an intermediate) its parents up to the root.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let mut certs = crate::pem::certs(cert_pem)?;
        let parents = certs.split_off(1);
        let cert = certs.swap_remove(0);
        let key = KeyPair::from_pem(key_pem)?;
        let (_, parsed) =
            X509Certificate::from_der(&cert).map_err(|e| CertError::Pem(e.to_string()))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CertError::KeyMismatch);
        }
        let trust_domain = ca_trust_domain(&parsed)?;
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(MeshCa {
            trust_domain,
            cert_pem: crate::pem::encode_cert(&cert),
            cert,
            parents,
            key_pem: key_pem.to_owned(),
            not_after,
            issuer,
        })
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, refusing to replace a CA unless
    /// `force`.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(), CertError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if !force && (cert_path.exists() || key_path.exists()) {
            return Err(CertError::CaExists(dir.to_owned()));
        }
        std::fs::create_dir_all(dir).map_err(|e| CertError::io(dir, e))?;
        write_atomic(&key_path, &self.key_pem, 0o600)?;
        write_atomic(&cert_path, &self.full_chain_pem(), 0o644)
    }

    /// The signing certificate followed by its parents up to the root, PEM (`ca.crt`).
    pub fn full_chain_pem(&self) -> String {
        let mut out = self.cert_pem.clone();
        out.extend(self.parents.iter().map(|c| crate::pem::encode_cert(c)));
        out
    }

    /// The certificates a leaf is served with behind it: the signing certificate and its parents
    /// except the root (which peers hold in their bundle). Empty when this CA is the root.
    pub fn leaf_chain(&self) -> Vec<CertificateDer<'static>> {
        match self.parents.split_last() {
            None => Vec::new(),
            Some((_root, between)) => std::iter::once(self.cert.clone())
                .chain(between.iter().cloned())
                .collect(),
        }
    }

    /// The root this CA chains to (itself when it is the root), PEM.
    pub fn root_pem(&self) -> String {
        crate::pem::encode_cert(self.root_der())
    }

    fn root_der(&self) -> &CertificateDer<'static> {
        self.parents.last().unwrap_or(&self.cert)
    }

    /// When this CA's signing certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The CA's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The signing certificate (the root, or this server's intermediate), DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The signing certificate, PEM. For a root CA this is the trust bundle; for an intermediate
    /// use [`MeshCa::root_pem`].
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A trust bundle holding the root this CA chains to.
    pub fn bundle(&self) -> Result<TrustBundle, CertError> {
        TrustBundle::new(vec![self.root_der().clone()])
    }

    /// Signs a CSR (PEM) into an X.509-SVID leaf for the one SPIFFE id it asks for.
    ///
    /// Only the requested URI SAN is taken from the CSR; every other property of the leaf is
    /// the CA's decision.
    pub fn sign_csr(&self, csr_pem: &str, ttl: Duration) -> Result<(SpiffeId, String), CertError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let id = match uris.as_slice() {
            [one] => SpiffeId::parse(one)?,
            [] => return Err(crate::SvidError::NoUriSan.into()),
            many => return Err(crate::SvidError::ManyUriSans(many.len()).into()),
        };
        self.check_id(&id)?;
        let params = self.leaf_params(&id, ttl)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok((id, self.with_chain(cert.pem())))
    }

    /// Signs a CSR that has passed [`crate::enroll::check_csr`] for `id`: the leaf is built from
    /// the CA's own rules and the CSR's public key only.
    pub fn sign_checked(
        &self,
        csr: &crate::enroll::CheckedCsr,
        ttl: Duration,
    ) -> Result<String, CertError> {
        self.check_id(csr.id())?;
        let params = self.leaf_params(csr.id(), ttl)?;
        let cert = params.signed_by(csr.public_key(), &self.issuer)?;
        Ok(self.with_chain(cert.pem()))
    }

    fn with_chain(&self, mut leaf_pem: String) -> String {
        leaf_pem.extend(self.leaf_chain().iter().map(|c| crate::pem::encode_cert(c)));
        leaf_pem
    }

    /// Makes a key here, asks for a leaf with a CSR, and signs it: for `halyard ca issue` and the
    /// demo, where the CA and the workload share a machine.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedLeaf, CertError> {
        let (key, csr_pem) = workload::generate_csr(id)?;
        let (id, cert_pem) = self.sign_csr(&csr_pem, ttl)?;
        Ok(IssuedLeaf {
            id,
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs arbitrary leaf parameters, bypassing every rule: for tests that need bad leaves.
    #[cfg(any(test, feature = "test-util"))]
    pub fn sign_raw(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<rcgen::Certificate, CertError> {
        Ok(params.signed_by(key, &self.issuer)?)
    }

    fn check_id(&self, id: &SpiffeId) -> Result<(), CertError> {
        if id.trust_domain_str() != self.trust_domain.as_str() {
            return Err(CertError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        Ok(())
    }

    fn leaf_params(&self, id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CertError> {
        if ttl.is_zero() || ttl > MAX_LEAF_TTL {
            return Err(CertError::Ttl(format!(
                "{}s is outside 1s..={}s",
                ttl.as_secs(),
                MAX_LEAF_TTL.as_secs()
            )));
        }
        let now = OffsetDateTime::now_utc();
        let not_after = now + ttl;
        if not_after > self.not_after {
            return Err(CertError::Ttl("the leaf would outlive the CA".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // A short leaf is backdated less, so that half of its validity still lies ahead of
        // its renewal timer (a 10 s leaf backdated 60 s would be due at once).
        params.not_before = now - BACKDATE.min(ttl / 4);
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// Refuses a CA key file that group or others may read or write.
fn check_key_mode(path: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| CertError::io(path, e))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(CertError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Parameters of a signing certificate (root or intermediate) for `trust_domain`.
fn signing_params(
    trust_domain: &TrustDomain,
    name: &str,
    ttl: Duration,
) -> Result<CertificateParams, CertError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} {trust_domain}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Halyard");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // SPIFFE: a signing certificate may carry the trust domain's id (no path) as its URI SAN.
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}").as_str().try_into()?,
    )];
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A random positive 128-bit serial.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// The trust domain a root certificate (DER) names in its URI SAN, if it names one.
pub(crate) fn root_trust_domain(der: &[u8]) -> Option<TrustDomain> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    ca_trust_domain(&cert).ok()
}

fn ca_trust_domain(cert: &X509Certificate<'_>) -> Result<TrustDomain, CertError> {
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or(crate::SvidError::NoUriSan)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(u) = name {
            if let Some(td) = u.strip_prefix("spiffe://") {
                return Ok(TrustDomain::new(td.trim_end_matches('/'))?);
            }
        }
    }
    Err(crate::SvidError::NoUriSan.into())
}

/// Paths of the three files a workload identity is written as.
pub fn identity_paths(out: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        out.join("cert.pem"),
        out.join("key.pem"),
        out.join("bundle.pem"),
    )
}

/// Writes `cert.pem`, `key.pem` (0600) and `bundle.pem` into `out`.
pub fn write_identity(out: &Path, leaf: &IssuedLeaf, bundle_pem: &str) -> Result<(), CertError> {
    std::fs::create_dir_all(out).map_err(|e| CertError::io(out, e))?;
    let (cert, key, bundle) = identity_paths(out);
    write_atomic(&key, &leaf.key_pem, 0o600)?;
    write_atomic(&cert, &leaf.cert_pem, 0o644)?;
    write_atomic(&bundle, bundle_pem, 0o644)
}
