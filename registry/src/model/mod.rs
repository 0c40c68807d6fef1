//! Registry objects (DESIGN.md §8), parsed rather than validated.
//!
//! A value of any type here is known good: names are DNS-1123 labels, ports are 1-65535 and unique
//! per service, regexes are compiled, durations are positive, retry attempts are at most
//! [`MAX_RETRY_ATTEMPTS`], percentages are 0-100, identities are SPIFFE ids (or a trailing `*`
//! glob). The only way in is [`Object::from_value`] and its wrappers, which name the field path
//! of the first problem. Every type serializes back to the camelCase wire shape of §8.

mod check;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use halyard_certs::{SpiffeId, TrustDomain};
use serde::{Serialize, Serializer};

pub use check::Percent;
pub use validate::{parse_documents, MAX_RETRY_ATTEMPTS, MAX_WEIGHT};

use crate::error::ValidationError;
use crate::key::Key;

/// Labels of an endpoint, and label selectors (subsets): key to value.
pub type Labels = BTreeMap<String, String>;

/// A DNS-1123 label: service names, port names, namespaces, mesh names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// Parses a DNS-1123 label.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        check::dns_label("", s)?;
        Ok(Name(s.to_owned()))
    }

    pub(crate) fn at(path: &str, s: &str) -> Result<Self, ValidationError> {
        check::dns_label(path, s)?;
        Ok(Name(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a mesh name: a DNS-1123 label.
pub(crate) fn check_mesh(mesh: &str) -> Result<(), crate::error::RegistryError> {
    check::dns_label("", mesh).map_err(|_| crate::error::RegistryError::BadMesh(mesh.to_owned()))
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The kind of a registry object, as written in its `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `Service`, key `services/<name>`.
    Service,
    /// `Route`, key `routes/<service>`.
    Route,
    /// `Policy`, key `policies/<service>`.
    Policy,
    /// `MeshConfig`, key `meshconfig`.
    MeshConfig,
    /// `Endpoint`, key `endpoints/<service>/<id>`.
    Endpoint,
    /// `Status`, key `status/<sidecar-id>`.
    Status,
    /// `ExternalService`, key `externalservices/<name>`.
    ExternalService,
    /// `Revocations`, key `revocations`.
    Revocations,
    /// `TrustBundle`, key `trust`.
    TrustBundle,
    /// `ClusterLink`, key `links/<cluster>`.
    ClusterLink,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 10] = [
        Kind::Service,
        Kind::Route,
        Kind::Policy,
        Kind::MeshConfig,
        Kind::Endpoint,
        Kind::Status,
        Kind::ExternalService,
        Kind::Revocations,
        Kind::TrustBundle,
        Kind::ClusterLink,
    ];

    /// The name written in `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Route => "Route",
            Kind::Policy => "Policy",
            Kind::MeshConfig => "MeshConfig",
            Kind::Endpoint => "Endpoint",
            Kind::Status => "Status",
            Kind::ExternalService => "ExternalService",
            Kind::Revocations => "Revocations",
            Kind::TrustBundle => "TrustBundle",
            Kind::ClusterLink => "ClusterLink",
        }
    }

    /// The key directory of this kind (`services`, ..., `meshconfig`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Route => "routes",
            Kind::Policy => "policies",
            Kind::MeshConfig => "meshconfig",
            Kind::Endpoint => "endpoints",
            Kind::Status => "status",
            Kind::ExternalService => "externalservices",
            Kind::Revocations => "revocations",
            Kind::TrustBundle => "trust",
            Kind::ClusterLink => "links",
        }
    }

    /// Parses a kind as written in objects (`Service`) or on the command line
    /// (`services`, `service`, `svc`), case-insensitively.
    pub fn parse(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            let name = k.as_str().to_ascii_lowercase();
            s == name
                || s == k.plural()
                || (s == "svc" && *k == Kind::Service)
                || ((s == "clusterlinks" || s == "link") && *k == Kind::ClusterLink)
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP, carried as HTTP/3 CONNECT.
    Tcp,
    /// HTTP/1.1 or h2, routed per request.
    Http,
    /// gRPC over h2, routed per request.
    Grpc,
}

