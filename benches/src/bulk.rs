//! Scenario 1, bulk: 1 and 8 flows for a fixed time, Gbit/s delivered to the server app and
//! CPU-seconds per GB of the two proxy processes; then 1-byte and 100-byte ping-pong over one
//! connection (p50/p99 round trip), with /dev/cpu_dma_latency held at 0. Halyard runs once with
//! each congestion controller (the lab's, the product default unless `HALYARD_BENCH_CONGESTION`
//! says otherwise, then the other), so the two compare on a clean link in one run, then with
//! `workers` = 2, 4, … up to the cores of the machine (8 flows and the 1-byte ping-pong, the
//! product's default controller), beside `workers = 1`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lab::{Lab, Route, Target};
use crate::netns::{block_in, DmaLatency};
use crate::stats::{cpu_of, Machine, Percentiles};

const BULK_TIME: Duration = Duration::from_secs(3);
const BULK_RUNS: usize = 3;
const PING_WARMUP: usize = 300;
const PING_ITERS: usize = 5000;

#[derive(Debug, Serialize)]
struct Bulk {
    route: Route,
    /// The Halyard sidecars' `[transport] congestion`; `None` for the other paths.
    congestion: Option<String>,
    /// The Halyard sidecars' `workers`; `None` for the other paths.
    workers: Option<usize>,
    flows: usize,
    gbit_s: f64,
    proxy_cpu_s_per_gb: f64,
}

#[derive(Debug, Serialize)]
struct Ping {
    route: Route,
    /// The Halyard sidecars' `[transport] congestion`; `None` for the other paths.
    congestion: Option<String>,
    /// The Halyard sidecars' `workers`; `None` for the other paths.
    workers: Option<usize>,
    bytes: usize,
    rtt: Percentiles,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    dma_latency_held: bool,
    bulk_seconds: f64,
    bulk_runs: usize,
    bulk: Vec<Bulk>,
    ping_iters: usize,
    ping: Vec<Ping>,
}

/// Bulk with each of `flows`, then ping-pong with each of `sizes` bytes, over each of `routes`.
fn run_paths(
    lab: &Lab,
    routes: &[Route],
    (flow_counts, sizes): (&[usize], &[usize]),
    bulk: &mut Vec<Bulk>,
    ping: &mut Vec<Ping>,
) -> anyhow::Result<()> {
    for &flows in flow_counts {
        for &route in routes {
            bulk.push(run_bulk(lab, route, flows)?);
        }
    }
    let _dma = DmaLatency::hold();
    for &bytes in sizes {
        for &route in routes {
            let rtt = run_ping(lab, route, bytes)?;
            ping.push(Ping {
                route,
                congestion: congestion_of(lab, route),
                workers: workers_of(lab, route),
                bytes,
                rtt,
            });
        }
    }
    Ok(())
}

fn is_halyard(route: Route) -> bool {
    matches!(route, Route::HalyardL4 | Route::HalyardL7)
}

/// The congestion controller of a Halyard path, as a label.
fn congestion_of(lab: &Lab, route: Route) -> Option<String> {
    is_halyard(route).then(|| lab.congestion().to_owned())
}

/// The `workers` of a Halyard path.
fn workers_of(lab: &Lab, route: Route) -> Option<usize> {
    is_halyard(route).then(|| lab.workers())
}

/// `halyard-l4 (bbr)`, `halyard-l4 (cubic, workers 2)`, or the plain path name.
fn label(route: Route, congestion: &Option<String>, workers: Option<usize>) -> String {
    match (congestion, workers) {
        (Some(c), Some(w)) if w != 1 => format!("{} ({c}, workers {w})", route.name()),
        (Some(c), _) => format!("{} ({c})", route.name()),
        _ => route.name().to_owned(),
    }
}

/// The congestion controller of the `workers` comparison: the product's default.
fn workers_congestion() -> &'static str {
    halyard_transport::Congestion::default().as_str()
}

