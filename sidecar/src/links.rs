//! Endpoints of other clusters: for every `ClusterLink` of this cluster's registry, the sidecar
//! reads the linked cluster's registry (read-only: it never writes there) and adds the
//! endpoints of that cluster's exported services to the snapshot its data plane uses, with
//! `cluster` set to the link's cluster and `gateway` to the link's east-west gateway.
//!
//! The linked registry is opened with the same code as the sidecar's own (`halyard_registry`):
//! re-list on compaction, never a revision at or below the last applied, quarantine of bad
//! values (a bad remote value keeps its last good one). When the link dies its endpoints stay
//! (last known good; `halyard_cluster_link_stale_seconds` rises) until the link's `keepStale`
//! has passed, then they are dropped (`halyard_cluster_link_endpoints` 0) and come back with
//! the link. A local Service wins over a linked cluster's of the same name; a Service that
//! exists only in a linked cluster is added, so callers here can name it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use halyard_registry::model::{ClusterLink, Endpoint};
use halyard_registry::{Registry, Snapshot};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics::Metrics;

/// How often staleness is checked against `keepStale` when nothing else changes.
const AGE_CHECK: Duration = Duration::from_secs(1);

/// What a merge read: the local snapshot (by address) and, per link, its cluster, the remote
/// revision and whether it had aged out.
type MergeInputs = (usize, Vec<(String, i64, bool)>);

/// One open link.
struct Remote {
    /// The link as it is now: its gateway and `keepStale` apply to the endpoints served.
    link: Arc<ClusterLink>,
    /// The link as the registry was opened for (registry URL, mesh, credentials name).
    opened_for: Arc<ClusterLink>,
    /// Since when the link names another registry, mesh or credentials than this one was
    /// opened for: the old registry's endpoints stand in (make before break) while the new
    /// one opens, reported stale since the edit and dropped after the link's `keepStale`.
    stand_in_since: Option<tokio::time::Instant>,
    /// The user and TLS files it was opened with: when the files change, it is opened again.
    access: halyard_registry::Access,
    registry: Arc<dyn Registry>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Wakes the merge loop on each of its snapshots; stopped with the link.
    _waker: tokio_util::task::AbortOnDropHandle<()>,
}

/// The endpoints `link` contributes from `remote`: every endpoint of an exported service that
/// its cluster reaches directly, renamed `<cluster>.<id>`, with the link's cluster and gateway.
pub(crate) fn linked_endpoints(link: &ClusterLink, remote: &Snapshot) -> Vec<Endpoint> {
    let cluster = link.cluster.to_string();
    let mut out = Vec::new();
    for (name, service) in &remote.services {
        if !service.exported {
            continue;
        }
        for ep in remote.endpoints_of(name).filter(|ep| ep.gateway.is_none()) {
            let mut ep = (**ep).clone();
            ep.id = format!("{cluster}.{}", ep.id);
            ep.cluster = cluster.clone();
            ep.gateway = Some(link.gateway);
            out.push(ep);
        }
    }
    out
}

/// `local` with the endpoints (and services missing here) of every linked cluster whose
/// registry is not staler than its link allows. Returns the merged snapshot and, per cluster,
/// the number of endpoints it contributed.
pub(crate) fn merge(
    local: &Arc<Snapshot>,
    remotes: &[(Arc<ClusterLink>, Arc<Snapshot>, Duration)],
) -> (Arc<Snapshot>, BTreeMap<String, usize>) {
    let mut counts = BTreeMap::new();
    if remotes.is_empty() {
        return (local.clone(), counts);
    }
    let mut merged = (**local).clone();
    for (link, remote, staleness) in remotes {
        let cluster = link.cluster.to_string();
        if *staleness > link.keep_stale {
            counts.insert(cluster, 0);
            continue;
        }
        let endpoints = linked_endpoints(link, remote);
        counts.insert(cluster, endpoints.len());
        for ep in endpoints {
            let service = ep.service.to_string();
            if !merged.services.contains_key(&service) {
                if let Some(svc) = remote.services.get(&service) {
                    merged.services.insert(service.clone(), svc.clone());
                }
            }
            merged
                .endpoints
                .entry(service)
                .or_default()
                .insert(ep.id.clone(), Arc::new(ep));
        }
    }
    (Arc::new(merged), counts)
}