/// A service: its name, optional virtual IP and ports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// The service name.
    pub name: Name,
    /// The virtual IP transparent capture maps to this service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    /// The ports, unique by number and by name.
    pub ports: Vec<ServicePort>,
    /// Limits each caller's sidecar keeps towards this service (Envoy's circuit breakers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Reachable from other clusters through this cluster's east-west gateways (`halyard
    /// gateway`); a gateway drops traffic for endpoints of services that are not. Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exported: bool,
    /// Where callers go when no endpoint of their own cluster can take a request: these
    /// clusters, in this order, then any other. Empty (the default): any other cluster, as
    /// one tier. Distinct DNS-1123 labels, at most 16.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
}

/// Thresholds a caller's sidecar keeps per destination service; past one it fails fast (503,
/// flag `UO`) instead of queueing, and never ejects an endpoint for it (Envoy's
/// `circuit_breakers.thresholds`). Each is at least 1; absent means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// L7 requests in flight to the service from one sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// L7 requests and L4 flows waiting for a connection or a stream to the service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// L4 flows open to the service from one sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_flows: Option<u32>,
    /// Retries in flight to the service from one sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries_in_flight: Option<u32>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// The port name, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// The service port, 1-65535.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
    /// The port the app listens on; defaults to `port`.
    pub target_port: u16,
}

impl Service {
    /// The port with this number.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// Traffic rules for one service: the first matching rule wins.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The service the route applies to.
    pub service: Name,
    /// Ordered rules; at least one.
    pub rules: Vec<RouteRule>,
    /// Where this service's callers go when no endpoint of their own cluster can take a
    /// request: these clusters, in this order, then any other. Non-empty, it replaces the
    /// Service's `failover` (an operator can change the order with the traffic rules, without
    /// touching the Service). Distinct DNS-1123 labels, at most 16.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
}

/// One route rule: a match and what to do with matching requests.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// What the rule matches; `None` matches everything.
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<RouteMatch>,
    /// Weighted backends; at least one, weights summing to more than 0.
    pub backends: Vec<Backend>,
    /// Overall request timeout.
    #[serde(
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Retry policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Injected faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Traffic mirroring.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Request headers to add and remove.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderMods>,
    /// Where retries and failover may go beyond the backend subset the rule picked.
    pub fallback: Fallback,
}

/// Where the attempts of a flow or request may go when the backend subset its rule picked
/// cannot serve it: an endpoint failed, or every endpoint of the subset is ejected or gone.
///
/// The weighted backend is chosen once per flow or request (as Envoy chooses a weighted cluster
/// once per request), so a retry never re-rolls the weights. Leaving the subset is the choice of
/// Envoy's subset load balancer `fallback_policy` (`NO_FALLBACK` / `ANY_ENDPOINT`); Istio has no
/// such fallback at all (a subset is a cluster of its own), hence the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Stay inside the subset: a retry goes to another of its endpoints, or to the same one
    /// again when it has only one; a subset whose every endpoint is ejected is served anyway
    /// (panic mode inside it); a subset without endpoints fails the request or flow (503, `UH`).
    #[default]
    Subset,
    /// Leave the subset for the rest of the service: retries go to endpoints of the subset not
    /// tried yet first, then to any endpoint of the service; an ejected or empty subset fails
    /// over to the service's healthy endpoints.
    Service,
}

impl Fallback {
    /// The value as written in a Route (`fallback: subset`).
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Subset => "subset",
            Fallback::Service => "service",
        }
    }
}

/// The match part of a route rule; all present conditions must hold.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// HTTP method, uppercase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header conditions by lowercase header name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderMatch>,
    /// The calling service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_service: Option<Name>,
}

/// A compiled regular expression that must match the whole input.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    fn compile(path: &str, source: &str) -> Result<Self, ValidationError> {
        let regex = regex::Regex::new(&format!("^(?:{source})$"))
            .map_err(|e| ValidationError::at(path, format!("bad regex: {e}")))?;
        Ok(Pattern {
            source: source.to_owned(),
            regex,
        })
    }

    /// Whether the whole of `s` matches.
    pub fn is_match(&self, s: &str) -> bool {
        self.regex.is_match(s)
    }

    /// The regex as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// A path condition.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// The path equals this.
    Exact(String),
    /// The path starts with this.
    Prefix(String),
    /// The whole path matches this regex.
    Regex(Pattern),
}

