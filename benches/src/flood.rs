//! Scenario: a QUIC handshake flood against a sidecar, from another process. The attacker (this
//! binary, `handshake-flood`) runs in the client's namespace, knows the mesh's public root but
//! holds a certificate from another CA: it opens handshakes to the server sidecar's QUIC port
//! as fast as its loops can, each one making the server do a key exchange, sign, and verify a
//! chain it then refuses. Meanwhile the client app opens new flows through the warm peer
//! connection (one at a time, time to first echoed byte), as in scenario 4. Reported: the
//! legitimate flows' p50/p99 quiet, under two flood sizes and quiet again, the attacker's
//! attempt rate, the server's CPU share, and the server's admission counts
//! (`halyard_quic_admission_total`). /dev/cpu_dma_latency held at 0.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lab::{http_get, Lab, Route, Target};
use crate::netns::{block_in, DmaLatency, Proc};
use crate::stats::{cpu_of, Machine, Percentiles};

/// New flows measured per phase, one at a time.
const FLOWS: usize = 2000;
/// Concurrent attempt loops of the two flood sizes.
const FLOODS: [usize; 2] = [8, 64];
/// `attack_loops` of the raw flood: replayed Initial datagrams instead of handshakes.
const RAW: usize = usize::MAX;
/// Time the attacker gets to reach its pace before measuring.
const WARM_UP: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
struct Phase {
    name: String,
    attack_loops: usize,
    ttfb: Percentiles,
    /// Handshake attempts the attacker started per second during the phase.
    attempts_per_s: f64,
    /// CPU of both sidecars during the phase, as a share of one core.
    sidecar_cpu_share: f64,
    /// CPU of the server sidecar (the one flooded) during the phase, share of one core.
    server_cpu_share: f64,
    /// CPU of the attacker process during the phase, share of one core: it runs on the same
    /// cores as the sidecars and the app.
    attacker_cpu_share: f64,
    /// Initials the kernel dropped per second in front of the server's port (`halyard iptables
    /// install --initial-rate`), when the phase ran with that limit.
    kernel_drops_per_s: Option<f64>,
    secs: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    dma_latency_held: bool,
    phases: Vec<Phase>,
    /// `halyard_quic_admission_total` of the server sidecar at the end, by decision.
    admission: Vec<(String, f64)>,
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    let lab = Lab::up("hb7", 7)?;
    let dma = DmaLatency::hold();
    let mut phases = vec![phase(&lab, "quiet", 0, false)?];
    for loops in FLOODS {
        phases.push(phase(&lab, &format!("flood x{loops}"), loops, false)?);
    }
    phases.push(phase(&lab, "raw Initials", RAW, false)?);
    phases.push(with_kernel_limit(&lab, || {
        phase(&lab, "raw Initials, kernel Initial limit", RAW, false)
    })?);
    phases.push(phase(&lab, "quiet again", 0, false)?);
    // The attacker above shares the cores with the sidecars and the app and takes one of them.
    // Closer to an attacker on another machine: the attacker alone on the last core, the
    // sidecars and the app on the others, quiet and flooded under the same pinning.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores >= 2 {
        let last = FLOODS[FLOODS.len() - 1];
        let pinned = |name: &str, loops: usize| -> anyhow::Result<Phase> {
            let all = lab
                .pids(Route::HalyardL4)
                .into_iter()
                .chain([std::process::id()]);
            for pid in all {
                taskset(&format!("0-{}", cores - 2), pid)?;
            }
            let p = phase(&lab, name, loops, true);
            for pid in lab
                .pids(Route::HalyardL4)
                .into_iter()
                .chain([std::process::id()])
            {
                taskset(&format!("0-{}", cores - 1), pid)?;
            }
            p
        };
        phases.push(pinned("quiet, pinned", 0)?);
        phases.push(pinned(
            &format!("flood x{last}, attacker pinned apart"),
            last,
        )?);
        phases.push(pinned("raw Initials, attacker pinned apart", RAW)?);
        phases.push(with_kernel_limit(&lab, || {
            pinned(
                "raw Initials, attacker pinned apart, kernel Initial limit",
                RAW,
            )
        })?);
    }
    let metrics = http_get(&lab.pair.b.name, "127.0.0.1:15000", "/metrics")?;
    let report = Report {
        machine: Machine::probe(),
        dma_latency_held: dma.held(),
        phases,
        admission: admission_counts(&metrics),
    };
    drop(dma);
    crate::stats::write_report("flood", &markdown(&report), &report)
}

