//! The key layout (DESIGN.md §4), relative to the mesh prefix `/halyard/<mesh>/`.
//!
//! ```text
//! services/<service>         Service
//! routes/<service>           Route
//! policies/<service>         Policy
//! endpoints/<service>/<id>   Endpoint (on a lease)
//! meshconfig                 MeshConfig
//! status/<sidecar-id>        Status
//! externalservices/<name>    ExternalService
//! revocations                Revocations (deny list of ids and serials)
//! trust                      TrustBundle (the mesh roots every sidecar trusts)
//! links/<cluster>            ClusterLink (another cluster's registry and gateway)
//! ```

use std::fmt;

use crate::model::Kind;

/// A registry key, relative to the mesh prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `services/<name>`.
    Service(String),
    /// `routes/<service>`.
    Route(String),
    /// `policies/<service>`.
    Policy(String),
    /// `endpoints/<service>/<id>`.
    Endpoint(String, String),
    /// `meshconfig`.
    MeshConfig,
    /// `status/<sidecar-id>`.
    Status(String),
    /// `externalservices/<name>`.
    ExternalService(String),
    /// `revocations`.
    Revocations,
    /// `trust`.
    Trust,
    /// `links/<cluster>`.
    ClusterLink(String),
}

/// The prefix of every key of `mesh`: `/halyard/<mesh>/`.
pub fn mesh_prefix(mesh: &str) -> String {
    format!("/halyard/{mesh}/")
}

impl Key {
    /// Parses a relative key such as `services/reviews`; `None` if it fits no kind.
    pub fn parse(rel: &str) -> Option<Key> {
        let parts: Vec<&str> = rel.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        match parts.as_slice() {
            ["services", n] => Some(Key::Service((*n).to_owned())),
            ["routes", n] => Some(Key::Route((*n).to_owned())),
            ["policies", n] => Some(Key::Policy((*n).to_owned())),
            ["endpoints", s, id] => Some(Key::Endpoint((*s).to_owned(), (*id).to_owned())),
            ["meshconfig"] => Some(Key::MeshConfig),
            ["status", id] => Some(Key::Status((*id).to_owned())),
            ["externalservices", n] => Some(Key::ExternalService((*n).to_owned())),
            ["revocations"] => Some(Key::Revocations),
            ["trust"] => Some(Key::Trust),
            ["links", c] => Some(Key::ClusterLink((*c).to_owned())),
            _ => None,
        }
    }

    /// Builds the key of an object of `kind` named `name` (for endpoints `service/id`).
    pub fn of(kind: Kind, name: &str) -> Option<Key> {
        match kind {
            Kind::MeshConfig => Some(Key::MeshConfig),
            Kind::Revocations => Some(Key::Revocations),
            Kind::TrustBundle => Some(Key::Trust),
            _ => Key::parse(&format!("{}/{name}", kind.plural())).filter(|k| k.kind() == kind),
        }
    }

    /// The relative key, e.g. `services/reviews`.
    pub fn path(&self) -> String {
        match self {
            Key::Service(n) => format!("services/{n}"),
            Key::Route(n) => format!("routes/{n}"),
            Key::Policy(n) => format!("policies/{n}"),
            Key::Endpoint(s, id) => format!("endpoints/{s}/{id}"),
            Key::MeshConfig => "meshconfig".to_owned(),
            Key::Status(id) => format!("status/{id}"),
            Key::ExternalService(n) => format!("externalservices/{n}"),
            Key::Revocations => "revocations".to_owned(),
            Key::Trust => "trust".to_owned(),
            Key::ClusterLink(c) => format!("links/{c}"),
        }
    }

    /// The full etcd key under `mesh`.
    pub fn full(&self, mesh: &str) -> String {
        format!("{}{}", mesh_prefix(mesh), self.path())
    }

    /// The kind of object stored here.
    pub fn kind(&self) -> Kind {
        match self {
            Key::Service(_) => Kind::Service,
            Key::Route(_) => Kind::Route,
            Key::Policy(_) => Kind::Policy,
            Key::Endpoint(..) => Kind::Endpoint,
            Key::MeshConfig => Kind::MeshConfig,
            Key::Status(_) => Kind::Status,
            Key::ExternalService(_) => Kind::ExternalService,
            Key::Revocations => Kind::Revocations,
            Key::Trust => Kind::TrustBundle,
            Key::ClusterLink(_) => Kind::ClusterLink,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for k in [
            "services/a",
            "routes/a",
            "policies/a",
            "endpoints/a/b",
            "meshconfig",
            "status/s1",
            "externalservices/e",
            "revocations",
            "trust",
            "links/b",
        ] {
            assert_eq!(Key::parse(k).unwrap().path(), k);
        }
        for bad in [
            "services",
            "services/a/b",
            "endpoints/a",
            "x/y",
            "services/",
            "meshconfig/x",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad}");
        }
        assert_eq!(
            Key::of(Kind::Endpoint, "a/b"),
            Some(Key::Endpoint("a".into(), "b".into()))
        );
        assert_eq!(
            Key::MeshConfig.full("default"),
            "/halyard/default/meshconfig"
        );
    }
}
