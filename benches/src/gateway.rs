//! Scenario: the east-west gateway. The same two sidecars (client in namespace a, server in
//! namespace b, one veth pair) connected directly, then with the client reaching the server
//! through `halyard gateway`, as a caller in another cluster does: in namespace b beside the
//! server, and in a namespace g of its own between a and b, relaying in user space or
//! forwarding established connections in the kernel (`[xdp]`). Bulk throughput (1 and 8
//! flows), ping-pong round trips (1 and 100 bytes), the CPU of each process per GB delivered,
//! and the whole machine's (`/proc/stat`: XDP runs in softirq context, charged to whichever
//! task the CPU was running, so a per-process figure cannot show it). The targets:
//! ≤ 50 µs added p50 per round trip, ≤ 10 % less throughput, gateway CPU per GB ≤ 0.3× a
//! sidecar's.

use std::time::Duration;

use serde::Serialize;

use crate::lab::{Lab, Reach, Route, Target};
use crate::netns::{block_in, DmaLatency};
use crate::stats::{cpu_of, Machine, Percentiles};

const RUNS: usize = 3;

/// The paths measured, in each round's order.
const PATHS: [Reach; 5] = [
    Reach::Direct,
    Reach::DirectNoGso,
    Reach::GatewayInB,
    Reach::GatewayOwnNs { xdp: false },
    Reach::GatewayOwnNs { xdp: true },
];

#[derive(Debug, Serialize)]
struct Bulk {
    path: Reach,
    flows: usize,
    gbit_s: f64,
    /// CPU-seconds per GB delivered, by process.
    client_cpu_s_per_gb: f64,
    server_cpu_s_per_gb: f64,
    gateway_cpu_s_per_gb: Option<f64>,
    /// CPU-seconds the gateway's XDP program ran per GB delivered (the kernel's BPF run-time
    /// statistics, `halyard_gateway_xdp_run_seconds_total`).
    xdp_program_cpu_s_per_gb: Option<f64>,
    /// Busy CPU-seconds of the whole machine (every process and the kernel) per GB delivered.
    machine_cpu_s_per_gb: f64,
}

#[derive(Debug, Serialize)]
struct Ping {
    path: Reach,
    bytes: usize,
    rtt: Percentiles,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    dma_latency_held: bool,
    bulk: Vec<Bulk>,
    ping: Vec<Ping>,
}

/// Busy seconds of every CPU so far: `/proc/stat`'s `cpu` line less idle and iowait, in
/// USER_HZ ticks (100 per second on Linux's ABI).
fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy as f64 / 100.0
}

/// Seconds every loaded BPF program named `halyard_gateway` (the gateway's XDP program) has
/// run, from the kernel's BPF run-time statistics (on while a gateway with
/// `[xdp] run_time_stats` runs); read from the kernel at once, not from the gateway's metrics,
/// which it updates once a second: waiting for them would leave the machine idle before the
/// next measurement on one path only (and a second of idle slows the round trips that follow on
/// every path of this machine).
fn xdp_run_seconds() -> f64 {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| p.name_as_str() == Some("halyard_gateway"))
        .map(|p| p.run_time().as_secs_f64())
        .sum()
}

