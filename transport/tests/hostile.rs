//! Bad input from a peer ends in an error status or a stream/connection close: no panic, and
//! no unbounded growth (stream counts stay at the configured limit).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use halyard_transport::{Pool, Target, TunnelError};
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn request(method: Method, uri: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .unwrap()
}

async fn status_of(mesh: &Mesh, req: http::Request<()>) -> Result<StatusCode, TunnelError> {
    let mut stream = mesh
        .pool
        .send_request(mesh.addr(), &mesh.server_id, req)
        .await?;
    stream
        .finish()
        .await
        .map_err(|e| TunnelError::Protocol(e.to_string()))?;
    let response = stream
        .recv_response()
        .await
        .map_err(|e| TunnelError::Protocol(e.to_string()))?;
    Ok(response.status())
}

async fn still_serves(mesh: &Mesh) {
    let reply = exchange(mesh.open("echo").await, b"still fine")
        .await
        .unwrap();
    assert_eq!(reply, b"still fine");
}

#[tokio::test]
async fn malformed_connect_authority_gets_400() {
    let mesh = Mesh::new().await;
    for uri in ["reviews", "https://Bad_Host:9000/", "https://reviews:0/"] {
        let status = status_of(&mesh, request(Method::CONNECT, uri))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
    }
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), 0);
    still_serves(&mesh).await;
}

#[tokio::test]
async fn other_method_where_a_tunnel_is_expected_gets_405() {
    let mesh = Mesh::new().await;
    for method in [Method::GET, Method::POST, Method::DELETE] {
        let status = status_of(&mesh, request(method.clone(), "https://reviews:9000/"))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), 0);
    still_serves(&mesh).await;
}

/// `count` header fields of 1000 bytes each.
fn padding(count: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for i in 0..count {
        headers.insert(
            http::HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap(),
            "a".repeat(1000).parse().unwrap(),
        );
    }
    headers
}

async fn open_with(mesh: &Mesh, headers: HeaderMap) -> Result<StatusCode, TunnelError> {
    let target = Target::new("echo", 9000).unwrap();
    let mut t = mesh
        .pool
        .open_tcp(mesh.addr(), &mesh.server_id, &target, headers)
        .await?;
    t.status().await
}

#[tokio::test]
async fn header_section_over_the_limit_is_refused_before_it_is_sent() {
    let mesh = Mesh::new().await;
    // 100 KiB as RFC 9114 §4.2.2 counts it, over the default 96 KiB: refused by the pool on a
    // fresh connection and on a warm one alike, without a stream at the server.
    for _ in 0..2 {
        match open_with(&mesh, padding(100)).await {
            Err(TunnelError::HeaderTooBig { size, max }) => {
                assert!(size > 100_000 && max == 96 * 1024, "{size} {max}")
            }
            other => panic!("oversized header accepted: {other:?}"),
        }
        still_serves(&mesh).await;
    }
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn header_section_over_the_peers_lower_limit_is_refused() {
    let server = config(|c| c.max_field_section_size = 16 * 1024);
    let mesh = Mesh::with_configs(server, config(|_| {})).await;
    for i in 0..5 {
        // Before the server's SETTINGS arrive the client sends it and the server answers 431
        // (RFC 9114 §4.2.2); once they have arrived h3 refuses to send it at all.
        match open_with(&mesh, padding(20)).await {
            Err(TunnelError::Status { status }) => {
                assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            Err(TunnelError::HeaderTooBig { max, .. }) => assert_eq!(max, 16 * 1024),
            other => panic!("request {i}: oversized header accepted: {other:?}"),
        }
    }
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), 0);
    still_serves(&mesh).await;
    assert_eq!(mesh.pool.connections(mesh.addr(), &mesh.server_id).len(), 1);
}

/// A pool limited to one connection per peer, waiting up to 10 s for stream credit.
fn one_connection_waiting() -> halyard_transport::TransportConfig {
    config(|c| {
        c.max_connections_per_peer = 1;
        c.stream_credit_wait_ms = 10_000;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_more_streams_than_allowed_wait_for_a_slot() {
    const LIMIT: usize = 8;
    let server = config(|c| c.max_concurrent_bidi_streams = LIMIT as u64);
    let mesh = Arc::new(Mesh::with_configs(server, one_connection_waiting()).await);
    let mut flows = tokio::task::JoinSet::new();
    for _ in 0..3 * LIMIT {
        let mesh = mesh.clone();
        flows.spawn(async move { exchange(mesh.open("hold").await, b"").await.unwrap() });
    }
    // The peer cannot open more than LIMIT streams: exactly LIMIT are held open at once.
    let mut held = mesh.handler.held.subscribe();
    held.wait_for(|n| *n == LIMIT).await.unwrap();
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), LIMIT);
    mesh.handler.released.send_replace(true);
    while let Some(reply) = flows.join_next().await {
        assert_eq!(reply.unwrap(), b"released");
    }
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), 3 * LIMIT);
    assert_eq!(mesh.handler.max_open.load(Ordering::SeqCst), LIMIT);
    assert_eq!(mesh.pool.connections(mesh.addr(), &mesh.server_id).len(), 1);
}

