//! Telemetry from outside: traffic through real sidecars, then the admin endpoints scraped over
//! HTTP, the access log read back, spans caught by an OTLP receiver, and `halyard ctl top` run
//! as the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    call, http_app, http_call, http_client, metric, tagged_echo, AppBehavior, Mesh, Sidecar, Spec,
};
use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::telemetry::otlp::{ExportTraceServiceRequest, Span};
use prost::Message;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 2, last])
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

async fn get(client: &Client, admin: SocketAddr, path: &str) -> (u16, String) {
    let (status, body, _) = http_call(client, admin, "GET", path, &[]).await;
    (status, body)
}

async fn try_get(client: &Client, admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{admin}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `path` on the admin port until `f` accepts the answer.
async fn wait_admin(
    client: &Client,
    admin: SocketAddr,
    path: &str,
    what: &str,
    f: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A process may not listen yet: a refused connection is one more try.
        let (status, body) = try_get(client, admin, path).await.unwrap_or_default();
        if f(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const HTTP_PORT: u16 = 9080;

/// `reviews` (HTTP, v1) and `ratings` (TCP, v2, three ports: echo, nothing listening, denied),
/// a Policy on each, and `productpage` calling all four. Extra TOML goes to every sidecar.
struct Edges {
    _mesh: Mesh,
    reviews: Sidecar,
    ratings: Sidecar,
    pp: Sidecar,
    app: common::HttpApp,
    _echo: common::Echo,
}

async fn edges(first_ip: u8, extra: &str) -> Edges {
    edges_with(first_ip, extra, "").await
}

/// [`edges`] with more TOML for `productpage` alone.
async fn edges_with(first_ip: u8, extra: &str, pp_extra: &str) -> Edges {
    let mesh = Mesh::with_dir().await;
    let app = http_app(
        SocketAddr::new(ip(first_ip), 0),
        "v1",
        AppBehavior::default(),
    )
    .await;
    let echo = tagged_echo(SocketAddr::new(ip(first_ip + 1), 0), "r").await;
    // A port nobody listens on: bind, note, close.
    let dead = std::net::TcpListener::bind(SocketAddr::new(ip(first_ip + 1), 0)).unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let objects = format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: {HTTP_PORT}, protocol: http, targetPort: {} }}\n---\n\
         kind: Service\nname: ratings\nports:\n  - {{ name: ok, port: 9090, protocol: tcp, targetPort: {} }}\n  - {{ name: dead, port: 9091, protocol: tcp, targetPort: {dead_port} }}\n  - {{ name: denied, port: 9092, protocol: tcp, targetPort: {} }}\n---\n\
         kind: Policy\nservice: reviews\nrules:\n  - action: deny\n    to: {{ paths: [/admin, /admin/*] }}\n---\n\
         kind: Policy\nservice: ratings\nrules:\n  - action: deny\n    from: {{ services: [productpage] }}\n    to: {{ ports: [9092] }}\n",
        app.addr.port(),
        echo.addr.port(),
        echo.addr.port(),
    );
    mesh.apply(&objects).await;
    let extra = format!("[outlier]\nconsecutive_failures = 100\n{extra}");
    let mut spec = Spec::new("reviews", "v1").app_host(ip(first_ip));
    spec.extra = extra.clone();
    let reviews = mesh.start(&spec).await;
    let mut spec = Spec::new("ratings", "v2").app_host(ip(first_ip + 1));
    spec.extra = extra.clone();
    let ratings = mesh.start(&spec).await;
    let mut spec = Spec::new("productpage", "v1")
        .upstream("reviews", HTTP_PORT)
        .upstream("ratings", 9090)
        .upstream("ratings", 9091)
        .upstream("ratings", 9092);
    spec.extra = format!("{extra}{pp_extra}");
    let pp = mesh.start(&spec).await;
    pp.wait_endpoints("reviews", 1).await;
    pp.wait_endpoints("ratings", 1).await;
    for s in [&reviews, &ratings] {
        s.wait_snapshot("the policy", |s| s.policies.len() == 2)
            .await;
    }
    Edges {
        _mesh: mesh,
        reviews,
        ratings,
        pp,
        app,
        _echo: echo,
    }
}

/// 5 good and 2 denied requests, 4 good, 3 failed and 2 denied flows.
async fn traffic(e: &Edges, client: &Client) {
    for _ in 0..5 {
        let (status, body, _) = http_call(client, e.pp.upstream(0), "GET", "/ok", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..2 {
        let (status, ..) = http_call(client, e.pp.upstream(0), "GET", "/admin", &[]).await;
        assert_eq!(status, 403);
    }
    for _ in 0..4 {
        assert_eq!(call(e.pp.upstream(1), b"hello").await.unwrap(), b"r:hello");
    }
    for _ in 0..3 {
        assert!(call(e.pp.upstream(2), b"hello").await.is_err_or_empty());
    }
    for _ in 0..2 {
        assert!(call(e.pp.upstream(3), b"hello").await.is_err_or_empty());
    }
}

trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl ErrOrEmpty for std::io::Result<Vec<u8>> {
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, |v| v.is_empty())
    }
}

fn edge<'a>(
    direction: &'a str,
    destination: &'a str,
    version: &'a str,
    last: (&'a str, &'a str),
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("direction", direction),
        ("source_service", "productpage"),
        ("destination_service", destination),
        ("destination_version", version),
        last,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_request_and_flow_under_its_labels() {
    let e = edges(1, "").await;
    let client = http_client();
    traffic(&e, &client).await;
    e.pp.wait_flows(16).await;
    e.reviews.wait_flows(7).await;
    e.ratings.wait_flows(9).await;

    let (status, m) = get(&client, e.pp.started.admin, "/metrics").await;
    assert_eq!(status, 200);
    let out = |dest, version, last| edge("outbound", dest, version, last);
    let requests = "halyard_requests_total";
    assert_eq!(
        metric(
            &m,
            requests,
            &out("reviews", "v1", ("response_code", "200"))
        ),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            requests,
            &out("reviews", "v1", ("response_code", "403"))
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "halyard_request_duration_seconds_count",
            &out("reviews", "v1", ("response_code", "200"))
        ),
        5.0
    );
    let conns = "halyard_tcp_connections_total";
    assert_eq!(
        metric(&m, conns, &out("ratings", "v2", ("response_flags", "-"))),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            conns,
            &out("ratings", "unknown", ("response_flags", "UF"))
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            conns,
            &out("ratings", "unknown", ("response_flags", "DENY"))
        ),
        2.0
    );
    let bytes = "halyard_tcp_bytes_total";
    assert_eq!(
        metric(&m, bytes, &out("ratings", "v2", ("stream", "sent"))),
        20.0
    );
    assert_eq!(
        metric(&m, bytes, &out("ratings", "v2", ("stream", "received"))),
        28.0
    );
    // Per-peer gauges are refreshed once a second.
    let peer = e.reviews.started.inbound.to_string();
    let m = wait_admin(
        &client,
        e.pp.started.admin,
        "/metrics",
        "peer gauges",
        |_, m| metric(m, "halyard_pool_connections", &[("peer", &peer)]) == 1.0,
    )
    .await;
    assert!(
        m.contains(&format!("halyard_quic_open_streams{{peer=\"{peer}\"}}")),
        "{m}"
    );
    assert!(
        m.contains(&format!("halyard_quic_rtt_seconds{{peer=\"{peer}\"}}")),
        "{m}"
    );
    assert_eq!(metric(&m, "halyard_quic_connections", &[]), 2.0);

    let (_, m) = get(&client, e.ratings.started.admin, "/metrics").await;
    let inb = |flags| edge("inbound", "ratings", "v2", ("response_flags", flags));
    assert_eq!(metric(&m, conns, &inb("-")), 4.0);
    assert_eq!(metric(&m, conns, &inb("UF")), 3.0);
    assert_eq!(metric(&m, conns, &inb("DENY")), 2.0);
    let denials = [
        ("source_service", "productpage"),
        ("destination_service", "ratings"),
    ];
    assert_eq!(metric(&m, "halyard_policy_denials_total", &denials), 2.0);

    let (_, m) = get(&client, e.reviews.started.admin, "/metrics").await;
    let inb = |code| edge("inbound", "reviews", "v1", ("response_code", code));
    assert_eq!(metric(&m, requests, &inb("200")), 5.0);
    assert_eq!(metric(&m, requests, &inb("403")), 2.0);
    let denials = [
        ("source_service", "productpage"),
        ("destination_service", "reviews"),
    ];
    assert_eq!(metric(&m, "halyard_policy_denials_total", &denials), 2.0);
    assert_eq!(
        e.app.hits.load(std::sync::atomic::Ordering::SeqCst),
        5,
        "denied requests never reach the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_registry_then_config_dump_shows_quarantined_keys() {
    let mut etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    common::init_logs();
    let mesh = Mesh::with_url(tempfile::tempdir().unwrap(), etcd.url()).await;
    mesh.apply(
        "kind: Service\nname: reviews\nports:\n  - { name: tcp, port: 9080, protocol: tcp }\n",
    )
    .await;
    etcd.stop();
    let sidecar = mesh.start(&Spec::new("reviews", "v1")).await;
    let admin = sidecar.started.admin;
    let client = http_client();
    let (status, body) = get(&client, admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("registry snapshot"), "{body}");
    assert!(
        !body.contains("identity") && !body.contains("listeners"),
        "{body}"
    );
    assert_eq!(get(&client, admin, "/healthz").await.0, 200);

    let mut etcd = tokio::task::spawn_blocking(move || {
        etcd.restart();
        etcd
    })
    .await
    .unwrap();
    wait_admin(&client, admin, "/readyz", "ready after etcd", |s, _| {
        s == 200
    })
    .await;

    let bad = "/halyard/default/policies/reviews";
    etcd = tokio::task::spawn_blocking(move || {
        etcd.etcdctl_ok(&["put", bad, "{not json"]);
        etcd
    })
    .await
    .unwrap();
    let dump = wait_admin(&client, admin, "/config_dump", "quarantined key", |_, b| {
        b.contains(bad)
    })
    .await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let registry = &dump["registry"];
    assert!(registry["revision"].as_i64().unwrap() > 0, "{registry}");
    let q = &registry["quarantined"][0];
    assert_eq!(q["key"], bad);
    let reason = q["reason"].as_str().unwrap();
    assert!(!reason.is_empty(), "{q}");
    assert!(registry["services"]["reviews"].is_object(), "{registry}");
    assert_eq!(dump["config"]["service"]["name"], "reviews");
    wait_admin(&client, admin, "/metrics", "rejected keys gauge", |_, m| {
        metric(m, "halyard_registry_rejected_keys", &[]) == 1.0
    })
    .await;
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_filter_changes_at_run_time() {
    halyard_sidecar::telemetry::logging::init("info", std::io::sink);
    let mesh = Mesh::with_dir().await;
    mesh.apply(
        "kind: Service\nname: reviews\nports:\n  - { name: tcp, port: 9080, protocol: tcp }\n",
    )
    .await;
    let sidecar = mesh.start(&Spec::new("reviews", "v1")).await;
    let admin = sidecar.started.admin;
    let client = http_client();
    assert_eq!(
        get(&client, admin, "/logging").await,
        (200, "info\n".into())
    );
    let (status, body, _) = http_call(
        &client,
        admin,
        "POST",
        "/logging?filter=warn,halyard_sidecar=debug",
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, now) = get(&client, admin, "/logging").await;
    assert!(now.contains("halyard_sidecar=debug"), "{now}");
    let (status, _, _) = http_call(&client, admin, "PUT", "/logging?filter=[[bad", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(get(&client, admin, "/logging").await.1, now);
    assert_eq!(get(&client, admin, "/readyz").await.0, 200);
    let (status, _, _) = http_call(&client, admin, "POST", "/metrics", &[]).await;
    assert_eq!(status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request_and_flow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pp.log");
    let extra = format!("[access_log]\nenabled = true\npath = {path:?}\nbuffer = 64\n");
    let e = edges_with(11, "", &extra).await;
    e._mesh.apply("kind: Route\nservice: reviews\nrules:\n  - match: { path: { prefix: /never } }\n    backends: [{ weight: 1 }]\n  - backends: [{ weight: 1 }]\n---\nkind: Route\nservice: ratings\nrules:\n  - backends: [{ weight: 1 }]\n").await;
    e.pp.wait_snapshot("the routes", |s| s.routes.len() == 2)
        .await;
    let client = http_client();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, ..) = http_call(
        &client,
        e.pp.upstream(0),
        "GET",
        "/ok",
        &[("traceparent", parent)],
    )
    .await;
    assert_eq!(status, 200);
    traffic(&e, &client).await;
    e.pp.wait_flows(17).await;
    let lines = wait_lines(&path, 17).await;
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("{err}: {l}")))
        .collect();
    for entry in &entries {
        for field in [
            "time",
            "direction",
            "source_id",
            "source_service",
            "destination_service",
            "destination_version",
            "route",
            "endpoint",
            "bytes_sent",
            "bytes_received",
            "duration_ms",
            "trace_id",
        ] {
            assert!(entry.get(field).is_some(), "{field} missing: {entry}");
        }
        assert_eq!(
            entry["source_id"],
            "spiffe://mesh.local/ns/default/sa/productpage"
        );
        assert_eq!(entry["direction"], "outbound");
        assert!(entry["time"].as_str().unwrap().ends_with('Z'), "{entry}");
    }
    let traced = &entries[0];
    assert_eq!(traced["protocol"], "http");
    assert_eq!(traced["status"], 200);
    assert_eq!(traced["destination_service"], "reviews");
    assert_eq!(traced["destination_version"], "v1");
    assert_eq!(traced["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(traced["endpoint"], e.reviews.started.inbound.to_string());
    assert_eq!(traced["route"], "1", "the second rule matched");
    assert_eq!(traced["bytes_received"], "v1 GET /ok".len(), "{traced}");
    assert!(traced["duration_ms"].as_f64().unwrap() > 0.0);
    let flows: Vec<_> = entries.iter().filter(|e| e["protocol"] == "tcp").collect();
    assert_eq!(flows.len(), 9);
    let ok: Vec<_> = flows.iter().filter(|e| e["flags"] == "-").collect();
    assert_eq!(ok.len(), 4);
    for f in &ok {
        assert_eq!(
            (f["bytes_sent"].as_u64(), f["bytes_received"].as_u64()),
            (Some(5), Some(7))
        );
        assert_eq!(f["endpoint"], e.ratings.started.inbound.to_string());
        assert_eq!(f["trace_id"], "-");
        assert_eq!(f["route"], "0");
    }
    assert_eq!(flows.iter().filter(|e| e["flags"] == "DENY").count(), 2);
    assert_eq!(flows.iter().filter(|e| e["flags"] == "UF").count(), 3);
    let denied = entries.iter().filter(|e| e["status"] == 403).count();
    assert_eq!(denied, 2);
    let (_, m) = get(&client, e.pp.started.admin, "/metrics").await;
    assert_eq!(metric(&m, "halyard_access_log_dropped_total", &[]), 0.0);
}

async fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} lines: {text}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small OTLP/HTTP receiver: decodes each export and passes its spans on.
async fn otlp_receiver() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Span>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        for rs in export.resource_spans {
                            for ss in rs.scope_spans {
                                for s in ss.spans {
                                    let _ = tx.send(s);
                                }
                            }
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::new()),
                        ))
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

async fn next_span(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Span>) -> Span {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no span exported")
        .unwrap()
}

fn tracing_extra(collector: SocketAddr) -> String {
    format!("[tracing]\ncollector = \"http://{collector}/v1/traces\"\nflush_interval = \"50ms\"\ntimeout = \"500ms\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_share_the_trace_and_link_outbound_to_inbound() {
    let (collector, mut spans) = otlp_receiver().await;
    let e = edges(21, &tracing_extra(collector)).await;
    let client = http_client();
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, ..) = http_call(
        &client,
        e.pp.upstream(0),
        "GET",
        "/ok",
        &[("traceparent", caller)],
    )
    .await;
    assert_eq!(status, 200);
    let seen_by_app = e.app.last_headers.lock().unwrap()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let (a, b) = (next_span(&mut spans).await, next_span(&mut spans).await);
    let (out, inb) = if a.kind == 3 { (a, b) } else { (b, a) };
    assert_eq!((out.kind, inb.kind), (3, 2), "client and server spans");
    let trace = hex(&out.trace_id);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(inb.trace_id, out.trace_id);
    assert_eq!(
        hex(&out.parent_span_id),
        "00f067aa0ba902b7",
        "caller's span"
    );
    assert_eq!(
        inb.parent_span_id, out.span_id,
        "inbound's parent is outbound"
    );
    assert_eq!(
        seen_by_app,
        format!("00-{trace}-{}-01", hex(&inb.span_id)),
        "the app continues from the inbound span"
    );
    assert!(out.end_time_unix_nano >= out.start_time_unix_nano);
    assert!(out.start_time_unix_nano <= inb.start_time_unix_nano + 50_000_000);
    assert_eq!(out.name, "GET reviews");

    // No traceparent from the app: the outbound span is a root, the inbound its child.
    let (status, ..) = http_call(&client, e.pp.upstream(0), "GET", "/ok", &[]).await;
    assert_eq!(status, 200);
    let (a, b) = (next_span(&mut spans).await, next_span(&mut spans).await);
    let (out, inb) = if a.kind == 3 { (a, b) } else { (b, a) };
    assert!(out.parent_span_id.is_empty());
    assert_eq!(inb.parent_span_id, out.span_id);
    assert_eq!(inb.trace_id, out.trace_id);
    let m = wait_admin(
        &client,
        e.pp.started.admin,
        "/metrics",
        "exports",
        |_, m| metric(m, "halyard_trace_spans_exported_total", &[]) >= 2.0,
    )
    .await;
    assert_eq!(metric(&m, "halyard_trace_spans_exported_total", &[]), 2.0);
    assert_eq!(metric(&m, "halyard_trace_spans_dropped_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_costs_spans_not_requests() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let collector = gone.local_addr().unwrap();
    drop(gone);
    spans_dropped_requests_served(31, collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_collector_costs_spans_not_requests() {
    // Connections complete in the backlog, but no request is ever answered.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    spans_dropped_requests_served(35, silent.local_addr().unwrap()).await;
    drop(silent);
}

async fn spans_dropped_requests_served(first_ip: u8, collector: SocketAddr) {
    let e = edges(first_ip, &tracing_extra(collector)).await;
    let client = http_client();
    let started = Instant::now();
    for _ in 0..50 {
        let (status, body, _) = http_call(&client, e.pp.upstream(0), "GET", "/ok", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "50 requests took {took:?}");
    let m = wait_admin(
        &client,
        e.pp.started.admin,
        "/metrics",
        "drops counted",
        |_, m| metric(m, "halyard_trace_spans_dropped_total", &[]) >= 50.0,
    )
    .await;
    assert_eq!(metric(&m, "halyard_trace_spans_exported_total", &[]), 0.0);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_top_once_prints_each_edge_with_its_request_count() {
    let e = edges(41, "").await;
    let client = http_client();
    for _ in 0..7 {
        let (status, ..) = http_call(&client, e.pp.upstream(0), "GET", "/ok", &[]).await;
        assert_eq!(status, 200);
    }
    for _ in 0..3 {
        assert_eq!(call(e.pp.upstream(1), b"hello").await.unwrap(), b"r:hello");
    }
    e.pp.wait_flows(10).await;
    e.reviews.wait_flows(7).await;
    let admins = format!("{},{}", e.pp.started.admin, e.reviews.started.admin);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_halyard"))
            .args([
                "ctl",
                "top",
                "--admin",
                &admins,
                "--once",
                "--interval",
                "200ms",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |src: &str, dst: &str| -> Vec<String> {
        text.lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[0] == src && f[1] == dst
            })
            .unwrap_or_else(|| panic!("no {src} -> {dst} row:\n{text}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let reviews = row("productpage", "reviews");
    assert_eq!(reviews[col("PROTO")], "http");
    assert_eq!(reviews[col("TOTAL")], "7", "{text}");
    assert_eq!(reviews[col("SUCCESS")], "100.0%", "{text}");
    let ratings = row("productpage", "ratings");
    assert_eq!(ratings[col("PROTO")], "tcp");
    assert_eq!(ratings[col("TOTAL")], "3", "{text}");
}

/// Every metric the Grafana dashboard queries is one the sidecar exports.
#[test]
fn grafana_dashboard_is_valid_json_and_queries_exported_metrics() {
    use halyard_sidecar::metrics::{Direction, Edge, Metrics};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/halyard.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let m = Metrics::new().unwrap();
    let edge = Edge {
        direction: Direction::Outbound,
        source: "a",
        destination: "b",
        version: "v1",
    };
    m.tcp_flow(edge, "-", 1, 1, 0.1);
    m.request(edge, 200, 0.1);
    m.denial("a", "b", "x");
    m.ejection("b");
    m.retry("b");
    let _active = m.active(Direction::Outbound);
    for g in [&m.quic_rtt, &m.quic_lost, &m.quic_cwnd] {
        g.with_label_values(&["p"]).set(1.0);
    }
    for g in [&m.quic_open_streams, &m.pool_connections] {
        g.with_label_values(&["p"]).set(1);
    }
    let exported = m.render();
    let mut queried = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("halyard_"))
            {
                assert!(
                    exported.contains(&format!("\n{name}")),
                    "{name} is not exported"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 20, "{queried} metric references");
}

/// The `halyard sidecar` process: its log filter changes through `/logging`, its access log goes
/// to stdout (logs stay on stderr), and SIGTERM flushes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_process_serves_logging_and_writes_the_access_log_to_stdout() {
    use std::io::BufRead;
    let mesh = Mesh::with_dir().await;
    let echo = tagged_echo(SocketAddr::new(ip(51), 0), "r").await;
    mesh.apply(&format!(
        "kind: Service\nname: ratings\nports:\n  - {{ name: tcp, port: 9090, protocol: tcp, targetPort: {} }}\n",
        echo.addr.port()
    ))
    .await;
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = spare.local_addr().unwrap();
    drop(spare);
    let mut spec = Spec::new("ratings", "v1").app_host(ip(51));
    spec.extra = "[access_log]\nenabled = true\n".into();
    let text = mesh.config_text(&spec).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{admin}\""),
    );
    let path = mesh.dir.path().join("ratings-process.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(["sidecar", "--config", path.to_str().unwrap()])
        .env("HALYARD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = http_client();
    wait_admin(&client, admin, "/readyz", "process ready", |s, _| s == 200).await;
    assert_eq!(
        get(&client, admin, "/logging").await,
        (200, "warn\n".into())
    );
    let (status, body, _) = http_call(&client, admin, "PUT", "/logging?filter=info", &[]).await;
    assert_eq!((status, body.as_str()), (200, "info\n"));

    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9090))
        .await;
    pp.wait_endpoints("ratings", 1).await;
    for _ in 0..3 {
        assert_eq!(call(pp.upstream(0), b"hi").await.unwrap(), b"r:hi");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (status, lines) = tokio::task::spawn_blocking(move || {
        let lines: Vec<String> = std::io::BufReader::new(stdout)
            .lines()
            .map(Result::unwrap)
            .collect();
        (child.wait().unwrap(), lines)
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["direction"], "inbound");
        assert_eq!(
            v["source_id"],
            "spiffe://mesh.local/ns/default/sa/productpage"
        );
        assert_eq!(v["flags"], "-");
        assert_eq!(
            (v["bytes_sent"].as_u64(), v["bytes_received"].as_u64()),
            (Some(2), Some(4))
        );
        assert_eq!(
            v["endpoint"],
            SocketAddr::new(ip(51), echo.addr.port()).to_string()
        );
    }
    pp.shutdown().await.unwrap();
}
