//! Scenario 6, micro: the sidecar's pure decisions at 10,000 endpoints, with criterion.
//! `cargo bench -p halyard-benches --bench micro`.
//!
//! - route selection: the Route rule's backend subset (smooth weighted round-robin) and then the
//!   endpoint (subset, health, locality tier, power of two choices) among 10,000 endpoints,
//!   through the per-snapshot endpoint index the data path uses; the same with a retry's tried
//!   endpoints and 100 ejected ones; and with the linear reference algorithm (`candidates`,
//!   `choose`: every endpoint filtered per pick), as it was before the index;
//! - policy evaluation: a Policy of 100 rules (deny rules for other callers, allow rules on
//!   paths) for an HTTP request that only the last allow rule admits;
//! - snapshot apply: a directory registry of 10,000 endpoint files opened and turned into a
//!   snapshot (read, validate, index), as a sidecar does on start and on every relist; the same
//!   plus the sidecar's endpoint index of it; and the endpoint index alone;
//! - gateway decision: an east-west gateway's routing of one 1-RTT datagram among 10,000
//!   exported endpoints by its connection ID, unencrypted and with a QUIC-LB key (one AES-128
//!   block decryption per datagram).
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup: fixed, known-good input

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use halyard_certs::SpiffeId;
use halyard_registry::model::{parse_documents, Action, Endpoint, Object, Policy, Route};
use halyard_registry::{Origin, Snapshot};
use halyard_sidecar::decide::pick::{choose, BackendPickers, EndpointIndex, Load, Locality, Scope};
use halyard_sidecar::decide::policy::{evaluate, Peer, Target};
use halyard_sidecar::decide::route::{select, RequestView};

const ENDPOINTS: usize = 10_000;

fn endpoint_yaml(i: usize) -> String {
    format!(
        "kind: Endpoint\nid: big-{i}\nservice: big\naddress: \"10.{}.{}.{}:15443\"\n\
         identity: spiffe://mesh.local/ns/default/sa/big\nlabels: {{ version: v{} }}\ncluster: local\nzone: z{}\nweight: 1\n",
        i / 65536 % 256,
        i / 256 % 256,
        i % 256,
        i % 3 + 1,
        i % 4
    )
}

fn objects(yaml: &str) -> Vec<Object> {
    parse_documents("bench", yaml).expect("bench objects parse")
}

