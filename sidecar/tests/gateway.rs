//! Two clusters, each with its own registry, joined by cluster B's east-west gateway
//! (`halyard gateway`): a caller in A reaches a service that only exists in B through the
//! gateway, which routes QUIC by server name and connection ID and never decrypts it.
//! Real sockets on loopback; the gateway and the sidecars run in this process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halyard_sidecar::gateway::{serve, GatewayConfig, StartedGateway};
use halyard_sidecar::test_util::{
    call, loopback_ip, metric, tagged_echo, Echo, Mesh, Sidecar, Spec, TD,
};
use halyard_transport::quic_lb::ServerId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A gateway running in this process.
struct Gateway {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    async fn start(mesh: &Mesh, listen: SocketAddr) -> Gateway {
        Self::start_with(mesh, listen, "").await
    }

    /// [`Gateway::start`] with `extra` top-level TOML.
    async fn start_with(mesh: &Mesh, listen: SocketAddr, extra: &str) -> Gateway {
        let path = mesh.dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                "listen = \"{listen}\"\nregistry = {:?}\nadmin = \"127.0.0.1:0\"\n{extra}",
                mesh.registry
            ),
        )
        .unwrap();
        let config = GatewayConfig::load(&path).unwrap();
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<StartedGateway>();
        let task = tokio::spawn(serve(config, stop.clone(), Some(tx)));
        let started = match rx.await {
            Ok(s) => s,
            Err(_) => panic!("gateway failed to start: {:?}", task.await),
        };
        Gateway {
            addr: started.addr,
            admin: started.admin.unwrap(),
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }

    async fn metrics(&self) -> String {
        let mut tcp = TcpStream::connect(self.admin).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }
}

/// Cluster A (productpage, no reviews of its own) and cluster B (reviews, exported, behind
/// its gateway), sharing one root.
struct Clusters {
    a: Mesh,
    b: Mesh,
    _app: Echo,
    reviews: Sidecar,
    gateway: Gateway,
    pp: Sidecar,
}

const REVIEWS: &str = "spiffe://mesh.local/ns/default/sa/reviews";

/// B's reviews sidecar trusts the gateway (loopback) for PROXY headers; `advertise`, when
/// given, is registered instead of its own address (a relay in front of it).
async fn clusters_with(
    advertise: Option<(UdpSocket, Arc<Tap>)>,
    app: Option<SocketAddr>,
) -> Clusters {
    let a = Mesh::with_dir().await;
    let b = Mesh::with_dir_sharing_ca(&a).await;
    clusters_configured(a, b, advertise, app, ("", "")).await
}

