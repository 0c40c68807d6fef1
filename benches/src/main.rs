//! Halyard benchmarks. `halyard-benches transport` runs the transport bench and writes
//! `benches/results/transport.{md,json}`.
#![forbid(unsafe_code)]

mod transport;

fn main() -> anyhow::Result<()> {
    let which = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "transport".to_owned());
    match which.as_str() {
        "transport" => transport::main(),
        other => anyhow::bail!("unknown bench {other:?}; available: transport"),
    }
}
