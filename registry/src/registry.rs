//! The [`Registry`] trait, the options shared by both backends, and [`open`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::RegistryError;
use crate::model::{check_mesh, Endpoint, Status};
use crate::snapshot::{Origin, Snapshot};
use crate::store::Store;

/// A boxed future, so that [`Registry`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A registry backend: a stream of validated snapshots, plus the writes a sidecar makes.
pub trait Registry: Send + Sync {
    /// The current snapshot.
    fn snapshot(&self) -> Arc<Snapshot>;
    /// A receiver that sees every new snapshot (coalesced: a slow reader sees the latest).
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// Registers an endpoint (etcd: on a lease kept alive every TTL/3, re-registered if lost).
    /// The endpoint stays registered while the returned handle lives; dropping the handle stops
    /// the keepalive (the endpoint then expires with its lease).
    fn register(&self, endpoint: Endpoint) -> BoxFuture<'_, Result<Registration, RegistryError>>;
    /// Removes a registered endpoint now.
    fn deregister(&self, registration: Registration) -> BoxFuture<'_, Result<(), RegistryError>>;
    /// Writes a status to `status/<sidecar>`. Backends opened with a sidecar id also write one
    /// by themselves whenever the applied revision or the quarantined keys change.
    fn write_status(&self, status: Status) -> BoxFuture<'_, Result<(), RegistryError>>;
    /// Time since the last successful contact with the registry; zero while in contact.
    fn staleness(&self) -> Duration;
    /// How many times a key was quarantined since start (a counter).
    fn rejected_total(&self) -> u64;
}

/// How to open a registry.
#[derive(Debug, Clone)]
pub struct Options {
    /// The mesh name (a DNS-1123 label); keys live under `/halyard/<mesh>/`.
    pub mesh: String,
    /// Where the last good snapshot is persisted; `None` disables static stability.
    pub state_dir: Option<PathBuf>,
    /// This sidecar's id: its status is written to `status/<id>`. `None` writes no status.
    pub sidecar_id: Option<String>,
    /// Endpoint lease TTL (etcd); keepalives are sent every TTL/3.
    pub lease_ttl: Duration,
    /// How long to wait for etcd when connecting and for each request.
    pub timeout: Duration,
    /// How to reach etcd: the user to authenticate as (etcd RBAC) and the TLS settings an
    /// `etcds://` URL needs. Default: neither. The directory backend ignores it.
    pub access: crate::Access,
}

impl Options {
    /// Defaults: no state dir, no sidecar id, 10 s lease, 3 s timeout.
    pub fn new(mesh: &str) -> Self {
        Options {
            mesh: mesh.to_owned(),
            state_dir: None,
            sidecar_id: None,
            lease_ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(3),
            access: crate::Access::default(),
        }
    }
}

/// A parsed registry URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryUrl {
    /// `etcd://host:port[,host:port...]`, as `http://host:port` endpoints, or
    /// `etcds://host:port[,...]` (TLS), as `https://host:port` endpoints.
    Etcd(Vec<String>),
    /// `file://DIR`.
    Dir(PathBuf),
}

impl RegistryUrl {
    /// Parses `etcd://host:port[,host:port...]`, `etcds://host:port[,...]` or `file://DIR`.
    pub fn parse(url: &str) -> Result<Self, RegistryError> {
        let bad = |reason: &str| RegistryError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(dir) = url.strip_prefix("file://") {
            if dir.is_empty() {
                return Err(bad("no directory"));
            }
            return Ok(RegistryUrl::Dir(PathBuf::from(dir)));
        }
        let (scheme, hosts) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
            (Some(hosts), _) => ("http", hosts),
            (_, Some(hosts)) => ("https", hosts),
            _ => return Err(bad("unknown scheme")),
        };
        let eps: Vec<String> = hosts
            .trim_end_matches('/')
            .split(',')
            .map(str::to_owned)
            .collect();
        for ep in &eps {
            if ep.contains('@') {
                // Never echo it: the part before '@' is likely a password.
                return Err(RegistryError::BadUrl {
                    url: "(not shown: it holds user information)".into(),
                    reason: "user information (user:password@) does not go in a registry URL, \
                             where it would be stored and logged; use a credentials file"
                        .into(),
                });
            }
            let port = ep.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
            if !matches!(port, Some((h, Ok(p))) if !h.is_empty() && p != 0 && !h.contains('/')) {
                return Err(bad(&format!("{ep:?} is not host:port")));
            }
        }
        Ok(RegistryUrl::Etcd(
            eps.into_iter().map(|e| format!("{scheme}://{e}")).collect(),
        ))
    }
}

