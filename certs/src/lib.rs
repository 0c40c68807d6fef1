//! Mesh identity for Halyard: SPIFFE ids, the mesh CA, workload certificates with hot rotation,
//! trust bundles, and the rustls verifiers that enforce the X.509-SVID rules on both sides.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

pub mod bundle;
pub mod ca;
pub mod enroll;
pub mod pem;
pub mod revocation;
pub mod rotation;
pub mod spiffe;
pub mod svid;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
pub mod verify;
pub mod workload;

pub use bundle::TrustBundle;
pub use ca::MeshCa;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::SvidError;
pub use tls::{client_config, peer_id, server_config, ExpectedServer};
pub use workload::{CertResolver, WorkloadIdentity};

/// Errors of the certs crate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A problem inside a named file.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        source: Box<CertError>,
    },
    /// PEM text did not parse.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// PEM text held no certificate.
    #[error("no CERTIFICATE block found")]
    NoCertificate,
    /// PEM text held no private key.
    #[error("no PRIVATE KEY block found")]
    NoKey,
    /// The trust bundle has no root.
    #[error("trust bundle holds no root certificate")]
    EmptyBundle,
    /// A root cannot serve as a trust anchor.
    #[error("root certificate cannot be used as a trust anchor: {0}")]
    BadRoot(String),
    /// An id is not a valid SPIFFE id.
    #[error(transparent)]
    Id(#[from] SpiffeIdError),
    /// A certificate breaks the X.509-SVID rules.
    #[error(transparent)]
    Svid(#[from] SvidError),
    /// The id belongs to another trust domain than the CA's.
    #[error("id {id} is outside the CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The id asked for.
        id: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// A lifetime is zero or too long.
    #[error("bad certificate lifetime: {0}")]
    Ttl(String),
    /// The CA directory already holds a CA.
    #[error("{0} already holds a CA (ca.crt or ca.key); pass --force to replace it")]
    CaExists(PathBuf),
    /// The CA directory holds no CA.
    #[error("{0} holds no CA (ca.crt and ca.key); run 'halyard ca init' first")]
    NoCa(PathBuf),
    /// A renewed leaf names another workload than the one it replaces.
    #[error("new leaf names {new} but this workload is {old}")]
    IdChanged {
        /// The id in use.
        old: String,
        /// The id of the refused leaf.
        new: String,
    },
    /// The CA key file is readable by others than its owner.
    #[error("{path}: mode {mode:o} lets others read the CA key; run 'chmod 600 {path}'")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key does not match the certificate.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// rcgen refused to build or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the key or configuration.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

impl CertError {
    pub(crate) fn in_file(self, path: &Path) -> CertError {
        match self {
            e @ (CertError::Io { .. } | CertError::InFile { .. }) => e,
            e => CertError::InFile {
                path: path.to_owned(),
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> CertError {
        CertError::Io {
            path: path.to_owned(),
            source,
        }
    }
}
