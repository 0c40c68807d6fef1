//! Halyard benchmarks: `halyard-benches SCENARIO` writes `benches/results/SCENARIO.{md,json}`.
//! Scenarios: transport, bulk, latency, lossy, lossy-coexistence, newflows, scale, propagation, registry-rss, flood, gateway, micro, all. The h2-tunnel
//! baseline's two processes are this binary too (`h2-tunnel-server`, `h2-tunnel-client`), and so
//! is the flood's attacker (`handshake-flood`).
#![forbid(unsafe_code)]

mod bulk;
mod flood;
mod gateway;
mod h2tunnel;
mod lab;
mod latency;
mod linkemu;
mod lossy;
mod micro;
mod netns;
mod newflows;
mod scale;
mod setup;
mod stats;
mod transport;

const SCENARIOS: &str =
    "transport, bulk, latency, lossy, lossy-coexistence, newflows, scale, propagation, registry-rss, flood, gateway, micro, all";

type Scenario = fn() -> anyhow::Result<()>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("all", String::as_str);
    let rest = args.get(1..).unwrap_or_default();
    match which {
        "h2-tunnel-server" => h2tunnel::server_main(rest),
        "h2-tunnel-client" => h2tunnel::client_main(rest),
        "hold-flows" => scale::hold_main(rest),
        "handshake-flood" => flood::attacker_main(rest),
        "flood" => flood::main(),
        "gateway" => gateway::main(),
        "propagation" => scale::propagation_main(),
        "registry-rss" => scale::registry_rss_main(),
        "transport" => transport::main(),
        "bulk" => bulk::main(),
        "latency" => latency::main(),
        "lossy" => lossy::main(),
        "lossy-coexistence" => lossy::coexistence_main(),
        "micro" => micro::main(),
        "newflows" => newflows::main(),
        "scale" => scale::main(),
        "all" => all(),
        "readme" => readme(),
        other => anyhow::bail!("unknown scenario {other:?}; available: {SCENARIOS}"),
    }
}

fn all() -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let steps: [(&str, Scenario); 9] = [
        ("transport", transport::main),
        ("bulk", bulk::main),
        ("latency", latency::main),
        ("lossy", lossy::main),
        ("newflows", newflows::main),
        ("scale", scale::main),
        ("flood", flood::main),
        ("gateway", gateway::main),
        ("micro", micro::main),
    ];
    let mut failed = Vec::new();
    for (name, f) in steps {
        eprintln!("== {name} ({:.0} s so far)", start.elapsed().as_secs_f64());
        if let Err(e) = f() {
            eprintln!("bench {name} failed: {e:#}");
            failed.push(name);
        }
    }
    readme()?;
    anyhow::ensure!(failed.is_empty(), "failed: {failed:?}");
    Ok(())
}

/// Copies every scenario's markdown report into benches/README.md, between its markers.
fn readme() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = dir.join("README.md");
    let text = std::fs::read_to_string(&path)?;
    let (begin, end) = ("<!-- results:begin -->\n", "<!-- results:end -->");
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        anyhow::bail!("{}: results markers missing", path.display());
    };
    let mut results = String::new();
    for name in [
        "bulk",
        "latency",
        "lossy",
        "newflows",
        "scale",
        "propagation",
        "flood",
        "gateway",
        "micro",
        "transport",
    ] {
        let md = std::fs::read_to_string(dir.join("results").join(format!("{name}.md")))
            .unwrap_or_else(|_| format!("# {name}: no report\n"));
        // Two levels down: the reports' headings become subsections of "Latest results".
        for line in md.lines() {
            if line.starts_with('#') {
                results += "##";
            }
            results += line;
            results += "\n";
        }
        results += "\n";
    }
    let out = format!("{}{begin}{results}{}", &text[..b], &text[e..]);
    std::fs::write(&path, out)?;
    Ok(())
}