fn measure(
    lab: &Lab,
    path: Reach,
    bulk: &mut Vec<Bulk>,
    ping: &mut Vec<Ping>,
) -> anyhow::Result<()> {
    let route = Route::HalyardL4;
    let via = path.via_gateway();
    let pid = |name: &str| lab.pid_of(name).map(|p| vec![p]).unwrap_or_default();
    let (client, server, gateway) = (pid("sidecar-client"), pid("sidecar-server"), pid("gateway"));
    for flows in [1, 8] {
        let addr = lab.addr(route, Target::Sink);
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let before = (cpu_of(&client), cpu_of(&server), cpu_of(&gateway));
            let machine = machine_busy_s();
            let program = xdp_run_seconds();
            let (bytes, secs) = block_in(&lab.pair.a.name, move || {
                crate::bulk::bulk_flows(addr, flows)
            })?;
            let gb = bytes as f64 / 1e9;
            runs.push(Bulk {
                path,
                flows,
                gbit_s: bytes as f64 * 8.0 / secs / 1e9,
                client_cpu_s_per_gb: (cpu_of(&client) - before.0) / gb,
                server_cpu_s_per_gb: (cpu_of(&server) - before.1) / gb,
                gateway_cpu_s_per_gb: via.then(|| (cpu_of(&gateway) - before.2) / gb),
                machine_cpu_s_per_gb: (machine_busy_s() - machine) / gb,
                xdp_program_cpu_s_per_gb: (path == Reach::GatewayOwnNs { xdp: true })
                    .then(|| (xdp_run_seconds() - program) / gb),
            });
        }
        runs.sort_by(|x, y| x.gbit_s.total_cmp(&y.gbit_s));
        let median = runs.swap_remove(runs.len() / 2);
        eprintln!(
            "gateway bench, {} x{flows}: {:.2} Gbit/s, CPU-s/GB client {:.2} server {:.2} gateway {} XDP program {} machine {:.2}",
            path.name(),
            median.gbit_s,
            median.client_cpu_s_per_gb,
            median.server_cpu_s_per_gb,
            median
                .gateway_cpu_s_per_gb
                .map_or("–".into(), |g| format!("{g:.2}")),
            median
                .xdp_program_cpu_s_per_gb
                .map_or("–".into(), |g| format!("{g:.3}")),
            median.machine_cpu_s_per_gb,
        );
        bulk.push(median);
    }
    let _dma = DmaLatency::hold();
    for bytes in [1, 100] {
        let addr = lab.addr(route, Target::Echo);
        let samples = block_in(&lab.pair.a.name, move || crate::bulk::ping(addr, bytes))?;
        let rtt = Percentiles::of(samples);
        eprintln!(
            "gateway bench ping {} {bytes} B: p50 {:.1} µs p99 {:.1} µs",
            path.name(),
            rtt.p50_us,
            rtt.p99_us
        );
        ping.push(Ping { path, bytes, rtt });
    }
    Ok(())
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    let mut lab = Lab::up("hb8", 8)?;
    lab.restart_halyard("cubic")?;
    let (mut bulk, mut ping) = (Vec::new(), Vec::new());
    // Every path twice, alternating, so drift on a noisy machine shows as a spread instead of
    // a bias.
    for round in 0..2 {
        for path in PATHS {
            lab.restart_halyard_reaching(path)?;
            std::thread::sleep(Duration::from_millis(200));
            measure(&lab, path, &mut bulk, &mut ping)?;
            eprintln!("gateway bench: round {round} {} done", path.name());
        }
    }
    let report = Report {
        machine: Machine::probe(),
        dma_latency_held: DmaLatency::hold().held(),
        bulk,
        ping,
    };
    crate::stats::write_report("gateway", &markdown(&report), &report)
}

fn mean<T>(xs: &[&T], f: impl Fn(&T) -> f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().map(|x| f(x)).sum::<f64>() / xs.len() as f64
}

/// The bulk rows of `flows` flows on `path`.
fn bulk_of(r: &Report, flows: usize, path: Reach) -> Vec<&Bulk> {
    r.bulk
        .iter()
        .filter(|b| b.flows == flows && b.path == path)
        .collect()
}

fn ratio(x: f64, of: f64) -> String {
    if of > 0.0 {
        format!("{:.2}×", x / of)
    } else {
        "–".into()
    }
}

