//! Real traffic through two sidecars, with real clients where Debian ships one (curl, Python
//! gRPC, Python websockets): streaming both ways, upgrades, `Expect: 100-continue`, bodies on
//! any method, HTTP/1.0 keep-alive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use halyard_sidecar::test_util::{loopback_ip, Mesh, Sidecar, Spec};

mod common;
use common::{curl, py_client, py_server, py_server_at, PyServer};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `reviews` on one port of `protocol`, served by one sidecar per (version, app ip); a
/// `productpage` sidecar calls it. `extra` is more registry YAML (routes, policies).
struct Pair {
    _mesh: Mesh,
    _servers: Vec<Sidecar>,
    pp: Sidecar,
}

async fn pair(protocol: &str, target: u16, versions: &[(&str, IpAddr)], extra: &str) -> Pair {
    halyard_sidecar::test_util::init_logs();
    let mesh = Mesh::with_dir().await;
    let service = format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: main, port: 9080, protocol: {protocol}, targetPort: {target} }}\n"
    );
    mesh.apply(&format!("{service}{extra}")).await;
    let mut servers = Vec::new();
    for (v, ip) in versions {
        servers.push(mesh.start(&Spec::new("reviews", v).app_host(*ip)).await);
    }
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", versions.len()).await;
    if !extra.is_empty() {
        pp.wait_snapshot("the route", |s| {
            !extra.contains("kind: Route") || s.route("reviews").is_some()
        })
        .await;
        for s in &servers {
            s.wait_snapshot("the policy", |s| {
                !extra.contains("kind: Policy") || s.policy("reviews").is_some()
            })
            .await;
        }
    }
    Pair {
        _mesh: mesh,
        _servers: servers,
        pp,
    }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// An HTTP/1.1 app: `/echo` streams each request body frame straight back, `/count` answers
/// `<method> <body length>`, `/deny` answers 401 without reading the body.
async fn body_app(ip: IpAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    let method = req.method().clone();
                    let resp: http::Response<AppBody> = match path.as_str() {
                        "/echo" => {
                            let frames = req
                                .into_body()
                                .into_data_stream()
                                .map(|d| d.map(hyper::body::Frame::data));
                            http::Response::new(BodyExt::boxed(StreamBody::new(frames)))
                        }
                        "/deny" => {
                            let mut r = http::Response::new(full("no credentials\n"));
                            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                            r
                        }
                        _ => {
                            let body = req.into_body().collect().await?.to_bytes();
                            http::Response::new(full(&format!("{method} {}", body.len())))
                        }
                    };
                    Ok::<_, hyper::Error>(resp)
                },
            );
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

fn full(text: &str) -> AppBody {
    Full::new(Bytes::from(text.to_owned()))
        .map_err(|never| match never {})
        .boxed()
}

