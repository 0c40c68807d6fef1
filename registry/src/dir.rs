//! The directory backend, `file://DIR`: the key layout of DESIGN.md §4 as files.
//!
//! Key `/halyard/<mesh>/<rel>` is the file `DIR/<mesh>/<rel>.json`, e.g.
//! `DIR/default/services/reviews.json`, `DIR/default/endpoints/reviews/ep-1.json`,
//! `DIR/default/meshconfig.json`. Files are written atomically (temp file + rename); names
//! starting with `.` and files not ending in `.json` are ignored. Changes are picked up through
//! inotify (the notify crate), with a full rescan every 2 s as a safety net; each rescan that
//! changes anything bumps the revision by one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::RegistryError;
use crate::key::Key;
use crate::model::{Endpoint, Object, Status};
use crate::persist::write_atomic;
use crate::registry::{
    spawn_sink, BoxFuture, Options, Registration, Registry, Shared, StatusWriter,
};
use crate::snapshot::Snapshot;
use crate::store::Store;

/// Safety-net rescan period.
const RESCAN: Duration = Duration::from_secs(2);
/// How long to let a burst of file events settle before rescanning.
const SETTLE: Duration = Duration::from_millis(20);

/// A registry in a directory.
pub(crate) struct DirRegistry {
    shared: Arc<Shared>,
    root: PathBuf,
    tasks: Vec<JoinHandle<()>>,
    _watcher: notify::RecommendedWatcher,
}

impl DirRegistry {
    pub async fn open(dir: PathBuf, opts: Options) -> Result<Self, RegistryError> {
        let root = dir.join(&opts.mesh);
        std::fs::create_dir_all(&root).map_err(|e| RegistryError::io(&root, e))?;
        let mesh = opts.mesh.clone();
        let (shared, persisted) = Shared::new(opts);
        let mut scanner = Scanner {
            root: root.clone(),
            store: persisted.unwrap_or_else(|| Store::new(&mesh)),
            raw: BTreeMap::new(),
            unreadable: false,
        };
        scanner.rescan(&shared);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if may_change_content(&res) {
                let _ = ev_tx.send(());
            }
        })
        .map_err(|error| RegistryError::Notify {
            path: root.display().to_string(),
            error,
        })?;
        watcher
            .watch(&root, notify::RecursiveMode::Recursive)
            .map_err(|error| RegistryError::Notify {
                path: root.display().to_string(),
                error,
            })?;
        let write_root = root.clone();
        let writer: StatusWriter = Arc::new(move |st: Status| {
            let root = write_root.clone();
            Box::pin(async move { write_object(&root, &Object::Status(st)).map(|_| ()) })
        });
        let tasks = vec![
            tokio::spawn(follow(scanner, shared.clone(), ev_rx)),
            spawn_sink(shared.clone(), writer),
        ];
        Ok(DirRegistry {
            shared,
            root,
            tasks,
            _watcher: watcher,
        })
    }
}

impl Drop for DirRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Registry for DirRegistry {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.tx.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.tx.subscribe()
    }

    fn register(&self, endpoint: Endpoint) -> BoxFuture<'_, Result<Registration, RegistryError>> {
        Box::pin(async move {
            let obj = Object::Endpoint(endpoint);
            let file = write_object(&self.root, &obj)?;
            Ok(Registration {
                key: obj.key().full(&self.shared.opts.mesh),
                lease: None,
                task: None,
                file: Some(file),
            })
        })
    }

    fn deregister(&self, registration: Registration) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async move {
            drop(registration);
            Ok(())
        })
    }

    fn write_status(&self, status: Status) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async move { write_object(&self.root, &Object::Status(status)).map(|_| ()) })
    }

    fn staleness(&self) -> Duration {
        self.shared.staleness()
    }

    fn rejected_total(&self) -> u64 {
        self.shared.rejected_total()
    }
}

/// The file of `key` under the mesh directory `root`.
pub(crate) fn key_file(root: &Path, key: &Key) -> PathBuf {
    root.join(format!("{}.json", key.path()))
}

/// Writes an object to its file atomically; returns the file.
pub(crate) fn write_object(root: &Path, obj: &Object) -> Result<PathBuf, RegistryError> {
    let file = key_file(root, &obj.key());
    write_atomic(&file, obj.to_json().as_bytes())?;
    Ok(file)
}

