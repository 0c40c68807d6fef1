//! Traffic policy operators configure: rate limits enforced at the callee's sidecar (per caller,
//! service-wide totals shared by the endpoints, gRPC, L4 flows, quarantine of bad limits in
//! etcd) and circuit breakers at the caller's sidecar.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::test_util::{
    call, http_app, http_call, http_client, loopback_ip, metric, tagged_echo, AppBehavior, Echo,
    Mesh, Sidecar, Spec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{py_client, py_server};

fn service(protocol: &str, target: u16, extra: &str) -> String {
    format!(
        "kind: Service\nname: ratings\nports:\n  - {{ name: main, port: 9080, protocol: {protocol}, targetPort: {target} }}\n{extra}"
    )
}

/// One `ratings` sidecar per app address, and the named caller sidecars; with `policy`, once
/// every `ratings` sidecar has the Policy.
async fn ratings(
    mesh: &Mesh,
    apps: &[IpAddr],
    callers: &[&str],
    policy: bool,
) -> (Vec<Sidecar>, Vec<Sidecar>) {
    let mut servers = Vec::new();
    for (i, ip) in apps.iter().enumerate() {
        let spec = Spec::new("ratings", &format!("v{i}")).app_host(*ip);
        servers.push(mesh.start(&spec).await);
    }
    let mut clients = Vec::new();
    for c in callers {
        // Every test here counts each call's outcome: a cold handshake that outlasts the
        // harness's 1 s connect timeout on a loaded machine would be one call refused by the
        // caller, never seen by the limit.
        let spec = Spec::new(c, "v1")
            .upstream("ratings", 9080)
            .connect_timeout("30s");
        let caller = mesh.start(&spec).await;
        caller.wait_endpoints("ratings", apps.len()).await;
        clients.push(caller);
    }
    for s in servers.iter().filter(|_| policy) {
        s.wait_snapshot("the policy", |s| s.policy("ratings").is_some())
            .await;
    }
    (servers, clients)
}

/// Statuses of requests sent through `upstream` at `rps` for `secs`, each on its own task; how
/// many 429s carried `retry-after`; and how long the sending took (`secs`, or longer on a slow
/// machine: the limit admits by the time the requests arrive over).
async fn drive(upstream: SocketAddr, rps: u32, secs: f64) -> (u32, u32, u32, Duration) {
    let client = http_client();
    let ok = Arc::new(AtomicU32::new(0));
    let limited = Arc::new(AtomicU32::new(0));
    let with_retry_after = Arc::new(AtomicU32::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps)));
    let total = (f64::from(rps) * secs) as u32;
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        let (c, ok, limited, ra) = (
            client.clone(),
            ok.clone(),
            limited.clone(),
            with_retry_after.clone(),
        );
        tasks.spawn(async move {
            let (status, _, headers) = http_call(&c, upstream, "GET", "/api/x", &[]).await;
            match status {
                200 => ok.fetch_add(1, Ordering::Relaxed),
                429 => {
                    if headers.contains_key("retry-after") {
                        ra.fetch_add(1, Ordering::Relaxed);
                    }
                    limited.fetch_add(1, Ordering::Relaxed)
                }
                other => panic!("unexpected status {other}"),
            };
        });
    }
    let sending = started.elapsed().max(Duration::from_secs_f64(secs));
    while tasks.join_next().await.is_some() {}
    (
        ok.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        with_retry_after.load(Ordering::Relaxed),
        sending,
    )
}

