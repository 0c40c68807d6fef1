//! Tunnels over one mutually authenticated QUIC connection: data integrity, half-close,
//! statuses, concurrency, L7 requests, idle replacement.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use halyard_transport::{Target, TunnelError};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_tunnel_round_trip() {
    let mesh = Mesh::new().await;
    let mut tunnel = mesh.open("echo").await;
    tunnel.write_all(b"ping").await.unwrap();
    assert_eq!(tunnel.status().await.unwrap(), StatusCode::OK);
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

/// Echoes 3 MiB through a tunnel and half-closes it: returns the tunnel (kept with its mesh),
/// the data sent, and everything read back after our FIN.
async fn half_closed_echo() -> (Mesh, halyard_transport::Tunnel, Vec<u8>, Vec<u8>) {
    let mesh = Mesh::new().await;
    let mut tunnel = mesh.open("echo").await;
    let data = pattern(7, 3 * 1024 * 1024 + 17);
    // The echo server only writes while it reads, so all of it comes back after our FIN.
    tunnel.write_all(&data).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tunnel.read_to_end(&mut reply).await.unwrap();
    (mesh, tunnel, data, reply)
}

#[tokio::test]
async fn after_a_half_close_the_whole_reply_still_arrives() {
    let (_mesh, _tunnel, data, reply) = half_closed_echo().await;
    assert_eq!(reply.len(), data.len());
    assert!(reply == data, "echoed bytes differ");
}

#[tokio::test]
async fn writing_after_our_own_fin_is_refused_locally() {
    let (_mesh, mut tunnel, _, _) = half_closed_echo().await;
    let err = tunnel.write_all(b"late").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn error_statuses_reach_the_client_typed() {
    let mesh = Mesh::new().await;
    for (service, want) in [
        ("denied", StatusCode::FORBIDDEN),
        ("nosuch", StatusCode::NOT_FOUND),
    ] {
        let mut tunnel = mesh.open(service).await;
        let err = tunnel.status().await.unwrap_err();
        assert_eq!(err.status(), Some(want));
        assert!(err.before_any_byte());
        // A read reports the same refusal as an io::Error wrapping the TunnelError.
        let io = tunnel.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        let inner = io.get_ref().unwrap().downcast_ref::<TunnelError>().unwrap();
        assert_eq!(inner.status(), Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_through_one_tunnel_hash_matches() {
    const TOTAL: usize = 1 << 30;
    let mesh = Mesh::new().await;
    let mut tunnel = mesh.open("sink").await;
    let chunk = pattern(42, 1 << 20);
    let mut sent = Sha256::new();
    let started = Instant::now();
    for _ in 0..TOTAL / chunk.len() {
        tunnel.write_all(&chunk).await.unwrap();
        sent.update(&chunk);
    }
    tunnel.shutdown().await.unwrap();
    let mut received = Vec::new();
    tunnel.read_to_end(&mut received).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(received.as_slice(), sent.finalize().as_slice());
    eprintln!(
        "1 GiB in {elapsed:?} ({:.0} MiB/s)",
        1024.0 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_tunnels_share_one_connection() {
    let mesh = std::sync::Arc::new(Mesh::new().await);
    let mut flows = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let mesh = mesh.clone();
        flows.spawn(async move {
            let data = pattern(i, 2048 + i as usize);
            let reply = exchange(mesh.open("echo").await, &data).await.unwrap();
            assert!(reply == data, "flow {i} corrupted");
            i
        });
    }
    let mut done = 0;
    while let Some(r) = flows.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, 1000);
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), 1000);
    assert_eq!(mesh.pool.connections(mesh.addr(), &mesh.server_id).len(), 1);
}

/// An L7 request is relayed whole: the caller's identity reaches the server, and the body and
/// the trailers come back in order.
#[tokio::test]
async fn an_l7_request_is_relayed_whole() {
    let mesh = Mesh::new().await;
    let request = http::Request::builder()
        .method("POST")
        .uri("https://reviews:9000/echo")
        .body(())
        .unwrap();
    let mut stream = mesh
        .pool
        .send_request(mesh.addr(), &mesh.server_id, request)
        .await
        .unwrap();
    stream
        .send_data(bytes::Bytes::from_static(b"hello body"))
        .await
        .unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    stream.send_trailers(trailers).await.unwrap();
    stream.finish().await.unwrap();
    let response = stream.recv_response().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["x-peer"],
        mesh.pki.id("productpage").as_str()
    );
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        use bytes::Buf;
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    assert_eq!(body, b"hello body");
    let trailers = stream.recv_trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test]
async fn idle_timed_out_connection_is_replaced_without_caller_error() {
    let idle = config(|c| {
        c.idle_timeout_ms = 300;
        c.keep_alive_interval_ms = 0;
    });
    let mesh = Mesh::with_configs(idle.clone(), idle).await;
    let reply = exchange(mesh.open("echo").await, b"first").await.unwrap();
    assert_eq!(reply, b"first");
    let conns = mesh.pool.connections(mesh.addr(), &mesh.server_id);
    assert_eq!(conns.len(), 1);
    let reason = conns[0].closed().await;
    assert!(
        matches!(reason, quinn::ConnectionError::TimedOut),
        "{reason:?}"
    );
    let reply = exchange(mesh.open("echo").await, b"second").await.unwrap();
    assert_eq!(reply, b"second");
    let now = mesh.pool.connections(mesh.addr(), &mesh.server_id);
    assert_eq!(now.len(), 1);
    assert_ne!(now[0].stable_id(), conns[0].stable_id());
}

/// A mesh with one tunnel open and answered.
async fn one_open_tunnel() -> (Mesh, halyard_transport::Tunnel) {
    let mesh = Mesh::new().await;
    let mut tunnel = mesh.open("echo").await;
    tunnel.write_all(b"x").await.unwrap();
    tunnel.status().await.unwrap();
    (mesh, tunnel)
}

#[tokio::test]
async fn stats_describe_each_connection_to_a_peer() {
    let (mesh, _tunnel) = one_open_tunnel().await;
    let stats = mesh.pool.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].peer.id, mesh.server_id);
    let conn = &stats[0].connections[0];
    assert!(conn.cwnd > 0 && conn.sent_packets > 0);
    assert!(conn.rtt < Duration::from_secs(1));
}