impl PathMatch {
    /// Whether `path` satisfies the condition.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// A header condition.
#[derive(Debug, Clone)]
pub enum HeaderMatch {
    /// The value equals this.
    Exact(String),
    /// The whole value matches this regex.
    Regex(Pattern),
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
}

impl HeaderMatch {
    /// Whether a header with `value` (`None`: absent) satisfies the condition.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (HeaderMatch::Present(want), v) => *want == v.is_some(),
            (HeaderMatch::Exact(e), Some(v)) => e == v,
            (HeaderMatch::Regex(r), Some(v)) => r.is_match(v),
            (_, None) => false,
        }
    }
}

/// Serializes `{name: value}`: YAML would otherwise write enum variants as tags.
fn one_entry<S: Serializer, V: Serialize + ?Sized>(
    s: S,
    name: &str,
    value: &V,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(1))?;
    m.serialize_entry(name, value)?;
    m.end()
}

impl Serialize for PathMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PathMatch::Exact(p) => one_entry(s, "exact", p),
            PathMatch::Prefix(p) => one_entry(s, "prefix", p),
            PathMatch::Regex(r) => one_entry(s, "regex", r),
        }
    }
}

impl Serialize for HeaderMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HeaderMatch::Exact(v) => one_entry(s, "exact", v),
            HeaderMatch::Regex(r) => one_entry(s, "regex", r),
            HeaderMatch::Present(p) => one_entry(s, "present", p),
        }
    }
}

/// A weighted backend: the endpoints whose labels include `subset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    /// Label selector; empty selects every endpoint of the service.
    pub subset: Labels,
    /// Relative weight, 0 to [`MAX_WEIGHT`].
    pub weight: u32,
}

/// Whether `labels` include every pair of `subset`.
pub fn subset_matches(subset: &Labels, labels: &Labels) -> bool {
    subset.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Retry policy of a route rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first try, at most [`MAX_RETRY_ATTEMPTS`].
    pub attempts: u32,
    /// Timeout of each try.
    #[serde(
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Conditions that trigger a retry.
    pub on: Vec<RetryOn>,
    /// Methods retried besides the idempotent ones (GET, HEAD, OPTIONS, PUT, DELETE, TRACE),
    /// e.g. `[POST]` for a service whose POSTs are safe to repeat.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// A condition that triggers a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 or 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The stream or connection was reset.
    #[serde(rename = "reset")]
    Reset,
    /// The connection could not be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The peer refused the stream before processing it.
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// 409 Conflict.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// gRPC UNAVAILABLE.
    #[serde(rename = "unavailable")]
    Unavailable,
    /// gRPC CANCELLED.
    #[serde(rename = "cancelled")]
    Cancelled,
    /// gRPC DEADLINE_EXCEEDED.
    #[serde(rename = "deadline-exceeded")]
    DeadlineExceeded,
    /// gRPC RESOURCE_EXHAUSTED.
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
}

impl RetryOn {
    const ALL: [RetryOn; 10] = [
        RetryOn::FiveXx,
        RetryOn::GatewayError,
        RetryOn::Reset,
        RetryOn::ConnectFailure,
        RetryOn::RefusedStream,
        RetryOn::Retriable4xx,
        RetryOn::Unavailable,
        RetryOn::Cancelled,
        RetryOn::DeadlineExceeded,
        RetryOn::ResourceExhausted,
    ];

    /// The condition as written.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::FiveXx => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::Reset => "reset",
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::RefusedStream => "refused-stream",
            RetryOn::Retriable4xx => "retriable-4xx",
            RetryOn::Unavailable => "unavailable",
            RetryOn::Cancelled => "cancelled",
            RetryOn::DeadlineExceeded => "deadline-exceeded",
            RetryOn::ResourceExhausted => "resource-exhausted",
        }
    }

    fn parse(s: &str) -> Option<RetryOn> {
        RetryOn::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Injected faults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    /// Delay a share of requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    /// Fail a share of requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

/// Delay `percent` of requests by `duration`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delay {
    /// Share of requests delayed.
    pub percent: Percent,
    /// How long.
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
}

/// Answer `percent` of requests with `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Abort {
    /// Share of requests aborted.
    pub percent: Percent,
    /// The HTTP status returned, 200-599.
    pub status: u16,
}

