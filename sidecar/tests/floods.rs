//! Floods from a local app, which is not trusted to behave: slow request heads (slowloris) on an
//! HTTP listener and on the admin port, more connections than a listener holds, and h2 abuse
//! (rapid reset, CVE-2023-44487; CONTINUATION floods). Each must cost the flooding connection
//! or listener alone: other listeners, other apps' requests and open flows carry on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use halyard_sidecar::test_util::h2_abuse::{
    continuation_flood, flood_h2, rapid_reset, ENHANCE_YOUR_CALM,
};
use halyard_sidecar::test_util::{
    http_app, http_call, http_client, loopback_ip, tagged_echo, AppBehavior, Echo, HttpApp, Mesh,
    Sidecar, Spec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The header read timeout the tests configure.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Generous bound on how long after the timeout a connection must be closed.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// Connections one app-facing listener holds in the cap test.
const CAP: usize = 20;

/// `reviews` (HTTP on 9080, TCP echo on 9090) and `productpage` calling both: upstream 0 is
/// HTTP, upstream 1 TCP. `productpage` has a 1 s header read timeout and holds at most
/// [`CAP`] connections per app-facing listener.
struct Flooded {
    _mesh: Mesh,
    app: HttpApp,
    echo: Echo,
    reviews: Sidecar,
    pp: Sidecar,
}

async fn flooded() -> Flooded {
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
    let reviews = mesh.start(&Spec::new("reviews", "v1").app_host(host)).await;
    let mut spec = Spec::new("productpage", "v1")
        .upstream("reviews", 9080)
        .upstream("reviews", 9090);
    spec.extra = format!(
        "[limits]\nheader_read_timeout = \"{}ms\"\nmax_connections_per_listener = {CAP}\n",
        HEAD_TIMEOUT.as_millis()
    );
    let pp = mesh.start(&spec).await;
    pp.wait_endpoints("reviews", 1).await;
    Flooded {
        _mesh: mesh,
        app,
        echo,
        reviews,
        pp,
    }
}

impl Flooded {
    fn http(&self) -> SocketAddr {
        self.pp.upstream(0)
    }

    fn tcp(&self) -> SocketAddr {
        self.pp.upstream(1)
    }

    /// One GET through productpage's HTTP listener on a fresh connection.
    async fn get_ok(&self) {
        let (status, body, _) = http_call(&http_client(), self.http(), "GET", "/x", &[]).await;
        assert_eq!(status, 200, "{body}");
    }

    async fn shutdown(self) {
        self.pp.shutdown().await.unwrap();
        self.reviews.shutdown().await.unwrap();
    }
}

/// Reads until the peer closes (EOF or reset); how long that took.
async fn until_closed(tcp: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT + CLOSE_WITHIN, wait)
        .await
        .expect("the connection was never closed");
    start.elapsed()
}

/// Sends `head`, then one more byte of a header line every 100 ms, never ending the head, until
/// the sidecar closes the connection; how long that took from the first byte.
async fn slowloris(addr: SocketAddr, head: &[u8]) -> Duration {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    tcp.write_all(head).await.unwrap();
    let (mut rd, mut wr) = tcp.split();
    let trickle = async {
        for b in b"x-slow: ".iter().cycle() {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let closed = async {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = rd.read(&mut buf).await {}
    };
    let either = async {
        tokio::select! {
            _ = trickle => {}
            _ = closed => {}
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT + CLOSE_WITHIN, either)
        .await
        .expect("the slow connection was never closed");
    start.elapsed()
}

// ---- Slow request heads ----

/// A request head trickled byte by byte on an HTTP listener is cut off at the header read
/// timeout, not kept for as long as the bytes keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_head_on_http_listener_is_closed_at_the_timeout() {
    let f = flooded().await;
    let took = slowloris(f.http(), b"GET /slow HTTP/1.1\r\nhost: reviews\r\n").await;
    // The sidecar's timer starts at its accept, which may come before the client's clock.
    assert!(
        took >= HEAD_TIMEOUT - Duration::from_millis(50),
        "closed after {took:?}"
    );
    f.get_ok().await;
    f.shutdown().await;
}

/// A connection that never sends a byte is closed at the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_on_http_listener_is_closed_at_the_timeout() {
    let f = flooded().await;
    let mut tcp = TcpStream::connect(f.http()).await.unwrap();
    let took = until_closed(&mut tcp).await;
    assert!(
        took >= HEAD_TIMEOUT - Duration::from_millis(50),
        "closed after {took:?}"
    );
    f.shutdown().await;
}

/// The timeout is for request heads, not for idle time: a keep-alive connection idle for
/// twice the timeout after its first request still carries a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_outlives_the_head_timeout() {
    let f = flooded().await;
    let mut tcp = TcpStream::connect(f.http()).await.unwrap();
    let req = b"GET /one HTTP/1.1\r\nhost: reviews\r\n\r\n";
    tcp.write_all(req).await.unwrap();
    let first = read_response(&mut tcp).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let mut buf = [0u8; 1];
    let idle = tokio::time::timeout(2 * HEAD_TIMEOUT, tcp.read(&mut buf)).await;
    assert!(idle.is_err(), "the idle connection ended: {idle:?}");
    tcp.write_all(b"GET /two HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await
        .unwrap();
    let second = read_response(&mut tcp).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    f.shutdown().await;
}

/// The admin port cuts off a slow request head too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_head_on_admin_port_is_closed_at_the_timeout() {
    let f = flooded().await;
    let admin = f.pp.started.admin;
    let took = slowloris(admin, b"GET /metrics HTTP/1.1\r\nhost: admin\r\n").await;
    // The sidecar's timer starts at its accept, which may come before the client's clock.
    assert!(
        took >= HEAD_TIMEOUT - Duration::from_millis(50),
        "closed after {took:?}"
    );
    let (status, _) = halyard_sidecar::test_util::get(&http_client(), admin, "/healthz").await;
    assert_eq!(status, 200);
    f.shutdown().await;
}