/// Follows `local` and the registries its links name; publishes merged snapshots until `stop`.
/// With no link, the local snapshot passes through unchanged.
pub(crate) fn follow(
    local: watch::Receiver<Arc<Snapshot>>,
    state_dir: Option<std::path::PathBuf>,
    credentials_dir: Option<std::path::PathBuf>,
    metrics: Metrics,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> watch::Receiver<Arc<Snapshot>> {
    let first = local.borrow().clone();
    let (tx, rx) = watch::channel(first);
    tasks.spawn(run(local, state_dir, credentials_dir, tx, metrics, stop));
    rx
}

async fn run(
    mut local: watch::Receiver<Arc<Snapshot>>,
    state_dir: Option<std::path::PathBuf>,
    credentials_dir: Option<std::path::PathBuf>,
    tx: watch::Sender<Arc<Snapshot>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut links = Links {
        open: BTreeMap::new(),
        opening: BTreeMap::new(),
        wake: Arc::new(tokio::sync::Notify::new()),
        opened: tokio::sync::mpsc::unbounded_channel(),
        state_dir,
        credentials_dir,
        checked: None,
    };
    let mut tick = tokio::time::interval(AGE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<MergeInputs> = None;
    loop {
        let snap = local.borrow_and_update().clone();
        for gone in links.reconcile(&snap) {
            let _ = metrics.link_stale.remove_label_values(&[gone.as_str()]);
            let _ = metrics.link_endpoints.remove_label_values(&[gone.as_str()]);
        }
        let views: Vec<(Arc<ClusterLink>, Arc<Snapshot>, Duration)> = links
            .open
            .values_mut()
            .map(|r| {
                let s = r.snapshots.borrow_and_update().clone();
                let mut staleness = r.registry.staleness();
                if let Some(since) = r.stand_in_since {
                    staleness = staleness.max(since.elapsed());
                }
                (r.link.clone(), s, staleness)
            })
            .collect();
        for (link, _, staleness) in &views {
            metrics
                .link_stale
                .with_label_values(&[link.cluster.as_str()])
                .set(staleness.as_secs_f64());
        }
        // A link whose registry could not be opened yet (refused credentials, a missing
        // credentials file) has been out of contact since it appeared.
        for (cluster, (_, _, since)) in &links.opening {
            if links.open.contains_key(cluster) {
                continue; // opened again with new credentials; the open one reports
            }
            metrics
                .link_stale
                .with_label_values(&[cluster.as_str()])
                .set(since.elapsed().as_secs_f64());
        }
        // Publish only when something a merge reads changed.
        let key: MergeInputs = (
            Arc::as_ptr(&snap) as usize,
            views
                .iter()
                .map(|(l, s, st)| (l.cluster.to_string(), s.revision, *st > l.keep_stale))
                .collect::<Vec<_>>(),
        );
        if last.as_ref() != Some(&key) {
            let (merged, counts) = merge(&snap, &views);
            for (cluster, n) in &counts {
                metrics
                    .link_endpoints
                    .with_label_values(&[cluster.as_str()])
                    .set(*n as i64);
            }
            tx.send_replace(merged);
            last = Some(key);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = local.changed() => {
                // The local watch ended: the sidecar is stopping.
                if r.is_err() {
                    return;
                }
            }
            () = links.wake.notified() => {}
            _ = tick.tick() => {}
        }
    }
}

/// A registry opened for a link, handed from its opener task to the merge loop.
type Opened = (
    Arc<ClusterLink>,
    Arc<dyn Registry>,
    halyard_registry::Access,
);

/// The links being followed, and those whose registry is still being opened.
struct Links {
    open: BTreeMap<String, Remote>,
    /// Opener tasks (retrying with backoff), stopped when their link goes or changes.
    /// With when its opener started: until it opens, the link's staleness is the time since.
    opening: BTreeMap<
        String,
        (
            Arc<ClusterLink>,
            tokio_util::task::AbortOnDropHandle<()>,
            tokio::time::Instant,
        ),
    >,
    wake: Arc<tokio::sync::Notify>,
    opened: (
        tokio::sync::mpsc::UnboundedSender<Opened>,
        tokio::sync::mpsc::UnboundedReceiver<Opened>,
    ),
    /// A linked cluster's last good snapshot is kept under `<state_dir>/link-<cluster>/`, so
    /// its endpoints survive this sidecar's restart while the link is down (until `keepStale`).
    state_dir: Option<std::path::PathBuf>,
    /// The folder a link's `credentials` name is looked up in (`link_credentials`).
    credentials_dir: Option<std::path::PathBuf>,
    /// When open links' credentials files were last compared with what they were opened with
    /// (at most once per [`AGE_CHECK`], not on every snapshot).
    checked: Option<tokio::time::Instant>,
}

impl Links {
    /// Forgets links that went, takes the registries openers finished, and starts an opener
    /// for each new link, for each open one whose credentials files changed, and for each
    /// edited one that now names another registry, mesh or credentials: the open registry
    /// serves until the new one opens (make before break; an edited link's gateway and
    /// `keepStale` apply at once). Never waits on a network: opening runs beside the merge.
    /// Returns the clusters no longer linked at all.
    fn reconcile(&mut self, snap: &Snapshot) -> Vec<String> {
        let wanted = |cluster: &String, link: &Arc<ClusterLink>| {
            snap.links.get(cluster).is_some_and(|l| l == link)
        };
        let gone: Vec<String> = (self.open.keys().chain(self.opening.keys()))
            .filter(|c| !snap.links.contains_key(*c))
            .cloned()
            .collect();
        self.open.retain(|c, _| snap.links.contains_key(c));
        for (cluster, open) in &mut self.open {
            let Some(link) = snap.links.get(cluster) else {
                continue;
            };
            if open.link == *link {
                continue;
            }
            if same_source(&open.opened_for, link) {
                open.stand_in_since = None;
            } else if open.stand_in_since.is_none() {
                open.stand_in_since = Some(tokio::time::Instant::now());
                tracing::info!(%cluster, registry = %link.registry, "the link names another registry; the last endpoints serve until it answers, at most keepStale");
            }
            open.link = link.clone();
        }
        self.opening.retain(|c, (link, _, _)| wanted(c, link));
        while let Ok((link, registry, access)) = self.opened.1.try_recv() {
            let cluster = link.cluster.to_string();
            if !wanted(&cluster, &link) {
                continue;
            }
            self.opening.remove(&cluster);
            tracing::info!(%cluster, registry = %link.registry, gateway = %link.gateway, "following a linked cluster");
            let snapshots = registry.watch();
            let mut changes = registry.watch();
            let wake = self.wake.clone();
            let waker = tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    wake.notify_one();
                }
            });
            self.open.insert(
                cluster,
                Remote {
                    opened_for: link.clone(),
                    link,
                    stand_in_since: None,
                    access,
                    registry,
                    snapshots,
                    _waker: tokio_util::task::AbortOnDropHandle::new(waker),
                },
            );
        }
        let now = tokio::time::Instant::now();
        let check = self
            .checked
            .is_none_or(|t| now.duration_since(t) >= AGE_CHECK);
        if check {
            self.checked = Some(now);
        }
        for (cluster, link) in &snap.links {
            if self.opening.contains_key(cluster) {
                continue;
            }
            if let Some(open) = self
                .open
                .get(cluster)
                .filter(|o| same_source(&o.opened_for, link))
            {
                if !check {
                    continue;
                }
                let current = link_access(link, self.credentials_dir.as_deref());
                if current.is_err() || current.as_ref().is_ok_and(|a| *a == open.access) {
                    continue;
                }
                tracing::info!(%cluster, "the link's credentials files changed; opening its registry again");
            }
            let mut opts = halyard_registry::Options::new(link.mesh.as_str());
            opts.timeout = Duration::from_secs(3);
            opts.state_dir = self
                .state_dir
                .as_ref()
                .map(|d| d.join(format!("link-{cluster}")));
            let task = tokio::spawn(open_link(
                link.clone(),
                opts,
                self.credentials_dir.clone(),
                self.opened.0.clone(),
                self.wake.clone(),
            ));
            self.opening.insert(
                cluster.clone(),
                (
                    link.clone(),
                    tokio_util::task::AbortOnDropHandle::new(task),
                    tokio::time::Instant::now(),
                ),
            );
        }
        gone
    }
}

