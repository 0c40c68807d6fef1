//! The static key behind an endpoint's stateless reset tokens (RFC 9000 §10.3), kept across
//! restarts.
//!
//! quinn computes the token of each connection ID it issues as HMAC-SHA256(key, ID), and a
//! process that receives a packet for a connection it does not know answers with the token of
//! that packet's destination ID. With a key made at random per process (quinn's default), a
//! sidecar killed and started again at the same address answers its peers' packets with tokens
//! they cannot recognise, so they keep sending into the dead connection until their idle
//! timeout (30 s by default) and every flow they put on it fails meanwhile. With the same key
//! the restarted process's first answer ends each such connection at once, and the pool opens a
//! fresh one.
//!
//! RFC 9000 §10.3.2 describes this design ("a static key ... used to generate tokens") and its
//! conditions: the key is secret (a regular file of mode 0600 under the sidecar's state folder;
//! a file others may read, a symlink or anything but 32 bytes is refused), and two endpoints
//! never share it: the key quinn gets is derived from the file's and the endpoint's advertised
//! address ([`ResetKey::for_endpoint`]), so sidecars that share a state folder, or a cloned
//! image that carries the file, still make different tokens.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

/// Length of the key, bytes (the output length of SHA-256, RFC 2104 §3).
pub const RESET_KEY_LEN: usize = 32;

/// The key of an endpoint's stateless reset tokens. The bytes are wiped on drop.
pub struct ResetKey(Zeroizing<[u8; RESET_KEY_LEN]>);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

/// Why a reset key file could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum ResetKeyError {
    /// The path is not a regular file (a symlink, a folder, a device, a FIFO).
    #[error("{path}: not a regular file; a stateless reset key file must be one")]
    NotRegular {
        /// The file.
        path: String,
    },
    /// Others than the owner may read or write the file.
    #[error("{path}: mode {mode:04o}; a stateless reset key must be readable by its owner only (chmod 600)")]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file or its folder could not be read, created or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file exists but does not hold exactly one key.
    #[error(
        "{path}: {len} bytes; a stateless reset key file holds exactly {RESET_KEY_LEN} \
         (delete it to make a new one: peers then wait out their idle timeout once)"
    )]
    Length {
        /// The file.
        path: String,
        /// Its size in bytes.
        len: usize,
    },
}

impl ResetKey {
    /// A key for this process only (quinn's default behaviour): a restart is not recognised.
    pub fn random() -> Self {
        use rand::RngExt as _;
        let mut key = Zeroizing::new([0u8; RESET_KEY_LEN]);
        rand::rng().fill(&mut key[..]);
        ResetKey(key)
    }

    /// The key in `path`, or a new random one written there first (the folder is created; the
    /// file has mode 0600 and appears whole: written beside it, synced, then renamed).
    ///
    /// Errors: the folder or file cannot be created, read or written; the path is not a regular
    /// file (a symlink is not followed); its size is not [`RESET_KEY_LEN`] bytes; its mode lets
    /// others than the owner read or write it. An existing file is never changed.
    pub fn load_or_create(path: &Path) -> Result<Self, ResetKeyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let shown = || path.display().to_string();
        let io = |source| ResetKeyError::Io {
            path: shown(),
            source,
        };
        // Checked before reading: a FIFO would block the start, a device would never end.
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_file() => {
                return Err(ResetKeyError::NotRegular { path: shown() })
            }
            Ok(meta) if meta.len() != RESET_KEY_LEN as u64 => {
                return Err(ResetKeyError::Length {
                    path: shown(),
                    len: usize::try_from(meta.len()).unwrap_or(usize::MAX),
                })
            }
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                return Err(ResetKeyError::Permissions {
                    path: shown(),
                    mode: meta.permissions().mode() & 0o7777,
                })
            }
            _ => {}
        }
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let key: [u8; RESET_KEY_LEN] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| ResetKeyError::Length {
                            path: path.display().to_string(),
                            len: bytes.len(),
                        })?;
                Ok(ResetKey(Zeroizing::new(key)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ResetKey::random();
                key.write(path).map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // A fresh name, created exclusively (O_EXCL: an existing file or symlink there fails
        // the write instead of being followed or reused).
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{:016x}", rand::random::<u64>()));
        let tmp = std::path::PathBuf::from(tmp);
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&self.0[..])?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// The key of the endpoint advertised at `addr`: HMAC-SHA256(this key, a fixed label ‖
    /// `addr`), so endpoints that were given the same key file still make different tokens
    /// (RFC 9000 §10.3.2), while one endpoint gets the same key at every start.
    pub fn for_endpoint(&self, addr: std::net::SocketAddr) -> ResetKey {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0[..]);
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(b"halyard quic stateless reset v1\0");
        ctx.update(addr.to_string().as_bytes());
        let mut out = Zeroizing::new([0u8; RESET_KEY_LEN]);
        out.copy_from_slice(ctx.sign().as_ref());
        ResetKey(out)
    }

    /// The HMAC-SHA256 key quinn's `EndpointConfig::new` takes.
    pub(crate) fn hmac(&self) -> Arc<dyn quinn::crypto::HmacKey> {
        Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0[..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("quic-reset-key");
        let made = ResetKey::load_or_create(&path).unwrap();
        let read = ResetKey::load_or_create(&path).unwrap();
        assert_eq!(made.0[..], read.0[..]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // Same key, same token for a connection ID: what a restarted process must give.
        let (a, b) = (made.hmac(), read.hmac());
        let (mut ta, mut tb) = ([0u8; 32], [0u8; 32]);
        a.sign(b"connection id", &mut ta);
        b.sign(b"connection id", &mut tb);
        assert_eq!(ta, tb);
        // Nothing left beside it.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn endpoints_sharing_a_key_file_get_different_keys_each_the_same_at_every_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quic-reset-key");
        let (a, b): (std::net::SocketAddr, std::net::SocketAddr) = (
            "10.0.0.1:15443".parse().unwrap(),
            "10.0.0.2:15443".parse().unwrap(),
        );
        let first = ResetKey::load_or_create(&path).unwrap();
        let again = ResetKey::load_or_create(&path).unwrap();
        assert_eq!(first.for_endpoint(a).0[..], again.for_endpoint(a).0[..]);
        assert_ne!(first.for_endpoint(a).0[..], first.for_endpoint(b).0[..]);
        assert_ne!(first.for_endpoint(a).0[..], first.0[..]);
    }

    #[test]
    fn a_key_file_others_may_read_a_symlink_or_a_fifo_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quic-reset-key");
        ResetKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ResetKey::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = ResetKey::load_or_create(&link).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // A FIFO is refused before any read (which would block).
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let e = ResetKey::load_or_create(&fifo).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn two_random_keys_differ() {
        assert_ne!(ResetKey::random().0[..], ResetKey::random().0[..]);
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quic-reset-key");
        std::fs::write(&path, b"short").unwrap();
        let e = ResetKey::load_or_create(&path).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("quic-reset-key") && text.contains("5 bytes"),
            "{text}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
    }

    #[test]
    fn an_unwritable_folder_is_reported_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        // A folder under a regular file cannot be made.
        let e = ResetKey::load_or_create(&file.join("quic-reset-key")).unwrap_err();
        assert!(e.to_string().contains("a-file/quic-reset-key"), "{e}");
    }
}
