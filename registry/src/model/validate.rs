//! Raw wire objects to validated objects, naming the field path of the first problem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use halyard_certs::{SpiffeId, TrustDomain};
use serde::de::DeserializeOwned;

use super::check::{self, field, index};
use super::*;

/// Most retries a rule may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Largest backend or endpoint weight.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Parses a JSON value into a wire struct, naming the field path of a type error.
fn decode<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ValidationError::at(path, e.into_inner().to_string())
    })
}

/// Takes the `kind` field out and checks it against `expected`.
fn take_kind(
    value: &mut serde_json::Value,
    expected: Option<Kind>,
) -> Result<Kind, ValidationError> {
    let serde_json::Value::Object(map) = value else {
        return Err(ValidationError::at(
            "",
            "expected an object (a map of fields)",
        ));
    };
    let kind = match map.remove("kind") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(parse_kind(&s)?),
        Some(_) => return Err(ValidationError::at("kind", "kind must be a string")),
    };
    match (kind, expected) {
        (Some(k), Some(e)) if k != e => Err(ValidationError::at(
            "kind",
            format!("kind is {k} but this key holds a {e}"),
        )),
        (Some(k), _) | (None, Some(k)) => Ok(k),
        (None, None) => Err(ValidationError::at(
            "kind",
            "missing kind: one of Service, Route, Policy, MeshConfig, Endpoint, Status, Revocations, TrustBundle, ClusterLink",
        )),
    }
}

fn parse_kind(s: &str) -> Result<Kind, ValidationError> {
    Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| {
            ValidationError::at(
                "kind",
                format!("unknown kind {s:?}: expected Service, Route, Policy, MeshConfig, ExternalService, Endpoint, Status, Revocations, TrustBundle or ClusterLink"),
            )
        })
}

pub(super) fn object(
    mut value: serde_json::Value,
    expected: Option<Kind>,
) -> Result<Object, ValidationError> {
    let kind = take_kind(&mut value, expected)?;
    Ok(match kind {
        Kind::Service => Object::Service(service(decode(value)?)?),
        Kind::Route => Object::Route(route(decode(value)?)?),
        Kind::Policy => Object::Policy(policy(decode(value)?)?),
        Kind::MeshConfig => Object::MeshConfig(mesh_config(decode(value)?)?),
        Kind::Endpoint => Object::Endpoint(endpoint(decode(value)?)?),
        Kind::Status => Object::Status(status(decode(value)?)?),
        Kind::ExternalService => Object::ExternalService(external_service(decode(value)?)?),
        Kind::Revocations => Object::Revocations(revocations(decode(value)?)?),
        Kind::TrustBundle => Object::TrustBundle(trust_bundle(decode(value)?)?),
        Kind::ClusterLink => Object::ClusterLink(cluster_link(decode(value)?)?),
    })
}

pub(super) fn stored(key: &Key, bytes: &[u8]) -> Result<Object, ValidationError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ValidationError::at("", format!("not valid JSON: {e}")))?;
    let obj = object(value, Some(key.kind()))?;
    let want = obj.key();
    if &want != key {
        let (path, _) = name_field(&obj);
        return Err(ValidationError::at(
            path,
            format!(
                "object belongs at key {} but is stored at {}",
                want.path(),
                key.path()
            ),
        ));
    }
    Ok(obj)
}

fn name_field(obj: &Object) -> (&'static str, ()) {
    match obj {
        Object::Service(_) | Object::ExternalService(_) => ("name", ()),
        Object::Route(_) | Object::Policy(_) | Object::Endpoint(_) => ("service", ()),
        Object::MeshConfig(_) | Object::Revocations(_) | Object::TrustBundle(_) => ("", ()),
        Object::Status(_) => ("sidecar", ()),
        Object::ClusterLink(_) => ("cluster", ()),
    }
}

/// Parses a file of one or more objects: YAML documents separated by `---`, a JSON object, or a
/// JSON array of objects. Returns every object, or every error (each naming `origin`, the
/// document number and the field path).
pub fn parse_documents(origin: &str, text: &str) -> Result<Vec<Object>, Vec<ValidationError>> {
    let values = split_documents(text).map_err(|e| vec![e.with_origin(origin)])?;
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let many = values.len() > 1;
    for (i, v) in values.into_iter().enumerate() {
        let label = describe(origin, i, many, &v);
        match object(v, None) {
            Ok(o) => objects.push(o),
            Err(e) => errors.push(e.with_origin(label)),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// `file.yaml: document 2 (Route reviews)`.
fn describe(origin: &str, i: usize, many: bool, v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("object");
    let name = ["name", "service", "id", "sidecar"]
        .iter()
        .find_map(|f| v.get(*f).and_then(|n| n.as_str()))
        .map(|n| format!(" {n}"))
        .unwrap_or_default();
    if many {
        format!("{origin}: document {} ({kind}{name})", i + 1)
    } else {
        format!("{origin} ({kind}{name})")
    }
}

fn split_documents(text: &str) -> Result<Vec<serde_json::Value>, ValidationError> {
    if text.trim_start().starts_with(['{', '[']) {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ValidationError::at("", format!("not valid JSON: {e}")))?;
        return Ok(match v {
            serde_json::Value::Array(items) => items,
            other => vec![other],
        });
    }
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).map_err(|e| {
            ValidationError::at("", format!("document {}: not valid YAML: {e}", i + 1))
        })?;
        if !v.is_null() {
            out.push(v);
        }
    }
    if out.is_empty() {
        return Err(ValidationError::at("", "no objects in file"));
    }
    Ok(out)
}

