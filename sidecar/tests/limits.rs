//! Limits between two sidecars: more flows to one peer than one QUIC connection's stream limit,
//! and header sections near and over `transport.max_field_section_size`. A limit must fail at
//! most the flow or request that meets it, never its neighbours on the same peer connection,
//! and is never charged to the endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use halyard_sidecar::test_util::{
    cookie, http_app, http_call, http_client, loopback_ip, metric, tagged_echo, AppBehavior, Echo,
    HttpApp, Mesh, Sidecar, Spec,
};
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KIB: usize = 1024;

/// `reviews` serving HTTP (port 9080, an HTTP app) and TCP (port 9090, an echo app) from one
/// sidecar, and `productpage` calling both: upstream 0 is HTTP, upstream 1 TCP. Both edges
/// share one peer, so they share its pooled QUIC connection. Outlier detection is at its
/// defaults.
struct OnePeer {
    _mesh: Mesh,
    app: HttpApp,
    echo: Echo,
    reviews: Sidecar,
    pp: Sidecar,
}

/// [`OnePeer`] with extra TOML for the `reviews` sidecar and for `productpage`.
async fn one_peer(reviews_extra: &str, pp_extra: &str) -> OnePeer {
    let host = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let app = http_app(SocketAddr::new(host, 0), "v1", AppBehavior::default()).await;
    let echo = tagged_echo(SocketAddr::new(host, 0), "r").await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: 9080, protocol: http, targetPort: {} }}\n  - {{ name: tcp, port: 9090, protocol: tcp, targetPort: {} }}\n",
        app.addr.port(),
        echo.addr.port()
    ))
    .await;
    let mut spec = Spec::new("reviews", "v1").app_host(host);
    spec.extra = reviews_extra.into();
    let reviews = mesh.start(&spec).await;
    let mut spec = Spec::new("productpage", "v1")
        .upstream("reviews", 9080)
        .upstream("reviews", 9090);
    spec.extra = pp_extra.into();
    let pp = mesh.start(&spec).await;
    pp.wait_endpoints("reviews", 1).await;
    OnePeer {
        _mesh: mesh,
        app,
        echo,
        reviews,
        pp,
    }
}

impl OnePeer {
    fn ejections(&self) -> f64 {
        let text = self.pp.started.render_metrics();
        metric(&text, "halyard_outlier_ejections_total", &[])
    }

    /// Opens a TCP flow through productpage and sends `msg` without half-closing; returns once
    /// the echo app has accepted the connection (the tunnel is up end to end).
    async fn open_flow(&mut self, msg: &[u8]) -> TcpStream {
        let mut tcp = TcpStream::connect(self.pp.upstream(1)).await.unwrap();
        tcp.write_all(msg).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.echo.accepted.recv())
            .await
            .expect("the flow never reached the app");
        tcp
    }

    async fn shutdown(self) {
        self.pp.shutdown().await.unwrap();
        self.reviews.shutdown().await.unwrap();
    }
}

/// Half-closes a flow and reads the echo's whole answer.
async fn finish_flow(mut tcp: TcpStream) -> Vec<u8> {
    tcp.shutdown().await.unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    out
}

/// Raises the soft limit of open files to `want` (or the hard limit, if lower).
fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).unwrap();
    }
}

// ---- Stream credit: more long-lived flows than one connection carries ----

/// 2,000 flows held open at once to one peer whose connections allow 1,024 streams each (the
/// default): the pool opens another connection when the first is out of stream credit, every
/// flow reaches the app while all are open, each gets its own echo, and the endpoint is never
/// charged for the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_past_one_connections_stream_limit_all_work() {
    const FLOWS: usize = 2000;
    // Four descriptors per flow in this process (app client, productpage, reviews, echo app).
    raise_fd_limit(4 * FLOWS as u64 + 1024);
    let mut p = one_peer("", "").await;
    let mut flows = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let mut tcp = TcpStream::connect(p.pp.upstream(1)).await.unwrap();
        tcp.write_all(format!("{i}").as_bytes()).await.unwrap();
        flows.push(tcp);
    }
    // The echo answers only after a half-close: all FLOWS are open at the app at once.
    let all_open = async {
        for _ in 0..FLOWS {
            p.echo.accepted.recv().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all_open)
        .await
        .expect("not every flow reached the app");
    let mut answers = tokio::task::JoinSet::new();
    for (i, tcp) in flows.into_iter().enumerate() {
        answers.spawn(async move { (i, finish_flow(tcp).await) });
    }
    while let Some(done) = answers.join_next().await {
        let (i, out) = done.unwrap();
        assert_eq!(out, format!("r:{i}").into_bytes(), "flow {i}");
    }
    p.pp.wait_flows(FLOWS as u64).await;
    let text = p.pp.started.render_metrics();
    let ok = [("direction", "outbound"), ("response_flags", "-")];
    assert_eq!(
        metric(&text, "halyard_tcp_connections_total", &ok),
        FLOWS as f64
    );
    assert_eq!(p.ejections(), 0.0);
    p.shutdown().await;
}

// ---- Header sections ----

