//! What the CA servers share: bootstrap token records, stored by the SHA-256 of the token only.
//!
//! They live outside the mesh prefix the sidecars watch, so no sidecar ever reads them and none
//! quarantines them as unknown keys:
//!
//! ```text
//! etcd:       /halyard-ca/<mesh>/tokens/<sha256-hex>                JSON TokenRecord
//! directory:  DIR/.halyard-ca/<mesh>/tokens/<sha256-hex>.json
//! ```
//!
//! Every replica of the CA on etcd sees the same records; a use is a compare-and-swap on the
//! key's `mod_revision`, so two replicas can never both spend a token's last use. The directory
//! backend serializes uses inside one process only: run one CA replica on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use halyard_certs::enroll::TokenRecord;

use crate::error::RegistryError;
use crate::etcd::Etcd;
use crate::model::check_mesh;
use crate::persist::write_atomic;
use crate::registry::RegistryUrl;

/// A token record as read, with the version a later [`CaStore::spend_token`] compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// The record.
    pub record: TokenRecord,
    /// etcd `mod_revision` of the key; for a directory, the record itself is compared.
    version: i64,
}

/// The CA's shared state in the registry.
#[derive(Clone)]
pub struct CaStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Etcd {
        etcd: Box<Etcd>,
        prefix: String,
    },
    Dir {
        dir: PathBuf,
        lock: Arc<tokio::sync::Mutex<()>>,
    },
}

impl std::fmt::Debug for CaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Etcd { prefix, .. } => write!(f, "CaStore(etcd {prefix})"),
            Backend::Dir { dir, .. } => write!(f, "CaStore({})", dir.display()),
        }
    }
}

impl CaStore {
    /// Opens the CA's state of `mesh` in the registry at `url` with `access` (an etcd user,
    /// TLS for `etcds://`; the directory backend ignores it); etcd requests give up after
    /// `timeout`.
    pub async fn connect(
        url: &str,
        mesh: &str,
        timeout: Duration,
        access: &crate::Access,
    ) -> Result<Self, RegistryError> {
        check_mesh(mesh)?;
        let backend = match RegistryUrl::parse(url)? {
            RegistryUrl::Etcd(eps) => Backend::Etcd {
                etcd: Box::new(Etcd::connect(&eps, timeout, access).await?),
                prefix: format!("/halyard-ca/{mesh}/tokens/"),
            },
            RegistryUrl::Dir(root) => {
                if !root.is_dir() {
                    return Err(RegistryError::NotFound(format!(
                        "registry directory {}",
                        root.display()
                    )));
                }
                Backend::Dir {
                    dir: root.join(".halyard-ca").join(mesh).join("tokens"),
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                }
            }
        };
        Ok(CaStore { backend })
    }

    /// Stores a new token record under `hash`; refuses to replace an existing one.
    pub async fn create_token(
        &self,
        hash: &str,
        record: &TokenRecord,
    ) -> Result<(), RegistryError> {
        let json = encode(hash, record)?;
        match &self.backend {
            Backend::Etcd { etcd, prefix } => {
                let key = format!("{prefix}{hash}");
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(key.clone(), json, None)]);
                let mut kv = etcd.client.kv_client();
                if !etcd.call(kv.txn(txn)).await?.succeeded() {
                    return Err(RegistryError::Conflict(key));
                }
                Ok(())
            }
            Backend::Dir { dir, lock } => {
                let _held = lock.lock().await;
                let file = dir.join(format!("{hash}.json"));
                if file.exists() {
                    return Err(RegistryError::Conflict(file.display().to_string()));
                }
                write_atomic(&file, json.as_bytes())
            }
        }
    }

    /// The record stored under `hash`, if any. A value that does not decode is an error naming
    /// the key (it is never treated as a valid token).
    pub async fn get_token(&self, hash: &str) -> Result<Option<StoredToken>, RegistryError> {
        match &self.backend {
            Backend::Etcd { etcd, prefix } => {
                let key = format!("{prefix}{hash}");
                let mut kv = etcd.client.kv_client();
                let resp = etcd.call(kv.get(key.clone(), None)).await?;
                let Some(kv) = resp.kvs().first() else {
                    return Ok(None);
                };
                let record = decode(&key, kv.value())?;
                Ok(Some(StoredToken {
                    record,
                    version: kv.mod_revision(),
                }))
            }
            Backend::Dir { dir, .. } => {
                let file = dir.join(format!("{hash}.json"));
                let bytes = match std::fs::read(&file) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(RegistryError::io(&file, e)),
                };
                let record = decode(&file.display().to_string(), &bytes)?;
                Ok(Some(StoredToken { record, version: 0 }))
            }
        }
    }

    /// Writes the record after one use, if nobody changed it since `read`; false if somebody did
    /// (read again and decide again).
    pub async fn spend_token(&self, hash: &str, read: &StoredToken) -> Result<bool, RegistryError> {
        let json = encode(hash, &read.record.spent())?;
        match &self.backend {
            Backend::Etcd { etcd, prefix } => {
                let key = format!("{prefix}{hash}");
                let txn = Txn::new()
                    .when(vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        read.version,
                    )])
                    .and_then(vec![TxnOp::put(key, json, None)]);
                let mut kv = etcd.client.kv_client();
                Ok(etcd.call(kv.txn(txn)).await?.succeeded())
            }
            Backend::Dir { dir, lock } => {
                let _held = lock.lock().await;
                if self.get_token(hash).await?.as_ref() != Some(read) {
                    return Ok(false);
                }
                write_atomic(&dir.join(format!("{hash}.json")), json.as_bytes())?;
                Ok(true)
            }
        }
    }
}

fn encode(hash: &str, record: &TokenRecord) -> Result<String, RegistryError> {
    serde_json::to_string(record).map_err(|e| RegistryError::Json(hash.to_owned(), e))
}

fn decode(key: &str, bytes: &[u8]) -> Result<TokenRecord, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Json(key.to_owned(), e))
}
