//! A lossy-link simulator (feature `test-util`): a UDP relay between one client and one server
//! that, per direction, drops, delays (fixed plus jitter), reorders, duplicates and blackholes
//! packets, drawing every decision from a seeded RNG, and counts what it did. The kernel of the
//! test machines has no netem; this stands in for it in tests, benches and the demo.
//!
//! The client sends to [`LinkSim::addr`]; the relay forwards to the server from its own socket
//! and sends the server's packets back to the client's latest source address.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest UDP payload relayed.
const MAX_DATAGRAM: usize = 65_535;

/// What one direction of the link does to packets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkProfile {
    /// Probability of dropping a packet, 0.0..=1.0.
    pub drop: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..jitter` per packet.
    pub jitter: Duration,
    /// Probability of holding a packet back by `reorder_delay` so later ones overtake it.
    pub reorder: f64,
    /// How long a reordered packet is held back.
    pub reorder_delay: Duration,
    /// Probability of sending a packet twice.
    pub duplicate: f64,
    /// Blackhole windows `(start, length)`, measured from the start of the simulator: every
    /// packet in a window is lost.
    pub blackholes: Vec<(Duration, Duration)>,
    /// Largest UDP payload the link carries, bytes (a path MTU less the IP and UDP headers);
    /// larger datagrams are lost, as where a router may not fragment. `None`: no limit.
    pub max_datagram: Option<usize>,
}

impl LinkProfile {
    /// A perfect link.
    pub fn clean() -> Self {
        LinkProfile::default()
    }

    /// Loss, delay and reordering of a bad WAN path.
    pub fn lossy(drop: f64, delay: Duration) -> Self {
        LinkProfile {
            drop,
            delay,
            jitter: delay / 4,
            reorder: 0.05,
            reorder_delay: delay / 2 + Duration::from_millis(1),
            ..LinkProfile::default()
        }
    }
}

/// What one direction did, so far.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Packets received from the sender.
    pub received: AtomicU64,
    /// Packets delivered (duplicates included).
    pub delivered: AtomicU64,
    /// Packets dropped at random.
    pub dropped: AtomicU64,
    /// Packets lost in a blackhole.
    pub blackholed: AtomicU64,
    /// Packets held back to be reordered.
    pub reordered: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Packets lost for being larger than `max_datagram` (not counted in `received`).
    pub too_big: AtomicU64,
}

impl LinkCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One direction's shared state.
#[derive(Debug)]
struct Direction {
    profile: LinkProfile,
    counters: LinkCounters,
    blackhole: AtomicBool,
    /// How many of the next datagrams that begin with a QUIC v1 Initial packet to lose
    /// (counted as blackholed).
    drop_initials: AtomicU64,
}

impl Direction {
    fn new(profile: LinkProfile) -> Arc<Self> {
        Arc::new(Direction {
            profile,
            counters: LinkCounters::default(),
            blackhole: AtomicBool::new(false),
            drop_initials: AtomicU64::new(0),
        })
    }
}

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct LinkSim {
    addr: SocketAddr,
    front: Arc<UdpSocket>,
    server: SocketAddr,
    client: Arc<Mutex<Option<SocketAddr>>>,
    forward: Arc<Direction>,
    backward: Arc<Direction>,
    start: Instant,
    seed: u64,
    /// The relay tasks; replaced as a whole by [`LinkSim::rebind_nat`].
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for LinkSim {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|p| p.into_inner());
        for task in tasks.iter() {
            task.abort();
        }
    }
}

/// Where delivered packets go: a fixed server, or the client's latest address.
#[derive(Clone)]
enum Dest {
    Fixed(SocketAddr),
    Latest(Arc<Mutex<Option<SocketAddr>>>),
}

impl Dest {
    fn get(&self) -> Option<SocketAddr> {
        match self {
            Dest::Fixed(a) => Some(*a),
            Dest::Latest(a) => *a.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

struct Queued {
    at: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

async fn udp(addr: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let config = crate::TransportConfig::default();
    let socket = crate::endpoint::bind_udp(addr, &config).map_err(std::io::Error::other)?;
    Ok(Arc::new(UdpSocket::from_std(socket)?))
}

impl LinkSim {
    /// Starts a relay on 127.0.0.1 toward `server`, with `forward` applied to client→server
    /// packets and `backward` to server→client packets, all randomness drawn from `seed`.
    pub async fn start(
        server: SocketAddr,
        forward: LinkProfile,
        backward: LinkProfile,
        seed: u64,
    ) -> std::io::Result<Self> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let front = udp(loopback).await?;
        let back = udp(loopback).await?;
        let sim = LinkSim {
            addr: front.local_addr()?,
            front,
            server,
            client: Arc::new(Mutex::new(None)),
            forward: Direction::new(forward),
            backward: Direction::new(backward),
            start: Instant::now(),
            seed,
            tasks: Mutex::new(Vec::new()),
        };
        sim.spawn(back, seed);
        Ok(sim)
    }

    /// Starts both directions' tasks with `back` as the socket facing the server.
    fn spawn(&self, back: Arc<UdpSocket>, seed: u64) {
        let mut tasks = Vec::new();
        tasks.extend(relay(
            self.front.clone(),
            back.clone(),
            Dest::Fixed(self.server),
            Some(self.client.clone()),
            self.forward.clone(),
            self.start,
            seed,
        ));
        tasks.extend(relay(
            back,
            self.front.clone(),
            Dest::Latest(self.client.clone()),
            None,
            self.backward.clone(),
            self.start,
            seed ^ 0x9e37_79b9_7f4a_7c15,
        ));
        let mut current = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for task in current.drain(..) {
            task.abort();
        }
        *current = tasks;
    }

    /// A NAT rebinding: from now on the server sees the client's packets come from a new
    /// source port (the relay's new socket), while the client keeps its own address. Packets
    /// still inside the relay are lost, as they would be at a NAT that forgot the mapping.
    pub async fn rebind_nat(&self) -> std::io::Result<()> {
        let back = udp(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        self.spawn(back, self.seed.rotate_left(17) ^ 0x5bd1_e995);
        Ok(())
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Turns the blackhole on or off in both directions, now.
    pub fn set_blackhole(&self, on: bool) {
        self.forward.blackhole.store(on, Ordering::Relaxed);
        self.backward.blackhole.store(on, Ordering::Relaxed);
    }

    /// Loses the next `n` client→server datagrams that begin with a QUIC v1 Initial packet
    /// (RFC 9000 §17.2.2: long header, type 0), whenever they come, counted as blackholed: a
    /// loss placed on a handshake, not on a time.
    pub fn drop_next_initials(&self, n: u64) {
        self.forward.drop_initials.store(n, Ordering::Relaxed);
    }

    /// Client→server counters.
    pub fn forward(&self) -> &LinkCounters {
        &self.forward.counters
    }

    /// Server→client counters.
    pub fn backward(&self) -> &LinkCounters {
        &self.backward.counters
    }
}

/// Spawns the receive and the delivery task of one direction.
fn relay(
    from: Arc<UdpSocket>,
    to: Arc<UdpSocket>,
    dest: Dest,
    learn: Option<Arc<Mutex<Option<SocketAddr>>>>,
    dir: Arc<Direction>,
    start: Instant,
    seed: u64,
) -> [JoinHandle<()>; 2] {
    let (tx, rx) = mpsc::unbounded_channel();
    let deliver = tokio::spawn(deliver(to, dest, rx, dir.clone()));
    let receive = tokio::spawn(receive(from, learn, dir, start, seed, tx));
    [deliver, receive]
}

async fn receive(
    from: Arc<UdpSocket>,
    learn: Option<Arc<Mutex<Option<SocketAddr>>>>,
    dir: Arc<Direction>,
    start: Instant,
    seed: u64,
    tx: mpsc::UnboundedSender<Queued>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    while let Ok((n, src)) = from.recv_from(&mut buf).await {
        if let Some(client) = &learn {
            *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(src);
        }
        let now = Instant::now();
        if dir.profile.max_datagram.is_some_and(|max| n > max) {
            LinkCounters::bump(&dir.counters.too_big);
            continue;
        }
        let initial = buf
            .get(..n)
            .is_some_and(crate::initial_filter::is_v1_initial);
        for at in fate(&dir, &mut rng, now, now - start, initial) {
            seq += 1;
            if tx
                .send(Queued {
                    at,
                    seq,
                    packet: buf[..n].to_vec(),
                })
                .is_err()
            {
                return;
            }
        }
    }
}

/// Decides what happens to one packet: the delivery times of its copies (none if lost).
/// `initial`: the datagram begins with a QUIC v1 Initial packet.
fn fate(
    dir: &Direction,
    rng: &mut StdRng,
    now: Instant,
    elapsed: Duration,
    initial: bool,
) -> Vec<Instant> {
    let p = &dir.profile;
    let c = &dir.counters;
    LinkCounters::bump(&c.received);
    let scheduled = p
        .blackholes
        .iter()
        .any(|(s, len)| elapsed >= *s && elapsed < *s + *len);
    // An Initial lost anyway does not use up the count.
    let lost = scheduled || dir.blackhole.load(Ordering::Relaxed);
    let marked = !lost
        && initial
        && dir
            .drop_initials
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
    if lost || marked {
        LinkCounters::bump(&c.blackholed);
        return Vec::new();
    }
    if rng.random_bool(p.drop.clamp(0.0, 1.0)) {
        LinkCounters::bump(&c.dropped);
        return Vec::new();
    }
    let mut at = now + p.delay + p.jitter.mul_f64(rng.random::<f64>());
    if rng.random_bool(p.reorder.clamp(0.0, 1.0)) {
        LinkCounters::bump(&c.reordered);
        at += p.reorder_delay;
    }
    let mut copies = vec![at];
    if rng.random_bool(p.duplicate.clamp(0.0, 1.0)) {
        LinkCounters::bump(&c.duplicated);
        copies.push(at + p.jitter.mul_f64(rng.random::<f64>()));
    }
    copies
}

async fn deliver(
    to: Arc<UdpSocket>,
    dest: Dest,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    dir: Arc<Direction>,
) {
    let mut queue: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    loop {
        let next = queue.peek().map(|Reverse(q)| q.at);
        tokio::select! {
            item = rx.recv() => match item {
                Some(q) => queue.push(Reverse(q)),
                None => return,
            },
            () = sleep_until(next) => {
                let now = Instant::now();
                while queue.peek().is_some_and(|Reverse(q)| q.at <= now) {
                    let Some(Reverse(q)) = queue.pop() else { break };
                    if let Some(addr) = dest.get() {
                        // A full socket buffer is one more lost packet, as on a real link.
                        if to.send_to(&q.packet, addr).await.is_ok() {
                            LinkCounters::bump(&dir.counters.delivered);
                        }
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