/// The `workers` settings compared with 1: 2, 4, … while the machine has that many cores, and
/// 2 on any machine.
fn worker_counts() -> Vec<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = vec![2];
    while out.last().is_some_and(|&w| w * 2 <= cores) {
        out.push(out.last().map_or(2, |w| w * 2));
    }
    out
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    let mut lab = Lab::up("hb1", 1)?;
    let (mut bulk, mut ping) = (Vec::new(), Vec::new());
    let all = (&[1, 8][..], &[1, 100][..]);
    run_paths(&lab, &Route::L4, all, &mut bulk, &mut ping)?;
    let other = if lab.congestion() == "bbr" {
        "cubic"
    } else {
        "bbr"
    };
    lab.restart_halyard(other)?;
    run_paths(&lab, &[Route::HalyardL4], all, &mut bulk, &mut ping)?;
    for workers in worker_counts() {
        lab.restart_halyard_with(workers_congestion(), workers)?;
        let some = (&[8][..], &[1][..]);
        run_paths(&lab, &[Route::HalyardL4], some, &mut bulk, &mut ping)?;
    }
    let report = Report {
        machine: Machine::probe(),
        dma_latency_held: DmaLatency::hold().held(),
        bulk_seconds: BULK_TIME.as_secs_f64(),
        bulk_runs: BULK_RUNS,
        bulk,
        ping_iters: PING_ITERS,
        ping,
    };
    crate::stats::write_report("bulk", &markdown(&report), &report)
}

fn run_bulk(lab: &Lab, route: Route, flows: usize) -> anyhow::Result<Bulk> {
    let addr = lab.addr(route, Target::Sink);
    let pids = lab.pids(route);
    let mut runs = Vec::new();
    for _ in 0..BULK_RUNS {
        let cpu0 = cpu_of(&pids);
        let (bytes, secs) = block_in(&lab.pair.a.name, move || bulk_flows(addr, flows))?;
        let cpu = cpu_of(&pids) - cpu0;
        runs.push((bytes as f64 * 8.0 / secs / 1e9, cpu / (bytes as f64 / 1e9)));
    }
    runs.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (gbit_s, proxy_cpu_s_per_gb) = runs[runs.len() / 2];
    eprintln!(
        "bulk {} x{flows}: {gbit_s:.2} Gbit/s, {proxy_cpu_s_per_gb:.2} CPU-s/GB",
        label(route, &congestion_of(lab, route), workers_of(lab, route))
    );
    Ok(Bulk {
        route,
        congestion: congestion_of(lab, route),
        workers: workers_of(lab, route),
        flows,
        gbit_s,
        proxy_cpu_s_per_gb,
    })
}