/// 100 rps per caller: one caller sending 300 rps for 5 s gets 500 (+ the burst of 10) and 429
/// with `retry-after` for the rest; a second caller within its own limit at the same time is
/// not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_caller_is_limited_and_a_quiet_one_is_not() {
    let ip = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let app = http_app(SocketAddr::new(ip, 0), "v1", AppBehavior::default()).await;
    let policy = "---\nkind: Policy\nservice: ratings\nrateLimits:\n  - name: per-caller\n    perCaller: { perSecond: 100, burst: 10 }\n";
    mesh.apply(&service("http", app.addr.port(), policy)).await;
    let (servers, clients) = ratings(&mesh, &[ip], &["productpage", "details"], true).await;
    let (noisy, quiet) = (clients[0].upstream(0), clients[1].upstream(0));
    let (n, q) = tokio::join!(drive(noisy, 300, 5.0), drive(quiet, 20, 5.0));
    let (ok, limited, retry_after, took) = n;
    eprintln!("noisy caller: admitted {ok} of 1500 in {took:?}");
    // 100 a second over the time the requests took to send, plus the burst of 10, plus 10 for
    // a token or so refilled while a request was on its way.
    let most = (100.0 * took.as_secs_f64()) as u32 + 10 + 10;
    assert!(
        (480..=most).contains(&ok),
        "admitted {ok} of 1500 in {took:?}"
    );
    assert_eq!(ok + limited, 1500);
    assert_eq!(retry_after, limited, "every 429 carries retry-after");
    assert_eq!((q.0, q.1, q.2), (100, 0, 0), "the quiet caller");
    let counted = metric(
        &servers[0].started.render_metrics(),
        "halyard_ratelimited_total",
        &[
            ("source_service", "productpage"),
            ("limit", "per-caller"),
            ("scope", "caller"),
        ],
    );
    assert_eq!(counted, f64::from(limited));
}

/// A total of 200 rps for the service across 4 endpoints, enforced by each as its share: the
/// admitted total stays within 10 % of 200 rps; with one endpoint gone, the other three re-divide
/// to the same total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_wide_total_holds_across_endpoints_and_redivides() {
    let ips: Vec<IpAddr> = (0..4).map(|_| loopback_ip()).collect();
    let mesh = Mesh::with_dir().await;
    let first = http_app(SocketAddr::new(ips[0], 0), "a", AppBehavior::default()).await;
    let port = first.addr.port();
    let mut apps = vec![first];
    for ip in &ips[1..] {
        apps.push(http_app(SocketAddr::new(*ip, port), "a", AppBehavior::default()).await);
    }
    let policy = "---\nkind: Policy\nservice: ratings\nrateLimits:\n  - name: total\n    total: { perSecond: 200, burst: 20 }\n";
    mesh.apply(&service("http", port, policy)).await;
    let (mut servers, clients) = ratings(&mesh, &ips, &["productpage"], true).await;
    let up = clients[0].upstream(0);
    let secs = 3.0;
    let (ok, _, _, took) = drive(up, 400, secs).await;
    let rate = f64::from(ok) / took.as_secs_f64();
    let per: Vec<f64> = servers
        .iter()
        .map(|s| {
            metric(
                &s.started.render_metrics(),
                "halyard_requests_total",
                &[("direction", "inbound"), ("response_code", "200")],
            )
        })
        .collect();
    let retries = metric(
        &clients[0].started.render_metrics(),
        "halyard_retries_total",
        &[],
    );
    eprintln!("four endpoints: admitted {rate:.1} rps, per endpoint {per:?}, {retries} retries");
    assert!(
        (180.0..=220.0).contains(&rate),
        "admitted {rate:.0} rps: {per:?}, {retries} retries"
    );
    // One endpoint goes (it deregisters): the other three take a third each.
    servers.remove(3).shutdown().await.unwrap();
    for s in &servers {
        s.wait_snapshot("three endpoints", |s| {
            s.endpoints_of("ratings").count() == 3
        })
        .await;
    }
    clients[0]
        .wait_snapshot("three endpoints", |s| {
            s.endpoints_of("ratings").count() == 3
        })
        .await;
    let (ok, _, _, took) = drive(up, 400, secs).await;
    let rate = f64::from(ok) / took.as_secs_f64();
    eprintln!("three endpoints: admitted {rate:.1} rps");
    assert!(
        (180.0..=220.0).contains(&rate),
        "admitted {rate:.0} rps on three"
    );
}

