//! Validation: a table of bad objects, each with the exact field path its error must name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use halyard_registry::model::{
    parse_documents, Action, Fallback, HeaderMatch, PathMatch, Protocol,
};
use halyard_registry::{Key, Kind, Object};

const GOOD: &str = r#"
kind: Service
name: reviews
vip: 240.240.0.10
ports:
  - { name: http, port: 9080, protocol: http, targetPort: 9080 }
circuitBreaker: { maxConcurrentRequests: 100, maxPendingRequests: 10, maxConcurrentFlows: 1000, maxRetriesInFlight: 3 }
---
kind: Route
service: reviews
rules:
  - match:
      path: { prefix: /api }
      method: GET
      headers: { x-user: { exact: tester } }
      sourceService: productpage
    backends:
      - { subset: { version: v2 }, weight: 100 }
    timeout: 2s
    retries: { attempts: 3, perTryTimeout: 500ms, on: [5xx, reset, connect-failure] }
    fault: { delay: { percent: 10, duration: 100ms }, abort: { percent: 5, status: 503 } }
    mirror: { subset: { version: v3 }, percent: 10 }
    requestHeaders: { add: { x-mesh: halyard }, remove: [x-debug] }
  - backends:
      - { subset: { version: v1 }, weight: 90 }
      - { subset: { version: v3 }, weight: 10 }
---
kind: Policy
service: ratings
rules:
  - action: deny
    from: { services: [productpage], identities: ["spiffe://mesh.local/ns/default/sa/*"], namespaces: [default] }
    to: { ports: [9080], methods: [POST], paths: ["/admin", "/admin/*"] }
rateLimits:
  - name: api
    to: { paths: ["/api/*"] }
    total: { perSecond: 200, burst: 50 }
    perCaller: { perSecond: 100, burst: 10 }
    callers:
      - { from: { services: [reviews] }, perSecond: 300, burst: 30 }
  - flows: { perSecond: 50, burst: 5, concurrent: 100 }
---
kind: MeshConfig
defaultPolicy: allow
trustDomain: mesh.local
"#;

fn design_example() -> Vec<Object> {
    parse_documents("good.yaml", GOOD).unwrap()
}

#[test]
fn the_design_example_parses() {
    let objs = design_example();
    assert_eq!(objs.len(), 4);
    let Object::Service(svc) = &objs[0] else {
        panic!()
    };
    assert_eq!(svc.ports[0].protocol, Protocol::Http);
    let Object::Route(route) = &objs[1] else {
        panic!()
    };
    let m = route.rules[0].matches.as_ref().unwrap();
    assert!(matches!(m.path, Some(PathMatch::Prefix(ref p)) if p == "/api"));
    assert!(matches!(m.headers["x-user"], HeaderMatch::Exact(ref v) if v == "tester"));
    assert_eq!(
        route.rules[0].timeout,
        Some(std::time::Duration::from_secs(2))
    );
    let Object::Policy(pol) = &objs[2] else {
        panic!()
    };
    assert_eq!(pol.rules[0].action, Action::Deny);
    assert_eq!(objs[3].key(), Key::MeshConfig);
}

#[test]
fn the_design_example_round_trips_through_stored_json() {
    // Serializing and parsing again gives the same JSON.
    for o in &design_example() {
        let again = Object::from_stored(&o.key(), "k", o.to_json().as_bytes()).unwrap();
        assert_eq!(again.to_json(), o.to_json());
    }
}

#[test]
fn the_design_example_round_trips_through_the_yaml_ctl_prints() {
    let objs = design_example();
    let yaml: Vec<String> = objs.iter().map(Object::to_yaml).collect();
    let again = parse_documents("again.yaml", &yaml.join("---\n")).unwrap();
    let json = |v: &[Object]| v.iter().map(Object::to_json).collect::<Vec<_>>();
    assert_eq!(json(&again), json(&objs));
    assert!(
        yaml[1].starts_with("kind: Route\nservice: reviews\n"),
        "{}",
        yaml[1]
    );
}