fn service(raw: raw::Service) -> Result<Service, ValidationError> {
    let name = Name::at("name", &raw.name)?;
    let vip = raw
        .vip
        .map(|v| {
            v.parse::<IpAddr>()
                .map_err(|_| ValidationError::at("vip", format!("{v:?} is not an IP address")))
        })
        .transpose()?;
    if raw.ports.is_empty() {
        return Err(ValidationError::at(
            "ports",
            "a service needs at least one port",
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in raw.ports.into_iter().enumerate() {
        ports.push(service_port(&index("ports", i), p, &ports)?);
    }
    let circuit_breaker = raw
        .circuit_breaker
        .map(|c| circuit_breaker("circuitBreaker", c))
        .transpose()?;
    let failover = failover_order(raw.failover)?;
    Ok(Service {
        name,
        vip,
        ports,
        circuit_breaker,
        exported: raw.exported,
        failover,
    })
}

/// A `failover` order (of a Service or a Route): at most 16 distinct cluster names.
fn failover_order(raw: Vec<String>) -> Result<Vec<String>, ValidationError> {
    if raw.len() > 16 {
        return Err(ValidationError::at("failover", "at most 16 clusters"));
    }
    let mut failover: Vec<String> = Vec::new();
    for (i, cluster) in raw.into_iter().enumerate() {
        let path = index("failover", i);
        Name::at(&path, &cluster)?;
        if failover.contains(&cluster) {
            return Err(ValidationError::at(
                &path,
                format!("cluster {cluster:?} is listed twice"),
            ));
        }
        failover.push(cluster);
    }
    Ok(failover)
}

/// Largest threshold, count or burst accepted (a bound that still catches unit mistakes).
const MAX_COUNT: i64 = 1_000_000;

/// A whole number from 1 to [`MAX_COUNT`].
fn count(path: &str, v: i64) -> Result<u32, ValidationError> {
    if !(1..=MAX_COUNT).contains(&v) {
        return Err(ValidationError::at(
            path,
            format!("{v} is out of range: expected a whole number from 1 to {MAX_COUNT}"),
        ));
    }
    u32::try_from(v).map_err(|_| ValidationError::at(path, format!("{v} is out of range")))
}

fn circuit_breaker(
    path: &str,
    raw: raw::CircuitBreaker,
) -> Result<CircuitBreaker, ValidationError> {
    let at = |name: &str, v: Option<i64>| v.map(|v| count(&field(path, name), v)).transpose();
    let c = CircuitBreaker {
        max_concurrent_requests: at("maxConcurrentRequests", raw.max_concurrent_requests)?,
        max_pending_requests: at("maxPendingRequests", raw.max_pending_requests)?,
        max_concurrent_flows: at("maxConcurrentFlows", raw.max_concurrent_flows)?,
        max_retries_in_flight: at("maxRetriesInFlight", raw.max_retries_in_flight)?,
    };
    if c == CircuitBreaker::default() {
        return Err(ValidationError::at(
            path,
            "no threshold set: give maxConcurrentRequests, maxPendingRequests, \
             maxConcurrentFlows or maxRetriesInFlight",
        ));
    }
    Ok(c)
}

fn service_port(
    path: &str,
    raw: raw::ServicePort,
    seen: &[ServicePort],
) -> Result<ServicePort, ValidationError> {
    let name = raw
        .name
        .map(|n| Name::at(&field(path, "name"), &n))
        .transpose()?;
    let port = check::port(&field(path, "port"), raw.port)?;
    if seen.iter().any(|p| p.port == port) {
        return Err(ValidationError::at(
            field(path, "port"),
            format!("port {port} is listed twice"),
        ));
    }
    if name.is_some() && seen.iter().any(|p| p.name == name) {
        return Err(ValidationError::at(
            field(path, "name"),
            "port name is used twice",
        ));
    }
    let protocol = match raw.protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "http" => Protocol::Http,
        "grpc" => Protocol::Grpc,
        other => {
            return Err(ValidationError::at(
                field(path, "protocol"),
                format!("unknown protocol {other:?}: expected tcp, http or grpc"),
            ))
        }
    };
    let target_port = check::port(&field(path, "targetPort"), raw.target_port.unwrap_or(port))?;
    Ok(ServicePort {
        name,
        port,
        protocol,
        target_port,
    })
}

fn route(raw: raw::Route) -> Result<Route, ValidationError> {
    let service = Name::at("service", &raw.service)?;
    if raw.rules.is_empty() {
        return Err(ValidationError::at(
            "rules",
            "a route needs at least one rule",
        ));
    }
    let rules = raw
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| route_rule(&index("rules", i), r))
        .collect::<Result<_, _>>()?;
    let failover = failover_order(raw.failover)?;
    Ok(Route {
        service,
        rules,
        failover,
    })
}

fn route_rule(path: &str, raw: raw::RouteRule) -> Result<RouteRule, ValidationError> {
    let matches = raw
        .matches
        .map(|m| route_match(&field(path, "match"), m))
        .transpose()?;
    let backends = backends(&field(path, "backends"), raw.backends)?;
    let timeout = raw
        .timeout
        .map(|t| check::duration(&field(path, "timeout"), &t))
        .transpose()?;
    let retries = raw
        .retries
        .map(|r| retries(&field(path, "retries"), r))
        .transpose()?;
    let fault = raw
        .fault
        .map(|f| fault(&field(path, "fault"), f))
        .transpose()?;
    let mirror = raw
        .mirror
        .map(|m| mirror(&field(path, "mirror"), m))
        .transpose()?;
    let request_headers = raw
        .request_headers
        .map(|h| header_mods(&field(path, "requestHeaders"), h))
        .transpose()?;
    let fallback = fallback(&field(path, "fallback"), raw.fallback.as_deref())?;
    Ok(RouteRule {
        matches,
        backends,
        timeout,
        retries,
        fault,
        mirror,
        request_headers,
        fallback,
    })
}

/// `fallback: subset | service`; absent is `subset`.
fn fallback(path: &str, raw: Option<&str>) -> Result<Fallback, ValidationError> {
    match raw {
        None | Some("subset") => Ok(Fallback::Subset),
        Some("service") => Ok(Fallback::Service),
        Some(other) => Err(ValidationError::at(
            path,
            format!(
                "unknown fallback {other:?}: expected \"subset\" (retries and failover stay \
                 inside the backend subset the rule picked; the default) or \"service\" (they \
                 may go to any endpoint of the service)"
            ),
        )),
    }
}

fn route_match(path: &str, raw: raw::Match) -> Result<RouteMatch, ValidationError> {
    let path_match = raw
        .path
        .map(|p| path_match(&field(path, "path"), p))
        .transpose()?;
    let method = raw
        .method
        .map(|m| check::method(&field(path, "method"), &m))
        .transpose()?;
    let mut headers = BTreeMap::new();
    for (name, m) in raw.headers {
        let here = field(&field(path, "headers"), &name);
        let name = check::header_name(&here, &name)?;
        headers.insert(name, header_match(&here, m)?);
    }
    let source_service = raw
        .source_service
        .map(|s| Name::at(&field(path, "sourceService"), &s))
        .transpose()?;
    Ok(RouteMatch {
        path: path_match,
        method,
        headers,
        source_service,
    })
}

/// Exactly one of the fields of a string match must be set.
fn one_of(path: &str, raw: &raw::StringMatch, allowed: &str) -> Result<(), ValidationError> {
    let set = [
        raw.exact.is_some(),
        raw.prefix.is_some(),
        raw.regex.is_some(),
        raw.present.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(ValidationError::at(
            path,
            format!("set exactly one of {allowed}"),
        ));
    }
    Ok(())
}

fn path_match(path: &str, raw: raw::StringMatch) -> Result<PathMatch, ValidationError> {
    one_of(path, &raw, "exact, prefix, regex")?;
    match raw {
        raw::StringMatch { exact: Some(e), .. } => Ok(PathMatch::Exact(check::url_path(
            &field(path, "exact"),
            &e,
        )?)),
        raw::StringMatch {
            prefix: Some(p), ..
        } => Ok(PathMatch::Prefix(check::url_path(
            &field(path, "prefix"),
            &p,
        )?)),
        raw::StringMatch { regex: Some(r), .. } => Ok(PathMatch::Regex(Pattern::compile(
            &field(path, "regex"),
            &r,
        )?)),
        _ => Err(ValidationError::at(
            field(path, "present"),
            "a path match is exact, prefix or regex",
        )),
    }
}

fn header_match(path: &str, raw: raw::StringMatch) -> Result<HeaderMatch, ValidationError> {
    one_of(path, &raw, "exact, regex, present")?;
    match raw {
        raw::StringMatch { exact: Some(e), .. } => Ok(HeaderMatch::Exact(check::header_value(
            &field(path, "exact"),
            &e,
        )?)),
        raw::StringMatch { regex: Some(r), .. } => Ok(HeaderMatch::Regex(Pattern::compile(
            &field(path, "regex"),
            &r,
        )?)),
        raw::StringMatch {
            present: Some(p), ..
        } => Ok(HeaderMatch::Present(p)),
        _ => Err(ValidationError::at(
            field(path, "prefix"),
            "a header match is exact, regex or present",
        )),
    }
}

fn backends(path: &str, raw: Vec<raw::Backend>) -> Result<Vec<Backend>, ValidationError> {
    if raw.is_empty() {
        return Err(ValidationError::at(
            path,
            "a rule needs at least one backend",
        ));
    }
    let mut out = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let here = index(path, i);
        let subset = check::labels(&field(&here, "subset"), b.subset)?;
        if b.weight > MAX_WEIGHT {
            return Err(ValidationError::at(
                field(&here, "weight"),
                format!("weight {} is over the limit of {MAX_WEIGHT}", b.weight),
            ));
        }
        out.push(Backend {
            subset,
            weight: b.weight,
        });
    }
    if out.iter().all(|b| b.weight == 0) {
        let last = index(path, out.len() - 1);
        return Err(ValidationError::at(
            field(&last, "weight"),
            "backend weights sum to 0: at least one weight must be positive",
        ));
    }
    Ok(out)
}