/// Reads from `tcp` until `want` has arrived; everything read so far.
async fn read_until(tcp: &mut TcpStream, seen: &mut Vec<u8>, want: &str) {
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(want) {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "waited for {want:?}, have {:?}",
                    String::from_utf8_lossy(seen)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "closed before {want:?}: {:?}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Failing input 1: a gRPC ping-pong whose client sends message n+1 only after reply n. All 20
/// replies arrive while both halves are open, as when the app is called directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bidirectional_ping_pong_gets_every_reply() {
    let ip = loopback_ip();
    let server = py_server(&["grpc-server", &ip.to_string()]).await;
    let p = pair("grpc", server.port, &[("v1", ip)], "").await;
    let target = p.pp.upstream(0).to_string();
    let (ok, out) = py_client(&["grpc-pingpong", &target, "20"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, "replies 20");
}

/// The same interleaving over HTTP/1.1 chunked: each chunk the client sends comes back before
/// it sends the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_chunked_exchange_interleaves() {
    let ip = loopback_ip();
    let (app, _task) = body_app(ip).await;
    let p = pair("http", app.port(), &[("v1", ip)], "").await;
    let mut tcp = TcpStream::connect(p.pp.upstream(0)).await.unwrap();
    tcp.write_all(b"POST /echo HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    for i in 0..5 {
        let msg = format!("ping-{i}");
        tcp.write_all(format!("{:x}\r\n{msg}\r\n", msg.len()).as_bytes())
            .await
            .unwrap();
        read_until(&mut tcp, &mut seen, &msg).await;
    }
    tcp.write_all(b"0\r\n\r\n").await.unwrap();
    read_until(&mut tcp, &mut seen, "0\r\n\r\n").await;
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
}

/// Failing input 2: WebSocket on an `http` port, with a page on the same port; the upgrade
/// request is routed (to v2 only) and checked against the policy (`/private` denied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_two_sidecars_follows_route_and_policy() {
    let (ip1, ip2) = (loopback_ip(), loopback_ip());
    let v1 = py_server(&["ws-server", &ip1.to_string(), "v1"]).await;
    let port = v1.port;
    // v2 listens on the same port (the Service's targetPort) on its own address.
    let v2 = py_server_on(ip2, port, "v2").await;
    let route = "---\nkind: Route\nservice: reviews\nrules:\n  - match: { path: { prefix: /chat } }\n    backends: [{ subset: { version: v2 }, weight: 100 }]\n  - backends: [{ subset: { version: v1 }, weight: 100 }]\n";
    let policy = "---\nkind: Policy\nservice: reviews\nrules:\n  - action: deny\n    to: { paths: [/private, /private/*] }\n";
    let p = pair(
        "http",
        port,
        &[("v1", ip1), ("v2", ip2)],
        &format!("{route}{policy}"),
    )
    .await;
    let up = p.pp.upstream(0);
    for _ in 0..3 {
        let (ok, out) = py_client(&["ws-client", &format!("ws://{up}/chat"), "5"]).await;
        assert!(ok, "{out}");
        assert_eq!(out, "echoed 5 v2:/chat");
    }
    let (ok, out) = py_client(&["ws-client", &format!("ws://{up}/private"), "1"]).await;
    assert!(!ok);
    assert_eq!(out, "status 403");
    let page = curl(&[&format!("http://{up}/")]).await;
    assert_eq!(page, "<h1>v1</h1>\n");
    drop((v1, v2));
}

/// A ws-server bound to a given port (a second version behind the same targetPort).
async fn py_server_on(ip: IpAddr, port: u16, tag: &str) -> PyServer {
    let server = py_server_at(&["ws-server", &ip.to_string(), tag], port).await;
    assert_eq!(server.port, port);
    server
}

/// `h2c` upgrade (RFC 7540 §3.2, removed by RFC 9113) is declined: the request is served as
/// HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_declined_and_served_as_http1() {
    let ip = loopback_ip();
    let (app, _task) = body_app(ip).await;
    let p = pair("http", app.port(), &[("v1", ip)], "").await;
    let up = p.pp.upstream(0);
    let out = curl(&[
        "--http2",
        "-w",
        " %{http_code} %{http_version}",
        &format!("http://{up}/count"),
    ])
    .await;
    assert_eq!(out, "GET 0 200 1.1");
}

/// Failing input 3: the app answers 401 to an upload sent with `Expect: 100-continue`. The
/// client gets that 401 having sent no body byte, as when it calls the app directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_continue_upload_refused_by_the_app_sends_no_body() {
    let ip = loopback_ip();
    let (app, _task) = body_app(ip).await;
    let p = pair("http", app.port(), &[("v1", ip)], "").await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), vec![b'u'; 20 << 20]).unwrap();
    let up = p.pp.upstream(0);
    let upload = format!("@{}", file.path().display());
    let write_out = "%{http_code} %{size_upload}";
    let direct = curl(&[
        "--expect100-timeout",
        "30",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &upload,
        "-o",
        "/dev/null",
        "-w",
        write_out,
        &format!("http://{app}/deny"),
    ])
    .await;
    assert_eq!(direct, "401 0");
    let meshed = curl(&[
        "--expect100-timeout",
        "30",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &upload,
        "-o",
        "/dev/null",
        "-w",
        write_out,
        &format!("http://{up}/deny"),
    ])
    .await;
    assert_eq!(meshed, direct);
}

