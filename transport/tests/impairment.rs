//! The QUIC impairment matrix, once per congestion controller: each scenario checks an
//! outcome (the connection survives, the bytes arrive whole), never a duration.
//!
//! Transfer sizes: 8 MiB per bulk transfer in `cargo test` (the suite runs on 2 shared cores
//! in a debug build); `HALYARD_IMPAIRMENT_FULL=1` (set by `make impairment`) runs the full
//! matrix: 64 MiB through loss and reordering, across NAT rebinding and across an address
//! change, 32 MiB through the blackholes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use halyard_transport::congestion::Congestion;
use halyard_transport::sim::{LinkCounters, LinkProfile, LinkSim};
use halyard_transport::{bind_udp, Tunnel};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

/// `full` MiB with `HALYARD_IMPAIRMENT_FULL=1`, else 8 MiB (see the module docs).
fn size(full: usize) -> usize {
    let on = std::env::var_os("HALYARD_IMPAIRMENT_FULL").is_some_and(|v| v == "1");
    if on { full } else { full.min(8) }.saturating_mul(MIB)
}

async fn mesh(congestion: Congestion) -> Mesh {
    let cfg = config(|c| c.congestion = congestion);
    Mesh::with_configs(cfg.clone(), cfg).await
}

/// Sends `total` bytes to the sink, running `midway` after half; returns (hash sent, hash the
/// sink reported).
async fn sink_transfer(
    tunnel: Tunnel,
    total: usize,
    midway: impl Future<Output = ()>,
) -> (Vec<u8>, Vec<u8>) {
    let (mut r, mut w) = tokio::io::split(tunnel);
    let chunk = pattern(3, 64 * 1024);
    let chunks = total / chunk.len();
    let mut sent = Sha256::new();
    let mut midway = Some(midway);
    for i in 0..chunks {
        if i == chunks / 2 {
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

fn lost(sim: &LinkSim) -> u64 {
    LinkCounters::get(&sim.forward().dropped)
        + LinkCounters::get(&sim.backward().dropped)
        + LinkCounters::get(&sim.forward().blackholed)
        + LinkCounters::get(&sim.backward().blackholed)
}

/// Runs `scenario` once with each congestion controller.
macro_rules! both {
    ($name:ident, $scenario:ident) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bbr() {
                $scenario(Congestion::Bbr).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cubic() {
                $scenario(Congestion::Cubic).await;
            }
        }
    };
}

async fn handshake_through_heavy_loss(congestion: Congestion) {
    let mesh = mesh(congestion).await;
    let profile = LinkProfile {
        drop: 0.3,
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), profile.clone(), profile, 30)
        .await
        .unwrap();
    let reply = exchange(
        mesh.open_via(sim.addr(), "echo").await,
        b"through 30 % loss",
    )
    .await
    .unwrap();
    assert_eq!(reply, b"through 30 % loss");
    assert!(lost(&sim) > 0);
}
both!(
    handshake_completes_through_30_percent_loss_each_way,
    handshake_through_heavy_loss
);

async fn bulk_through_loss_and_reordering(congestion: Congestion) {
    let mesh = mesh(congestion).await;
    let profile = LinkProfile {
        drop: 0.02,
        reorder: 0.02,
        reorder_delay: Duration::from_millis(2),
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), profile.clone(), profile, 2)
        .await
        .unwrap();
    let tunnel = mesh.open_via(sim.addr(), "sink").await;
    let (sent, received) = sink_transfer(tunnel, size(64), async {}).await;
    assert_eq!(sent, received);
    assert!(LinkCounters::get(&sim.forward().reordered) > 0);
    assert!(lost(&sim) > 0);
}
both!(
    a_transfer_arrives_whole_through_2_percent_loss_and_reordering,
    bulk_through_loss_and_reordering
);

