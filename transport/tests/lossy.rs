//! Behaviour on bad links, through the link simulator, and under client migration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use halyard_transport::bind_udp;
use halyard_transport::sim::{LinkCounters, LinkProfile, LinkSim};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_flows_arrive_whole_over_an_impaired_link() {
    let mesh = Arc::new(Mesh::new().await);
    let profile = LinkProfile {
        duplicate: 0.01,
        ..LinkProfile::lossy(0.05, Duration::from_millis(20))
    };
    let sim = LinkSim::start(mesh.addr(), profile.clone(), profile, 7)
        .await
        .unwrap();
    let via = sim.addr();
    let mut flows = tokio::task::JoinSet::new();
    for i in 0..100u64 {
        let mesh = mesh.clone();
        flows.spawn(async move {
            let data = pattern(i, 16 * 1024 + i as usize);
            let reply = exchange(mesh.open_via(via, "echo").await, &data)
                .await
                .unwrap();
            assert!(reply == data, "flow {i} corrupted");
        });
    }
    while let Some(r) = flows.join_next().await {
        r.unwrap();
    }
    let (f, b) = (sim.forward(), sim.backward());
    let dropped = LinkCounters::get(&f.dropped) + LinkCounters::get(&b.dropped);
    let reordered = LinkCounters::get(&f.reordered) + LinkCounters::get(&b.reordered);
    let duplicated = LinkCounters::get(&f.duplicated) + LinkCounters::get(&b.duplicated);
    eprintln!("dropped {dropped}, reordered {reordered}, duplicated {duplicated}");
    assert!(dropped > 0 && reordered > 0 && duplicated > 0);
    let stats = mesh.pool.stats();
    assert!(stats[0].connections[0].lost_packets > 0);
    assert_eq!(mesh.pool.connections(via, &mesh.server_id).len(), 1);
}