/// The app's `100 Continue` is passed on: the upload goes through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_continue_upload_accepted_by_the_app_arrives_whole() {
    let ip = loopback_ip();
    let (app, _task) = body_app(ip).await;
    let p = pair("http", app.port(), &[("v1", ip)], "").await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), vec![b'u'; 20 << 20]).unwrap();
    let out = curl(&[
        "--expect100-timeout",
        "30",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.path().display()),
        "-w",
        " %{http_code} %{size_upload}",
        &format!("http://{}/count", p.pp.upstream(0)),
    ])
    .await;
    assert_eq!(out, format!("POST {} 200 {}", 20 << 20, 20 << 20));
}

/// Before any byte of the body, the client sees nothing from the mesh: `100 Continue` comes only
/// once the app sent it. A raw client checks that no 100 arrived while the app holds its
/// answer back, then gets the app's final answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_100_continue_is_sent_before_the_app_decides() {
    let ip = loopback_ip();
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let decide = Arc::new(tokio::sync::Notify::new());
    let head_seen = Arc::new(tokio::sync::Notify::new());
    let (d, h) = (decide.clone(), head_seen.clone());
    let _app = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        read_until(&mut tcp, &mut seen, "\r\n\r\n").await;
        assert!(String::from_utf8_lossy(&seen)
            .to_ascii_lowercase()
            .contains("expect: 100-continue"));
        h.notify_one();
        d.notified().await;
        tcp.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig\n")
            .await
            .unwrap();
    });
    let p = pair("http", port, &[("v1", ip)], "").await;
    let mut client = TcpStream::connect(p.pp.upstream(0)).await.unwrap();
    client
        .write_all(b"PUT /up HTTP/1.1\r\nHost: reviews\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), head_seen.notified())
        .await
        .expect("the request head never reached the app");
    let mut buf = [0u8; 256];
    assert!(
        matches!(client.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client got an answer before the app decided"
    );
    decide.notify_one();
    let mut seen = Vec::new();
    read_until(&mut client, &mut seen, "big\n").await;
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
}

/// Failing input 4: a GET with a chunked JSON body (a search API's multi-get) reaches the app
/// with its body; so do other methods, chunked or with a length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_on_any_method_reaches_the_app() {
    let ip = loopback_ip();
    let (app, _task) = body_app(ip).await;
    let p = pair("http", app.port(), &[("v1", ip)], "").await;
    let url = format!("http://{}/count", p.pp.upstream(0));
    let json = r#"{"docs":[{"_id":"1"},{"_id":"2"}]}"#;
    for method in ["GET", "DELETE", "OPTIONS", "POST"] {
        for framing in ["Transfer-Encoding: chunked", "X-Length: yes"] {
            let out = curl(&["-X", method, "-H", framing, "--data-binary", json, &url]).await;
            assert_eq!(
                out,
                format!("{method} {}", json.len()),
                "{method} {framing}"
            );
        }
    }
    let out = curl(&[&url]).await;
    assert_eq!(out, "GET 0");
}

/// HTTP/1.0 clients that ask for keep-alive get it: two requests on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_keep_alive_is_honoured() {
    let ip = loopback_ip();
    let (app, _task) = body_app(ip).await;
    let p = pair("http", app.port(), &[("v1", ip)], "").await;
    let mut tcp = TcpStream::connect(p.pp.upstream(0)).await.unwrap();
    let mut seen = Vec::new();
    for i in 1..=2 {
        tcp.write_all(b"GET /count HTTP/1.0\r\nHost: reviews\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut tcp, &mut seen, "GET 0").await;
        let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
        assert!(
            text.contains("connection: keep-alive"),
            "answer {i}: {text}"
        );
        seen.clear();
    }
}

/// An HTTP/1.1 app that answers `<tag>` until `stop` is cancelled; then it exits as a server
/// does on SIGTERM: it stops listening, finishes the requests in progress and closes every
/// connection.
fn stoppable_app(
    listener: TcpListener,
    tag: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => break,
                },
                _ = stop.cancelled() => break,
            };
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, hyper::Error>(http::Response::new(full(tag)))
                },
            );
            let stop = stop.clone();
            conns.spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
    })
}