/// Initials per second per source the kernel limit of the flood phases lets through (the
/// sidecar's own Retry rate is 64/s).
const KERNEL_INITIAL_RATE: u32 = 64;

/// Runs `phase` with `halyard iptables install --no-capture --initial-rate` in the server's
/// namespace, removed again afterwards; the phase's result carries the rule's drop rate.
fn with_kernel_limit(
    lab: &Lab,
    phase: impl FnOnce() -> anyhow::Result<Phase>,
) -> anyhow::Result<Phase> {
    let halyard = crate::lab::halyard_bin()?;
    let rate = KERNEL_INITIAL_RATE.to_string();
    let iptables = |args: &[&str]| -> anyhow::Result<String> {
        let out = lab
            .pair
            .b
            .command(&halyard)
            .arg("iptables")
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "halyard iptables {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    iptables(&[
        "install",
        "--no-capture",
        "--initial-rate",
        &rate,
        "--quic-port",
        "15443",
    ])?;
    let result = phase();
    let listed = lab
        .pair
        .b
        .command(std::path::Path::new("iptables"))
        .args(["-t", "filter", "-L", "HALYARD_INPUT", "-v", "-x", "-n"])
        .output();
    iptables(&["remove"])?;
    let mut p = result?;
    // Both DROP rules (a batch of Initials, a source past its rate): packets each dropped.
    let counts: Vec<f64> = String::from_utf8_lossy(&listed?.stdout)
        .lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    anyhow::ensure!(
        !counts.is_empty(),
        "the Initial limit's DROP rules counted nothing readable"
    );
    let dropped: f64 = counts.iter().sum();
    // The counter includes the attacker's warm-up before the timed flows.
    p.kernel_drops_per_s = Some(dropped / (p.secs + WARM_UP.as_secs_f64()));
    Ok(p)
}

/// Sets the CPU affinity of every thread of `pid` to `cpus` (a `taskset -c` list).
fn taskset(cpus: &str, pid: u32) -> anyhow::Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", cpus, &pid.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "taskset -a -c -p {cpus} {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One phase: `loops` attacker loops (none: quiet; `pinned`: on the last core alone) while
/// [`FLOWS`] new flows are timed.
fn phase(lab: &Lab, name: &str, loops: usize, pinned: bool) -> anyhow::Result<Phase> {
    let attacker = match loops {
        0 => None,
        n => Some(start_attacker(lab, n, pinned)?),
    };
    if attacker.is_some() {
        std::thread::sleep(WARM_UP);
    }
    let before = attacker.as_ref().map_or(0, |(_, log)| attempts(log));
    let pids = lab.pids(Route::HalyardL4);
    // Sidecars are spawned client first, then server.
    let server = pids.last().copied().into_iter().collect::<Vec<_>>();
    let attacker_pid = attacker
        .as_ref()
        .map(|(p, _)| p.pid())
        .into_iter()
        .collect::<Vec<_>>();
    let cpu0 = cpu_of(&pids);
    let (server0, attacker0) = (cpu_of(&server), cpu_of(&attacker_pid));
    let t0 = Instant::now();
    let addr = lab.addr(Route::HalyardL4, Target::Echo);
    let samples = block_in(&lab.pair.a.name, move || sequential(addr, FLOWS))?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_of(&pids) - cpu0;
    let server_cpu = cpu_of(&server) - server0;
    let attacker_cpu = cpu_of(&attacker_pid) - attacker0;
    let after = attacker.as_ref().map_or(0, |(_, log)| attempts(log));
    drop(attacker);
    let ttfb = Percentiles::of(samples);
    eprintln!(
        "flood {name}: p50 {:.0} µs p99 {:.0} µs, {:.0} attempts/s",
        ttfb.p50_us,
        ttfb.p99_us,
        after.saturating_sub(before) as f64 / secs
    );
    Ok(Phase {
        name: name.to_owned(),
        attack_loops: loops,
        ttfb,
        attempts_per_s: after.saturating_sub(before) as f64 / secs,
        sidecar_cpu_share: cpu / secs,
        server_cpu_share: server_cpu / secs,
        attacker_cpu_share: attacker_cpu / secs,
        kernel_drops_per_s: None,
        secs,
    })
}

/// The attacker process in the client namespace; its stdout (a running attempt count) goes to
/// the returned file.
fn start_attacker(
    lab: &Lab,
    loops: usize,
    pinned: bool,
) -> anyhow::Result<(Proc, std::path::PathBuf)> {
    let exe = std::env::current_exe()?;
    let log = lab
        .dir
        .path()
        .join(format!("attacker-{loops}-{pinned}.log"));
    let target = SocketAddr::new(lab.pair.b_ip.parse()?, 15443);
    // `taskset` execs the program: the pid stays the attacker's.
    let mut cmd = if pinned {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut c = lab.pair.a.command(std::path::Path::new("taskset"));
        let last = (cores - 1).to_string();
        c.args(["-c".as_ref(), last.as_ref(), exe.as_os_str()]);
        c
    } else {
        lab.pair.a.command(&exe)
    };
    cmd.args([
        "handshake-flood".to_owned(),
        target.to_string(),
        lab.dir
            .path()
            .join("ca")
            .join("ca.crt")
            .display()
            .to_string(),
        if loops == RAW {
            "raw".to_owned()
        } else {
            loops.to_string()
        },
    ])
    .stdout(std::fs::File::create(&log)?)
    .stderr(std::process::Stdio::null());
    Ok((Proc::spawn("attacker", cmd)?, log))
}

/// The attacker's last reported attempt count.
fn attempts(log: &std::path::Path) -> u64 {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0)
}

