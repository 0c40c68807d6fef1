//! A user-space link emulator over TUN devices: each of two namespaces gets a TUN device
//! (created with the `tun` crate from a thread inside the namespace, so the device and its
//! address live there), and this process relays IP packets between them, TCP and UDP alike:
//! one-way delay, a rate limit with a drop-tail queue, random or bursty (Gilbert–Elliott) loss
//! and reordering (an extra delay for a few packets), all decided by a seeded RNG. Delay, rate
//! and loss can change while the link runs; per-direction counters report what was delivered
//! and how long the bottleneck queue grew. The kernel here has no netem.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};

use crate::netns::in_ns;

/// Link properties, one direction.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinkParams {
    pub one_way_delay_ms: f64,
    pub rate_mbit_s: f64,
    pub queue_bytes: usize,
    /// Extra delay of a reordered packet.
    pub reorder_extra_ms: f64,
}

/// Loss and reorder probabilities in parts per million, the mean loss burst length in packets
/// (0 or 1: independent losses), the one-way delay and the rate: changeable while the link
/// runs. Counters per direction (0: a → b, 1: b → a).
#[derive(Default)]
pub struct Knobs {
    pub loss_ppm: AtomicU32,
    pub reorder_ppm: AtomicU32,
    pub mean_burst: AtomicU32,
    pub one_way_delay_us: AtomicU32,
    pub rate_kbit_s: AtomicU32,
    /// The drop-tail queue's capacity, bytes.
    pub queue_bytes: AtomicU64,
    /// Bytes written to the receiving side.
    pub delivered: [AtomicU64; 2],
    /// Longest queueing delay at the bottleneck since last read (`take_queue_max`), µs.
    pub queue_max_us: [AtomicU64; 2],
}

impl Knobs {
    /// The longest queueing delay in direction `dir` since the last call.
    pub fn take_queue_max(&self, dir: usize) -> Duration {
        Duration::from_micros(self.queue_max_us[dir].swap(0, Ordering::Relaxed))
    }
}

/// Loss decisions: independent per packet, or the Gilbert–Elliott two-state chain (every
/// packet lost in the bad state) with the same long-run loss rate and a mean burst length.
#[derive(Default)]
struct LossChain {
    bad: bool,
}

impl LossChain {
    fn lose(&mut self, rng: &mut StdRng, loss_ppm: u32, mean_burst: u32) -> bool {
        if mean_burst <= 1 {
            return rng.random_range(0..1_000_000) < loss_ppm;
        }
        // Bad → good with 1 / burst, good → bad with p such that p / (p + r) = loss.
        let (loss, r) = (f64::from(loss_ppm) / 1e6, 1.0 / f64::from(mean_burst));
        let p = if loss >= 1.0 {
            1.0
        } else {
            loss * r / (1.0 - loss)
        };
        self.bad = if self.bad {
            !rng.random_bool(r)
        } else {
            rng.random_bool(p.clamp(0.0, 1.0))
        };
        self.bad
    }
}

pub struct LinkEmu {
    pub knobs: Arc<Knobs>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Each namespace (held open, so it outlives `ip netns del`) and the peer address to wake.
    wake: Vec<(std::fs::File, String)>,
}

type Dev = Arc<tun::Device>;

impl LinkEmu {
    /// TUN devices `name` in namespaces `a` (address `a_ip`) and `b` (`b_ip`), /24, MTU 1500.
    pub fn start(
        name: &str,
        (a, a_ip): (&str, &str),
        (b, b_ip): (&str, &str),
        params: &LinkParams,
        seed: u64,
    ) -> anyhow::Result<LinkEmu> {
        let da = open_tun(a, name, a_ip)?;
        let db = open_tun(b, name, b_ip)?;
        let open = |ns: &str| std::fs::File::open(format!("/var/run/netns/{ns}"));
        let wake = vec![(open(a)?, b_ip.to_owned()), (open(b)?, a_ip.to_owned())];
        let knobs = Arc::new(Knobs::default());
        let stop = Arc::new(AtomicBool::new(false));
        let emu_knobs = knobs.clone();
        let mut threads = Vec::new();
        for (i, (src, dst)) in [(da.clone(), db.clone()), (db, da)].into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let (k, s, p) = (knobs.clone(), stop.clone(), params.clone());
            let rng = StdRng::seed_from_u64(seed + i as u64);
            threads.push(std::thread::spawn(move || {
                ingress(i, &src, &p, &k, &s, rng, &tx)
            }));
            let (k, s) = (knobs.clone(), stop.clone());
            threads.push(std::thread::spawn(move || egress(i, &dst, &rx, &k, &s)));
        }
        let emu = LinkEmu {
            knobs: emu_knobs,
            stop,
            threads,
            wake,
        };
        emu.set_delay(Duration::from_secs_f64(params.one_way_delay_ms / 1000.0));
        emu.set_rate(params.rate_mbit_s);
        emu.set_queue(params.queue_bytes);
        Ok(emu)
    }

    /// Loss at `loss_ppm` in bursts of `mean_burst` packets on average (1: independent).
    pub fn set_loss(&self, loss_ppm: u32, mean_burst: u32, reorder_ppm: u32) {
        self.knobs.loss_ppm.store(loss_ppm, Ordering::Relaxed);
        self.knobs.mean_burst.store(mean_burst, Ordering::Relaxed);
        self.knobs.reorder_ppm.store(reorder_ppm, Ordering::Relaxed);
    }

    /// One-way delay, each direction.
    pub fn set_delay(&self, one_way: Duration) {
        let us = u32::try_from(one_way.as_micros()).unwrap_or(u32::MAX);
        self.knobs.one_way_delay_us.store(us, Ordering::Relaxed);
    }

    /// Drop-tail queue capacity, bytes, each direction.
    pub fn set_queue(&self, bytes: usize) {
        self.knobs
            .queue_bytes
            .store(bytes as u64, Ordering::Relaxed);
    }

    /// Bottleneck rate, each direction.
    pub fn set_rate(&self, mbit_s: f64) {
        self.knobs
            .rate_kbit_s
            .store((mbit_s * 1000.0) as u32, Ordering::Relaxed);
    }
}

