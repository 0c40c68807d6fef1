//! Access policy evaluation: a pure function of a policy, the verified peer and the request.
//!
//! Order (DESIGN §4): deny rules first; then, if the service has any allow rule, a request that
//! matches none is denied; a policy with only deny rules admits the rest; a service without a
//! policy gets the mesh default. A condition the sidecar cannot evaluate (an HTTP method or path
//! on a plain TCP flow) fails closed: it makes a deny rule match and an allow rule miss.

use halyard_certs::SpiffeId;
use halyard_registry::model::{Action, Destination, Policy, PolicyRule, Source};

/// The verified caller.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The SPIFFE id from the peer's certificate.
    pub id: &'a SpiffeId,
    /// The services the peer serves (from the registry, or its service account).
    pub services: &'a [&'a str],
}

/// What is being called.
#[derive(Debug, Clone, Copy, Default)]
pub struct Target<'a> {
    /// The service port.
    pub port: u16,
    /// HTTP method; `None` for an L4 flow.
    pub method: Option<&'a str>,
    /// Normalized HTTP path; `None` for an L4 flow.
    pub path: Option<&'a str>,
    /// HTTP request headers; `None` for an L4 flow.
    pub headers: Option<&'a http::HeaderMap>,
}

impl Target<'_> {
    /// An L4 flow to service port `port`.
    pub fn port(port: u16) -> Self {
        Target {
            port,
            ..Target::default()
        }
    }
}

/// The outcome of an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted.
    Allow,
    /// Refused, with the reason (for logs and the denial metric).
    Deny(DenyReason),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// Deny rule number `.0` matched.
    DenyRule(usize),
    /// The service has allow rules and none matched.
    NoAllowMatch,
    /// No policy for the service and the mesh default is deny.
    MeshDefault,
}

impl DenyReason {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyRule(_) => "deny_rule",
            DenyReason::NoAllowMatch => "no_allow_match",
            DenyReason::MeshDefault => "mesh_default",
        }
    }
}

/// Evaluates `policy` (or the mesh `default` where there is none) for `peer` calling `target`.
pub fn evaluate(
    policy: Option<&Policy>,
    default: Action,
    peer: Peer<'_>,
    target: Target<'_>,
) -> Decision {
    let Some(policy) = policy else {
        return match default {
            Action::Allow => Decision::Allow,
            Action::Deny => Decision::Deny(DenyReason::MeshDefault),
        };
    };
    let rules = policy.rules.iter().enumerate();
    let denies = rules.clone().filter(|(_, r)| r.action == Action::Deny);
    if let Some((i, _)) = denies.clone().find(|(_, r)| rule_matches(r, peer, target)) {
        return Decision::Deny(DenyReason::DenyRule(i));
    }
    let mut allows = rules.filter(|(_, r)| r.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|(_, r)| rule_matches(r, peer, target)) {
        Decision::Allow
    } else {
        Decision::Deny(DenyReason::NoAllowMatch)
    }
}

/// Whether a rule applies; unevaluable conditions resolve towards refusal.
fn rule_matches(rule: &PolicyRule, peer: Peer<'_>, target: Target<'_>) -> bool {
    let unevaluable = rule.action == Action::Deny;
    rule.from.as_ref().is_none_or(|f| source_matches(f, peer))
        && rule
            .to
            .as_ref()
            .is_none_or(|t| destination_matches(t, target, unevaluable))
}

/// Whether the caller is one `from` names (each non-empty list must match).
pub(crate) fn source_matches(from: &Source, peer: Peer<'_>) -> bool {
    let services_ok = from.services.is_empty()
        || from
            .services
            .iter()
            .any(|s| peer.services.contains(&s.as_str()));
    let ids_ok = from.identities.is_empty() || from.identities.iter().any(|p| p.matches(peer.id));
    let ns_ok = from.namespaces.is_empty()
        || peer
            .id
            .namespace()
            .is_some_and(|ns| from.namespaces.iter().any(|n| n.as_str() == ns));
    services_ok && ids_ok && ns_ok
}

