//! Halyard's registry: the object model and its validation, the [`Registry`] trait, and its two
//! backends (etcd and a directory).
//!
//! # Public API used by the sidecar
//!
//! - [`open`]`(url, mesh, state_dir, sidecar_id) -> Arc<dyn Registry>` for
//!   `etcd://host:port[,host:port...]` or `file://DIR`; [`open_with`] takes [`Options`]
//!   (lease TTL, timeouts). It returns at once: with the live registry, else the snapshot
//!   persisted under `state_dir` (static stability), retrying in the background.
//! - [`Registry`]: `snapshot() -> Arc<Snapshot>`, `watch() -> watch::Receiver<Arc<Snapshot>>`,
//!   `register(Endpoint) -> Registration` (etcd: on a lease, keepalive every TTL/3,
//!   re-registered when lost; drop the handle and the endpoint expires), `deregister`,
//!   `write_status(Status)`, `staleness()` (for `halyard_registry_stale_seconds`) and
//!   `rejected_total()` (for `halyard_registry_rejected_keys`).
//! - [`Snapshot`]: `revision`, `services`, `routes`, `policies`, `endpoints` (service, then id),
//!   `meshconfig`, `rejected` (quarantined key -> reason), `origin` (live, persisted, empty);
//!   lookups `service`, `service_by_vip`, `services_by_port`, `endpoints_of`, `route`, `policy`,
//!   `default_policy`.
//! - [`model`]: `Service`, `Route`, `Policy`, `MeshConfig`, `Endpoint`, `Status` (DESIGN.md §8,
//!   camelCase). Values only exist validated: regexes compiled, durations parsed, names checked.
//!   Build them from text with [`model::parse_documents`] (YAML or JSON, several per file) or
//!   [`Object::from_stored`] (one stored value, checked against its key).
//! - [`admin::Admin`]: list, apply (all or nothing, compare-and-swap) and delete, for `ctl`.
//! - [`ports::free`]: a port for a child process to listen on, outside the kernel's ephemeral
//!   range (the demo; etcd, sidecar processes and the scale bench in tests and benches).
//! - Feature `test-util`: [`test_util::EtcdServer`], a real etcd per test.
//!
//! # Layout
//!
//! etcd: `/halyard/<mesh>/{services/<name>, routes/<service>, policies/<service>,
//! endpoints/<service>/<id>, meshconfig, status/<sidecar-id>}`, JSON values (see [`key`]).
//! Directory (`file://DIR`): the same keys as files, `DIR/<mesh>/<key>.json`, e.g.
//! `DIR/default/services/reviews.json` and `DIR/default/meshconfig.json`; written atomically
//! (temp file + rename), watched with inotify plus a rescan every 2 s. The persisted snapshot is
//! `<state_dir>/registry-<mesh>.json`.
//!
//! # Quarantine
//!
//! A stored value that is not JSON or fails validation is not applied: the last good value of
//! that key stays in force, the key and reason go to `Snapshot::rejected` and to this sidecar's
//! status key `/halyard/<mesh>/status/<sidecar-id>`, the counter goes up and one log line is
//! written. Other keys keep flowing.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ca_store;
mod credentials;
mod dir;
pub mod error;
mod etcd;
pub mod key;
pub mod model;
mod persist;
pub mod ports;
mod registry;
pub mod snapshot;
mod store;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use credentials::{Access, Credentials, EtcdTls};
pub use error::{RegistryError, ValidationError};
pub use key::{mesh_prefix, Key};
pub use model::{Kind, Object};
pub use registry::{open, open_with, BoxFuture, Options, Registration, Registry, RegistryUrl};
pub use snapshot::{Origin, Snapshot};