impl Drop for LinkEmu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A blocked TUN read returns only when a packet comes: send one each way, from inside
        // each namespace (entered through the handle kept open, the name may be gone).
        std::thread::scope(|scope| {
            for (ns, peer) in &self.wake {
                scope.spawn(move || {
                    if nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                        let s = std::net::UdpSocket::bind("0.0.0.0:0");
                        let _ = s.and_then(|s| s.send_to(b"stop", format!("{peer}:9")));
                    }
                });
            }
        });
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn open_tun(ns: &str, name: &str, ip: &str) -> anyhow::Result<Dev> {
    let (name, ip) = (name.to_owned(), ip.parse::<std::net::Ipv4Addr>()?);
    in_ns(ns, move || {
        let mut config = tun::Configuration::default();
        config
            .tun_name(&name)
            .address(ip)
            .netmask((255, 255, 255, 0))
            .mtu(1500)
            .up();
        let dev = tun::create(&config).with_context(|| format!("creating TUN {name}"))?;
        Ok(Arc::new(dev))
    })
}

/// A packet due at a time; the heap pops the earliest first.
struct Due(Instant, u64, Vec<u8>);

impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}

/// Reads packets from `src` (direction `dir`), decides their fate, sends survivors with their
/// due time.
fn ingress(
    dir: usize,
    src: &Dev,
    p: &LinkParams,
    k: &Knobs,
    stop: &AtomicBool,
    mut rng: StdRng,
    tx: &mpsc::Sender<Due>,
) {
    let extra = Duration::from_secs_f64(p.reorder_extra_ms / 1000.0);
    let mut free_at = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u64;
    let mut chain = LossChain::default();
    while !stop.load(Ordering::Relaxed) {
        let Ok(n) = src.recv(&mut buf) else { return };
        let now = Instant::now();
        let delay = Duration::from_micros(k.one_way_delay_us.load(Ordering::Relaxed).into());
        let ns_per_byte = 8e6 / f64::from(k.rate_kbit_s.load(Ordering::Relaxed).max(1));
        free_at = free_at.max(now);
        let backlog = free_at.duration_since(now);
        k.queue_max_us[dir].fetch_max(backlog.as_micros() as u64, Ordering::Relaxed);
        let queued = backlog.as_nanos() as f64 / ns_per_byte;
        let (loss, burst) = (
            k.loss_ppm.load(Ordering::Relaxed),
            k.mean_burst.load(Ordering::Relaxed),
        );
        let capacity = k.queue_bytes.load(Ordering::Relaxed) as f64;
        if queued > capacity || chain.lose(&mut rng, loss, burst) {
            continue;
        }
        free_at += Duration::from_nanos((n as f64 * ns_per_byte) as u64);
        let mut due = free_at + delay;
        if rng.random_range(0..1_000_000) < k.reorder_ppm.load(Ordering::Relaxed) {
            due += extra;
        }
        seq += 1;
        if tx.send(Due(due, seq, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Writes packets to `dst` (direction `dir`) when due.
fn egress(dir: usize, dst: &Dev, rx: &mpsc::Receiver<Due>, k: &Knobs, stop: &AtomicBool) {
    let mut heap = BinaryHeap::new();
    while !stop.load(Ordering::Relaxed) {
        let wait = heap.peek().map_or(Duration::from_millis(100), |d: &Due| {
            d.0.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(d) => heap.push(d),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|d| d.0 <= now) {
            if let Some(d) = heap.pop() {
                if dst.send(&d.2).is_ok() {
                    k.delivered[dir].fetch_add(d.2.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}
