//! An immutable view of the registry at one revision, with the lookups the data plane needs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{
    Action, Endpoint, ExternalService, MeshConfig, Object, OutboundTrafficPolicy, Policy, Route,
    Service,
};

/// Where a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Built from the live registry.
    Live,
    /// Loaded from the state dir because the registry was unreachable at start; `saved_at` is
    /// when the snapshot was last in contact with the registry.
    Persisted {
        /// When it was written to disk.
        saved_at: SystemTime,
    },
    /// Nothing known yet: the registry is unreachable and no snapshot was persisted.
    Empty,
}

/// The registry at one revision. Shared as `Arc<Snapshot>`; never changes once built.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The registry revision (etcd revision, or a counter for the directory backend).
    pub revision: i64,
    /// Services by name.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Routes by service name.
    pub routes: BTreeMap<String, Arc<Route>>,
    /// Policies by service name.
    pub policies: BTreeMap<String, Arc<Policy>>,
    /// Endpoints by service name, then endpoint id.
    pub endpoints: BTreeMap<String, BTreeMap<String, Arc<Endpoint>>>,
    /// The mesh config, if one is stored.
    pub meshconfig: Option<Arc<MeshConfig>>,
    /// ExternalServices by name.
    pub external_services: BTreeMap<String, Arc<ExternalService>>,
    /// The deny list, if one is stored.
    pub revocations: Option<Arc<crate::model::Revocations>>,
    /// The trust bundle, if one is stored.
    pub trust: Option<Arc<crate::model::TrustBundle>>,
    /// Links to other clusters by cluster name.
    pub links: BTreeMap<String, Arc<crate::model::ClusterLink>>,
    /// Quarantined keys (full key) and why; the last good value of each stays in force.
    pub rejected: BTreeMap<String, String>,
    /// Where this snapshot came from.
    pub origin: Origin,
    /// When this process built it: the moment the sidecar starts using it (the watch hands
    /// it to every reader at once). Reported as the status's `appliedAt`.
    pub built_at: SystemTime,
    vips: HashMap<IpAddr, String>,
}

impl Snapshot {
    /// An empty snapshot at revision 0.
    pub fn empty(origin: Origin) -> Self {
        Snapshot {
            revision: 0,
            services: BTreeMap::new(),
            routes: BTreeMap::new(),
            policies: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            meshconfig: None,
            external_services: BTreeMap::new(),
            revocations: None,
            trust: None,
            links: BTreeMap::new(),
            rejected: BTreeMap::new(),
            origin,
            built_at: SystemTime::now(),
            vips: HashMap::new(),
        }
    }

    /// Builds the lookup indexes; call after filling the maps.
    /// A snapshot at revision 0 holding `objects` (statuses are not part of a snapshot and are
    /// left out; a later object at the same key replaces an earlier one).
    pub fn of_objects(origin: Origin, objects: impl IntoIterator<Item = Object>) -> Self {
        let mut s = Snapshot::empty(origin);
        for obj in objects {
            match obj {
                Object::Service(o) => drop(s.services.insert(o.name.to_string(), Arc::new(o))),
                Object::Route(o) => drop(s.routes.insert(o.service.to_string(), Arc::new(o))),
                Object::Policy(o) => drop(s.policies.insert(o.service.to_string(), Arc::new(o))),
                Object::MeshConfig(o) => s.meshconfig = Some(Arc::new(o)),
                Object::Revocations(o) => s.revocations = Some(Arc::new(o)),
                Object::TrustBundle(o) => s.trust = Some(Arc::new(o)),
                Object::Endpoint(o) => drop(
                    s.endpoints
                        .entry(o.service.to_string())
                        .or_default()
                        .insert(o.id.clone(), Arc::new(o)),
                ),
                Object::Status(_) => {}
                Object::ExternalService(o) => {
                    drop(s.external_services.insert(o.name.to_string(), Arc::new(o)))
                }
                Object::ClusterLink(o) => drop(s.links.insert(o.cluster.to_string(), Arc::new(o))),
            }
        }
        s.index()
    }

