//! Scenario 3, head-of-line blocking and bulk goodput under loss: the two namespaces are joined
//! by the user-space link emulator (TUN devices, 10 ms each way = 20 ms RTT, 100 Mbit/s with a
//! 250 KB drop-tail queue). Link profiles: random loss 0, 0.5, 2 and 5 % each way; bursty loss
//! (Gilbert–Elliott, 1 % of packets in bursts of 4 on average); 200 ms RTT (reordering 0.1 %
//! with +1 ms whenever lossy). Through each proxy pair at once: one bulk flow to the sink, and
//! 50 request/response flows (100-byte echo) at 200 rps in total, open loop. Request p50/p99
//! and bulk goodput. Halyard runs once per congestion controller (`bbr`, `cubic`), its sidecars
//! restarted in between. Then, per controller: coexistence (one Halyard bulk flow and one
//! stunnel (kernel TCP) bulk flow share the clean link for 20 s, on the 1-BDP queue and on a
//! 3-BDP one), and a rate step (one bulk flow while the link steps 100 → 20 → 100 Mbit/s, 10 s
//! each; how long the delivered rate and the bottleneck queue take to follow each step), the
//! step also for stunnel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lab::{Lab, Route, Target};
use crate::linkemu::{LinkEmu, LinkParams};
use crate::netns::{block_in, Pair};
use crate::stats::{Machine, Percentiles};

/// A link profile: loss (ppm, mean burst length in packets) and one-way delay.
#[derive(Debug, Clone, Copy)]
struct Profile {
    name: &'static str,
    loss_ppm: u32,
    mean_burst: u32,
    one_way_ms: u64,
}

const fn profile(name: &'static str, loss_ppm: u32, mean_burst: u32, one_way_ms: u64) -> Profile {
    Profile {
        name,
        loss_ppm,
        mean_burst,
        one_way_ms,
    }
}

const PROFILES: [Profile; 6] = [
    profile("0%", 0, 1, 10),
    profile("0.5%", 5_000, 1, 10),
    profile("2%", 20_000, 1, 10),
    profile("5%", 50_000, 1, 10),
    profile("1% in bursts of 4", 10_000, 4, 10),
    profile("200 ms RTT", 0, 1, 100),
];
const CONGESTION: [&str; 2] = ["bbr", "cubic"];
/// The rate step: 10 s at each rate, Mbit/s.
const STEP_RATES: [f64; 3] = [100.0, 20.0, 100.0];
const STEP_PHASE: Duration = Duration::from_secs(10);
const STEP_SAMPLE: Duration = Duration::from_millis(100);
const COEXIST: Duration = Duration::from_secs(20);
/// Coexistence on the scenario's 1-BDP buffer and on a 3-BDP one.
const COEXIST_QUEUES: [usize; 2] = [QUEUE_BYTES, 3 * QUEUE_BYTES];
/// The kernel TCP congestion controls the coexistence runs put beside Halyard: BBR (v1 in
/// mainline Linux: it keeps two BDPs in flight and ignores loss) and CUBIC, Linux's default.
const COEXIST_KERNEL: [&str; 2] = ["bbr", "cubic"];
const REQ_FLOWS: usize = 50;
const RPS: f64 = 200.0;
const RUN: Duration = Duration::from_secs(8);
const RAMP: Duration = Duration::from_secs(1);
const SEED: u64 = 0x4a11_7a4d;
/// The bottleneck's drop-tail queue, bytes (20 ms at 100 Mbit/s).
const QUEUE_BYTES: usize = 250_000;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
struct Row {
    route: Route,
    /// Halyard's `[transport] congestion`; none for the other paths.
    congestion: Option<String>,
    profile: String,
    loss_pct: f64,
    /// Mean loss burst length, packets (1: independent losses).
    mean_burst: u32,
    rtt_ms: u64,
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
    /// /proc/loadavg before and after the run (the machine is shared).
    load_before: String,
    load_after: String,
    rows: Vec<Row>,
    coexistence: Vec<Coexistence>,
    steps: Vec<StepRun>,
}