/// Sends `total` bytes to the sink and returns (hash sent, hash the sink reported); `midway`
/// runs once after half of it was written.
async fn sink_transfer<F: std::future::Future<Output = ()>>(
    tunnel: halyard_transport::Tunnel,
    total: usize,
    midway: F,
) -> (Vec<u8>, Vec<u8>) {
    let (mut r, mut w) = tokio::io::split(tunnel);
    let chunk = pattern(3, 64 * 1024);
    let mut sent = Sha256::new();
    let mut midway = Some(midway);
    for i in 0..total / chunk.len() {
        if i == total / chunk.len() / 2 {
            if let Some(m) = midway.take() {
                m.await;
            }
        }
        w.write_all(&chunk).await.unwrap();
        sent.update(&chunk);
    }
    w.shutdown().await.unwrap();
    let mut reply = Vec::new();
    r.read_to_end(&mut reply).await.unwrap();
    (sent.finalize().to_vec(), reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_resumes_after_a_two_second_blackhole() {
    let mesh = Mesh::new().await;
    let sim = Arc::new(
        LinkSim::start(mesh.addr(), LinkProfile::clean(), LinkProfile::clean(), 1)
            .await
            .unwrap(),
    );
    let tunnel = mesh.open_via(sim.addr(), "sink").await;
    let hole = sim.clone();
    let midway = async move {
        hole.set_blackhole(true);
        // The outage itself is the scenario: the link is down for two seconds of wall time.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            hole.set_blackhole(false);
        });
    };
    let (sent, received) = sink_transfer(tunnel, 32 << 20, midway).await;
    assert_eq!(sent, received);
    let lost = LinkCounters::get(&sim.forward().blackholed)
        + LinkCounters::get(&sim.backward().blackholed);
    assert!(lost > 0, "the blackhole swallowed nothing");
    assert_eq!(mesh.pool.connections(sim.addr(), &mesh.server_id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_blackhole_windows_drop_everything_inside_them() {
    let mesh = Mesh::new().await;
    let profile = LinkProfile {
        blackholes: vec![(Duration::ZERO, Duration::from_millis(300))],
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), profile, LinkProfile::clean(), 1)
        .await
        .unwrap();
    // The first Initial is swallowed; QUIC retransmits after the window and connects.
    let reply = exchange(mesh.open_via(sim.addr(), "echo").await, b"late but whole")
        .await
        .unwrap();
    assert_eq!(reply, b"late but whole");
    assert!(LinkCounters::get(&sim.forward().blackholed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rebind_mid_transfer_keeps_the_connection() {
    let mesh = Mesh::new().await;
    let tunnel = mesh.open("sink").await;
    let endpoint = mesh.pool.endpoint().clone();
    let before = endpoint.local_addr().unwrap();
    let conn = mesh
        .pool
        .connections(mesh.addr(), &mesh.server_id)
        .remove(0);
    let moved = endpoint.clone();
    let midway = async move {
        let socket = bind_udp(LOOPBACK.parse().unwrap(), moved.config()).unwrap();
        moved.rebind(socket).unwrap();
    };
    let (sent, received) = sink_transfer(tunnel, 64 << 20, midway).await;
    assert_eq!(sent, received);
    let after = endpoint.local_addr().unwrap();
    assert_ne!(before.port(), after.port());
    let now = mesh.pool.connections(mesh.addr(), &mesh.server_id);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].stable_id(), conn.stable_id());
    assert!(conn.close_reason().is_none());
}

#[tokio::test]
async fn first_bytes_ride_with_the_connect_headers_on_a_warm_connection() {
    // 50 ms each way: a reply within one round trip (100 ms) plus slack proves the data did not
    // wait for the CONNECT response; waiting would cost a second round trip (200 ms).
    let mesh = Mesh::new().await;
    let one_way = LinkProfile {
        delay: Duration::from_millis(50),
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), one_way.clone(), one_way, 5)
        .await
        .unwrap();
    let warm = exchange(mesh.open_via(sim.addr(), "echo").await, b"warm")
        .await
        .unwrap();
    assert_eq!(warm, b"warm");
    let started = tokio::time::Instant::now();
    let mut tunnel = mesh.open_via(sim.addr(), "echo").await;
    tunnel.write_all(b"hello").await.unwrap();
    let mut reply = [0u8; 5];
    tunnel.read_exact(&mut reply).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(&reply, b"hello");
    assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(170),
        "took {elapsed:?}: an extra round trip?"
    );
}

/// A new connection to a peer an earlier connection measured starts its handshake from that RTT
/// (RFC 9002 §6.2.2): when its first Initial is lost, the Initial is sent again after about
/// three round trips (the probe timeout, §6.2.1), not after the second that quinn's default
/// initial RTT of 333 ms gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_to_a_known_peer_resends_a_lost_initial_within_a_few_round_trips() {
    let mesh = Mesh::new().await;
    let profile = LinkProfile {
        delay: Duration::from_millis(10),
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), profile.clone(), profile, 11)
        .await
        .unwrap();
    let via = sim.addr();
    assert_eq!(
        exchange(mesh.open_via(via, "echo").await, b"one")
            .await
            .unwrap(),
        b"one"
    );
    let first = mesh.pool.connections(via, &mesh.server_id);
    assert_eq!(first.len(), 1);
    let rtt = first[0].rtt();
    assert!(rtt >= Duration::from_millis(20), "measured {rtt:?}");
    first[0].close(0u32.into(), b"closed by the test");
    first[0].closed().await;

    // The new connection's first Initial is lost.
    sim.drop_next_initials(1);
    let started = std::time::Instant::now();
    let reply = exchange(mesh.open_via(via, "echo").await, b"two")
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(reply, b"two");
    assert_eq!(LinkCounters::get(&sim.forward().blackholed), 1);
    let second = mesh.pool.connections(via, &mesh.server_id);
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].stable_id(), first[0].stable_id());
    // From quinn's default, the lost Initial alone costs a second (3 × 333 ms); from the RTT
    // measured, about 3 × 20 ms, and the flow itself two round trips more.
    assert!(
        took < Duration::from_millis(600),
        "the flow took {took:?}: the lost Initial waited for the default probe timeout"
    );
}