async fn sequential(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
        out.push(start.elapsed().as_nanos() as u64);
    }
    Ok(out)
}

fn admission_counts(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("halyard_quic_admission_total{decision=\""))
        .filter_map(|rest| {
            let (decision, value) = rest.split_once("\"} ")?;
            Some((decision.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `handshake-flood ADDR ROOT_PEM LOOPS`: opens QUIC handshakes to ADDR from LOOPS concurrent
/// loops, forever, with a certificate of a CA the server does not trust (but trusting the
/// server's root, so every handshake runs to the server's verdict); prints the attempt count
/// once a second. LOOPS = `raw`: replays 64 captured Initial datagrams as fast as the socket
/// takes them, never answering (a flooder that does not wait for handshakes).
pub fn attacker_main(args: &[String]) -> anyhow::Result<()> {
    let [addr, root, loops] = args else {
        anyhow::bail!("usage: handshake-flood ADDR ROOT_PEM LOOPS");
    };
    let addr: SocketAddr = addr.parse().context("ADDR")?;
    let replay = loops == "raw";
    let loops: usize = if replay {
        0
    } else {
        loops.parse().context("LOOPS")?
    };
    let bundle = Arc::new(halyard_certs::TrustBundle::load(std::path::Path::new(
        root,
    ))?);
    let intruder = halyard_certs::test_util::TestPki::new("mesh.local");
    let expected = halyard_certs::SpiffeId::parse("spiffe://mesh.local/ns/default/sa/server")?;
    let raw = halyard_transport::RawTransportConfig {
        connect_timeout_ms: 500,
        ..Default::default()
    };
    let config = halyard_transport::TransportConfig::try_from(raw)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let ep = halyard_transport::MeshEndpoint::new(
            intruder.resolver("intruder"),
            bundle,
            config,
            "0.0.0.0:0".parse()?,
        )?;
        if replay {
            let initials = capture_initials(&ep, &expected, RAW_INITIALS).await?;
            return tokio::task::spawn_blocking(move || blast(addr, &initials)).await?;
        }
        let count = Arc::new(AtomicU64::new(0));
        for _ in 0..loops {
            let (ep, count, expected) = (ep.clone(), count.clone(), expected.clone());
            tokio::spawn(async move {
                loop {
                    count.fetch_add(1, Ordering::Relaxed);
                    if let Ok(conn) = ep.connect(addr, &expected).await {
                        conn.close(0u32.into(), b"");
                    }
                }
            });
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            println!("{}", count.load(Ordering::Relaxed));
        }
    })
}

/// Distinct Initial packets the raw flood replays.
const RAW_INITIALS: usize = 64;

/// `n` first datagrams of handshakes `ep` opens towards a local socket that never answers:
/// real QUIC v1 Initials with their ClientHello, each with its own connection IDs (so its own
/// Initial keys), valid for any server since Initial protection depends on the client's
/// destination connection ID only (RFC 9001 §5.2).
async fn capture_initials(
    ep: &halyard_transport::MeshEndpoint,
    expected: &halyard_certs::SpiffeId,
    n: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; 65536];
    while out.len() < n {
        let (ep, expected) = (ep.clone(), expected.clone());
        let attempt = tokio::spawn(async move { ep.connect(sink_addr, &expected).await });
        let (len, _) = sink.recv_from(&mut buf).await?;
        attempt.abort();
        out.push(buf[..len].to_vec());
        // Retransmissions of the same handshake may be queued: drain them.
        while let Ok((_, _)) = sink.try_recv_from(&mut buf) {}
    }
    Ok(out)
}

/// Sends `initials` to `addr` round robin as fast as the socket takes them, forever; prints the
/// datagram count once a second. Answers (Retries, server flights) are never read.
fn blast(addr: SocketAddr, initials: &[Vec<u8>]) -> anyhow::Result<()> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let count = Arc::new(AtomicU64::new(0));
    let printer = count.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        println!("{}", printer.load(Ordering::Relaxed));
    });
    for packet in initials.iter().cycle() {
        // A full socket buffer or an ICMP error: the flood goes on.
        let _ = socket.send_to(packet, addr);
        count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut md = String::from(
        "# Handshake flood: legitimate new flows while an attacker opens QUIC handshakes\n\n",
    );
    md += &r.machine.markdown();
    md += &format!(
        "\nThe attacker is a separate process in the client's namespace (same source address as the client \
         sidecar), with a certificate from another CA but the mesh's root, so each attempt costs the server \
         sidecar a key exchange, a signature and a refused chain. The client app meanwhile opens {FLOWS} new \
         flows one at a time through the warm peer connection (connect, 1 byte, its echo). Bounds met by the \
         flood (server's `halyard_quic_admission_total`): {}. /dev/cpu_dma_latency held at 0: {}. \
         The attacker runs on the same cores as both sidecars and the app: its own CPU (last column) is taken \
         from them. The last two phases pin the attacker alone to the last core and the sidecars and the app \
         to the others (quiet, then flooded), closer to an attacker on another machine; compare them with \
         each other. Loops `raw`: the attacker replays 64 real Initial datagrams (distinct connection IDs, \
         captured from its own handshakes) as fast as its socket takes them and never answers; attempts/s \
         are datagrams sent. Phases with the kernel Initial limit run `halyard iptables install \
         --no-capture --initial-rate {KERNEL_INITIAL_RATE}` in the server's namespace: QUIC Initials past \
         {KERNEL_INITIAL_RATE}/s per source address are dropped before the socket's receive queue (last \
         column: the rule's drops per second, warm-up included).\n\n",
        r.admission
            .iter()
            .map(|(d, v)| format!("{d} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.dma_latency_held
    );
    md += "| phase | attacker loops | attempts/s | p50 µs | p99 µs | p99 vs quiet | p99 vs quiet again | sidecars' CPU (cores) | server sidecar CPU | attacker CPU | kernel drops/s |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    let quiet_p99 = |name: &str| {
        r.phases
            .iter()
            .find(|p| p.name == name)
            .map_or(0.0, |p| p.ttfb.p99_us)
    };
    let (quiet, again) = (quiet_p99("quiet"), quiet_p99("quiet again"));
    let ratio = |x: f64, base: f64| {
        if base > 0.0 {
            format!("{:.2}×", x / base)
        } else {
            "–".into()
        }
    };
    for p in &r.phases {
        md += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {} |\n",
            p.name,
            if p.attack_loops == RAW {
                "raw".to_owned()
            } else {
                p.attack_loops.to_string()
            },
            p.attempts_per_s,
            p.ttfb.p50_us,
            p.ttfb.p99_us,
            ratio(p.ttfb.p99_us, quiet),
            ratio(p.ttfb.p99_us, again),
            p.sidecar_cpu_share,
            p.server_cpu_share,
            p.attacker_cpu_share,
            p.kernel_drops_per_s
                .map_or("–".to_owned(), |d| format!("{d:.0}")),
        );
    }
    md
}