/// "Also expected": a pod whose app and sidecar get SIGTERM together (as Kubernetes does) fails
/// no request. The app exits (finishing what it has, closing its connections) while its sidecar
/// drains; requests that reach the draining sidecar find no app, are answered as unreached, and
/// go to the other endpoint — POSTs too, since no app saw them. GETs run throughout; POSTs are
/// sent once the app is gone (a POST written to a keep-alive connection in the instant its app
/// closes it cannot be told from one the app received: RFC 9112 §9.3.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_app_and_sidecar_stop_together_fails_no_request() {
    let (ip1, ip2) = (loopback_ip(), loopback_ip());
    let l1 = TcpListener::bind(SocketAddr::new(ip1, 0)).await.unwrap();
    let port = l1.local_addr().unwrap().port();
    let l2 = TcpListener::bind(SocketAddr::new(ip2, port)).await.unwrap();
    let sigterm = tokio_util::sync::CancellationToken::new();
    let app1 = stoppable_app(l1, "v1", sigterm.clone());
    let _app2 = stoppable_app(l2, "v2", tokio_util::sync::CancellationToken::new());
    let Pair {
        _mesh,
        mut _servers,
        pp,
    } = pair("http", port, &[("v1", ip1), ("v2", ip2)], "").await;
    let up = pp.upstream(0);
    let client = halyard_sidecar::test_util::http_client();
    // Every caller has had answers before the stop: the stop lands in running traffic.
    let answered = Arc::new(tokio::sync::Barrier::new(5));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..60 {
                    let req = http::Request::get(format!("http://{up}/item/{i}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let resp = client.request(req).await.unwrap();
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    answers.push((status, String::from_utf8_lossy(&body).into_owned()));
                    if i == 2 {
                        answered.wait().await;
                    }
                }
                answers
            })
        })
        .collect();
    // Both at once, a few requests in: the app exits, its sidecar drains.
    answered.wait().await;
    sigterm.cancel();
    let v1 = _servers.remove(0);
    let drained = tokio::spawn(v1.shutdown());
    app1.await.unwrap();
    for i in 0..20 {
        let req = http::Request::post(format!("http://{up}/order"))
            .body(Full::new(Bytes::from(format!("{{\"order\":{i}}}"))))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!((status, &body[..]), (200, &b"v2"[..]), "POST {i}");
    }
    let mut v2_answers = 0;
    for caller in callers {
        for (status, body) in caller.await.unwrap() {
            assert_eq!(status, 200, "{body}");
            v2_answers += usize::from(body == "v2");
        }
    }
    drained.await.unwrap().unwrap();
    assert!(v2_answers > 0);
}

/// A request whose endpoint's sidecar cannot connect to its app reached no app: it goes to
/// another endpoint, a POST as well as a GET, without any route asking for retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_no_app_goes_to_another_endpoint() {
    let (ip1, ip2) = (loopback_ip(), loopback_ip());
    // v1's app is not running: its port on ip1 refuses.
    let l2 = TcpListener::bind(SocketAddr::new(ip2, 0)).await.unwrap();
    let port = l2.local_addr().unwrap().port();
    let _app2 = stoppable_app(l2, "v2", tokio_util::sync::CancellationToken::new());
    let p = pair("http", port, &[("v1", ip1), ("v2", ip2)], "").await;
    let up = p.pp.upstream(0);
    for i in 0..10 {
        let out = curl(&[
            "-X",
            "POST",
            "--data-binary",
            &format!("{{\"order\":{i}}}"),
            "-w",
            " %{http_code}",
            &format!("http://{up}/order"),
        ])
        .await;
        assert_eq!(out, "v2 200", "POST {i}");
    }
    let retries = halyard_sidecar::test_util::metric(
        &p.pp.started.render_metrics(),
        "halyard_retries_total",
        &[("destination_service", "reviews")],
    );
    assert!(retries >= 1.0, "no request was retried: {retries}");
}
