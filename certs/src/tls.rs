//! rustls configurations for sidecar-to-sidecar mTLS: TLS 1.3 only, client certificates
//! mandatory, SPIFFE verifiers on both sides, no session resumption (every connection proves
//! its identity afresh), and no plaintext fallback.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{NoServerSessionStorage, ResolvesServerCert};
use rustls::{ClientConfig, ServerConfig};

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError};
pub use crate::verify::ExpectedServer;
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use crate::{CertError, CertResolver, TrustBundle};

/// The crypto provider used throughout the mesh (ring), with TLS 1.3's AES-128-GCM-SHA256
/// suite (RFC 8446 §B.4) preferred: its key schedule's HKDF runs on SHA-256, which x86-64
/// and ARMv8 compute in hardware where SHA-384 runs in software, and its record protection
/// does 10 AES rounds instead of 14. ring's default order prefers AES-256-GCM-SHA384.
pub fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// A server configuration presenting the resolver's leaf and requiring a client certificate
/// from the resolver's trust domain.
pub fn server_config(
    resolver: Arc<CertResolver>,
    bundle: Arc<TrustBundle>,
) -> Result<ServerConfig, CertError> {
    let trust_domain = resolver.current().id().trust_domain();
    server_config_with(resolver, trust_domain, bundle)
}

/// [`server_config`] with any certificate resolver and an explicit trust domain.
pub fn server_config_with(
    resolver: Arc<dyn ResolvesServerCert>,
    trust_domain: TrustDomain,
    bundle: Arc<TrustBundle>,
) -> Result<ServerConfig, CertError> {
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle, trust_domain));
    tls13_server(verifier, resolver)
}

/// TLS 1.3 only, clients checked by `verifier`, no session resumption (every handshake proves
/// the peer's current certificate).
fn tls13_server(
    verifier: Arc<SpiffeClientVerifier>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, CertError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The CA server's configuration: TLS 1.3, its own leaf from `resolver`, and a client
/// certificate optional (enrollment has none) but verified in full when presented (renewal).
pub fn ca_server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    trust_domain: TrustDomain,
    bundle: Arc<TrustBundle>,
) -> Result<ServerConfig, CertError> {
    let verifier = Arc::new(SpiffeClientVerifier::optional(bundle, trust_domain));
    let mut config = tls13_server(verifier, resolver)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client that presents no certificate (enrollment: the credential is a token) and accepts
/// only `expected` as the server.
pub fn anonymous_client_config(
    bundle: Arc<TrustBundle>,
    expected: ExpectedServer,
) -> Result<ClientConfig, CertError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(bundle, expected));
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A client configuration presenting the resolver's leaf and accepting only `expected`.
pub fn client_config(
    resolver: Arc<CertResolver>,
    bundle: Arc<TrustBundle>,
    expected: ExpectedServer,
) -> Result<ClientConfig, CertError> {
    client_config_with(resolver, bundle, expected)
}

/// [`client_config`] with any certificate resolver.
pub fn client_config_with(
    resolver: Arc<dyn ResolvesClientCert>,
    bundle: Arc<TrustBundle>,
    expected: ExpectedServer,
) -> Result<ClientConfig, CertError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(bundle, expected));
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The SPIFFE id of a peer whose certificate chain a verifier above has already accepted.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, SvidError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(SvidError::NoUriSan)?;
    svid::leaf_id(leaf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_sha256_is_preferred_and_the_others_stay() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let default = rustls::crypto::ring::default_provider().cipher_suites.len();
        assert_eq!(suites.len(), default, "{suites:?}");
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
    }
}
