//! The trust bundle from the registry (key `trust`): every sidecar and CA server trusts what it
//! says, hot. A value that does not validate never gets here (it is quarantined and the last
//! good one stays), so a bundle is never empty.

use std::sync::Arc;

use halyard_certs::revocation::DenyList;
use halyard_certs::TrustBundle;
use halyard_registry::Snapshot;
use tokio::sync::watch;

/// The registry's bundle in a snapshot, if it holds one, with `deny` attached.
pub(crate) fn of(snapshot: &Snapshot, deny: &Arc<DenyList>) -> Option<(String, TrustBundle)> {
    let pem = &snapshot.trust.as_ref()?.roots;
    match TrustBundle::from_pem(pem) {
        Ok(b) => Some((pem.clone(), b.with_deny_list(deny.clone()))),
        Err(e) => {
            // Validated on the way in; only a bug gets here. Keep what is in force.
            tracing::warn!(error = %e, "registry trust bundle unusable; keeping the current one");
            None
        }
    }
}

/// Calls `apply` with every new bundle the snapshots carry, until they end.
pub(crate) async fn follow(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    deny: Arc<DenyList>,
    apply: impl Fn(&str, Arc<TrustBundle>) + Send,
) {
    let mut last: Option<String> = None;
    loop {
        let next = of(&rx.borrow_and_update(), &deny);
        if let Some((pem, bundle)) = next.filter(|(pem, _)| last.as_ref() != Some(pem)) {
            tracing::info!(
                roots = bundle.roots().len(),
                "trust bundle from the registry in force"
            );
            apply(&pem, Arc::new(bundle));
            last = Some(pem);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
