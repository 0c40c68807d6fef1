//! Errors of the registry: validation failures and backend failures.

use std::fmt;

/// A registry object that failed to parse or validate.
///
/// It names where the object came from (`origin`: a file, a file and document, or an etcd key),
/// the field path inside the object (`rules[1].backends[0].weight`, empty for the object as a
/// whole) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The file, document or key the object came from.
    pub origin: String,
    /// The path of the offending field, e.g. `rules[1].backends[0].weight`.
    pub path: String,
    /// What is wrong and, where possible, what would be valid.
    pub reason: String,
}

impl ValidationError {
    /// An error about `path` (relative to the object) with `reason`; the origin is filled in later.
    pub fn at(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError {
            origin: String::new(),
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Sets where the object came from.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }

    /// The message without the origin: `path: reason`.
    pub fn detail(&self) -> String {
        if self.path.is_empty() {
            self.reason.clone()
        } else {
            format!("{}: {}", self.path, self.reason)
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.origin.is_empty() {
            f.write_str(&self.detail())
        } else {
            write!(f, "{}: {}", self.origin, self.detail())
        }
    }
}

impl std::error::Error for ValidationError {}

/// What can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry URL is not `etcd://host:port[,host:port...]` or `file://DIR`.
    #[error("bad registry url {url:?}: {reason} (expected etcd://host:port[,host:port...], etcds://host:port[,...] or file:///dir)")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The mesh name is not a DNS-1123 label.
    #[error("bad mesh name {0:?}: expected a DNS-1123 label (lowercase letters, digits, '-')")]
    BadMesh(String),
    /// An object failed validation.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// etcd could not be reached in time.
    #[error(
        "etcd at {endpoints} is unreachable: {reason} (is etcd running, and is the address right?)"
    )]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last error seen.
        reason: String,
    },
    /// The etcd member that answered has no leader: the cluster lost quorum.
    #[error(
        "etcd at {0} has no leader: a majority of its members is down or cut off (quorum lost); \
         writes fail until a majority is back, and sidecars serve their last snapshot meanwhile"
    )]
    NoLeader(String),
    /// An etcd request failed.
    #[error("etcd request failed: {0}")]
    Etcd(etcd_client::Error),
    /// An etcd request took longer than allowed.
    #[error(
        "etcd request timed out after {0:?} (is the cluster healthy and does it have a leader?)"
    )]
    Timeout(std::time::Duration),
    /// An endpoint's lease expired before a keepalive renewed it.
    #[error("lease {0:x} expired")]
    LeaseLost(i64),
    /// An etcd member answered with a revision older than one already applied.
    #[error("etcd answered at revision {seen}, behind the applied revision {applied}")]
    Behind {
        /// The revision in the answer.
        seen: i64,
        /// The revision already applied.
        applied: i64,
    },
    /// A compare-and-swap write lost a race with another writer, several times in a row.
    #[error("the registry changed while writing {0}; nothing was written, try again")]
    Conflict(String),
    /// A file or directory operation failed.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The file watcher failed.
    #[error("watching {path} failed: {error}")]
    Notify {
        /// The directory watched.
        path: String,
        /// The underlying error.
        error: notify::Error,
    },
    /// A stored value could not be encoded or decoded.
    #[error("{0}: {1}")]
    Json(String, serde_json::Error),
    /// The object asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The operation does not apply to this kind of object.
    #[error("{0}")]
    Unsupported(String),
    /// A credentials file cannot be used.
    #[error("credentials file {path}: {reason}")]
    Credentials {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// etcd refused the credentials given (wrong user or password), or was given none and
    /// requires them, or was given some with authentication disabled.
    #[error("etcd at {endpoints} refused authentication: {reason}")]
    Unauthenticated {
        /// The endpoints tried.
        endpoints: String,
        /// etcd's answer, with what to change.
        reason: String,
    },
    /// The etcd user may not do this (etcd RBAC: its roles grant no such permission on the key).
    #[error("etcd at {endpoints} denied {user}: {reason} (grant the user's role the permission on the mesh's key prefix)")]
    PermissionDenied {
        /// The endpoints tried.
        endpoints: String,
        /// The user, or "a caller without credentials".
        user: String,
        /// etcd's answer.
        reason: String,
    },
}

impl RegistryError {
    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<std::path::Path>, error: std::io::Error) -> Self {
        RegistryError::Io {
            path: path.as_ref().display().to_string(),
            error,
        }
    }
}