fn destination_matches(to: &Destination, target: Target<'_>, unevaluable: bool) -> bool {
    let ports_ok = to.ports.is_empty() || to.ports.contains(&target.port);
    let methods_ok = to.methods.is_empty()
        || match target.method {
            Some(m) => to.methods.iter().any(|x| x.eq_ignore_ascii_case(m)),
            None => unevaluable,
        };
    let paths_ok = to.paths.is_empty()
        || match target.path {
            Some(p) => to.paths.iter().any(|x| x.matches(p)),
            None => unevaluable,
        };
    let headers_ok = to.headers.is_empty()
        || match target.headers {
            Some(h) => to.headers.iter().all(|n| h.contains_key(n.as_str())),
            None => unevaluable,
        };
    ports_ok && methods_ok && paths_ok && headers_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_registry::model::{IdentityPattern, Name, PathPattern};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn rule(action: Action, from: Option<Source>, to: Option<Destination>) -> PolicyRule {
        PolicyRule { action, from, to }
    }

    fn from_services(s: &[&str]) -> Option<Source> {
        Some(Source {
            services: s.iter().map(|n| Name::new(n).unwrap()).collect(),
            ..Source::default()
        })
    }

    fn policy(rules: Vec<PolicyRule>) -> Policy {
        Policy {
            service: Name::new("ratings").unwrap(),
            rules,
            rate_limits: Vec::new(),
        }
    }

    const PP: &str = "spiffe://mesh.local/ns/default/sa/productpage";

    fn peer<'a>(id: &'a SpiffeId, services: &'a [&'a str]) -> Peer<'a> {
        Peer { id, services }
    }

    #[test]
    fn no_policy_uses_the_mesh_default() {
        let pp = id(PP);
        let p = peer(&pp, &["productpage"]);
        let t = Target {
            port: 9080,
            ..Target::default()
        };
        assert_eq!(evaluate(None, Action::Allow, p, t), Decision::Allow);
        assert_eq!(
            evaluate(None, Action::Deny, p, t),
            Decision::Deny(DenyReason::MeshDefault)
        );
    }

    #[test]
    fn deny_first_then_allow_list_then_default_allow_for_deny_only() {
        let pp = id(PP);
        let rev = id("spiffe://mesh.local/ns/default/sa/reviews");
        let t = Target {
            port: 9080,
            ..Target::default()
        };
        let deny_pp = policy(vec![
            rule(
                Action::Allow,
                from_services(&["productpage", "reviews"]),
                None,
            ),
            rule(Action::Deny, from_services(&["productpage"]), None),
        ]);
        let got = evaluate(
            Some(&deny_pp),
            Action::Allow,
            peer(&pp, &["productpage"]),
            t,
        );
        assert_eq!(got, Decision::Deny(DenyReason::DenyRule(1)));
        assert_eq!(
            evaluate(Some(&deny_pp), Action::Deny, peer(&rev, &["reviews"]), t),
            Decision::Allow
        );
        let other = id("spiffe://mesh.local/ns/other/sa/x");
        let got = evaluate(Some(&deny_pp), Action::Allow, peer(&other, &["x"]), t);
        assert_eq!(got, Decision::Deny(DenyReason::NoAllowMatch));
        let deny_only = policy(vec![rule(
            Action::Deny,
            from_services(&["productpage"]),
            None,
        )]);
        assert_eq!(
            evaluate(Some(&deny_only), Action::Deny, peer(&other, &["x"]), t),
            Decision::Allow
        );
    }

    /// Allows identities under `ns/default/sa/` from namespace `default`, to port 9080.
    fn default_namespace_to_9080() -> Policy {
        let glob = Source {
            identities: vec![IdentityPattern::Prefix(
                "spiffe://mesh.local/ns/default/sa/".into(),
            )],
            namespaces: vec![Name::new("default").unwrap()],
            ..Source::default()
        };
        let to = Destination {
            ports: vec![9080],
            ..Destination::default()
        };
        policy(vec![rule(Action::Allow, Some(glob), Some(to))])
    }

    fn on_port(port: u16) -> Target<'static> {
        Target {
            port,
            ..Target::default()
        }
    }

    #[test]
    fn a_rule_matches_only_its_ports() {
        let pp = id(PP);
        let p = default_namespace_to_9080();
        assert_eq!(
            evaluate(Some(&p), Action::Deny, peer(&pp, &[]), on_port(9080)),
            Decision::Allow
        );
        assert_eq!(
            evaluate(Some(&p), Action::Deny, peer(&pp, &[]), on_port(9081)),
            Decision::Deny(DenyReason::NoAllowMatch)
        );
    }

    #[test]
    fn a_rule_matches_only_its_source_identities() {
        let p = default_namespace_to_9080();
        let other = id("spiffe://mesh.local/ns/prod/sa/productpage");
        assert!(matches!(
            evaluate(Some(&p), Action::Allow, peer(&other, &[]), on_port(9080)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn http_conditions_on_a_tcp_flow_fail_closed() {
        let pp = id(PP);
        let admin = Destination {
            paths: vec![PathPattern::Exact("/admin".into())],
            ..Destination::default()
        };
        let get = Destination {
            methods: vec!["GET".into()],
            ..Destination::default()
        };
        let l4 = Target {
            port: 9080,
            ..Target::default()
        };
        let deny = policy(vec![rule(Action::Deny, None, Some(admin.clone()))]);
        assert!(matches!(
            evaluate(Some(&deny), Action::Allow, peer(&pp, &[]), l4),
            Decision::Deny(_)
        ));
        let allow = policy(vec![rule(Action::Allow, None, Some(get))]);
        assert!(matches!(
            evaluate(Some(&allow), Action::Allow, peer(&pp, &[]), l4),
            Decision::Deny(_)
        ));
        let http = Target {
            port: 9080,
            method: Some("get"),
            path: Some("/admin"),
            headers: None,
        };
        assert_eq!(
            evaluate(Some(&allow), Action::Deny, peer(&pp, &[]), http),
            Decision::Allow
        );
        assert!(matches!(
            evaluate(Some(&deny), Action::Allow, peer(&pp, &[]), http),
            Decision::Deny(_)
        ));
        let public = Target {
            path: Some("/public"),
            ..http
        };
        assert_eq!(
            evaluate(Some(&deny), Action::Allow, peer(&pp, &[]), public),
            Decision::Allow
        );
    }

    /// Allows requests that carry an `x-admin-token` header.
    fn admin_token_required() -> Policy {
        let to = Destination {
            headers: vec!["x-admin-token".into()],
            ..Destination::default()
        };
        policy(vec![rule(Action::Allow, None, Some(to))])
    }

    fn get_root(headers: Option<&http::HeaderMap>) -> Target<'_> {
        Target {
            port: 9080,
            method: Some("GET"),
            path: Some("/"),
            headers,
        }
    }

    #[test]
    fn header_presence_is_checked_on_http() {
        let pp = id(PP);
        let p = admin_token_required();
        let mut with = http::HeaderMap::new();
        with.insert("x-admin-token", http::HeaderValue::from_static("1"));
        let without = http::HeaderMap::new();
        assert_eq!(
            evaluate(
                Some(&p),
                Action::Deny,
                peer(&pp, &[]),
                get_root(Some(&with))
            ),
            Decision::Allow
        );
        assert!(matches!(
            evaluate(
                Some(&p),
                Action::Deny,
                peer(&pp, &[]),
                get_root(Some(&without))
            ),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn a_header_condition_fails_closed_on_tcp() {
        let pp = id(PP);
        let p = admin_token_required();
        assert!(matches!(
            evaluate(Some(&p), Action::Deny, peer(&pp, &[]), get_root(None)),
            Decision::Deny(_)
        ));
    }
}
