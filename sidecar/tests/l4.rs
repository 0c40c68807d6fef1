//! The L4 data plane end to end: echo apps behind real sidecars on loopback, QUIC between them,
//! a directory registry written as an operator would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;

use halyard_sidecar::test_util::{
    call, loopback_ip, metric, tagged_echo, Echo, Mesh, Sidecar, Spec,
};

fn service_yaml(name: &str, port: u16, target: u16) -> String {
    format!("kind: Service\nname: {name}\nports:\n  - {{ name: tcp, port: {port}, protocol: tcp, targetPort: {target} }}\n")
}

/// A megabyte through an explicit upstream arrives intact, and the byte counters show exactly
/// what crossed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_upstreams_carry_bytes_intact() {
    let mesh = Mesh::with_dir().await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&service_yaml("ratings", 9080, app.addr.port()))
        .await;
    let ratings = mesh.start(&Spec::new("ratings", "v1")).await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9080))
        .await;
    pp.wait_endpoints("ratings", 1).await;

    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = call(pp.upstream(0), &big).await.unwrap();
    assert_eq!(&out[..8], b"ratings:");
    assert!(out[8..] == big[..], "payload changed in flight");
    assert_eq!(
        call(pp.upstream(0), b"small").await.unwrap(),
        b"ratings:small"
    );

    pp.wait_flows(2).await;
    ratings.wait_flows(2).await;
    let out_m = pp.started.render_metrics();
    let edge = [
        ("direction", "outbound"),
        ("destination_service", "ratings"),
        ("destination_version", "v1"),
    ];
    let ok = [&edge[..], &[("response_flags", "-")]].concat();
    assert_eq!(metric(&out_m, "halyard_tcp_connections_total", &ok), 2.0);
    let sent = [&edge[..], &[("stream", "sent")]].concat();
    assert_eq!(
        metric(&out_m, "halyard_tcp_bytes_total", &sent),
        (big.len() + 5) as f64
    );
    let in_m = ratings.started.render_metrics();
    let inbound = [
        ("direction", "inbound"),
        ("source_service", "productpage"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        metric(&in_m, "halyard_tcp_connections_total", &inbound),
        2.0
    );
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
}

fn route_yaml(v1: u32, v2: u32) -> String {
    format!(
        "kind: Route\nservice: reviews\nrules:\n  - backends:\n      - {{ subset: {{ version: v1 }}, weight: {v1} }}\n      - {{ subset: {{ version: v2 }}, weight: {v2} }}\n"
    )
}

/// The rule's flows may leave the subset they were given when it cannot serve them.
const FALLBACK_SERVICE: &str = "    fallback: service\n";

async fn split(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let out = call(addr, format!("{i}").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        let text = String::from_utf8(out).unwrap();
        let tag = text.split(':').next().unwrap().to_owned();
        assert!(
            tag == "v1" || tag == "v2",
            "connection {i} answered {text:?}"
        );
        *counts.entry(tag).or_default() += 1;
    }
    counts
}

/// reviews v1 and v2 (echo apps tagged with their version) behind a route with these weights,
/// and productpage calling reviews.
struct TwoVersions {
    mesh: Mesh,
    a1: Echo,
    _a2: Echo,
    v1: Sidecar,
    v2: Sidecar,
    pp: Sidecar,
}

async fn two_versions(v1_weight: u32, v2_weight: u32) -> TwoVersions {
    two_versions_with(v1_weight, v2_weight, "").await
}

/// As [`two_versions`], with `rule_extra` added to the route's rule.
async fn two_versions_with(v1_weight: u32, v2_weight: u32, rule_extra: &str) -> TwoVersions {
    let ip_v1 = loopback_ip();
    let ip_v2 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let a1 = tagged_echo(SocketAddr::new(ip_v1, 0), "v1").await;
    let a2 = tagged_echo(SocketAddr::new(ip_v2, a1.addr.port()), "v2").await;
    mesh.apply(&format!(
        "{}---\n{}",
        service_yaml("reviews", 9080, a1.addr.port()),
        route_yaml(v1_weight, v2_weight) + rule_extra
    ))
    .await;
    let v1 = mesh
        .start(&Spec::new("reviews", "v1").app_host(ip_v1))
        .await;
    let v2 = mesh
        .start(&Spec::new("reviews", "v2").app_host(ip_v2))
        .await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", 2).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    TwoVersions {
        mesh,
        a1,
        _a2: a2,
        v1,
        v2,
        pp,
    }
}

