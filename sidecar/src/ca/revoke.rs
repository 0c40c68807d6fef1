//! Revocation in the data plane: the registry's deny list (`revocations`) is copied into the
//! [`DenyList`] the TLS verifiers consult at every handshake, on both sides; outbound
//! connections to a revoked peer are closed at once, and inbound ones through the transport's
//! `Handler::peer_revoked`.

use std::sync::Arc;

use halyard_certs::revocation::{DenyList, Revoked};
use halyard_certs::SpiffeId;
use halyard_registry::Snapshot;
use tokio::sync::watch;

/// What a snapshot revokes.
pub fn revoked(snapshot: &Snapshot) -> Revoked {
    snapshot
        .revocations
        .as_ref()
        .map(|r| Revoked {
            ids: r.ids.clone(),
            serials: r.serials.clone(),
        })
        .unwrap_or_default()
}

/// Completes once a snapshot revokes `id` or the leaf's `serial` (big-endian bytes); never
/// while the snapshots keep them.
pub(crate) async fn until_revoked(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    id: SpiffeId,
    serial: Vec<u8>,
) {
    loop {
        let hit = revoked(&rx.borrow_and_update()).refuses(&id, &serial);
        if hit {
            return;
        }
        if rx.changed().await.is_err() {
            // No more snapshots (shutting down): the connection ends with the server.
            return std::future::pending().await;
        }
    }
}

/// Applies every new snapshot's deny list to `deny`, and calls `close_revoked` with it when it
/// changed, until the snapshots end.
pub(crate) async fn follow(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    deny: Arc<DenyList>,
    close_revoked: impl Fn(&Revoked) + Send,
) {
    let mut last = Revoked::default();
    loop {
        let now = revoked(&rx.borrow_and_update());
        if now != last {
            tracing::info!(
                ids = now.ids.len(),
                serials = now.serials.len(),
                "deny list in force"
            );
            deny.set(now.clone());
            close_revoked(&now);
            last = now;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