/// Reads one response with a `content-length` body from a raw HTTP/1.1 connection.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(CLOSE_WITHIN, tcp.read(&mut buf))
            .await
            .expect("no response")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

// ---- More connections than a listener holds ----

/// Opens a TCP flow through productpage's TCP listener and waits until the echo app has it.
async fn open_flow(f: &mut Flooded, msg: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(f.tcp()).await.unwrap();
    tcp.write_all(msg).await.unwrap();
    tokio::time::timeout(CLOSE_WITHIN, f.echo.accepted.recv())
        .await
        .expect("the flow never reached the app");
    tcp
}

/// Half-closes a flow and reads the echo's whole answer.
async fn finish_flow(mut tcp: TcpStream) -> Vec<u8> {
    tcp.shutdown().await.unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    out
}

/// With the TCP listener at its cap, 200 more connections are each closed at once; the HTTP
/// listener and the flows already open carry on, and once some flows end the listener accepts
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_listener_cap_are_closed_at_once() {
    let mut f = flooded().await;
    let mut held = Vec::new();
    for i in 0..CAP {
        held.push(open_flow(&mut f, format!("{i}").as_bytes()).await);
    }
    for _ in 0..200 {
        // The reset may already meet the connect.
        if let Ok(mut tcp) = TcpStream::connect(f.tcp()).await {
            let _ = tcp.write_all(b"flood").await;
            until_closed(&mut tcp).await;
        }
    }
    f.get_ok().await;
    let last = held.pop().unwrap();
    assert_eq!(
        finish_flow(last).await,
        format!("r:{}", CAP - 1).into_bytes()
    );
    // A place is free again once that flow's task has ended (just after it is recorded; the
    // request above is the first record).
    f.pp.wait_flows(2).await;
    let mut again = Vec::new();
    for _ in 0..50 {
        again = halyard_sidecar::test_util::call(f.tcp(), b"again")
            .await
            .unwrap_or_default();
        if !again.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(again, b"r:again");
    for (i, tcp) in held.into_iter().enumerate() {
        assert_eq!(finish_flow(tcp).await, format!("r:{i}").into_bytes());
    }
    assert_eq!(f.app.hits.load(Ordering::SeqCst), 1);
    f.shutdown().await;
}

// ---- h2 abuse on an HTTP listener ----

/// Sends GETs from another connection while `flood` runs; every one must succeed.
async fn neighbour_gets_during<F: std::future::Future>(f: &Flooded, flood: F) -> F::Output {
    let neighbour = async {
        let client = http_client();
        for _ in 0..20 {
            let (status, body, _) = http_call(&client, f.http(), "GET", "/n", &[]).await;
            assert_eq!(status, 200, "{body}");
        }
    };
    let (out, ()) = tokio::join!(flood, neighbour);
    out
}

/// Rapid reset (CVE-2023-44487): 10,000 streams each opened and at once cancelled. The sidecar
/// ends that connection with GOAWAY ENHANCE_YOUR_CALM long before it has forwarded them all,
/// and another connection's requests all succeed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_ends_the_connection() {
    const STREAMS: u32 = 10_000;
    let f = flooded().await;
    let code = neighbour_gets_during(&f, flood_h2(f.http(), rapid_reset(STREAMS))).await;
    assert_eq!(code, Some(ENHANCE_YOUR_CALM));
    let forwarded = f.app.hits.load(Ordering::SeqCst);
    eprintln!("rapid reset: {forwarded} requests reached the app (20 of them the neighbour's)");
    assert!(forwarded < u64::from(STREAMS) / 10, "{forwarded} forwarded");
    f.get_ok().await;
    f.shutdown().await;
}

/// CONTINUATION flood: one header block that never ends, 100,000 CONTINUATION frames of a few
/// bytes each. The sidecar ends that connection with GOAWAY ENHANCE_YOUR_CALM after a handful
/// of frames instead of buffering or decoding them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood_ends_the_connection() {
    let f = flooded().await;
    let code = neighbour_gets_during(&f, flood_h2(f.http(), continuation_flood(100_000))).await;
    assert_eq!(code, Some(ENHANCE_YOUR_CALM));
    assert_eq!(f.app.hits.load(Ordering::SeqCst), 20);
    f.shutdown().await;
}
