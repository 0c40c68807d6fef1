//! Static stability: the last good snapshot, persisted under the sidecar's state dir.
//!
//! File: `<state_dir>/registry-<mesh>.json`, written atomically (temp file, fsync, rename):
//! `{ "revision", "savedAt", "objects": [ {kind, ...} ], "rejected": { key: reason } }`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::RegistryError;
use crate::model::Object;
use crate::snapshot::Snapshot;
use crate::store::Store;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Persisted {
    revision: i64,
    saved_at: String,
    objects: Vec<serde_json::Value>,
    rejected: BTreeMap<String, String>,
}

/// The state file of `mesh` under `dir`.
pub(crate) fn state_file(dir: &Path, mesh: &str) -> PathBuf {
    dir.join(format!("registry-{mesh}.json"))
}

/// Writes `contents` to `path` atomically: a temp file in the same dir, fsync, rename.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), RegistryError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| RegistryError::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(RegistryError::io(path, e));
    }
    Ok(())
}

/// Saves a snapshot's objects and quarantine records.
pub(crate) fn save(path: &Path, snap: &Snapshot) -> Result<(), RegistryError> {
    let p = Persisted {
        revision: snap.revision,
        saved_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        objects: snap.objects().iter().map(Object::to_value).collect(),
        rejected: snap.rejected.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&p)
        .map_err(|e| RegistryError::Json(path.display().to_string(), e))?;
    write_atomic(path, &bytes)
}

/// Loads a saved store; `None` if there is no file. Objects that no longer validate are skipped.
pub(crate) fn load(path: &Path, mesh: &str) -> Result<Option<(Store, SystemTime)>, RegistryError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RegistryError::io(path, e)),
    };
    let p: Persisted = serde_json::from_slice(&bytes)
        .map_err(|e| RegistryError::Json(path.display().to_string(), e))?;
    let mut store = Store::new(mesh);
    for v in p.objects {
        match Object::from_value(v, None) {
            Ok(o) => store.insert(o),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping persisted object")
            }
        }
    }
    store.set_rejected(p.rejected);
    store.revision = p.revision;
    let saved_at = humantime::parse_rfc3339_weak(&p.saved_at).unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(Some((store, saved_at)))
}