/// Whether a file event may change what the directory holds, so that it is worth a rescan.
///
/// The inotify backend also reports files being opened and closed after reading
/// (`IN_OPEN`, `IN_CLOSE_NOWRITE`): a rescan reads every file, so reacting to those would make
/// each rescan cause the next, about every [`SETTLE`] for as long as the sidecar runs, and every
/// sidecar sharing the directory would rescan on each other's reads as well. A file closed
/// after writing (an editor saving in place) and every other kind count; so does an error of the
/// watcher (the rescan finds out what it missed).
fn may_change_content(res: &notify::Result<notify::Event>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match res {
        Ok(ev) => match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        Err(_) => true,
    }
}

async fn follow(
    mut scanner: Scanner,
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<()>,
) {
    loop {
        tokio::select! {
            ev = events.recv() => {
                if ev.is_none() {
                    return;
                }
                tokio::time::sleep(SETTLE).await;
                while events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(RESCAN) => {}
        }
        scanner.rescan(&shared);
    }
}

/// The last raw content seen of every file, and the store built from it.
struct Scanner {
    root: PathBuf,
    store: Store,
    raw: BTreeMap<String, Vec<u8>>,
    /// The last rescan failed (warned once, until a rescan succeeds).
    unreadable: bool,
}

impl Scanner {
    /// Reads every file, applies what changed, publishes if the content changed.
    fn rescan(&mut self, shared: &Shared) {
        let mut now = BTreeMap::new();
        if let Err(e) = read_tree(&self.root, "", 0, &mut now) {
            // Once per episode: a cause such as running out of file descriptors repeats on
            // every rescan until it ends.
            if !self.unreadable {
                tracing::warn!(dir = %self.root.display(), error = %e, "cannot read the registry directory; serving the last snapshot until it can be read again");
            } else {
                tracing::debug!(dir = %self.root.display(), error = %e, "registry directory still unreadable");
            }
            self.unreadable = true;
            shared.contact_lost();
            return;
        }
        if std::mem::take(&mut self.unreadable) {
            tracing::info!(dir = %self.root.display(), "registry directory readable again");
        }
        shared.contact_ok();
        if shared.tx.borrow().origin != crate::snapshot::Origin::Live {
            return self.first_scan(shared, now);
        }
        let mut changed = false;
        let mut touched = false;
        for (rel, bytes) in &now {
            if self.raw.get(rel) != Some(bytes) {
                touched = true;
                let origin = self.root.join(format!("{rel}.json")).display().to_string();
                let a = self.store.put(rel, &origin, bytes);
                changed |= a.changed;
                shared.note_rejected(a.rejected);
            }
        }
        for rel in self.raw.keys().filter(|k| !now.contains_key(*k)) {
            touched = true;
            changed |= self.store.delete(rel).changed;
        }
        self.raw = now;
        if touched {
            self.store.revision += 1;
        }
        if changed {
            shared.publish(&self.store);
        }
    }

    /// Replaces whatever was persisted with the directory's content, keeping the last good
    /// value of keys whose file is invalid.
    fn first_scan(&mut self, shared: &Shared, now: BTreeMap<String, Vec<u8>>) {
        let entries: Vec<_> = now
            .iter()
            .map(|(rel, bytes)| {
                let origin = self.root.join(format!("{rel}.json")).display().to_string();
                (rel.clone(), origin, bytes.clone())
            })
            .collect();
        let rev = self.store.revision + 1;
        shared.note_rejected(self.store.relist(entries, rev));
        self.raw = now;
        shared.publish(&self.store);
    }
}

/// Reads `*.json` files up to two directories deep into `out`, keyed by relative key.
fn read_tree(
    dir: &Path,
    rel: &str,
    depth: usize,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let ty = entry.file_type()?;
        if ty.is_dir() && depth < 2 {
            read_tree(&entry.path(), &child, depth + 1, out)?;
        } else if let Some(stem) = child.strip_suffix(".json").filter(|_| ty.is_file()) {
            match std::fs::read(entry.path()) {
                Ok(bytes) => drop(out.insert(stem.to_owned(), bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
