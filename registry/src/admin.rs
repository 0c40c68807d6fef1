//! Reading and writing registry objects for `halyard ctl`: every write is all or nothing, and on
//! etcd a compare-and-swap (one Txn comparing each key's `mod_revision` with what was read).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::dir::key_file;
use crate::error::{RegistryError, ValidationError};
use crate::etcd::Etcd;
use crate::key::{mesh_prefix, Key};
use crate::model::{check_mesh, Kind, Object};
use crate::persist::write_atomic;
use crate::registry::RegistryUrl;

/// How many times a compare-and-swap is retried when another writer got in between.
const CAS_ATTEMPTS: usize = 3;

/// A stored value: its key, the parsed object or why it is invalid, and its revision.
#[derive(Debug)]
pub struct Stored {
    /// The full key (etcd) or file (directory).
    pub key: String,
    /// The object, or the validation error of what is stored.
    pub object: Result<Object, ValidationError>,
    /// The etcd `mod_revision` (0 for the directory backend).
    pub mod_revision: i64,
}

/// A registry opened for administration (no watch, no status).
pub enum Admin {
    /// etcd.
    Etcd {
        /// The connection.
        etcd: Box<EtcdConn>,
        /// The mesh.
        mesh: String,
    },
    /// A directory; `root` is `DIR/<mesh>`.
    Dir {
        /// The mesh directory.
        root: PathBuf,
        /// The mesh.
        mesh: String,
    },
}

/// An etcd connection (opaque).
pub struct EtcdConn(Etcd);

impl Admin {
    /// Opens `url` for `mesh`; etcd requests give up after `timeout`.
    pub async fn connect(url: &str, mesh: &str, timeout: Duration) -> Result<Admin, RegistryError> {
        Self::connect_as(url, mesh, timeout, &crate::Access::default()).await
    }

    /// [`Admin::connect`] with `access` (an etcd user, TLS for `etcds://`); the directory
    /// backend ignores it. Errors: [`RegistryError::Unauthenticated`] for refused credentials,
    /// [`RegistryError::BadUrl`] for TLS settings that do not fit the URL.
    pub async fn connect_as(
        url: &str,
        mesh: &str,
        timeout: Duration,
        access: &crate::Access,
    ) -> Result<Admin, RegistryError> {
        check_mesh(mesh)?;
        let mesh = mesh.to_owned();
        match RegistryUrl::parse(url)? {
            RegistryUrl::Etcd(eps) => {
                let etcd = Etcd::connect(&eps, timeout, access).await?;
                let mut maint = etcd.client.maintenance_client();
                etcd.call(maint.status()).await?;
                Ok(Admin::Etcd {
                    etcd: Box::new(EtcdConn(etcd)),
                    mesh,
                })
            }
            RegistryUrl::Dir(dir) => {
                // The registry folder must exist (a typo should not create a new registry);
                // the mesh folder inside it is made on first use.
                if !dir.is_dir() {
                    return Err(RegistryError::NotFound(format!(
                        "registry directory {}",
                        dir.display()
                    )));
                }
                let root = dir.join(&mesh);
                std::fs::create_dir_all(&root).map_err(|e| RegistryError::io(&root, e))?;
                Ok(Admin::Dir { root, mesh })
            }
        }
    }

    /// Every stored object of `kind`, valid or not, ordered by key.
    pub async fn list(&self, kind: Kind) -> Result<Vec<Stored>, RegistryError> {
        match self {
            Admin::Etcd { etcd, mesh } => etcd_list(&etcd.0, mesh, kind).await,
            Admin::Dir { root, .. } => dir_list(root, kind),
        }
    }