#[tokio::test]
async fn stats_count_the_open_streams() {
    let (mesh, tunnel) = one_open_tunnel().await;
    assert_eq!(mesh.pool.stats()[0].connections[0].open_streams, 1);
    drop(tunnel);
    assert_eq!(mesh.pool.stats()[0].connections[0].open_streams, 0);
}

#[tokio::test]
async fn bad_target_is_refused_locally() {
    assert!(Target::new("", 1).is_err());
    assert!("svc:0".parse::<Target>().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_pipes_tcp_to_tcp_with_half_close() {
    let mesh = Mesh::new().await;
    mesh.handler.backend.set(tcp_echo_app().await).unwrap();
    // The client app connects to a local listener; the "client sidecar" splices it.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let local = listener.local_addr().unwrap();
    let app = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
        let data = pattern(11, 5 << 20);
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        assert!(reply == data, "spliced bytes differ");
        reply.len()
    });
    let (mut inbound, _) = listener.accept().await.unwrap();
    let mut tunnel = mesh.open("splice").await;
    let (r, w) = inbound.split();
    let (up, down) = tunnel.splice(r, w).await.unwrap();
    assert_eq!((up, down), (5 << 20, 5 << 20));
    assert_eq!(app.await.unwrap(), 5 << 20);
}

/// Writes `data` with the zero-copy call and reads it back in chunks.
async fn zero_copy_echo(tunnel: &mut halyard_transport::Tunnel, data: &'static [u8]) -> Vec<u8> {
    tunnel
        .write_bytes(bytes::Bytes::from_static(data))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        got.extend_from_slice(&tunnel.read_chunk().await.unwrap().unwrap());
    }
    got
}