/// Send a copy of `percent` of requests to `subset`, ignoring the answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mirror {
    /// Label selector of the mirror endpoints.
    pub subset: Labels,
    /// Share of requests mirrored.
    pub percent: Percent,
}

/// Request header changes, applied before forwarding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HeaderMods {
    /// Headers to set (replacing any existing value), by lowercase name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Lowercase names of headers to remove.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Access policy of one service: who may call it, and how much.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// The service protected.
    pub service: Name,
    /// Rules: deny rules are evaluated first, then allow rules.
    pub rules: Vec<PolicyRule>,
    /// Rate limits, enforced by the service's sidecars on verified callers; each one that
    /// matches a request or flow must admit it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
}

/// A token bucket: `per_second` tokens a second, holding at most `burst` (RFC 2697's committed
/// rate and burst size, in requests or flows instead of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    /// Refill rate in tokens per second: finite, above 0, at most 1,000,000.
    pub per_second: f64,
    /// Bucket size: 1 to 1,000,000.
    pub burst: u32,
}

/// One rate limit of a service (`Policy.rateLimits[]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Its name in metrics and logs (default `limit-<index>`), unique in the policy.
    pub name: Name,
    /// What it counts: ports, methods, paths, headers (as in policy rules); absent: everything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Destination>,
    /// Requests per second for the whole service, divided among its live endpoints by weight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<Rate>,
    /// Requests per second for each calling identity, unless an entry of `callers` matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_caller: Option<Rate>,
    /// Per-identity limits for named callers; the first matching entry applies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub callers: Vec<CallerRate>,
    /// L4 flows per calling identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowLimit>,
}

/// A per-identity rate for the callers a source matches.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallerRate {
    /// The callers (services, identities, namespaces; at least one list non-empty).
    pub from: Source,
    /// Each matching identity's own bucket.
    #[serde(flatten)]
    pub rate: Rate,
}

/// Limits on the L4 flows of each calling identity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowLimit {
    /// New flows per second.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub new: Option<Rate>,
    /// Flows open at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<u32>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Admit matching requests.
    Allow,
    /// Refuse matching requests.
    Deny,
}

/// One policy rule; an absent `from` or `to` matches everything.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyRule {
    /// What to do with matching requests.
    pub action: Action,
    /// Who is calling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,
    /// What is called.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Destination>,
}

/// The caller side of a policy rule; each non-empty list must match.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Source {
    /// Calling services.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Name>,
    /// Calling identities (exact or trailing-`*` globs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityPattern>,
    /// Calling namespaces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Name>,
}

/// The called side of a policy rule; each non-empty list must match.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Destination {
    /// Service ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// HTTP methods (HTTP ports only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// HTTP paths, exact or trailing-`*` prefixes (HTTP ports only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathPattern>,
    /// Request headers that must be present (HTTP ports only), lowercase names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// A SPIFFE id or a prefix of one written with a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    /// Exactly this id.
    Exact(SpiffeId),
    /// Any id starting with this text (the pattern without its `*`).
    Prefix(String),
}

impl IdentityPattern {
    /// Whether `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityPattern::Exact(e) => e == id,
            IdentityPattern::Prefix(p) => id.as_str().starts_with(p.as_str()),
        }
    }
}

impl Serialize for IdentityPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IdentityPattern::Exact(id) => s.serialize_str(id.as_str()),
            IdentityPattern::Prefix(p) => s.serialize_str(&format!("{p}*")),
        }
    }
}

/// A path or a path prefix written with a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Exactly this path.
    Exact(String),
    /// Any path starting with this (the pattern without its `*`).
    Prefix(String),
}

impl PathPattern {
    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl Serialize for PathPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PathPattern::Exact(p) => s.serialize_str(p),
            PathPattern::Prefix(p) => s.serialize_str(&format!("{p}*")),
        }
    }
}

/// Mesh-wide settings, key `meshconfig`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    /// What services without a policy do.
    pub default_policy: Action,
    /// The trust domain of the mesh's identities.
    #[serde(serialize_with = "ser_display")]
    pub trust_domain: TrustDomain,
    /// What a captured flow to a destination that is neither a mesh service nor an
    /// ExternalService meets.
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The mesh Service whose endpoints are egress gateways, for ExternalServices that go
    /// `via: egress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_gateway: Option<Name>,
}