#[test]
fn a_rule_stays_inside_its_subset_unless_its_fallback_says_service() {
    let objs = design_example();
    let Object::Route(route) = &objs[1] else {
        panic!()
    };
    assert_eq!(route.rules[1].fallback, Fallback::Subset);
    let yaml = "kind: Route\nservice: r\nrules:\n  - backends: [{subset: {version: v1}, weight: 1}]\n    fallback: service\n";
    let objs = parse_documents("f.yaml", yaml).unwrap();
    let Object::Route(route) = &objs[0] else {
        panic!()
    };
    assert_eq!(route.rules[0].fallback, Fallback::Service);
    assert!(
        objs[0].to_yaml().contains("fallback: service"),
        "{}",
        objs[0].to_yaml()
    );
}

fn err_of(yaml: &str) -> (String, String) {
    let errs = parse_documents("f.yaml", yaml).unwrap_err();
    (errs[0].path.clone(), errs[0].to_string())
}

#[test]
fn bad_objects_name_the_field_path() {
    let route = |rule: &str| {
        format!("kind: Route\nservice: reviews\nrules:\n  - backends: [{{weight: 1}}]\n{rule}")
    };
    let cases: Vec<(String, &str, &str)> = vec![
        ("kind: Service\nname: Reviews\nports: [{port: 80, protocol: tcp}]".into(), "name", "DNS-1123"),
        ("kind: Service\nname: r\nports: [{port: 0, protocol: tcp}]".into(), "ports[0].port", "port 0"),
        ("kind: Service\nname: r\nports: [{port: 70000, protocol: tcp}]".into(), "ports[0].port", "u16"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: tcp}, {port: 80, protocol: http}]".into(), "ports[1].port", "twice"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: udp}]".into(), "ports[0].protocol", "tcp, http or grpc"),
        ("kind: Service\nname: r\nvip: 1.2.3\nports: [{port: 80, protocol: tcp}]".into(), "vip", "IP"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: tcp, colour: red}]".into(), "ports[0].colour", "unknown field"),
        ("kind: Service\nname: r\nports: []".into(), "ports", "at least one"),
        (route("  - backends: [{weight: -1}]"), "rules[1].backends[0].weight", "invalid value"),
        (route("  - backends: [{weight: 0}, {weight: 0}]"), "rules[1].backends[1].weight", "sum to 0"),
        (route("  - backends: []"), "rules[1].backends", "at least one"),
        (route("  - backends: [{weight: 1, subset: {'-v': x}}]"), "rules[1].backends[0].subset.-v", "label key"),
        (route("  - match: {path: {regex: '(['}}\n    backends: [{weight: 1}]"), "rules[1].match.path.regex", "bad regex"),
        (route("  - match: {path: {exact: /a, prefix: /b}}\n    backends: [{weight: 1}]"), "rules[1].match.path", "exactly one"),
        (route("  - match: {path: {prefix: api}}\n    backends: [{weight: 1}]"), "rules[1].match.path.prefix", "start with '/'"),
        (route("  - match: {method: get}\n    backends: [{weight: 1}]"), "rules[1].match.method", "HTTP method"),
        (route("  - match: {headers: {X-User: {exact: a}}}\n    backends: [{weight: 1}]"), "rules[1].match.headers.X-User", "header name"),
        (route("  - match: {headers: {x-user: {regex: '*'}}}\n    backends: [{weight: 1}]"), "rules[1].match.headers.x-user.regex", "bad regex"),
        (route("  - match: {sourceService: A_B}\n    backends: [{weight: 1}]"), "rules[1].match.sourceService", "DNS-1123"),
        (route("  - backends: [{weight: 1}]\n    timeout: 0s"), "rules[1].timeout", "positive"),
        (route("  - backends: [{weight: 1}]\n    timeout: soon"), "rules[1].timeout", "not a duration"),
        (route("  - backends: [{weight: 1}]\n    retries: {attempts: 11}"), "rules[1].retries.attempts", "at most 10"),
        (route("  - backends: [{weight: 1}]\n    retries: {attempts: 2, perTryTimeout: 1x}"), "rules[1].retries.perTryTimeout", "not a duration"),
        (route("  - backends: [{weight: 1}]\n    retries: {attempts: 2, on: [5xx, sometimes]}"), "rules[1].retries.on[1]", "retry condition"),
        (route("  - backends: [{weight: 1}]\n    fault: {delay: {percent: 101, duration: 1s}}"), "rules[1].fault.delay.percent", "percentage"),
        (route("  - backends: [{weight: 1}]\n    fault: {abort: {percent: 5, status: 99}}"), "rules[1].fault.abort.status", "HTTP status"),
        (route("  - backends: [{weight: 1}]\n    mirror: {percent: -3}"), "rules[1].mirror.percent", "percentage"),
        (route("  - backends: [{weight: 1}]\n    requestHeaders: {add: {x-a: \"a\\nb\"}}"), "rules[1].requestHeaders.add.x-a", "control"),
        (route("  - backends: [{weight: 1}]\n    requestHeaders: {remove: [ok, 'Bad Header']}"), "rules[1].requestHeaders.remove[1]", "header name"),
        (route("  - backends: [{weight: 1}]\n    retry: {attempts: 1}"), "rules[1].retry", "unknown field"),
        (route("  - backends: [{weight: 1}]\n    fallback: everywhere"), "rules[1].fallback", "expected \"subset\""),
        (route("  - backends: [{weight: 1}]\n    fallback: [service]"), "rules[1].fallback", "invalid type"),
        ("kind: Route\nservice: r\nrules: []".into(), "rules", "at least one"),
        ("kind: Policy\nservice: r\nrules: [{action: permit}]".into(), "rules[0].action", "allow or deny"),
        ("kind: Policy\nservice: r\nrules: [{action: deny}, {action: allow, from: {identities: ['spiffe://mesh.local/ns/a/sa/b', 'spiffe://Mesh/x']}}]".into(), "rules[1].from.identities[1]", "SPIFFE"),
        ("kind: Policy\nservice: r\nrules: [{action: deny, from: {identities: ['spiffe://mesh.local/*/sa/*']}}]".into(), "rules[0].from.identities[0]", "only allowed at the end"),
        ("kind: Policy\nservice: r\nrules: [{action: deny, from: {services: [ok, Not_OK]}}]".into(), "rules[0].from.services[1]", "DNS-1123"),
        ("kind: Policy\nservice: r\nrules: [{action: deny, from: {namespaces: ['']}}]".into(), "rules[0].from.namespaces[0]", "DNS-1123"),
        ("kind: Policy\nservice: r\nrules: [{action: deny, to: {ports: [80, 0]}}]".into(), "rules[0].to.ports[1]", "port 0"),
        ("kind: Policy\nservice: r\nrules: [{action: deny, to: {paths: ['/a/*/b*']}}]".into(), "rules[0].to.paths[0]", "only allowed at the end"),
        ("kind: Policy\nservice: r\nrules: [{action: deny, to: {headers: ['X-Token']}}]".into(), "rules[0].to.headers[0]", "not a header name"),
        (route("  - backends: [{weight: 1}]\n    retries: {attempts: 2, methods: [post]}"), "rules[1].retries.methods[0]", "not an HTTP method"),
        ("kind: Policy\nservice: r\nrules: [{action: deny, to: {methods: [post]}}]".into(), "rules[0].to.methods[0]", "HTTP method"),
        ("kind: Policy\nservice: r\nrateLimits: [{total: {perSecond: -5, burst: 1}}]".into(), "rateLimits[0].total.perSecond", "above 0"),
        ("kind: Policy\nservice: r\nrateLimits: [{perCaller: {perSecond: 5, burst: 0}}]".into(), "rateLimits[0].perCaller.burst", "from 1"),
        ("kind: Policy\nservice: r\nrateLimits: [{perCaller: {perSecond: 5, burst: 2.5}}]".into(), "rateLimits[0].perCaller.burst", "whole number"),
        ("kind: Policy\nservice: r\nrateLimits: [{perCaller: {perSecond: 5, bursts: 2}}]".into(), "rateLimits[0].perCaller.bursts", "unknown field"),
        ("kind: Policy\nservice: r\nrateLimits: [{name: api}]".into(), "rateLimits[0]", "limits nothing"),
        ("kind: Policy\nservice: r\nrateLimits: [{name: a, flows: {concurrent: 1}}, {name: a, flows: {concurrent: 2}}]".into(), "rateLimits[1].name", "earlier rate limit"),
        ("kind: Policy\nservice: r\nrateLimits: [{callers: [{from: {}, perSecond: 1}]}]".into(), "rateLimits[0].callers[0].from", "names no caller"),
        ("kind: Policy\nservice: r\nrateLimits: [{flows: {concurrent: 0}}]".into(), "rateLimits[0].flows.concurrent", "from 1"),
        ("kind: Policy\nservice: r\nrateLimits: [{flows: {burst: 3}}]".into(), "rateLimits[0].flows.burst", "needs perSecond"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: tcp}]\ncircuitBreaker: {maxConcurrentRequests: -1}".into(), "circuitBreaker.maxConcurrentRequests", "from 1"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: tcp}]\ncircuitBreaker: {}".into(), "circuitBreaker", "no threshold"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: tcp}]\ncircuitBreaker: {maxRequests: 3}".into(), "circuitBreaker.maxRequests", "unknown field"),
        ("kind: ExternalService\nname: bad\nhosts: ['*.*.bad']\nports: [{port: 443, protocol: tls}]".into(), "hosts[0]", "wildcard"),
        ("kind: ExternalService\nname: bad\nhosts: [api.example.com]\nports: [{port: 0, protocol: tcp}]".into(), "ports[0].port", "1-65535"),
        ("kind: ExternalService\nname: bad\nhosts: [db.example.com]\nports: [{port: 5432, protocol: tcp, originateTls: {}}]".into(), "ports[0].originateTls", "protocol http"),
        ("kind: ExternalService\nname: bad\nhosts: [a.example.com]\nports: [{port: 80, protocol: http, originateTls: {caBundle: nope}}]".into(), "ports[0].originateTls.caBundle", "CERTIFICATE"),
        ("kind: ExternalService\nname: bad\nports: [{port: 80, protocol: http}]".into(), "hosts", "hosts or addresses"),
        ("kind: ExternalService\nname: bad\naddresses: [10.0.0.0/33]\nports: [{port: 80, protocol: tcp}]".into(), "addresses[0]", "CIDR"),
        ("kind: ExternalService\nname: bad\naddresses: [10.0.0.0/8]\nresolution: static\nports: [{port: 80, protocol: tcp}]".into(), "addresses", "single address"),
        ("kind: ExternalService\nname: bad\nhosts: [a.b]\nvia: tunnel\nports: [{port: 80, protocol: tcp}]".into(), "via", "direct or egress"),
        ("kind: MeshConfig\ndefaultPolicy: allow\ntrustDomain: mesh.local\noutboundTrafficPolicy: open".into(), "outboundTrafficPolicy", "registry-only or allow-any"),
        ("kind: MeshConfig\ndefaultPolicy: maybe\ntrustDomain: mesh.local".into(), "defaultPolicy", "allow or deny"),
        ("kind: MeshConfig\ndefaultPolicy: deny\ntrustDomain: Mesh.Local".into(), "trustDomain", "trust domain"),
        ("kind: Endpoint\nid: e1\nservice: r\naddress: 127.0.0.1\nidentity: spiffe://td/x".into(), "address", "ip:port"),
        ("kind: Endpoint\nid: e1\nservice: r\naddress: 127.0.0.1:1\nidentity: http://td/x".into(), "identity", "SPIFFE"),
        ("kind: Endpoint\nid: e/1\nservice: r\naddress: 127.0.0.1:1\nidentity: spiffe://td/x".into(), "id", "valid id"),
        ("kind: Endpoint\nid: e1\nservice: r\naddress: 127.0.0.1:1\nidentity: spiffe://td/x\ngateway: gw.example:15444".into(), "gateway", "ip:port"),
        ("kind: ClusterLink\ncluster: B\nregistry: etcd://10.0.0.1:2379\ngateway: 192.0.2.9:15444".into(), "cluster", "DNS"),
        ("kind: ClusterLink\ncluster: b\nregistry: ftp://10.0.0.1\ngateway: 192.0.2.9:15444".into(), "registry", "ftp"),
        ("kind: ClusterLink\ncluster: b\nregistry: etcd://10.0.0.1:2379\ngateway: 192.0.2.9".into(), "gateway", "ip:port"),
        ("kind: ClusterLink\ncluster: b\nregistry: etcd://10.0.0.1:2379\ngateway: 192.0.2.9:15444\nkeepStale: 30d".into(), "keepStale", "1s to 7d"),
        ("kind: ClusterLink\ncluster: b\nregistry: etcd://10.0.0.1:2379\ngateway: 192.0.2.9:15444\nkeepStale: soon".into(), "keepStale", "not a duration"),
        ("kind: ClusterLink\ncluster: b\nregistry: etcd://10.0.0.1:2379\ngateway: 192.0.2.9:15444\ncredentials: ../../etc/shadow".into(), "credentials", "DNS-1123"),
        ("kind: ClusterLink\ncluster: b\nregistry: etcd://10.0.0.1:2379\ngateway: 192.0.2.9:15444\npassword: hunter2".into(), "password", "unknown field"),
        ("kind: ClusterLink\ncluster: b\nregistry: etcd://10.0.0.1:2379\ngateway: 192.0.2.9:15444\ntoken: x".into(), "token", "unknown field"),
        ("kind: ClusterLink\ncluster: b\nregistry: etcd://reader:S3CRET@10.0.0.1:2379\ngateway: 192.0.2.9:15444".into(), "registry", "credentials file"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: tcp}]\nfailover: [b, b]".into(), "failover[1]", "twice"),
        ("kind: Service\nname: r\nports: [{port: 80, protocol: tcp}]\nfailover: [Cluster_B]".into(), "failover[0]", "DNS"),
        ("kind: Route\nservice: r\nfailover: [b, c, b]\nrules: [{backends: [{weight: 1}]}]".into(), "failover[2]", "twice"),
        ("kind: Gadget\nname: x".into(), "kind", "unknown kind"),
        ("name: x".into(), "kind", "missing kind"),
    ];
    for (yaml, path, reason) in &cases {
        let (got_path, msg) = err_of(yaml);
        assert_eq!(&got_path, path, "{yaml}\n=> {msg}");
        assert!(msg.contains(reason), "{yaml}\n=> {msg} (wanted {reason:?})");
        assert!(msg.starts_with("f.yaml"), "{msg}");
        assert!(msg.contains(&format!(": {path}: ")), "{msg}");
        assert!(
            !msg.contains("S3CRET"),
            "a password in a validation error: {msg}"
        );
    }
}