/// A gRPC call over the limit fails with RESOURCE_EXHAUSTED (Trailers-Only), as a gRPC client
/// sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_over_the_limit_gets_resource_exhausted() {
    let ip = loopback_ip();
    let server = py_server(&["grpc-server", &ip.to_string()]).await;
    let mesh = Mesh::with_dir().await;
    let policy = "---\nkind: Policy\nservice: ratings\nrateLimits:\n  - perCaller: { perSecond: 0.01, burst: 3 }\n";
    mesh.apply(&service("grpc", server.port, policy)).await;
    let (_servers, clients) = ratings(&mesh, &[ip], &["productpage"], true).await;
    let target = clients[0].upstream(0).to_string();
    let (ok, out) = py_client(&["grpc-unary", &target, "8"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, "OK=3 RESOURCE_EXHAUSTED=5");
}

/// An L4 limit on new flows per caller refuses the excess: the caller's app sees its
/// connection reset, the admitted flows work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_flows_over_the_limit_are_refused() {
    let ip = loopback_ip();
    let echo = tagged_echo(SocketAddr::new(ip, 0), "r").await;
    let mesh = Mesh::with_dir().await;
    let policy = "---\nkind: Policy\nservice: ratings\nrateLimits:\n  - flows: { perSecond: 0.01, burst: 3 }\n";
    mesh.apply(&service("tcp", echo.addr.port(), policy)).await;
    let (servers, clients) = ratings(&mesh, &[ip], &["productpage"], true).await;
    let up = clients[0].upstream(0);
    let mut answered = 0;
    for i in 0..8 {
        let msg = format!("m{i}");
        match call(up, msg.as_bytes()).await {
            Ok(reply) if reply == format!("r:{msg}").as_bytes() => answered += 1,
            Ok(reply) => assert!(reply.is_empty(), "{reply:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert_eq!(answered, 3);
    // The caller's record of each refusal first: a flow that failed for another reason (UF)
    // would be a refusal the limit never made. A sidecar records a flow before its app sees
    // the end, so the records are there without waiting.
    let caller = clients[0].started.render_metrics();
    let flagged = metric(
        &caller,
        "halyard_tcp_connections_total",
        &[("response_flags", "RL")],
    );
    assert_eq!(flagged, 5.0, "{caller}");
    let refused = metric(
        &servers[0].started.render_metrics(),
        "halyard_ratelimited_total",
        &[("scope", "new_flows")],
    );
    assert_eq!(refused, 5.0, "{}", servers[0].started.render_metrics());
}

/// A circuit breaker of 10 concurrent requests against a slow app: the 11th fails fast with
/// 503 and `UO`, the endpoint is never ejected, and traffic flows again when load drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eleventh_concurrent_request_fails_fast_and_nothing_is_ejected() {
    let ip = loopback_ip();
    let slow = AppBehavior {
        delay: Some(Duration::from_secs(2)),
        ..AppBehavior::default()
    };
    let app = http_app(SocketAddr::new(ip, 0), "v1", slow).await;
    let mesh = Mesh::with_dir().await;
    let cb = "circuitBreaker: { maxConcurrentRequests: 10 }\n";
    mesh.apply(&service("http", app.addr.port(), cb)).await;
    let (_servers, clients) = ratings(&mesh, &[ip], &["productpage"], false).await;
    clients[0]
        .wait_snapshot("the breaker", |s| {
            s.service("ratings")
                .is_some_and(|s| s.circuit_breaker.is_some())
        })
        .await;
    let up = clients[0].upstream(0);
    let client = http_client();
    let mut slow_calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let c = client.clone();
        slow_calls.spawn(async move { http_call(&c, up, "GET", "/slow", &[]).await.0 });
    }
    while app.hits.load(Ordering::SeqCst) < 10 {
        app.seen.notified().await;
    }
    let t = Instant::now();
    let (status, body, headers) = http_call(&client, up, "GET", "/eleventh", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "it waited {:?}",
        t.elapsed()
    );
    assert_eq!(headers["x-halyard-overloaded"], "true");
    assert!(body.contains("max_concurrent_requests"), "{body}");
    while let Some(s) = slow_calls.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    assert_eq!(
        app.hits.load(Ordering::SeqCst),
        10,
        "the 11th never reached the app"
    );
    // Load has dropped: requests flow again.
    assert_eq!(http_call(&client, up, "GET", "/again", &[]).await.0, 200);
    let text = clients[0].started.render_metrics();
    let overflows = metric(
        &text,
        "halyard_circuit_breaker_overflows_total",
        &[("threshold", "max_concurrent_requests")],
    );
    assert_eq!(overflows, 1.0);
    assert_eq!(
        metric(&text, "halyard_outlier_ejections_total", &[]),
        0.0,
        "an overflow ejects nothing"
    );
}

