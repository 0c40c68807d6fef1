//! The identity in force: the workload's leaf (chain + key) and the trust bundle, changed in one
//! place and watched by whoever hands them on.
//!
//! Every renewal (the certificate files reloaded, or a leaf from the CA) goes through
//! [`InForce::swap_leaf`], and every new trust bundle (the registry's `trust` object, the CA's
//! answer) through [`InForce::set_bundle`]: the QUIC endpoint and the resolver are updated, then
//! [`InForce::watch`] receivers (the SPIFFE Workload API streams) see the new [`Svid`].

use std::sync::Arc;

use halyard_certs::{CertError, CertResolver, TrustBundle, WorkloadIdentity};
use halyard_transport::{EndpointError, MeshEndpoint};
use tokio::sync::watch;

/// A snapshot of what the sidecar presents and trusts.
#[derive(Debug, Clone)]
pub(crate) struct Svid {
    /// The leaf, its intermediates and its key.
    pub(crate) identity: WorkloadIdentity,
    /// The roots of the mesh's trust domain in force on the endpoint.
    pub(crate) bundle: Arc<TrustBundle>,
}

/// The one writer of the identity in force.
#[derive(Debug)]
pub(crate) struct InForce {
    resolver: Arc<CertResolver>,
    endpoint: MeshEndpoint,
    svid: watch::Sender<Svid>,
    reloads: watch::Sender<u64>,
}

impl InForce {
    /// Starts from what `resolver` serves and `bundle`, which `endpoint` already uses.
    pub(crate) fn new(
        resolver: Arc<CertResolver>,
        endpoint: MeshEndpoint,
        bundle: Arc<TrustBundle>,
    ) -> Arc<Self> {
        let identity = resolver.current();
        Arc::new(InForce {
            resolver,
            endpoint,
            svid: watch::Sender::new(Svid { identity, bundle }),
            reloads: watch::Sender::new(0),
        })
    }

    /// Puts a renewed leaf in use for new handshakes and publishes it. Refused (nothing
    /// changes) when it names another SPIFFE id.
    pub(crate) fn swap_leaf(&self, identity: WorkloadIdentity) -> Result<(), CertError> {
        self.resolver.swap(identity.clone())?;
        self.svid.send_modify(|s| s.identity = identity);
        self.reloads.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Makes `bundle` the roots the endpoint verifies peers with, and publishes it. Refused
    /// (nothing changes) when no TLS config can be built from it.
    pub(crate) fn set_bundle(&self, bundle: Arc<TrustBundle>) -> Result<(), EndpointError> {
        self.endpoint.set_trust_bundle(bundle.clone())?;
        self.svid.send_modify(|s| s.bundle = bundle);
        Ok(())
    }

    /// The resolver handshakes take the leaf from.
    pub(crate) fn resolver(&self) -> &Arc<CertResolver> {
        &self.resolver
    }

    /// The identity in force now, and every change after it.
    pub(crate) fn watch(&self) -> watch::Receiver<Svid> {
        self.svid.subscribe()
    }

    /// Counts leaf swaps.
    pub(crate) fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }
}
