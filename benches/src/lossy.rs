//! Scenario 3, head-of-line blocking and bulk goodput under loss: the two namespaces are joined
//! by the user-space link emulator (TUN devices, 10 ms each way = 20 ms RTT, 100 Mbit/s with a
//! 250 KB drop-tail queue), at random loss 0, 0.5, 2 and 5 % each way (reordering 0.1 % with
//! +1 ms when lossy). Through each proxy pair at once: one bulk flow to the sink, and 50
//! request/response flows (100-byte echo) at 200 rps in total, open loop. Request p50/p99 and
//! bulk goodput. Halyard runs once per congestion controller (`bbr`, `cubic`), its sidecars
//! restarted in between. Then coexistence: one Halyard bulk flow and one stunnel (kernel TCP)
//! bulk flow share the clean link for 20 s, once per controller.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lab::{Lab, Route, Target};
use crate::linkemu::{LinkEmu, LinkParams};
use crate::netns::{block_in, Pair};
use crate::stats::{Machine, Percentiles};

const LOSS_PPM: [u32; 4] = [0, 5_000, 20_000, 50_000];
const CONGESTION: [&str; 2] = ["bbr", "cubic"];
const COEXIST: Duration = Duration::from_secs(20);
const REQ_FLOWS: usize = 50;
const RPS: f64 = 200.0;
const RUN: Duration = Duration::from_secs(8);
const RAMP: Duration = Duration::from_secs(1);
const SEED: u64 = 0x4a11_7a4d;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
struct Row {
    route: Route,
    /// Halyard's `[transport] congestion`; none for the other paths.
    congestion: Option<String>,
    loss_pct: f64,
    requests: Percentiles,
    failed_requests: usize,
    bulk_mbit_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    link: LinkParams,
    seed: u64,
    seconds: f64,
    tcp_congestion_control: String,
    rows: Vec<Row>,
    coexistence: Vec<Coexistence>,
}

/// One Halyard bulk flow beside one stunnel bulk flow on the same bottleneck.
#[derive(Debug, Serialize)]
struct Coexistence {
    congestion: String,
    seconds: f64,
    halyard_mbit_s: f64,
    stunnel_mbit_s: f64,
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    crate::setup::check_stunnel()?;
    let link = LinkParams {
        one_way_delay_ms: 10.0,
        rate_mbit_s: 100.0,
        queue_bytes: 250_000,
        reorder_extra_ms: 1.0,
    };
    let pair = Pair::bare("hb3", 3)?;
    let emu = LinkEmu::start(
        "hb3t",
        (&pair.a.name, &pair.a_ip),
        (&pair.b.name, &pair.b_ip),
        &link,
        SEED,
    )?;
    let cc = crate::netns::in_ns(&pair.a.name, || {
        Ok(
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")?
                .trim()
                .to_owned(),
        )
    })?;
    let mut lab = Lab::up_on(pair)?;
    let mut rows = Vec::new();
    let mut coexistence = Vec::new();
    for congestion in CONGESTION {
        lab.restart_halyard(congestion)?;
        for loss in LOSS_PPM {
            emu.set(loss, if loss > 0 { 1_000 } else { 0 });
            for route in Route::L4 {
                // The baselines run once, beside the first controller.
                if route == Route::HalyardL4 || congestion == CONGESTION[0] {
                    rows.push(run(&lab, route, loss)?);
                }
            }
        }
        emu.set(0, 0);
        coexistence.push(coexist(&lab)?);
    }
    drop(lab);
    drop(emu);
    let report = Report {
        machine: Machine::probe(),
        link,
        seed: SEED,
        seconds: RUN.as_secs_f64(),
        tcp_congestion_control: cc,
        rows,
        coexistence,
    };
    crate::stats::write_report("lossy", &markdown(&report), &report)
}