/// Bad limits written to etcd (a negative rate, a burst of 0, an unknown field) are quarantined
/// with their reason, and the last good limit stays enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_limit_in_etcd_is_quarantined_and_the_good_one_stays() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    let ip = loopback_ip();
    let app = http_app(SocketAddr::new(ip, 0), "v1", AppBehavior::default()).await;
    let mesh = Mesh::with_url(tempfile::tempdir().unwrap(), etcd.url()).await;
    let policy = "---\nkind: Policy\nservice: ratings\nrateLimits:\n  - perCaller: { perSecond: 0.01, burst: 2 }\n";
    mesh.apply(&service("http", app.addr.port(), policy)).await;
    let (servers, clients) = ratings(&mesh, &[ip], &["productpage"], true).await;
    let up = clients[0].upstream(0);
    let client = http_client();
    let statuses = |n| {
        let c = client.clone();
        async move {
            let mut s = Vec::new();
            for _ in 0..n {
                s.push(http_call(&c, up, "GET", "/", &[]).await.0);
            }
            s
        }
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);
    let key = "/halyard/default/policies/ratings";
    let cases = [
        (
            r#"{"kind":"Policy","service":"ratings","rateLimits":[{"perCaller":{"perSecond":-1,"burst":2}}]}"#,
            "rateLimits[0].perCaller.perSecond",
        ),
        (
            r#"{"kind":"Policy","service":"ratings","rateLimits":[{"perCaller":{"perSecond":100,"burst":0}}]}"#,
            "rateLimits[0].perCaller.burst",
        ),
        (
            r#"{"kind":"Policy","service":"ratings","rateLimits":[{"perCaller":{"perSecond":100,"burst":5,"sharp":true}}]}"#,
            "rateLimits[0].perCaller.sharp",
        ),
    ];
    for (bad, field) in cases {
        let value = bad.to_owned();
        let etcd_ref = &etcd;
        tokio::task::block_in_place(|| etcd_ref.etcdctl_ok(&["put", key, &value]));
        servers[0]
            .wait_snapshot("the quarantine", |s| {
                s.rejected.get(key).is_some_and(|why| why.contains(field))
            })
            .await;
        // The last good limit still holds: this caller's bucket stays empty.
        assert_eq!(statuses(2).await, [429, 429], "after {field}");
    }
}