fn retries(path: &str, raw: raw::Retries) -> Result<Retries, ValidationError> {
    if raw.attempts > MAX_RETRY_ATTEMPTS {
        return Err(ValidationError::at(
            field(path, "attempts"),
            format!(
                "{} retry attempts is too many: at most {MAX_RETRY_ATTEMPTS}",
                raw.attempts
            ),
        ));
    }
    let per_try_timeout = raw
        .per_try_timeout
        .map(|t| check::duration(&field(path, "perTryTimeout"), &t))
        .transpose()?;
    let mut on = Vec::new();
    for (i, cond) in raw.on.iter().enumerate() {
        let parsed = RetryOn::parse(cond).ok_or_else(|| {
            let all: Vec<_> = RetryOn::ALL.iter().map(|r| r.as_str()).collect();
            ValidationError::at(
                index(&field(path, "on"), i),
                format!(
                    "unknown retry condition {cond:?}: expected one of {}",
                    all.join(", ")
                ),
            )
        })?;
        on.push(parsed);
    }
    let methods = raw
        .methods
        .iter()
        .enumerate()
        .map(|(i, m)| check::method(&index(&field(path, "methods"), i), m))
        .collect::<Result<_, _>>()?;
    Ok(Retries {
        methods,
        attempts: raw.attempts,
        per_try_timeout,
        on,
    })
}

