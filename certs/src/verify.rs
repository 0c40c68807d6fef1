//! rustls verifiers for the mesh. rustls checks no URI SAN, so these verify the chain against
//! the trust bundle (rustls-webpki), then the X.509-SVID leaf rules, then the trust domain, and
//! on the client side the exact id expected of the server.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError};
use crate::TrustBundle;

/// Whom a client accepts as the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Exactly this id (the endpoint's registered identity).
    Id(SpiffeId),
    /// Any of these ids.
    AnyOf(Vec<SpiffeId>),
    /// Any workload of this trust domain.
    TrustDomain(TrustDomain),
}

/// A server-side check that failed after the chain verified.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The leaf breaks the X.509-SVID rules.
    #[error("peer certificate is not a valid X.509-SVID: {0}")]
    Svid(#[from] SvidError),
    /// The peer belongs to another trust domain.
    #[error("peer {id} is outside trust domain {expected}")]
    TrustDomain {
        /// The peer's id.
        id: SpiffeId,
        /// The trust domain accepted.
        expected: TrustDomain,
    },
    /// The chain ends in a root of another trust domain than the peer's id: a root vouches
    /// for its own trust domain only.
    #[error("peer {id} chains to a root of trust domain {root}, not its own")]
    RootOfOtherDomain {
        /// The peer's id.
        id: SpiffeId,
        /// The trust domain of the root the chain ends in.
        root: TrustDomain,
    },
    /// The peer is not the workload expected at this address.
    #[error("peer is {id}, expected {expected}")]
    WrongId {
        /// The peer's id.
        id: SpiffeId,
        /// What was expected.
        expected: String,
    },
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let ce = match e {
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        e => return other(WebPkiError(format!("{e:?}"))),
    };
    rustls::Error::InvalidCertificate(ce)
}

#[derive(Debug, thiserror::Error)]
#[error("certificate chain rejected: {0}")]
struct WebPkiError(String);

/// Verifies the chain for `usage`, then the leaf rules, returning the leaf's id.
fn verify_chain(
    bundle: &TrustBundle,
    algs: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(SpiffeId, Option<TrustDomain>), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    let path = cert
        .verify_for_usage(
            algs.all,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
    let root = bundle.anchor_domain(path.anchor()).cloned();
    let id = svid::check_leaf(end_entity).map_err(|e| other(PeerError::Svid(e)))?;
    if let Some(root) = &root {
        if id.trust_domain_str() != root.as_str() {
            return Err(other(PeerError::RootOfOtherDomain {
                id,
                root: root.clone(),
            }));
        }
    }
    if let Some(deny) = bundle.deny_list() {
        let serial = svid::serial(end_entity).map_err(|e| other(PeerError::Svid(e)))?;
        if deny.refuses(&id, &serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
    }
    Ok((id, root))
}

/// Verifies client certificates on the inbound side: chain, leaf rules, trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
    trust_domain: TrustDomain,
    algs: WebPkiSupportedAlgorithms,
    mandatory: bool,
    /// Accept peers of other trust domains whose chain ends in a root of their own domain
    /// (federation); off for the CA server, which serves its own trust domain only.
    federated: bool,
}

impl SpiffeClientVerifier {
    /// A verifier accepting workloads whose chain ends in `bundle`: of `trust_domain`, and of
    /// any other trust domain whose own root (a root naming it, `spiffe://<td>` URI SAN) is in
    /// the bundle — SPIFFE federation, as between clusters with a trust domain each.
    pub fn new(bundle: Arc<TrustBundle>, trust_domain: TrustDomain) -> Self {
        SpiffeClientVerifier {
            bundle,
            trust_domain,
            algs: crate::tls::provider().signature_verification_algorithms,
            mandatory: true,
            federated: true,
        }
    }

    /// Like [`SpiffeClientVerifier::new`], but a client may also connect without a certificate
    /// (the CA server: enrollment comes with a token, renewal with the current leaf). A
    /// certificate that is presented is verified in full.
    pub fn optional(bundle: Arc<TrustBundle>, trust_domain: TrustDomain) -> Self {
        SpiffeClientVerifier {
            mandatory: false,
            federated: false,
            ..Self::new(bundle, trust_domain)
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let usage = webpki::KeyUsage::client_auth();
        let (id, root) = verify_chain(
            &self.bundle,
            &self.algs,
            end_entity,
            intermediates,
            now,
            usage,
        )?;
        // `verify_chain` held the id to its root's trust domain; a root naming none vouches
        // for this verifier's own trust domain only.
        let federated = self.federated && root.is_some();
        if !federated && id.trust_domain_str() != self.trust_domain.as_str() {
            return Err(other(PeerError::TrustDomain {
                id,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies the server's certificate on the outbound side: chain, leaf rules, and the id
/// expected of that endpoint. The TLS server name is ignored: SVIDs carry no DNS name.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: ExpectedServer,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier accepting only `expected`, chained to `bundle`.
    pub fn new(bundle: Arc<TrustBundle>, expected: ExpectedServer) -> Self {
        SpiffeServerVerifier {
            bundle,
            expected,
            algs: crate::tls::provider().signature_verification_algorithms,
        }
    }

    fn check_expected(&self, id: SpiffeId) -> Result<(), PeerError> {
        let ok = match &self.expected {
            ExpectedServer::Id(want) => *want == id,
            ExpectedServer::AnyOf(ids) => ids.contains(&id),
            ExpectedServer::TrustDomain(td) => id.trust_domain_str() == td.as_str(),
        };
        if ok {
            return Ok(());
        }
        let expected = match &self.expected {
            ExpectedServer::Id(want) => want.to_string(),
            ExpectedServer::AnyOf(ids) => format!("one of {ids:?}"),
            ExpectedServer::TrustDomain(td) => format!("an id of trust domain {td}"),
        };
        Err(PeerError::WrongId { id, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let usage = webpki::KeyUsage::server_auth();
        let (id, _root) = verify_chain(
            &self.bundle,
            &self.algs,
            end_entity,
            intermediates,
            now,
            usage,
        )?;
        self.check_expected(id).map_err(other)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
