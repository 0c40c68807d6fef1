//! Helpers for tests across the workspace (feature `test-util`): a CA with identities in one
//! call, and leaves with any property, good or bad, for negative tests.
// Test helpers: a setup failure should stop the test at once, so panicking is the right answer.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use time::OffsetDateTime;

use crate::{pem, tls, CertResolver, MeshCa, SpiffeId, TrustBundle, TrustDomain, WorkloadIdentity};

/// A CA and its bundle, for tests.
pub struct TestPki {
    /// The CA.
    pub ca: MeshCa,
    /// A bundle with its root.
    pub bundle: Arc<TrustBundle>,
}

impl TestPki {
    /// A new CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let td = TrustDomain::new(trust_domain).expect("test trust domain");
        let ca = MeshCa::create(&td).expect("create test CA");
        let bundle = Arc::new(ca.bundle().expect("test bundle"));
        TestPki { ca, bundle }
    }

    /// The id `spiffe://<td>/ns/default/sa/<account>`.
    pub fn id(&self, account: &str) -> SpiffeId {
        SpiffeId::workload(self.ca.trust_domain(), "default", account).expect("test id")
    }

    /// A good identity for `account`, issued through the CSR flow.
    pub fn identity(&self, account: &str) -> WorkloadIdentity {
        let leaf = self
            .ca
            .issue(&self.id(account), Duration::from_secs(3600))
            .expect("issue");
        WorkloadIdentity::from_pem(&leaf.cert_pem, &leaf.key_pem).expect("identity")
    }

    /// A resolver serving a good identity for `account`.
    pub fn resolver(&self, account: &str) -> Arc<CertResolver> {
        CertResolver::new(self.identity(account))
    }

    /// Signs a leaf built from `spec`, whatever rules it breaks.
    pub fn raw_leaf(&self, spec: &LeafSpec) -> Arc<RawResolver> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = self.ca.sign_raw(&spec.params(), &key).expect("sign raw");
        let certified = CertifiedKey::from_der(
            vec![cert.der().clone()],
            pem::key(&key.serialize_pem()).expect("key pem"),
            &tls::provider(),
        )
        .expect("certified key");
        Arc::new(RawResolver(Arc::new(certified)))
    }
}

/// Properties of a test leaf. [`LeafSpec::good`] is a valid X.509-SVID; change fields to break it.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Whether the leaf claims to be a CA.
    pub is_ca: bool,
    /// Key usages (empty: no extension).
    pub key_usages: Vec<KeyUsagePurpose>,
    /// Extended key usages (empty: no extension).
    pub ekus: Vec<ExtendedKeyUsagePurpose>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A valid leaf for `uri`, valid for an hour from a minute ago.
    pub fn good(uri: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            uris: vec![uri.to_owned()],
            dns: vec![],
            is_ca: false,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            ekus: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
        }
    }

    fn params(&self) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = self
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().expect("ascii uri")))
            .chain(
                self.dns
                    .iter()
                    .map(|d| SanType::DnsName(d.as_str().try_into().expect("ascii dns"))),
            )
            .collect();
        p.is_ca = if self.is_ca {
            IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = self.key_usages.clone();
        p.extended_key_usages = self.ekus.clone();
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        p.serial_number = Some(crate::ca::random_serial());
        p
    }
}

/// Serves a fixed certified key, valid or not, on both sides of a handshake.
#[derive(Debug)]
pub struct RawResolver(pub Arc<CertifiedKey>);

impl ResolvesServerCert for RawResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for RawResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