/// One bulk flow while the link rate steps [`STEP_RATES`].
#[derive(Debug, Serialize)]
struct StepRun {
    path: String,
    /// Mean delivered rate (a → b at the emulator's output, headers and retransmissions
    /// included) in each step's last 5 s, Mbit/s.
    settled_mbit_s: Vec<f64>,
    /// Down step: seconds until the bottleneck queue stays under a quarter of the buffer
    /// (25 ms at 20 Mbit/s) for 1 s; `None` if never.
    down_queue_follow_s: Option<f64>,
    /// Longest bottleneck queue after the down step, ms.
    down_queue_max_ms: f64,
    /// Median of the per-100 ms queue peaks over the low rate's last 5 s, ms.
    down_queue_p50_ms: f64,
    /// Up step: seconds until the delivered rate over 0.5 s reaches 80 % of the new rate.
    up_rate_follow_s: Option<f64>,
    /// Delivered Mbit/s per 100 ms over the whole run.
    series_mbit_s: Vec<f64>,
    /// Bottleneck queue peak per 100 ms over the whole run, ms.
    queue_series_ms: Vec<f64>,
}

/// One Halyard bulk flow beside one stunnel bulk flow on the same bottleneck.
#[derive(Debug, Serialize)]
struct Coexistence {
    congestion: String,
    /// The kernel TCP congestion control of the stunnel flow (namespace a's
    /// `net.ipv4.tcp_congestion_control` during the run).
    kernel_congestion: String,
    /// The bottleneck's drop-tail queue during the run, bytes.
    queue_bytes: usize,
    seconds: f64,
    halyard_mbit_s: f64,
    stunnel_mbit_s: f64,
}

