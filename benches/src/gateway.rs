//! Scenario: the east-west gateway. The same two sidecars (client in namespace a, server in
//! namespace b, one veth pair) connected directly, then with the client reaching the server
//! through `halyard gateway` in namespace b, as a caller in another cluster does: bulk
//! throughput (1 and 8 flows), ping-pong round trips (1 and 100 bytes), and the CPU of each
//! process per GB delivered. The targets: ≤ 50 µs added p50 per round trip, ≤ 10 % less
//! throughput, gateway CPU per GB ≤ 0.3× a sidecar's.

use std::time::Duration;

use serde::Serialize;

use crate::lab::{Lab, Route, Target};
use crate::netns::{block_in, DmaLatency};
use crate::stats::{cpu_of, Machine, Percentiles};

const RUNS: usize = 3;

#[derive(Debug, Serialize)]
struct Bulk {
    via_gateway: bool,
    flows: usize,
    gbit_s: f64,
    /// CPU-seconds per GB delivered, by process.
    client_cpu_s_per_gb: f64,
    server_cpu_s_per_gb: f64,
    gateway_cpu_s_per_gb: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Ping {
    via_gateway: bool,
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

fn measure(lab: &Lab, via: bool, bulk: &mut Vec<Bulk>, ping: &mut Vec<Ping>) -> anyhow::Result<()> {
    let route = Route::HalyardL4;
    let pid = |name: &str| lab.pid_of(name).map(|p| vec![p]).unwrap_or_default();
    let (client, server, gateway) = (pid("sidecar-client"), pid("sidecar-server"), pid("gateway"));
    for flows in [1, 8] {
        let addr = lab.addr(route, Target::Sink);
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let before = (cpu_of(&client), cpu_of(&server), cpu_of(&gateway));
            let (bytes, secs) = block_in(&lab.pair.a.name, move || {
                crate::bulk::bulk_flows(addr, flows)
            })?;
            let gb = bytes as f64 / 1e9;
            runs.push(Bulk {
                via_gateway: via,
                flows,
                gbit_s: bytes as f64 * 8.0 / secs / 1e9,
                client_cpu_s_per_gb: (cpu_of(&client) - before.0) / gb,
                server_cpu_s_per_gb: (cpu_of(&server) - before.1) / gb,
                gateway_cpu_s_per_gb: via.then(|| (cpu_of(&gateway) - before.2) / gb),
            });
        }
        runs.sort_by(|x, y| x.gbit_s.total_cmp(&y.gbit_s));
        let median = runs.swap_remove(runs.len() / 2);
        eprintln!(
            "gateway bench, {} x{flows}: {:.2} Gbit/s, CPU-s/GB client {:.2} server {:.2} gateway {}",
            if via { "via gateway" } else { "direct" },
            median.gbit_s,
            median.client_cpu_s_per_gb,
            median.server_cpu_s_per_gb,
            median
                .gateway_cpu_s_per_gb
                .map_or("–".into(), |g| format!("{g:.2}"))
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
            if via { "via gateway" } else { "direct" },
            rtt.p50_us,
            rtt.p99_us
        );
        ping.push(Ping {
            via_gateway: via,
            bytes,
            rtt,
        });
    }
    Ok(())
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    let mut lab = Lab::up("hb8", 8)?;
    lab.restart_halyard("cubic")?;
    let (mut bulk, mut ping) = (Vec::new(), Vec::new());
    // Direct and through the gateway, twice each, alternating, so drift on a noisy machine
    // shows as a spread instead of a bias.
    for round in 0..2 {
        for via in [false, true] {
            lab.restart_halyard_via_gateway(via)?;
            std::thread::sleep(Duration::from_millis(200));
            measure(&lab, via, &mut bulk, &mut ping)?;
            eprintln!("gateway bench: round {round} {via} done");
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

fn markdown(r: &Report) -> String {
    let mut md = String::from(
        "# East-west gateway: the same sidecars, directly and through `halyard gateway`\n\n",
    );
    md += &r.machine.markdown();
    md += "\nTopology: client app + sidecar in namespace a; server app + sidecar + gateway in namespace b; \
           one veth pair (MTU 1500); `cubic`. \"via gateway\": the client's registry names the server's endpoint \
           with `gateway = <b>:15444` (as a ClusterLink would), so every packet crosses the gateway, which routes \
           it by SNI / connection ID and hands it over behind a PROXY v2 header. Each figure is the mean of two \
           rounds (direct and via gateway alternating); bulk is the median of 3 runs of 3 s per round. CPU-s/GB: \
           utime+stime of each process per GB delivered.\n\n";
    md += "| flows | path | Gbit/s | vs direct | client sidecar CPU-s/GB | server sidecar CPU-s/GB | gateway CPU-s/GB | gateway ÷ server sidecar |\n|---|---|---|---|---|---|---|---|\n";
    for flows in [1, 8] {
        let of = |via: bool| -> Vec<&Bulk> {
            r.bulk
                .iter()
                .filter(|b| b.flows == flows && b.via_gateway == via)
                .collect()
        };
        let (d, g) = (of(false), of(true));
        let direct = mean(&d, |b| b.gbit_s);
        for (via, rows) in [(false, &d), (true, &g)] {
            let gbit = mean(rows, |b| b.gbit_s);
            let server = mean(rows, |b| b.server_cpu_s_per_gb);
            let gw = mean(rows, |b| b.gateway_cpu_s_per_gb.unwrap_or(0.0));
            md += &format!(
                "| {flows} | {} | {gbit:.2} | {} | {:.2} | {server:.2} | {} | {} |\n",
                if via { "via gateway" } else { "direct" },
                if via && direct > 0.0 {
                    format!("{:.2}×", gbit / direct)
                } else {
                    "–".into()
                },
                mean(rows, |b| b.client_cpu_s_per_gb),
                if via {
                    format!("{gw:.2}")
                } else {
                    "–".into()
                },
                if via && server > 0.0 {
                    format!("{:.2}×", gw / server)
                } else {
                    "–".into()
                },
            );
        }
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
        let of = |via: bool| -> Vec<&Ping> {
            r.ping
                .iter()
                .filter(|p| p.bytes == bytes && p.via_gateway == via)
                .collect()
        };
        let (d, g) = (of(false), of(true));
        let (d50, d99) = (mean(&d, |p| p.rtt.p50_us), mean(&d, |p| p.rtt.p99_us));
        for (via, rows) in [(false, &d), (true, &g)] {
            let (p50, p99) = (mean(rows, |p| p.rtt.p50_us), mean(rows, |p| p.rtt.p99_us));
            let added = |x: f64, base: f64| {
                if via {
                    format!("{:+.1}", x - base)
                } else {
                    "–".into()
                }
            };
            md += &format!(
                "| {bytes} | {} | {p50:.1} | {p99:.1} | {} | {} |\n",
                if via { "via gateway" } else { "direct" },
                added(p50, d50),
                added(p99, d99)
            );
        }
    }
    md
}