/// [`clusters_with`] on meshes made by the caller, with extra TOML for B's reviews sidecar and
/// B's gateway (`extra`).
async fn clusters_configured(
    a: Mesh,
    b: Mesh,
    advertise: Option<(UdpSocket, Arc<Tap>)>,
    app: Option<SocketAddr>,
    extra: (&str, &str),
) -> Clusters {
    let echo = tagged_echo("127.0.0.1:0".parse().unwrap(), "b").await;
    let port = app.map_or(echo.addr.port(), |a| a.port());
    b.apply(&format!(
        "kind: Service\nname: reviews\nexported: true\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {port} }}\n"
    ))
    .await;
    let mut spec = Spec::new("reviews", "v1");
    spec.extra = format!(
        "[transport]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n{}",
        extra.0
    );
    let relay = match advertise {
        Some((socket, tap)) => {
            spec = spec.inbound(&format!(
                "advertise = \"{}\"\n",
                socket.local_addr().unwrap()
            ));
            Some((socket, tap))
        }
        None => None,
    };
    let reviews = b.start(&spec).await;
    let registered = match relay {
        Some((socket, tap)) => {
            let to = reviews.started.inbound;
            tokio::spawn(relay_between(socket, to, tap));
            reviews
                .wait_snapshot("its own endpoint", |s| {
                    s.endpoints_of("reviews").count() == 1
                })
                .await;
            reviews
                .started
                .snapshot
                .borrow()
                .endpoints_of("reviews")
                .next()
                .unwrap()
                .address
        }
        None => {
            reviews.wait_endpoints("reviews", 1).await;
            reviews.started.inbound
        }
    };
    // An address of its own: the restart tests start the gateway again there, and no other
    // test's socket takes the port on it meanwhile.
    let listen = SocketAddr::new(loopback_ip(), 0);
    let gateway = Gateway::start_with(&b, listen, extra.1).await;
    // A knows reviews only as B's endpoint behind B's gateway.
    a.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp }}\n---\n\
         kind: Endpoint\nid: b-reviews-1\nservice: reviews\naddress: \"{registered}\"\nidentity: {REVIEWS}\n\
         cluster: b\ngateway: \"{}\"\n",
        gateway.addr
    ))
    .await;
    let pp = a
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", 1).await;
    Clusters {
        a,
        b,
        _app: echo,
        reviews,
        gateway,
        pp,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_only_in_b_is_reached_through_bs_gateway() {
    let c = clusters_with(None, None).await;
    for i in 0..5 {
        let out = call(c.pp.upstream(0), format!("hello {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(out, format!("b:hello {i}").as_bytes());
    }
    let g = c.gateway.metrics().await;
    assert!(
        metric(
            &g,
            "halyard_gateway_datagrams_total",
            &[("decision", "forwarded")]
        ) > 0.0
    );
    assert!(
        metric(
            &g,
            "halyard_gateway_datagrams_total",
            &[("decision", "returned")]
        ) > 0.0
    );
    assert_eq!(metric(&g, "halyard_gateway_endpoints", &[]), 1.0);
    // B's sidecar took the datagrams from the gateway, unwrapped.
    let admission = c.reviews.started.endpoint.admission_stats();
    assert!(admission.proxied.load(Ordering::Relaxed) > 0);
    assert_eq!(admission.proxy_refused.load(Ordering::Relaxed), 0);
    // The server saw the caller's own SPIFFE id: a policy in B denying it by id refuses it.
    c.b.apply(&format!(
        "kind: Policy\nservice: reviews\nrules:\n  - action: deny\n    from: {{ identities: [\"spiffe://{TD}/ns/default/sa/productpage\"] }}\n"
    ))
    .await;
    c.reviews
        .wait_snapshot("the policy", |s| s.policy("reviews").is_some())
        .await;
    let refused = call(c.pp.upstream(0), b"denied?").await;
    assert!(
        refused.as_ref().map_or(true, |b| b.is_empty()),
        "a denied caller was answered: {refused:?}"
    );
    let denials = metric(
        &c.reviews.started.render_metrics(),
        "halyard_policy_denials_total",
        &[("destination_service", "reviews")],
    );
    assert_eq!(denials, 1.0);
    c.pp.shutdown().await.unwrap();
    c.reviews.shutdown().await.unwrap();
    c.gateway.stop().await;
    drop((c.a, c.b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_not_exported_is_not_reachable_and_is_counted() {
    let c = clusters_with(None, None).await;
    c.b.apply(
        "kind: Service\nname: reviews\nports:\n  - { name: tcp, port: 9080, protocol: tcp }\n",
    )
    .await;
    // The gateway follows B's registry: wait until it routes nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&c.gateway.metrics().await, "halyard_gateway_endpoints", &[]) != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway kept routing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = call(c.pp.upstream(0), b"hello").await;
    assert!(out.as_ref().map_or(true, |b| b.is_empty()), "{out:?}");
    let g = c.gateway.metrics().await;
    assert!(
        metric(
            &g,
            "halyard_gateway_datagrams_total",
            &[("decision", "not_exported")]
        ) > 0.0
    );
    assert_eq!(
        metric(
            &g,
            "halyard_gateway_datagrams_total",
            &[("decision", "forwarded")]
        ),
        0.0
    );
    c.pp.shutdown().await.unwrap();
    c.reviews.shutdown().await.unwrap();
    c.gateway.stop().await;
}

/// Bytes seen between the gateway and B's sidecar.
#[derive(Default)]
struct Tap {
    datagrams: AtomicU64,
    marker_seen: AtomicBool,
    /// Every datagram, both ways.
    seen: std::sync::Mutex<Vec<Vec<u8>>>,
}

const MARKER: &[u8] = b"PAYLOAD-MARKER-5b1e0c7d";

/// Relays datagrams between the gateway (on `outside`, the registered address) and the
/// sidecar at `inside`, checking each for the marker.
async fn relay_between(outside: UdpSocket, inside: SocketAddr, tap: Arc<Tap>) {
    let inner = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut gateway: Option<SocketAddr> = None;
    let (mut a, mut b) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    loop {
        tokio::select! {
            r = outside.recv_from(&mut a) => {
                let Ok((n, from)) = r else { return };
                gateway = Some(from);
                look(&tap, &a[..n]);
                let _ = inner.send_to(&a[..n], inside).await;
            }
            r = inner.recv_from(&mut b) => {
                let Ok((n, _)) = r else { return };
                look(&tap, &b[..n]);
                if let Some(g) = gateway {
                    let _ = outside.send_to(&b[..n], g).await;
                }
            }
        }
    }
}

fn look(tap: &Tap, bytes: &[u8]) {
    tap.datagrams.fetch_add(1, Ordering::Relaxed);
    tap.seen.lock().unwrap().push(bytes.to_vec());
    if bytes.windows(MARKER.len()).any(|w| w == MARKER) {
        tap.marker_seen.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_forwards_nothing_it_could_read() {
    let tap = Arc::new(Tap::default());
    let outside = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c = clusters_with(Some((outside, tap.clone())), None).await;
    let mut msg = MARKER.repeat(200);
    msg.extend_from_slice(b"end");
    let out = call(c.pp.upstream(0), &msg).await.unwrap();
    assert!(
        out.starts_with(b"b:PAYLOAD-MARKER"),
        "{:?}",
        &out[..20.min(out.len())]
    );
    assert_eq!(out.len(), msg.len() + 2);
    assert!(
        tap.datagrams.load(Ordering::Relaxed) > 4,
        "traffic went past the tap"
    );
    assert!(
        !tap.marker_seen.load(Ordering::Relaxed),
        "the marker crossed the gateway in the clear"
    );
    c.pp.shutdown().await.unwrap();
    c.reviews.shutdown().await.unwrap();
    c.gateway.stop().await;
}

/// With a QUIC-LB key, B's sidecar issues encrypted connection IDs: the gateway, holding the
/// key, routes a flow by them across a caller's address change, and B's server ID never
/// appears on the wire between them. A gateway restarted with only the unencrypted
/// configuration routes none of the flow's packets and counts them unroutable; restarted with
/// the key again, the flow carries on (QUIC retransmits what was lost). The gateway holds
/// configuration 0 beside 1, as while a cluster moves to a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_connection_ids_route_through_a_gateway_holding_the_key() {
    let a = Mesh::with_dir().await;
    let b = Mesh::with_dir_sharing_ca(&a).await;
    let key = b.dir.path().join("quic-lb-1.key");
    std::fs::write(&key, "8f95f09245765f80256934e50c66207f\n").unwrap();
    let sidecar = format!("[quic_lb]\nconfig_id = 1\nkey_file = {key:?}\n");
    let both =
        format!("[[quic_lb]]\nconfig_id = 0\n[[quic_lb]]\nconfig_id = 1\nkey_file = {key:?}\n");
    // B's sidecar is registered at a relay that keeps every datagram passing it.
    let outside = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = ServerId::of(outside.local_addr().unwrap());
    let tap = Arc::new(Tap::default());
    let app = chunk_echo().await;
    let c = clusters_configured(
        a,
        b,
        Some((outside, tap.clone())),
        Some(app),
        (&sidecar, &both),
    )
    .await;
    let mut flow = TcpStream::connect(c.pp.upstream(0)).await.unwrap();
    round(&mut flow, "before").await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    c.pp.started.endpoint.rebind(socket).unwrap();
    for i in 0..20 {
        round(&mut flow, &format!("line {i}")).await;
    }
    let seen = tap.seen.lock().unwrap().clone();
    assert!(seen.len() > 20, "{} datagrams", seen.len());
    assert!(
        !seen.iter().any(|d| d.windows(6).any(|w| w == server.0)),
        "the server ID {server} crossed in the clear"
    );

    // Without the key the gateway cannot read the flow's connection IDs.
    let at = c.gateway.addr;
    c.gateway.stop().await;
    let plain = Gateway::start_with(&c.b, at, "[[quic_lb]]\nconfig_id = 0\n").await;
    flow.write_all(b"during\n").await.unwrap();
    let unroutable = || async {
        metric(
            &plain.metrics().await,
            "halyard_gateway_datagrams_total",
            &[("decision", "unroutable")],
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while unroutable().await == 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    plain.stop().await;
    let gateway = Gateway::start_with(&c.b, at, &both).await;
    let mut got = vec![0u8; b"during\n".len()];
    tokio::time::timeout(Duration::from_secs(10), flow.read_exact(&mut got))
        .await
        .expect("the flow carried on")
        .unwrap();
    assert_eq!(got, b"during\n");
    round(&mut flow, "after").await;
    drop(flow);
    c.pp.shutdown().await.unwrap();
    c.reviews.shutdown().await.unwrap();
    gateway.stop().await;
}

/// An app that echoes every chunk as it arrives (a long-lived flow).
async fn chunk_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn round(tcp: &mut TcpStream, what: &str) {
    let msg = format!("{what}\n");
    tcp.write_all(msg.as_bytes()).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("no echo of {what:?}"))
        .unwrap();
    assert_eq!(got, msg.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_survive_a_gateway_restart_and_a_caller_address_change() {
    let app = chunk_echo().await;
    let c = clusters_with(None, Some(app)).await;
    let mut flow = TcpStream::connect(c.pp.upstream(0)).await.unwrap();
    round(&mut flow, "before").await;

    // The gateway restarts on the same port: it kept no state, the flow goes on.
    let at = c.gateway.addr;
    c.gateway.stop().await;
    let gateway = Gateway::start(&c.b, at).await;
    round(&mut flow, "after the restart").await;

    // The caller's sidecar moves to another UDP socket (a new address): QUIC migrates, the
    // gateway routes by connection ID, B's sidecar validates the new path through it.
    let before = c.pp.started.endpoint.local_addr().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    c.pp.started.endpoint.rebind(socket).unwrap();
    assert_ne!(c.pp.started.endpoint.local_addr().unwrap(), before);
    round(&mut flow, "after the move").await;
    for i in 0..20 {
        round(&mut flow, &format!("line {i}")).await;
    }
    let g = gateway.metrics().await;
    assert!(
        metric(
            &g,
            "halyard_gateway_datagrams_total",
            &[("decision", "forwarded")]
        ) > 0.0
    );
    drop(flow);
    c.pp.shutdown().await.unwrap();
    c.reviews.shutdown().await.unwrap();
    gateway.stop().await;
}

/// Locality failover across clusters: A's own reviews first; with it gone every call moves to
/// B's through the gateway, none failing; with it back, calls return to A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_local_endpoint_fails_over_to_b_and_back() {
    let c = clusters_with(None, None).await;
    let local_app = tagged_echo("127.0.0.1:0".parse().unwrap(), "a").await;
    let port = local_app.addr.port();
    // A gets its own reviews; the remote one stays in A's registry as the farther tier.
    c.a.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {port} }}\n"
    ))
    .await;
    let local = c.a.start(&Spec::new("reviews", "v1")).await;
    c.pp.wait_endpoints("reviews", 2).await;
    let tally = |n: usize| {
        let upstream = c.pp.upstream(0);
        async move {
            let (mut a, mut b, mut failed) = (0, 0, 0);
            for i in 0..n {
                match call(upstream, format!("{i}").as_bytes()).await {
                    Ok(out) if out.starts_with(b"a:") => a += 1,
                    Ok(out) if out.starts_with(b"b:") => b += 1,
                    _ => failed += 1,
                }
            }
            (a, b, failed)
        }
    };
    assert_eq!(
        tally(20).await,
        (20, 0, 0),
        "the local endpoint is preferred"
    );

    // The local sidecar dies without deregistering: its endpoint stays in A's registry, so
    // callers meet connect failures and must retry them on B.
    local.task.abort();
    let _ = local.task.await;
    assert_eq!(tally(20).await, (0, 20, 0), "calls move to B, none fails");

    // A local endpoint again: traffic comes back.
    let back = c.a.start(&Spec::new("reviews", "v1")).await;
    let addr = back.started.inbound;
    c.pp.wait_snapshot("the new local endpoint", |s| {
        s.endpoints_of("reviews").any(|ep| ep.address == addr)
    })
    .await;
    let (a, b, failed) = tally(40).await;
    assert_eq!(failed, 0);
    assert!(
        a >= 30 && b <= 10,
        "traffic did not return to A: a={a} b={b}"
    );
    back.shutdown().await.unwrap();
    c.pp.shutdown().await.unwrap();
    c.reviews.shutdown().await.unwrap();
    c.gateway.stop().await;
}

/// Cluster A on a directory registry and cluster B on the registry at `url` (reached with
/// `access`), sharing one root; B exports `reviews`, served by the returned echo app.
async fn clusters_on(url: String, access: &halyard_registry::Access) -> (Mesh, Mesh, Echo) {
    let a = Mesh::with_dir().await;
    let b = Mesh::with_access_sharing_ca(url, access, &a).await;
    let echo = tagged_echo("127.0.0.1:0".parse().unwrap(), "b").await;
    b.apply(&format!(
        "kind: Service\nname: reviews\nexported: true\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {} }}\n",
        echo.addr.port()
    ))
    .await;
    (a, b, echo)
}

/// Cluster B on its own etcd, linked from A by a ClusterLink (no Endpoint written into A): A's
/// sidecar reads B's registry, B's exported endpoints join A's snapshot with cluster `b`.
struct Linked {
    a: Mesh,
    _b: Mesh,
    etcd: halyard_registry::test_util::EtcdServer,
    _app: Echo,
    reviews: Sidecar,
    gateway: Gateway,
    pp: Sidecar,
}

async fn linked(keep_stale: &str) -> Linked {
    linked_through(keep_stale, None).await.0
}

/// [`linked`], A reaching B's gateway through the link simulator when `link` is given.
async fn linked_through(
    keep_stale: &str,
    link: Option<halyard_transport::sim::LinkProfile>,
) -> (Linked, Option<halyard_transport::sim::LinkSim>) {
    let etcd = tokio::task::spawn_blocking(halyard_registry::test_util::EtcdServer::start)
        .await
        .unwrap();
    let (a, b, echo) = clusters_on(etcd.url(), &halyard_registry::Access::default()).await;
    let mut spec = Spec::new("reviews", "v1");
    spec.prefix = "lease_ttl = \"3s\"\n".into();
    spec.extra = "[transport]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n".into();
    let reviews = b.start(&spec).await;
    reviews.wait_endpoints("reviews", 1).await;
    let gateway = Gateway::start(&b, "127.0.0.1:0".parse().unwrap()).await;
    let sim = match link {
        Some(profile) => Some(
            halyard_transport::sim::LinkSim::start(gateway.addr, profile.clone(), profile, 18)
                .await
                .unwrap(),
        ),
        None => None,
    };
    let dial = sim.as_ref().map_or(gateway.addr, |s| s.addr());
    a.apply(&format!(
        "kind: ClusterLink\ncluster: b\nregistry: {}\ngateway: \"{dial}\"\nkeepStale: {keep_stale}\n",
        etcd.url(),
    ))
    .await;
    let pp = a
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_snapshot("B's reviews through the link", |s| {
        s.endpoints_of("reviews")
            .any(|ep| ep.cluster == "b" && ep.id.starts_with("b."))
    })
    .await;
    (
        Linked {
            a,
            _b: b,
            etcd,
            _app: echo,
            reviews,
            gateway,
            pp,
        },
        sim,
    )
}

/// The link between the clusters drops 2 % of packets each way and adds 10 ms (± jitter,
/// some reordering): every call still gets its whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cross_a_lossy_link_between_clusters_whole() {
    let profile = halyard_transport::sim::LinkProfile::lossy(0.02, Duration::from_millis(10));
    let (l, sim) = linked_through("5m", Some(profile)).await;
    let sim = sim.unwrap();
    for i in 0..10u8 {
        let msg = vec![b'a' + i; 48 * 1024];
        let out = call(l.pp.upstream(0), &msg).await.unwrap();
        assert_eq!(out.len(), msg.len() + 2, "call {i}");
        assert_eq!(&out[2..], &msg[..], "call {i}");
    }
    let dropped = halyard_transport::sim::LinkCounters::get(&sim.forward().dropped)
        + halyard_transport::sim::LinkCounters::get(&sim.backward().dropped);
    assert!(
        dropped > 0,
        "the link dropped nothing: the test tested no loss"
    );
    l.pp.shutdown().await.unwrap();
    l.reviews.shutdown().await.unwrap();
    l.gateway.stop().await;
}

/// Waits until `sidecar` reports its link to `cluster` as stale. Staleness is a time since the
/// last contact, read from a gauge the link follower refreshes each second: there is no event
/// to await, so this polls.
async fn wait_link_stale(sidecar: &Sidecar, cluster: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let labels = [("cluster", cluster)];
    while metric(
        &sidecar.started.render_metrics(),
        "halyard_cluster_link_stale_seconds",
        &labels,
    ) <= 0.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the link to {cluster} was never reported stale"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_clusters_endpoints_are_learned_kept_while_stale_then_aged_out() {
    let mut l = linked("4s").await;
    let out = call(l.pp.upstream(0), b"linked").await.unwrap();
    assert_eq!(out, b"b:linked");
    let m = l.pp.started.render_metrics();
    assert_eq!(
        metric(&m, "halyard_cluster_link_endpoints", &[("cluster", "b")]),
        1.0
    );

    // B's registry goes away: A keeps B's endpoints (last known good) and the data plane, which
    // never needed B's registry, keeps working; the link's staleness rises.
    tokio::task::block_in_place(|| l.etcd.stop());
    wait_link_stale(&l.pp, "b").await;
    let out = call(l.pp.upstream(0), b"while stale").await.unwrap();
    assert_eq!(out, b"b:while stale");

    // Past keepStale the endpoints are dropped and counted as gone.
    l.pp.wait_snapshot("B's endpoints aged out", |s| {
        s.endpoints_of("reviews").count() == 0
    })
    .await;
    let m = l.pp.started.render_metrics();
    assert_eq!(
        metric(&m, "halyard_cluster_link_endpoints", &[("cluster", "b")]),
        0.0
    );

    // The link comes back: so do the endpoints.
    tokio::task::block_in_place(|| l.etcd.restart());
    l.pp.wait_snapshot("B's endpoints back", |s| {
        s.endpoints_of("reviews").any(|ep| ep.cluster == "b")
    })
    .await;
    let out = call(l.pp.upstream(0), b"back").await.unwrap();
    assert_eq!(out, b"b:back");
    l.pp.shutdown().await.unwrap();
    l.reviews.shutdown().await.unwrap();
    l.gateway.stop().await;
    drop(l.a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_link_or_an_unreachable_registry_leaves_other_traffic_alone() {
    let l = linked("5m").await;
    // A link to a registry nobody answers, and a link whose value is bad (written as a file,
    // the way `etcdctl put` would bypass `ctl`).
    let (_held, dead_addr) = halyard_sidecar::test_util::refused_addr();
    l.a.apply(&format!(
        "kind: ClusterLink\ncluster: c\nregistry: etcd://{dead_addr}\ngateway: 192.0.2.1:15444\n"
    ))
    .await;
    let dir = l.a.registry.strip_prefix("file://").unwrap();
    let links = std::path::Path::new(dir).join("default/links");
    std::fs::create_dir_all(&links).unwrap();
    std::fs::write(
        links.join("d.json"),
        r#"{"kind":"ClusterLink","cluster":"d","registry":"etcd://127.0.0.1:1","gateway":"not-an-address"}"#,
    )
    .unwrap();
    l.pp.wait_snapshot("the bad link quarantined", |s| {
        s.rejected.keys().any(|k| k.ends_with("links/d"))
    })
    .await;
    wait_link_stale(&l.pp, "c").await;
    for i in 0..10 {
        let out = call(l.pp.upstream(0), format!("{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(out, format!("b:{i}").as_bytes());
    }
    l.pp.shutdown().await.unwrap();
    l.reviews.shutdown().await.unwrap();
    l.gateway.stop().await;
}

/// A caller whose ClientHello spans two Initials (48 ALPN names, none of them `h3`): the
/// gateway holds the first until the second completes it, then forwards both, and B's sidecar
/// answers through the gateway, refusing the handshake for its ALPN (TLS alert 120) — which it
/// can only do having read the whole ClientHello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_over_two_initials_crosses_the_gateway() {
    use halyard_transport::quinn;
    let c = clusters_with(None, None).await;
    let name = format!(
        "{}{}",
        ServerId::of(c.reviews.started.inbound).to_hex(),
        halyard_transport::GATEWAY_NAME_SUFFIX
    );
    let crypto = halyard_sidecar::test_util::large_hello_client_config();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            c.gateway.addr,
            &name,
        )
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("B's sidecar answered")
        .unwrap_err();
    assert!(
        matches!(&err, quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::crypto(120)),
        "{err:?}"
    );
    let g = c.gateway.metrics().await;
    let decision = |d| metric(&g, "halyard_gateway_datagrams_total", &[("decision", d)]);
    assert!(decision("held") >= 1.0, "{g}");
    assert!(decision("forwarded") >= 2.0, "{g}");
    assert!(decision("returned") >= 1.0, "{g}");
    c.pp.shutdown().await.unwrap();
    c.reviews.shutdown().await.unwrap();
    c.gateway.stop().await;
}

/// Editing a ClusterLink is make before break: a new `keepStale` or gateway applies to the
/// endpoints at once; a link edited to name another registry keeps serving the endpoints it
/// had (reported stale since the edit) until the new registry answers, and for at most the
/// link's `keepStale` when it never does; edited back, the endpoints are followed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_link_keeps_its_endpoints_until_the_new_registry_answers() {
    let l = linked("5m").await;
    let link = |registry: &str, keep: &str| {
        format!(
            "kind: ClusterLink\ncluster: b\nregistry: {registry}\ngateway: \"{}\"\nkeepStale: {keep}\n",
            l.gateway.addr
        )
    };
    let has_b =
        |s: &halyard_registry::Snapshot| s.endpoints_of("reviews").any(|ep| ep.cluster == "b");
    let good = l.etcd.url();
    // Another keepStale: same registry, nothing reopened, nothing dropped.
    l.a.apply(&link(&good, "4s")).await;
    l.pp.wait_snapshot("the new keepStale", |s| {
        s.links
            .get("b")
            .is_some_and(|k| k.keep_stale == Duration::from_secs(4))
    })
    .await;
    assert!(
        has_b(&l.pp.started.snapshot.borrow()),
        "dropped on a keepStale edit"
    );
    assert_eq!(call(l.pp.upstream(0), b"one").await.unwrap(), b"b:one");

    // A registry nobody answers: the endpoints stay in the very snapshot that carries the edit,
    // calls keep working, the link is reported stale, and after keepStale they go.
    let (_held, dead) = halyard_sidecar::test_util::refused_addr();
    let dead_url = format!("etcd://{dead}");
    l.a.apply(&link(&dead_url, "4s")).await;
    l.pp.wait_snapshot("the edited link", |s| {
        s.links.get("b").is_some_and(|k| k.registry == dead_url)
    })
    .await;
    assert!(
        has_b(&l.pp.started.snapshot.borrow()),
        "dropped at the edit"
    );
    assert_eq!(call(l.pp.upstream(0), b"two").await.unwrap(), b"b:two");
    wait_link_stale(&l.pp, "b").await;
    l.pp.wait_snapshot("B's endpoints aged out", |s| !has_b(s))
        .await;

    // Edited back: followed again.
    l.a.apply(&link(&good, "5m")).await;
    l.pp.wait_snapshot("B's endpoints back", has_b).await;
    assert_eq!(call(l.pp.upstream(0), b"three").await.unwrap(), b"b:three");
    l.pp.shutdown().await.unwrap();
    l.reviews.shutdown().await.unwrap();
    l.gateway.stop().await;
}

/// B's reviews sidecar (taking the gateway's datagrams) and B's gateway, both with `top`
/// (top-level config lines, e.g. how to reach B's etcd).
async fn b_side(b: &Mesh, top: &str) -> (Sidecar, Gateway) {
    let mut spec = Spec::new("reviews", "v1");
    spec.prefix = format!("lease_ttl = \"3s\"\n{top}");
    spec.extra = "[transport]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n".into();
    let reviews = b.start(&spec).await;
    reviews.wait_endpoints("reviews", 1).await;
    let gateway = Gateway::start_with(b, "127.0.0.1:0".parse().unwrap(), top).await;
    (reviews, gateway)
}

/// A's productpage, reading link credentials from `links`, once it has learned B's reviews.
async fn a_caller(a: &Mesh, links: &std::path::Path) -> Sidecar {
    let mut spec = Spec::new("productpage", "v1").upstream("reviews", 9080);
    spec.prefix = format!("link_credentials = {:?}\n", links.display().to_string());
    let pp = a.start(&spec).await;
    pp.wait_snapshot("B's reviews through the link", |s| {
        s.endpoints_of("reviews").any(|ep| ep.cluster == "b")
    })
    .await;
    pp
}

/// B's etcd requires authentication (etcd RBAC): B's sidecar and gateway use a user that may
/// read and write B's mesh, A's link a user that may only read it, named by the link and looked
/// up in the sidecar's `link_credentials` folder (no password in any registry). A link without
/// credentials is refused and reported stale; one naming a file not there yet opens once the
/// file appears; local traffic never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_reads_an_etcd_that_requires_authentication_as_a_read_only_user() {
    let mut etcd = tokio::task::spawn_blocking(halyard_registry::test_util::EtcdServer::start)
        .await
        .unwrap();
    let (a, b, _echo) = clusters_on(etcd.url(), &halyard_registry::Access::default()).await;
    tokio::task::block_in_place(|| {
        etcd.enable_auth("rootpw");
        etcd.add_user("b-sidecars", "w-pw", "readwrite", "/halyard/default/");
        etcd.add_user("a-reader", "r-pw", "read", "/halyard/default/");
    });
    let writer = b.dir.path().join("b-sidecars.credentials");
    std::fs::write(&writer, "b-sidecars:w-pw\n").unwrap();
    let creds = format!(
        "registry_credentials = {:?}\n",
        writer.display().to_string()
    );
    let (reviews, gateway) = b_side(&b, &creds).await;

    let links = a.dir.path().join("link-credentials");
    std::fs::create_dir_all(&links).unwrap();
    std::fs::write(links.join("reader-b"), "a-reader:r-pw\n").unwrap();
    a.apply(&format!(
        "kind: ClusterLink\ncluster: b\nregistry: {url}\ngateway: \"{gw}\"\ncredentials: reader-b\n---\n\
         kind: ClusterLink\ncluster: c\nregistry: {url}\ngateway: \"{gw}\"\n---\n\
         kind: ClusterLink\ncluster: d\nregistry: {url}\ngateway: \"{gw}\"\ncredentials: later\n",
        url = etcd.url(),
        gw = gateway.addr,
    ))
    .await;
    let pp = a_caller(&a, &links).await;
    let out = call(pp.upstream(0), b"authenticated").await.unwrap();
    assert_eq!(out, b"b:authenticated");

    // Refused (no credentials) and not yet readable (no file): reported stale, nothing of
    // theirs learned, calls unaffected.
    wait_link_stale(&pp, "c").await;
    wait_link_stale(&pp, "d").await;
    assert!(
        pp.started
            .snapshot
            .borrow()
            .endpoints_of("reviews")
            .all(|ep| ep.cluster == "b"),
        "a refused link contributed endpoints"
    );
    assert_eq!(
        metric(
            &pp.started.render_metrics(),
            "halyard_cluster_link_stale_seconds",
            &[("cluster", "b")]
        ),
        0.0
    );
    let out = call(pp.upstream(0), b"still").await.unwrap();
    assert_eq!(out, b"b:still");

    // The file d names appears: the next attempt reads it and opens the link.
    std::fs::write(links.join("later"), "a-reader:r-pw\n").unwrap();
    pp.wait_snapshot("D's endpoints once its credentials exist", |s| {
        s.endpoints_of("reviews").any(|ep| ep.cluster == "d")
    })
    .await;
    pp.shutdown().await.unwrap();
    reviews.shutdown().await.unwrap();
    gateway.stop().await;
}

/// The password of the link's user is rotated on B (and etcd restarted, which forgets every
/// token), then written to the file the link names: the sidecar reads the new file, opens
/// B's registry again with it, and follows B's changes without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_link_password_is_picked_up_without_a_restart() {
    let mut etcd = tokio::task::spawn_blocking(halyard_registry::test_util::EtcdServer::start)
        .await
        .unwrap();
    let a = Mesh::with_dir().await;
    let b = Mesh::with_url_sharing_ca(etcd.url(), &a).await;
    b.apply("kind: Service\nname: reviews\nexported: true\nports:\n  - { name: tcp, port: 9080, protocol: tcp }\n").await;
    let endpoint = |etcd: &halyard_registry::test_util::EtcdServer, id: &str| {
        let value = format!(
            r#"{{"kind":"Endpoint","id":"{id}","service":"reviews","address":"127.0.0.1:1","identity":"{REVIEWS}"}}"#
        );
        etcd.etcdctl_ok(&[
            "put",
            &format!("/halyard/default/endpoints/reviews/{id}"),
            &value,
        ]);
    };
    tokio::task::block_in_place(|| {
        etcd.enable_auth("rootpw");
        etcd.add_user("a-reader", "r-pw", "read", "/halyard/default/");
        endpoint(&etcd, "r1");
    });
    let links = a.dir.path().join("link-credentials");
    std::fs::create_dir_all(&links).unwrap();
    std::fs::write(links.join("reader-b"), "a-reader:r-pw\n").unwrap();
    a.apply(&format!(
        "kind: ClusterLink\ncluster: b\nregistry: {}\ngateway: \"127.0.0.1:15444\"\ncredentials: reader-b\n",
        etcd.url(),
    ))
    .await;
    let pp = a_caller(&a, &links).await;

    tokio::task::block_in_place(|| {
        etcd.etcdctl_ok(&["user", "delete", "a-reader"]);
        etcd.etcdctl_ok(&["user", "add", "a-reader:new-pw"]);
        etcd.etcdctl_ok(&["user", "grant-role", "a-reader", "a-reader"]);
    });
    std::fs::write(links.join("reader-b"), "a-reader:new-pw\n").unwrap();
    tokio::task::block_in_place(|| {
        etcd.restart();
        endpoint(&etcd, "r2");
    });
    pp.wait_snapshot("B's change read with the new password", |s| {
        s.endpoints_of("reviews").any(|ep| ep.id == "b.r2")
    })
    .await;
    pp.shutdown().await.unwrap();
}

/// B's etcd serves over TLS and requires client certificates (`etcds://`): B's sidecar and
/// gateway reach it with `registry_tls`, A's link with the CA and client certificate files its
/// `credentials` name in the sidecar's `link_credentials` folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_reads_an_etcds_registry_with_a_client_certificate() {
    let etcd = tokio::task::spawn_blocking(halyard_registry::test_util::EtcdServer::start_tls)
        .await
        .unwrap();
    let files = etcd.tls().unwrap().clone();
    let access = halyard_registry::Access {
        credentials: None,
        tls: Some(
            halyard_registry::EtcdTls::from_files(
                &files.ca,
                Some((&files.client_cert, &files.client_key)),
            )
            .unwrap(),
        ),
    };
    let (a, b, _echo) = clusters_on(etcd.url(), &access).await;
    let tls = format!(
        "registry_tls = {{ ca = {:?}, cert = {:?}, key = {:?} }}\n",
        files.ca.display().to_string(),
        files.client_cert.display().to_string(),
        files.client_key.display().to_string()
    );
    let (reviews, gateway) = b_side(&b, &tls).await;

    let links = a.dir.path().join("link-credentials");
    std::fs::create_dir_all(&links).unwrap();
    for (from, to) in [
        (&files.ca, "b-tls.ca.pem"),
        (&files.client_cert, "b-tls.cert.pem"),
        (&files.client_key, "b-tls.key.pem"),
    ] {
        std::fs::copy(from, links.join(to)).unwrap();
    }
    a.apply(&format!(
        "kind: ClusterLink\ncluster: b\nregistry: {}\ngateway: \"{}\"\ncredentials: b-tls\n",
        etcd.url(),
        gateway.addr,
    ))
    .await;
    let pp = a_caller(&a, &links).await;
    let out = call(pp.upstream(0), b"over tls").await.unwrap();
    assert_eq!(out, b"b:over tls");
    pp.shutdown().await.unwrap();
    reviews.shutdown().await.unwrap();
    gateway.stop().await;
}

/// One trust domain per cluster (a.mesh.local, b.mesh.local), each trusting the other's root
/// (SPIFFE federation): the call crosses the gateway with each side verifying the other's own
/// id, and B's policy can tell A's callers by their trust domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_with_a_trust_domain_each_federate_and_b_tells_a_by_its_domain() {
    let a = Mesh::with_dir_in("a.mesh.local").await;
    let b = Mesh::with_dir_in("b.mesh.local").await;
    a.trust(&b.ca.root_pem());
    b.trust(&a.ca.root_pem());
    let echo = tagged_echo("127.0.0.1:0".parse().unwrap(), "b").await;
    b.apply(&format!(
        "kind: Service\nname: reviews\nexported: true\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {} }}\n",
        echo.addr.port()
    ))
    .await;
    let mut spec = Spec::new("reviews", "v1");
    spec.extra = "[transport]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n".into();
    let reviews = b.start(&spec).await;
    reviews.wait_endpoints("reviews", 1).await;
    let gateway = Gateway::start(&b, "127.0.0.1:0".parse().unwrap()).await;
    a.apply(&format!(
        "kind: ClusterLink\ncluster: b\nregistry: {:?}\ngateway: \"{}\"\n",
        b.registry, gateway.addr
    ))
    .await;
    let pp = a
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_snapshot("B's reviews", |s| s.endpoints_of("reviews").count() == 1)
        .await;
    let ep = pp
        .started
        .snapshot
        .borrow()
        .endpoints_of("reviews")
        .next()
        .unwrap()
        .clone();
    assert_eq!(
        ep.identity.to_string(),
        "spiffe://b.mesh.local/ns/default/sa/reviews"
    );
    let out = call(pp.upstream(0), b"federated").await.unwrap();
    assert_eq!(out, b"b:federated");

    b.apply(
        "kind: Policy\nservice: reviews\nrules:\n  - action: deny\n    from: { identities: [\"spiffe://a.mesh.local/*\"] }\n",
    )
    .await;
    reviews
        .wait_snapshot("the policy", |s| s.policy("reviews").is_some())
        .await;
    let refused = call(pp.upstream(0), b"from a").await;
    assert!(
        refused.as_ref().map_or(true, |b| b.is_empty()),
        "{refused:?}"
    );
    let denials = metric(
        &reviews.started.render_metrics(),
        "halyard_policy_denials_total",
        &[("destination_service", "reviews")],
    );
    assert_eq!(denials, 1.0);
    pp.shutdown().await.unwrap();
    reviews.shutdown().await.unwrap();
    gateway.stop().await;
}