fn run(lab: &Lab, route: Route, loss_ppm: u32) -> anyhow::Result<Row> {
    let sink = lab.addr(route, Target::Sink);
    let echo = lab.addr(route, Target::Echo);
    let (samples, failed, bulk_bytes, secs) =
        block_in(&lab.pair.a.name, move || mixed(sink, echo))?;
    let row = Row {
        route,
        congestion: (route == Route::HalyardL4).then(|| lab.congestion().to_owned()),
        loss_pct: f64::from(loss_ppm) / 10_000.0,
        requests: Percentiles::of(samples),
        failed_requests: failed,
        bulk_mbit_s: bulk_bytes as f64 * 8.0 / secs / 1e6,
    };
    eprintln!(
        "lossy {} {}%: requests p50 {:.1} ms p99 {:.1} ms, bulk {:.1} Mbit/s",
        path_name(&row),
        row.loss_pct,
        row.requests.p50_us / 1000.0,
        row.requests.p99_us / 1000.0,
        row.bulk_mbit_s
    );
    // Let queues drain before the next path.
    std::thread::sleep(Duration::from_millis(500));
    Ok(row)
}

fn path_name(row: &Row) -> String {
    match &row.congestion {
        Some(cc) => format!("{} {cc}", row.route.name()),
        None => row.route.name().to_owned(),
    }
}

/// One bulk flow through Halyard and one through stunnel at once, for [`COEXIST`].
fn coexist(lab: &Lab) -> anyhow::Result<Coexistence> {
    let halyard = lab.addr(Route::HalyardL4, Target::Sink);
    let stunnel = lab.addr(Route::Stunnel, Target::Sink);
    let ((h, hs), (s, ss)) = block_in(&lab.pair.a.name, move || async move {
        let until = Instant::now() + COEXIST;
        let (a, b) = tokio::join!(bulk(halyard, until), bulk(stunnel, until));
        Ok((a?, b?))
    })?;
    let row = Coexistence {
        congestion: lab.congestion().to_owned(),
        seconds: COEXIST.as_secs_f64(),
        halyard_mbit_s: h as f64 * 8.0 / hs / 1e6,
        stunnel_mbit_s: s as f64 * 8.0 / ss / 1e6,
    };
    eprintln!(
        "coexistence {}: halyard {:.1} Mbit/s, stunnel {:.1} Mbit/s",
        row.congestion, row.halyard_mbit_s, row.stunnel_mbit_s
    );
    std::thread::sleep(Duration::from_millis(500));
    Ok(row)
}

/// The bulk flow and the request flows together; (latencies ns, failed, bulk bytes, seconds).
async fn mixed(sink: SocketAddr, echo: SocketAddr) -> anyhow::Result<(Vec<u64>, usize, u64, f64)> {
    let mut conns = Vec::new();
    for _ in 0..REQ_FLOWS {
        let mut s = TcpStream::connect(echo).await?;
        s.set_nodelay(true)?;
        round_trip(&mut s).await?;
        conns.push(s);
    }
    let start = Instant::now();
    let bulk = tokio::spawn(bulk(sink, start + RAMP + RUN));
    let measure_from = start + RAMP;
    let interval = Duration::from_secs_f64(REQ_FLOWS as f64 / RPS);
    let mut set = tokio::task::JoinSet::new();
    for (i, s) in conns.into_iter().enumerate() {
        let first = measure_from + interval.mul_f64(i as f64 / REQ_FLOWS as f64);
        set.spawn(requests(s, first, interval, measure_from + RUN));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    while let Some(r) = set.join_next().await {
        let (v, ok) = r?;
        all.extend(v);
        failed += usize::from(!ok);
    }
    let (bytes, secs) = bulk.await??;
    Ok((all, failed, bytes, secs))
}

async fn bulk(addr: SocketAddr, until: Instant) -> anyhow::Result<(u64, f64)> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    let buf = vec![0x5au8; 64 << 10];
    while Instant::now() < until {
        s.write_all(&buf).await?;
    }
    s.shutdown().await?;
    let n = tokio::time::timeout(Duration::from_secs(30), s.read_u64()).await??;
    Ok((n, start.elapsed().as_secs_f64()))
}

async fn round_trip(s: &mut TcpStream) -> anyhow::Result<()> {
    let out = [b'r'; 100];
    let mut back = [0u8; 100];
    s.write_all(&out).await?;
    s.read_exact(&mut back).await?;
    Ok(())
}