    /// Writes every object, or none: on etcd one Txn that fails if any key changed since it was
    /// read (retried a few times); in a directory every file is written to a temp file first and
    /// then renamed into place. Returns the etcd revision of the write (0 for a directory).
    pub async fn apply(&self, objects: &[Object]) -> Result<i64, RegistryError> {
        let mut keys = BTreeMap::new();
        for o in objects {
            if keys.insert(o.key(), ()).is_some() {
                return Err(RegistryError::Unsupported(format!(
                    "{} appears twice in the input; nothing was written",
                    o.key()
                )));
            }
        }
        match self {
            Admin::Etcd { etcd, mesh } => etcd_apply(&etcd.0, mesh, objects).await,
            Admin::Dir { root, .. } => dir_apply(root, objects).map(|()| 0),
        }
    }

    /// Deletes `key`; false if it did not exist.
    pub async fn delete(&self, key: &Key) -> Result<bool, RegistryError> {
        match self {
            Admin::Etcd { etcd, mesh } => etcd_delete(&etcd.0, &key.full(mesh)).await,
            Admin::Dir { root, .. } => match std::fs::remove_file(key_file(root, key)) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(RegistryError::io(key_file(root, key), e)),
            },
        }
    }

    /// The mesh.
    pub fn mesh(&self) -> &str {
        match self {
            Admin::Etcd { mesh, .. } | Admin::Dir { mesh, .. } => mesh,
        }
    }
}

fn kind_prefix(mesh: &str, kind: Kind) -> (String, bool) {
    match kind {
        Kind::MeshConfig => (Key::MeshConfig.full(mesh), false),
        Kind::Revocations => (Key::Revocations.full(mesh), false),
        Kind::TrustBundle => (Key::Trust.full(mesh), false),
        k => (format!("{}{}/", mesh_prefix(mesh), k.plural()), true),
    }
}

async fn etcd_list(etcd: &Etcd, mesh: &str, kind: Kind) -> Result<Vec<Stored>, RegistryError> {
    let (key, prefix) = kind_prefix(mesh, kind);
    let opts = prefix.then(|| GetOptions::new().with_prefix());
    let mut kv = etcd.client.kv_client();
    let resp = etcd.call(kv.get(key, opts)).await?;
    let root = mesh_prefix(mesh);
    let out = resp.kvs().iter().map(|kv| {
        let full = String::from_utf8_lossy(kv.key()).into_owned();
        let object = match full.strip_prefix(&root).and_then(Key::parse) {
            Some(k) => Object::from_stored(&k, &full, kv.value()),
            None => Err(ValidationError::at("", "not a registry key").with_origin(&full)),
        };
        Stored {
            key: full,
            object,
            mod_revision: kv.mod_revision(),
        }
    });
    Ok(out.collect())
}

async fn etcd_apply(etcd: &Etcd, mesh: &str, objects: &[Object]) -> Result<i64, RegistryError> {
    let keys: Vec<String> = objects.iter().map(|o| o.key().full(mesh)).collect();
    for _ in 0..CAS_ATTEMPTS {
        let mut compares = Vec::new();
        for k in &keys {
            compares.push(Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                mod_revision(etcd, k).await?,
            ));
        }
        let puts: Vec<TxnOp> = objects
            .iter()
            .zip(&keys)
            .map(|(o, k)| TxnOp::put(k.clone(), o.to_json(), None))
            .collect();
        let mut kv = etcd.client.kv_client();
        let resp = etcd
            .call(kv.txn(Txn::new().when(compares).and_then(puts)))
            .await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
    }
    Err(RegistryError::Conflict(keys.join(", ")))
}

/// The `mod_revision` of `key`, 0 if absent.
async fn mod_revision(etcd: &Etcd, key: &str) -> Result<i64, RegistryError> {
    let mut kv = etcd.client.kv_client();
    let resp = etcd.call(kv.get(key, None)).await?;
    Ok(resp.kvs().first().map_or(0, |kv| kv.mod_revision()))
}

async fn etcd_delete(etcd: &Etcd, key: &str) -> Result<bool, RegistryError> {
    for _ in 0..CAS_ATTEMPTS {
        let rev = mod_revision(etcd, key).await?;
        if rev == 0 {
            return Ok(false);
        }
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then(vec![TxnOp::delete(key, None)]);
        let mut kv = etcd.client.kv_client();
        if etcd.call(kv.txn(txn)).await?.succeeded() {
            return Ok(true);
        }
    }
    Err(RegistryError::Conflict(key.to_owned()))
}