/// Opens a registry at `url` for `mesh`. Returns at once with whatever is known: the live
/// registry, else the snapshot persisted under `state_dir` (and keeps trying in the background).
pub async fn open(
    url: &str,
    mesh: &str,
    state_dir: Option<&Path>,
    sidecar_id: Option<&str>,
) -> Result<Arc<dyn Registry>, RegistryError> {
    let mut opts = Options::new(mesh);
    opts.state_dir = state_dir.map(Path::to_path_buf);
    opts.sidecar_id = sidecar_id.map(str::to_owned);
    open_with(url, opts).await
}

/// [`open`] with every option.
pub async fn open_with(url: &str, opts: Options) -> Result<Arc<dyn Registry>, RegistryError> {
    check_mesh(&opts.mesh)?;
    match RegistryUrl::parse(url)? {
        RegistryUrl::Etcd(eps) => Ok(Arc::new(crate::etcd::EtcdRegistry::open(eps, opts).await?)),
        RegistryUrl::Dir(dir) => Ok(Arc::new(crate::dir::DirRegistry::open(dir, opts).await?)),
    }
}

/// A registered endpoint. Keep it alive as long as the endpoint should stay registered.
#[derive(Debug)]
pub struct Registration {
    pub(crate) key: String,
    pub(crate) lease: Option<Arc<AtomicI64>>,
    pub(crate) task: Option<JoinHandle<()>>,
    pub(crate) file: Option<PathBuf>,
}