/// The scenario's link: namespaces `hb3-a`/`hb3-b` joined by the emulator.
fn link_up() -> anyhow::Result<(LinkParams, Pair, LinkEmu)> {
    crate::setup::check_root()?;
    crate::setup::check_stunnel()?;
    let link = LinkParams {
        one_way_delay_ms: 10.0,
        rate_mbit_s: 100.0,
        queue_bytes: QUEUE_BYTES,
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
    Ok((link, pair, emu))
}

/// `lossy-coexistence`: only the coexistence runs, printed, no report written (to look at
/// one question without the 11 minutes of the whole scenario).
pub fn coexistence_main() -> anyhow::Result<()> {
    let (_, pair, emu) = link_up()?;
    let _allowed = AllowedKernelCongestion::ensure()?;
    let mut lab = Lab::up_on(pair)?;
    for congestion in CONGESTION {
        lab.restart_halyard(congestion)?;
        for kernel in COEXIST_KERNEL {
            for queue in COEXIST_QUEUES {
                coexist(&lab, &emu, queue, kernel)?;
            }
        }
    }
    Ok(())
}

pub fn main() -> anyhow::Result<()> {
    let (link, pair, emu) = link_up()?;
    let cc = crate::netns::in_ns(&pair.a.name, || {
        Ok(
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")?
                .trim()
                .to_owned(),
        )
    })?;
    let load_before = load_avg();
    let _allowed = AllowedKernelCongestion::ensure()?;
    let mut lab = Lab::up_on(pair)?;
    let mut rows = Vec::new();
    let mut coexistence = Vec::new();
    let mut steps = Vec::new();
    for congestion in CONGESTION {
        lab.restart_halyard(congestion)?;
        for p in PROFILES {
            set_profile(&emu, &p);
            for route in Route::L4 {
                // The baselines run once, beside the first controller.
                if route == Route::HalyardL4 || congestion == CONGESTION[0] {
                    rows.push(run(&lab, route, &p)?);
                }
            }
        }
        set_profile(&emu, &PROFILES[0]);
        for kernel in COEXIST_KERNEL {
            for queue in COEXIST_QUEUES {
                coexistence.push(coexist(&lab, &emu, queue, kernel)?);
            }
        }
        if congestion == CONGESTION[0] {
            steps.push(step_run(&lab, &emu, Route::Stunnel)?);
        }
        steps.push(step_run(&lab, &emu, Route::HalyardL4)?);
    }
    drop(lab);
    drop(emu);
    let report = Report {
        machine: Machine::probe(),
        link,
        seed: SEED,
        seconds: RUN.as_secs_f64(),
        tcp_congestion_control: cc,
        load_before,
        load_after: load_avg(),
        rows,
        coexistence,
        steps,
    };
    crate::stats::write_report("lossy", &markdown(&report), &report)
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn set_profile(emu: &LinkEmu, p: &Profile) {
    let reorder = if p.loss_ppm > 0 { 1_000 } else { 0 };
    emu.set_loss(p.loss_ppm, p.mean_burst, reorder);
    emu.set_delay(Duration::from_millis(p.one_way_ms));
}

fn run(lab: &Lab, route: Route, p: &Profile) -> anyhow::Result<Row> {
    let sink = lab.addr(route, Target::Sink);
    let echo = lab.addr(route, Target::Echo);
    let (samples, failed, bulk_bytes, secs) =
        block_in(&lab.pair.a.name, move || mixed(sink, echo))?;
    let row = Row {
        route,
        congestion: (route == Route::HalyardL4).then(|| lab.congestion().to_owned()),
        profile: p.name.to_owned(),
        loss_pct: f64::from(p.loss_ppm) / 10_000.0,
        mean_burst: p.mean_burst,
        rtt_ms: 2 * p.one_way_ms,
        requests: Percentiles::of(samples),
        failed_requests: failed,
        bulk_mbit_s: bulk_bytes as f64 * 8.0 / secs / 1e6,
    };
    eprintln!(
        "lossy {} {}: requests p50 {:.1} ms p99 {:.1} ms, bulk {:.1} Mbit/s",
        path_name(&row),
        row.profile,
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

/// One bulk flow through `route` while the link rate steps through [`STEP_RATES`], sampling
/// the delivered rate and the bottleneck queue every [`STEP_SAMPLE`].
fn step_run(lab: &Lab, emu: &LinkEmu, route: Route) -> anyhow::Result<StepRun> {
    let sink = lab.addr(route, Target::Sink);
    let total = STEP_PHASE * STEP_RATES.len() as u32;
    let knobs = emu.knobs.clone();
    emu.set_rate(STEP_RATES[0]);
    let (rates, queues) = block_in(&lab.pair.a.name, move || async move {
        let start = Instant::now();
        let flow = tokio::spawn(bulk(sink, start + total));
        let (mut rates, mut queues) = (Vec::new(), Vec::new());
        let mut last = knobs.delivered[0].load(std::sync::atomic::Ordering::Relaxed);
        knobs.take_queue_max(0);
        let mut tick = tokio::time::interval_at((start + STEP_SAMPLE).into(), STEP_SAMPLE);
        for i in 1..=(total.as_millis() / STEP_SAMPLE.as_millis()) {
            tick.tick().await;
            let phase = (i * STEP_SAMPLE.as_millis() / STEP_PHASE.as_millis()) as usize;
            if let Some(rate) = STEP_RATES.get(phase) {
                set_rate_knob(&knobs, *rate);
            }
            let now = knobs.delivered[0].load(std::sync::atomic::Ordering::Relaxed);
            rates.push((now - last) as f64 * 8.0 / STEP_SAMPLE.as_secs_f64() / 1e6);
            queues.push(knobs.take_queue_max(0).as_secs_f64() * 1000.0);
            last = now;
        }
        flow.await??;
        Ok((rates, queues))
    })?;
    emu.set_rate(STEP_RATES[0]);
    let quarter_ms = QUEUE_BYTES as f64 / 4.0 * 8.0 / (STEP_RATES[1] * 1e3);
    let run = step_figures(route_label(lab, route), &rates, &queues, quarter_ms);
    eprintln!(
        "rate step {}: settled {:?} Mbit/s, down: queue under {quarter_ms:.0} ms after {:?} s (max {:.0} ms, p50 {:.0} ms), up: 80 % after {:?} s",
        run.path, run.settled_mbit_s, run.down_queue_follow_s, run.down_queue_max_ms, run.down_queue_p50_ms, run.up_rate_follow_s
    );
    std::thread::sleep(Duration::from_millis(500));
    Ok(run)
}

fn set_rate_knob(knobs: &crate::linkemu::Knobs, mbit_s: f64) {
    let kbit = (mbit_s * 1000.0) as u32;
    knobs
        .rate_kbit_s
        .store(kbit, std::sync::atomic::Ordering::Relaxed);
}

fn route_label(lab: &Lab, route: Route) -> String {
    match route {
        Route::HalyardL4 => format!("{} {}", route.name(), lab.congestion()),
        _ => route.name().to_owned(),
    }
}

/// The step figures from per-sample delivered rates (Mbit/s) and queue maxima (ms).
fn step_figures(path: String, rates: &[f64], queues: &[f64], calm_ms: f64) -> StepRun {
    let per_phase = (STEP_PHASE.as_millis() / STEP_SAMPLE.as_millis()) as usize;
    let secs = |samples: usize| samples as f64 * STEP_SAMPLE.as_secs_f64();
    let settled = (0..STEP_RATES.len())
        .map(|k| {
            let tail = rates.get(k * per_phase + per_phase / 2..(k + 1) * per_phase);
            tail.map_or(0.0, |t| t.iter().sum::<f64>() / t.len().max(1) as f64)
        })
        .collect();
    let down = queues.get(per_phase..2 * per_phase).unwrap_or_default();
    let calm = per_phase / 10;
    let down_queue_follow_s = (0..down.len().saturating_sub(calm))
        .find(|&i| down[i..i + calm].iter().all(|q| *q < calm_ms))
        .map(secs);
    let mut last = down.get(per_phase / 2..).unwrap_or_default().to_vec();
    last.sort_by(f64::total_cmp);
    let down_queue_p50_ms = last.get(last.len() / 2).copied().unwrap_or(0.0);
    let up = rates.get(2 * per_phase..).unwrap_or_default();
    let window = per_phase / 20;
    let target = 0.8 * STEP_RATES[2];
    let up_rate_follow_s = (0..up.len().saturating_sub(window))
        .find(|&i| up[i..i + window].iter().sum::<f64>() / window as f64 >= target)
        .map(|i| secs(i + window));
    StepRun {
        path,
        settled_mbit_s: settled,
        down_queue_follow_s,
        down_queue_max_ms: down.iter().copied().fold(0.0, f64::max),
        down_queue_p50_ms,
        up_rate_follow_s,
        series_mbit_s: rates.iter().map(|r| (r * 10.0).round() / 10.0).collect(),
        queue_series_ms: queues.iter().map(|q| (q * 10.0).round() / 10.0).collect(),
    }
}

/// One bulk flow through Halyard and one through stunnel at once, for [`COEXIST`], the
/// stunnel flow's kernel TCP running `kernel` congestion control.
fn coexist(
    lab: &Lab,
    emu: &LinkEmu,
    queue_bytes: usize,
    kernel: &str,
) -> anyhow::Result<Coexistence> {
    let before = set_kernel_congestion(&lab.pair.a.name, kernel)?;
    let row = coexist_run(lab, emu, queue_bytes, kernel);
    set_kernel_congestion(&lab.pair.a.name, &before)?;
    row
}

/// Keeps every [`COEXIST_KERNEL`] congestion control allowed outside the root network namespace
/// (`net.ipv4.tcp_allowed_congestion_control`: a namespace may only make an allowed one its
/// default) while it lives, and puts the former list back when dropped.
struct AllowedKernelCongestion(Option<String>);

const ALLOWED_CC: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

impl AllowedKernelCongestion {
    /// Called from the root network namespace (the bench's own).
    fn ensure() -> anyhow::Result<Self> {
        let before = std::fs::read_to_string(ALLOWED_CC)?.trim().to_owned();
        let mut allowed: Vec<&str> = before.split_whitespace().collect();
        let missing: Vec<&str> = COEXIST_KERNEL
            .into_iter()
            .filter(|cc| !allowed.contains(cc))
            .collect();
        if missing.is_empty() {
            return Ok(AllowedKernelCongestion(None));
        }
        allowed.extend(missing);
        std::fs::write(ALLOWED_CC, allowed.join(" "))?;
        Ok(AllowedKernelCongestion(Some(before)))
    }
}

impl Drop for AllowedKernelCongestion {
    fn drop(&mut self) {
        if let Some(before) = self.0.take() {
            if let Err(e) = std::fs::write(ALLOWED_CC, &before) {
                eprintln!("could not restore {ALLOWED_CC} to {before:?}: {e}");
            }
        }
    }
}

/// Sets namespace `ns`'s TCP congestion control for sockets made from now on; the former one.
fn set_kernel_congestion(ns: &str, cc: &str) -> anyhow::Result<String> {
    let cc = cc.to_owned();
    crate::netns::in_ns(ns, move || {
        let path = "/proc/sys/net/ipv4/tcp_congestion_control";
        let before = std::fs::read_to_string(path)?.trim().to_owned();
        std::fs::write(path, &cc)?;
        Ok(before)
    })
}

fn coexist_run(
    lab: &Lab,
    emu: &LinkEmu,
    queue_bytes: usize,
    kernel: &str,
) -> anyhow::Result<Coexistence> {
    emu.set_queue(queue_bytes);
    let halyard = lab.addr(Route::HalyardL4, Target::Sink);
    let stunnel = lab.addr(Route::Stunnel, Target::Sink);
    let result = block_in(&lab.pair.a.name, move || async move {
        let until = Instant::now() + COEXIST;
        let (a, b) = tokio::join!(bulk(halyard, until), bulk(stunnel, until));
        Ok((a?, b?))
    });
    emu.set_queue(QUEUE_BYTES);
    let ((h, hs), (s, ss)) = result?;
    let row = Coexistence {
        congestion: lab.congestion().to_owned(),
        kernel_congestion: kernel.to_owned(),
        queue_bytes,
        seconds: COEXIST.as_secs_f64(),
        halyard_mbit_s: h as f64 * 8.0 / hs / 1e6,
        stunnel_mbit_s: s as f64 * 8.0 / ss / 1e6,
    };
    eprintln!(
        "coexistence {} beside kernel {} ({} B queue): halyard {:.1} Mbit/s, stunnel {:.1} Mbit/s",
        row.congestion,
        row.kernel_congestion,
        row.queue_bytes,
        row.halyard_mbit_s,
        row.stunnel_mbit_s
    );
    std::thread::sleep(Duration::from_millis(500));
    Ok(row)
}

/// The bulk flow and the request flows together; (latencies ns, failed, bulk bytes, seconds).
async fn mixed(sink: SocketAddr, echo: SocketAddr) -> anyhow::Result<(Vec<u64>, usize, u64, f64)> {
    let mut conns = Vec::new();
    for _ in 0..REQ_FLOWS {
        conns.push(request_flow(echo).await?);
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
    // What the proxies still buffer drains at the link's rate: minutes on a slow, lossy path.
    let n = tokio::time::timeout(Duration::from_secs(120), s.read_u64()).await??;
    Ok((n, start.elapsed().as_secs_f64()))
}

/// A request flow proven by one round trip. Its set-up is tried up to `SETUP_TRIES` times: the
/// first flow after a restart waits for a new peer connection, whose handshake a lossy profile
/// can delay past the proxy's connect timeout (Initials lost in a burst are resent after 1 s,
/// then 2 s), and that flow is reset. Each failure is printed.
async fn request_flow(echo: SocketAddr) -> anyhow::Result<TcpStream> {
    const SETUP_TRIES: usize = 3;
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = async {
            let mut s = TcpStream::connect(echo).await?;
            s.set_nodelay(true)?;
            round_trip(&mut s).await?;
            anyhow::Ok(s)
        };
        match attempt.await {
            Ok(s) => return Ok(s),
            Err(e) if tries < SETUP_TRIES => {
                eprintln!("bench: request flow set-up failed ({e:#}); trying again");
            }
            Err(e) => return Err(e.context(format!("request flow set-up, {tries} tries"))),
        }
    }
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
        "\nLink: user-space emulator over TUN devices between the two namespaces, {} ms each way (20 ms RTT) unless the \
         profile says 200 ms RTT, {} Mbit/s, {} B drop-tail queue, loss per packet each way as listed (random, or \
         Gilbert–Elliott bursts: every packet lost in the bad state, mean burst 4), reordering 0.1 % (+{} ms) when \
         lossy; seed {:#x}. Load average (1, 5, 15 min) before the run {}, after {} (the machine is shared). \
         Each path carries at once one bulk flow (client → server sink) and {REQ_FLOWS} request/response flows (100 B echo) \
         at {RPS} rps in total, open loop, {} s after a 1 s ramp. Every flow of a path shares the one peer pair: one QUIC \
         connection (Halyard), one TLS/TCP connection (h2-tunnel), a TLS/TCP connection per flow (stunnel). \
         Kernel TCP congestion control in the namespaces: {}. Halyard runs with `[transport] congestion = \"bbr\"` and \
         then `\"cubic\"` (sidecars restarted in between; the other paths measured once, during the `bbr` pass). A request \
         unanswered after {} s counts as {} s and ends its flow (failed flows).\n\n",
        r.link.one_way_delay_ms, r.link.rate_mbit_s, r.link.queue_bytes, r.link.reorder_extra_ms, r.seed,
        r.load_before, r.load_after, r.seconds,
        r.tcp_congestion_control, TIMEOUT.as_secs(), TIMEOUT.as_secs()
    );
    md += "| link | path | req p50 ms | req p99 ms | p99 vs stunnel | p99 vs h2-tunnel | p99 vs halyard cubic | failed flows | bulk Mbit/s | bulk vs stunnel | bulk vs h2-tunnel |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in &r.rows {
        let base = |route, cc: Option<&str>| {
            r.rows.iter().find(|x| {
                x.route == route && x.profile == row.profile && x.congestion.as_deref() == cc
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
            "| {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {:.1} | {} | {} |\n",
            row.profile,
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
           sharing the 100 Mbit/s bottleneck, on the scenario's queue and on one three times as deep, beside a kernel flow \
           running BBR (v1 in mainline Linux) and one running CUBIC (Linux's default).\n\n\
           | halyard congestion | kernel TCP | queue B | seconds | halyard Mbit/s | stunnel Mbit/s | halyard / stunnel |\n|---|---|---|---|---|---|---|\n";
    for c in &r.coexistence {
        md += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2}× |\n",
            c.congestion,
            c.kernel_congestion,
            c.queue_bytes,
            c.seconds,
            c.halyard_mbit_s,
            c.stunnel_mbit_s,
            c.halyard_mbit_s / c.stunnel_mbit_s.max(1e-9)
        );
    }
    md += &format!(
        "\nRate step: one bulk flow on the clean 20 ms link while the rate steps {:?} Mbit/s, {} s each. Delivered rate \
         at the emulator's output (headers and retransmissions included), mean of each step's last 5 s. Down step: \
         time until the bottleneck queue stays under a quarter of the buffer (25 ms at 20 Mbit/s) for 1 s, its peak, \
         and the median of its 100 ms peaks over the last 5 s at 20 Mbit/s. Up step: time until the rate over 0.5 s \
         reaches 80 % of the new rate. (Series per 100 ms in lossy.json.)\n\n\
         | path | Mbit/s at 100 / 20 / 100 | down: queue < 25 ms after | down: peak queue ms | down: queue p50 ms | up: 80 % after |\n|---|---|---|---|---|---|\n",
        STEP_RATES,
        STEP_PHASE.as_secs()
    );
    let secs = |s: Option<f64>| s.map_or("never".to_owned(), |s| format!("{s:.1} s"));
    for s in &r.steps {
        let rates: Vec<String> = s.settled_mbit_s.iter().map(|r| format!("{r:.1}")).collect();
        md += &format!(
            "| {} | {} | {} | {:.0} | {:.0} | {} |\n",
            s.path,
            rates.join(" / "),
            secs(s.down_queue_follow_s),
            s.down_queue_max_ms,
            s.down_queue_p50_ms,
            secs(s.up_rate_follow_s)
        );
    }
    md
}
