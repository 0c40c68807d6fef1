//! The wire shape of registry objects, as read from YAML or JSON before validation.
//!
//! Every struct refuses unknown fields; [`super`] turns these into validated types.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Service {
    pub name: String,
    #[serde(default)]
    pub vip: Option<String>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default)]
    pub exported: bool,
    #[serde(default)]
    pub failover: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CircuitBreaker {
    #[serde(default)]
    pub max_concurrent_requests: Option<i64>,
    #[serde(default)]
    pub max_pending_requests: Option<i64>,
    #[serde(default)]
    pub max_concurrent_flows: Option<i64>,
    #[serde(default)]
    pub max_retries_in_flight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Route {
    pub service: String,
    pub rules: Vec<RouteRule>,
    #[serde(default)]
    pub failover: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RouteRule {
    #[serde(default, rename = "match")]
    pub matches: Option<Match>,
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub mirror: Option<Mirror>,
    #[serde(default)]
    pub request_headers: Option<HeaderMods>,
    #[serde(default)]
    pub fallback: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Match {
    #[serde(default)]
    pub path: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub source_service: Option<String>,
}

/// `{exact|prefix|regex: "..."}` for paths, `{exact|regex: "..."}` or `{present: bool}` for headers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Backend {
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    pub weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Retries {
    pub attempts: u32,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub on: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Fault {
    #[serde(default)]
    pub delay: Option<Delay>,
    #[serde(default)]
    pub abort: Option<Abort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Delay {
    pub percent: f64,
    pub duration: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Abort {
    pub percent: f64,
    pub status: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Mirror {
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    pub percent: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct HeaderMods {
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Policy {
    pub service: String,
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RateLimit {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub to: Option<To>,
    #[serde(default)]
    pub total: Option<Rate>,
    #[serde(default)]
    pub per_caller: Option<Rate>,
    #[serde(default)]
    pub callers: Vec<CallerRate>,
    #[serde(default)]
    pub flows: Option<Flows>,
}

/// Numbers are read wide so that a negative or fractional value is refused by validation with
/// its field path rather than by serde.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Rate {
    pub per_second: f64,
    #[serde(default)]
    pub burst: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CallerRate {
    pub from: From,
    pub per_second: f64,
    #[serde(default)]
    pub burst: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Flows {
    #[serde(default)]
    pub per_second: Option<f64>,
    #[serde(default)]
    pub burst: Option<f64>,
    #[serde(default)]
    pub concurrent: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PolicyRule {
    pub action: String,
    #[serde(default)]
    pub from: Option<From>,
    #[serde(default)]
    pub to: Option<To>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct From {
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct To {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub headers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TrustBundle {
    pub roots: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Revocations {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub serials: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct MeshConfig {
    pub default_policy: String,
    pub trust_domain: String,
    #[serde(default)]
    pub outbound_traffic_policy: Option<String>,
    #[serde(default)]
    pub egress_gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ExternalService {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    pub ports: Vec<ExternalPort>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub via: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ExternalPort {
    pub port: i64,
    pub protocol: String,
    #[serde(default)]
    pub originate_tls: Option<OriginateTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct OriginateTls {
    #[serde(default)]
    pub target_port: Option<i64>,
    #[serde(default)]
    pub ca_bundle: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Endpoint {
    pub id: String,
    pub service: String,
    pub address: String,
    pub identity: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Status {
    pub sidecar: String,
    pub revision: i64,
    pub applied_at: String,
    #[serde(default)]
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Rejected {
    pub key: String,
    pub error: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ClusterLink {
    pub cluster: String,
    pub registry: String,
    #[serde(default)]
    pub mesh: Option<String>,
    pub gateway: String,
    #[serde(default)]
    pub keep_stale: Option<String>,
    #[serde(default)]
    pub credentials: Option<String>,
}