async fn transfer_over_a_long_path(congestion: Congestion) {
    let mesh = mesh(congestion).await;
    let one_way = LinkProfile {
        delay: Duration::from_millis(375),
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), one_way.clone(), one_way, 75)
        .await
        .unwrap();
    let tunnel = mesh.open_via(sim.addr(), "sink").await;
    let (sent, received) = sink_transfer(tunnel, MIB, async {}).await;
    assert_eq!(sent, received);
    let rtt = mesh.pool.stats()[0].connections[0].rtt;
    assert!(rtt >= Duration::from_millis(750), "{rtt:?}");
}
both!(
    a_transfer_over_750_ms_rtt_completes,
    transfer_over_a_long_path
);

async fn transfer_through_blackholes(congestion: Congestion) {
    let mesh = mesh(congestion).await;
    let sim = Arc::new(
        LinkSim::start(mesh.addr(), LinkProfile::clean(), LinkProfile::clean(), 52)
            .await
            .unwrap(),
    );
    let tunnel = mesh.open_via(sim.addr(), "sink").await;
    let hole = sim.clone();
    // The outages are the scenario: 5 s down, 2 s up, 5 s down, in wall time.
    let midway = async move {
        tokio::spawn(async move {
            for _ in 0..2 {
                hole.set_blackhole(true);
                tokio::time::sleep(Duration::from_secs(5)).await;
                hole.set_blackhole(false);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    };
    let (sent, received) = sink_transfer(tunnel, size(32), midway).await;
    assert_eq!(sent, received);
    assert!(LinkCounters::get(&sim.forward().blackholed) > 0);
    assert_eq!(mesh.pool.connections(sim.addr(), &mesh.server_id).len(), 1);
}
both!(
    blackholes_of_5_s_on_2_s_off_lose_nothing,
    transfer_through_blackholes
);

async fn transfer_across_nat_rebinding(congestion: Congestion) {
    let mesh = mesh(congestion).await;
    let sim = Arc::new(
        LinkSim::start(mesh.addr(), LinkProfile::clean(), LinkProfile::clean(), 9)
            .await
            .unwrap(),
    );
    let tunnel = mesh.open_via(sim.addr(), "sink").await;
    let conn = mesh.pool.connections(sim.addr(), &mesh.server_id).remove(0);
    let nat = sim.clone();
    let midway = async move { nat.rebind_nat().await.unwrap() };
    let (sent, received) = sink_transfer(tunnel, size(64), midway).await;
    assert_eq!(sent, received);
    let now = mesh.pool.connections(sim.addr(), &mesh.server_id);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].stable_id(), conn.stable_id());
}
both!(
    nat_rebinding_mid_transfer_keeps_the_connection,
    transfer_across_nat_rebinding
);

async fn transfer_across_client_address_change(congestion: Congestion) {
    let mesh = mesh(congestion).await;
    let sim = LinkSim::start(mesh.addr(), LinkProfile::clean(), LinkProfile::clean(), 10)
        .await
        .unwrap();
    let tunnel = mesh.open_via(sim.addr(), "sink").await;
    let conn = mesh.pool.connections(sim.addr(), &mesh.server_id).remove(0);
    let endpoint = mesh.pool.endpoint().clone();
    let before = endpoint.local_addr().unwrap();
    let moved = endpoint.clone();
    let midway = async move {
        let socket = bind_udp(LOOPBACK.parse().unwrap(), moved.config()).unwrap();
        moved.rebind(socket).unwrap();
    };
    let (sent, received) = sink_transfer(tunnel, size(64), midway).await;
    assert_eq!(sent, received);
    assert_ne!(endpoint.local_addr().unwrap().port(), before.port());
    let now = mesh.pool.connections(sim.addr(), &mesh.server_id);
    assert_eq!(now[0].stable_id(), conn.stable_id());
}
both!(
    a_client_address_change_mid_transfer_keeps_the_connection,
    transfer_across_client_address_change
);

async fn requests_beside_bulk_under_loss(congestion: Congestion) {
    let mesh = Arc::new(mesh(congestion).await);
    let profile = LinkProfile {
        drop: 0.02,
        delay: Duration::from_millis(5),
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), profile.clone(), profile, 100)
        .await
        .unwrap();
    let via = sim.addr();
    let bulk_tunnel = mesh.open_via(via, "sink").await;
    let bulk = tokio::spawn(sink_transfer(bulk_tunnel, 16 * MIB, async {}));
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..100u64 {
        let mesh = mesh.clone();
        requests.spawn(async move {
            let data = pattern(i, 512);
            let reply = exchange(mesh.open_via(via, "echo").await, &data)
                .await
                .unwrap();
            assert!(reply == data, "request {i} corrupted");
        });
    }
    let mut done = 0;
    while let Some(r) = requests.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, 100);
    let (sent, received) = bulk.await.unwrap();
    assert_eq!(sent, received);
    assert_eq!(mesh.pool.connections(via, &mesh.server_id).len(), 1);
}
both!(
    a_hundred_requests_beside_a_bulk_stream_at_2_percent_loss_complete,
    requests_beside_bulk_under_loss
);

