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
}

impl Credentials {
    /// Credentials of `user` with `password`. Errors: an empty user or password, a user with
    /// `:` or a control character, a password with a newline.
    pub fn new(user: &str, password: &str) -> Result<Self, String> {
        if user.is_empty() {
            return Err("the user name is empty".into());
        }
        if user.contains(':') || user.chars().any(char::is_control) {
            return Err(format!(
                "the user name {user:?} contains ':' or a control character"
            ));
        }
        if password.is_empty() {
            return Err("the password is empty".into());
        }
        if password.contains(['\n', '\r', '\0']) {
            return Err("the password contains a line break or NUL".into());
        }
        Ok(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// Parses `user:password` (one line; a trailing newline is ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        let line = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(text);
        let Some((user, password)) = line.split_once(':') else {
            return Err("expected one line user:password".into());
        };
        Self::new(user, password)
    }

    /// Reads `user:password` from `path`. Errors name the file: missing or unreadable, larger
    /// than 4 KiB, not UTF-8, or not `user:password`.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::Credentials {
            path: path.display().to_string(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.len() > MAX_FILE {
            return Err(bad(format!("larger than {MAX_FILE} bytes")));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        Self::parse(&text).map_err(bad)
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
            ("reader:pw\nsecond line", "line break"),
            ("re\tader:pw", "control character"),
        ] {
            let err = Credentials::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
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