    pub(crate) fn index(mut self) -> Self {
        self.vips = self
            .services
            .values()
            .filter_map(|s| s.vip.map(|v| (v, s.name.to_string())))
            .collect();
        self
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The service whose virtual IP is `vip`.
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<&Arc<Service>> {
        self.vips.get(&vip).and_then(|n| self.services.get(n))
    }

    /// The services that declare `port`.
    pub fn services_by_port(&self, port: u16) -> impl Iterator<Item = &Arc<Service>> + '_ {
        self.services
            .values()
            .filter(move |s| s.port(port).is_some())
    }

    /// The endpoints of `service`, ordered by id.
    pub fn endpoints_of(&self, service: &str) -> impl Iterator<Item = &Arc<Endpoint>> + '_ {
        self.endpoints
            .get(service)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// The route of `service`.
    pub fn route(&self, service: &str) -> Option<&Arc<Route>> {
        self.routes.get(service)
    }

    /// The policy of `service`.
    pub fn policy(&self, service: &str) -> Option<&Arc<Policy>> {
        self.policies.get(service)
    }

    /// The ExternalService a flow to `host` (SNI, `Host`, a CONNECT target) or `ip` on `port`
    /// belongs to: the first by name that covers it.
    pub fn external_service(
        &self,
        host: Option<&str>,
        ip: Option<IpAddr>,
        port: u16,
    ) -> Option<&Arc<ExternalService>> {
        self.external_services
            .values()
            .find(|e| e.covers(host, ip, port))
    }

    /// What a captured flow to an unknown destination meets (`MeshConfig.outboundTrafficPolicy`).
    pub fn outbound_traffic_policy(&self) -> OutboundTrafficPolicy {
        self.meshconfig
            .as_ref()
            .map_or(OutboundTrafficPolicy::default(), |m| {
                m.outbound_traffic_policy
            })
    }

    /// What services without a policy do: the mesh config's `defaultPolicy`, else allow.
    pub fn default_policy(&self) -> Action {
        self.meshconfig
            .as_ref()
            .map_or(Action::Allow, |m| m.default_policy)
    }

    /// Whether this snapshot came from disk (or from nowhere) rather than the live registry.
    pub fn loaded_from_disk(&self) -> bool {
        matches!(self.origin, Origin::Persisted { .. })
    }

    /// For a snapshot loaded from disk, when it was last in contact with the registry.
    pub fn stale_since(&self) -> Option<SystemTime> {
        match self.origin {
            Origin::Persisted { saved_at } => Some(saved_at),
            _ => None,
        }
    }

    /// Every object in the snapshot.
    pub fn objects(&self) -> Vec<Object> {
        let mut out: Vec<Object> = Vec::new();
        out.extend(
            self.services
                .values()
                .map(|o| Object::Service((**o).clone())),
        );
        out.extend(self.routes.values().map(|o| Object::Route((**o).clone())));
        out.extend(
            self.policies
                .values()
                .map(|o| Object::Policy((**o).clone())),
        );
        out.extend(
            self.meshconfig
                .iter()
                .map(|o| Object::MeshConfig((**o).clone())),
        );
        out.extend(
            self.revocations
                .iter()
                .map(|o| Object::Revocations((**o).clone())),
        );
        out.extend(
            self.trust
                .iter()
                .map(|o| Object::TrustBundle((**o).clone())),
        );
        let eps = self.endpoints.values().flat_map(|m| m.values());
        out.extend(eps.map(|o| Object::Endpoint((**o).clone())));
        out.extend(
            self.external_services
                .values()
                .map(|o| Object::ExternalService((**o).clone())),
        );
        out.extend(
            self.links
                .values()
                .map(|o| Object::ClusterLink((**o).clone())),
        );
        out
    }

    /// The same objects, ignoring revision and origin: used to compare two snapshots' content.
    pub fn content(&self) -> String {
        let mut lines: Vec<String> = self.objects().iter().map(Object::to_json).collect();
        lines.sort();
        lines.join("\n")
    }
}
