//! Scenario 4, new flows: time to first byte of a new flow (connect, send 1 byte, receive its
//! echo) on a warm peer connection (the proxies already talk) and a cold one (the client-side
//! proxy restarted just before, so the flow waits for a new QUIC or TLS handshake), one at a time
//! and 32 at once. stunnel does a TLS handshake per flow, so it has no warm case: its two rows
//! differ only in noise. /dev/cpu_dma_latency held at 0.
//!
//! Then the same warm flows one at a time across a link of 20 ms RTT (the link emulator, as
//! between clusters), with the app writing its first byte at once or 200 µs after its connect
//! returned (the CPU a TLS client spends on its ClientHello): a tunnel that waits for the
//! peer's answer before it carries anything pays a second round trip.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lab::{Lab, Route, Target};
use crate::linkemu::{LinkEmu, LinkParams};
use crate::netns::{block_in, DmaLatency, Pair};
use crate::stats::{Machine, Percentiles};

const WARM_SEQ: usize = 200;
const COLD_SEQ: usize = 12;
const PARALLEL: usize = 32;
const WARM_ROUNDS: usize = 10;
const COLD_ROUNDS: usize = 4;
/// Flows per path and first-write delay across the emulated link.
const WAN_SEQ: usize = 30;
/// One-way delay of the emulated link, ms.
const WAN_ONE_WAY_MS: f64 = 10.0;
/// How long after its connect the late writer sends its first byte, µs.
const LATE_WRITE_US: u64 = 200;

#[derive(Debug, Serialize)]
struct Row {
    route: Route,
    peer: &'static str,
    parallel: usize,
    ttfb: Percentiles,
}

/// Warm flows across the emulated link.
#[derive(Debug, Serialize)]
struct WanRow {
    route: Route,
    /// Delay between the app's connect and its first byte, µs.
    first_write_us: u64,
    ttfb: Percentiles,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    dma_latency_held: bool,
    rows: Vec<Row>,
    wan_one_way_ms: f64,
    wan: Vec<WanRow>,
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    let mut lab = Lab::up("hb4", 4)?;
    let dma = DmaLatency::hold();
    let mut rows = Vec::new();
    // The paths named in HALYARD_BENCH_ROUTES (all when unset); an unknown name is refused.
    let only = crate::lab::routes_asked(&Route::L4)?;
    let routes = only.clone().unwrap_or(Route::L4.to_vec());
    for &route in &routes {
        for parallel in [1, PARALLEL] {
            rows.push(measure(&mut lab, route, "warm", parallel)?);
            rows.push(measure(&mut lab, route, "cold", parallel)?);
        }
    }
    drop(lab);
    let wan = wan(&routes)?;
    let report = Report {
        machine: Machine::probe(),
        dma_latency_held: dma.held(),
        rows,
        wan_one_way_ms: WAN_ONE_WAY_MS,
        wan,
    };
    drop(dma);
    if only.is_some() {
        // A partial run never replaces the committed report: its table goes to stdout.
        println!("{}", markdown(&report));
        return Ok(());
    }
    crate::stats::write_report("newflows", &markdown(&report), &report)
}

fn measure(
    lab: &mut Lab,
    route: Route,
    peer: &'static str,
    parallel: usize,
) -> anyhow::Result<Row> {
    let cold = peer == "cold";
    let rounds = match (cold, parallel) {
        (false, 1) => WARM_SEQ,
        (true, 1) => COLD_SEQ,
        (false, _) => WARM_ROUNDS,
        (true, _) => COLD_ROUNDS,
    };
    let addr = lab.addr(route, Target::Echo);
    let mut samples = Vec::new();
    for _ in 0..rounds {
        if cold {
            restart(lab, route)?;
        } else {
            block_in(&lab.pair.a.name, move || batch(addr, 1))?;
        }
        samples.extend(block_in(&lab.pair.a.name, move || batch(addr, parallel))?);
    }
    let ttfb = Percentiles::of(samples);
    eprintln!(
        "newflows {} {peer} x{parallel}: p50 {:.0} µs p99 {:.0} µs",
        route.name(),
        ttfb.p50_us,
        ttfb.p99_us
    );
    Ok(Row {
        route,
        peer,
        parallel,
        ttfb,
    })
}