fn markdown(r: &Report) -> String {
    let mut md = String::from(
        "# East-west gateway: the same sidecars, directly and through `halyard gateway`\n\n",
    );
    md += &r.machine.markdown();
    md += "\nTopology: client app + sidecar in namespace a; server app + sidecar in namespace b; one veth \
           pair (MTU 1500) between them; `cubic`. Through a gateway, the client's registry names the server's \
           endpoint with `gateway = <gateway>:15444` (as a ClusterLink would), so every packet crosses the \
           gateway, which routes it by SNI / connection ID and hands it over behind a PROXY v2 header. \
           \"gateway in b\": the gateway beside the server in namespace b. \"gateway, user space\" and \
           \"gateway, XDP\": the gateway in a namespace g of its own, joined to a and to b by a veth pair \
           each, relaying every datagram in user space, or with `[xdp]` on both of its interfaces (the \
           kernel forwards established connections; Initials and Handshake packets still cross user \
           space). Each figure is the mean of two rounds (every path in turn); bulk is the median of 3 \
           runs of 3 s per round. CPU-s/GB: utime+stime of each process per GB delivered; for the XDP \
           gateway, plus its program's run time (the kernel's BPF run-time statistics, `[xdp] \
           run_time_stats`: the program alone, not the redirect's transmit that follows it). Machine: \
           busy time of both vCPUs (`/proc/stat`: every process and the kernel's softirq work) per GB; \
           \"added ÷ server sidecar\": the machine's CPU-s/GB beyond the direct path's, over the direct \
           server sidecar's. On a veth that figure charges the XDP gateway for its senders too: \
           attaching native XDP to a veth turns off UDP segmentation offload (GSO) on its peer, so both \
           sidecars segment their datagrams towards the gateway in software (their CPU-s/GB columns), \
           which a gateway on another host would not cause. \"direct, no GSO\": the direct path with \
           UDP segmentation offload off on its veth pair, so the sidecars send as they do into the XDP \
           gateway; its \"vs direct\" and \"added\" are against the direct path with GSO.\n\n";
    md += "| flows | path | Gbit/s | vs direct | client sidecar CPU-s/GB | server sidecar CPU-s/GB | gateway CPU-s/GB (process + XDP program) | gateway ÷ server sidecar | machine CPU-s/GB | added ÷ server sidecar |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for flows in [1, 8] {
        let of = |path: Reach| bulk_of(r, flows, path);
        let d = of(Reach::Direct);
        let direct = mean(&d, |b| b.gbit_s);
        let direct_machine = mean(&d, |b| b.machine_cpu_s_per_gb);
        let direct_server = mean(&d, |b| b.server_cpu_s_per_gb);
        for path in PATHS {
            let rows = of(path);
            let via = path.via_gateway();
            let gbit = mean(&rows, |b| b.gbit_s);
            let server = mean(&rows, |b| b.server_cpu_s_per_gb);
            let gw = mean(&rows, |b| {
                b.gateway_cpu_s_per_gb.unwrap_or(0.0) + b.xdp_program_cpu_s_per_gb.unwrap_or(0.0)
            });
            let machine = mean(&rows, |b| b.machine_cpu_s_per_gb);
            let dash = || "–".to_string();
            md += &format!(
                "| {flows} | {} | {gbit:.2} | {} | {:.2} | {server:.2} | {} | {} | {machine:.2} | {} |\n",
                path.name(),
                if path != Reach::Direct { ratio(gbit, direct) } else { dash() },
                mean(&rows, |b| b.client_cpu_s_per_gb),
                if via { format!("{gw:.3}") } else { dash() },
                if via { ratio(gw, server) } else { dash() },
                if path != Reach::Direct {
                    ratio(machine - direct_machine, direct_server)
                } else {
                    dash()
                },
            );
        }
    }
    md += "\nThe XDP gateway against the direct path with the same offloads (\"direct, no GSO\": the \
           sidecars segment in software on both): what the gateway itself costs, without what a veth \
           does to its senders.\n\n| flows | Gbit/s ÷ direct, no GSO | machine CPU-s/GB added ÷ server sidecar (direct, no GSO) |\n|---|---|---|\n";
    for flows in [1, 8] {
        let of = |path: Reach| bulk_of(r, flows, path);
        let (base, xdp) = (
            of(Reach::DirectNoGso),
            of(Reach::GatewayOwnNs { xdp: true }),
        );
        md += &format!(
            "| {flows} | {} | {} |\n",
            ratio(mean(&xdp, |b| b.gbit_s), mean(&base, |b| b.gbit_s)),
            ratio(
                mean(&xdp, |b| b.machine_cpu_s_per_gb) - mean(&base, |b| b.machine_cpu_s_per_gb),
                mean(&base, |b| b.server_cpu_s_per_gb)
            ),
        );
    }
    md += &format!(
        "\nPing-pong over one flow ({}):\n\n| bytes | path | p50 µs | p99 µs | added p50 µs | added p99 µs |\n|---|---|---|---|---|---|\n",
        if r.dma_latency_held {
            "/dev/cpu_dma_latency held at 0"
        } else {
            "/dev/cpu_dma_latency not held"
        }
    );
    for bytes in [1, 100] {
        let of = |path: Reach| -> Vec<&Ping> {
            r.ping
                .iter()
                .filter(|p| p.bytes == bytes && p.path == path)
                .collect()
        };
        let d = of(Reach::Direct);
        let (d50, d99) = (mean(&d, |p| p.rtt.p50_us), mean(&d, |p| p.rtt.p99_us));
        for path in PATHS {
            let rows = of(path);
            let (p50, p99) = (mean(&rows, |p| p.rtt.p50_us), mean(&rows, |p| p.rtt.p99_us));
            let added = |x: f64, base: f64| {
                if path != Reach::Direct {
                    format!("{:+.1}", x - base)
                } else {
                    "–".into()
                }
            };
            md += &format!(
                "| {bytes} | {} | {p50:.1} | {p99:.1} | {} | {} |\n",
                path.name(),
                added(p50, d50),
                added(p99, d99)
            );
        }
    }
    md
}