/// `MeshConfig.outboundTrafficPolicy` (Istio's `outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundTrafficPolicy {
    /// Refused: reset, counted with its destination, logged once per destination (the default).
    #[default]
    RegistryOnly,
    /// Passed through: the sidecar connects to the original destination itself.
    AllowAny,
}

/// A destination outside the mesh (`externalservices/<name>`; Istio's ServiceEntry with
/// `MESH_EXTERNAL`): which hosts and addresses it covers, on which ports, and how the mesh
/// reaches it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalService {
    /// Its name: the `destination_service` of its traffic, and the Policy key for it.
    pub name: Name,
    /// DNS names, each exact or `*.` followed by a suffix (one leading wildcard label).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostPattern>,
    /// IP addresses or CIDR blocks it covers (and, with `resolution: static`, the single
    /// addresses the mesh dials).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpNet>,
    /// The ports, unique.
    pub ports: Vec<ExternalPort>,
    /// How the mesh finds an address to dial.
    pub resolution: Resolution,
    /// Who dials out.
    pub via: Via,
}

/// One port of an ExternalService.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPort {
    /// The port the app dials, 1-65535.
    pub port: u16,
    /// What flows on it: `tcp` (matched by address), `tls` (matched by the ClientHello's SNI) or
    /// `http` (matched by `Host`).
    pub protocol: ExternalProtocol,
    /// For `http`: the app speaks plain HTTP, the mesh speaks TLS to the outside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub originate_tls: Option<OriginateTls>,
}

/// The protocol of an ExternalService port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalProtocol {
    /// Opaque TCP.
    Tcp,
    /// TLS from the app (the mesh reads the SNI, never decrypts).
    Tls,
    /// Plain HTTP/1.x from the app.
    Http,
}

/// TLS origination: the server is verified against `ca_bundle` (else the system roots) and the
/// host name the app asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginateTls {
    /// The port dialled with TLS (default 443).
    pub target_port: u16,
    /// PEM certificates trusted for this service instead of the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

/// How the mesh finds an address for an ExternalService.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// The host name is resolved by DNS where the flow leaves the mesh; a captured flow without
    /// a name goes to the address the app dialled.
    Dns,
    /// The single addresses in `addresses`, in order.
    Static,
}

/// Who dials out to an ExternalService.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The caller's own sidecar.
    Direct,
    /// An egress gateway (`MeshConfig.egressGateway`): the only place that leaves the network.
    Egress,
}

/// A DNS name, or a `*.` wildcard over one or more leading labels of a suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this name (lowercase).
    Exact(String),
    /// Any name ending in `.` + this suffix (lowercase), e.g. `outside.test` for
    /// `*.outside.test`.
    Suffix(String),
}

impl HostPattern {
    /// Whether `host` (any case, a trailing dot ignored) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match self {
            HostPattern::Exact(h) => host == *h,
            HostPattern::Suffix(s) => host
                .strip_suffix(s.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HostPattern::Exact(h) => s.serialize_str(h),
            HostPattern::Suffix(h) => s.serialize_str(&format!("*.{h}")),
        }
    }
}

/// An IP network: an address and a prefix length (a single address has the full length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length: 0-32 (IPv4), 0-128 (IPv6).
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// The address, when this is a single one (a full-length prefix).
    pub fn single(&self) -> Option<IpAddr> {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        (self.prefix == full).then_some(self.addr)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.single() {
            Some(ip) => s.serialize_str(&ip.to_string()),
            None => s.serialize_str(&format!("{}/{}", self.addr, self.prefix)),
        }
    }
}

impl ExternalService {
    /// The port `port`, if listed.
    pub fn port(&self, port: u16) -> Option<&ExternalPort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Whether a flow to `host` (a name from SNI, `Host` or a CONNECT target) or `ip` on `port`
    /// is this service's.
    pub fn covers(&self, host: Option<&str>, ip: Option<IpAddr>, port: u16) -> bool {
        self.port(port).is_some()
            && (host.is_some_and(|h| self.hosts.iter().any(|p| p.matches(h)))
                || ip.is_some_and(|ip| self.addresses.iter().any(|n| n.contains(ip)))
                || host
                    .and_then(|h| h.parse::<IpAddr>().ok())
                    .is_some_and(|ip| self.addresses.iter().any(|n| n.contains(ip))))
    }
}