impl TwoVersions {
    async fn shutdown(self) {
        for s in [self.pp, self.v1, self.v2] {
            s.shutdown().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_weights_split_flows() {
    let m = two_versions(80, 20).await;
    let counts = split(m.pp.upstream(0), 2000).await;
    let share = counts["v1"] as f64 / 2000.0;
    assert!(
        (share - 0.8).abs() <= 0.05,
        "v1 got {share:.3} of 2000 flows: {counts:?}"
    );
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_applies_without_failing_a_flow() {
    let m = two_versions(80, 20).await;
    // Flows keep running while the weights change; none may fail.
    let addr = m.pp.upstream(0);
    let load = tokio::spawn(async move { split(addr, 300).await });
    m.mesh.apply(&route_yaml(10, 90)).await;
    m.pp.wait_snapshot("the new weights", |s| {
        s.route("reviews")
            .is_some_and(|r| r.rules[0].backends[0].weight == 10)
    })
    .await;
    load.await.unwrap();
    let after = split(m.pp.upstream(0), 500).await;
    let share = after.get("v2").copied().unwrap_or(0) as f64 / 500.0;
    assert!(
        (share - 0.9).abs() <= 0.05,
        "v2 got {share:.3} after the change: {after:?}"
    );
    m.shutdown().await;
}

/// reviews v1, whose app is not listening, and v2 (an echo tagged `v2`), behind a route whose one
/// rule sends every flow to v1 (`rule_extra` added to the rule), with productpage calling it.
struct DeadSubset {
    _mesh: Mesh,
    a2: Echo,
    /// With [`V1App::Stalled`]: the listener and its filler.
    _stalled: Option<(socket2::Socket, std::net::TcpStream)>,
    servers: [Sidecar; 2],
    pp: Sidecar,
}

/// How v1's app host fails.
#[derive(Clone, Copy, PartialEq)]
enum V1App {
    /// Nothing listens: v1's sidecar is refused at once.
    Refusing,
    /// A listener that takes no connection ([`stalled_listener`]): v1's sidecar waits out its
    /// connect timeout, 500 ms (productpage's is 2 s, so v1 answers first).
    Stalled,
}

async fn dead_subset(rule_extra: &str) -> DeadSubset {
    dead_subset_with(rule_extra, V1App::Refusing).await
}

async fn dead_subset_with(rule_extra: &str, v1_app: V1App) -> DeadSubset {
    let (ip_v1, ip_v2) = (loopback_ip(), loopback_ip());
    let mesh = Mesh::with_dir().await;
    let a2 = tagged_echo(SocketAddr::new(ip_v2, 0), "v2").await;
    let stalled = (v1_app == V1App::Stalled)
        .then(|| stalled_listener(SocketAddr::new(ip_v1, a2.addr.port())));
    let route = format!(
        "kind: Route\nservice: reviews\nrules:\n  - backends: [{{ subset: {{ version: v1 }}, weight: 100 }}]\n{rule_extra}"
    );
    mesh.apply(&format!(
        "{}---\n{route}",
        service_yaml("reviews", 9080, a2.addr.port())
    ))
    .await;
    let (mut v1_spec, mut pp_spec) = (
        Spec::new("reviews", "v1").app_host(ip_v1),
        Spec::new("productpage", "v1").upstream("reviews", 9080),
    );
    if stalled.is_some() {
        v1_spec = v1_spec.connect_timeout("500ms");
        pp_spec = pp_spec.connect_timeout("2s");
    }
    let v1 = mesh.start(&v1_spec).await;
    let v2 = mesh
        .start(&Spec::new("reviews", "v2").app_host(ip_v2))
        .await;
    let pp = mesh.start(&pp_spec).await;
    pp.wait_endpoints("reviews", 2).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    DeadSubset {
        _mesh: mesh,
        a2,
        _stalled: stalled,
        servers: [v1, v2],
        pp,
    }
}

impl DeadSubset {
    async fn shutdown(self) {
        let [v1, v2] = self.servers;
        for s in [self.pp, v1, v2] {
            s.shutdown().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_is_not_retried_outside_its_subset() {
    let mut d = dead_subset("").await;
    for i in 0..5 {
        let out = call(d.pp.upstream(0), b"hi").await;
        assert!(
            out.as_ref().map_or(true, |b| b.is_empty()),
            "flow {i} answered: {out:?}"
        );
    }
    assert!(d.a2.accepted.try_recv().is_err(), "v2 got a flow");
    // With no endpoint of the subset left to try, no retry was even counted.
    let m = d.pp.started.render_metrics();
    let retries = metric(
        &m,
        "halyard_retries_total",
        &[("destination_service", "reviews")],
    );
    assert_eq!(retries, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_of_a_rule_with_fallback_service_is_retried_on_the_service() {
    let d = dead_subset(FALLBACK_SERVICE).await;
    for i in 0..5 {
        let out = call(d.pp.upstream(0), b"hi").await;
        assert_eq!(out.ok().as_deref(), Some(&b"v2:hi"[..]), "flow {i}");
    }
}

/// A listener whose accept queue is full: a SYN to it is dropped, so a connection waits until
/// its connect timeout (a host that stopped answering). Lives as long as the returned sockets.
fn stalled_listener(addr: SocketAddr) -> (socket2::Socket, std::net::TcpStream) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener.bind(&addr.into()).unwrap();
    // A backlog of 0 holds one finished handshake; the filler takes it.
    listener.listen(0).unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (listener, filler)
}

/// What the app sends while its tunnel waits for the peer's answer is kept for a retry (it also
/// goes out at once; the `newflows` bench's wide-area rows show the round trip that saves):
/// when the first endpoint never answers (its app host stopped answering) and the flow is
/// retried on another, that endpoint's app gets every byte, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_while_the_tunnel_opens_are_replayed_on_a_retry() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = dead_subset_with(FALLBACK_SERVICE, V1App::Stalled).await;
    let mut app = tokio::net::TcpStream::connect(t.pp.upstream(0))
        .await
        .unwrap();
    app.write_all(b"first,").await.unwrap();
    // The app writes while v1's sidecar is still connecting to its app (500 ms).
    for part in [&b"second,"[..], b"third"] {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        app.write_all(part).await.unwrap();
    }
    app.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.read_to_end(&mut out),
    )
    .await
    .expect("the flow never ended")
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "v2:first,second,third");

    // It was v1 that failed: its sidecar gave up on its app and the flow was retried.
    let m = t.pp.started.render_metrics();
    let retries = metric(
        &m,
        "halyard_retries_total",
        &[("destination_service", "reviews")],
    );
    assert_eq!(retries, 1.0);
    t.pp.wait_flows(1).await;
    let sent = metric(
        &t.pp.started.render_metrics(),
        "halyard_tcp_bytes_total",
        &[("direction", "outbound"), ("stream", "sent")],
    );
    assert_eq!(sent, 18.0, "bytes counted once");
    t.shutdown().await;
}

/// An app that resets its connection while its tunnel waits for the answer ends the flow as a
/// reset: it is not retried elsewhere, and no endpoint gets a stream that ends cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_reset_while_the_tunnel_opens_ends_the_flow_as_a_reset() {
    use tokio::io::AsyncWriteExt;
    let mut t = dead_subset_with(FALLBACK_SERVICE, V1App::Stalled).await;
    let mut app = tokio::net::TcpStream::connect(t.pp.upstream(0))
        .await
        .unwrap();
    app.write_all(b"half a request").await.unwrap();
    // A reset, not a close: SO_LINGER 0.
    socket2::SockRef::from(&app)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(app);
    t.pp.wait_flows(1).await;
    let m = t.pp.started.render_metrics();
    let reset = [("direction", "outbound"), ("response_flags", "RESET")];
    assert_eq!(metric(&m, "halyard_tcp_connections_total", &reset), 1.0);
    let retries = metric(
        &m,
        "halyard_retries_total",
        &[("destination_service", "reviews")],
    );
    assert_eq!(retries, 0.0, "a flow whose app is gone was retried");
    assert!(t.a2.accepted.try_recv().is_err(), "v2 got the flow");
    t.shutdown().await;
}

/// ratings behind a policy that denies productpage, with productpage calling ratings; one
/// call went through before the policy was applied.
async fn ratings_denied_to_productpage() -> (Mesh, Echo, Sidecar, Sidecar) {
    let mesh = Mesh::with_dir().await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&service_yaml("ratings", 9080, app.addr.port()))
        .await;
    let ratings = mesh.start(&Spec::new("ratings", "v1")).await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9080))
        .await;
    pp.wait_endpoints("ratings", 1).await;
    assert_eq!(call(pp.upstream(0), b"hi").await.unwrap(), b"ratings:hi");

    let deny = "kind: Policy\nservice: ratings\nrules:\n  - action: deny\n    from: { services: [productpage] }\n";
    mesh.apply(deny).await;
    ratings
        .wait_snapshot("the policy", |s| s.policy("ratings").is_some())
        .await;
    (mesh, app, ratings, pp)
}

/// A denied flow is closed; the denial counters on both sides are the proof it was the policy.
/// Each flow is recorded on both sides by the time the app sees it closed: the counters are
/// read right after each refusal, with no waiting, over several flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_closes_the_flow() {
    let (_mesh, _app, ratings, pp) = ratings_denied_to_productpage().await;
    let denials = [
        ("source_service", "productpage"),
        ("destination_service", "ratings"),
    ];
    let flags = [
        ("destination_service", "ratings"),
        ("response_flags", "DENY"),
    ];
    for n in 1..=20 {
        let refused = call(pp.upstream(0), b"hi").await;
        assert!(
            refused.as_ref().map_or(true, |b| b.is_empty()),
            "denied flow answered: {refused:?}"
        );
        let server = ratings.started.render_metrics();
        let denied = metric(&server, "halyard_policy_denials_total", &denials);
        assert_eq!(denied, f64::from(n), "flow {n}");
        let client = pp.started.render_metrics();
        let flagged = metric(&client, "halyard_tcp_connections_total", &flags);
        assert_eq!(flagged, f64::from(n), "flow {n}");
    }
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowing_again_restores_the_flow() {
    let (mesh, _app, ratings, pp) = ratings_denied_to_productpage().await;
    let allow = "kind: Policy\nservice: ratings\nrules:\n  - action: allow\n    from: { services: [productpage] }\n";
    mesh.apply(allow).await;
    ratings
        .wait_snapshot("the restored policy", |s| {
            s.policy("ratings")
                .is_some_and(|p| p.rules[0].action == halyard_registry::model::Action::Allow)
        })
        .await;
    assert_eq!(
        call(pp.upstream(0), b"again").await.unwrap(),
        b"ratings:again"
    );
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
}

/// reviews v1 and v2 behind a route that sends everything to v1 (and, once v1 is gone, lets
/// flows leave for the rest of the service), with a flow in flight to v1 (half of the request
/// sent) when v1 starts draining; productpage has seen v1 leave.
async fn v1_draining_under_an_open_flow() -> (TwoVersions, tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut m = two_versions_with(100, 0, FALLBACK_SERVICE).await;
    let mut open = tokio::net::TcpStream::connect(m.pp.upstream(0))
        .await
        .unwrap();
    open.write_all(b"first half, ").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), m.a1.accepted.recv())
        .await
        .expect("the flow reached the v1 app");

    m.v1.stop.cancel();
    m.pp.wait_endpoints("reviews", 1).await;
    (m, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_flows_avoid_a_draining_endpoint() {
    let (m, _open) = v1_draining_under_an_open_flow().await;
    assert_eq!(call(m.pp.upstream(0), b"new").await.unwrap(), b"v2:new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_flow_finishes_on_a_draining_endpoint() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (m, mut open) = v1_draining_under_an_open_flow().await;
    open.write_all(b"second half").await.unwrap();
    open.shutdown().await.unwrap();
    let mut reply = Vec::new();
    open.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"v1:first half, second half");
    m.v1.task.await.unwrap().unwrap();
    m.pp.shutdown().await.unwrap();
    m.v2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificate_files_are_used_without_restart_or_dropped_flows() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::with_dir().await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&service_yaml("ratings", 9080, app.addr.port()))
        .await;
    let ratings = mesh.start(&Spec::new("ratings", "v1")).await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9080))
        .await;
    pp.wait_endpoints("ratings", 1).await;
    let mut open = tokio::net::TcpStream::connect(pp.upstream(0))
        .await
        .unwrap();
    open.write_all(b"before ").await.unwrap();
    let old_serial = ratings.started.identity.current().serial().to_vec();

    // A renewal writes new files next to the old ones, as `halyard ca issue` does.
    let files = &ratings.config.file.identity;
    let id = ratings.started.identity.current().id().clone();
    let leaf = mesh
        .ca
        .issue(&id, std::time::Duration::from_secs(7200))
        .unwrap();
    halyard_certs::ca::write_identity(files.cert.parent().unwrap(), &leaf, mesh.ca.cert_pem())
        .unwrap();
    let mut reloads = ratings.started.reloads.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reloads.wait_for(|&n| n >= 1),
    )
    .await
    .expect("certificate reloaded")
    .unwrap();
    let current = ratings.started.identity.current();
    assert_ne!(current.serial(), old_serial.as_slice());
    assert!(current.seconds_to_expiry(std::time::SystemTime::now()) > 3700.0);

    // The open flow carries on; a new peer handshakes against the new leaf.
    open.write_all(b"after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut reply = Vec::new();
    open.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"ratings:before after");
    let pp2 = mesh
        .start(&Spec::new("details", "v1").upstream("ratings", 9080))
        .await;
    pp2.wait_endpoints("ratings", 1).await;
    assert_eq!(
        call(pp2.upstream(0), b"new peer").await.unwrap(),
        b"ratings:new peer"
    );
    for s in [pp, pp2, ratings] {
        s.shutdown().await.unwrap();
    }
}

/// An endpoint that leaves the registry leaves the caller too: its pooled connection is closed
/// and forgotten, and the per-peer gauges drop its address, so endpoint churn does not pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_endpoint_is_forgotten() {
    let ip1 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let app = tagged_echo(SocketAddr::new(ip1, 0), "ratings").await;
    mesh.apply(&service_yaml("ratings", 9080, app.addr.port()))
        .await;
    let ratings = mesh.start(&Spec::new("ratings", "v1").app_host(ip1)).await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9080))
        .await;
    pp.wait_endpoints("ratings", 1).await;
    assert_eq!(call(pp.upstream(0), b"hi").await.unwrap(), b"ratings:hi");
    let peer = ratings.started.inbound.to_string();
    let gauges = |m: &str| {
        m.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("peer=\"{peer}\"")))
            .count()
    };
    let until = |want_present: bool| {
        let started = &pp.started;
        async move {
            for _ in 0..100 {
                if (gauges(&started.render_metrics()) > 0) == want_present {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("peer gauges never became present = {want_present}");
        }
    };
    until(true).await;
    ratings.shutdown().await.unwrap();
    pp.wait_endpoints("ratings", 0).await;
    until(false).await;
}