fn fault(path: &str, raw: raw::Fault) -> Result<Fault, ValidationError> {
    let delay = match raw.delay {
        Some(d) => {
            let here = field(path, "delay");
            Some(Delay {
                percent: check::percent(&field(&here, "percent"), d.percent)?,
                duration: check::duration(&field(&here, "duration"), &d.duration)?,
            })
        }
        None => None,
    };
    let abort = match raw.abort {
        Some(a) => {
            let here = field(path, "abort");
            if !(200..=599).contains(&a.status) {
                return Err(ValidationError::at(
                    field(&here, "status"),
                    format!("{} is not an HTTP status: expected 200-599", a.status),
                ));
            }
            Some(Abort {
                percent: check::percent(&field(&here, "percent"), a.percent)?,
                status: a.status,
            })
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

fn mirror(path: &str, raw: raw::Mirror) -> Result<Mirror, ValidationError> {
    Ok(Mirror {
        subset: check::labels(&field(path, "subset"), raw.subset)?,
        percent: check::percent(&field(path, "percent"), raw.percent)?,
    })
}

fn header_mods(path: &str, raw: raw::HeaderMods) -> Result<HeaderMods, ValidationError> {
    let mut add = BTreeMap::new();
    for (name, value) in raw.add {
        let here = field(&field(path, "add"), &name);
        add.insert(
            check::header_name(&here, &name)?,
            check::header_value(&here, &value)?,
        );
    }
    let remove = raw
        .remove
        .iter()
        .enumerate()
        .map(|(i, h)| check::header_name(&index(&field(path, "remove"), i), h))
        .collect::<Result<_, _>>()?;
    Ok(HeaderMods { add, remove })
}

fn policy(raw: raw::Policy) -> Result<Policy, ValidationError> {
    let service = Name::at("service", &raw.service)?;
    let rules = raw
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| policy_rule(&index("rules", i), r))
        .collect::<Result<_, _>>()?;
    let mut rate_limits: Vec<RateLimit> = Vec::new();
    for (i, raw) in raw.rate_limits.into_iter().enumerate() {
        let path = index("rateLimits", i);
        let limit = rate_limit(&path, i, raw)?;
        if rate_limits.iter().any(|l| l.name == limit.name) {
            return Err(ValidationError::at(
                field(&path, "name"),
                format!("{:?} is used by an earlier rate limit", limit.name.as_str()),
            ));
        }
        rate_limits.push(limit);
    }
    Ok(Policy {
        service,
        rules,
        rate_limits,
    })
}

fn rate_limit(path: &str, i: usize, raw: raw::RateLimit) -> Result<RateLimit, ValidationError> {
    let name = match raw.name {
        Some(n) => Name::at(&field(path, "name"), &n)?,
        None => Name::at(&field(path, "name"), &format!("limit-{i}"))?,
    };
    let to = raw
        .to
        .map(|t| destination(&field(path, "to"), t))
        .transpose()?;
    let total = raw
        .total
        .map(|r| rate(&field(path, "total"), r.per_second, r.burst))
        .transpose()?;
    let per_caller = raw
        .per_caller
        .map(|r| rate(&field(path, "perCaller"), r.per_second, r.burst))
        .transpose()?;
    let mut callers = Vec::new();
    for (j, c) in raw.callers.into_iter().enumerate() {
        let at = index(&field(path, "callers"), j);
        let from = source(&field(&at, "from"), c.from)?;
        if from == Source::default() {
            return Err(ValidationError::at(
                field(&at, "from"),
                "names no caller: give services, identities or namespaces",
            ));
        }
        let rate = rate(&at, c.per_second, c.burst)?;
        callers.push(CallerRate { from, rate });
    }
    let flows = raw
        .flows
        .map(|f| flow_limit(&field(path, "flows"), f))
        .transpose()?;
    if total.is_none() && per_caller.is_none() && callers.is_empty() && flows.is_none() {
        return Err(ValidationError::at(
            path,
            "limits nothing: give total, perCaller, callers or flows",
        ));
    }
    Ok(RateLimit {
        name,
        to,
        total,
        per_caller,
        callers,
        flows,
    })
}

/// Largest rate accepted, per second.
const MAX_RATE: f64 = 1_000_000.0;

/// A rate above 0 and a burst of at least 1 (default: one second's worth, at least 1).
fn rate(path: &str, per_second: f64, burst: Option<f64>) -> Result<Rate, ValidationError> {
    if !per_second.is_finite() || per_second <= 0.0 || per_second > MAX_RATE {
        return Err(ValidationError::at(
            field(path, "perSecond"),
            format!("{per_second} is out of range: expected a rate above 0 and at most {MAX_RATE}"),
        ));
    }
    let burst = burst.unwrap_or_else(|| per_second.ceil().max(1.0));
    if burst.fract() != 0.0 || !(1.0..=MAX_COUNT as f64).contains(&burst) {
        return Err(ValidationError::at(
            field(path, "burst"),
            format!("{burst} is out of range: expected a whole number from 1 to {MAX_COUNT}"),
        ));
    }
    Ok(Rate {
        per_second,
        // In range by the check above.
        burst: burst as u32,
    })
}

fn flow_limit(path: &str, raw: raw::Flows) -> Result<FlowLimit, ValidationError> {
    let new = match (raw.per_second, raw.burst) {
        (Some(r), burst) => Some(rate(path, r, burst)?),
        (None, Some(_)) => {
            return Err(ValidationError::at(
                field(path, "burst"),
                "a burst needs perSecond",
            ))
        }
        (None, None) => None,
    };
    let concurrent = raw
        .concurrent
        .map(|c| count(&field(path, "concurrent"), c))
        .transpose()?;
    if new.is_none() && concurrent.is_none() {
        return Err(ValidationError::at(
            path,
            "limits nothing: give perSecond or concurrent",
        ));
    }
    Ok(FlowLimit { new, concurrent })
}

fn action(path: &str, s: &str) -> Result<Action, ValidationError> {
    match s {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(ValidationError::at(
            path,
            format!("unknown action {other:?}: expected allow or deny"),
        )),
    }
}

fn policy_rule(path: &str, raw: raw::PolicyRule) -> Result<PolicyRule, ValidationError> {
    let action = action(&field(path, "action"), &raw.action)?;
    let from = raw
        .from
        .map(|f| source(&field(path, "from"), f))
        .transpose()?;
    let to = raw
        .to
        .map(|t| destination(&field(path, "to"), t))
        .transpose()?;
    Ok(PolicyRule { action, from, to })
}

fn names(path: &str, raw: &[String]) -> Result<Vec<Name>, ValidationError> {
    raw.iter()
        .enumerate()
        .map(|(i, s)| Name::at(&index(path, i), s))
        .collect()
}

fn source(path: &str, raw: raw::From) -> Result<Source, ValidationError> {
    let identities = raw
        .identities
        .iter()
        .enumerate()
        .map(|(i, s)| identity_pattern(&index(&field(path, "identities"), i), s))
        .collect::<Result<_, _>>()?;
    Ok(Source {
        services: names(&field(path, "services"), &raw.services)?,
        identities,
        namespaces: names(&field(path, "namespaces"), &raw.namespaces)?,
    })
}

fn identity_pattern(path: &str, s: &str) -> Result<IdentityPattern, ValidationError> {
    let bad = |e: halyard_certs::SpiffeIdError| {
        ValidationError::at(
            path,
            format!("{s:?} is not a SPIFFE id or a trailing-* glob: {e}"),
        )
    };
    match s.strip_suffix('*') {
        Some(prefix) => {
            if prefix.contains('*') {
                return Err(ValidationError::at(path, "'*' is only allowed at the end"));
            }
            // The prefix must be the start of a valid id: complete it with one path character.
            let probe = format!("{prefix}x");
            SpiffeId::parse(&probe).map_err(bad)?;
            Ok(IdentityPattern::Prefix(prefix.to_owned()))
        }
        None => Ok(IdentityPattern::Exact(SpiffeId::parse(s).map_err(bad)?)),
    }
}

fn destination(path: &str, raw: raw::To) -> Result<Destination, ValidationError> {
    let ports = raw
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| check::port(&index(&field(path, "ports"), i), *p))
        .collect::<Result<_, _>>()?;
    let methods = raw
        .methods
        .iter()
        .enumerate()
        .map(|(i, m)| check::method(&index(&field(path, "methods"), i), m))
        .collect::<Result<_, _>>()?;
    let paths = raw
        .paths
        .iter()
        .enumerate()
        .map(|(i, p)| path_pattern(&index(&field(path, "paths"), i), p))
        .collect::<Result<_, _>>()?;
    let headers = raw
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| check::header_name(&index(&field(path, "headers"), i), h))
        .collect::<Result<_, _>>()?;
    Ok(Destination {
        ports,
        methods,
        paths,
        headers,
    })
}

