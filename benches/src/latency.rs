//! Scenario 2, request latency: small HTTP/1.1 requests (GET, 100-byte response) at fixed rates
//! over 16 keep-alive connections, open loop: each request has an intended send time on a fixed
//! schedule, and its latency counts from that time whenever the previous response on its
//! connection held it back, so a stall shows in the tail instead of slowing the load (no
//! coordinated omission). When the request was sent on time, latency counts from the actual send
//! (tokio's 1 ms timer wheel would otherwise add its own lateness). Added percentiles over direct,
//! proxy CPU (vCPU per 1,000 rps) and RSS from /proc; /dev/cpu_dma_latency held at 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lab::{find, Lab, Route, Target};
use crate::netns::{block_in, DmaLatency};
use crate::stats::{cpu_of, rss_bytes, wakeups_of, Machine, Percentiles};

const CONNS: usize = 16;
const RATES: [u32; 2] = [1000, 5000];
const RUN: Duration = Duration::from_secs(6);
const WARMUP: Duration = Duration::from_secs(1);
const ROUTES: [Route; 5] = [
    Route::Direct,
    Route::Stunnel,
    Route::H2Tunnel,
    Route::HalyardL4,
    Route::HalyardL7,
];
const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nhost: server\r\nuser-agent: halyard-bench\r\n\r\n";

#[derive(Debug, Serialize)]
struct Row {
    route: Route,
    rps: u32,
    achieved_rps: f64,
    latency: Percentiles,
    vcpu_per_1000_rps: f64,
    /// Voluntary context switches of both proxy processes per request: how many times a
    /// request woke a proxy up.
    wakeups_per_request: f64,
    proxy_rss_mib: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    dma_latency_held: bool,
    connections: usize,
    seconds: f64,
    /// Halyard's `[transport] congestion` in this run.
    congestion: String,
    rows: Vec<Row>,
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    let lab = Lab::up("hb2", 2)?;
    let dma = DmaLatency::hold();
    let mut rows = Vec::new();
    // The paths named in HALYARD_BENCH_ROUTES (all when unset); an unknown name is refused.
    let only = crate::lab::routes_asked(&ROUTES)?;
    for rps in RATES {
        for route in only.clone().unwrap_or(ROUTES.to_vec()) {
            rows.push(run(&lab, route, rps)?);
        }
    }
    let report = Report {
        machine: Machine::probe(),
        dma_latency_held: dma.held(),
        connections: CONNS,
        seconds: RUN.as_secs_f64(),
        congestion: lab.congestion().to_owned(),
        rows,
    };
    drop(dma);
    if only.is_some() {
        // A partial run never replaces the committed report: its table goes to stdout.
        println!("{}", markdown(&report));
        return Ok(());
    }
    crate::stats::write_report("latency", &markdown(&report), &report)
}

fn run(lab: &Lab, route: Route, rps: u32) -> anyhow::Result<Row> {
    let addr = lab.addr(route, Target::Http);
    let pids = lab.pids(route);
    // CPU seconds and wake-ups of the proxies between the two marks.
    let used = std::sync::Arc::new(std::sync::Mutex::new((0.0, 0)));
    let (used2, pids2) = (used.clone(), pids.clone());
    let mark = move |start: bool| {
        if let Ok(mut u) = used2.lock() {
            let now = (cpu_of(&pids2), wakeups_of(&pids2));
            *u = if start {
                now
            } else {
                (now.0 - u.0, now.1.saturating_sub(u.1))
            };
        }
    };
    let samples = block_in(&lab.pair.a.name, move || open_loop(addr, rps, mark))?;
    let (cpu_s, woke) = used.lock().map_or((0.0, 0), |u| *u);
    let n = samples.len();
    let latency = Percentiles::of(samples);
    let achieved = n as f64 / RUN.as_secs_f64();
    let row = Row {
        route,
        rps,
        achieved_rps: achieved,
        latency,
        vcpu_per_1000_rps: cpu_s / RUN.as_secs_f64() / (achieved / 1000.0),
        wakeups_per_request: woke as f64 / (n.max(1) as f64),
        proxy_rss_mib: pids
            .iter()
            .map(|&p| rss_bytes(p) as f64 / 1048576.0)
            .collect(),
    };
    eprintln!(
        "latency {} @{rps}: p50 {:.0} p99 {:.0} p99.9 {:.0} µs, {:.3} vCPU/krps, {:.2} wake-ups/request",
        route.name(),
        row.latency.p50_us,
        row.latency.p99_us,
        row.latency.p999_us,
        row.vcpu_per_1000_rps,
        row.wakeups_per_request
    );
    Ok(row)
}

