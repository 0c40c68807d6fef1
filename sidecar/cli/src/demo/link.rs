//! A simulated network link in front of one sidecar's inbound QUIC port: a UDP relay whose
//! packet loss can be switched on and off while traffic flows (the transport crate's
//! `LinkSim` fixes its profile at start). The demo registers the relay's address as the
//! sidecar's endpoint (`inbound.advertise`), so every peer reaches that sidecar through it.
//!
//! Each client address gets its own socket toward the server (a tiny NAT), so replies go back
//! to the right peer. Drop decisions come from a seeded RNG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// Largest UDP payload relayed.
const MAX_DATAGRAM: usize = 65_535;

/// Loss is kept in parts per million.
const PPM: f64 = 1_000_000.0;

/// State shared by the relay's tasks.
#[derive(Debug, Default)]
struct Shared {
    loss_ppm: AtomicU32,
    relayed: AtomicU64,
    dropped: AtomicU64,
}

impl Shared {
    fn lose(&self, rng: &mut StdRng) -> bool {
        let p = f64::from(self.loss_ppm.load(Ordering::Relaxed)) / PPM;
        let lost = p > 0.0 && rng.random_bool(p.clamp(0.0, 1.0));
        let counter = if lost { &self.dropped } else { &self.relayed };
        counter.fetch_add(1, Ordering::Relaxed);
        lost
    }
}

/// A running relay; its tasks end when it is dropped.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _tasks: JoinSet<()>,
}

impl Link {
    /// Starts a relay on 127.0.0.1 toward `server`, clean until [`Link::set_loss`].
    pub async fn start(server: SocketAddr, seed: u64) -> std::io::Result<Link> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(forward(front, server, shared.clone(), seed));
        Ok(Link {
            addr,
            shared,
            _tasks: tasks,
        })
    }

    /// Where peers send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops this share of packets (0.0 to 1.0) in both directions from now on.
    pub fn set_loss(&self, share: f64) {
        let ppm = (share.clamp(0.0, 1.0) * PPM).round() as u32;
        self.shared.loss_ppm.store(ppm, Ordering::Relaxed);
    }

    /// Packets relayed and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.relayed.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
        )
    }
}

type Peers = Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>;

/// Client → server: one back socket per client, created on its first packet.
async fn forward(front: Arc<UdpSocket>, server: SocketAddr, shared: Arc<Shared>, seed: u64) {
    let peers: Peers = Arc::default();
    let mut backs = JoinSet::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok((n, client)) = front.recv_from(&mut buf).await {
        let back = match back_socket(&peers, client, server).await {
            Ok((sock, fresh)) => {
                if fresh {
                    let seed = rng.random();
                    backs.spawn(backward(
                        sock.clone(),
                        front.clone(),
                        client,
                        shared.clone(),
                        seed,
                    ));
                }
                sock
            }
            Err(e) => {
                tracing::debug!(error = %e, "link: no socket toward the server");
                continue;
            }
        };
        if !shared.lose(&mut rng) {
            let _ = back.send(&buf[..n]).await;
        }
    }
}

async fn back_socket(
    peers: &Peers,
    client: SocketAddr,
    server: SocketAddr,
) -> std::io::Result<(Arc<UdpSocket>, bool)> {
    if let Some(s) = peers.lock().unwrap_or_else(|p| p.into_inner()).get(&client) {
        return Ok((s.clone(), false));
    }
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(server).await?;
    let sock = Arc::new(sock);
    peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(client, sock.clone());
    Ok((sock, true))
}

/// Server → client, for one client.
async fn backward(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // A refused send (the server is gone) reports an error on the next receive; keep going.
    loop {
        let Ok(n) = back.recv(&mut buf).await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        if !shared.lose(&mut rng) {
            let _ = front.send_to(&buf[..n], client).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server, a link in front of it, and a client that sent "ping" through the link and got
    /// "pong" back: what the server and the client received.
    async fn ping_pong_through_a_link() -> (UdpSocket, Link, UdpSocket, Vec<u8>, Vec<u8>) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let link = Link::start(server.local_addr().unwrap(), 7).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(link.addr()).await.unwrap();
        client.send(b"ping").await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        let ping = buf[..n].to_vec();
        server.send_to(b"pong", from).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        let pong = buf[..n].to_vec();
        (server, link, client, ping, pong)
    }

    #[tokio::test]
    async fn relays_both_ways() {
        let (_server, _link, _client, ping, pong) = ping_pong_through_a_link().await;
        assert_eq!(ping, b"ping");
        assert_eq!(pong, b"pong");
    }

    #[tokio::test]
    async fn drops_every_packet_at_full_loss() {
        let (server, link, client, _, _) = ping_pong_through_a_link().await;
        link.set_loss(1.0);
        client.send(b"lost").await.unwrap();
        // Once the link has counted the packet dropped, nothing may be waiting at the server.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while link.counts().1 == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the link never dropped the packet: {:?}",
                link.counts()
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let mut buf = [0u8; 16];
        let crossed = server.try_recv_from(&mut buf);
        assert!(
            matches!(&crossed, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a packet crossed a link with 100% loss: {crossed:?}"
        );
        assert_eq!(link.counts(), (2, 1));
    }
}