/// Open-loop requests at `first + k × interval` until `end`; latency from the intended time
/// when the previous response held the request back, else from the send. A request without an
/// answer after TIMEOUT counts as TIMEOUT and ends its flow (false).
async fn requests(
    mut s: TcpStream,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> (Vec<u64>, bool) {
    let mut out = Vec::new();
    let mut intended = first;
    while intended < end {
        let late = Instant::now() >= intended;
        tokio::time::sleep_until(intended.into()).await;
        let from = if late { intended } else { Instant::now() };
        let ok = matches!(
            tokio::time::timeout(TIMEOUT, round_trip(&mut s)).await,
            Ok(Ok(()))
        );
        out.push(from.elapsed().as_nanos() as u64);
        if !ok {
            return (out, false);
        }
        intended += interval;
    }
    (out, true)
}

fn markdown(r: &Report) -> String {
    let mut md =
        String::from("# Scenario 3: head-of-line blocking and bulk goodput under loss\n\n");
    md += &r.machine.markdown();
    md += &format!(
        "\nLink: user-space emulator over TUN devices between the two namespaces, {} ms each way (20 ms RTT), {} Mbit/s, \
         {} B drop-tail queue, random loss per packet each way as listed, reordering 0.1 % (+{} ms) when lossy; seed {:#x}. \
         Each path carries at once one bulk flow (client → server sink) and {REQ_FLOWS} request/response flows (100 B echo) \
         at {RPS} rps in total, open loop, {} s after a 1 s ramp. Every flow of a path shares the one peer pair: one QUIC \
         connection (Halyard), one TLS/TCP connection (h2-tunnel), a TLS/TCP connection per flow (stunnel). \
         Kernel TCP congestion control in the namespaces: {}. Halyard runs with `[transport] congestion = \"bbr\"` and \
         then `\"cubic\"` (sidecars restarted in between; the other paths measured once, during the `bbr` pass). A request \
         unanswered after {} s counts as {} s and ends its flow (failed flows).\n\n",
        r.link.one_way_delay_ms, r.link.rate_mbit_s, r.link.queue_bytes, r.link.reorder_extra_ms, r.seed, r.seconds,
        r.tcp_congestion_control, TIMEOUT.as_secs(), TIMEOUT.as_secs()
    );
    md += "| loss | path | req p50 ms | req p99 ms | p99 vs stunnel | p99 vs h2-tunnel | p99 vs halyard cubic | failed flows | bulk Mbit/s | bulk vs stunnel | bulk vs h2-tunnel |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in &r.rows {
        let base = |route, cc: Option<&str>| {
            r.rows.iter().find(|x| {
                x.route == route && x.loss_pct == row.loss_pct && x.congestion.as_deref() == cc
            })
        };
        let ratio = |a: f64, b: Option<f64>| {
            b.filter(|b| *b > 0.0)
                .map_or("–".to_owned(), |b| format!("{:.2}×", a / b))
        };
        let p99 = |route, cc| base(route, cc).map(|x| x.requests.p99_us);
        let bulk = |route| base(route, None).map(|x| x.bulk_mbit_s);
        let vs_cubic = if row.congestion.as_deref() == Some("bbr") {
            ratio(row.requests.p99_us, p99(Route::HalyardL4, Some("cubic")))
        } else {
            "–".to_owned()
        };
        md += &format!(
            "| {}% | {} | {:.1} | {:.1} | {} | {} | {} | {} | {:.1} | {} | {} |\n",
            row.loss_pct,
            path_name(row),
            row.requests.p50_us / 1000.0,
            row.requests.p99_us / 1000.0,
            ratio(row.requests.p99_us, p99(Route::Stunnel, None)),
            ratio(row.requests.p99_us, p99(Route::H2Tunnel, None)),
            vs_cubic,
            row.failed_requests,
            row.bulk_mbit_s,
            ratio(row.bulk_mbit_s, bulk(Route::Stunnel)),
            ratio(row.bulk_mbit_s, bulk(Route::H2Tunnel))
        );
    }
    md += "\nCoexistence: one bulk flow through Halyard and one through stunnel (kernel TCP) at once on the clean link, \
           sharing the 100 Mbit/s bottleneck.\n\n| halyard congestion | seconds | halyard Mbit/s | stunnel Mbit/s | halyard / stunnel |\n|---|---|---|---|---|\n";
    for c in &r.coexistence {
        md += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× |\n",
            c.congestion,
            c.seconds,
            c.halyard_mbit_s,
            c.stunnel_mbit_s,
            c.halyard_mbit_s / c.stunnel_mbit_s.max(1e-9)
        );
    }
    md
}