/// Whether a registry opened for `a` is the one `b` names: same registry URL, mesh and
/// credentials (the gateway and `keepStale` apply to endpoints, not to the registry).
fn same_source(a: &ClusterLink, b: &ClusterLink) -> bool {
    a.registry == b.registry && a.mesh == b.mesh && a.credentials == b.credentials
}

/// Opens `link`'s registry (as the etcd user its `credentials` name, read from
/// `credentials_dir` at each attempt), retrying a refusal with a doubling delay (1 s to 60 s,
/// one warning per refusal kind), and hands it to the merge loop.
async fn open_link(
    link: Arc<ClusterLink>,
    mut opts: halyard_registry::Options,
    credentials_dir: Option<std::path::PathBuf>,
    opened: tokio::sync::mpsc::UnboundedSender<Opened>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut delay = Duration::from_secs(1);
    let mut warned: Option<String> = None;
    loop {
        let attempt = match link_access(&link, credentials_dir.as_deref()) {
            Ok(access) => {
                opts.access = access;
                halyard_registry::open_with(&link.registry, opts.clone())
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(registry) => {
                let _ = opened.send((link, registry, opts.access));
                wake.notify_one();
                return;
            }
            Err(text) => {
                if warned.as_deref() != Some(text.as_str()) {
                    tracing::warn!(cluster = %link.cluster, registry = %link.registry, error = %text, "cannot open a linked cluster's registry; retrying");
                    warned = Some(text);
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// How to reach `link`'s registry, from the files its `credentials` name in `dir`:
/// `<name>` (`user:password`), and for an `etcds://` registry `<name>.ca.pem` (required) and
/// `<name>.cert.pem` + `<name>.key.pem` (a client certificate, optional). Without a name: no
/// authentication, and an `etcds://` link is refused. Errors name the file or what is missing.
fn link_access(
    link: &ClusterLink,
    dir: Option<&std::path::Path>,
) -> Result<halyard_registry::Access, String> {
    let tls_needed = link.registry.starts_with("etcds://");
    let Some(name) = &link.credentials else {
        if tls_needed {
            return Err(format!(
                "{} is etcds://: the link must name its credentials (the CA file {{name}}.ca.pem in link_credentials)",
                link.registry
            ));
        }
        return Ok(halyard_registry::Access::default());
    };
    let Some(dir) = dir else {
        return Err(format!(
            "the link names credentials {name:?}, but this sidecar has no link_credentials folder configured"
        ));
    };
    let file = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let password = file("");
    let credentials = if tls_needed && !password.exists() {
        None // client-certificate authentication alone
    } else {
        Some(halyard_registry::Credentials::from_file(&password).map_err(|e| e.to_string())?)
    };
    let tls = if tls_needed {
        let (cert, key) = (file(".cert.pem"), file(".key.pem"));
        let client = cert.exists().then_some((cert.as_path(), key.as_path()));
        Some(
            halyard_registry::EtcdTls::from_files(&file(".ca.pem"), client)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    Ok(halyard_registry::Access { credentials, tls })
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_registry::model::parse_documents;
    use halyard_registry::Object;

    fn snapshot(yaml: &str) -> Arc<Snapshot> {
        let objects = parse_documents("test", yaml).unwrap();
        Arc::new(Snapshot::of_objects(
            halyard_registry::Origin::Live,
            objects,
        ))
    }

    fn link(keep: &str) -> Arc<ClusterLink> {
        let yaml = format!("kind: ClusterLink\ncluster: b\nregistry: file:///nowhere\ngateway: 192.0.2.9:15444\nkeepStale: {keep}\n");
        match parse_documents("l", &yaml).unwrap().remove(0) {
            Object::ClusterLink(l) => Arc::new(l),
            _ => unreachable!(),
        }
    }

    const REMOTE: &str = "
kind: Service
name: reviews
exported: true
ports: [{ port: 9080, protocol: http }]
---
kind: Service
name: secret
ports: [{ port: 9080, protocol: http }]
---
kind: Endpoint
id: r1
service: reviews
address: 10.2.0.5:15443
identity: spiffe://mesh.local/ns/default/sa/reviews
labels: { version: v2 }
cluster: local
zone: b-1
---
kind: Endpoint
id: far
service: reviews
address: 10.9.0.5:15443
identity: spiffe://mesh.local/ns/default/sa/reviews
gateway: 198.51.100.1:15444
---
kind: Endpoint
id: s1
service: secret
address: 10.2.0.6:15443
identity: spiffe://mesh.local/ns/default/sa/secret
";

    const LOCAL: &str = "
kind: Service
name: ratings
ports: [{ port: 9080, protocol: http }]
---
kind: Endpoint
id: a1
service: ratings
address: 10.1.0.5:15443
identity: spiffe://mesh.local/ns/default/sa/ratings
";

    #[test]
    fn exported_direct_endpoints_join_with_the_links_cluster_and_gateway() {
        let (local, remote) = (snapshot(LOCAL), snapshot(REMOTE));
        let (merged, counts) = merge(&local, &[(link("5m"), remote, Duration::ZERO)]);
        assert_eq!(counts["b"], 1);
        let eps: Vec<_> = merged.endpoints_of("reviews").collect();
        assert_eq!(
            eps.len(),
            1,
            "not the secret one, not one behind a third gateway"
        );
        let ep = eps[0];
        assert_eq!(ep.id, "b.r1");
        assert_eq!(ep.cluster, "b");
        assert_eq!(ep.zone, "b-1");
        assert_eq!(ep.labels.get("version").map(String::as_str), Some("v2"));
        assert_eq!(ep.gateway, Some("192.0.2.9:15444".parse().unwrap()));
        assert_eq!(ep.address, "10.2.0.5:15443".parse().unwrap());
        assert!(
            merged.services.contains_key("reviews"),
            "a service only in B is added"
        );
        assert!(!merged.services.contains_key("secret"));
        assert_eq!(merged.endpoints_of("ratings").count(), 1, "local ones stay");
        assert_eq!(merged.revision, local.revision);
    }

    #[test]
    fn a_stale_link_keeps_its_endpoints_until_keep_stale_then_drops_them() {
        let (local, remote) = (snapshot(LOCAL), snapshot(REMOTE));
        let l = link("30s");
        let (kept, _) = merge(
            &local,
            &[(l.clone(), remote.clone(), Duration::from_secs(29))],
        );
        assert_eq!(kept.endpoints_of("reviews").count(), 1);
        let (dropped, counts) = merge(&local, &[(l, remote, Duration::from_secs(31))]);
        assert_eq!(dropped.endpoints_of("reviews").count(), 0);
        assert_eq!(counts["b"], 0);
        assert_eq!(dropped.endpoints_of("ratings").count(), 1);
    }

    /// A link whose registry never answers (a listener that accepts and stays silent) is
    /// opened beside the merge loop: local changes keep reaching the data plane at once.
    #[tokio::test]
    async fn a_registry_that_never_answers_does_not_hold_up_local_changes() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                held.push(tcp);
            }
        });
        let link = format!(
            "kind: ClusterLink\ncluster: b\nregistry: etcd://{addr}\ngateway: 192.0.2.9:15444\n"
        );
        let first = Arc::new(Snapshot::of_objects(
            halyard_registry::Origin::Live,
            parse_documents("l", &format!("{LOCAL}---\n{link}")).unwrap(),
        ));
        let (local_tx, local_rx) = watch::channel(first);
        let stop = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let metrics = Metrics::new().unwrap();
        let mut merged = follow(local_rx, None, None, metrics, stop.clone(), &tasks);
        // Let the loop start opening the link.
        tokio::task::yield_now().await;
        let mut next = Snapshot::of_objects(
            halyard_registry::Origin::Live,
            parse_documents("l", &format!("{LOCAL}---\n{link}")).unwrap(),
        );
        next.revision = 7;
        local_tx.send_replace(Arc::new(next));
        let seen = tokio::time::timeout(
            Duration::from_millis(500),
            merged.wait_for(|s| s.revision == 7),
        )
        .await;
        assert!(
            seen.is_ok(),
            "a local change waited for the silent link's registry"
        );
        stop.cancel();
    }

    #[test]
    fn without_links_the_local_snapshot_passes_through() {
        let local = snapshot(LOCAL);
        let (merged, counts) = merge(&local, &[]);
        assert!(Arc::ptr_eq(&merged, &local));
        assert!(counts.is_empty());
    }
}
