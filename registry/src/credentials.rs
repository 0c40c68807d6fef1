//! etcd user credentials: a user name and password for etcd's authentication (etcd RBAC, "Role-based
//! access control" in the etcd v3 docs), read from a file so that no password sits in a config
//! file, a command line or an etcd value.
//!
//! The file holds one line `user:password`, the form `etcdctl --user` takes (the user ends at the
//! first `:`; the password may contain `:`). A trailing newline is ignored. The password is never
//! printed: `Debug` shows the user only.

use std::fmt;
use std::path::Path;

use crate::error::RegistryError;

/// Longest credentials file read, in bytes.
const MAX_FILE: u64 = 4096;

/// A user name and password for etcd's authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
    /// The file they were read from, for error messages.
    source: Option<String>,
}

impl Credentials {
    /// Credentials of `user` with `password`. Errors: an empty user or password, a user with
    /// `:` or a control character, a password with a newline.
    /// Errors never quote the password, nor a user name that may hold part of it.
    pub fn new(user: &str, password: &str) -> Result<Self, String> {
        if user.is_empty() {
            return Err("the user name is empty".into());
        }
        if user.contains(':') || user.chars().any(char::is_control) {
            return Err("the user name contains ':' or a control character".into());
        }
        if password.is_empty() {
            return Err("the password is empty".into());
        }
        if password.contains(['\n', '\r', '\0']) {
            return Err("the password contains a line break or NUL".into());
        }
        if password.trim() != password || user.trim() != user {
            return Err(
                "the user name or password begins or ends with whitespace (a stray space?); \
                 etcd would refuse it as a wrong password"
                    .into(),
            );
        }
        Ok(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            source: None,
        })
    }

    /// Parses `user:password` (one line; a trailing newline and a leading byte-order mark are
    /// ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let line = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(text);
        if line.contains(['\n', '\r']) {
            return Err("expected one line user:password; the file has more than one".into());
        }
        let Some((user, password)) = line.split_once(':') else {
            return Err("expected one line user:password".into());
        };
        Self::new(user, password)
    }

    /// The user, quoted, with the file the credentials came from if known: what error
    /// messages show.
    pub fn describe(&self) -> String {
        match &self.source {
            Some(path) => format!("{:?} (credentials file {path})", self.user),
            None => format!("{:?}", self.user),
        }
    }

    /// Reads `user:password` from `path`. Errors name the file: missing or unreadable, larger
    /// than 4 KiB, not UTF-8, or not `user:password`.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::Credentials {
            path: path.display().to_string(),
            reason,
        };
        let bytes = read_bounded(path, MAX_FILE)?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        let mut credentials = Self::parse(&text).map_err(bad)?;
        credentials.source = Some(path.display().to_string());
        Ok(credentials)
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How a client reaches etcd: the user it authenticates as and the TLS settings of an
/// `etcds://` URL. `Default`: neither (plain `etcd://`, no authentication).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The etcd user (etcd RBAC), if any.
    pub credentials: Option<Credentials>,
    /// TLS for `etcds://` URLs; required by them and refused with `etcd://`.
    pub tls: Option<EtcdTls>,
}

/// TLS towards etcd (etcd's `--cert-file`/`--trusted-ca-file` setup, "Transport security" in
/// the etcd docs): the CA that signed etcd's serving certificate and, for etcd's
/// `--client-cert-auth`, this client's certificate and key. PEM bytes as read; checked when
/// the client connects. The key is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub(crate) ca: Vec<u8>,
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// Reads the CA file and, when given, the client certificate and key files (both or
    /// neither). Errors name the file: missing, unreadable, larger than 1 MiB, or holding no
    /// PEM block of the expected kind.
    pub fn from_files(ca: &Path, client: Option<(&Path, &Path)>) -> Result<Self, RegistryError> {
        let ca = read_pem(ca, "CERTIFICATE")?;
        let identity = match client {
            Some((cert, key)) => Some((
                read_pem(cert, "CERTIFICATE")?,
                read_pem(key, "PRIVATE KEY")?,
            )),
            None => None,
        };
        Ok(EtcdTls { ca, identity })
    }
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_bytes", &self.ca.len())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// Longest PEM file read, in bytes.
const MAX_PEM: u64 = 1 << 20;

/// The bytes of `path`, which must hold a PEM block whose label ends with `label`.
fn read_pem(path: &Path, label: &str) -> Result<Vec<u8>, RegistryError> {
    let bytes = read_bounded(path, MAX_PEM)?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(RegistryError::Credentials {
            path: path.display().to_string(),
            reason: format!("no PEM block \"{label}\" in it"),
        });
    }
    Ok(bytes)
}

/// The bytes of the regular file `path`, at most `max` of them; errors name the file.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, RegistryError> {
    let bad = |reason: String| RegistryError::Credentials {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > max {
        return Err(bad(format!("larger than {max} bytes")));
    }
    std::fs::read(path).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_etcdctl_form() {
        let c = Credentials::parse("reader:s3:cr3t\n").unwrap();
        assert_eq!((c.user(), c.password()), ("reader", "s3:cr3t"));
        let c = Credentials::parse("reader:pw\r\n").unwrap();
        assert_eq!(c.password(), "pw");
    }

    #[test]
    fn rejects_what_is_not_user_password() {
        for (text, want) in [
            ("", "expected one line"),
            ("reader\n", "expected one line"),
            (":pw", "user name is empty"),
            ("reader:", "password is empty"),
            ("reader:pw\nsecond line", "more than one"),
            ("rw\np@ss w:o\"rd", "more than one"),
            ("re\tader:pw", "control character"),
            ("reader:pw ", "whitespace"),
            (" reader:pw", "whitespace"),
        ] {
            let err = Credentials::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_user() {
        let c = Credentials::parse("\u{feff}reader:pw\r\n").unwrap();
        assert_eq!(c.user(), "reader");
    }

    #[test]
    fn no_error_shows_any_part_of_the_password() {
        for text in ["rw\np@ss w:o\"rd", "r\u{7}w:secret", "rw:secret \n"] {
            let err = Credentials::parse(text).unwrap_err();
            assert!(!err.contains("p@ss") && !err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credentials::new("reader", "hunter2").unwrap();
        let shown = format!("{c:?}");
        assert!(
            shown.contains("reader") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn tls_files_must_hold_the_pem_they_stand_for() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let tls = EtcdTls::from_files(&cert, Some((&cert, &key))).unwrap();
        assert!(!format!("{tls:?}").contains("PRIVATE"), "{tls:?}");
        let err = EtcdTls::from_files(&key, None).unwrap_err().to_string();
        assert!(
            err.contains("key.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let err = EtcdTls::from_files(&cert, Some((&cert, &cert)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("PRIVATE KEY"), "{err}");
        let err = EtcdTls::from_files(&dir.path().join("none"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("none"), "{err}");
    }

    #[test]
    fn a_file_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        let err = Credentials::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("creds"), "{err}");
        std::fs::write(&path, "nocolon\n").unwrap();
        let err = Credentials::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("creds") && err.contains("user:password"),
            "{err}"
        );
        std::fs::write(&path, vec![b'a'; 5000]).unwrap();
        let err = Credentials::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        std::fs::write(&path, "reader:pw\n").unwrap();
        assert_eq!(Credentials::from_file(&path).unwrap().user(), "reader");
    }
}
