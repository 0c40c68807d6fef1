//! Telemetry from outside: traffic through real sidecars, then the admin endpoints scraped over
//! HTTP, the access log read back, spans caught by an OTLP receiver, and `halyard ctl top` run
//! as the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::otlp::{ExportTraceServiceRequest, Span};
use halyard_sidecar::test_util::*;
use prost::Message;

/// Every L7 request and every L4 flow is counted under its labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_exchange_under_its_labels() {
    let e = edges("").await;
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
    // The congestion controller's view of the same peer (window and pacing rate).
    assert!(
        metric(&m, "halyard_quic_cwnd_bytes", &[("peer", &peer)]) > 0.0,
        "{m}"
    );
    assert!(
        metric(&m, "halyard_quic_pacing_rate_bytes", &[("peer", &peer)]) > 0.0,
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
    halyard_sidecar::test_util::init_logs();
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
    halyard_sidecar::logging::init("info", std::io::sink);
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

/// One JSON line per L7 request and per L4 flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_json_line_per_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pp.log");
    let extra = format!("[access_log]\nenabled = true\npath = {path:?}\nbuffer = 64\n");
    let e = edges_with("", &extra).await;
    e.mesh.apply("kind: Route\nservice: reviews\nrules:\n  - match: { path: { prefix: /never } }\n    backends: [{ weight: 1 }]\n  - backends: [{ weight: 1 }]\n---\nkind: Route\nservice: ratings\nrules:\n  - backends: [{ weight: 1 }]\n").await;
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

/// The spans of a request share its trace, each inbound span linked to the outbound one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spans_of_a_request_form_one_trace() {
    let (collector, mut spans) = otlp_receiver().await;
    let e = edges(&tracing_extra(collector)).await;
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
    let (_held, collector) = halyard_sidecar::test_util::refused_addr();
    spans_dropped_requests_served(collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_collector_costs_spans_not_requests() {
    // Connections complete in the backlog, but no request is ever answered.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    spans_dropped_requests_served(silent.local_addr().unwrap()).await;
    drop(silent);
}

async fn spans_dropped_requests_served(collector: SocketAddr) {
    let e = edges(&tracing_extra(collector)).await;
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

/// The access log names the route rule a flow took when it was routed, even when the Route
/// changed while the flow was open (the rule is recorded at pick time, not looked up again when
/// the flow ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_names_the_rule_a_flow_took_across_a_route_change() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let mut app = tagged_echo(SocketAddr::new(host, 0), "ratings").await;
    let service = format!(
        "kind: Service\nname: ratings\nports:\n  - {{ name: tcp, port: 9090, protocol: tcp, targetPort: {} }}\n",
        app.addr.port()
    );
    // Rule 0 never matches productpage; its flows take rule 1.
    let before = "kind: Route\nservice: ratings\nrules:\n  - match: { sourceService: nobody }\n    backends: [{ weight: 1 }]\n  - backends: [{ subset: { version: v1 }, weight: 100 }]\n";
    mesh.apply(&format!("{service}---\n{before}")).await;
    let ratings = mesh.start(&Spec::new("ratings", "v1").app_host(host)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pp.log");
    let mut spec = Spec::new("productpage", "v1").upstream("ratings", 9090);
    spec.extra = format!("[access_log]\nenabled = true\npath = {path:?}\n");
    let pp = mesh.start(&spec).await;
    pp.wait_endpoints("ratings", 1).await;
    pp.wait_snapshot("the first route", |s| {
        s.route("ratings").is_some_and(|r| r.rules.len() == 2)
    })
    .await;

    let mut flow = tokio::net::TcpStream::connect(pp.upstream(0))
        .await
        .unwrap();
    flow.write_all(b"a").await.unwrap();
    app.accepted.recv().await.unwrap();
    // While the flow is open, the Route becomes one rule with new weights.
    let after = "kind: Route\nservice: ratings\nrules:\n  - backends: [{ subset: { version: v1 }, weight: 60 }, { subset: { version: v2 }, weight: 40 }]\n";
    mesh.apply(after).await;
    pp.wait_snapshot("the second route", |s| {
        s.route("ratings").is_some_and(|r| r.rules.len() == 1)
    })
    .await;
    flow.shutdown().await.unwrap();
    let mut reply = Vec::new();
    flow.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"ratings:a");
    assert_eq!(call(pp.upstream(0), b"b").await.unwrap(), b"ratings:b");

    let lines = wait_lines(&path, 2).await;
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries[0]["route"], "1", "{lines:?}");
    assert_eq!(entries[1]["route"], "0", "{lines:?}");
    assert_eq!(
        entries[0]["endpoint"],
        ratings.started.inbound.to_string(),
        "{lines:?}"
    );
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
}

/// A request's duration ends at the response head on both sidecars (README: "L7 time to the
/// response head"), not when a slow body has been relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_duration_ends_at_the_response_head() {
    let host = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let slow_body = AppBehavior {
        body_delay: Some(Duration::from_millis(1200)),
        ..AppBehavior::default()
    };
    let app = http_app(SocketAddr::new(host, 0), "v1", slow_body).await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: 9080, protocol: http, targetPort: {} }}\n",
        app.addr.port()
    ))
    .await;
    let reviews = mesh.start(&Spec::new("reviews", "v1").app_host(host)).await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", 1).await;
    let started = Instant::now();
    let (status, body, _) = http_call(&http_client(), pp.upstream(0), "GET", "/slow", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "the body came late"
    );
    reviews.wait_flows(1).await;
    pp.wait_flows(1).await;
    for (side, direction) in [(&reviews, "inbound"), (&pp, "outbound")] {
        let m = side.started.render_metrics();
        let under = |le: &str| {
            metric(
                &m,
                "halyard_request_duration_seconds_bucket",
                &[("direction", direction), ("le", le)],
            )
        };
        assert_eq!(under("+Inf"), 1.0, "{direction}: {m}");
        assert_eq!(
            under("0.512"),
            1.0,
            "{direction}: the duration includes the body"
        );
    }
    pp.shutdown().await.unwrap();
    reviews.shutdown().await.unwrap();
}