impl Registration {
    /// The full key (etcd) or file (directory) of the endpoint.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current etcd lease id, if any.
    pub fn lease_id(&self) -> Option<i64> {
        self.lease
            .as_ref()
            .map(|l| l.load(Ordering::Relaxed))
            .filter(|l| *l != 0)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// State shared by a backend's handle and its tasks.
pub(crate) struct Shared {
    pub opts: Options,
    pub tx: watch::Sender<Arc<Snapshot>>,
    contact: Mutex<Contact>,
    rejected_total: AtomicU64,
}

struct Contact {
    connected: bool,
    last: SystemTime,
}

impl Shared {
    /// Starts from the persisted snapshot if there is one; returns it as a store too.
    pub fn new(opts: Options) -> (Arc<Self>, Option<Store>) {
        let loaded = opts.state_dir.as_deref().and_then(|dir| {
            let path = crate::persist::state_file(dir, &opts.mesh);
            crate::persist::load(&path, &opts.mesh)
                .map_err(
                    |e| tracing::warn!(error = %e, "cannot load the persisted registry snapshot"),
                )
                .ok()
                .flatten()
        });
        let (snap, last, store) = match loaded {
            Some((store, saved_at)) => (
                store.snapshot(Origin::Persisted { saved_at }),
                saved_at,
                Some(store),
            ),
            None => (Snapshot::empty(Origin::Empty), SystemTime::now(), None),
        };
        let (tx, _) = watch::channel(Arc::new(snap));
        let contact = Mutex::new(Contact {
            connected: false,
            last,
        });
        (
            Arc::new(Shared {
                opts,
                tx,
                contact,
                rejected_total: AtomicU64::new(0),
            }),
            store,
        )
    }

    /// Publishes the store's content as a new live snapshot.
    pub fn publish(&self, store: &Store) {
        self.tx.send_replace(Arc::new(store.snapshot(Origin::Live)));
    }

    /// Counts and logs (once each) newly quarantined keys.
    pub fn note_rejected(&self, rejected: impl IntoIterator<Item = (String, String)>) {
        for (key, reason) in rejected {
            self.rejected_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%key, %reason, "registry key rejected; keeping its last good value");
        }
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected_total.load(Ordering::Relaxed)
    }

    /// Records a successful exchange with the registry.
    pub fn contact_ok(&self) {
        if let Ok(mut c) = self.contact.lock() {
            c.connected = true;
            c.last = SystemTime::now();
        }
    }

    /// Records that the registry is unreachable. Staleness counts from the last successful
    /// exchange, not from now: a silent partition is noticed only seconds later (keepalive or
    /// watch-stall timeout), and the snapshot was already that old when it was.
    pub fn contact_lost(&self) {
        if let Ok(mut c) = self.contact.lock() {
            c.connected = false;
        }
    }

    pub fn staleness(&self) -> Duration {
        match self.contact.lock() {
            Ok(c) if c.connected => Duration::ZERO,
            Ok(c) => SystemTime::now().duration_since(c.last).unwrap_or_default(),
            Err(_) => Duration::ZERO,
        }
    }
}

/// Writes a status for the backend's sink.
pub(crate) type StatusWriter =
    Arc<dyn Fn(Status) -> BoxFuture<'static, Result<(), RegistryError>> + Send + Sync>;

/// Follows the published snapshots: persists each live one under the state dir and writes this
/// sidecar's status, retrying a failed status write every second.
pub(crate) fn spawn_sink(shared: Arc<Shared>, write: StatusWriter) -> JoinHandle<()> {
    let mut rx = shared.tx.subscribe();
    tokio::spawn(async move {
        // The snapshot last written to the state dir, and whether the last write failed: a
        // snapshot is written once, and a failing write warns once per episode.
        let mut persisted: Option<Arc<Snapshot>> = None;
        let mut persist_failing = false;
        let mut status_refused = false;
        loop {
            let snap = rx.borrow_and_update().clone();
            if snap.origin == Origin::Live {
                if !persisted.as_ref().is_some_and(|p| Arc::ptr_eq(p, &snap))
                    && persist(&shared, &snap, &mut persist_failing).await
                {
                    persisted = Some(snap.clone());
                }
                if !status(&shared, &snap, &write, &mut status_refused).await {
                    // Retry in a second, or sooner with a newer snapshot.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                    continue;
                }
                // Coalesce: every sidecar writes its status, so at most one write per interval.
                tokio::time::sleep(STATUS_INTERVAL).await;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Shortest time between two status writes of one sidecar.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// Writes `snap` under the state dir; true when written (or there is no state dir). A failure
/// warns when `failing` was false (the first of an episode), and sets it.
async fn persist(shared: &Shared, snap: &Arc<Snapshot>, failing: &mut bool) -> bool {
    let Some(dir) = shared.opts.state_dir.clone() else {
        return true;
    };
    let path = crate::persist::state_file(&dir, &shared.opts.mesh);
    let snap = snap.clone();
    let res = tokio::task::spawn_blocking(move || crate::persist::save(&path, &snap)).await;
    match res {
        Ok(Ok(())) => {
            if std::mem::take(failing) {
                tracing::info!("registry snapshot persisted again");
            }
            true
        }
        Ok(Err(e)) => {
            if !std::mem::replace(failing, true) {
                tracing::warn!(error = %e, "cannot persist the registry snapshot; retrying with the next status write");
            }
            false
        }
        Err(_) => false,
    }
}

/// Writes the status for `snap`; true when done (or nothing to do). A write etcd's access
/// control refuses warns once per episode (`refused`).
async fn status(
    shared: &Shared,
    snap: &Snapshot,
    write: &StatusWriter,
    refused: &mut bool,
) -> bool {
    let Some(id) = shared.opts.sidecar_id.clone() else {
        return true;
    };
    let rejected = snap
        .rejected
        .iter()
        .map(|(key, error)| crate::model::Rejection {
            key: key.clone(),
            error: error.clone(),
        })
        .collect();
    let st = Status {
        sidecar: id,
        revision: snap.revision,
        // When the snapshot was built and handed out, not when this write happens: writes are
        // coalesced to one per STATUS_INTERVAL, which would add up to that much to the figure.
        applied_at: snap.built_at,
        rejected,
    };
    match write(st).await {
        Ok(()) => {
            if std::mem::take(refused) {
                tracing::info!("sidecar status written again");
            }
            true
        }
        // Refused by etcd's access control: nobody sees this sidecar's status until the
        // operator grants it (a warning; unreachable etcd is already reported as staleness).
        Err(
            e @ (RegistryError::PermissionDenied { .. } | RegistryError::Unauthenticated { .. }),
        ) => {
            if !std::mem::replace(refused, true) {
                tracing::warn!(error = %e, "cannot write the sidecar status");
            }
            false
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot write the sidecar status yet");
            false
        }
    }
}

/// Exponential backoff with full jitter.
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(rand::random_range(0.5..=1.0))
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            RegistryUrl::parse("etcd://127.0.0.1:2379,h:1").unwrap(),
            RegistryUrl::Etcd(vec!["http://127.0.0.1:2379".into(), "http://h:1".into()])
        );
        assert_eq!(
            RegistryUrl::parse("etcds://10.0.0.1:2379").unwrap(),
            RegistryUrl::Etcd(vec!["https://10.0.0.1:2379".into()])
        );
        assert_eq!(
            RegistryUrl::parse("file:///var/x").unwrap(),
            RegistryUrl::Dir("/var/x".into())
        );
        for bad in [
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "http://h:1",
            "file://",
            "etcd://:1",
            "etcds://",
            "etcds://h",
            "etcd://user:pw@h:1",
        ] {
            assert!(RegistryUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