/// Warm flows one at a time across a link of `2 × WAN_ONE_WAY_MS` RTT, first byte at once and
/// late.
fn wan(routes: &[Route]) -> anyhow::Result<Vec<WanRow>> {
    let link = LinkParams {
        one_way_delay_ms: WAN_ONE_WAY_MS,
        rate_mbit_s: 100.0,
        queue_bytes: 250_000,
        reorder_extra_ms: 0.0,
    };
    let pair = Pair::bare("hb9", 9)?;
    let _emu = LinkEmu::start(
        "hb9t",
        (&pair.a.name, &pair.a_ip),
        (&pair.b.name, &pair.b_ip),
        &link,
        9,
    )?;
    let lab = Lab::up_on(pair)?;
    let mut rows = Vec::new();
    for &route in routes {
        let addr = lab.addr(route, Target::Echo);
        // The peer connection is made (and the first flow's costs paid) before timing.
        block_in(&lab.pair.a.name, move || batch(addr, 1))?;
        for late in [0, LATE_WRITE_US] {
            let late = Duration::from_micros(late);
            let mut samples = Vec::with_capacity(WAN_SEQ);
            for _ in 0..WAN_SEQ {
                samples.push(block_in(&lab.pair.a.name, move || ttfb(addr, late))?);
            }
            let ttfb = Percentiles::of(samples);
            eprintln!(
                "newflows {} across {} ms RTT, first byte after {late:?}: p50 {:.0} µs",
                route.name(),
                2.0 * WAN_ONE_WAY_MS,
                ttfb.p50_us
            );
            rows.push(WanRow {
                route,
                first_write_us: late.as_micros() as u64,
                ttfb,
            });
        }
    }
    Ok(rows)
}

fn restart(lab: &mut Lab, route: Route) -> anyhow::Result<()> {
    lab.restart_cold(route)?;
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// `n` new flows at once; each one's time to first byte in ns.
async fn batch(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        set.spawn(ttfb(addr, Duration::ZERO));
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    Ok(out)
}

/// Time to first byte of one flow whose first byte is written `late` after its connect
/// returned; `late` is spent spinning, as a client computing its first message would (tokio's
/// timer has millisecond resolution).
async fn ttfb(addr: SocketAddr, late: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let connected = Instant::now();
    while connected.elapsed() < late {
        std::hint::spin_loop();
    }
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
    Ok(start.elapsed().as_nanos() as u64)
}

fn markdown(r: &Report) -> String {
    let mut md = String::from("# Scenario 4: time to first byte of a new flow\n\n");
    md += &r.machine.markdown();
    md += &format!(
        "\nA new TCP connection from the client app, 1 byte sent, its echo received: time from connect() to that byte. \
         Warm: the proxies already hold a peer connection. Cold: the client-side proxy (sidecar or h2-tunnel client) \
         was restarted just before and waited ready, so the flow includes the QUIC / TLS handshake with the peer. \
         Sequential: {WARM_SEQ} warm / {COLD_SEQ} cold flows one at a time; parallel: {PARALLEL} flows at once, \
         {WARM_ROUNDS} warm / {COLD_ROUNDS} cold rounds. stunnel does a TLS handshake per flow either way. \
         The Halyard sidecars run with the default `max_concurrent_bidi_streams` (1,024): the QUIC stack \
         sets up a slot per stream the peer may open when a connection starts, and at the 20,000 the lab \
         used before (for the scale scenario, which still does) a cold flow took 6.3 ms instead of 2.3. \
         /dev/cpu_dma_latency held at 0: {}.\n\n",
        r.dma_latency_held
    );
    md += "| path | peer | flows at once | p50 µs | p99 µs | p50 vs direct | p50 vs stunnel | p50 vs h2-tunnel |\n|---|---|---|---|---|---|---|---|\n";
    for row in &r.rows {
        let base = |route| {
            r.rows
                .iter()
                .find(|x| x.route == route && x.peer == row.peer && x.parallel == row.parallel)
                .map_or(0.0, |x| x.ttfb.p50_us)
        };
        let ratio = |b: f64| {
            if b > 0.0 {
                format!("{:.2}×", row.ttfb.p50_us / b)
            } else {
                "–".into()
            }
        };
        md += &format!(
            "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
            row.route.name(),
            row.peer,
            row.parallel,
            row.ttfb.p50_us,
            row.ttfb.p99_us,
            ratio(base(Route::Direct)),
            ratio(base(Route::Stunnel)),
            ratio(base(Route::H2Tunnel))
        );
    }
    md += &format!(
        "\nAcross a link of {:.0} ms RTT (the link emulator, 100 Mbit/s), warm, {WAN_SEQ} flows one at a time per row; \
         \"first byte after\": how long after its connect returned the app wrote (200 µs: the CPU a TLS client spends \
         on its ClientHello). A Halyard sidecar sends what the app wrote while its tunnel opens right behind the \
         CONNECT; the h2 tunnel waits for the peer's 200 before it carries anything; direct and stunnel pay a TCP \
         (and TLS) handshake across the link first.\n\n",
        2.0 * r.wan_one_way_ms
    );
    md += "| path | first byte after µs | p50 ms | p99 ms | p50 in RTTs |\n|---|---|---|---|---|\n";
    for row in &r.wan {
        md += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} |\n",
            row.route.name(),
            row.first_write_us,
            row.ttfb.p50_us / 1000.0,
            row.ttfb.p99_us / 1000.0,
            row.ttfb.p50_us / 1000.0 / (2.0 * r.wan_one_way_ms)
        );
    }
    md
}
