//! Pool behaviour: shared connects, backoff, several connections per peer, forgetting peers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use halyard_transport::{MeshEndpoint, Pool, Target, TransportConfig, TunnelError};
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_connect() {
    let mesh = Arc::new(Mesh::new().await);
    let mut flows = tokio::task::JoinSet::new();
    for i in 0..50u64 {
        let mesh = mesh.clone();
        flows.spawn(async move {
            let data = pattern(i, 100);
            assert_eq!(
                exchange(mesh.open("echo").await, &data).await.unwrap(),
                data
            );
        });
    }
    while let Some(r) = flows.join_next().await {
        r.unwrap();
    }
    assert_eq!(mesh.pool.connections(mesh.addr(), &mesh.server_id).len(), 1);
    assert_eq!(mesh.server.quinn().open_connections(), 1);
}

/// Two connects from a fresh pool to a bound UDP socket that never answers (connect timeout
/// 200 ms, backoff a minute): the errors of the first and of the second.
async fn two_connects_to_a_silent_peer() -> (TunnelError, TunnelError) {
    let pki = halyard_certs::test_util::TestPki::new("mesh.local");
    let cfg = config(|c| {
        c.connect_timeout_ms = 200;
        c.backoff_initial_ms = 60_000;
        c.backoff_max_ms = 60_000;
    });
    let ep = MeshEndpoint::new(
        pki.resolver("a"),
        pki.bundle.clone(),
        cfg,
        LOOPBACK.parse().unwrap(),
    )
    .unwrap();
    let pool = Pool::new(ep);
    // A bound socket that never answers: the handshake times out.
    let silent = std::net::UdpSocket::bind(LOOPBACK).unwrap();
    let addr = silent.local_addr().unwrap();
    let target = Target::new("echo", 9000).unwrap();
    let first = pool
        .open_tcp(addr, &pki.id("b"), &target, HeaderMap::new())
        .await
        .unwrap_err();
    let second = pool
        .open_tcp(addr, &pki.id("b"), &target, HeaderMap::new())
        .await
        .unwrap_err();
    (first, second)
}

#[tokio::test]
async fn a_failed_connect_backs_off() {
    let (first, second) = two_connects_to_a_silent_peer().await;
    assert!(
        matches!(first, TunnelError::ConnectTimeout { .. }),
        "{first:?}"
    );
    let TunnelError::Backoff {
        remaining, last, ..
    } = &second
    else {
        panic!("{second:?}")
    };
    assert!(
        remaining.as_secs() >= 20 && remaining.as_secs() <= 60,
        "{remaining:?}"
    );
    assert!(last.contains("timed out"), "{last}");
}

#[tokio::test]
async fn a_failed_connect_is_safe_to_retry_elsewhere() {
    let (first, second) = two_connects_to_a_silent_peer().await;
    assert!(first.before_any_byte() && second.before_any_byte());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_carry_twice_the_stream_limit_at_once() {
    let limits = config(|c| {
        c.max_concurrent_bidi_streams = 4;
        c.connections_per_peer = 2;
    });
    let mesh = Arc::new(Mesh::with_configs(limits.clone(), limits).await);
    let mut flows = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let tunnel = mesh.open("hold").await;
        flows.spawn(exchange(tunnel, b""));
    }
    let mut held = mesh.handler.held.subscribe();
    held.wait_for(|n| *n == 8).await.unwrap();
    assert_eq!(mesh.pool.connections(mesh.addr(), &mesh.server_id).len(), 2);
    mesh.handler.released.send_replace(true);
    while let Some(r) = flows.join_next().await {
        assert_eq!(r.unwrap().unwrap(), b"released");
    }
    assert_eq!(mesh.handler.tunnels.load(Ordering::SeqCst), 8);
}

/// A client allowed two connections per peer, with two flows open on them.
struct TwoFlows {
    mesh: Mesh,
    first: halyard_transport::Tunnel,
    _second: halyard_transport::Tunnel,
}

async fn two_flows_on_a_two_connection_pool() -> TwoFlows {
    let two = config(|c| c.connections_per_peer = 2);
    let mesh = Mesh::with_configs(TransportConfig::default(), two).await;
    let mut first = mesh.open("echo").await;
    first.write_all(b"1").await.unwrap();
    first.status().await.unwrap();
    let mut second = mesh.open("echo").await;
    second.write_all(b"2").await.unwrap();
    second.status().await.unwrap();
    TwoFlows {
        mesh,
        first,
        _second: second,
    }
}

#[tokio::test]
async fn flows_spread_over_several_connections() {
    let flows = two_flows_on_a_two_connection_pool().await;
    let mesh = &flows.mesh;
    let conns = mesh.pool.connections(mesh.addr(), &mesh.server_id);
    assert_eq!(conns.len(), 2);
}

#[tokio::test]
async fn retain_peers_closes_the_connections_of_a_peer_it_drops() {
    let mut flows = two_flows_on_a_two_connection_pool().await;
    let mesh = &flows.mesh;
    let conns = mesh.pool.connections(mesh.addr(), &mesh.server_id);
    assert_eq!(conns.len(), 2);
    mesh.pool.retain_peers(|_| false);
    for conn in conns {
        let reason = conn.closed().await;
        assert!(
            matches!(reason, quinn::ConnectionError::LocallyClosed),
            "{reason:?}"
        );
    }
    assert!(mesh.pool.stats().is_empty());
    let err = flows.first.read(&mut [0u8; 4]).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
}

#[tokio::test]
async fn config_defaults_are_sized_for_a_proxy() {
    let c = TransportConfig::default();
    assert!(c.max_concurrent_bidi_streams() >= 1000);
    assert!(c.keep_alive_interval().unwrap() < c.idle_timeout());
    assert!(c.udp_recv_buffer() >= 1 << 20);
    assert_eq!(c.connections_per_peer(), 1);
}