#[tokio::test]
async fn zero_copy_calls_round_trip() {
    let mesh = Mesh::new().await;
    let mut tunnel = mesh.open("echo").await;
    assert_eq!(zero_copy_echo(&mut tunnel, b"chunked").await, b"chunked");
}

#[tokio::test]
async fn an_aborted_tunnel_refuses_further_writes() {
    let mesh = Mesh::new().await;
    let mut tunnel = mesh.open("echo").await;
    assert_eq!(zero_copy_echo(&mut tunnel, b"chunked").await, b"chunked");
    tunnel.abort();
    let err = tunnel
        .write_bytes(bytes::Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn splice_to_a_refused_target_reports_the_status() {
    let mesh = Mesh::new().await;
    let (mut a, b) = tokio::io::duplex(1024);
    a.write_all(b"early bytes").await.unwrap();
    let mut tunnel = mesh.open("denied").await;
    let (r, w) = tokio::io::split(b);
    let err = tunnel.splice(r, w).await.unwrap_err();
    let inner = err
        .get_ref()
        .unwrap()
        .downcast_ref::<TunnelError>()
        .unwrap();
    assert_eq!(inner.status(), Some(StatusCode::FORBIDDEN));
    assert!(inner.before_any_byte());
}

/// How a tunnel that sent ten bytes is ended by its caller.
#[derive(Debug, Clone, Copy)]
enum End {
    Finish,
    Abort,
    Drop,
}

/// What the server's handler observed at the end of a tunnel ended by `end`.
async fn end_seen_by_the_peer(end: End) -> Option<String> {
    let mesh = Mesh::new().await;
    let mut seen = mesh.handler.observed.subscribe();
    let mut tunnel = mesh.open("observe").await;
    tunnel.write_all(b"0123456789").await.unwrap();
    match end {
        End::Finish => {
            tunnel.shutdown().await.unwrap();
            tunnel.status().await.unwrap();
        }
        End::Abort => {
            tunnel.status().await.unwrap();
            tunnel.abort();
        }
        End::Drop => {
            tunnel.status().await.unwrap();
        }
    }
    drop(tunnel);
    let got = seen.wait_for(|o| o.is_some()).await.unwrap().clone();
    got
}

#[tokio::test]
async fn finish_is_an_eof_at_the_peer() {
    let got = end_seen_by_the_peer(End::Finish).await;
    assert_eq!(got.as_deref(), Some("eof 10"));
}

#[tokio::test]
async fn abort_is_a_reset_at_the_peer() {
    let got = end_seen_by_the_peer(End::Abort).await;
    assert_eq!(got.as_deref(), Some("error ConnectionReset"));
}

#[tokio::test]
async fn dropping_a_tunnel_is_a_reset_at_the_peer() {
    let got = end_seen_by_the_peer(End::Drop).await;
    assert_eq!(got.as_deref(), Some("error ConnectionReset"));
}

/// A mesh whose server endpoint was closed under an open, answered tunnel.
async fn endpoint_closed_under_an_open_tunnel() -> (Mesh, halyard_transport::Tunnel) {
    let mesh = Mesh::new().await;
    let mut tunnel = mesh.open("echo").await;
    tunnel.write_all(b"x").await.unwrap();
    tunnel.status().await.unwrap();
    mesh.server.close();
    (mesh, tunnel)
}

#[tokio::test]
async fn serve_ends_when_the_endpoint_closes() {
    let (mesh, _tunnel) = endpoint_closed_under_an_open_tunnel().await;
    mesh.serve_task.await.unwrap();
}

#[tokio::test]
async fn open_tunnels_see_their_endpoint_close() {
    let (mesh, mut tunnel) = endpoint_closed_under_an_open_tunnel().await;
    mesh.serve_task.await.unwrap();
    let err = tunnel.read_to_end(&mut Vec::new()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
    let inner = err
        .get_ref()
        .unwrap()
        .downcast_ref::<TunnelError>()
        .unwrap();
    assert!(!inner.before_any_byte(), "{inner:?}");
}

#[tokio::test]
async fn binding_a_taken_address_is_a_socket_error() {
    let taken = std::net::UdpSocket::bind(LOOPBACK).unwrap();
    let addr = taken.local_addr().unwrap();
    let pki = halyard_certs::test_util::TestPki::new("mesh.local");
    let err = halyard_transport::MeshEndpoint::new(
        pki.resolver("a"),
        pki.bundle.clone(),
        halyard_transport::TransportConfig::default(),
        addr,
    )
    .unwrap_err();
    assert!(
        matches!(err, halyard_transport::EndpointError::Socket { addr: a, .. } if a == addr),
        "{err:?}"
    );
}

/// A server draining under one flow in flight: the drain has started and a new flow was
/// refused (which is how the client learns of the GOAWAY).
struct Draining {
    /// The client's pool, kept open for the whole test.
    _pool: halyard_transport::Pool,
    conn: quinn::Connection,
    in_flight: halyard_transport::Tunnel,
    refused: TunnelError,
    serving: tokio::task::JoinHandle<()>,
}

impl Draining {
    async fn start() -> Draining {
        let pki = halyard_certs::test_util::TestPki::new("mesh.local");
        let config = halyard_transport::TransportConfig::default;
        let server = halyard_transport::MeshEndpoint::new(
            pki.resolver("reviews"),
            pki.bundle.clone(),
            config(),
            LOOPBACK.parse().unwrap(),
        )
        .unwrap();
        let handler = std::sync::Arc::new(TestHandler::default());
        let (start_drain, drain) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(halyard_transport::serve_until(
            server.clone(),
            handler.clone(),
            async {
                let _ = drain.await;
            },
        ));
        let client = halyard_transport::MeshEndpoint::new(
            pki.resolver("productpage"),
            pki.bundle.clone(),
            config(),
            LOOPBACK.parse().unwrap(),
        )
        .unwrap();
        let pool = halyard_transport::Pool::new(client);
        let (addr, id) = (server.local_addr().unwrap(), pki.id("reviews"));
        let target = Target::new("echo", 9000).unwrap();
        let mut in_flight = pool
            .open_tcp(addr, &id, &target, HeaderMap::new())
            .await
            .unwrap();
        in_flight.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        in_flight.read_exact(&mut buf).await.unwrap();

        start_drain.send(()).unwrap();
        let conn = pool.connections(addr, &id).remove(0);
        let refused = async {
            loop {
                match pool.open_tcp(addr, &id, &target, HeaderMap::new()).await {
                    Ok(mut t) => match t.status().await {
                        Ok(_) => continue, // sent before the GOAWAY arrived
                        Err(e) => break e,
                    },
                    Err(e) => break e,
                }
            }
        }
        .await;
        Draining {
            _pool: pool,
            conn,
            in_flight,
            refused,
            serving,
        }
    }

    /// Sends the rest of the flow in flight, half-closes it, and returns what came back.
    async fn finish_in_flight(&mut self) -> Vec<u8> {
        self.in_flight.write_all(b" after").await.unwrap();
        self.in_flight.shutdown().await.unwrap();
        let mut rest = Vec::new();
        self.in_flight.read_to_end(&mut rest).await.unwrap();
        rest
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_refuses_new_flows_before_any_byte() {
    let d = Draining::start().await;
    // Refused before any byte flows, so the caller may go elsewhere.
    assert!(d.refused.before_any_byte(), "{:?}", d.refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_in_flight_keeps_working_through_a_drain() {
    let mut d = Draining::start().await;
    // The flow in flight keeps working on its connection until it ends.
    assert_eq!(d.finish_in_flight().await, b" after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_the_connection_with_goaway_once_flows_end() {
    let mut d = Draining::start().await;
    d.finish_in_flight().await;
    d.serving.await.unwrap();
    let reason = d.conn.closed().await;
    let quinn::ConnectionError::ApplicationClosed(close) = &reason else {
        panic!("{reason:?}")
    };
    assert_eq!(u64::from(close.error_code), 0x100);
}

/// An endpoint of `name` from `pki` with the default settings, on loopback.
fn default_endpoint(
    pki: &halyard_certs::test_util::TestPki,
    name: &str,
) -> halyard_transport::MeshEndpoint {
    halyard_transport::MeshEndpoint::new(
        pki.resolver(name),
        pki.bundle.clone(),
        halyard_transport::TransportConfig::default(),
        LOOPBACK.parse().unwrap(),
    )
    .unwrap()
}

/// The server of an HTTP/3 connection never opens a bidirectional stream (RFC 9114 §6.1): a
/// connection a `MeshEndpoint` dials allows it none (so quinn sets up no slot for them when the
/// connection starts), while the dialler may open as many as the server allows. Stream credit
/// comes with the transport parameters, so an open with credit is ready on its first poll.
#[tokio::test]
async fn a_dialled_connection_gives_the_server_no_bidirectional_stream() {
    use futures::FutureExt;
    let pki = halyard_certs::test_util::TestPki::new("mesh.local");
    let (server, client) = (
        default_endpoint(&pki, "reviews"),
        default_endpoint(&pki, "productpage"),
    );
    let accept = async { server.quinn().accept().await.unwrap().await.unwrap() };
    let reviews = pki.id("reviews");
    let (dialled, accepted) = tokio::join!(
        client.connect(server.local_addr().unwrap(), &reviews),
        accept
    );
    let dialled = dialled.unwrap();
    assert!(
        dialled.open_bi().now_or_never().is_some(),
        "the dialler opens requests"
    );
    assert!(
        accepted.open_uni().now_or_never().is_some(),
        "the server opens its control stream"
    );
    assert!(
        accepted.open_bi().now_or_never().is_none(),
        "the server has no bidi credit"
    );
}

/// A stand-in for an east-west gateway in front of one server: datagrams from callers go to
/// `server` behind a PROXY v2 header; the server's answers, behind a header naming the caller,
/// go to that caller without it, unless the wrapped datagram is longer than `path_mtu` bytes
/// (the path between server and gateway carries no more: dropped, as a router would).
async fn proxy_relay(server: std::net::SocketAddr, path_mtu: usize) -> std::net::SocketAddr {
    use halyard_transport::proxy_v2::{self, ProxyHeader};
    let socket = tokio::net::UdpSocket::bind(LOOPBACK).await.unwrap();
    let public = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf[proxy_v2::MAX_LEN..]).await else {
                return;
            };
            let datagram = &buf[proxy_v2::MAX_LEN..proxy_v2::MAX_LEN + n];
            if from == server {
                let Ok((header, at)) = proxy_v2::decode(datagram) else {
                    continue;
                };
                if n <= path_mtu {
                    let _ = socket.send_to(&datagram[at..], header.destination).await;
                }
            } else {
                let header = ProxyHeader {
                    source: from,
                    destination: public,
                };
                let len = proxy_v2::encoded_len(&header);
                let start = proxy_v2::MAX_LEN - len;
                proxy_v2::encode(&header, &mut buf[start..]).unwrap();
                let _ = socket
                    .send_to(&buf[start..proxy_v2::MAX_LEN + n], server)
                    .await;
            }
        }
    });
    public
}

/// An endpoint that accepts callers through east-west gateways (`proxy_protocol_from`) gives
/// their connections a start below the PROXY header its answers carry back through the gateway,
/// and its direct callers the configured `initial_mtu` from the first packet, with no probe.
#[tokio::test]
async fn an_endpoint_behind_a_gateway_starts_only_the_connections_the_gateway_brings_lower() {
    let pki = halyard_certs::test_util::TestPki::new("mesh.local");
    let endpoint = |name: &str, proxied: &[&str]| {
        let cfg = config(|c| {
            c.initial_mtu = 1452;
            c.proxy_protocol_from = proxied.iter().map(|p| p.to_string()).collect();
        });
        halyard_transport::MeshEndpoint::new(
            pki.resolver(name),
            pki.bundle.clone(),
            cfg,
            LOOPBACK.parse().unwrap(),
        )
        .unwrap()
    };
    let server = endpoint("reviews", &["127.0.0.0/8"]);
    // Two callers: the server answers an address it has seen behind the gateway through it.
    let (remote, local) = (endpoint("productpage", &[]), endpoint("productpage", &[]));
    let reviews = pki.id("reviews");
    // The path between the gateway and the server carries 1,452-byte datagrams, header included.
    let gateway = proxy_relay(server.local_addr().unwrap(), 1452).await;
    let exchange = |client: &halyard_transport::MeshEndpoint, via: std::net::SocketAddr| {
        let (server, client, reviews) = (&server, client.clone(), &reviews);
        async move {
            let accept = async {
                let incoming = server.quinn().accept().await.unwrap();
                let conn = server.accept(incoming).unwrap().await.unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let asked = recv.read_to_end(1 << 20).await.unwrap();
                send.write_all(&asked).await.unwrap();
                send.finish().unwrap();
                conn
            };
            let dial = async {
                let conn = client.connect(via, reviews).await.unwrap();
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                send.write_all(&pattern(3, 256 * 1024)).await.unwrap();
                send.finish().unwrap();
                let back = recv.read_to_end(1 << 20).await.unwrap();
                (conn, back)
            };
            let (accepted, (dialled, back)) = tokio::join!(accept, dial);
            assert_eq!(back, pattern(3, 256 * 1024));
            let stats = accepted.stats().path;
            drop(dialled);
            stats
        }
    };
    let through = tokio::time::timeout(Duration::from_secs(20), exchange(&remote, gateway))
        .await
        .expect("the handshake and the exchange through the gateway fit its path");
    assert!(
        through.current_mtu <= 1452 - 28 && through.black_holes_detected == 0,
        "{through:?}"
    );
    let direct = tokio::time::timeout(
        Duration::from_secs(20),
        exchange(&local, server.local_addr().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(
        (direct.current_mtu, direct.sent_plpmtud_probes),
        (1452, 0),
        "a direct caller starts at initial_mtu: {direct:?}"
    );
}

/// A UDP relay to `backend`, which the caller may switch: the first source that is not the
/// backend is the client; what the current backend sends goes to the client, anything else
/// is dropped (a former backend is cut off, as a crashed process falls silent).
async fn switchable_relay(
    backend: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    tokio::sync::watch::Sender<std::net::SocketAddr>,
) {
    let socket = tokio::net::UdpSocket::bind(LOOPBACK).await.unwrap();
    let public = socket.local_addr().unwrap();
    let (switch, current) = tokio::sync::watch::channel(backend);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let mut client = None;
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let backend = *current.borrow();
            let to = if from == backend {
                client
            } else if client.is_none_or(|c| c == from) {
                client = Some(from);
                Some(backend)
            } else {
                None
            };
            if let Some(to) = to {
                let _ = socket.send_to(&buf[..n], to).await;
            }
        }
    });
    (public, switch)
}

/// A peer restarted at the same address (a new endpoint there with the same reset key, as a
/// sidecar keeps it in `state_dir`) while the pool holds two connections to the old one: the
/// first flow after it meets the new process's stateless reset, and the next flow opens a new
/// connection instead of trying the other dead one.
#[tokio::test]
async fn after_a_stateless_reset_no_other_connection_to_that_peer_is_used() {
    let pki = halyard_certs::test_util::TestPki::new("mesh.local");
    let key = halyard_transport::ResetKey::random();
    // Both processes are registered at one address, so they make the same reset tokens
    // (`ResetKey::for_endpoint`) and issue connection IDs of the same server ID.
    let registered: std::net::SocketAddr = "192.0.2.1:4433".parse().unwrap();
    let serve = || {
        let endpoint = halyard_transport::MeshEndpoint::new_advertised(
            pki.resolver("reviews"),
            pki.bundle.clone(),
            halyard_transport::TransportConfig::default(),
            LOOPBACK.parse().unwrap(),
            Some(registered),
            halyard_transport::quic_lb::LbConfig::default(),
            &key,
        )
        .unwrap();
        let handler = std::sync::Arc::new(TestHandler::default());
        let task = tokio::spawn(halyard_transport::serve(endpoint.clone(), handler));
        (endpoint, task)
    };
    let (first, _first_task) = serve();
    let (addr, switch) = switchable_relay(first.local_addr().unwrap()).await;
    let client = halyard_transport::MeshEndpoint::new(
        pki.resolver("productpage"),
        pki.bundle.clone(),
        config(|c| c.connections_per_peer = 2),
        LOOPBACK.parse().unwrap(),
    )
    .unwrap();
    let pool = halyard_transport::Pool::new(client);
    let reviews = pki.id("reviews");
    let target = Target::new("echo", 9000).unwrap();
    let open = || pool.open_tcp(addr, &reviews, &target, HeaderMap::new());
    // Two flows at once: the second finds the first connection busy and opens another.
    let (a, b) = (open().await.unwrap(), open().await.unwrap());
    let (a, b) = tokio::join!(exchange(a, b"a"), exchange(b, b"b"));
    assert_eq!((a.unwrap(), b.unwrap()), (b"a".to_vec(), b"b".to_vec()));
    assert_eq!(pool.connections(addr, &reviews).len(), 2);

    // The first process falls silent (nothing of it reaches the caller any more, no
    // CONNECTION_CLOSE) and a second one takes its place behind the same address.
    let (second, _second_task) = serve();
    switch.send_replace(second.local_addr().unwrap());
    let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
    let lost = match open().await {
        Ok(tunnel) => within(exchange(tunnel, b"c"))
            .await
            .expect("the reset ends the stream")
            .unwrap_err(),
        Err(e) => panic!("the pool opened no stream: {e}"),
    };
    let inner = lost.get_ref().and_then(|e| e.downcast_ref::<TunnelError>());
    assert!(
        matches!(
            inner,
            Some(TunnelError::ConnectionLost {
                peer_restarted: true,
                ..
            })
        ),
        "{lost:?}"
    );
    let next = within(exchange(open().await.unwrap(), b"d")).await.unwrap();
    assert_eq!(
        next.unwrap(),
        b"d",
        "the next flow goes on a new connection"
    );
    assert_eq!(pool.connections(addr, &reviews).len(), 1);
}

/// A client sent a Retry (RFC 9000 §8.1.2) just before the endpoint's trust bundle is replaced
/// (a CA rotation) is still validated by its token: the token key outlives the bundle. With a
/// key made per bundle the token was unreadable, so the attempt counted as unvalidated (under
/// load: a second Retry, which a client ignores).
#[tokio::test]
async fn a_retry_token_issued_before_a_new_trust_bundle_is_still_accepted() {
    let pki = halyard_certs::test_util::TestPki::new("mesh.local");
    let (server, client) = (
        default_endpoint(&pki, "reviews"),
        default_endpoint(&pki, "productpage"),
    );
    let reviews = pki.id("reviews");
    let accept = async {
        let first = server.quinn().accept().await.unwrap();
        assert!(!first.remote_address_validated());
        first.retry().unwrap();
        // Before the client's second Initial is read: this runtime has one thread, and nothing
        // is awaited in between.
        server.set_trust_bundle(pki.bundle.clone()).unwrap();
        let second = server.quinn().accept().await.unwrap();
        assert!(
            second.remote_address_validated(),
            "the Retry token was read"
        );
        server.accept(second).unwrap().await
    };
    let (dialled, accepted) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(
            client.connect(server.local_addr().unwrap(), &reviews),
            accept
        )
    })
    .await
    .expect("the retried handshake completes");
    dialled.unwrap();
    accepted.unwrap();
}
