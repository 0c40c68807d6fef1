//! Mesh identity as a service: the CA server (`halyard ca serve`), its client in each sidecar,
//! and the sidecar's enrollment and renewal loop.
//!
//! The protocol is JSON over HTTP/1.1 over TLS 1.3 (default port 15012/tcp). The CA presents a
//! leaf for `spiffe://<trust-domain>/halyard/ca` issued by itself; clients verify it against
//! their trust bundle like any mesh peer.
//!
//! ```text
//! POST /v1/enroll   Authorization: Bearer hyt1_…   {"csr": PEM, "ttlSeconds": N?}
//! POST /v1/renew    client certificate = current leaf {"csr": PEM, "ttlSeconds": N?}
//!   200 {"chain": PEM leaf + intermediates, "bundle": PEM roots}
//!   400 bad CSR or lifetime · 401 bad, expired or used-up token, or no client certificate
//!   403 CSR for another id than the credential · 503 registry unreachable
//!   every error: {"error": "one line saying what is wrong"}
//! GET  /v1/bundle   the trust bundle, PEM
//! ```

use serde::{Deserialize, Serialize};

pub mod client;
pub(crate) mod renew;
pub mod revoke;
pub mod server;
pub(crate) mod trust;

/// Default CA server port (TCP). Chosen clear of the sidecar's 15000, 15001 and 15443.
pub const DEFAULT_CA_PORT: u16 = 15012;

/// Path of the id the CA server presents, under the trust domain.
pub const CA_ID_PATH: &str = "/halyard/ca";

/// A signing request, for enrollment or renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    /// PKCS#10 CSR, PEM.
    pub csr: String,
    /// Lifetime asked for, seconds; the CA's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// The CA's answer to a good request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    /// The leaf followed by the intermediates, PEM.
    pub chain: String,
    /// The roots to trust, PEM.
    pub bundle: String,
}

/// The CA's answer to a refused request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    /// What is wrong, one line.
    pub error: String,
}

/// The id the CA of `trust_domain` presents.
pub fn ca_id(
    trust_domain: &halyard_certs::TrustDomain,
) -> Result<halyard_certs::SpiffeId, halyard_certs::SpiffeIdError> {
    halyard_certs::SpiffeId::parse(&format!("spiffe://{trust_domain}{CA_ID_PATH}"))
}