/// Warm-up, then RUN of scheduled requests over CONNS connections; latencies in ns.
/// `mark(true)` is called when measuring starts, `mark(false)` when it ends.
async fn open_loop(addr: SocketAddr, rps: u32, mark: impl Fn(bool)) -> anyhow::Result<Vec<u64>> {
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let mut c = Conn::open(addr).await?;
        c.request().await?;
        conns.push(c);
    }
    let interval = Duration::from_secs_f64(CONNS as f64 / f64::from(rps));
    let warm_end = Instant::now() + WARMUP;
    let local = tokio::task::LocalSet::new();
    let all = local
        .run_until(async move {
            let mut set = tokio::task::JoinSet::new();
            for (i, c) in conns.into_iter().enumerate() {
                let first = warm_end - WARMUP + interval.mul_f64(i as f64 / CONNS as f64);
                set.spawn_local(c.schedule(first, interval, warm_end));
            }
            tokio::time::sleep_until(warm_end.into()).await;
            mark(true);
            let mut all = Vec::new();
            while let Some(r) = set.join_next().await {
                all.extend(r??);
            }
            mark(false);
            anyhow::Ok(all)
        })
        .await?;
    Ok(all)
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends requests at `first + k × interval` until warm-up plus RUN is over; latencies of
    /// those intended after `measure_from`.
    async fn schedule(
        mut self,
        first: Instant,
        interval: Duration,
        measure_from: Instant,
    ) -> anyhow::Result<Vec<u64>> {
        let end = measure_from + RUN;
        let mut out = Vec::new();
        let mut intended = first;
        while intended < end {
            let late = Instant::now() >= intended;
            tokio::time::sleep_until(intended.into()).await;
            let from = if late { intended } else { Instant::now() };
            self.request().await?;
            if intended >= measure_from {
                out.push(from.elapsed().as_nanos() as u64);
            }
            intended += interval;
        }
        Ok(out)
    }

    /// One request and its whole response (Content-Length or chunked).
    async fn request(&mut self) -> anyhow::Result<()> {
        self.s.write_all(REQUEST).await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("unexpected response: {}", head.lines().next().unwrap_or(""));
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>())
            .transpose()?;
        let body_end = match len {
            Some(n) => {
                while self.buf.len() < head_end + n {
                    self.fill().await?;
                }
                head_end + n
            }
            None => loop {
                if let Some(i) = find(&self.buf[head_end..], b"0\r\n\r\n") {
                    break head_end + i + 5;
                }
                self.fill().await?;
            },
        };
        self.buf.drain(..body_end);
        Ok(())
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.s.read(&mut chunk).await.context("reading response")?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn markdown(r: &Report) -> String {
    let mut md = String::from("# Scenario 2: request latency at fixed rates (open loop)\n\n");
    md += &r.machine.markdown();
    md += &format!(
        "\nHTTP/1.1 GET with a 100-byte response over {} keep-alive connections, {} s measured after 1 s warm-up, \
         open loop (latency from the intended send time when the previous response held a request back). \
         Namespaces a/b joined by a veth pair. /dev/cpu_dma_latency held at 0: {}. \
         Added = path minus direct at the same percentile. vCPU per 1,000 rps: utime+stime of both proxy processes \
         over the run. Wake-ups/req: voluntary context switches of both proxy processes per request (how often a request put a proxy to sleep and woke it; not for stunnel, whose per-connection threads exit before they are counted). RSS: client-side, server-side proxy at the end of the run. Halyard's `[transport] congestion`: \
         `{}` (`HALYARD_BENCH_CONGESTION` sets another; `HALYARD_BENCH_ROUTES=direct,halyard-l4` runs only the paths named and prints the table instead of writing this report).\n\n",
        r.connections, r.seconds, r.dma_latency_held, r.congestion
    );
    md += "| rps | path | achieved | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 | added p90 | added p99 | added p99.9 | vCPU/1k rps | vs stunnel | vs h2-tunnel | wake-ups/req | RSS MiB |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in &r.rows {
        md += &row_md(r, row);
    }
    md
}

fn row_md(r: &Report, row: &Row) -> String {
    let base = |route| r.rows.iter().find(|x| x.route == route && x.rps == row.rps);
    let d = base(Route::Direct)
        .map(|x| x.latency.clone())
        .unwrap_or_default();
    let l = &row.latency;
    let cpu_ratio = |route| {
        base(route)
            .filter(|b| b.vcpu_per_1000_rps > 0.0 && row.route != Route::Direct)
            .map_or("–".to_owned(), |b| {
                format!("{:.2}×", row.vcpu_per_1000_rps / b.vcpu_per_1000_rps)
            })
    };
    let rss = row
        .proxy_rss_mib
        .iter()
        .map(|m| format!("{m:.1}"))
        .collect::<Vec<_>>()
        .join(" / ");
    let cpu = if row.route == Route::Direct {
        "–".into()
    } else {
        format!("{:.3}", row.vcpu_per_1000_rps)
    };
    // stunnel serves each connection on a thread that exits with it, before the count is read.
    let woke = if matches!(row.route, Route::Direct | Route::Stunnel) {
        "–".into()
    } else {
        format!("{:.2}", row.wakeups_per_request)
    };
    format!(
        "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {:+.0} | {:+.0} | {} | {} | {} | {} | {} |\n",
        row.rps, row.route.name(), row.achieved_rps, l.p50_us, l.p90_us, l.p99_us, l.p999_us,
        l.p50_us - d.p50_us, l.p90_us - d.p90_us, l.p99_us - d.p99_us, l.p999_us - d.p999_us,
        cpu, cpu_ratio(Route::Stunnel), cpu_ratio(Route::H2Tunnel), woke, if rss.is_empty() { "–".into() } else { rss }
    )
}