fn path_pattern(path: &str, s: &str) -> Result<PathPattern, ValidationError> {
    match s.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => {
            Ok(PathPattern::Prefix(check::url_path(path, prefix)?))
        }
        None => Ok(PathPattern::Exact(check::url_path(path, s)?)),
        Some(_) => Err(ValidationError::at(path, "'*' is only allowed at the end")),
    }
}

fn trust_bundle(raw: raw::TrustBundle) -> Result<TrustBundle, ValidationError> {
    // Never empty, every block a usable root: a bad bundle would cut every sidecar off.
    let bundle = halyard_certs::TrustBundle::from_pem(&raw.roots).map_err(|e| {
        ValidationError::at(
            "roots",
            format!("not a PEM bundle of one or more root certificates: {e}"),
        )
    })?;
    Ok(TrustBundle {
        roots: bundle.to_pem(),
    })
}

fn revocations(raw: raw::Revocations) -> Result<Revocations, ValidationError> {
    let mut out = Revocations::default();
    for (i, id) in raw.ids.iter().enumerate() {
        let parsed = SpiffeId::parse(id).map_err(|e| {
            ValidationError::at(
                format!("ids[{i}]"),
                format!("{id:?} is not a SPIFFE id: {e}"),
            )
        })?;
        out.ids.insert(parsed);
    }
    for (i, serial) in raw.serials.iter().enumerate() {
        let hex = serial
            .trim_start_matches("0x")
            .replace(':', "")
            .to_ascii_lowercase();
        if hex.is_empty() || hex.len() > 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ValidationError::at(
                format!("serials[{i}]"),
                format!("{serial:?} is not a serial number: expected hex digits, e.g. 3f0a9c..."),
            ));
        }
        // The form the deny list compares: whole bytes, leading zero bytes dropped.
        let padded = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex
        };
        let trimmed = padded.trim_start_matches("00").to_owned();
        out.serials.insert(if trimmed.is_empty() {
            "00".into()
        } else {
            trimmed
        });
    }
    Ok(out)
}