/// The peer allows 8 streams per connection while this side believes 1024: the pool finds out
/// when opens get no credit, and opens more connections, so all 24 flows are held at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_out_of_stream_credit_gets_another_connection() {
    const LIMIT: usize = 8;
    let server = config(|c| c.max_concurrent_bidi_streams = LIMIT as u64);
    let mesh = Arc::new(Mesh::with_configs(server, config(|_| {})).await);
    let mut flows = tokio::task::JoinSet::new();
    for _ in 0..3 * LIMIT {
        let mesh = mesh.clone();
        flows.spawn(async move { exchange(mesh.open("hold").await, b"").await.unwrap() });
    }
    let mut held = mesh.handler.held.subscribe();
    held.wait_for(|n| *n == 3 * LIMIT).await.unwrap();
    assert_eq!(mesh.pool.connections(mesh.addr(), &mesh.server_id).len(), 3);
    mesh.handler.released.send_replace(true);
    while let Some(reply) = flows.join_next().await {
        assert_eq!(reply.unwrap(), b"released");
    }
}

/// With every connection the pool may open out of credit, a new flow fails after the credit
/// wait with the local `StreamLimit`, long before a connect timeout, and is safe to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_flow_fails_as_a_local_stream_limit() {
    const LIMIT: usize = 4;
    let server = config(|c| c.max_concurrent_bidi_streams = LIMIT as u64);
    let client = config(|c| {
        c.max_connections_per_peer = 1;
        c.stream_credit_wait_ms = 50;
    });
    let mesh = Mesh::with_configs(server, client).await;
    let mut holding = Vec::new();
    for _ in 0..LIMIT {
        let mut t = mesh.open("hold").await;
        t.write_all(b"h").await.unwrap();
        holding.push(t);
    }
    let mut held = mesh.handler.held.subscribe();
    held.wait_for(|n| *n == LIMIT).await.unwrap();
    let target = Target::new("echo", 9000).unwrap();
    let started = std::time::Instant::now();
    let err = mesh
        .pool
        .open_tcp(mesh.addr(), &mesh.server_id, &target, HeaderMap::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::StreamLimit { connections: 1, .. }),
        "{err:?}"
    );
    assert!(err.before_any_byte());
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    mesh.handler.released.send_replace(true);
    for t in holding {
        assert_eq!(exchange(t, b"").await.unwrap(), b"released");
    }
}

#[tokio::test]
async fn burst_of_stream_resets_closes_that_connection_only() {
    let mesh = Mesh::new().await;
    let attacker = Pool::new(mesh.pool.endpoint().clone());
    // Warm the connection so that the burst hits an established one.
    let warm = attacker
        .open_tcp(
            mesh.addr(),
            &mesh.server_id,
            &Target::new("echo", 9000).unwrap(),
            HeaderMap::new(),
        )
        .await
        .unwrap();
    assert_eq!(exchange(warm, b"w").await.unwrap(), b"w");
    let conn = attacker.connections(mesh.addr(), &mesh.server_id).remove(0);
    for _ in 0..2000 {
        let req = request(Method::CONNECT, "echo:9000");
        match attacker
            .send_request(mesh.addr(), &mesh.server_id, req)
            .await
        {
            Ok(mut stream) => {
                // RFC 9114 §4.1.1 cancellation, in a tight loop.
                stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
            }
            Err(_) => break,
        }
        if conn.close_reason().is_some() {
            break;
        }
    }
    let reason = conn.closed().await;
    let quinn::ConnectionError::ApplicationClosed(close) = &reason else {
        panic!("{reason:?}")
    };
    // H3_EXCESSIVE_LOAD (RFC 9114 §8.1).
    assert_eq!(u64::from(close.error_code), 0x107, "{close:?}");
    // Other connections to the same server are unaffected.
    still_serves(&mesh).await;
    assert!(mesh.server.quinn().open_connections() <= 2);
}

#[tokio::test]
async fn a_handler_that_forgets_or_panics_fails_only_its_own_request() {
    let mesh = Mesh::new().await;
    let mut alive = mesh.open("echo").await;
    alive.write_all(b"a").await.unwrap();
    for service in ["forget", "panic"] {
        let mut t = mesh.open(service).await;
        let err = t.status().await.unwrap_err();
        // H3_REQUEST_REJECTED: not processed, safe to retry elsewhere.
        assert_eq!(
            err,
            TunnelError::Reset {
                code: 0x10b,
                established: false
            },
            "{service}"
        );
        assert!(err.before_any_byte());
    }
    // The connection and its other flows are untouched.
    alive.shutdown().await.unwrap();
    let mut reply = Vec::new();
    alive.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"a");
    assert_eq!(mesh.pool.connections(mesh.addr(), &mesh.server_id).len(), 1);
}