/// The deny list, key `revocations`: identities and leaf serials that no handshake accepts, on
/// either side, and whose open connections are closed.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocations {
    /// Revoked SPIFFE ids.
    pub ids: std::collections::BTreeSet<SpiffeId>,
    /// Revoked leaf serials, lowercase hex without leading zero bytes.
    pub serials: std::collections::BTreeSet<String>,
}

/// The mesh's trust bundle, key `trust`: the roots every sidecar and CA server trusts, hot. During
/// a CA rotation it holds the old and the new root together.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustBundle {
    /// One or more root certificates, PEM (parsed and checked as trust anchors on the way in).
    pub roots: String,
}

/// A sidecar serving one service, written by that sidecar on a lease.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Unique id of the endpoint within its service.
    pub id: String,
    /// The service served.
    pub service: Name,
    /// The sidecar's QUIC address.
    pub address: SocketAddr,
    /// The identity its certificate must carry.
    #[serde(serialize_with = "ser_display")]
    pub identity: SpiffeId,
    /// Labels (`version`, ...).
    pub labels: Labels,
    /// Cluster name.
    pub cluster: String,
    /// Zone name.
    pub zone: String,
    /// Load-balancing weight, 0 to [`MAX_WEIGHT`]; default 1.
    pub weight: u32,
    /// For an endpoint of another cluster: the address of that cluster's east-west gateway,
    /// which a caller dials instead of `address` (the gateway routes by the endpoint's server
    /// ID, `halyard_transport::quic_lb`). `None` for endpoints reached directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SocketAddr>,
}

/// A link to another cluster (`links/<cluster>`): where to read the services it exports and
/// their endpoints, and the east-west gateway that reaches them. Every sidecar of this cluster
/// reads that registry (read-only, with the same watch guarantees as its own) and adds the
/// endpoints of its exported services with `cluster` = the link's cluster and `gateway` = the
/// link's gateway.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterLink {
    /// The remote cluster's name (a DNS-1123 label), given to its endpoints here.
    pub cluster: Name,
    /// Its registry: `etcd://host:port[,host:port...]` or `file://DIR`.
    pub registry: String,
    /// Its mesh name; default `default`.
    pub mesh: Name,
    /// Its east-west gateway as this cluster reaches it (`ip:port`, UDP).
    pub gateway: SocketAddr,
    /// How long its endpoints are kept once its registry stops answering (last known good,
    /// staleness reported), after which they are dropped; default 5 minutes, 1 s to 7 days.
    #[serde(serialize_with = "ser_duration")]
    pub keep_stale: Duration,
    /// The etcd user to read its registry as: the name of a file (`user:password`) in each
    /// sidecar's `link_credentials` folder, so no password is stored in the registry. None:
    /// read without authentication. A DNS-1123 label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Name>,
}

/// What one sidecar applied, written to `status/<sidecar-id>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The sidecar id.
    pub sidecar: String,
    /// The registry revision applied.
    pub revision: i64,
    /// When it was applied.
    #[serde(serialize_with = "ser_time")]
    pub applied_at: SystemTime,
    /// Keys quarantined, with the reason.
    pub rejected: Vec<Rejection>,
}

/// A quarantined key and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rejection {
    /// The full key (or file).
    pub key: String,
    /// The validation error.
    pub error: String,
}

/// Any registry object.
#[derive(Debug, Clone)]
pub enum Object {
    /// A service.
    Service(Service),
    /// A route.
    Route(Route),
    /// A policy.
    Policy(Policy),
    /// The mesh config.
    MeshConfig(MeshConfig),
    /// An endpoint.
    Endpoint(Endpoint),
    /// A sidecar status.
    Status(Status),
    /// A destination outside the mesh.
    ExternalService(ExternalService),
    /// The deny list.
    Revocations(Revocations),
    /// The trust bundle.
    TrustBundle(TrustBundle),
    /// A link to another cluster.
    ClusterLink(ClusterLink),
}