fn mesh_config(raw: raw::MeshConfig) -> Result<MeshConfig, ValidationError> {
    let trust_domain = TrustDomain::new(&raw.trust_domain).map_err(|e| {
        ValidationError::at(
            "trustDomain",
            format!("{:?} is not a trust domain: {e}", raw.trust_domain),
        )
    })?;
    let outbound_traffic_policy = match raw.outbound_traffic_policy.as_deref() {
        None | Some("registry-only") => OutboundTrafficPolicy::RegistryOnly,
        Some("allow-any") => OutboundTrafficPolicy::AllowAny,
        Some(other) => {
            return Err(ValidationError::at(
                "outboundTrafficPolicy",
                format!("unknown policy {other:?}: expected registry-only or allow-any"),
            ))
        }
    };
    let egress_gateway = raw
        .egress_gateway
        .map(|g| Name::at("egressGateway", &g))
        .transpose()?;
    Ok(MeshConfig {
        default_policy: action("defaultPolicy", &raw.default_policy)?,
        trust_domain,
        outbound_traffic_policy,
        egress_gateway,
    })
}

fn external_service(raw: raw::ExternalService) -> Result<ExternalService, ValidationError> {
    let name = Name::at("name", &raw.name)?;
    let hosts = raw
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| host_pattern(&index("hosts", i), h))
        .collect::<Result<Vec<_>, _>>()?;
    let addresses = raw
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_net(&index("addresses", i), a))
        .collect::<Result<Vec<_>, _>>()?;
    if hosts.is_empty() && addresses.is_empty() {
        return Err(ValidationError::at(
            "hosts",
            "an external service needs hosts or addresses",
        ));
    }
    if raw.ports.is_empty() {
        return Err(ValidationError::at("ports", "at least one port is needed"));
    }
    let mut ports: Vec<ExternalPort> = Vec::new();
    for (i, p) in raw.ports.into_iter().enumerate() {
        let path = index("ports", i);
        let port = external_port(&path, p)?;
        if ports.iter().any(|q| q.port == port.port) {
            return Err(ValidationError::at(
                field(&path, "port"),
                format!("port {} is listed twice", port.port),
            ));
        }
        ports.push(port);
    }
    let resolution = match raw.resolution.as_deref() {
        None | Some("dns") => Resolution::Dns,
        Some("static") => Resolution::Static,
        Some(other) => {
            return Err(ValidationError::at(
                "resolution",
                format!("unknown resolution {other:?}: expected dns or static"),
            ))
        }
    };
    if resolution == Resolution::Static && !addresses.iter().any(|a| a.single().is_some()) {
        return Err(ValidationError::at(
            "addresses",
            "resolution static needs at least one single address (not a CIDR block) to dial",
        ));
    }
    let via = match raw.via.as_deref() {
        None | Some("direct") => Via::Direct,
        Some("egress") => Via::Egress,
        Some(other) => {
            return Err(ValidationError::at(
                "via",
                format!("unknown value {other:?}: expected direct or egress"),
            ))
        }
    };
    Ok(ExternalService {
        name,
        hosts,
        addresses,
        ports,
        resolution,
        via,
    })
}