#[tokio::test]
async fn the_pool_reports_the_controller_of_each_connection() {
    let bbr = mesh(Congestion::Bbr).await;
    exchange(bbr.open("echo").await, b"x").await.unwrap();
    let peers = bbr.pool.congestion();
    let stats = &peers[0].connections[0];
    assert!(stats.cwnd >= 4 * 1200);
    assert!(stats.delivery_rate.is_some() && stats.phase.is_some());
    let cubic = mesh(Congestion::Cubic).await;
    exchange(cubic.open("echo").await, b"x").await.unwrap();
    let stats = &cubic.pool.congestion()[0].connections[0];
    assert_eq!((stats.delivery_rate, stats.phase), (None, None));
    assert!(stats.pacing_rate > 0);
}

/// `initial_mtu` on a path that carries it: full-size packets from the first one, and no path
/// MTU probe (the default probes up to the same size while the first flows run).
#[tokio::test]
async fn a_known_path_mtu_is_used_from_the_first_packet_without_probes() {
    let known = config(|c| c.initial_mtu = 1452);
    let mesh = Mesh::with_configs(known.clone(), known).await;
    let (sent, received) = sink_transfer(mesh.open("sink").await, MIB, async {}).await;
    assert_eq!(sent, received);
    let c = mesh.pool.stats()[0].connections[0].clone();
    assert_eq!((c.current_mtu, c.mtu_probes_sent), (1452, 0), "{c:?}");
    assert_eq!(c.mtu_black_holes, 0, "{c:?}");

    let mesh = Mesh::new().await;
    let (sent, received) = sink_transfer(mesh.open("sink").await, MIB, async {}).await;
    assert_eq!(sent, received);
    let c = mesh.pool.stats()[0].connections[0].clone();
    assert!(
        c.mtu_probes_sent > 0,
        "the default discovers the path: {c:?}"
    );
}

/// An `initial_mtu` larger than the path carries (1,300-byte datagrams: a tunnel or an overlay
/// network): the handshake and a whole transfer still get through, and the connection settles
/// on what the path carries.
async fn transfer_with_a_too_large_initial_mtu(congestion: Congestion) {
    let cfg = config(|c| {
        c.congestion = congestion;
        c.initial_mtu = 1472;
    });
    let mesh = Mesh::with_configs(cfg.clone(), cfg).await;
    let narrow = LinkProfile {
        max_datagram: Some(1300),
        ..LinkProfile::clean()
    };
    let sim = LinkSim::start(mesh.addr(), narrow.clone(), narrow, 11)
        .await
        .unwrap();
    let tunnel = mesh.open_via(sim.addr(), "sink").await;
    let (sent, received) = sink_transfer(tunnel, MIB, async {}).await;
    assert_eq!(sent, received);
    let c = mesh.pool.stats()[0].connections[0].clone();
    assert!(c.current_mtu <= 1300, "{c:?}");
    assert!(
        c.mtu_black_holes >= 1,
        "the fallback was not exercised: {c:?}"
    );
    let too_big =
        LinkCounters::get(&sim.forward().too_big) + LinkCounters::get(&sim.backward().too_big);
    assert!(
        too_big > 0,
        "the link dropped nothing: the test proves nothing"
    );
}
both!(
    a_too_large_initial_mtu_falls_back_to_what_the_path_carries,
    transfer_with_a_too_large_initial_mtu
);