impl Object {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::Route(_) => Kind::Route,
            Object::Policy(_) => Kind::Policy,
            Object::MeshConfig(_) => Kind::MeshConfig,
            Object::Endpoint(_) => Kind::Endpoint,
            Object::Status(_) => Kind::Status,
            Object::ExternalService(_) => Kind::ExternalService,
            Object::Revocations(_) => Kind::Revocations,
            Object::TrustBundle(_) => Kind::TrustBundle,
            Object::ClusterLink(_) => Kind::ClusterLink,
        }
    }

    /// The key this object lives at, relative to the mesh prefix.
    pub fn key(&self) -> Key {
        match self {
            Object::Service(s) => Key::Service(s.name.to_string()),
            Object::Route(r) => Key::Route(r.service.to_string()),
            Object::Policy(p) => Key::Policy(p.service.to_string()),
            Object::MeshConfig(_) => Key::MeshConfig,
            Object::Endpoint(e) => Key::Endpoint(e.service.to_string(), e.id.clone()),
            Object::Status(s) => Key::Status(s.sidecar.clone()),
            Object::ExternalService(e) => Key::ExternalService(e.name.to_string()),
            Object::Revocations(_) => Key::Revocations,
            Object::TrustBundle(_) => Key::Trust,
            Object::ClusterLink(l) => Key::ClusterLink(l.cluster.to_string()),
        }
    }

    /// Serializes the object with its `kind` field first and the fields in documented order.
    fn tagged<R>(&self, f: impl FnOnce(&dyn erased::Tagged) -> R) -> R {
        let kind = self.kind().as_str();
        match self {
            Object::Service(o) => f(&Tagged { kind, inner: o }),
            Object::Route(o) => f(&Tagged { kind, inner: o }),
            Object::Policy(o) => f(&Tagged { kind, inner: o }),
            Object::MeshConfig(o) => f(&Tagged { kind, inner: o }),
            Object::Endpoint(o) => f(&Tagged { kind, inner: o }),
            Object::Status(o) => f(&Tagged { kind, inner: o }),
            Object::ExternalService(o) => f(&Tagged { kind, inner: o }),
            Object::Revocations(o) => f(&Tagged { kind, inner: o }),
            Object::TrustBundle(o) => f(&Tagged { kind, inner: o }),
            Object::ClusterLink(o) => f(&Tagged { kind, inner: o }),
        }
    }

    /// The object as a JSON value, with its `kind` field.
    pub fn to_value(&self) -> serde_json::Value {
        self.tagged(|t| t.json_value())
    }

    /// The object as YAML, `kind` first and the fields in their documented order.
    pub fn to_yaml(&self) -> String {
        self.tagged(|t| t.yaml())
    }

    /// The object as compact JSON, the form stored in etcd and in files.
    pub fn to_json(&self) -> String {
        self.tagged(|t| t.json(false))
    }

    /// The object as indented JSON, `kind` first.
    pub fn to_json_pretty(&self) -> String {
        self.tagged(|t| t.json(true))
    }

    /// Parses and validates one object from a JSON value. `kind` may be absent when `expected`
    /// says what it must be; when both are present they must agree.
    pub fn from_value(
        value: serde_json::Value,
        expected: Option<Kind>,
    ) -> Result<Object, ValidationError> {
        validate::object(value, expected)
    }

    /// Parses and validates the value stored at `key`: JSON, the kind the key implies, and a
    /// name matching the key. Errors carry `origin` (the full key, or the file).
    pub fn from_stored(key: &Key, origin: &str, bytes: &[u8]) -> Result<Object, ValidationError> {
        validate::stored(key, bytes).map_err(|e| e.with_origin(origin))
    }
}

/// An object with its `kind` in front.
#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    kind: &'static str,
    #[serde(flatten)]
    inner: &'a T,
}

mod erased {
    /// [`super::Tagged`] without its type parameter.
    pub(super) trait Tagged {
        fn json_value(&self) -> serde_json::Value;
        fn json(&self, pretty: bool) -> String;
        fn yaml(&self) -> String;
    }
}

impl<T: Serialize> erased::Tagged for Tagged<'_, T> {
    fn json_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn json(&self, pretty: bool) -> String {
        let r = if pretty {
            serde_json::to_string_pretty(self)
        } else {
            serde_json::to_string(self)
        };
        r.unwrap_or_default()
    }

    fn yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string().replace(' ', ""))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

fn ser_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}