fn external_port(path: &str, raw: raw::ExternalPort) -> Result<ExternalPort, ValidationError> {
    let port = whole_port(&field(path, "port"), raw.port)?;
    let protocol = match raw.protocol.as_str() {
        "tcp" => ExternalProtocol::Tcp,
        "tls" => ExternalProtocol::Tls,
        "http" => ExternalProtocol::Http,
        other => {
            return Err(ValidationError::at(
                field(path, "protocol"),
                format!("unknown protocol {other:?}: expected tcp, tls or http"),
            ))
        }
    };
    let originate_tls = match raw.originate_tls {
        None => None,
        Some(_) if protocol != ExternalProtocol::Http => {
            return Err(ValidationError::at(
                field(path, "originateTls"),
                "TLS origination needs protocol http (the app speaks plain HTTP to the mesh)",
            ))
        }
        Some(o) => {
            let at = field(path, "originateTls");
            let target_port = match o.target_port {
                Some(p) => whole_port(&field(&at, "targetPort"), p)?,
                None => 443,
            };
            if let Some(pem) = &o.ca_bundle {
                let certs = pem::parse_many(pem).map_err(|e| {
                    ValidationError::at(field(&at, "caBundle"), format!("not PEM: {e}"))
                })?;
                if !certs.iter().any(|c| c.tag() == "CERTIFICATE") {
                    return Err(ValidationError::at(
                        field(&at, "caBundle"),
                        "holds no CERTIFICATE block",
                    ));
                }
            }
            Some(OriginateTls {
                target_port,
                ca_bundle: o.ca_bundle,
            })
        }
    };
    Ok(ExternalPort {
        port,
        protocol,
        originate_tls,
    })
}

/// A port from 1 to 65535, read wide so that 0 and negative values get this message.
fn whole_port(path: &str, v: i64) -> Result<u16, ValidationError> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ValidationError::at(path, format!("port {v} is out of range 1-65535")))
}

