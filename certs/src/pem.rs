//! PEM reading and writing, and files written atomically with the right mode.

use std::io::Write;
use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::CertError;

/// Reads a text file.
pub fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|e| CertError::io(path, e))
}

/// Every CERTIFICATE block of a PEM text, in order; at least one.
pub fn certs(text: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let blocks = ::pem::parse_many(text).map_err(|e| CertError::Pem(e.to_string()))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(certs)
}

/// The first PKCS#8 PRIVATE KEY block of a PEM text.
pub fn key(text: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    let blocks = ::pem::parse_many(text).map_err(|e| CertError::Pem(e.to_string()))?;
    blocks
        .into_iter()
        .find(|b| b.tag() == "PRIVATE KEY")
        .map(|b| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(b.into_contents())))
        .ok_or(CertError::NoKey)
}

/// One certificate as PEM.
pub fn encode_cert(der: &CertificateDer<'_>) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Writes `contents` to `path` atomically (temp file in the same folder, then rename), with the
/// given Unix mode, so a reader never sees half a file and a key is never world-readable.
pub fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write_mode(&tmp, contents, mode).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| CertError::io(path, e))
}

fn write_mode(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}