fn endpoints() -> Vec<Endpoint> {
    let yaml: Vec<String> = (0..ENDPOINTS).map(endpoint_yaml).collect();
    objects(&yaml.join("---\n"))
        .into_iter()
        .filter_map(|o| match o {
            Object::Endpoint(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn route() -> Route {
    let yaml = "kind: Route\nservice: big\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 50 }\n      \
                - { subset: { version: v2 }, weight: 30 }\n      - { subset: { version: v3 }, weight: 20 }\n";
    match objects(yaml).pop() {
        Some(Object::Route(r)) => r,
        other => panic!("not a route: {other:?}"),
    }
}

fn here() -> Locality {
    Locality {
        cluster: "local".into(),
        zone: "z1".into(),
        failover: Vec::new(),
    }
}

/// Every endpoint with one flow in flight and a 300 µs RTT.
fn load(_: &Endpoint) -> Load {
    Load {
        outstanding: 1,
        rtt: Some(Duration::from_micros(300)),
        healthy: true,
    }
}

/// The snapshot of the 10,000 endpoints and the route.
fn snapshot(eps: &[Endpoint], route: &Route) -> Snapshot {
    let mut snap = Snapshot::empty(Origin::Live);
    let by_id = eps.iter().map(|e| (e.id.clone(), Arc::new(e.clone())));
    snap.endpoints.insert("big".into(), by_id.collect());
    snap.routes.insert("big".into(), Arc::new(route.clone()));
    snap
}

/// A pseudo-random stream (an LCG) for the power of two choices samples.
fn samples(n: &mut u64) -> (u64, u64) {
    *n = n
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*n >> 33, *n >> 17)
}

fn route_selection(c: &mut Criterion) {
    let eps = endpoints();
    let route = route();
    let index = EndpointIndex::build(&snapshot(&eps, &route), &here());
    let mut pickers = BackendPickers::default();
    let mut n = 0u64;
    c.bench_function("route_selection_10k_endpoints", |b| {
        b.iter(|| {
            let (_, rule) = select(&route, RequestView::flow("client")).expect("rule");
            let backend = pickers.pick("big", 0, rule).expect("backend");
            let scope = Scope {
                subset: backend.subset.clone(),
                fallback: rule.fallback,
            };
            let big = index.service("big").expect("service");
            let attempt = (&scope, &[][..], false);
            black_box(big.choose(attempt, &[], &load, samples(&mut n)).ok())
        });
    });
    // A retry: two endpoints tried, and 100 of the service's ejected.
    let ejected: Vec<&str> = eps.iter().step_by(100).map(|e| e.id.as_str()).collect();
    let tried = [eps[1].id.clone(), eps[2].id.clone()];
    c.bench_function("route_selection_10k_endpoints_retry_100_ejected", |b| {
        b.iter(|| {
            let (_, rule) = select(&route, RequestView::flow("client")).expect("rule");
            let backend = pickers.pick("big", 0, rule).expect("backend");
            let scope = Scope {
                subset: backend.subset.clone(),
                fallback: rule.fallback,
            };
            let big = index.service("big").expect("service");
            let attempt = (&scope, &tried[..], true);
            black_box(big.choose(attempt, &ejected, &load, samples(&mut n)).ok())
        });
    });
    let refs: Vec<&Endpoint> = eps.iter().collect();
    let here = here();
    c.bench_function("route_selection_10k_endpoints_linear", |b| {
        b.iter(|| {
            let (_, rule) = select(&route, RequestView::flow("client")).expect("rule");
            let backend = pickers.pick("big", 0, rule).expect("backend");
            let scope = Scope {
                subset: backend.subset.clone(),
                fallback: rule.fallback,
            };
            black_box(choose(&refs, &scope, &load, &here, samples(&mut n)))
        });
    });
}

fn policy() -> Policy {
    let mut yaml = String::from("kind: Policy\nservice: big\nrules:\n");
    for i in 0..50 {
        yaml += &format!("  - action: deny\n    from: {{ identities: [\"spiffe://mesh.local/ns/other{i}/sa/*\"] }}\n");
    }
    for i in 0..50 {
        yaml += &format!(
            "  - action: allow\n    from: {{ services: [caller{i}] }}\n    to: {{ ports: [9080], methods: [GET], paths: [\"/api/v{i}/*\"] }}\n"
        );
    }
    match objects(&yaml).pop() {
        Some(Object::Policy(p)) => p,
        other => panic!("not a policy: {other:?}"),
    }
}

fn policy_evaluation(c: &mut Criterion) {
    let policy = policy();
    let id = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/caller49").expect("id");
    let services = ["caller49"];
    let headers = http::HeaderMap::new();
    let target = Target {
        port: 9080,
        method: Some("GET"),
        path: Some("/api/v49/items"),
        headers: Some(&headers),
    };
    c.bench_function("policy_evaluation_100_rules", |b| {
        b.iter(|| {
            let peer = Peer {
                id: &id,
                services: &services,
            };
            black_box(evaluate(
                Some(&policy),
                Action::Deny,
                peer,
                black_box(target),
            ))
        });
    });
}

fn snapshot_apply(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let eps = dir.path().join("default/endpoints/big");
    std::fs::create_dir_all(&eps).expect("registry dir");
    for i in 0..ENDPOINTS {
        let json = serde_json::json!({
            "id": format!("big-{i}"), "service": "big",
            "address": format!("10.{}.{}.{}:15443", i / 65536 % 256, i / 256 % 256, i % 256),
            "identity": "spiffe://mesh.local/ns/default/sa/big",
            "labels": { "version": "v1" }, "cluster": "local", "zone": "z1", "weight": 1,
        });
        std::fs::write(eps.join(format!("big-{i}.json")), json.to_string()).expect("endpoint file");
    }
    let url = format!("file://{}", dir.path().display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("snapshot_apply");
    group.sample_size(10);
    group.bench_function("dir_registry_10k_endpoints", |b| {
        b.iter(|| {
            let reg = rt
                .block_on(halyard_registry::open(&url, "default", None, None))
                .expect("open");
            let n = reg.snapshot().endpoints_of("big").count();
            assert_eq!(n, ENDPOINTS);
            black_box(n)
        });
    });
    group.bench_function("dir_registry_10k_endpoints_indexed", |b| {
        b.iter(|| {
            let reg = rt
                .block_on(halyard_registry::open(&url, "default", None, None))
                .expect("open");
            let snap = reg.snapshot();
            let index = EndpointIndex::build(&snap, &here());
            black_box(index.service("big").is_some())
        });
    });
    group.finish();
    let snap = snapshot(&endpoints(), &route());
    c.bench_function("endpoint_index_10k_endpoints", |b| {
        b.iter(|| black_box(EndpointIndex::build(&snap, &here())))
    });
}

fn gateway_decision(c: &mut Criterion) {
    use halyard_sidecar::gateway::{decide, Decision, Table};
    use halyard_transport::quic_lb::{LbConfig, LbConfigs, LbKey, ServerId, NONCE_LEN};
    let mut yaml = String::from(
        "kind: Service\nname: big\nexported: true\nports: [{ port: 9080, protocol: tcp }]\n",
    );
    for i in 0..ENDPOINTS {
        yaml += "---\n";
        yaml += &endpoint_yaml(i);
    }
    let snap = Snapshot::of_objects(Origin::Live, objects(&yaml));
    let target: std::net::SocketAddr = "10.0.39.15:15443".parse().unwrap();
    let caller: std::net::SocketAddr = "198.51.100.7:50000".parse().unwrap();
    let key = LbKey::new([0x5a; 16]);
    let mut group = c.benchmark_group("gateway_decision");
    for (name, config) in [
        ("unencrypted", LbConfig::default()),
        ("encrypted", LbConfig::new(1, Some(&key)).unwrap()),
    ] {
        let table = Table::with_lb(&snap, LbConfigs::new(vec![config.clone()]).unwrap());
        let mut datagram = vec![0x43];
        datagram.extend_from_slice(&config.connection_id(ServerId::of(target), [7; NONCE_LEN]));
        datagram.resize(1200, 0x5a);
        assert_eq!(decide(&table, caller, &datagram), Decision::Forward(target));
        group.bench_function(name, |b| {
            b.iter(|| black_box(decide(&table, caller, black_box(&datagram))))
        });
    }
    group.finish();
}

criterion_group!(
    micro,
    route_selection,
    policy_evaluation,
    snapshot_apply,
    gateway_decision
);
criterion_main!(micro);