/// `name` or `*.suffix`: DNS-1123 labels, one leading `*` label at most.
fn host_pattern(path: &str, s: &str) -> Result<HostPattern, ValidationError> {
    let lower = s.to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !labels_ok {
        return Err(ValidationError::at(
            path,
            format!(
                "{s:?} is not a host name or a '*.' wildcard: DNS labels of letters, digits and \
                 '-', and '*' only as the whole first label"
            ),
        ));
    }
    Ok(if wild {
        HostPattern::Suffix(name.to_owned())
    } else {
        HostPattern::Exact(name.to_owned())
    })
}

/// An IP address or `address/prefix`.
fn ip_net(path: &str, s: &str) -> Result<IpNet, ValidationError> {
    let bad = || {
        ValidationError::at(
            path,
            format!(
                "{s:?} is not an IP address or CIDR block (e.g. 203.0.113.7 or 203.0.113.0/24)"
            ),
        )
    };
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let full = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= full)
            .ok_or_else(bad)?,
        None => full,
    };
    Ok(IpNet { addr, prefix })
}

fn endpoint(raw: raw::Endpoint) -> Result<Endpoint, ValidationError> {
    check::key_segment("id", &raw.id)?;
    let address = raw
        .address
        .parse::<SocketAddr>()
        .map_err(|_| ValidationError::at("address", format!("{:?} is not ip:port", raw.address)))?;
    let identity = SpiffeId::parse(&raw.identity).map_err(|e| {
        ValidationError::at(
            "identity",
            format!("{:?} is not a SPIFFE id: {e}", raw.identity),
        )
    })?;
    let weight = raw.weight.unwrap_or(1);
    if weight > MAX_WEIGHT {
        return Err(ValidationError::at(
            "weight",
            format!("weight {weight} is over the limit of {MAX_WEIGHT}"),
        ));
    }
    let gateway = raw
        .gateway
        .map(|g| {
            g.parse::<SocketAddr>()
                .map_err(|_| ValidationError::at("gateway", format!("{g:?} is not ip:port")))
        })
        .transpose()?;
    Ok(Endpoint {
        gateway,
        id: raw.id,
        service: Name::at("service", &raw.service)?,
        address,
        identity,
        labels: check::labels("labels", raw.labels)?,
        cluster: raw.cluster,
        zone: raw.zone,
        weight,
    })
}

/// Longest `keepStale` of a ClusterLink.
const MAX_KEEP_STALE: Duration = Duration::from_secs(7 * 24 * 3600);

fn cluster_link(raw: raw::ClusterLink) -> Result<ClusterLink, ValidationError> {
    let cluster = Name::at("cluster", &raw.cluster)?;
    crate::RegistryUrl::parse(&raw.registry)
        .map_err(|e| ValidationError::at("registry", e.to_string()))?;
    let mesh = Name::at("mesh", raw.mesh.as_deref().unwrap_or("default"))?;
    let gateway = raw
        .gateway
        .parse::<SocketAddr>()
        .map_err(|_| ValidationError::at("gateway", format!("{:?} is not ip:port", raw.gateway)))?;
    let keep_stale = match raw.keep_stale.as_deref() {
        Some(text) => check::duration("keepStale", text)?,
        None => Duration::from_secs(300),
    };
    if !(Duration::from_secs(1)..=MAX_KEEP_STALE).contains(&keep_stale) {
        return Err(ValidationError::at(
            "keepStale",
            "keepStale must be from 1s to 7d",
        ));
    }
    let credentials = raw
        .credentials
        .as_deref()
        .map(|c| Name::at("credentials", c))
        .transpose()?;
    Ok(ClusterLink {
        cluster,
        registry: raw.registry,
        mesh,
        gateway,
        keep_stale,
        credentials,
    })
}

fn status(raw: raw::Status) -> Result<Status, ValidationError> {
    check::key_segment("sidecar", &raw.sidecar)?;
    if raw.revision < 0 {
        return Err(ValidationError::at(
            "revision",
            "revision must not be negative",
        ));
    }
    let applied_at = humantime::parse_rfc3339_weak(&raw.applied_at).map_err(|e| {
        ValidationError::at(
            "appliedAt",
            format!("{:?} is not an RFC 3339 time: {e}", raw.applied_at),
        )
    })?;
    let keys: BTreeSet<_> = raw.rejected.iter().map(|r| r.key.as_str()).collect();
    if keys.len() != raw.rejected.len() {
        return Err(ValidationError::at("rejected", "a key is listed twice"));
    }
    let rejected = raw
        .rejected
        .into_iter()
        .map(|r| Rejection {
            key: r.key,
            error: r.error,
        })
        .collect();
    Ok(Status {
        sidecar: raw.sidecar,
        revision: raw.revision,
        applied_at,
        rejected,
    })
}