#[test]
fn every_bad_object_gets_an_error_naming_its_document() {
    let text = "kind: Service\nname: a\nports: [{port: 1, protocol: tcp}]\n---\nkind: Route\nservice: a\nrules:\n  - backends: [{weight: 1}]\n  - backends: [{weight: 0}]\n---\nkind: Policy\nservice: a\nrules: [{action: nope}]\n";
    let errs = parse_documents("bundle.yaml", text).unwrap_err();
    assert_eq!(errs.len(), 2);
    assert_eq!(
        errs[0].to_string(),
        "bundle.yaml: document 2 (Route a): rules[1].backends[0].weight: backend weights sum to 0: at least one weight must be positive"
    );
    assert!(errs[1]
        .to_string()
        .starts_with("bundle.yaml: document 3 (Policy a): rules[0].action:"));
}

#[test]
fn stored_values_are_checked_against_their_key() {
    let key = Key::Policy("ratings".into());
    let e = Object::from_stored(
        &key,
        "/halyard/m/policies/ratings",
        br#"{"service":"other","rules":[]}"#,
    )
    .unwrap_err();
    assert_eq!(e.path, "service");
    assert!(
        e.to_string()
            .starts_with("/halyard/m/policies/ratings: service: "),
        "{e}"
    );
    let e = Object::from_stored(
        &key,
        "k",
        br#"{"kind":"Service","name":"ratings","ports":[]}"#,
    )
    .unwrap_err();
    assert_eq!(e.path, "kind");
    let e = Object::from_stored(&key, "k", b"{oops").unwrap_err();
    assert!(e.reason.contains("not valid JSON"));
    assert!(Object::from_stored(&key, "k", br#"{"service":"ratings","rules":[]}"#).is_ok());
    assert_eq!(Kind::parse("policies"), Some(Kind::Policy));
}

#[test]
fn a_json_file_may_hold_an_array_of_objects() {
    let text = r#"[{"kind":"MeshConfig","defaultPolicy":"deny","trustDomain":"td"},{"kind":"Service","name":"a","ports":[{"port":1,"protocol":"grpc"}]}]"#;
    assert_eq!(parse_documents("x.json", text).unwrap().len(), 2);
}

#[test]
fn an_external_service_matches_names_addresses_and_ports() {
    let yaml = "kind: ExternalService\nname: outside\nhosts: ['*.outside.test', Exact.Example.com]\naddresses: [203.0.113.0/24, 198.51.100.7]\nresolution: static\nvia: egress\nports:\n  - { port: 443, protocol: tls }\n  - { port: 80, protocol: http, originateTls: { targetPort: 8443 } }\n";
    let objs = parse_documents("e.yaml", yaml).unwrap();
    let Object::ExternalService(e) = &objs[0] else {
        panic!()
    };
    assert!(e.covers(Some("api.outside.test"), None, 443));
    assert!(e.covers(Some("a.b.OUTSIDE.test."), None, 443));
    assert!(
        !e.covers(Some("outside.test"), None, 443),
        "the wildcard needs a label"
    );
    assert!(!e.covers(Some("evil-outside.test"), None, 443));
    assert!(e.covers(Some("exact.example.com"), None, 80));
    assert!(
        !e.covers(Some("api.outside.test"), None, 8080),
        "port not listed"
    );
    assert!(e.covers(None, Some("203.0.113.99".parse().unwrap()), 443));
    assert!(!e.covers(None, Some("203.0.114.1".parse().unwrap()), 443));
    assert_eq!(
        e.port(80)
            .unwrap()
            .originate_tls
            .as_ref()
            .unwrap()
            .target_port,
        8443
    );
    let again = parse_documents("again.yaml", &objs[0].to_yaml()).unwrap();
    let Object::ExternalService(back) = &again[0] else {
        panic!()
    };
    assert_eq!(back, e);
}

/// The deny list: ids parse as SPIFFE ids, serials as hex (colons and `0x` allowed, stored in
/// the one form the verifiers compare); each bad entry is named by its index.
#[test]
fn revocations_parse_and_name_bad_entries() {
    let good = "kind: Revocations\nids: [\"spiffe://mesh.local/ns/default/sa/a\"]\nserials: [\"00:0A:bc\", \"0x1f\"]\n";
    let objects = parse_documents("t", good).unwrap();
    let Object::Revocations(r) = &objects[0] else {
        panic!("not a Revocations: {objects:?}")
    };
    assert_eq!(objects[0].key(), Key::Revocations);
    assert_eq!(r.ids.len(), 1);
    assert_eq!(
        r.serials.iter().cloned().collect::<Vec<_>>(),
        vec!["0abc".to_owned(), "1f".to_owned()]
    );
    assert_eq!(Kind::parse("revocations"), Some(Kind::Revocations));
    for (bad, field) in [
        ("kind: Revocations\nids: [\"nope\"]\n", "ids[0]"),
        (
            "kind: Revocations\nserials: [\"12\", \"xyz\"]\n",
            "serials[1]",
        ),
        ("kind: Revocations\nnames: []\n", "names"),
    ] {
        let errs = parse_documents("t", bad).unwrap_err();
        let text = errs[0].to_string();
        assert!(text.contains(field), "{bad}: {text}");
    }
}

#[test]
fn a_cluster_link_parses_with_defaults_and_round_trips() {
    let yaml = "kind: ClusterLink\ncluster: east\nregistry: etcd://10.2.0.10:2379,10.2.0.11:2379\ngateway: 203.0.113.20:15444\n";
    let objs = parse_documents("l.yaml", yaml).unwrap();
    let Object::ClusterLink(link) = &objs[0] else {
        panic!()
    };
    assert_eq!(link.cluster.to_string(), "east");
    assert_eq!(link.mesh.to_string(), "default");
    assert_eq!(link.keep_stale, std::time::Duration::from_secs(300));
    assert_eq!(objs[0].key().path(), "links/east");
    let stored = Object::from_stored(&objs[0].key(), "etcd", objs[0].to_json().as_bytes()).unwrap();
    assert_eq!(stored.to_json(), objs[0].to_json());
    // Stored under another cluster's key: refused, naming the field.
    let wrong = halyard_registry::Key::parse("links/west").unwrap();
    let err = Object::from_stored(&wrong, "etcd", objs[0].to_json().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("cluster"), "{err}");
}