fn dir_list(root: &std::path::Path, kind: Kind) -> Result<Vec<Stored>, RegistryError> {
    let mut files = Vec::new();
    if kind == Kind::MeshConfig {
        files.push((Key::MeshConfig, key_file(root, &Key::MeshConfig)));
    } else if kind == Kind::Revocations {
        files.push((Key::Revocations, key_file(root, &Key::Revocations)));
    } else if kind == Kind::TrustBundle {
        files.push((Key::Trust, key_file(root, &Key::Trust)));
    } else {
        collect_files(&root.join(kind.plural()), kind.plural(), &mut files)?;
    }
    let mut out = Vec::new();
    for (key, file) in files {
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RegistryError::io(&file, e)),
        };
        let origin = file.display().to_string();
        let object = Object::from_stored(&key, &origin, &bytes);
        out.push(Stored {
            key: origin,
            object,
            mod_revision: 0,
        });
    }
    Ok(out)
}

fn collect_files(
    dir: &std::path::Path,
    rel: &str,
    out: &mut Vec<(Key, PathBuf)>,
) -> Result<(), RegistryError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RegistryError::io(dir, e)),
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            collect_files(&p, &format!("{rel}/{name}"), out)?;
        } else if let Some(key) = name
            .strip_suffix(".json")
            .and_then(|s| Key::parse(&format!("{rel}/{s}")))
        {
            out.push((key, p));
        }
    }
    Ok(())
}

fn dir_apply(root: &std::path::Path, objects: &[Object]) -> Result<(), RegistryError> {
    // Stage every file first so that a failure leaves nothing half-written.
    let mut staged = Vec::new();
    for o in objects {
        let file = key_file(root, &o.key());
        let tmp = file.with_file_name(format!(".staged-{:016x}.json", rand::random::<u64>()));
        if let Err(e) = write_atomic(&tmp, o.to_json().as_bytes()) {
            for (t, _) in &staged {
                let _ = std::fs::remove_file(t);
            }
            return Err(e);
        }
        staged.push((tmp, file));
    }
    for (tmp, file) in staged {
        std::fs::rename(&tmp, &file).map_err(|e| RegistryError::io(&file, e))?;
    }
    Ok(())
}

/// Output formats of `halyard ctl get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML documents separated by `---`.
    Yaml,
    /// JSON: one object, or an array of objects.
    Json,
}

/// Renders objects as YAML documents or JSON. `single` renders one JSON object, not an array.
pub fn render(objects: &[Object], format: Format, single: bool) -> String {
    match format {
        Format::Json if single && objects.len() == 1 => objects[0].to_json_pretty() + "\n",
        Format::Json => {
            let items: Vec<String> = objects.iter().map(Object::to_json_pretty).collect();
            let indented: Vec<String> = items.iter().map(|i| i.replace('\n', "\n  ")).collect();
            if indented.is_empty() {
                "[]\n".to_owned()
            } else {
                format!("[\n  {}\n]\n", indented.join(",\n  "))
            }
        }
        Format::Yaml => objects
            .iter()
            .map(Object::to_yaml)
            .collect::<Vec<_>>()
            .join("---\n"),
    }
}

/// Renders sidecar statuses as a table, with one indented line per rejected key.
pub fn render_status_table(statuses: &[crate::model::Status]) -> String {
    let mut out = format!(
        "{:<32} {:>10}  {:<24}  {}\n",
        "SIDECAR", "REVISION", "APPLIED AT", "REJECTED"
    );
    for s in statuses {
        let at = humantime::format_rfc3339_seconds(s.applied_at).to_string();
        out.push_str(&format!(
            "{:<32} {:>10}  {:<24}  {}\n",
            s.sidecar,
            s.revision,
            at,
            s.rejected.len()
        ));
        for r in &s.rejected {
            out.push_str(&format!("    {}: {}\n", r.key, r.error));
        }
    }
    out
}