/// A 60 KiB cookie (real-world sizes that Envoy and nginx users meet) goes to the app, and a
/// 60 KiB Set-Cookie comes back, with the default limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_kib_cookie_crosses_both_ways_by_default() {
    let p = one_peer("", "").await;
    let client = http_client();
    let big = cookie(60 * KIB);
    let want = (60 * KIB).to_string();
    let headers = [("cookie", big.as_str()), ("x-reply-cookie-bytes", &want)];
    let (status, body, got) = http_call(&client, p.pp.upstream(0), "GET", "/", &headers).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(p.app.last_headers.lock().unwrap()["cookie"], big.as_str());
    assert_eq!(got["set-cookie"], big.as_str());
    p.shutdown().await;
}

/// The same oversized request, first on a fresh peer connection and then on the warm one, gets
/// 431 from the calling sidecar every time and never reaches the app; the connection keeps
/// serving.
async fn oversized_requests_get_431(p: &OnePeer, header_bytes: usize) {
    use std::sync::atomic::Ordering;
    let client = http_client();
    let big = cookie(header_bytes);
    let hits = p.app.hits.load(Ordering::SeqCst);
    for i in 0..4 {
        let (status, body, got) =
            http_call(&client, p.pp.upstream(0), "GET", "/", &[("cookie", &big)]).await;
        assert_eq!(status, 431, "request {i}: {body}");
        assert!(got.contains_key("x-halyard-local-reply") || body.is_empty());
        if i == 0 {
            let (status, body, _) = http_call(&client, p.pp.upstream(0), "GET", "/", &[]).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    assert_eq!(p.app.hits.load(Ordering::SeqCst), hits + 1);
    assert_eq!(p.ejections(), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_header_over_the_limit_gets_431_every_time() {
    let p = one_peer("", "").await;
    // Over the default 96 KiB, within what the app-facing server buffers.
    oversized_requests_get_431(&p, 100 * KIB).await;
    // Past that buffer as well.
    oversized_requests_get_431(&p, 300 * KIB).await;
    p.shutdown().await;
}

/// The receiving sidecar's limit (16 KiB here) is below the caller's: a 20 KiB header still
/// gets 431, also on the first request of a fresh connection, before the peer's SETTINGS are
/// known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_header_over_the_peers_lower_limit_gets_431_every_time() {
    let small = "[transport]\nmax_field_section_size = 16384\n";
    let p = one_peer(small, "").await;
    oversized_requests_get_431(&p, 20 * KIB).await;
    p.shutdown().await;
}

/// A request body the test streams by hand.
type Chunks = futures::channel::mpsc::Receiver<Result<Frame<Bytes>, std::convert::Infallible>>;
type ChunkSender = futures::channel::mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>;

async fn send_chunk(tx: &mut ChunkSender, chunk: &'static [u8]) {
    use futures::SinkExt;
    tx.send(Ok(Frame::data(Bytes::from_static(chunk))))
        .await
        .unwrap();
}

/// Starts a POST whose body stays open until the returned sender is dropped; returns once the
/// app has the request.
async fn request_in_flight(p: &OnePeer) -> (ChunkSender, tokio::task::JoinHandle<(u16, Bytes)>) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let (mut tx, rx) = futures::channel::mpsc::channel(1);
    let body: StreamBody<Chunks> = StreamBody::new(rx);
    let req = http::Request::post(format!("http://{}/slow", p.pp.upstream(0)))
        .body(body)
        .unwrap();
    let call = tokio::spawn(async move {
        let resp = client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    send_chunk(&mut tx, b"first").await;
    tokio::time::timeout(Duration::from_secs(10), p.app.seen.notified())
        .await
        .expect("the request never reached the app");
    (tx, call)
}

/// Answers with Set-Cookie headers of these sizes get 502, each alone: a TCP flow and a
/// request in flight on the same peer connection finish intact, a later request is served,
/// and the endpoint is not ejected.
async fn oversized_responses_fail_alone(p: &mut OnePeer, sizes: &[usize]) {
    let flow = p.open_flow(b"long").await;
    let (mut tx, in_flight) = request_in_flight(p).await;
    let client = http_client();
    for &size in sizes {
        let want = size.to_string();
        let headers = [("x-reply-cookie-bytes", want.as_str())];
        let (status, body, got) =
            http_call(&client, p.pp.upstream(0), "GET", "/big", &headers).await;
        assert_eq!(status, 502, "{size} bytes: {body}");
        assert_eq!(got["x-halyard-local-reply"], "1", "{size} bytes");
    }
    let (status, body, _) = http_call(&client, p.pp.upstream(0), "GET", "/after", &[]).await;
    assert_eq!(status, 200, "{body}");
    send_chunk(&mut tx, b"rest").await;
    drop(tx);
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"v1 POST /slow"[..]));
    assert_eq!(finish_flow(flow).await, b"r:long");
    assert_eq!(p.ejections(), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_header_over_the_limit_gets_502_and_nothing_else_fails() {
    let mut p = one_peer("", "").await;
    // Over the default 96 KiB: within, and past, what the inbound sidecar buffers of a head.
    oversized_responses_fail_alone(&mut p, &[100 * KIB, 300 * KIB]).await;
    p.shutdown().await;
}

/// The calling sidecar's limit (16 KiB here) is below the answering one's: a 20 KiB Set-Cookie
/// is refused by the answering sidecar, which knows the caller's limit from its SETTINGS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_header_over_the_callers_lower_limit_gets_502_and_nothing_else_fails() {
    let small = "[transport]\nmax_field_section_size = 16384\n";
    let mut p = one_peer("", small).await;
    oversized_responses_fail_alone(&mut p, &[20 * KIB]).await;
    p.shutdown().await;
}