/// `flows` connections each writing for BULK_TIME; bytes the sink counted and seconds taken.
pub(crate) async fn bulk_flows(addr: SocketAddr, flows: usize) -> anyhow::Result<(u64, f64)> {
    let start = Instant::now();
    let deadline = start + BULK_TIME;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..flows {
        set.spawn(one_bulk(addr, deadline));
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

async fn one_bulk(addr: SocketAddr, deadline: Instant) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect(addr).await?;
    let buf = vec![0x5au8; 256 << 10];
    while Instant::now() < deadline {
        s.write_all(&buf).await?;
    }
    s.shutdown().await?;
    Ok(s.read_u64().await?)
}

fn run_ping(lab: &Lab, route: Route, bytes: usize) -> anyhow::Result<Percentiles> {
    let addr = lab.addr(route, Target::Echo);
    let samples = block_in(&lab.pair.a.name, move || ping(addr, bytes))?;
    let p = Percentiles::of(samples);
    eprintln!(
        "ping {} {bytes} B: p50 {:.1} µs p99 {:.1} µs",
        label(route, &congestion_of(lab, route), workers_of(lab, route)),
        p.p50_us,
        p.p99_us
    );
    Ok(p)
}

pub(crate) async fn ping(addr: SocketAddr, bytes: usize) -> anyhow::Result<Vec<u64>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let out = vec![7u8; bytes];
    let mut back = vec![0u8; bytes];
    let mut samples = Vec::with_capacity(PING_ITERS);
    for i in 0..PING_WARMUP + PING_ITERS {
        let t = Instant::now();
        s.write_all(&out).await?;
        s.read_exact(&mut back).await?;
        if i >= PING_WARMUP {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(samples)
}

fn ratio(x: f64, base: f64) -> String {
    if base > 0.0 && x > 0.0 {
        format!("{:.2}×", x / base)
    } else {
        "–".into()
    }
}

fn markdown(r: &Report) -> String {
    let mut md = String::from("# Scenario 1: bulk throughput and ping-pong\n\n");
    md += &r.machine.markdown();
    md += &format!(
        "\nTopology: client app + proxy in namespace a, server app + proxy in namespace b, one veth pair (MTU 1500). \
         Bulk: each flow writes 256 KiB buffers for {} s; Gbit/s is what the server app received, the median of {} runs. \
         CPU-s/GB: utime+stime of both proxy processes (/proc/PID/stat) per GB delivered.\n\n",
        r.bulk_seconds, r.bulk_runs
    );
    md += "| flows | path | Gbit/s | vs direct | vs stunnel | vs h2-tunnel | proxy CPU-s/GB | vs stunnel | vs h2-tunnel |\n|---|---|---|---|---|---|---|---|---|\n";
    for b in &r.bulk {
        let base = |route| {
            r.bulk
                .iter()
                .find(|x| x.route == route && x.flows == b.flows)
        };
        let (d, s, h) = (
            base(Route::Direct),
            base(Route::Stunnel),
            base(Route::H2Tunnel),
        );
        let g = |x: Option<&Bulk>| ratio(b.gbit_s, x.map_or(0.0, |x| x.gbit_s));
        let c = |x: Option<&Bulk>| {
            ratio(
                if b.route == Route::Direct {
                    0.0
                } else {
                    b.proxy_cpu_s_per_gb
                },
                x.map_or(0.0, |x| x.proxy_cpu_s_per_gb),
            )
        };
        let direct = b.route == Route::Direct;
        let cpu = if direct {
            "–".into()
        } else {
            format!("{:.2}", b.proxy_cpu_s_per_gb)
        };
        md += &format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} |\n",
            b.flows,
            label(b.route, &b.congestion, b.workers),
            b.gbit_s,
            g(d),
            g(s),
            g(h),
            cpu,
            c(s),
            c(h)
        );
    }
    let workers_congestion = workers_congestion();
    let same = |c: &Option<String>| c.as_deref() == Some(workers_congestion);
    let bulk_8 = |w: usize| {
        r.bulk
            .iter()
            .find(|b| b.flows == 8 && b.workers == Some(w) && same(&b.congestion))
    };
    let ping_1b = |w: usize| {
        r.ping
            .iter()
            .find(|p| p.bytes == 1 && p.workers == Some(w) && same(&p.congestion))
    };
    if let (Some(one), Some(one_ping)) = (bulk_8(1), ping_1b(1)) {
        md += &format!(
            "\n`workers` (halyard-l4, {workers_congestion}) against `workers = 1` in the same run: "
        );
        let mut parts = Vec::new();
        for b in r
            .bulk
            .iter()
            .filter(|b| b.flows == 8 && b.workers.is_some_and(|w| w > 1))
        {
            let w = b.workers.unwrap_or(1);
            let ping = ping_1b(w).map_or("–".to_owned(), |p| {
                ratio(p.rtt.p50_us, one_ping.rtt.p50_us)
            });
            parts.push(format!(
                "workers {w}: 8-flow Gbit/s {}, CPU-s/GB {}, 1 B p50 {ping}",
                ratio(b.gbit_s, one.gbit_s),
                ratio(b.proxy_cpu_s_per_gb, one.proxy_cpu_s_per_gb),
            ));
        }
        md += &parts.join("; ");
        md += ".\n";
    }
    md += &format!(
        "\nPing-pong: one connection, {} round trips after {PING_WARMUP} warm-up, TCP_NODELAY; /dev/cpu_dma_latency held at 0: {}.\n\n",
        r.ping_iters, r.dma_latency_held
    );
    md += "| bytes | path | p50 µs | p99 µs | p50 vs direct | p50 vs stunnel | p50 vs h2-tunnel |\n|---|---|---|---|---|---|---|\n";
    for p in &r.ping {
        let base = |route| {
            r.ping
                .iter()
                .find(|x| x.route == route && x.bytes == p.bytes)
                .map_or(0.0, |x| x.rtt.p50_us)
        };
        md += &format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {} |\n",
            p.bytes,
            label(p.route, &p.congestion, p.workers),
            p.rtt.p50_us,
            p.rtt.p99_us,
            ratio(p.rtt.p50_us, base(Route::Direct)),
            ratio(p.rtt.p50_us, base(Route::Stunnel)),
            ratio(p.rtt.p50_us, base(Route::H2Tunnel))
        );
    }
    md
}