/// Two flows open (the app has their first bytes, neither half-closed) under a flows limit
/// they spent, on a `ratings` sidecar with `failure.close_flows_on_deny = close`.
async fn two_open_flows_under_a_spent_limit(
    close: bool,
) -> (Mesh, Echo, Sidecar, Sidecar, [TcpStream; 2]) {
    let ip = loopback_ip();
    let mut echo = tagged_echo(SocketAddr::new(ip, 0), "r").await;
    let mesh = Mesh::with_dir().await;
    let policy = "---\nkind: Policy\nservice: ratings\nrateLimits:\n  - flows: { perSecond: 0.01, burst: 2 }\n";
    mesh.apply(&service("tcp", echo.addr.port(), policy)).await;
    let mut spec = Spec::new("ratings", "v1").app_host(ip);
    spec.extra = format!("close_flows_on_deny = {close}\n");
    let server = mesh.start(&spec).await;
    let spec = Spec::new("productpage", "v1")
        .upstream("ratings", 9080)
        .connect_timeout("30s");
    let client = mesh.start(&spec).await;
    client.wait_endpoints("ratings", 1).await;
    server
        .wait_snapshot("the policy", |s| s.policy("ratings").is_some())
        .await;
    let mut open = Vec::new();
    for msg in [&b"a"[..], b"b"] {
        let mut tcp = TcpStream::connect(client.upstream(0)).await.unwrap();
        tcp.write_all(msg).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), echo.accepted.recv())
            .await
            .expect("the flow reached the app");
        open.push(tcp);
    }
    // The limit is spent: a third flow is refused.
    let third = call(client.upstream(0), b"c").await;
    assert!(
        third.as_ref().map_or(true, Vec::is_empty),
        "third flow answered: {third:?}"
    );
    let open: [TcpStream; 2] = open.try_into().unwrap();
    (mesh, echo, server, client, open)
}

/// Half-closes `tcp` and reads the whole answer.
async fn finish(mut tcp: TcpStream) -> std::io::Result<Vec<u8>> {
    tcp.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .expect("the flow ended")?;
    Ok(out)
}

const DENY: &str = "---\nkind: Policy\nservice: ratings\nrules:\n  - action: deny\n    from: { services: [productpage] }\n";

/// Applies the deny Policy and waits until `server` has it.
async fn deny(mesh: &Mesh, server: &Sidecar) {
    mesh.apply(DENY).await;
    server
        .wait_snapshot("the deny", |s| {
            s.policy("ratings").is_some_and(|p| !p.rules.is_empty())
        })
        .await;
}

/// With `close_flows_on_deny`, a snapshot change re-checks open flows against policy only: a
/// flows limit the flows themselves spent never closes them, a deny does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_on_deny_rechecks_policy_and_never_the_rate_limit() {
    let (mesh, _echo, server, _client, [a, b]) = two_open_flows_under_a_spent_limit(true).await;
    let limited_before = metric(
        &server.started.render_metrics(),
        "halyard_ratelimited_total",
        &[],
    );
    mesh.apply(
        "kind: Service\nname: unrelated\nports:\n  - { name: main, port: 80, protocol: tcp }\n",
    )
    .await;
    server
        .wait_snapshot("the unrelated change", |s| s.service("unrelated").is_some())
        .await;
    assert_eq!(
        finish(a).await.unwrap(),
        b"r:a",
        "an allowed flow was closed"
    );
    let limited = metric(
        &server.started.render_metrics(),
        "halyard_ratelimited_total",
        &[],
    );
    assert_eq!(
        limited, limited_before,
        "the re-check was counted as a limit"
    );

    deny(&mesh, &server).await;
    // The re-check runs in the flow's own task once the snapshot changed; its closing denial
    // is counted before the flow closes. Wait for it, so the half-close below cannot overtake it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &server.started.render_metrics(),
        "halyard_policy_denials_total",
        &[],
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the open flow was never re-checked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closed = finish(b).await;
    assert!(
        closed.as_ref().map_or(true, Vec::is_empty),
        "a denied flow carried on: {closed:?}"
    );
    let denials = metric(
        &server.started.render_metrics(),
        "halyard_policy_denials_total",
        &[("source_service", "productpage")],
    );
    assert_eq!(denials, 1.0, "the closing denial is counted once");
}

/// By default an open flow outlives a policy that turns to deny; new flows are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_flows_outlive_a_deny_by_default() {
    let (mesh, _echo, server, client, [a, b]) = two_open_flows_under_a_spent_limit(false).await;
    deny(&mesh, &server).await;
    let refused = call(client.upstream(0), b"d").await;
    assert!(
        refused.as_ref().map_or(true, Vec::is_empty),
        "a new flow was answered under deny: {refused:?}"
    );
    assert_eq!(finish(a).await.unwrap(), b"r:a");
    assert_eq!(finish(b).await.unwrap(), b"r:b");
}
